"""The seed's entry points, and the NumPy reference forward
(`weight_transfer.diagnostics.numpy_ref`)."""

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import jax_impl
from tests.conftest import assert_close, tiny
from vit_config import ViTConfig
from weight_transfer import nhwc_to_nchw, nnx_flat, to_torch
from weight_transfer.diagnostics import numpy_ref
from weight_transfer.frameworks.weights import random_nnx

ARGS = (2.0, 8.0, 2.0, 16.0, 2.0, 5.0)  # patch, d_model, heads, d_ff, layers, classes as floats


@pytest.fixture
def image():
    return np.random.default_rng(0).standard_normal((4, 4, 3)).astype(np.float32)


@pytest.mark.parametrize("fn", [jax_impl.vit_forward, jax_impl.vit_cls_forward])
def test_seed_entry_points(fn, image):
    out = fn(0.0, image, *ARGS)
    assert out.shape == (5,) and out.ndim == 1
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out, fn(0.0, image, *ARGS))
    assert not np.allclose(out, fn(1.0, image, *ARGS))


def test_seed_mean_pool_matches_spec_tree(image):
    """vit_forward is the seed's model: zeros pos_embed of (num_patches, d_model), no cls_token."""
    model = jax_impl.ViT(ViTConfig.preset("seed"), rngs=nnx.Rngs(3))
    assert model.pos_embed[...].shape == (4, 8) and not np.any(model.pos_embed[...])
    assert not hasattr(model, "cls_token")
    assert isinstance(model.blocks, nnx.List) and len(model.blocks) == 2
    np.testing.assert_array_equal(jax_impl.vit_forward(3.0, image, *ARGS), model(image))


def test_seed_cls_variant_tree(image):
    model = jax_impl.ViT(ViTConfig.preset("seed").replace(pool="cls"), rngs=nnx.Rngs(3))
    assert model.cls_token[...].shape == (1, 8) and model.pos_embed[...].shape == (5, 8)
    np.testing.assert_array_equal(jax_impl.vit_cls_forward(3.0, image, *ARGS), model(image))


def test_seed_valid_padding_drops_the_remainder():
    """A (5, 5, 3) image with P=2 has (5 // 2) ** 2 = 4 patches, like its (4, 4) crop."""
    big = np.random.default_rng(1).standard_normal((5, 5, 3)).astype(np.float32)
    np.testing.assert_array_equal(
        jax_impl.vit_forward(0.0, big, *ARGS), jax_impl.vit_forward(0.0, big[:4, :4], *ARGS)
    )


CASES = [ViTConfig.preset("seed"), ViTConfig.preset("seed").replace(pool="cls")] + [
    tiny(pool=pool, activation=act, qkv_bias=bias)
    for pool in ("mean", "cls")
    for act in ("relu", "gelu", "gelu_tanh")
    for bias in (True, False)
]


@pytest.mark.parametrize(
    "config", CASES, ids=lambda c: f"{c.pool}-{c.activation}-{c.qkv_bias}-{c.image_hw}"
)
def test_numpy_reference_agrees_with_both(config):
    model = random_nnx(config, seed=5)
    params = nnx_flat(model)
    torch_model = to_torch(model)
    h, w = config.image_hw
    images = np.random.default_rng(6).standard_normal((2, h, w, 3)).astype(np.float32)
    expected = numpy_ref.forward(params, images, config)["logits"]
    with jax.default_matmul_precision("highest"):
        assert_close(expected, model(images), "float32", "jax_impl vs NumPy reference")
    with torch.no_grad():
        got = torch_model(torch.from_numpy(nhwc_to_nchw(images).copy()))
    assert_close(expected, got, "float32", "torch_impl vs NumPy reference")


def test_numpy_reference_agrees_in_float64(x64):
    config = tiny(pool="mean", activation="gelu")
    model = random_nnx(config, seed=5, dtype="float64")
    image = np.random.default_rng(6).standard_normal((8, 12, 3))
    assert_close(
        numpy_ref.forward(nnx_flat(model), image[None], config)["logits"][0],
        model(image),
        "float64",
        "jax_impl float64 vs NumPy reference",
    )
