"""The original DINOv3 release (facebookresearch/dinov3) as its checkpoints hold it, against
timm as the oracle: timm's own `checkpoint_filter_fn` converts the original's names (so the
files here are what timm accepts as the original's), and timm's forward computes the model.
When the file's RoPE periods are not the ones timm recomputes (the released buffers are
reported to be bfloat16), timm is given the file's periods, as the original uses them."""

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

ARCH = "vit_small_patch16_dinov3"
GRID = (64, 96)  # 4 x 6 patches: an axis swap would show


def timm_dinov3(**kw):
    """timm's DINOv3 S/16, 2 blocks, pooling its class token as the original does."""
    model = timm.create_model(
        ARCH, pretrained=False, depth=2, img_size=GRID, num_classes=0, global_pool="token", **kw
    )
    return randomize(model, seed=21).eval()


def original_names(model, periods: torch.Tensor) -> dict[str, torch.Tensor]:
    """A timm DINOv3's weights under the original's names, as `DinoVisionTransformer` saves
    them (the inverse of timm's filter): `storage_tokens`, `ls1.gamma`, SwiGLU `w1`/`w2`, a
    q|k|v bias whose k third is junk zeroed by `bias_mask`, the unused mask token, and the
    RoPE `periods` buffer."""
    d = model.embed_dim
    rng = torch.Generator().manual_seed(5)
    out = {"mask_token": torch.randn(1, d, generator=rng), "rope_embed.periods": periods}
    gated = any("mlp.fc1_g" in k for k in model.state_dict())  # SwiGLUFFN: w1, w2, w3
    for key, value in model.state_dict().items():
        name = key.replace("reg_token", "storage_tokens")
        if gated:
            name = name.replace("mlp.fc2", "mlp.w3")
        for timm_name, theirs in (
            ("gamma_1", "ls1.gamma"),
            ("gamma_2", "ls2.gamma"),
            ("mlp.fc1_g", "mlp.w1"),
            ("mlp.fc1_x", "mlp.w2"),
        ):
            name = name.replace(timm_name, theirs)
        if key.startswith("rope.") or key.endswith(("v_bias", "k_bias")):
            continue
        if key.endswith("q_bias"):  # q | junk the mask zeroes | v
            v = model.state_dict()[key.replace("q_bias", "v_bias")]
            junk = 3 * torch.randn(d, generator=rng)
            out[name.replace("q_bias", "qkv.bias")] = torch.cat([value, junk, v])
            out[name.replace("q_bias", "qkv.bias_mask")] = torch.cat(
                [torch.ones(d), torch.zeros(d), torch.ones(d)]
            )
            continue
        out[name] = value
    return out


def periods_of(model, dtype=torch.float32) -> torch.Tensor:
    """The periods as the original's `_init_weights` computes them, in its rope dtype."""
    hd = model.embed_dim // model.blocks[0].attn.num_heads
    return 100.0 ** (2 * torch.arange(hd // 4, dtype=dtype) / (hd // 2))


def timm_reads(original: dict, **kw):
    """timm's model loaded from the original's names by timm's own filter, strict."""
    model = timm_dinov3(**kw)
    model.load_state_dict(checkpoint_filter_fn(dict(original), model), strict=True)
    return model


def save(tmp_path, tensors: dict) -> str:
    path = tmp_path / "dinov3.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return str(path)


def output(model, images) -> np.ndarray:
    with torch.no_grad():
        return model(nchw(images)).numpy()


@pytest.mark.parametrize("framework", ["torch", pytest.param("jax", marks=pytest.mark.slow)])
def test_an_original_dinov3_file_loads_as_the_original_computes(tmp_path, framework):
    """float32 periods (the hub loader's): recomputed in float64 from the base the file's
    periods say; the heads read off the periods' count, the masked key bias off its mask."""
    model = timm_dinov3(qkv_bias=True)
    original = original_names(model, periods_of(model))
    oracle = timm_reads(original, qkv_bias=True)
    path = save(tmp_path, original)
    info = wt.inspect_checkpoint(path)
    assert info["layout"] == "dinov3", info
    assert set(info["assumed"]) == {"ln_eps", "rope_coords", "image_size"}, info["assumed"]
    ours = wt.load_checkpoint(path, framework, overrides={"image_size": GRID})
    c = ours.config
    assert (c.num_heads, c.k_bias, c.rope_theta, c.rope_periods) == (6, False, 100.0, None)
    images = random_images(c, 2, seed=3)
    got = run_nnx(ours, images) if framework == "jax" else run_torch(ours, images)
    assert_close(output(oracle, images), np.asarray(got), "float32", f"original -> {framework}")


def test_bfloat16_periods_are_used_as_the_file_holds_them(tmp_path):
    """Periods rounded to bfloat16 (timm: "original dinov3 model weights have periods
    downcast to bfloat16"): used as they are, so the port computes the original's function;
    timm, recomputing float32 periods, computes another (shown), and is the oracle only once
    given the file's periods."""
    model = timm_dinov3(swiglu_mlp=True, swiglu_align_to=8)
    periods = periods_of(model, torch.bfloat16)
    original = original_names(model, periods)
    path = save(tmp_path, original)
    info = wt.inspect_checkpoint(path)
    assert "rope_periods" in info["found"], info
    ours = wt.load_checkpoint(path, "torch", overrides={"image_size": GRID})
    assert ours.config.rope_periods == tuple(periods.double().tolist())
    images = random_images(ours.config, 2, seed=4)
    got = np.asarray(run_torch(ours, images))
    recomputing = timm_reads(original, swiglu_mlp=True, swiglu_align_to=8)
    assert np.abs(output(recomputing, images) - got).max() > 1e-4  # the periods matter
    rope = recomputing.rope
    rope.periods.copy_(periods.float())
    assert rope.pos_embed_cached is None  # dynamic_img_size: built from `periods` each call
    assert_close(output(recomputing, images), got, "float32", "bfloat16 periods")
    # timm cannot hold them: refused by name, not written with its own
    with pytest.raises(wt.errors.LayoutError, match="rope_periods"):
        wt.save_checkpoint(ours, tmp_path / "timm.safetensors", layout="timm")


def test_ours_written_in_the_original_names_loads_in_timm(tmp_path):
    """Back: our model written as the original's file (its buffers computed from the config:
    float32 periods, the key-bias masks, a zero mask token) is what timm's filter reads, and
    computes the same; read back, it is the same model."""
    model = timm_dinov3(qkv_bias=True)
    original = save(tmp_path, original_names(model, periods_of(model)))
    ours = wt.load_checkpoint(original, "torch", overrides={"image_size": GRID})
    out = wt.save_checkpoint(ours, tmp_path / "written.safetensors", layout="dinov3")
    from safetensors.torch import load_file

    written = load_file(out)
    assert torch.equal(written["rope_embed.periods"], periods_of(model))
    oracle = timm_reads(written, qkv_bias=True)
    images = random_images(ours.config, 2, seed=6)
    assert_close(output(oracle, images), run_torch(ours, images), "float32", "written")
    assert wt.load_checkpoint(out, "torch").config.same_model(ours.config)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.update({"rope_embed.periods": torch.ones(5)}), "rope_embed.periods"),
        (lambda t: t.update({"rope_embed.periods": -torch.ones(16)}), "rope_embed.periods"),
        (lambda t: t.pop("rope_embed.periods"), "rope_embed.periods"),
        (
            lambda t: t.update({"blocks.1.attn.qkv.bias_mask": torch.ones(3 * 384)}),
            "bias_mask",
        ),
        (lambda t: t.update({"cls_norm.weight": torch.ones(384)}), "untie_cls_and_patch_norms"),
    ],
    ids=["periods-length", "periods-sign", "no-periods", "mask", "cls-norm"],
)
def test_a_forged_original_file_is_refused(tmp_path, edit, message):
    """Periods of the wrong count or sign, none at all, a mask that is not the key's, a
    separate class-token norm (the 7B's): refused by name, exit 2, nothing written."""
    from weight_transfer.cli import main

    model = timm_dinov3(qkv_bias=True)
    tensors = original_names(model, periods_of(model))
    edit(tensors)
    path = save(tmp_path, tensors)
    with pytest.raises(wt.errors.VitParityError, match=message):
        wt.load_checkpoint(path, "torch")
    assert main(["convert", path, str(tmp_path / "out.safetensors"), "--to", "torch"]) == 2
    assert not (tmp_path / "out.safetensors").exists()


def test_inspect_says_where_each_position_field_was_found(tmp_path, capsys):
    """`inspect` lists the fields saying how positions enter the model, each with where it
    was found (the layout's class, the file's buffer) or that it was assumed."""
    from weight_transfer.cli import main

    model = timm_dinov3(qkv_bias=True)
    path = save(tmp_path, original_names(model, periods_of(model, torch.bfloat16)))
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "positions rope=half (the dinov3 layout's class)" in out
    assert "positions rope_theta=100.0 (rope_embed.periods" in out
    assert "positions rope_periods=[1.0, " in out and "the file's own" in out
    assert "positions rope_coords=separate (assumed)" in out
