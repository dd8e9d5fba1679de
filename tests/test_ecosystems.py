"""Ports against the real libraries: timm, Hugging Face transformers, and timm's npz loader.

Every third-party model is built locally with random weights (no downloads), and every one of
its parameters is overwritten with random values before comparing.
"""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import weight_transfer as wt
from tests.conftest import TOL, assert_close
from tests.helpers.models import nchw, randomize
from vit_config import ViTConfig
from weight_transfer.frameworks.runners import random_images, run_nnx, run_torch
from weight_transfer.frameworks.weights import random_nnx

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


def timm_vit(**kw):
    from timm.models.vision_transformer import VisionTransformer

    base = dict(
        img_size=(32, 48),
        patch_size=8,
        embed_dim=48,
        depth=2,
        num_heads=3,
        mlp_ratio=2.0,
        num_classes=5,
    )
    return randomize(VisionTransformer(**{**base, **kw}))


def ours_for_timm(tokens: dict, qkv_bias: bool = True) -> ViTConfig:
    return ViTConfig(
        image_size=(32, 48),
        patch_size=8,
        d_model=48,
        num_heads=3,
        d_ff=96,
        num_layers=2,
        num_classes=5,
        qkv_bias=qkv_bias,
        **tokens,
    )


TIMM_CASES = {
    "token": (dict(global_pool="token"), dict(pool="cls"), True),
    "avg-no-cls": (
        dict(global_pool="avg", class_token=False, fc_norm=False),
        dict(pool="mean"),
        True,
    ),
    # a class token that is not pooled: timm averages the patch tokens only
    "avg-with-cls": (
        dict(global_pool="avg", class_token=True, fc_norm=False),
        dict(pool="mean", class_token=True),
        True,
    ),
    "token-no-qkv-bias": (dict(global_pool="token", qkv_bias=False), dict(pool="cls"), False),
}


@pytest.mark.parametrize("case", sorted(TIMM_CASES))
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_timm_to_ours_matches_timm_forward(tmp_path, case, framework):
    kw, pool, qkv_bias = TIMM_CASES[case]
    model = timm_vit(**kw)
    path = tmp_path / "timm.safetensors"
    save_file(model.state_dict(), path)
    config = ours_for_timm(pool, qkv_bias)
    ours = wt.load_checkpoint(path, framework, config=config)
    images = random_images(config, 2)
    with torch.no_grad():
        expected = model(nchw(images))
    got = run_nnx(ours, images) if framework == "jax" else run_torch(ours, images)
    assert_close(expected, got, "float32", f"timm {case} -> {framework}")


@pytest.mark.parametrize("case", sorted(TIMM_CASES))
def test_ours_to_timm_loads_strict_and_matches(tmp_path, case):
    kw, pool, qkv_bias = TIMM_CASES[case]
    ours = random_nnx(ours_for_timm(pool, qkv_bias), seed=4)
    path = wt.save_checkpoint(ours, tmp_path / "ours.safetensors", layout="timm")
    model = timm_vit(**kw)
    model.load_state_dict(load_file(path), strict=True)
    images = random_images(ours.config, 2)
    with torch.no_grad():
        expected = model(nchw(images))
    assert_close(expected, run_nnx(ours, images), "float32", f"nnx -> timm {case}")


@pytest.mark.slow
def test_timm_vit_tiny_patch16_224_detected_and_inferred(tmp_path):
    """A registered timm model, square 224 px: layout and config come from the file alone."""
    model = randomize(timm.create_model("vit_tiny_patch16_224", pretrained=False), seed=1)
    path = tmp_path / "vit_tiny.safetensors"
    save_file(model.state_dict(), path)
    info = wt.inspect_checkpoint(path)
    assert info["layout"] == "timm"
    assert ViTConfig.from_dict(info["config"]) == ViTConfig.preset("vit_ti16")
    assert info["parameters"] == sum(p.numel() for p in model.parameters()) == 5_717_416
    assert "num_heads" in info["assumed"] and "pool" in info["assumed"]
    with pytest.warns(wt.errors.AssumedConfigWarning, match="num_heads = 3 .head_dim 64"):
        ours = wt.load_checkpoint(path, "jax")  # the guesses happen to be right, and are said
    images = random_images(ours.config, 2)
    with torch.no_grad():
        expected = model(nchw(images))
    assert_close(expected, run_nnx(ours, images), "float32", "vit_tiny_patch16_224 -> nnx")


def test_a_bare_state_dict_says_what_it_assumed_and_takes_the_users_word(tmp_path):
    """head_dim 32: the usual head_dim-64 guess is wrong. It is announced, never silent, and
    --set num_heads (overrides=) gives timm's exact function."""
    model = timm_vit(img_size=32, embed_dim=128, num_heads=4, global_pool="token")
    path = tmp_path / "hd32.safetensors"
    save_file(model.state_dict(), path)
    with pytest.warns(wt.errors.AssumedConfigWarning, match=r"num_heads = 2 \(head_dim 64"):
        guessed = wt.load_checkpoint(path, "torch")
    with pytest.warns(wt.errors.AssumedConfigWarning) as record:
        ours = wt.load_checkpoint(path, "torch", overrides={"num_heads": 4})
    assert "num_heads" not in str(record[0].message) and ours.config.num_heads == 4
    images = random_images(ours.config, 2)
    with torch.no_grad():
        expected = model(nchw(images))
    assert_close(expected, run_torch(ours, images), "float32", "timm head_dim 32 -> torch")
    gap = float(np.max(np.abs(expected.numpy() - run_torch(guessed, images).numpy())))
    assert gap > 1e-3  # the guess is a different function: why it must be announced


def test_timm_fc_norm_is_read_as_a_norm_after_pooling(tmp_path):
    """global_pool='avg' with fc_norm: the LayerNorm runs after pooling (a different function
    from a norm before it), found from the fc_norm tensors, and the port matches timm."""
    model = timm_vit(img_size=32, global_pool="avg", class_token=False)  # fc_norm on with avg
    path = tmp_path / "fc_norm.safetensors"
    save_file(model.state_dict(), path)
    with pytest.warns(wt.errors.AssumedConfigWarning):
        ours = wt.load_checkpoint(path, "jax", overrides={"num_heads": 3})
    assert ours.config.final_norm == "post_pool" and ours.config.pool == "mean"
    images = random_images(ours.config, 2)
    with torch.no_grad():
        expected = model(nchw(images))
    assert_close(expected, run_nnx(ours, images), "float32", "timm fc_norm -> nnx")


def hf_config(**kw):
    base = dict(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=96,
        image_size=32,
        patch_size=8,
        num_labels=5,
        hidden_act="gelu",
    )
    return transformers.ViTConfig(**{**base, **kw})


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_hf_folder_to_ours_matches_hf_forward(tmp_path, framework):
    hf = randomize(transformers.ViTForImageClassification(hf_config()), seed=2)
    hf.save_pretrained(tmp_path / "hf")
    ours = wt.load_checkpoint(tmp_path / "hf", framework)
    assert ours.config.ln_eps == 1e-12 and ours.config.activation == "gelu"  # HF's defaults
    images = random_images(ours.config, 2)
    with torch.no_grad():
        expected = hf(pixel_values=nchw(images)).logits
    got = run_nnx(ours, images) if framework == "jax" else run_torch(ours, images)
    assert_close(expected, got, "float32", f"HF folder -> {framework}")


@pytest.mark.parametrize(
    "act, ours",
    [("quick_gelu", "quick_gelu"), ("silu", "silu"), ("gelu_pytorch_tanh", "gelu_tanh")],
)
def test_hf_activations_are_read_not_replaced(tmp_path, act, ours):
    hf = randomize(transformers.ViTForImageClassification(hf_config(hidden_act=act)), seed=4)
    hf.save_pretrained(tmp_path / "hf")
    model = wt.load_checkpoint(tmp_path / "hf", "torch")
    assert model.config.activation == ours
    images = random_images(model.config, 2)
    with torch.no_grad():
        expected = hf(pixel_values=nchw(images)).logits
    assert_close(expected, run_torch(model, images), "float32", f"HF hidden_act={act}")


def test_hf5_in_memory_names_are_read(tmp_path):
    hf = randomize(transformers.ViTForImageClassification(hf_config(layer_norm_eps=1e-6)), seed=3)
    path = tmp_path / "hf5.safetensors"
    save_file(hf.state_dict(), path)  # transformers 5 names: vit.layers.{i}.attention.q_proj
    assert wt.inspect_checkpoint(path)["layout"] == (
        "hf5" if any(".q_proj." in k for k in hf.state_dict()) else "hf"
    )
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        d_model=48,
        num_heads=3,
        d_ff=96,
        num_layers=2,
        num_classes=5,
        ln_eps=1e-6,
    )
    ours = wt.load_checkpoint(path, "jax", config=config)
    images = random_images(config, 2)
    with torch.no_grad():
        expected = hf(pixel_values=nchw(images)).logits
    assert_close(expected, run_nnx(ours, images), "float32", "HF in-memory names -> nnx")


def test_ours_to_hf_from_pretrained(tmp_path):
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        d_model=48,
        num_heads=3,
        d_ff=96,
        num_layers=2,
        num_classes=5,
        ln_eps=1e-12,
    )
    ours = random_nnx(config, seed=6)
    folder = wt.save_checkpoint(ours, tmp_path / "hf_out", layout="hf")
    assert json.loads((folder / "config.json").read_text())["layer_norm_eps"] == 1e-12
    hf = transformers.ViTForImageClassification.from_pretrained(folder).eval()
    images = random_images(config, 2)
    with torch.no_grad():
        expected = hf(pixel_values=nchw(images)).logits
    assert_close(expected, run_nnx(ours, images), "float32", "nnx -> HF from_pretrained")


@pytest.mark.parametrize("pooler", [True, False])
def test_hf_vit_model_without_classifier(tmp_path, pooler):
    """ViTModel has no classifier: the head becomes the identity, logits = CLS features."""
    hf = randomize(transformers.ViTModel(hf_config(), add_pooling_layer=pooler), seed=7)
    hf.save_pretrained(tmp_path / "vitmodel")
    info = wt.inspect_checkpoint(tmp_path / "vitmodel")
    dropped = " ".join(info["dropped"])
    assert ("pooler.dense.weight" in dropped) == pooler and "identity" in dropped
    ours = wt.load_checkpoint(tmp_path / "vitmodel", "jax")
    images = random_images(ours.config, 2)
    with torch.no_grad():
        expected = hf(pixel_values=nchw(images)).last_hidden_state[:, 0]
    assert_close(expected, run_nnx(ours, images), "float32", "ViTModel CLS features")


def test_google_vit_npz_loads_in_timms_own_loader(tmp_path):
    from timm.models.vision_transformer import _load_weights

    config = ours_for_timm(dict(pool="cls"))
    ours = random_nnx(config, seed=8)
    path = wt.save_checkpoint(ours, tmp_path / "vit", layout="google_vit")
    model = timm_vit(global_pool="token")
    _load_weights(model, str(path))
    images = random_images(config, 2)
    with torch.no_grad():
        expected = model(nchw(images))
    assert_close(expected, run_nnx(ours, images), "float32", "our npz in timm's _load_weights")


def test_big_vision_bv_variant_folds_cls_position(tmp_path):
    """big_vision adds pos_embedding before the CLS joins: the CLS position folds into the
    token, so the function is the same (not bit-exact: one float add)."""
    ours = random_nnx(ours_for_timm(dict(pool="cls")), seed=9)
    path = wt.save_checkpoint(ours, tmp_path / "bv", layout="big_vision_bv")
    with np.load(path) as npz:
        assert npz["pos_embedding"].shape == (1, 24, 48) and npz["cls"].shape == (1, 1, 48)
    back = wt.load_checkpoint(path, "jax")
    images = random_images(ours.config, 2)
    assert_close(run_nnx(ours, images), run_nnx(back, images), "float32", "bv fold round trip")


def test_a_timm_avg_pool_state_dict_with_set_pool_mean(tmp_path):
    """global_pool='avg' with a class token: the state dict cannot say it; --set pool=mean
    keeps the class token and matches timm."""
    model = timm_vit(img_size=32, global_pool="avg", class_token=True, fc_norm=False)
    path = tmp_path / "avg.safetensors"
    save_file(model.state_dict(), path)
    with pytest.warns(wt.errors.AssumedConfigWarning, match="image_size"):
        ours = wt.load_checkpoint(path, "jax", overrides={"pool": "mean", "num_heads": 3})
    assert ours.config.class_token and ours.config.pool == "mean"
    images = random_images(ours.config, 2)
    with torch.no_grad():
        expected = model(nchw(images))
    assert_close(expected, run_nnx(ours, images), "float32", "timm avg with cls -> nnx")


def test_a_bare_state_dict_says_its_positions_were_assumed(tmp_path):
    """Perception Encoder's bare timm state dict has a plain ViT's keys and also rotates q and
    k: the file cannot tell, so the position scheme is announced by name with --arch as the
    way out; named, the architecture loads with its RoPE and equals timm's forward."""
    from safetensors.torch import save_file

    arch = "vit_pe_core_base_patch16_224"
    pe = randomize(timm.create_model(arch, pretrained=False, depth=2, img_size=64, num_classes=0))
    path = tmp_path / "pe.safetensors"
    save_file({k: v.contiguous() for k, v in pe.state_dict().items()}, str(path))
    with pytest.warns(
        wt.errors.AssumedConfigWarning,
        match=r"positions = a learned table only "
        r".*Perception Encoder.*--arch",
    ):
        wt.load_checkpoint(path, "torch")
    assert "Perception Encoder" in wt.inspect_checkpoint(path)["assumed"]["positions"]
    hints = dict(arch=arch, overrides={"num_layers": 2, "image_size": 64, "num_classes": 0})
    ours = wt.load_checkpoint(path, "torch", **hints)
    images = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        want = pe.eval()(torch.from_numpy(images)).numpy()
        got = ours(torch.from_numpy(images)).numpy()
    assert np.abs(got - want).max() <= TOL["float32"] * max(1.0, np.abs(want).max())
