"""Logit parity in both directions, every parameter random first."""

import jax
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import assert_close, tiny
from vit_config import ViTConfig
from weight_transfer import to_nnx, to_torch
from weight_transfer.frameworks.runners import random_images, run_nnx, run_torch, x64_for
from weight_transfer.frameworks.weights import random_nnx, random_torch

GRID = [
    dict(pool=p, activation=a, qkv_bias=b)
    for p in ("mean", "cls")
    for a in ("relu", "gelu", "gelu_tanh")
    for b in (True, False)
]


def both_ways(config: ViTConfig, dtype: str, batched: bool, seed: int = 0):
    """(reference, ported) logits for nnx->torch, then for torch->nnx."""
    images = random_images(config, 3, seed, dtype)
    images = images if batched else images[0]
    source = random_nnx(config, seed, dtype)
    yield "nnx->torch", run_nnx(source, images), run_torch(to_torch(source), images)
    source = random_torch(config, seed + 1, dtype)
    yield "torch->nnx", run_torch(source, images), run_nnx(to_nnx(source), images)


def check(config, dtype, batched=True):
    ctx = x64_for(dtype)
    with ctx, jax.default_matmul_precision("highest"):
        for direction, ref, out in both_ways(config, dtype, batched):
            expected_shape = (3, config.num_classes) if batched else (config.num_classes,)
            assert tuple(out.shape) == expected_shape, direction
            assert_close(ref, out, dtype, f"{direction} {dtype} {config}")


def grid_id(g: dict) -> str:
    return "-".join(map(str, g.values()))


@pytest.mark.parametrize(
    "grid, batched, dtype",
    [  # one image takes the batch's path but for one axis, and float64's 1e-12 is the finer
        # check of the same copy: every grid point batched in float64 in the quick subset, the
        # rest at one grid point (float32 of every model stays quick in tests/test_family.py)
        pytest.param(
            g,
            batched,
            dtype,
            marks=[pytest.mark.slow] * ((not batched or dtype == "float32") and i > 0),
            id=f"{grid_id(g)}-{'batched' if batched else 'unbatched'}-{dtype}",
        )
        for i, g in enumerate(GRID)
        for batched in (True, False)
        for dtype in ("float32", "float64")
    ],
)
def test_parity_grid(grid, batched, dtype):
    check(tiny(**grid), dtype, batched)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_parity_seed_preset(dtype):
    check(ViTConfig.preset("seed"), dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_parity_vit_s16_width(dtype):
    """ViT-S/16 width (384, 6 heads, 1536) at 224 px with 2 blocks instead of 12, for speed."""
    check(ViTConfig.preset("vit_s16").replace(num_layers=2), dtype)


@st.composite
def configs(draw):
    heads = draw(st.integers(1, 4))
    patch = draw(st.integers(1, 4))
    return ViTConfig(
        image_size=(patch * draw(st.integers(1, 4)), patch * draw(st.integers(1, 4))),
        patch_size=patch,
        in_channels=draw(st.integers(1, 4)),
        d_model=heads * draw(st.integers(1, 6)),
        num_heads=heads,
        d_ff=draw(st.integers(1, 32)),
        num_layers=draw(st.integers(0, 3)),
        num_classes=draw(st.integers(1, 10)),
        pool=draw(st.sampled_from(["mean", "cls"])),
        activation=draw(st.sampled_from(["relu", "gelu", "gelu_tanh"])),
        ln_eps=draw(st.sampled_from([1e-12, 1e-6, 1e-5])),
        qkv_bias=draw(st.booleans()),
    )


def ported_pair(config, dtype, seed):
    """(torch model, its NNX port), weights random on the torch side."""
    source = random_torch(config, seed, dtype)
    return source, to_nnx(source)


@pytest.mark.slow
@settings(
    max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(config=configs(), batched=st.booleans())
def test_parity_hypothesis_configs(config, batched):
    """float32 parity at 1e-5; where a config is ill-conditioned in float32 (d_model=2 with eps
    1e-12 makes LayerNorm a sign function), the bound is each side's own float32-vs-float64
    error on the same weights, so a real port bug still fails: it moves both precisions alike."""
    images = random_images(config, 2)[slice(None) if batched else 0]
    with jax.default_matmul_precision("highest"):
        torch32, nnx32 = ported_pair(config, "float32", 0)
        ref, out = run_torch(torch32, images), run_nnx(nnx32, images)
        with jax.enable_x64(True):
            torch64 = torch32.double()
            ref64 = run_torch(torch64, images.astype(np.float64))
            out64 = run_nnx(to_nnx(torch64), images.astype(np.float64))
    ref, out, ref64, out64 = (np.asarray(a, np.float64) for a in (ref, out, ref64, out64))
    floor = max(np.abs(ref - ref64).max(), np.abs(out - out64).max())
    scale = max(1.0, np.abs(ref).max())
    gap = np.abs(ref - out).max()
    assert gap <= max(1e-5 * scale, 4 * floor), f"gap {gap:.3e}, own float32 error {floor:.3e}"
    np.testing.assert_allclose(ref64, out64, rtol=0, atol=1e-12 * scale)


def test_bfloat16_runs_in_both_and_stays_close():
    """bfloat16 has 8 bits of mantissa: the two frameworks round differently, so only closeness."""
    config = tiny()
    images = random_images(config, 2)
    source = random_torch(config, dtype="bfloat16")
    port = to_nnx(source)
    assert port.dtype == jax.numpy.bfloat16 and source.dtype == torch.bfloat16
    ref = run_torch(source, images).float().numpy()
    out = np.asarray(run_nnx(port, images), np.float32)
    assert np.abs(ref - out).max() <= 5e-2 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize(
    "bias",
    [
        pytest.param("none", marks=pytest.mark.slow),
        "per-query",
        pytest.param("broadcast", marks=pytest.mark.slow),
    ],
)
def test_attention_past_a_query_block_is_the_same_maths(x64, bias):
    """More query rows than `QUERY_BLOCK` (attended a block at a time, for XLA:CPU's speed)
    give softmax(q k^T / sqrt(hd) + bias) v in float64 to 1e-13, with a bias per query row or
    one broadcast over them, against NumPy."""
    import jax.numpy as jnp

    from jax_impl.model import QUERY_BLOCK, attend

    t = QUERY_BLOCK + 45
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, t, 8)) for _ in range(3))
    b = {
        "none": None,
        "per-query": rng.standard_normal((2, t, t)),
        "broadcast": rng.standard_normal((1, 2, 1, t)),
    }[bias]
    scores = q @ k.swapaxes(-1, -2) / np.sqrt(8) + (0 if b is None else b)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    expected = weights / weights.sum(-1, keepdims=True) @ v
    got = attend(*(jnp.asarray(a) for a in (q, k, v)), None if b is None else jnp.asarray(b))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-13)
