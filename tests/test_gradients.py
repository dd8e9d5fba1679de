"""Gradients of a cross-entropy loss: every parameter (mapped through the table) and the input."""

import jax
import numpy as np
import pytest

from tests.conftest import tiny
from vit_config import ViTConfig
from weight_transfer import to_nnx, to_torch, torch_to_nnx_flat
from weight_transfer.diagnostics.metrics import relative_error
from weight_transfer.diagnostics.parity import nnx_grads, torch_grads
from weight_transfer.frameworks.runners import random_images, x64_for
from weight_transfer.frameworks.weights import random_nnx, random_torch

# Relative to each gradient tensor's max |value|: float64 leaves ~1e-14 of rounding after a
# handful of layers; float32's 2**-23 grows to ~1e-6..1e-5 through softmax and LayerNorm.
GRAD_TOL = {"float32": 1e-4, "float64": 1e-10}


# float32 in the whole suite only (1.6-2.1 s each, --durations): float64 is the finer check
@pytest.mark.parametrize("dtype", [pytest.param("float32", marks=pytest.mark.slow), "float64"])
@pytest.mark.parametrize(
    "config, direction",
    [  # the seed both ways; the others' second direction (the same copy read back, whose
        # bit-exactness test_roundtrip proves) in the whole suite (1.6-1.7 s each, --durations)
        pytest.param(config, direction, id=f"{name}-{direction}", marks=[pytest.mark.slow] * slow)
        for name, config in (
            ("cls-gelu", tiny(pool="cls", activation="gelu")),
            ("mean-tanh-nobias", tiny(pool="mean", activation="gelu_tanh", qkv_bias=False)),
            ("seed", ViTConfig.preset("seed")),
        )
        for direction, slow in (("nnx->torch", False), ("torch->nnx", name != "seed"))
    ],
)
def test_gradient_parity(config, direction, dtype):
    ctx = x64_for(dtype)
    with ctx, jax.default_matmul_precision("highest"):
        images = random_images(config, 4, seed=2, dtype=dtype)
        labels = np.arange(4) % config.num_classes
        if direction == "nnx->torch":
            jm = random_nnx(config, seed=3, dtype=dtype)
            tm = to_torch(jm)
        else:
            tm = random_torch(config, seed=3, dtype=dtype)
            jm = to_nnx(tm)
        g_jax, gx_jax = nnx_grads(jm, images, labels)
        g_torch, gx_torch = torch_grads(tm, images, labels)
    g_torch_as_nnx = torch_to_nnx_flat(g_torch, config)
    assert set(g_torch_as_nnx) == set(g_jax)
    scale = max(np.abs(g).max() for g in g_jax.values())
    for key in sorted(g_jax):
        if key.endswith("attn.k.bias"):
            # Exactly zero in exact arithmetic: the key bias adds q . b_k to every score of a
            # query, and softmax is shift-invariant. Both sides must return rounding noise only.
            for side, g in (("jax", g_jax[key]), ("torch", g_torch_as_nnx[key])):
                assert np.abs(g).max() <= GRAD_TOL[dtype] * scale, f"{side} d loss / d {key}"
            continue
        assert np.abs(g_jax[key]).max() > 0, f"{key}: zero gradient, the test would be vacuous"
        err = relative_error(g_jax[key], g_torch_as_nnx[key])
        assert err <= GRAD_TOL[dtype], f"d loss / d {key}: relative error {err:.3e}"
    err = relative_error(gx_jax, gx_torch)
    assert err <= GRAD_TOL[dtype], f"d loss / d images: relative error {err:.3e}"


@pytest.mark.slow  # measured 4-9 s (pytest --durations)
def test_compare_grads_floor_rule_passes_a_port_and_catches_a_fault():
    from weight_transfer import nnx_flat, nnx_from_flat
    from weight_transfer.diagnostics.parity import compare_grads

    config = tiny()
    jm = random_nnx(config, seed=4)
    images, labels = random_images(config, 3, seed=5), np.arange(3)
    rows = compare_grads(jm, to_torch(jm), images, labels)
    assert len(rows) == len(nnx_flat(jm)) + 1 and not any(r.divergent for r in rows)
    flat = nnx_flat(jm)
    flat["blocks.1.ff2.bias"] = flat["blocks.1.ff2.bias"] + 1e-3
    rows = {
        r.name: r for r in compare_grads(nnx_from_flat(flat, config), to_torch(jm), images, labels)
    }
    assert rows["blocks.1.ff2.kernel"].divergent and rows["images"].divergent
