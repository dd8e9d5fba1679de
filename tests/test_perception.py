"""The Perception Encoder release (facebookresearch/perception_models) as its checkpoints hold
it, against timm as the oracle: timm's own `checkpoint_filter_fn` (its `_convert_pe`) reads
the release's names, so the files here are what timm accepts as PE's, and timm's forward
computes the model at the grid its architecture was built for (where timm's and PE's RoPE
agree)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import weight_transfer as wt
from tests.conftest import assert_close
from tests.helpers.models import nchw, randomize
from weight_transfer.frameworks.runners import random_images, run_nnx, run_torch

timm = pytest.importorskip("timm")
from timm.models.eva import checkpoint_filter_fn  # noqa: E402

CORE, SPATIAL = "vit_pe_core_base_patch16_224", "vit_pe_spatial_base_patch16_512"


def timm_pe(arch: str):
    return randomize(timm.create_model(arch, pretrained=False, depth=2), seed=31).eval()


def pe_names(model, prefix: str) -> dict[str, torch.Tensor]:
    """A timm PE's weights under the release's names (the inverse of timm's `_convert_pe`):
    open_clip's, `ls_1.gamma`, the attention pool's `probe`, fused `in_proj` and `layernorm`,
    `proj` stored (in, out) without a bias."""
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    swaps = [
        ("patch_embed.proj", "conv1"),
        ("blocks.", "transformer.resblocks."),
        ("norm_pre", "ln_pre"),
        ("gamma_1", "ls_1.gamma"),
        ("gamma_2", "ls_2.gamma"),
        ("attn.qkv.", "attn.in_proj_"),
        ("attn.proj", "attn.out_proj"),
        ("mlp.fc1", "mlp.c_fc"),
        ("mlp.fc2", "mlp.c_proj"),
        ("norm1", "ln_1"),
        ("norm2", "ln_2"),
        ("attn_pool.latent", "attn_pool.probe"),
        ("attn_pool.norm", "attn_pool.layernorm"),
        ("attn_pool.proj", "attn_pool.attn.out_proj"),
    ]
    for key, value in sd.items():
        if key.startswith("rope") or key in ("head.bias",) or ".kv." in key:
            continue
        if key == "cls_token":
            out["class_embedding"] = value[0, 0]
        elif key == "pos_embed":
            out["positional_embedding"] = value[0]
        elif key == "head.weight":
            out["proj"] = value.T.contiguous()
        elif key == "norm.weight" or key == "norm.bias":
            out[key.replace("norm", "ln_post")] = value
        elif key.startswith("attn_pool.q."):  # [q; k; v] as MultiheadAttention holds them
            leaf = key.rsplit(".", 1)[1]
            out[f"attn_pool.attn.in_proj_{leaf}"] = torch.cat([value, sd[f"attn_pool.kv.{leaf}"]])
        else:
            name = key
            for theirs, pe in swaps:
                name = name.replace(theirs, pe)
            out[name] = value
    return {prefix + k: v for k, v in out.items()}


def save(tmp_path, tensors) -> str:
    path = tmp_path / "pe.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def timm_reads(tensors: dict, arch: str):
    model = timm.create_model(arch, pretrained=False, depth=2)
    model.load_state_dict(checkpoint_filter_fn(dict(tensors), model), strict=True)
    return model.eval()


def output(model, images) -> np.ndarray:
    with torch.no_grad():
        return model(nchw(images)).numpy()


@pytest.mark.parametrize("framework", ["torch", pytest.param("jax", marks=pytest.mark.slow)])
def test_a_pe_core_clip_checkpoint_loads_as_pe_computes(tmp_path, framework):
    """A whole PE core CLIP checkpoint (`visual.*` and a text tower), read with no hints: its
    RoPE from the layout's class, its attention pool's heads assumed aloud; equal to timm's
    forward on what timm's filter reads from the same file."""
    tensors = {**pe_names(timm_pe(CORE), "visual."), "text_projection": torch.ones(4, 4)}
    oracle = timm_reads(tensors, CORE)
    path = save(tmp_path, tensors)
    info = wt.inspect_checkpoint(path)
    assert info["layout"] == "pe" and any("text tower" in d for d in info["dropped"]), info
    assert {"map_heads", "num_heads", "activation", "ln_eps"} <= set(info["assumed"])
    ours = wt.load_checkpoint(path, framework)
    c = ours.config
    assert (c.rope, c.rope_axes, c.rope_offset, c.rope_ref_grid) == ("interleaved", "wh", 1.0, None)
    images = random_images(c, 2, seed=32)
    got = run_nnx(ours, images) if framework == "jax" else run_torch(ours, images)
    assert_close(output(oracle, images), np.asarray(got), "float32", f"PE core -> {framework}")


def test_a_bare_pe_spatial_tower_is_announced_and_read_with_from_pe(tmp_path):
    """PE spatial has exactly an open_clip tower's keys (no LayerScale, no pool): read as
    open_clip it is announced as a possible PE (naming --from pe); read as PE it is timm's."""
    tensors = pe_names(timm_pe(SPATIAL), "")
    oracle = timm_reads(tensors, SPATIAL)
    path = save(tmp_path, tensors)
    info = wt.inspect_checkpoint(path)
    assert info["layout"] == "open_clip" and "--from pe" in info["assumed"]["positions"]
    ours = wt.load_checkpoint(path, "torch", layout="pe", overrides={"pool": "mean"})
    images = random_images(ours.config, 1, seed=33)
    assert_close(output(oracle, images), run_torch(ours, images), "float32", "PE spatial")


@pytest.mark.slow  # 2.3 s; the release's own code at any grid is the quick check
def test_with_its_timm_architecture_the_release_keeps_pes_own_rope(tmp_path):
    """Named by timm's architecture (--arch), the release's file is still PE's model: the
    architecture's heads and pool heads, PE's RoPE without timm's rescale to a reference grid
    (the same function at this grid); written back in the release's names, timm's filter
    reads it strict and computes the same."""
    from safetensors.torch import load_file

    model = timm_pe(CORE)
    tensors = pe_names(model, "visual.")
    path = save(tmp_path, tensors)
    ours = wt.load_checkpoint(path, "torch", arch=CORE, overrides={"num_layers": 2})
    assert ours.config.rope_ref_grid is None and ours.config.map_heads == 8
    images = random_images(ours.config, 2, seed=34)
    expected = output(timm_reads(tensors, CORE), images)
    assert_close(expected, run_torch(ours, images), "float32", "PE core, --arch")
    out = wt.save_checkpoint(ours, tmp_path / "back.safetensors", layout="pe")
    back = timm_reads(load_file(out), CORE)
    assert_close(expected, output(back, images), "float32", "PE core written back")


@pytest.mark.parametrize(
    "kind", ["class-token-layerscale-projection", "no-class-token"], ids=lambda k: k
)
@pytest.mark.parametrize(
    "size",
    [pytest.param((64, 64), marks=pytest.mark.slow), (80, 48)],  # the other grid is the test
    ids=["native", "another-grid"],
)
def test_the_release_against_its_own_code_at_any_grid(tmp_path, kind, size):
    """PE's own VisionTransformer (vendored, tests/helpers/pe_vision.py) as the oracle, at its
    training grid and at another: there PE resizes its table bilinearly in every forward and
    rotates integer positions from 1 (no rescale to a reference grid), which the `pe` layout
    states and our port, resampled at load, computes."""
    from tests.helpers.pe_vision import VisionTransformer

    cls = kind != "no-class-token"
    model = VisionTransformer(
        patch_size=16,
        width=64,
        layers=2,
        heads=2,
        mlp_ratio=4.0,
        image_size=64,
        use_cls_token=cls,
        ls_init_value=0.1 if cls else None,
        output_dim=32 if cls else None,
        attn_pooler_heads=4,
    )
    model = randomize(model, seed=35).eval()
    path = save(tmp_path, model.state_dict())
    stated = {"num_heads": 2, "map_heads": 4}
    ours = wt.load_checkpoint(path, "torch", overrides=stated, image_size=size)
    images = random_images(ours.config, 2, seed=36)
    assert_close(output(model, images), run_torch(ours, images), "float32", f"PE {kind} {size}")
