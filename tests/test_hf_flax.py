"""Hugging Face Flax checkpoints, against transformers 4.47.1's own Flax classes (the last line
that has them, run in a subprocess from `.venv/hf-flax-oracle`, which `dev.py` installs):
FlaxViT (model and classifier), FlaxCLIPVisionModel and FlaxCLIPModel's image tower, FlaxDinov2
(model and classifier), every parameter random, saved by `save_pretrained` as msgpack, sharded
msgpack and Flax safetensors. Read with no hints into both frameworks, they compute what the
Flax classes compute; written back (`hf_flax*`), the Flax classes load them with no missing or
unexpected key and compute the same, every weight bit-exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import weight_transfer as wt
from tests.conftest import assert_close
from tests.helpers.hf_flax_oracle import ORACLE
from weight_transfer.frameworks.runners import run_nnx, run_torch

pytestmark = pytest.mark.skipif(
    not (ORACLE / "transformers").is_dir(),
    reason=f"the Flax oracle (transformers 4.47.1) is not in {ORACLE}: `python3 dev.py test` "
    f"installs it",
)

LAYOUT = {
    "vit_cls": "hf_flax",
    "vit_model": "hf_flax",
    "vit_safetensors": "hf_flax",
    "vit_sharded": "hf_flax",
    "clip_vision": "hf_flax_clip",
    "clip_whole": "hf_flax_clip",
    "dinov2_model": "hf_flax_dinov2",
    "dinov2_cls": "hf_flax_dinov2",
}


def oracle(*args: str | Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ORACLE), str(Path.cwd())])}
    env["JAX_PLATFORMS"] = "cpu"
    run = subprocess.run(
        [sys.executable, "-m", "tests.helpers.hf_flax_oracle", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert run.returncode == 0, run.stderr[-4000:]


@pytest.fixture(scope="session")
def published(tmp_path_factory, worker_id) -> Path:
    """The Flax classes' folders and their outputs on `images.npy`: made once per session,
    in the folder the xdist workers share (pytest-xdist's recipe), under a lock."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        shared = shared.parent
    out = shared / "hf_flax_published"
    with FileLock(str(out) + ".lock"):
        if not (out / "index.json").is_file():
            out.mkdir(exist_ok=True)
            oracle("make", out)
    return out


def outputs(model, images: np.ndarray, framework: str) -> np.ndarray:
    nhwc = images.transpose(0, 2, 3, 1)
    return np.asarray(run_nnx(model, nhwc) if framework == "jax" else run_torch(model, nhwc))


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["jax", "torch"])
@pytest.mark.parametrize("name", sorted(LAYOUT))
def test_hf_flax_files_compute_what_the_flax_classes_compute(published, name, framework):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = wt.inspect_checkpoint(published / name)
        model = wt.load_checkpoint(published / name, framework)
    assert info["layout"] == LAYOUT[name] and not info["assumed"], info
    said = [
        str(w.message) for w in caught if issubclass(w.category, wt.errors.AssumedConfigWarning)
    ]
    if name == "dinov2_cls":  # layerscale_value 0.5: FlaxDinov2 applies lambda1 x 0.25
        assert any("lambda1 x 0.25" in s for s in said), said
    else:
        assert not said, said
    images = np.load(published / "images.npy")
    want = np.load(published / f"{name}.npy")
    assert_close(want, outputs(model, images, framework), "float32", f"{name} -> {framework}")


WRITTEN = {  # fixture: the Flax class our hf_flax* folder is for
    "vit_cls": "FlaxViTForImageClassification",
    "vit_model": "FlaxViTForImageClassification",  # the identity head, written as a classifier
    "clip_vision": "FlaxCLIPVisionModel",
    "dinov2_model": "FlaxDinov2Model",
    "dinov2_cls": "FlaxDinov2ForImageClassification",
}


@pytest.mark.slow
def test_written_hf_flax_folders_load_in_the_flax_classes(published, tmp_path):
    """Ours written as each Flax class's folder: its `from_pretrained` finds every key it
    has (none missing, none unexpected, no shape differing) and computes what the published
    model computes; the weights are the published ones, bit for bit (the DINOv2 model goes
    through a timm Hub folder on the way, as the README shows)."""
    from flax.serialization import msgpack_restore
    from flax.traverse_util import flatten_dict

    jobs = []
    for name, cls in WRITTEN.items():
        if name == "dinov2_model":  # the README's way: through a timm Hub folder and back
            timm_folder = tmp_path / "dinov2_timm"
            wt.convert(published / name, timm_folder, to="timm")
            assert json.loads((timm_folder / "config.json").read_text())["architecture"]
            folder = tmp_path / name
            wt.convert(timm_folder, folder, to=LAYOUT[name])
        else:
            ours = wt.load_checkpoint(published / name, "torch")
            folder = wt.save_checkpoint(ours, tmp_path / name, layout=LAYOUT[name])
        assert (folder / "flax_model.msgpack").is_file()
        jobs.append(
            dict(
                folder=str(folder),
                **{"class": cls},
                images=str(published / "images.npy"),
                out=str(tmp_path / f"{name}.npy"),
            )
        )
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    oracle("load", tmp_path / "jobs.json")
    for name in WRITTEN:
        report = json.loads((tmp_path / f"{name}.json").read_text())
        assert report == {"missing": [], "unexpected": [], "shapes": []}, (name, report)
        want = np.load(published / f"{name}.npy")
        assert_close(want, np.load(tmp_path / f"{name}.npy"), "float32", f"Flax on our {name}")
        if name in ("vit_cls", "clip_vision", "dinov2_model"):  # the same class both ways
            before = flatten_dict(
                msgpack_restore((published / name / "flax_model.msgpack").read_bytes())
            )
            after = flatten_dict(
                msgpack_restore((tmp_path / name / "flax_model.msgpack").read_bytes())
            )
            assert set(before) == set(after), name
            for key, value in before.items():
                if key[-1] == "mask_token":  # unused at inference: written as zeros
                    assert not np.asarray(after[key]).any()
                    continue
                a, b = np.asarray(value), np.asarray(after[key])
                assert a.dtype == b.dtype and a.shape == b.shape, key
                assert a.tobytes() == b.tobytes(), key


def test_a_model_no_flax_class_holds_is_refused(tmp_path):
    """transformers has no FlaxCLIPVisionModelWithProjection, no Flax Dinov2WithRegisters,
    and a FlaxDinov2 SwiGLU that cannot be built: nothing is written, the reason named."""
    from tests.conftest import tiny
    from weight_transfer.frameworks.weights import random_torch

    cases = {
        "hf_flax_clip": (
            tiny(norm_pre=True, patch_bias=False, final_norm="post_pool", head_bias=False),
            "FlaxCLIPVisionModelWithProjection",
        ),
        "hf_flax_dinov2": (
            tiny(layer_scale=True, reg_tokens=2, pool="cls_mean", pos_embed_tokens="cls"),
            "Dinov2WithRegisters",
        ),
    }
    for layout, (config, reason) in cases.items():
        with pytest.raises(wt.errors.LayoutError, match=reason):
            wt.save_checkpoint(random_torch(config, seed=1), tmp_path / layout, layout=layout)
        assert not (tmp_path / layout).exists()


@pytest.mark.slow
@pytest.mark.parametrize("form", ["orbax", "msgpack"])
def test_flax_params_in_a_training_tree_compute_what_the_flax_class_computes(
    published, tmp_path, form
):
    """FlaxViT's params as a training loop saves them, `{"params": ..., "opt_state": ...,
    "step": ...}` in an Orbax folder or a legacy `checkpoint_<step>` msgpack: found by name
    inside the tree, the rest reported as left out; with no config.json, HF's defaults
    assumed aloud and the heads stated."""
    from flax.serialization import msgpack_restore

    from tests.test_npz_forms import save_tree

    params = msgpack_restore((published / "vit_cls" / "flax_model.msgpack").read_bytes())
    tree = {"params": params, "opt_state": {"mu": params}, "step": 3}
    path = save_tree(form, tree, tmp_path)
    info = wt.inspect_checkpoint(path, overrides={"num_heads": 4})
    assert info["layout"] == "hf_flax", info["layout"]
    assert {"ln_eps", "activation"} <= set(info["assumed"]), info["assumed"]
    assert any("optimiser state" in d for d in info["dropped"]), info["dropped"]
    images = np.load(published / "images.npy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = wt.load_checkpoint(path, "jax", overrides={"num_heads": 4})
    want = np.load(published / "vit_cls.npy")
    assert_close(want, outputs(model, images, "jax"), "float32", f"{form} training tree")


@pytest.mark.slow
def test_flax_dinov2_layer_scale_is_never_assumed_silently(published, tmp_path):
    """FlaxDinov2 applies lambda1 x layerscale_value**2. Its params with no config.json (a
    training tree) cannot say the value: 1 is assumed aloud. A config.json whose value is not
    a number is refused by name (it used to be read as 1)."""
    import shutil

    from flax.serialization import msgpack_restore

    from tests.test_npz_forms import save_tree

    params = msgpack_restore((published / "dinov2_cls" / "flax_model.msgpack").read_bytes())
    path = save_tree("msgpack", {"params": params, "step": 1}, tmp_path)
    with pytest.warns(wt.errors.AssumedConfigWarning, match="assumed layerscale_value = 1"):
        wt.load_checkpoint(path, "torch", overrides={"num_heads": 4})
    folder = tmp_path / "bad"
    shutil.copytree(published / "dinov2_cls", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "layerscale_value": "0.5"}))
    with pytest.raises(wt.errors.CheckpointError, match="layerscale_value"):
        wt.load_checkpoint(folder, "torch")
