"""Vision Transformer in Flax NNX, with the seed's module tree.

Order: PatchEmbed (an nnx.Conv), Attention, Block (pre-LN, MLP as ff1/ff2), ViT.
Images are NHWC: unbatched (H, W, C) -> (K,) or batched (B, H, W, C) -> (B, K).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from vit_config import ArgumentError, ViTConfig, check_image_shape

Tap = Callable[[str, jax.Array], jax.Array]


def _no_tap(name: str, value: jax.Array) -> jax.Array:
    return value


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # jax's default is the tanh form
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def resolve_dtype(dtype) -> jnp.dtype:
    """float32 by default; float64 only when JAX x64 is on (otherwise JAX silently demotes)."""
    dtype = jnp.dtype(dtype if dtype is not None else jnp.float32)
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ArgumentError("dtype float64 needs JAX x64: jax.config.update('jax_enable_x64', True)")
    if dtype not in (jnp.float32, jnp.float64, jnp.bfloat16):
        raise ArgumentError(f"dtype {dtype} is not supported: expected float32, float64 or bfloat16")
    return dtype


class Attention(nnx.Module):
    """Unmasked multi-head self-attention from four Linear projections (the seed's MHA).

    The core is written by hand as the seed specifies; `fused=True` hands it to
    `jax.nn.dot_product_attention` instead (same maths, XLA's fused kernel, faster on CPU).
    """

    def __init__(self, d_model: int, num_heads: int, *, qkv_bias: bool = True,
                 dtype=jnp.float32, fused: bool = False, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.fused = fused
        dense = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.q = nnx.Linear(d_model, d_model, use_bias=qkv_bias, **dense)
        self.k = nnx.Linear(d_model, d_model, use_bias=qkv_bias, **dense)
        self.v = nnx.Linear(d_model, d_model, use_bias=qkv_bias, **dense)
        self.o = nnx.Linear(d_model, d_model, **dense)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        split = (b, t, self.num_heads, d // self.num_heads)
        q, k, v = (proj(x).reshape(split) for proj in (self.q, self.k, self.v))  # (B, T, H, hd)
        if self.fused:
            return self.o(jax.nn.dot_product_attention(q, k, v).reshape(b, t, d))
        # Heads first, so both products are plain batched matmuls (XLA:CPU runs them ~20% faster
        # than the equivalent einsums on ViT-B/16, benchmarks/forward.py).
        q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # (B, H, T, hd)
        scores = (q @ k.swapaxes(-1, -2)) / jnp.sqrt(split[-1]).astype(x.dtype)  # (B, H, T, T)
        weights = jax.nn.softmax(scores, axis=-1)  # over keys
        out = (weights @ v).transpose(0, 2, 1, 3)  # (B, T, H, hd)
        return self.o(out.reshape(b, t, d))


class Block(nnx.Module):
    """Pre-LN encoder block: x + attn(ln1(x)), then x + ff2(act(ff1(ln2(x))))."""

    def __init__(self, config: ViTConfig, *, dtype=jnp.float32, fused_attention: bool = False,
                 rngs: nnx.Rngs):
        c = config
        dense = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.ln1 = nnx.LayerNorm(c.d_model, epsilon=c.ln_eps, **dense)
        self.attn = Attention(c.d_model, c.num_heads, qkv_bias=c.qkv_bias, dtype=dtype,
                              fused=fused_attention, rngs=rngs)
        self.ln2 = nnx.LayerNorm(c.d_model, epsilon=c.ln_eps, **dense)
        self.ff1 = nnx.Linear(c.d_model, c.d_ff, **dense)
        self.ff2 = nnx.Linear(c.d_ff, c.d_model, **dense)
        self.activation = c.activation

    def mlp(self, x: jax.Array) -> jax.Array:
        return self.ff2(ACTIVATIONS[self.activation](self.ff1(x)))

    def __call__(self, x: jax.Array, tap: Tap = _no_tap) -> jax.Array:
        x = x + tap("attn", self.attn(self.ln1(x)))
        return x + tap("mlp", self.mlp(self.ln2(x)))


class ViT(nnx.Module):
    """patch_embed -> flatten -> [CLS] -> + pos_embed -> blocks -> ln_f -> pool -> head."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs, dtype=None,
                 scan_layers: bool = False, fused_attention: bool = False):
        """`scan_layers=True` stacks the blocks' parameters on a leading (num_layers,) axis and
        runs them with `nnx.scan` (as big_vision does): one block to compile instead of L.
        `fused_attention=True` uses `jax.nn.dot_product_attention` for the attention core."""
        c = self.config = config
        self.scan_layers = scan_layers and c.num_layers > 0
        dtype = resolve_dtype(dtype)
        dense = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
        p = c.patch_size
        self.patch_embed = nnx.Conv(c.in_channels, c.d_model, kernel_size=(p, p), strides=p,
                                    padding="VALID", **dense)
        if c.class_token:
            self.cls_token = nnx.Param(jnp.zeros((1, c.d_model), dtype))
        self.pos_embed = nnx.Param(jnp.zeros((c.num_positions, c.d_model), dtype))
        block = dict(dtype=dtype, fused_attention=fused_attention)
        if self.scan_layers:
            self.blocks = _stacked_blocks(c, block, rngs)  # every parameter (L, ...)
        else:
            self.blocks = nnx.List([Block(c, **block, rngs=rngs) for _ in range(c.num_layers)])
        self.ln_f = nnx.LayerNorm(c.d_model, epsilon=c.ln_eps, **dense)
        self.head = nnx.Linear(c.d_model, c.num_classes, **dense)

    @property
    def dtype(self) -> jnp.dtype:
        return self.pos_embed[...].dtype

    def pool(self, x: jax.Array) -> jax.Array:
        """(B, T, D) -> (B, D): the class token's row, or the mean of the patch tokens."""
        if self.config.pool == "cls":
            return x[:, 0]
        return x[:, self.config.num_prefix_tokens:].mean(axis=1)

    def __call__(self, images: jax.Array, *, return_intermediates: bool = False):
        """Logits for NHWC images; with `return_intermediates`, also a dict of named activations."""
        batched = check_image_shape(images.shape, self.config, "NHWC")
        x = jnp.asarray(images, self.dtype)
        x = x if batched else x[None]
        seen: dict[str, jax.Array] = {}

        def tap(name: str, value: jax.Array) -> jax.Array:
            if return_intermediates:
                seen[name] = value if batched else value[0]
            return value

        x = self.patch_embed(x)  # (B, Hp, Wp, D)
        b, hp, wp, d = x.shape
        x = tap("patch_embed", x.reshape(b, hp * wp, d))  # (B, N, D), row-major over the grid
        if self.config.class_token:
            cls = jnp.broadcast_to(self.cls_token[...], (b, 1, d))
            x = jnp.concatenate([cls, x], axis=1)  # (B, 1 + N, D)
        x = tap("tokens", x + self.pos_embed[...])
        if self.scan_layers:
            x, per_layer = _scan_blocks(self.blocks, x, return_intermediates)
            for name, stacked in per_layer.items():  # (L, B, T, D) each
                for i in range(self.config.num_layers):
                    tap(f"blocks.{i}{name}", stacked[i])
        for i, block in enumerate(() if self.scan_layers else self.blocks):
            x = tap(f"blocks.{i}", block(x, lambda n, v, i=i: tap(f"blocks.{i}.{n}", v)))
        x = tap("ln_f", self.ln_f(x))
        pooled = tap("pooled", self.pool(x))  # (B, D)
        logits = tap("logits", self.head(pooled))  # (B, K)
        logits = logits if batched else logits[0]
        return (logits, seen) if return_intermediates else logits


def _stacked_blocks(config: ViTConfig, options: dict, rngs: nnx.Rngs) -> Block:
    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs: nnx.Rngs) -> Block:
        return Block(config, **options, rngs=rngs)

    return create(rngs)


def _scan_blocks(blocks: Block, x: jax.Array, keep: bool) -> tuple[jax.Array, dict]:
    """Run stacked blocks with nnx.scan; with `keep`, also each layer's branch outputs."""

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
    def body(x, block):
        seen = {}

        def tap(name, value):
            seen[f".{name}"] = value
            return value

        x = block(x, tap)
        return x, ({**seen, "": x} if keep else {})

    return body(x, blocks)
