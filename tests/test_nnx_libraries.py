"""Other NNX ViT libraries' states, saved as a training loop saves an NNX state (Orbax, flax's
msgpack) or flat (safetensors): read with no hints into both frameworks, each computes what
its library computes; written back, the library's model takes it by path, every weight
bit-exact.

- jax-ml/bonsai's ViTClassificationModel: its source vendored in tests/helpers/bonsai_vit.py
  as the oracle, every parameter random.
- pythoncrazy/jimm's VisionTransformer, CLIP and SigLIP: no licence, so not vendored; the
  oracle is tests/fixtures/jimm.json, the trees and float64 outputs jimm's own models gave
  (tests/fixtures/make_jimm.py), every parameter filled (`tests.helpers.jimm_fixture`)."""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest
from flax import nnx

import weight_transfer as wt
from tests.conftest import assert_close
from tests.helpers import bonsai_vit, jimm_fixture
from weight_transfer.frameworks.runners import run_nnx, run_torch
from weight_transfer.frameworks.weights import random_torch

CONFIG = bonsai_vit.ModelConfig(
    image_size=(16, 16),
    patch_size=(4, 4),
    num_channels=3,
    hidden_dim=24,
    attn_dropout_prob=0.0,
    dropout_prob=0.0,
    num_heads=3,
    mlp_dim=40,
    eps=1e-12,
    num_layers=2,
    num_labels=7,
)


def bonsai(seed: int):
    """bonsai's model with every parameter random (its norms are ones, its biases zeros)."""
    model = bonsai_vit.ViTClassificationModel(CONFIG, rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(state))))
    nnx.update(
        model,
        jax.tree.map(lambda p: 0.3 * jax.random.normal(next(keys), p.shape, p.dtype), state),
    )
    return model


def flat_state(model) -> dict[str, np.ndarray]:
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {".".join(str(getattr(k, "key", k)) for k in p): np.asarray(v) for p, v in leaves}


IMAGES = np.random.default_rng(3).standard_normal((2, 16, 16, 3)).astype(np.float32)


@pytest.mark.slow  # 8 s: bonsai's model compiled for the first time in a worker
@pytest.mark.parametrize("form", ["orbax", "msgpack", "safetensors"])
def test_a_bonsai_state_computes_what_bonsai_computes(tmp_path, form):
    model = bonsai(seed=1)
    want = np.asarray(model(IMAGES, rngs=None))
    if form == "orbax":
        import orbax.checkpoint as ocp

        path = tmp_path / "ckpt"
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(path, nnx.state(model, nnx.Param))
    elif form == "msgpack":  # flax's own bytes of the state's pure dict (list indices: ints)
        from flax import serialization

        path = tmp_path / "bonsai.msgpack"
        pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        path.write_bytes(serialization.msgpack_serialize(pure))
    else:
        from safetensors.numpy import save_file

        path = tmp_path / "bonsai.safetensors"
        save_file(flat_state(model), str(path))
    info = wt.inspect_checkpoint(path)
    assert info["layout"] == "bonsai_vit", info["layout"]
    assert {"activation", "ln_eps"} <= set(info["assumed"]) and "num_heads" not in info["assumed"]
    for framework in ("jax", "torch"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = wt.load_checkpoint(path, framework)
        got = run_nnx(ours, IMAGES) if framework == "jax" else run_torch(ours, IMAGES)
        assert_close(want, np.asarray(got), "float32", f"bonsai {form} -> {framework}")


@pytest.mark.slow  # 10 s: bonsai's model compiled (its forward is not jitted)
def test_written_bonsai_state_loads_into_bonsais_model(tmp_path):
    from safetensors.numpy import load_file, save_file

    original = bonsai(seed=2)
    save_file(flat_state(original), str(tmp_path / "published.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = wt.load_checkpoint(tmp_path / "published.safetensors", "torch")
    path = wt.save_checkpoint(ours, tmp_path / "ours.safetensors", layout="bonsai_vit")
    written = load_file(str(path))
    fresh = bonsai_vit.ViTClassificationModel(CONFIG, rngs=nnx.Rngs(9))
    state = nnx.state(fresh, nnx.Param)
    pure = nnx.to_pure_dict(state)
    paths = jax.tree_util.tree_flatten_with_path(pure)[0]
    names = [".".join(str(getattr(k, "key", k)) for k in p) for p, _ in paths]
    assert sorted(names) == sorted(written), set(names) ^ set(written)
    values = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(pure), [written[n] for n in names]
    )
    nnx.replace_by_pure_dict(state, values)  # by path, as bonsai's own loader assigns
    nnx.update(fresh, state)
    assert_close(
        np.asarray(original(IMAGES, rngs=None)),
        np.asarray(fresh(IMAGES, rngs=None)),
        "float32",
        "bonsai on our state vs the original",
    )
    for name, value in flat_state(original).items():
        assert value.tobytes() == written[name].tobytes(), name


# ---- jimm ------------------------------------------------------------------------------------

JIMM = jimm_fixture.models()
JIMM_LAYOUT = {
    "vit": "jimm_vit",
    "vit_features": "jimm_vit",
    "clip": "jimm_clip",
    "siglip": "jimm_siglip",
}
TEXT_TOWER = ("text_model", "token_embedding", "positional_embedding", "ln_final")
TEXT_TOWER += ("text_projection", "logit_scale", "logit_bias")


def save_jimm(tmp_path, name: str, form: str, dtype=np.float64):
    """jimm's state of model `name` as its user saves it: `nnx.state(model, nnx.Param)` to Orbax,
    flax's msgpack bytes of its pure dict (list indices are ints), or flat."""
    params = JIMM[name]["params"]
    if form == "orbax":
        import orbax.checkpoint as ocp

        path = tmp_path / "ckpt"
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(path, jimm_fixture.tree(params, dtype))
    elif form == "msgpack":
        from flax import serialization

        path = tmp_path / "jimm.msgpack"
        path.write_bytes(serialization.msgpack_serialize(jimm_fixture.tree(params, dtype)))
    else:
        from safetensors.numpy import save_file

        path = tmp_path / "jimm.safetensors"
        save_file(jimm_fixture.flat(params, dtype), str(path))
    return path


def jimm_images(name: str) -> np.ndarray:
    return jimm_fixture.images(JIMM[name]["image_shape"])


def run_both(path, images):
    for framework in ("jax", "torch"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = wt.load_checkpoint(path, framework)
        yield (
            framework,
            np.asarray(run_nnx(model, images) if framework == "jax" else run_torch(model, images)),
        )


@pytest.mark.parametrize("name", sorted(JIMM))
def test_a_jimm_state_computes_what_jimm_computed_in_float64(tmp_path, name):
    """Each model's msgpack state, float64 both ways, against jimm's own float64 output at
    1e-12: the blocks' 1e-6 epsilon (with the ViT's 1e-12 and CLIP's 1e-5 outside them), the
    activations and the text tower left out all count at this tolerance."""
    with jax.enable_x64(True), jax.default_matmul_precision("highest"):
        path = save_jimm(tmp_path, name, "msgpack")
        info = wt.inspect_checkpoint(path)
        assert info["layout"] == JIMM_LAYOUT[name], info["layout"]
        assert ("activation" in info["assumed"]) == name.startswith("vit"), info["assumed"]
        assert "num_heads" not in info["assumed"] and "ln_eps" not in info["assumed"]
        for framework, got in run_both(path, jimm_images(name)):
            assert_close(JIMM[name]["outputs"], got, "float64", f"jimm {name} -> {framework}")


# 0.4 s each (--durations): every model in float64 stays quick above; here one per form
FLOAT32_QUICK = {("orbax", "vit"), ("safetensors", "siglip")}


@pytest.mark.parametrize(
    "form, name",
    [
        pytest.param(f, n, marks=[pytest.mark.slow] * ((f, n) not in FLOAT32_QUICK))
        for f in ("orbax", "safetensors")
        for n in sorted(JIMM)
    ],
)
def test_a_float32_jimm_state_in_each_form_computes_what_jimm_computes(tmp_path, form, name):
    """Against jimm's float32 output as it runs (flax's attention on its fast path)."""
    path = save_jimm(tmp_path, name, form, np.float32)
    info = wt.inspect_checkpoint(path)
    assert info["layout"] == JIMM_LAYOUT[name], info["layout"]
    tower = [d for d in info["dropped"] if "the text tower" in d]
    assert bool(tower) == (name in ("clip", "siglip")), info["dropped"]
    images = jimm_images(name).astype(np.float32)
    for framework, got in run_both(path, images):
        want = JIMM[name]["outputs_float32"]
        assert_close(want, got, "float32", f"jimm {name} {form} -> {framework}")


@pytest.mark.parametrize("name", sorted(JIMM))
def test_a_written_jimm_state_is_the_tree_jimms_model_has(tmp_path, name):
    """Read, then written back as `jimm_*`: exactly the names and shapes of jimm's own tree
    (the image tower's, for CLIP and SigLIP: it updates that part of the whole model), every
    value bit-exact."""
    from safetensors.numpy import load_file

    with jax.enable_x64(True):
        source = save_jimm(tmp_path, name, "msgpack")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = wt.load_checkpoint(source, "torch")
        path = wt.save_checkpoint(ours, tmp_path / "out.safetensors", layout=JIMM_LAYOUT[name])
    written = load_file(str(path))
    theirs = {
        k: v
        for k, v in jimm_fixture.flat(JIMM[name]["params"]).items()
        if not k.startswith(TEXT_TOWER)
    }
    assert sorted(written) == sorted(theirs), set(written) ^ set(theirs)
    for key, value in theirs.items():
        assert written[key].dtype == np.float64 and value.tobytes() == written[key].tobytes(), key


@pytest.mark.parametrize(
    "name, changes, field",
    [
        ("vit", dict(activation="gelu"), "activation"),
        ("vit", dict(ln_eps=1e-6, block_ln_eps=None), "ln_eps"),
        ("clip", dict(num_heads=4, d_model=128), "num_heads"),
        ("siglip", dict(image_size=(8, 12)), "image_size"),
    ],
)
def test_a_model_jimm_cannot_compute_is_refused_by_name(tmp_path, name, changes, field):
    from weight_transfer.core.errors import LayoutError

    with jax.enable_x64(True):
        path = save_jimm(tmp_path, name, "msgpack")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = wt.load_checkpoint(path, "torch")
    config = model.config.replace(**changes)
    with pytest.raises(LayoutError, match=f"{field}="):
        wt.save_checkpoint(
            random_torch(config, seed=1), tmp_path / "out.safetensors", layout=JIMM_LAYOUT[name]
        )
    assert not (tmp_path / "out.safetensors").exists()


def test_a_jimm_vit_is_not_written_as_a_model_whose_blocks_compute_another_epsilon(call, tmp_path):
    """jimm's ViT blocks compute with 1e-6 and HF's ViT with its one 1e-12: refused by name,
    exit 2, rather than written to compute another function."""
    with jax.enable_x64(True):
        path = save_jimm(tmp_path, "vit", "msgpack", np.float32)
    done = call("convert", str(path), str(tmp_path / "hf"), "--to", "hf")
    assert done.returncode == 2, done.stderr
    assert "block_ln_eps=1e-06" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "hf").exists()


def test_a_jimm_siglip_state_becomes_a_folder_transformers_runs(call, tmp_path):
    """End to end, as a user would: `convert` a jimm SigLIP state to an HF folder; transformers'
    own SiglipVisionModel loads it with no missing key and computes jimm's output (jimm's
    SigLIP computes every norm with 1e-6 and tanh GELU, as HF's does)."""
    import torch
    import transformers as T

    path = save_jimm(tmp_path, "siglip", "msgpack", np.float32)
    done = call("convert", str(path), str(tmp_path / "hf"), "--to", "hf_siglip")
    assert done.returncode == 0, done.stderr
    model, info = T.SiglipVisionModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    images = torch.from_numpy(jimm_images("siglip").astype(np.float32)).permute(0, 3, 1, 2)
    with torch.no_grad():
        got = model.eval()(pixel_values=images).pooler_output.numpy()
    assert_close(JIMM["siglip"]["outputs_float32"], got, "float32", "transformers on jimm's")
