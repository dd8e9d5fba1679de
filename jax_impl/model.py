"""Vision Transformer in Flax NNX, with the seed's module tree, for the whole ViT family.

Order: Attention, Block (pre-norm, MLP as ff1/ff2 or gated ff1_g/ff1_x), MAPHead, ViT.
Images are NHWC: unbatched (H, W, C) -> (K,) or batched (B, H, W, C) -> (B, K).
The parameters each config builds are declared in `vit_config.arch` (tested to match).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import reduce
from operator import add
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from vit_config import ArgumentError, ViTConfig, arch, check_image_shape, first_image
from vit_config.patches import Grids, check_patch_batch, padded_tokens
from vit_config.relpos import RelativeGrid, relative_grid
from vit_config.resample import positions_for_grid
from vit_config.rope import learned_angles, rope_angles, rope_positions, rotate

Tap = Callable[[str, jax.Array], jax.Array]


def _no_tap(name: str, value: jax.Array) -> jax.Array:
    return value


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # jax's default is the tanh form
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
    "silu": jax.nn.silu,
}


def resolve_dtype(dtype) -> jnp.dtype:
    """float32 by default; float64 only when JAX x64 is on (otherwise JAX silently demotes)."""
    dtype = jnp.dtype(dtype if dtype is not None else jnp.float32)
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ArgumentError(
            "dtype float64 needs JAX x64: jax.config.update('jax_enable_x64', True)"
        )
    if dtype not in (jnp.float32, jnp.float64, jnp.bfloat16):
        raise ArgumentError(
            f"dtype {dtype} is not supported: expected float32, float64 or bfloat16"
        )
    return dtype


class AttentionPositions(NamedTuple):
    """What positions do inside attention, computed once per forward for the token grid: a
    rotation of q and k (`rotate(q, k)` on (B, T, H, hd)), a bias added to the attention
    logits (broadcast to (B, H, T, S): a shared relative table's), the token positions a
    block's learned RoPE frequencies multiply, and the grid an attention's own relative biases
    are read from (`vit_config.relpos.RelativeGrid`). A learned table is added to the tokens
    before the blocks instead (`ViT.embed`). The plain ViT has none of them."""

    rotate: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]] | None = None
    bias: jax.Array | None = None
    rope_positions: jax.Array | None = None  # (N, 2): what learned RoPE frequencies multiply
    relative: RelativeGrid | None = None  # (index, coords, pad) as arrays


class RelativeBias(nnx.Module):
    """Relative position biases (`vit_config.relpos`): BEiT's learned `table`, or timm
    relpos's MLP `fc1`, `fc2` computing one from each offset's log coordinates."""

    def __init__(self, c: ViTConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.form = c.rel_pos_form
        if self.form == "beit":
            self.table = nnx.Param(jnp.zeros((c.num_relative_positions, c.num_heads), dtype))
        else:
            dense = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
            self.fc1 = nnx.Linear(2, c.rel_pos_dim, **dense)
            self.fc2 = nnx.Linear(c.rel_pos_dim, c.num_heads, **dense)

    def __call__(self, grid: RelativeGrid) -> jax.Array:
        """(H, T, T) logit biases: the table read at each pair's row, prefix tokens padded."""
        if self.form == "beit":
            table = self.table[...]
        else:
            table = self.fc2(jax.nn.relu(self.fc1(grid.coords)))
        bias = table[grid.index].transpose(2, 0, 1)  # (H, T, T), or (H, N, N) before the pad
        return jnp.pad(bias, ((0, 0), (grid.pad, 0), (grid.pad, 0))) if grid.pad else bias


NO_POSITIONS = AttentionPositions()


# Query rows attended at a time: XLA:CPU's fused attention runs ~3x slower per row once the
# query rows pass 256 (measured on this machine, (8, 12, T, 64) float32: 15 ms at T=256,
# 49-54 ms at T=257-261, 18-22 ms attended in blocks of 256 rows; eva02_b14's 257 tokens).
QUERY_BLOCK = 256


def attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """The attention core, written by hand as the seed specifies: (B, H, T, hd) each ->
    (B, H, T, hd), softmax(q k^T / sqrt(hd) + bias) v. Heads first, so both products are plain
    batched matmuls (XLA:CPU runs them ~20% faster than the equivalent einsums on ViT-B/16,
    benchmarks/forward.py). More than QUERY_BLOCK query rows are attended a block of rows at a
    time: each row's arithmetic is the same, every key seen by every row."""
    t = q.shape[-2]
    if t > QUERY_BLOCK:

        def rows(a, start):  # a block of query rows (a bias broadcast over them stays whole)
            return a if a is None or a.shape[-2] == 1 else a[..., start : start + QUERY_BLOCK, :]

        blocks = range(0, t, QUERY_BLOCK)
        return jnp.concatenate([attend(rows(q, s), k, v, rows(bias, s)) for s in blocks], -2)
    scores = (q @ k.swapaxes(-1, -2)) / jnp.sqrt(q.shape[-1]).astype(q.dtype)  # (B, H, T, S)
    if bias is not None:
        scores = scores + bias
    return jax.nn.softmax(scores, axis=-1) @ v  # softmax over keys


def make_norm(c: ViTConfig, d: int, dense: dict, eps: float | None = None) -> nnx.Module:
    eps = c.ln_eps if eps is None else eps
    if c.norm == "rmsnorm":
        return nnx.RMSNorm(d, epsilon=eps, **dense)
    return nnx.LayerNorm(d, epsilon=eps, **dense)


class Attention(nnx.Module):
    """Multi-head attention from four Linear projections (the seed's MHA): self-attention, or
    cross-attention from `x` to `context` (the MAP head's probe). Optional q/k norms over
    head_dim. The core is written by hand as the seed specifies; `fused=True` hands it to
    `jax.nn.dot_product_attention` instead (same maths, XLA's fused kernel)."""

    def __init__(
        self,
        c: ViTConfig,
        *,
        bias: bool = True,
        proj_bias: bool = True,
        qk_norm: bool = False,
        k_bias: bool = True,
        o_norm: bool = False,
        rel_bias: bool = False,
        learned_rope: bool = False,
        heads: int = 0,
        dtype=jnp.float32,
        fused: bool = False,
        rngs: nnx.Rngs,
    ):
        self.num_heads = heads or c.num_heads
        self.fused = fused
        d = c.d_model
        dense = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.q = nnx.Linear(d, d, use_bias=bias, **dense)
        self.k = nnx.Linear(d, d, use_bias=bias and k_bias, **dense)
        self.v = nnx.Linear(d, d, use_bias=bias, **dense)
        if qk_norm:
            self.q_norm = make_norm(c, c.head_dim, dense)
            self.k_norm = make_norm(c, c.head_dim, dense)
        self.qk_norm = qk_norm
        if learned_rope:
            self.rope_freqs = nnx.Param(jnp.zeros((2, c.num_heads, c.head_dim // 2), dtype))
        self.learned_rope = learned_rope
        self.rope_layout, self.rope_prefix = c.rope, c.num_prefix_tokens
        if rel_bias:
            self.rel_bias = RelativeBias(c, dtype=dtype, rngs=rngs)
        self.has_rel_bias = rel_bias
        if o_norm:
            self.o_norm = make_norm(c, d, dense)
        self.has_o_norm = o_norm
        self.o = nnx.Linear(d, d, use_bias=proj_bias, **dense)

    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        positions: AttentionPositions = NO_POSITIONS,
    ) -> jax.Array:
        context = x if context is None else context
        b, t, d = x.shape
        hd = d // self.num_heads
        q = self.q(x).reshape(b, t, self.num_heads, hd)  # (B, T, H, hd)
        k, v = (proj(context).reshape(b, -1, self.num_heads, hd) for proj in (self.k, self.v))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if positions.rotate is not None:
            q, k = positions.rotate(q, k)
        elif self.learned_rope:  # this block's own frequencies, per head
            angles = learned_angles(positions.rope_positions, self.rope_freqs[...])  # (N, H, hd/2)
            cos, sin = jnp.cos(angles), jnp.sin(angles)
            q, k = (rotate(a, cos, sin, self.rope_layout, self.rope_prefix) for a in (q, k))
        bias = positions.bias
        if self.has_rel_bias:
            own = self.rel_bias(positions.relative)  # (H, T, T)
            bias = own if bias is None else bias + own
        if self.fused:  # XLA's fused kernel takes (B, T, H, hd) and the same bias
            out = jax.nn.dot_product_attention(q, k, v, bias=bias).reshape(b, t, d)
        else:
            q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # (B, H, T, hd)
            out = attend(q, k, v, bias).transpose(0, 2, 1, 3).reshape(b, t, d)  # heads joined
        return self.o(self.o_norm(out) if self.has_o_norm else out)


class FeedForward(nnx.Module):
    """The MLP parameters' owner's forward: ff2(act(ff1 x)), or ff2(act(ff1_g x) * ff1_x x)."""

    def _init_mlp(
        self,
        c: ViTConfig,
        bias: bool,
        gated: bool,
        dense: dict,
        hidden_norm: bool = False,
        width: int = 0,
    ) -> None:
        self.activation = c.activation
        self.gated = gated
        d, f = c.d_model, width or c.d_ff
        if self.gated:
            self.ff1_g = nnx.Linear(d, f, use_bias=bias, **dense)
            self.ff1_x = nnx.Linear(d, f, use_bias=bias, **dense)
        else:
            self.ff1 = nnx.Linear(d, f, use_bias=bias, **dense)
        if hidden_norm:
            self.ff_norm = make_norm(c, f, dense)
        self.hidden_norm = hidden_norm
        self.ff2 = nnx.Linear(f, d, use_bias=bias, **dense)

    def mlp(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        hidden = act(self.ff1_g(x)) * self.ff1_x(x) if self.gated else act(self.ff1(x))
        return self.ff2(self.ff_norm(hidden) if self.hidden_norm else hidden)


class Block(FeedForward):
    """Encoder block, pre-norm: x + ls1 * attn(ln1(x)), then x + ls2 * mlp(ln2(x)); post-norm:
    x + ls1 * ln1(attn(x)), then x + ls2 * ln2(mlp(x)); parallel: x + ls1 * (attn(ln1(x)) +
    mlp(ln1(x)))."""

    def __init__(
        self, config: ViTConfig, *, dtype=jnp.float32, fused_attention: bool = False, rngs: nnx.Rngs
    ):
        c = config
        dense = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.form = c.block
        self.ln1 = make_norm(c, c.d_model, dense, c.block_eps)
        self.attn = Attention(
            c,
            bias=c.qkv_bias,
            proj_bias=c.proj_bias,
            qk_norm=c.qk_norm,
            k_bias=c.k_bias,
            o_norm=c.attn_norm,
            rel_bias=c.rel_pos_bias == "block",
            learned_rope=c.rope != "none" and c.rope_freqs == "mixed",
            dtype=dtype,
            fused=fused_attention,
            rngs=rngs,
        )
        if self.form != "parallel":
            self.ln2 = make_norm(c, c.d_model, dense, c.block_eps)
        self._init_mlp(c, c.mlp_bias, c.mlp != "mlp", dense, c.mlp_norm)
        if c.layer_scale:
            self.ls1 = nnx.Param(jnp.ones((c.d_model,), dtype))
            if self.form != "parallel":
                self.ls2 = nnx.Param(jnp.ones((c.d_model,), dtype))
        self.layer_scale = c.layer_scale

    def scaled(self, name: str, x: jax.Array) -> jax.Array:
        return x * getattr(self, name)[...] if self.layer_scale else x

    def attn_branch(self, x: jax.Array, positions: AttentionPositions) -> jax.Array:
        """What the attention adds to the residual stream (pre- or post-norm)."""
        if self.form == "post_norm":
            return self.scaled("ls1", self.ln1(self.attn(x, positions=positions)))
        return self.scaled("ls1", self.attn(self.ln1(x), positions=positions))

    def mlp_branch(self, x: jax.Array) -> jax.Array:
        """What the MLP adds to the residual stream (pre- or post-norm)."""
        if self.form == "post_norm":
            return self.scaled("ls2", self.ln2(self.mlp(x)))
        return self.scaled("ls2", self.mlp(self.ln2(x)))

    def __call__(
        self, x: jax.Array, tap: Tap = _no_tap, positions: AttentionPositions = NO_POSITIONS
    ) -> jax.Array:
        if self.form == "parallel":  # both branches read one norm; one LayerScale for both
            h = self.ln1(x)
            a = tap("attn", self.attn(h, positions=positions))
            return x + self.scaled("ls1", a + tap("mlp", self.mlp(h)))
        x = x + tap("attn", self.attn_branch(x, positions))
        return x + tap("mlp", self.mlp_branch(x))


class ParallelBlocks(nnx.Module):
    """`num_parallel` pre-norm blocks side by side: x + sum_j attn_j, then x + sum_j mlp_j
    (timm ParallelThingsBlock), the branches added in order."""

    def __init__(self, config: ViTConfig, **options):
        branch = config.replace(num_parallel=1)
        self.parallel = nnx.List([Block(branch, **options) for _ in range(config.num_parallel)])

    def __call__(
        self, x: jax.Array, tap: Tap = _no_tap, positions: AttentionPositions = NO_POSITIONS
    ) -> jax.Array:
        x = x + tap("attn", reduce(add, (b.attn_branch(x, positions) for b in self.parallel)))
        return x + tap("mlp", reduce(add, (b.mlp_branch(x) for b in self.parallel)))


def make_block(config: ViTConfig, **options) -> Block | ParallelBlocks:
    kind = ParallelBlocks if config.num_parallel > 1 else Block
    return kind(config, **options)


class MAPHead(FeedForward):
    """Multihead attention pooling (SigLIP): a learned probe attends to the tokens, then
    y + mlp(norm(y)); (B, N, D) -> (B, D)."""

    def __init__(self, config: ViTConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        c = config
        dense = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.probe = nnx.Param(jnp.zeros((1, c.d_model), dtype))
        self.attn = Attention(c, heads=c.map_num_heads, dtype=dtype, rngs=rngs)
        self.norm = make_norm(c, c.d_model, dense)
        self._init_mlp(c, True, False, dense, width=c.map_mlp_width)  # plain, as timm, big_vision

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """`mask`: an additive (B, 1, 1, N) key mask, for a padded batch."""
        probe = jnp.broadcast_to(self.probe[...], (x.shape[0], *self.probe.shape))  # (B, 1, D)
        y = self.attn(probe, context=x, positions=AttentionPositions(bias=mask))
        return (y + self.mlp(self.norm(y)))[:, 0]


class ViT(nnx.Module):
    """patch_embed -> tokens (+ prefix tokens, + positions) -> norm_pre -> blocks -> ln_f ->
    pool (-> fc_norm) -> head."""

    def __init__(
        self,
        config: ViTConfig,
        *,
        rngs: nnx.Rngs,
        dtype=None,
        scan_layers: bool = False,
        fused_attention: bool = False,
        dynamic_image_size: bool = False,
        resampling=None,
    ):
        """`scan_layers=True` stacks the blocks' parameters on a leading (num_layers,) axis and
        runs them with `nnx.scan` (as big_vision does): one block to compile instead of L.
        `fused_attention=True` uses `jax.nn.dot_product_attention` for the attention core.
        `dynamic_image_size=True` takes any image whose sides are multiples of the patch (as
        timm's `dynamic_img_size` and HF's `interpolate_pos_encoding`): the position table is
        resampled to the image's grid in the forward by `resampling` (a
        `weight_transfer.core.resample.Resampling`, or anything with `interpolation` and
        `antialias`; default bicubic), gradients flowing through it; under `nnx.jit`, one
        compile per image shape."""
        c = self.config = config
        self.set_dynamic_image_size(dynamic_image_size, resampling)
        self.scan_layers = scan_layers and c.num_layers > 0
        dtype = resolve_dtype(dtype)
        dense = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
        p, d = c.patch_size, c.d_model
        self.patch_embed = nnx.Conv(
            c.in_channels,
            d,
            kernel_size=(p, p),
            strides=p,
            padding="VALID",
            use_bias=c.patch_bias,
            **dense,
        )
        if c.patch_norm:
            self.patch_norm = make_norm(c, d, dense)
        if c.class_token:
            self.cls_token = nnx.Param(jnp.zeros((1, d), dtype))
        if c.dist_token:
            self.dist_token = nnx.Param(jnp.zeros((1, d), dtype))
        if c.reg_tokens:
            self.reg_tokens = nnx.Param(jnp.zeros((c.reg_tokens, d), dtype))
        if c.pos_embed:
            self.pos_embed = nnx.Param(jnp.zeros((c.num_positions, d), dtype))
        if c.norm_pre:
            self.norm_pre = make_norm(c, d, dense)
        if c.rel_pos_bias == "shared":
            self.rel_bias = RelativeBias(c, dtype=dtype, rngs=rngs)
        block = dict(dtype=dtype, fused_attention=fused_attention)
        if self.scan_layers:
            self.blocks = _stacked_blocks(c, block, rngs)  # every parameter (L, ...)
        else:
            self.blocks = nnx.List([make_block(c, **block, rngs=rngs) for _ in range(c.num_layers)])
        if c.final_norm == "pre_pool":
            self.ln_f = make_norm(c, d, dense)
        if c.pool == "map":
            self.map = MAPHead(c, dtype=dtype, rngs=rngs)
        if c.final_norm == "post_pool":
            self.fc_norm = make_norm(c, c.pooled_dim, dense)
        if c.num_classes:
            self.head = nnx.Linear(c.pooled_dim, c.num_classes, use_bias=c.head_bias, **dense)
        if c.has_dist_head:
            self.head_dist = nnx.Linear(d, c.num_classes, use_bias=c.head_bias, **dense)
        _annotate(self)

    @property
    def dtype(self) -> jnp.dtype:
        return self.patch_embed.kernel[...].dtype

    def set_dynamic_image_size(self, on: bool = True, resampling=None) -> None:
        """Take any image size (`on`), resampling the positions by `resampling`'s method."""
        self.dynamic_image_size = on
        self.interpolation = getattr(resampling, "interpolation", "bicubic")
        self.antialias = getattr(resampling, "antialias", False)

    def position_table(self, grid: tuple[int, int]) -> jax.Array:
        """The learned positions for a (Hp, Wp) grid: as stored at the config's grid,
        resampled at any other (dynamic image size)."""
        return positions_for_grid(
            self.pos_embed[...], self.config, grid, self.interpolation, self.antialias
        )  # (positioned prefix + Hp * Wp, D)

    def positions(self, grids: Grids, n: int, padded: bool) -> jax.Array | None:
        """The learned positions of N patch tokens on `grids` (None without a table): one
        table (positioned prefix + N, D) for a batch of one grid; for a `padded` batch, each
        image's, (B, positioned prefix + N, D), the padding's rows zero."""
        if not self.config.pos_embed:
            return None
        if not padded:
            return self.position_table(grids[0])
        tables = {grid: self.position_table(grid) for grid in set(grids)}
        return jnp.stack([jnp.pad(tables[g], ((0, n - g[0] * g[1]), (0, 0))) for g in grids])

    def embed(self, x: jax.Array, pos: jax.Array | None) -> jax.Array:
        """(B, N, D) patch tokens -> (B, T, D): prefix tokens [cls, dist, registers] joined and
        the positions `pos` ((positioned prefix + N, D), or per image with a leading B) added
        to the tokens `pos_embed_tokens` says."""
        c, b = self.config, x.shape[0]
        prefix = [
            jnp.broadcast_to(getattr(self, name)[...], (b, *getattr(self, name).shape))
            for name, on in (
                ("cls_token", c.class_token),
                ("dist_token", c.dist_token),
                ("reg_tokens", c.reg_tokens),
            )
            if on
        ]  # (B, n, D) each
        if pos is None:  # positions only inside attention (RoPE), or none
            return jnp.concatenate([*prefix, x], axis=1)
        if c.pos_embed_tokens == "all":
            return jnp.concatenate([*prefix, x], axis=1) + pos
        if c.pos_embed_tokens == "none":
            return jnp.concatenate([*prefix, x + pos], axis=1)
        cls_and_patches = jnp.concatenate([prefix[0], x], axis=1) + pos  # "cls": others join after
        return jnp.concatenate(
            [cls_and_patches[:, :1], *prefix[1:], cls_and_patches[:, 1:]], axis=1
        )

    def attention_positions(self, grid: tuple[int, int]) -> AttentionPositions:
        """What positions do inside every block's attention for a (Hp, Wp) patch grid: RoPE's
        rotation of q and k (angles from the config in float64, rounded once to the model's
        dtype; constants under jit), relative biases (the rows each pair reads, and a shared
        table's biases), nothing for a learned table."""
        c = self.config
        if c.rel_pos_bias != "none":
            index, coords, pad = relative_grid(c, grid)
            relative = RelativeGrid(
                jnp.asarray(index.astype(np.int32)),  # (T, T) or (N, N)
                None if coords is None else jnp.asarray(coords, self.dtype),
                pad,
            )
            shared = self.rel_bias(relative) if c.rel_pos_bias == "shared" else None
            return AttentionPositions(bias=shared, relative=relative)
        if c.rope == "none":
            return NO_POSITIONS
        if c.rope_freqs == "mixed":  # each block turns by its own learned frequencies
            return AttentionPositions(
                rope_positions=jnp.asarray(rope_positions(c, grid), self.dtype)
            )
        angles = rope_angles(c, grid)  # (Hp * Wp, hd / 2)
        cos, sin = (jnp.asarray(f(angles), self.dtype) for f in (np.cos, np.sin))

        def turn(q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
            prefix = c.num_prefix_tokens
            return rotate(q, cos, sin, c.rope, prefix), rotate(k, cos, sin, c.rope, prefix)

        return AttentionPositions(rotate=turn)

    def pool(self, x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
        """(B, T, D) -> (B, D) (or (B, 2D) for "cls_mean"); prefix tokens other than the class
        token are pooled only with `pool_prefix`. `valid` (B, T): a padded batch's tokens,
        the padding left out of the mean and the MAP head's attention."""
        c = self.config
        start = 0 if c.pool_prefix else c.num_prefix_tokens
        read = x[:, start:]  # what "mean" and "map" read
        own = None if valid is None else valid[:, start:]  # which of them are an image's own
        if c.pool == "cls":
            return x[:, 0]
        if c.pool == "mean":
            return masked_mean(read, own)
        if c.pool == "cls_mean":
            p = c.num_prefix_tokens
            patches = None if valid is None else valid[:, p:]
            return jnp.concatenate([x[:, 0], masked_mean(x[:, p:], patches)], axis=-1)
        return self.map(read, None if own is None else key_mask(own, x.dtype))

    def __call__(self, images: jax.Array, *, return_intermediates: bool = False):
        """Logits for NHWC images; with `return_intermediates`, also a dict of named activations.

        On a mesh with `Explicit` axes (`jax.make_mesh`'s default), the forward runs with the
        axes made `Auto` inside (`jax.sharding.auto_axes`), the compiler choosing the
        activations' shardings as on an `Auto` mesh; the outputs come back split over the
        batch the way the images are (replicated for host images)."""
        batched = jnp.ndim(images) == 4
        return self._on_mesh(lambda m, x: m.forward(x, return_intermediates), images, batched)

    def _on_mesh(self, forward: Callable, inputs: jax.Array, batched: bool = True):
        """`forward(model, inputs)`, on an `Explicit` mesh inside `auto_axes` (the outputs split
        over the batch as `inputs` are, when `batched`)."""
        mesh = _explicit_mesh(self.patch_embed.kernel[...])
        if mesh is None:
            return forward(self, inputs)
        batch_axis = _explicit_spec(inputs)[:1] if batched else ()
        graphdef, state = nnx.split(self)

        def run(state, inputs):
            return forward(nnx.merge(graphdef, state), inputs)

        with jax.sharding.use_abstract_mesh(mesh):
            return jax.sharding.auto_axes(run, out_sharding=P(*batch_axis))(state, inputs)

    def forward(self, images: jax.Array, return_intermediates: bool = False):
        """The forward itself, whatever the mesh (`__call__`'s body)."""
        batched = check_image_shape(
            images.shape, self.config, "NHWC", dynamic=self.dynamic_image_size
        )
        x = jnp.asarray(images, self.dtype)
        x = self.patch_embed(x if batched else x[None])  # (B, Hp, Wp, D)
        b, hp, wp, d = x.shape
        x = x.reshape(b, hp * wp, d)  # (B, N, D), row-major over the grid
        out = self.encode(x, ((hp, wp),) * b, return_intermediates, padded=False)
        return out if batched else first_image(out, return_intermediates)

    def forward_patches(
        self, patches: jax.Array, grids: Grids, *, return_intermediates: bool = False
    ):
        """Logits for a padded batch of images of different sizes (NaFlex): `patches`
        (B, N, P * P * C), each image's (Hp, Wp) in `grids` (`vit_config.patches`: its first
        Hp * Wp tokens are its patches, row-major; the rest padding, masked out of every
        attention and pooling). Each image's positions are the table resampled to its grid.
        `grids` are Python ints: under `nnx.jit` close over them (one compile per set). On a
        mesh, as `__call__`."""
        return self._on_mesh(
            lambda m, x: m._forward_patches(x, grids, return_intermediates), patches
        )

    def _forward_patches(self, patches: jax.Array, grids: Grids, keep: bool):
        c = self.config
        dynamic = self.dynamic_image_size or c.pos_grid is not None
        grids = check_patch_batch(patches.shape, grids, c, dynamic=dynamic)
        kernel = self.patch_embed.kernel[...]  # (P, P, C, D): rows in the patches' order
        x = jnp.asarray(patches, self.dtype) @ kernel.reshape(-1, kernel.shape[-1])  # (B, N, D)
        x = x + self.patch_embed.bias[...] if c.patch_bias else x
        return self.encode(x, grids, keep, padded=True)

    def encode(self, x: jax.Array, grids: Grids, keep: bool, *, padded: bool):
        """(B, N, D) patch tokens, image i's on the patch grid `grids[i]` -> logits (B, K) and,
        with `keep`, the named activations. All grids are one unless `padded`."""
        c = self.config
        seen: dict[str, jax.Array] = {}

        def tap(name: str, value: jax.Array) -> jax.Array:
            if keep:
                seen[name] = value
            return value

        n = x.shape[1]
        valid = jnp.asarray(padded_tokens(grids, n, c.num_prefix_tokens)) if padded else None
        positions = (
            AttentionPositions(bias=key_mask(valid, self.dtype))
            if padded
            else self.attention_positions(grids[0])
        )
        x = tap("patch_embed", self.patch_norm(x) if c.patch_norm else x)
        x = tap("tokens", self.embed(x, self.positions(grids, n, padded)))  # (B, T, D)
        if c.norm_pre:
            x = tap("norm_pre", self.norm_pre(x))
        if self.scan_layers:
            x, per_layer = _scan_blocks(self.blocks, x, keep, positions)
            for name, stacked in per_layer.items():  # (L, B, T, D) each
                for i in range(c.num_layers):
                    tap(f"blocks.{i}{name}", stacked[i])
        for i, block in enumerate(() if self.scan_layers else self.blocks):
            x = tap(f"blocks.{i}", block(x, lambda n, v, i=i: tap(f"blocks.{i}.{n}", v), positions))
        if c.final_norm == "pre_pool":
            x = tap("ln_f", self.ln_f(x))
        pooled = self.pool(x, valid)
        pooled = tap("pooled", self.fc_norm(pooled) if c.final_norm == "post_pool" else pooled)
        logits = self.head(pooled) if c.num_classes else pooled  # (B, K)
        if c.dist_token and c.dist_head:  # the distilled model's: the mean of both tokens'
            logits = (logits + (self.head_dist(x[:, 1]) if c.num_classes else x[:, 1])) / 2
        logits = tap("logits", logits)
        return (logits, seen) if keep else logits


def key_mask(valid: jax.Array, dtype) -> jax.Array:
    """(B, S) valid keys -> an additive (B, 1, 1, S) attention mask: 0, or the dtype's lowest
    value (timm's; exp of it underflows to an exact 0 weight) for padding."""
    return jnp.where(valid, 0, jnp.finfo(dtype).min).astype(dtype)[:, None, None, :]


def masked_mean(x: jax.Array, valid: jax.Array | None) -> jax.Array:
    """(B, T, D) -> (B, D): the mean over the tokens `valid` (B, T) marks (all, if None)."""
    if valid is None:
        return x.mean(axis=1)
    weights = valid.astype(x.dtype)[..., None]  # (B, T, 1)
    return (x * weights).sum(axis=1) / weights.sum(axis=1)


def _explicit_mesh(array: jax.Array):
    """The abstract mesh `array` is typed on, if any of its axes is `Explicit`; else None."""
    mesh = getattr(jax.typeof(array).sharding, "mesh", None)
    return mesh if mesh is not None and not mesh.empty and mesh.explicit_axes else None


def _explicit_spec(array) -> tuple:
    """A JAX array's explicit PartitionSpec (empty for host arrays)."""
    sharding = (
        getattr(jax.typeof(array), "sharding", None) if isinstance(array, jax.Array) else None
    )
    return tuple(sharding.spec) if sharding is not None else ()


def _annotate(model: ViT) -> None:
    """Give every parameter its logical axes (`vit_config.arch`) as Flax sharding metadata, so
    `nnx.get_partition_spec` under `nnx.logical_axis_rules` places it. Set after building, not
    at creation: annotated creation shards eagerly and needs a mesh."""
    axes = arch.logical_axes(model.config, model.scan_layers)
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            var.set_metadata(out_sharding=axes[".".join(map(str, path))])


def _stacked_blocks(config: ViTConfig, options: dict, rngs: nnx.Rngs) -> Block | ParallelBlocks:
    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs: nnx.Rngs) -> Block | ParallelBlocks:
        return make_block(config, **options, rngs=rngs)

    return create(rngs)


def _scan_blocks(
    blocks: Block | ParallelBlocks, x: jax.Array, keep: bool, positions: AttentionPositions
) -> tuple[jax.Array, dict]:
    """Run stacked blocks with nnx.scan; with `keep`, also each layer's branch outputs. The
    positions are the same for every block (closed over, not scanned)."""

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
    def body(x, block):
        seen = {}

        def tap(name, value):
            seen[f".{name}"] = value
            return value

        x = block(x, tap, positions)
        return x, ({**seen, "": x} if keep else {})

    return body(x, blocks)
