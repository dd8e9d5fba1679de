"""open_clip and OpenAI CLIP checkpoints: `visual.*` state dicts (the text tower left out and
reported), exact GELU and QuickGELU, against open_clip's own `encode_image`; the QuickGELU
flag, which no file holds, from the model name (`--arch ViT-B-32-quickgelu`); towers on a timm
trunk (`visual.trunk.*`: EVA-02, PE, SigLIP 2) read by model name and written back."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import weight_transfer as wt
from tests.conftest import assert_close
from tests.helpers.models import nchw, randomize
from vit_config import ViTConfig
from weight_transfer.frameworks.runners import random_images, run_nnx, run_torch

open_clip = pytest.importorskip("open_clip")


def small_clip(quick_gelu: bool):
    from open_clip.model import CLIP

    return randomize(
        CLIP(
            embed_dim=16,
            quick_gelu=quick_gelu,
            vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
            text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1),
        ),
        seed=5,
    ).eval()


@pytest.mark.parametrize("framework", ["jax", "torch"])
@pytest.mark.parametrize("quick_gelu", [False, True], ids=["gelu", "quickgelu"])
def test_open_clip_state_dict_matches_encode_image(tmp_path, quick_gelu, framework):
    from safetensors.torch import save_file

    model = small_clip(quick_gelu)
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    act = "quick_gelu" if quick_gelu else "gelu"
    with pytest.warns(wt.errors.AssumedConfigWarning, match="image_size"):
        info = wt.inspect_checkpoint(path, overrides={"num_heads": 2, "activation": act})
        ours = wt.load_checkpoint(path, framework, overrides={"num_heads": 2, "activation": act})
    assert info["layout"] == "open_clip" and any("text tower" in d for d in info["dropped"])
    assert (ours.config.num_classes, ours.config.head_bias, ours.config.norm_pre) == (
        16,
        False,
        True,
    )
    images = random_images(ours.config, 2, seed=6)
    with torch.no_grad():
        expected = model.encode_image(nchw(images))
    got = run_nnx(ours, images) if framework == "jax" else run_torch(ours, images)
    assert_close(expected, np.asarray(got), "float32", f"open_clip {act} -> {framework}")


def test_the_activation_is_assumed_loudly_and_a_wrong_guess_differs(tmp_path):
    """The file cannot say QuickGELU: the default guess is announced, and it is measurably a
    different function from the QuickGELU model."""
    from safetensors.torch import save_file

    model = small_clip(quick_gelu=True)
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.warns(wt.errors.AssumedConfigWarning, match="QuickGELU"):
        guessed = wt.load_checkpoint(path, "torch", overrides={"num_heads": 2})
    images = random_images(guessed.config, 2, seed=6)
    with torch.no_grad():
        expected = model.encode_image(nchw(images)).numpy()
    assert np.abs(run_torch(guessed, images).numpy() - expected).max() > 1e-4


def test_open_clip_names_resolve_through_its_registry():
    from weight_transfer.layouts.open_clip import config_from_open_clip

    config = config_from_open_clip("ViT-B-32-quickgelu")
    assert (config.activation, config.patch_size, config.num_classes, config.ln_eps) == (
        "quick_gelu",
        32,
        512,
        1e-5,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            model = open_clip.model.CLIP(**open_clip.get_model_config("ViT-B-32-quickgelu"))
    assert config.num_params() == sum(p.numel() for p in model.visual.parameters())
    assert config_from_open_clip("ViT-B-32").activation == "gelu"
    assert isinstance(config, ViTConfig)


@pytest.mark.parametrize("quick_gelu", [False, True], ids=["gelu", "quickgelu"])
def test_written_open_clip_state_dict_loads_into_open_clip_strict(tmp_path, quick_gelu):
    """Back the other way: ours written as `visual.*` loads into open_clip's own image tower
    with strict=True, every weight bit-exact, and encode_image is unchanged; read back by us
    with nothing assumed (our manifest says what the file cannot)."""
    from safetensors.torch import load_file, save_file

    model = small_clip(quick_gelu)
    path = tmp_path / "published.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    act = "quick_gelu" if quick_gelu else "gelu"
    with pytest.warns(wt.errors.AssumedConfigWarning):
        ours = wt.load_checkpoint(path, "torch", overrides={"num_heads": 2, "activation": act})
    out = wt.save_checkpoint(ours, tmp_path / "visual.safetensors", layout="open_clip")
    written = load_file(out)
    assert all(k.startswith("visual.") for k in written)
    fresh = small_clip(quick_gelu)  # other random weights, same architecture
    fresh.visual.load_state_dict(
        {k.removeprefix("visual."): v for k, v in written.items()}, strict=True
    )
    for key, value in model.visual.state_dict().items():
        assert torch.equal(value, fresh.visual.state_dict()[key]), key
    images = random_images(ours.config, 2, seed=7)
    with torch.no_grad():
        assert torch.equal(model.encode_image(nchw(images)), fresh.encode_image(nchw(images)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert wt.load_checkpoint(out, "torch").config == ours.config


def test_a_model_open_clip_cannot_compute_is_refused(tmp_path):
    from tests.conftest import tiny
    from weight_transfer.frameworks.weights import random_torch

    with pytest.raises(
        wt.errors.LayoutError,
        match=r"open_clip's VisionTransformer cannot "
        r"hold this model: norm_pre=False",
    ):
        wt.save_checkpoint(
            random_torch(tiny(), seed=1), tmp_path / "v.safetensors", layout="open_clip"
        )
    assert list(tmp_path.iterdir()) == []


# open_clip models whose image tower is a timm trunk (`visual.trunk.*`): the trunk's own
# classifier as the projection (EVA-02, PE core: RoPE inside), or none (SigLIP 2, MAP pool)
TIMM_TOWERS = [
    "EVA02-B-16",
    "PE-Core-B-16",  # 2 s each (the first and the linear projections stay in the quick subset)
    "ViT-B-16-SigLIP2",
    "vit_medium_patch16_gap_256",  # timm's own pooling, then a bias-free head.proj
    "vit_relpos_medium_patch16_cls_224",  # relative biases, the same projection
]


def timm_tower_clip(name: str, monkeypatch):
    """open_clip's own model of `name`, its timm trunk built with 2 blocks (timm's
    create_model, as open_clip's TimmModel calls it, given depth=2) and a tiny text tower of
    the model's own kind, every parameter random."""
    import functools

    import timm

    text = dict(open_clip.get_model_config(name)["text_cfg"])
    text.update(layers=1, width=32, heads=2, vocab_size=64)
    text.pop("hf_tokenizer_name", None)
    create = timm.create_model
    with monkeypatch.context() as m:
        m.setattr(timm, "create_model", functools.partial(create, depth=2))
        model = open_clip.create_model(name, pretrained=None, text_cfg=text)
    return randomize(model, seed=9).eval()


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow) if n in ("PE-Core-B-16", "ViT-B-16-SigLIP2") else n
        for n in TIMM_TOWERS
    ],
)
def test_open_clip_timm_towers_read_by_name_and_written_back(tmp_path, name, monkeypatch):
    """A whole open_clip model (text tower included) whose image tower is a timm trunk, read
    with `--arch NAME` (its timm architecture, pooling and projection from open_clip's
    registry), equals `encode_image`; written back (`--to open_clip_timm`), open_clip's image
    tower loads it strict and computes the same."""
    from safetensors.torch import load_file, save_file

    model = timm_tower_clip(name, monkeypatch)
    path = tmp_path / "open_clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    info = wt.inspect_checkpoint(path, arch=name, overrides={"num_layers": 2})
    assert info["layout"] == "open_clip_timm" and any("text tower" in d for d in info["dropped"])
    ours = wt.load_checkpoint(path, "torch", arch=name, overrides={"num_layers": 2})
    images = random_images(ours.config, 2, seed=10)
    with torch.no_grad():
        expected = model.encode_image(nchw(images))
    assert_close(expected, run_torch(ours, images), "float32", f"{name} -> torch")
    out = wt.save_checkpoint(ours, tmp_path / "back.safetensors", layout="open_clip_timm")
    visual = {k.removeprefix("visual."): v for k, v in load_file(out).items()}
    fresh = timm_tower_clip(name, monkeypatch)
    fresh.visual.load_state_dict(visual, strict=True)
    with torch.no_grad():
        assert torch.equal(fresh.eval().encode_image(nchw(images)), expected)


@pytest.mark.slow  # 7 s: 78 timm models built on the meta device
def test_every_open_clip_timm_tower_resolves_or_is_refused_by_name():
    """Every open_clip model whose image tower is a timm trunk (78 in this open_clip) either
    resolves to a config (the ViTs: EVA-01/02, PE core, SigLIP and SigLIP 2, timm's own ViTs
    with a projection) or is refused naming what this ViT lacks (ConvNeXt, FastViT, Swin,
    ViTamin's convolutional stem, an MLP projection, 384 px on 14 px patches); none crashes."""
    from weight_transfer.layouts.open_clip import config_from_open_clip

    resolved, refused = [], []
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name)
        if not cfg or "timm_model_name" not in cfg.get("vision_cfg", {}):
            continue
        try:
            config_from_open_clip(name)
            resolved.append(name)
        except wt.errors.LayoutError:
            refused.append(name)
    assert set(TIMM_TOWERS) <= set(resolved)
    assert len(resolved) >= 41, refused
