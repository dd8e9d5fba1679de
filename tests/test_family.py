"""The ViT family in both models: every feature (prefix tokens and their positions, pooling,
norms, LayerScale, gated MLPs, activations, q/k norms, biases, no head) with the same
guarantees as the plain ViT: logits both directions (float32 1e-5, float64 1e-12), the NumPy
reference from the maths in float64, gradients of every parameter, bit-exact round trips; and
each family preset against timm's own architecture. Every parameter is random first."""

from __future__ import annotations

import dataclasses
import warnings

import jax
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import weight_transfer as wt
from tests.conftest import TOL, assert_close
from tests.helpers.models import assert_bit_exact, nchw
from vit_config import PRESETS, ViTConfig, arch
from weight_transfer.core.errors import LayoutError
from weight_transfer.diagnostics import numpy_ref
from weight_transfer.diagnostics.metrics import relative_error
from weight_transfer.diagnostics.parity import nnx_grads, torch_grads
from weight_transfer.frameworks.bridge import nnx_params
from weight_transfer.frameworks.runners import random_images, run_nnx, run_torch, x64_for
from weight_transfer.frameworks.weights import random_nnx, random_torch
from weight_transfer.layouts.timm import TIMM_ARCHS

BASE = dict(
    image_size=(8, 12),
    patch_size=4,
    in_channels=3,
    d_model=24,
    num_heads=3,
    d_ff=40,
    num_layers=2,
    num_classes=7,
)
# One small config per feature (and the combinations the published models use).
FAMILY = {
    "cls-with-mean-pool": dict(class_token=True, pool="mean"),
    "registers": dict(reg_tokens=2),
    "registers-no-cls": dict(class_token=False, pool="mean", reg_tokens=3),
    "positions-none": dict(pos_embed_tokens="none", reg_tokens=2),
    "positions-cls-only": dict(pos_embed_tokens="cls", reg_tokens=2),
    "distilled": dict(dist_token=True),
    "distilled-features": dict(dist_token=True, num_classes=0),  # timm: the two tokens' mean
    "distillation-token-unread": dict(dist_token=True, dist_head=False),  # HF, no teacher
    "map": dict(class_token=False, pool="map", num_classes=0),
    "map-with-cls": dict(pool="map", class_token=True),
    "cls-mean": dict(pool="cls_mean"),
    "fc-norm": dict(class_token=False, pool="mean", final_norm="post_pool"),
    "no-final-norm": dict(final_norm="none"),
    "norm-pre-clip": dict(norm_pre=True, patch_bias=False, ln_eps=1e-5, activation="quick_gelu"),
    # jimm: the blocks' norms with their own epsilon (large here, so a swap cannot hide)
    "block-eps": dict(norm_pre=True, ln_eps=1e-5, block_ln_eps=0.05),
    "layer-scale": dict(layer_scale=True),
    "swiglu-rmsnorm-aimv2": dict(
        class_token=False,
        pool="mean",
        mlp="swiglu",
        activation="silu",
        norm="rmsnorm",
        patch_norm=True,
        qkv_bias=False,
        proj_bias=False,
        mlp_bias=False,
    ),
    "swiglu-packed": dict(mlp="swiglu_packed", activation="silu", layer_scale=True),
    "qk-norm": dict(qk_norm=True),
    "no-head": dict(num_classes=0),
    "no-head-bias": dict(head_bias=False),
    # 2-D RoPE (head_dim 8: two angles per axis), on the non-square 2 x 3 grid
    "rope-interleaved-wh": dict(  # RoPE-ViT axial
        rope="interleaved", rope_axes="wh", rope_theta=100.0, pos_embed=False, layer_scale=True
    ),
    "rope-half-periods-registers": dict(  # DINOv3
        rope="half",
        rope_freqs="periods",
        rope_theta=100.0,
        pos_embed=False,
        reg_tokens=2,
        layer_scale=True,
        class_token=True,
        pool="mean",
    ),
    "rope-with-table-offset-ref": dict(  # PE: a learned table too, +1, the ref-grid rescale
        rope="interleaved", rope_axes="wh", rope_offset=1.0, rope_ref_grid=(4, 4), norm_pre=True
    ),
    # coordinates over the shorter side; the periods as a file holds them (the original
    # DINOv3's buffer: a min/max-period schedule, or bfloat16-rounded), not rope_theta's
    "rope-periods-min-max": dict(
        rope="half",
        rope_freqs="periods",
        rope_coords="min",
        rope_periods=(1.0, 5.65625),
        class_token=False,
        pool="mean",
    ),
    "rope-mixed-learned": dict(  # RoPE-ViT mixed: each block and head its own frequencies
        rope="interleaved", rope_freqs="mixed", rope_axes="wh", pos_embed=False, reg_tokens=1
    ),
    "rope-mixed-half-hw-with-table": dict(rope="half", rope_freqs="mixed"),
    # blocks: EVA-02's (q and v biases only, sub-LN norms in attention and the SwiGLU, RoPE
    # with a table), post-norm residuals, BEiT's relative biases (per block, shared)
    "eva02-blocks": dict(
        k_bias=False,
        qkv_fused=False,
        attn_norm=True,
        mlp_norm=True,
        mlp="swiglu",
        activation="silu",
        rope="interleaved",
        rope_ref_grid=(4, 4),
    ),
    "post-norm": dict(block="post_norm", layer_scale=True),
    # parallel blocks: ViT-22B's (one norm, attention and MLP side by side: timm
    # ParallelScalingBlock), and two pre-norm branches summed (timm ParallelThingsBlock)
    "parallel-22b": dict(
        block="parallel", norm="rmsnorm", qkv_bias=False, qk_norm=True, layer_scale=True
    ),
    "parallel-branches": dict(num_parallel=2, layer_scale=True, reg_tokens=1),
    "beit-relative-bias": dict(
        rel_pos_bias="block",
        pos_embed=False,
        k_bias=False,
        layer_scale=True,
        pool="mean",
        class_token=True,
        final_norm="post_pool",
    ),
    "relative-bias-shared": dict(rel_pos_bias="shared", qkv_bias=False),
    # timm relpos: the table computed by a log-coordinate MLP, the prefix tokens unbiased
    "relpos-mlp": dict(rel_pos_bias="block", rel_pos_form="mlp", rel_pos_dim=6, reg_tokens=1),
    "relpos-mlp-shared-post-norm": dict(
        rel_pos_bias="shared", rel_pos_form="mlp", block="post_norm", class_token=False, pool="mean"
    ),
    # pooling that reads the prefix tokens; a MAP head with its own head count (PE core)
    "map-own-heads-with-prefix": dict(
        pool="map", class_token=True, reg_tokens=1, map_heads=1, map_d_ff=12, pool_prefix=True
    ),
    "mean-with-prefix": dict(pool="mean", class_token=True, reg_tokens=2, pool_prefix=True),
    # NaFlex (timm NaFlexVit): the table on its own grid, resampled in the forward to the
    # 2 x 3 image grid: antialiased bicubic down from 3 x 5 (naflexvit_*_gap); bilinear with
    # aligned corners up to a 4 x 4 square, its top-left 2 x 3 kept (C-RADIO)
    "naflex-bicubic-antialias": dict(
        class_token=False,
        pool="mean",
        reg_tokens=2,
        pos_embed_tokens="none",
        final_norm="post_pool",
        layer_scale=True,
        pos_grid=(3, 5),
    ),
    "naflex-bilinear-square-corners": dict(
        reg_tokens=1,
        pos_embed_tokens="none",
        final_norm="none",
        pos_grid=(3, 2),
        pos_interpolation="bilinear",
        pos_antialias=False,
        pos_align_corners=True,
        pos_square=True,
    ),
}


def family(name: str, **changes) -> ViTConfig:
    return ViTConfig(**{**BASE, **FAMILY[name], **changes})


def both_ways(config: ViTConfig, dtype: str, seed: int = 0):
    """(direction, reference logits, ported logits) for nnx->torch and torch->nnx."""
    images = random_images(config, 3, seed, dtype)
    source = random_nnx(config, seed, dtype)
    yield "nnx->torch", run_nnx(source, images), run_torch(wt.to_torch(source), images)
    source = random_torch(config, seed + 1, dtype)
    yield "torch->nnx", run_torch(source, images), run_nnx(wt.to_nnx(source), images)


# In the whole suite only (0.4-0.9 s each, --durations), to keep the quick subset in its
# budget: float32 logits of these (float64 is the finer check) ...
FLOAT32_SLOW = {
    "rope-periods-min-max",
    "rope-with-table-offset-ref",
    "mean-with-prefix",
    "map-own-heads-with-prefix",
    "relative-bias-shared",
    "post-norm",
    "relpos-mlp-shared-post-norm",
    "rope-mixed-half-hw-with-table",
    "parallel-22b",
    "parallel-branches",
    "distilled-features",
    "distillation-token-unread",
    "naflex-bicubic-antialias",
    "naflex-bilinear-square-corners",
}
# ... float64 logits of all but these: each model's float64 agreement with the NumPy
# reference (test_family_numpy_reference_agrees_with_both_in_float64) and the bit-exact round
# trips, both quick, already imply float64 parity both ways
FLOAT64_QUICK = {"map", "registers", "rope-half-periods-registers", "eva02-blocks", "relpos-mlp"}
# ... and the float32 and bfloat16 round trips of all but these (the same copy as float64's)
BFLOAT16_QUICK = {"swiglu-packed", "eva02-blocks", "beit-relative-bias", "rope-mixed-learned"}


def slow_if(condition: bool) -> list:
    return [pytest.mark.slow] * condition


@pytest.mark.parametrize(
    "name, dtype",
    [
        pytest.param(
            n, d, marks=slow_if(n in FLOAT32_SLOW if d == "float32" else n not in FLOAT64_QUICK)
        )
        for n in sorted(FAMILY)
        for d in ("float32", "float64")
    ],
)
def test_family_logit_parity(name, dtype):
    config = family(name)
    with x64_for(dtype), jax.default_matmul_precision("highest"):
        for direction, ref, out in both_ways(config, dtype):
            width = config.num_classes or config.pooled_dim
            assert tuple(out.shape) == (3, width), direction
            assert_close(ref, out, dtype, f"{name} {direction} {dtype}")


# the NumPy reference's quick cases (0.8 s each): one of each kind of feature; all run with
# the whole suite
REFERENCE_QUICK = FLOAT64_QUICK | {
    "rope-periods-min-max",
    "naflex-bicubic-antialias",
    "beit-relative-bias",
    "post-norm",
    "parallel-22b",
    "cls-with-mean-pool",
}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=slow_if(n not in REFERENCE_QUICK)) for n in sorted(FAMILY)]
)
def test_family_numpy_reference_agrees_with_both_in_float64(name):
    """The NumPy forward, written from the maths, against every intermediate of both models."""
    config = family(name)
    with jax.enable_x64(True), jax.default_matmul_precision("highest"):
        model = random_nnx(config, seed=4, dtype="float64")
        images = random_images(config, 2, seed=5, dtype="float64")
        _, ours = run_nnx(model, images, return_intermediates=True)
        _, theirs = run_torch(wt.to_torch(model), images, return_intermediates=True)
    replay = numpy_ref.forward(wt.nnx_flat(model), images, config)
    assert list(replay) == arch.intermediates(config)
    for key in replay:
        scale = max(1.0, float(np.abs(replay[key]).max()))
        for side, got in (("jax", ours[key]), ("torch", theirs[key])):
            err = float(np.abs(np.asarray(got, np.float64) - replay[key]).max())
            assert err <= 1e-12 * scale, f"{name} {side} {key}: {err:.3e}"


@pytest.mark.parametrize(
    "name, dtype",
    [
        pytest.param(n, d, marks=slow_if(d != "float64" and n not in BFLOAT16_QUICK))
        for n in sorted(FAMILY)
        for d in ("float32", "float64", "bfloat16")
    ],
)
def test_family_round_trip_is_bit_exact(name, dtype):
    config = family(name)
    with x64_for(dtype):
        source = random_torch(config, seed=7, dtype=dtype)
        assert_bit_exact(wt.torch_flat(source), wt.torch_flat(wt.to_torch(wt.to_nnx(source))))
        scanned = wt.to_nnx(source, scan_layers=True)
        assert_bit_exact(wt.torch_flat(source), wt.torch_flat(wt.to_torch(scanned)))


GRAD_TOL = {"float32": 1e-4, "float64": 1e-10}


# float32 in the whole suite only (1.5-2.8 s each, --durations): float64 is the finer check
@pytest.mark.parametrize("dtype", [pytest.param("float32", marks=pytest.mark.slow), "float64"])
@pytest.mark.parametrize(
    "name",
    [
        "map",
        "rope-half-periods-registers",
        # 1.5-2.2 s each (--durations): in the whole suite
        pytest.param("layer-scale", marks=pytest.mark.slow),
        *(
            pytest.param(n, marks=pytest.mark.slow)
            for n in (
                "distilled",
                "swiglu-rmsnorm-aimv2",
                "positions-cls-only",
                "fc-norm",
                "norm-pre-clip",
                "qk-norm",
            )
        ),
        # 2-3 s each (--durations): one RoPE case in the quick subset
        pytest.param("rope-interleaved-wh", marks=pytest.mark.slow),
        pytest.param("rope-with-table-offset-ref", marks=pytest.mark.slow),
        # the blocks, the relative biases, pooling with prefix tokens: in the whole suite
        *(
            pytest.param(n, marks=pytest.mark.slow)
            for n in (
                "eva02-blocks",
                "post-norm",
                "beit-relative-bias",
                "relative-bias-shared",
                "map-own-heads-with-prefix",
                "naflex-bicubic-antialias",
                "naflex-bilinear-square-corners",
            )
        ),
    ],
)
def test_family_gradient_parity(name, dtype):
    """d(cross-entropy) w.r.t. every parameter and the images, both frameworks."""
    config = family(name, num_classes=7) if FAMILY[name].get("num_classes") == 0 else family(name)
    with x64_for(dtype), jax.default_matmul_precision("highest"):
        images = random_images(config, 4, seed=2, dtype=dtype)
        labels = np.arange(4) % config.num_classes
        jm = random_nnx(config, seed=3, dtype=dtype)
        g_jax, gx_jax = nnx_grads(jm, images, labels)
        g_torch, gx_torch = torch_grads(wt.to_torch(jm), images, labels)
    g_torch = wt.torch_to_nnx_flat(g_torch, config)
    assert set(g_torch) == set(g_jax) == set(arch.parameters(config))
    scale = max(np.abs(g).max() for g in g_jax.values())
    for key in sorted(g_jax):
        if np.abs(g_jax[key]).max() <= GRAD_TOL[dtype] * scale:  # zero in exact arithmetic
            assert np.abs(g_torch[key]).max() <= GRAD_TOL[dtype] * scale, key  # (a key bias)
            continue
        err = relative_error(g_jax[key], g_torch[key])
        assert err <= GRAD_TOL[dtype], f"{name} d loss / d {key}: relative error {err:.3e}"
    assert relative_error(gx_jax, gx_torch) <= GRAD_TOL[dtype]


@st.composite
def family_configs(draw):
    heads = draw(st.integers(1, 3))
    patch = draw(st.integers(1, 3))
    class_token = draw(st.booleans())
    pools = ["mean", "map"] + (["cls", "cls_mean"] if class_token else [])
    pool = draw(st.sampled_from(pools))
    dist = class_token and pool == "cls" and draw(st.booleans())
    final = draw(st.sampled_from(["pre_pool", "none"] + ([] if pool == "map" else ["post_pool"])))
    rope = draw(st.sampled_from(["none", "interleaved", "half"]))
    reg_tokens = draw(st.integers(0, 2))
    # BEiT's tables: one class token and no other prefix token; relative biases: no RoPE
    beit = class_token and not dist and not reg_tokens and rope == "none"
    blocks = dict(
        k_bias=draw(st.booleans()),
        attn_norm=draw(st.booleans()),
        mlp_norm=draw(st.booleans()),
        block=draw(st.sampled_from(["pre_norm", "post_norm", "parallel"])),
        rel_pos_bias=draw(
            st.sampled_from(["none", "block", "shared"] if rope == "none" else ["none"])
        ),
        rel_pos_form=draw(st.sampled_from(["beit", "mlp"])) if beit else "mlp",
        rel_pos_dim=draw(st.integers(1, 4)),
        pool_prefix=draw(st.booleans()),
    )
    rope_fields = {}
    if rope != "none":
        rope_fields = dict(
            rope=rope,
            rope_axes=draw(st.sampled_from(["hw", "wh"])),
            rope_freqs=draw(st.sampled_from(["theta", "periods", "mixed"])),
            rope_theta=draw(st.sampled_from([100.0, 10000.0])),
            pos_embed=draw(st.booleans()),
        )
        if rope_fields["rope_freqs"] != "mixed":  # learned frequencies take none of these
            rope_fields.update(
                rope_offset=draw(st.sampled_from([0.0, 1.0])),
                rope_ref_grid=draw(st.sampled_from([None, (4, 4), (2, 5)])),
                rope_coords=draw(st.sampled_from(["separate", "min", "max"])),
            )
    positions = draw(st.sampled_from(["all", "none"] + (["cls"] if class_token else [])))
    naflex = {}
    if positions == "none" and rope_fields.get("pos_embed", True) and draw(st.booleans()):
        naflex = dict(
            pos_grid=(draw(st.integers(1, 4)), draw(st.integers(1, 4))),
            pos_interpolation=draw(st.sampled_from(["bilinear", "bicubic"])),
            pos_square=draw(st.booleans()),
        )
        corners = draw(st.booleans())  # antialiased with aligned corners: not implemented
        naflex.update(pos_align_corners=corners, pos_antialias=not corners and draw(st.booleans()))
    return ViTConfig(
        image_size=(patch * draw(st.integers(1, 3)), patch * draw(st.integers(1, 3))),
        patch_size=patch,
        in_channels=draw(st.integers(1, 3)),
        d_model=heads
        * (4 * draw(st.integers(1, 2)) if rope != "none" else draw(st.integers(2, 5))),
        **rope_fields,
        num_heads=heads,
        d_ff=draw(st.integers(1, 16)),
        map_heads=draw(st.sampled_from([0, 1])),
        map_d_ff=draw(st.sampled_from([0, 3])),
        num_layers=draw(st.integers(0, 2)),
        num_classes=draw(st.integers(0, 5)),
        pool=pool,
        class_token=class_token,
        dist_token=dist,
        dist_head=draw(st.booleans()),
        reg_tokens=reg_tokens,
        **blocks,
        num_parallel=draw(st.integers(1, 3))
        if blocks["block"] == "pre_norm" and rope_fields.get("rope_freqs") != "mixed"
        else 1,
        pos_embed_tokens=positions,
        **naflex,
        final_norm=final,
        norm_pre=draw(st.booleans()),
        patch_norm=draw(st.booleans()),
        norm=draw(st.sampled_from(["layernorm", "rmsnorm"])),
        layer_scale=draw(st.booleans()),
        mlp=draw(st.sampled_from(["mlp", "swiglu", "swiglu_packed"])),
        activation=draw(st.sampled_from(["relu", "gelu", "gelu_tanh", "quick_gelu", "silu"])),
        ln_eps=draw(st.sampled_from([1e-6, 1e-5])),
        block_ln_eps=draw(st.sampled_from([None, 1e-2])),
        qk_norm=draw(st.booleans()),
        **{
            b: draw(st.booleans())
            for b in ("qkv_bias", "proj_bias", "mlp_bias", "patch_bias", "head_bias")
        },
    )


@pytest.mark.slow
@settings(
    max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(config=family_configs())
def test_family_hypothesis_configs(config):
    """float64 parity at 1e-12 both ways and against the NumPy reference; float32 at 1e-5, or
    (ill-conditioned tiny widths) within each side's own float32-vs-float64 error."""
    with jax.default_matmul_precision("highest"):
        with jax.enable_x64(True):
            torch64 = random_torch(config, 0, "float64")
            images = random_images(config, 2, dtype="float64")
            ref64, nnx64 = run_torch(torch64, images), wt.to_nnx(torch64)
            out64 = run_nnx(nnx64, images)
            replay = numpy_ref.forward(wt.nnx_flat(nnx64), images, config)["logits"]
        ref64, out64 = (np.asarray(a, np.float64) for a in (ref64, out64))
        scale = max(1.0, float(np.abs(ref64).max()))
        assert np.abs(ref64 - out64).max() <= TOL["float64"] * scale
        assert np.abs(ref64 - replay).max() <= TOL["float64"] * scale
        torch32 = torch64.float()
        ref32 = np.asarray(run_torch(torch32, images.astype(np.float32)), np.float64)
        out32 = np.asarray(run_nnx(wt.to_nnx(torch32), images.astype(np.float32)), np.float64)
    floor = max(np.abs(ref32 - ref64).max(), np.abs(out32 - out64).max())
    assert np.abs(ref32 - out32).max() <= max(TOL["float32"] * scale, 4 * floor)


# ---- each family preset against timm's own architecture ------------------------------------

timm = pytest.importorskip("timm")
FAMILY_PRESETS = sorted(
    p for p in TIMM_ARCHS if p not in ("vit_ti16", "vit_s16", "vit_b16", "vit_l16", "vit_h14")
)


@pytest.mark.parametrize("preset", FAMILY_PRESETS)
def test_preset_has_timms_parameter_count(preset):
    with torch.device("meta"):
        model = timm.create_model(TIMM_ARCHS[preset], pretrained=False)
    assert ViTConfig.preset(preset).num_params() == sum(p.numel() for p in model.parameters())


def small(preset: str) -> ViTConfig:
    """The preset with 2 blocks and a 4 x 4 patch grid, for speed; everything else as is."""
    c = ViTConfig.preset(preset)
    return dataclasses.replace(c, num_layers=2, image_size=4 * c.patch_size)


HEAVY = (  # 1.4-4 s each (--durations); quick: one preset per pair layout, EVA-02's CLIP
    # blocks
    "dinov2_g14",
    "siglip_so400m14",
    "aimv2_l14",
    "dinov2_l14",
    "clip_b16_quickgelu",
    "deit3_b16",
    "dinov2_b14",
    "dinov3_b16",
    "dinov3_l16",
    "dinov3_hplus16",
    "pe_spatial_b16",
    "pe_core_b16",
    "eva02_b14",
    "beitv2_b16",
    "rope_reg1_gap_b16",
    "relpos_b16",
    "beit_b16",  # its relative biases: the family's beit-relative-bias cases stay quick
    "vit_medium_reg4_gap",
    "siglip_b16_gap",
    "dinov2_b14_reg4",
    "deit_b16_distilled",
    "vit_b16_xp",  # parallel blocks: the family's parallel cases stay quick
    "vit_s16_18x2",
    # 1-1.5 s each: the quick subset keeps siglip_b16 (MAP), dinov3_s16 (half-split RoPE),
    # rope_mixed_b16 (interleaved, learned frequencies), eva02_b16_clip (EVA-02's blocks);
    # NaFlex's timm oracle stays quick in test_naflex's padded batch
    "clip_b16",
    "dinov2_s14",
    "naflex_b16",
    "rope_b16",
)


@pytest.mark.parametrize(
    "preset", [pytest.param(p, marks=pytest.mark.slow) if p in HEAVY else p for p in FAMILY_PRESETS]
)
def test_preset_exports_to_timm_strict_and_matches(tmp_path, preset):
    config = small(preset)
    ours = random_nnx(config, seed=11)
    path = wt.save_checkpoint(ours, tmp_path / "timm.safetensors", layout="timm")
    model = timm.create_model(
        TIMM_ARCHS[preset],
        pretrained=False,
        depth=2,
        img_size=config.image_size,
        num_classes=config.num_classes,
    ).eval()
    from safetensors.torch import load_file

    model.load_state_dict(load_file(path), strict=True)
    images = random_images(config, 2, seed=12)
    with torch.no_grad():
        expected = model(nchw(images))
    assert_close(expected, run_nnx(ours, images), "float32", f"{preset} in timm vs nnx")
    back = wt.load_checkpoint(path, "torch")  # the manifest says the config
    assert_close(expected, run_torch(back, images), "float32", f"{preset} in timm vs torch")


def test_every_family_preset_is_covered():
    assert set(FAMILY_PRESETS) == set(PRESETS) - {
        "seed",
        "vit_ti16",
        "vit_s16",
        "vit_b16",
        "vit_l16",
        "vit_h14",
    }


QUICK_HUB = ("vit_b16", "siglip_b16")  # 1-4 s each (--durations): the rest in the whole suite


@pytest.mark.parametrize(
    "preset",
    [
        p if p in QUICK_HUB else pytest.param(p, marks=pytest.mark.slow)
        for p in ["vit_b16", *FAMILY_PRESETS]
    ],
)
def test_preset_exports_as_a_timm_hub_folder_timm_loads(tmp_path, preset):
    """`--to timm` into a folder: config.json (architecture, model_args) + model.safetensors,
    which timm's own `create_model("local-dir:...", pretrained=True)` builds and loads; it
    computes our model's function, and reads back into ours with no hints, bit-exact."""
    config = small(preset)
    ours = random_nnx(config, seed=13)
    folder = wt.save_checkpoint(ours, tmp_path / "hub", layout="timm")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    images = random_images(config, 2, seed=14)
    with torch.no_grad():
        expected = model(nchw(images))
    assert_close(expected, run_nnx(ours, images), "float32", f"{preset}: timm's load vs ours")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the folder says everything: nothing assumed
        back = wt.load_checkpoint(folder, "jax")
    assert back.config.same_model(config)
    assert_bit_exact(nnx_params(ours), nnx_params(back))


@pytest.mark.slow  # builds every preset's timm architecture twice: 2 s
def test_a_config_no_timm_architecture_builds_is_refused_as_a_folder(tmp_path):
    config = dataclasses.replace(small("vit_b16"), activation="relu")  # no timm ViT uses ReLU
    with pytest.raises(
        LayoutError,
        match=r"no timm architecture .*a destination ending in "
        r"\.safetensors",
    ):
        wt.save_checkpoint(random_nnx(config, seed=1), tmp_path / "hub", layout="timm")
    assert not (tmp_path / "hub").exists()
    assert wt.save_checkpoint(
        random_nnx(config, seed=1), tmp_path / "m.safetensors", layout="timm"
    ).is_file()
