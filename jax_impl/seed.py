"""The seed problem's entry points ("NNX Vision Transformer", mean-pool; and its CLS sibling)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jax_impl.model import ViT
from vit_config import ArgumentError, ViTConfig


def vit_forward(seed, image, patch_size, d_model, num_heads, d_ff, num_layers, num_classes):
    """Mean-pool ViT logits `(num_classes,)` for one `(H, W, C)` image; every size arrives as a
    float."""
    return _forward(
        "mean", seed, image, patch_size, d_model, num_heads, d_ff, num_layers, num_classes
    )


def vit_cls_forward(seed, image, patch_size, d_model, num_heads, d_ff, num_layers, num_classes):
    """The [CLS]-token variant: same signature, the head reads row 0 after the final LayerNorm."""
    return _forward(
        "cls", seed, image, patch_size, d_model, num_heads, d_ff, num_layers, num_classes
    )


def _forward(pool, seed, image, patch_size, d_model, num_heads, d_ff, num_layers, num_classes):
    image = jnp.asarray(image)
    if image.ndim != 3:
        raise ArgumentError(f"expected one unbatched (H, W, C) image, got shape {image.shape}")
    p = int(patch_size)
    h, w, c = image.shape
    # A VALID conv with stride P ignores the last H % P rows and W % P columns.
    image = image[: h // p * p, : w // p * p]
    config = ViTConfig(
        image_size=(h // p * p, w // p * p),
        patch_size=p,
        in_channels=c,
        d_model=int(d_model),
        num_heads=int(num_heads),
        d_ff=int(d_ff),
        num_layers=int(num_layers),
        num_classes=int(num_classes),
        pool=pool,
        activation="relu",
        ln_eps=1e-6,
        qkv_bias=True,
    )
    model = ViT(config, rngs=nnx.Rngs(int(seed)))
    out = model(image)
    return jax.numpy.reshape(out, -1)
