"""Vision Transformer in PyTorch, with the same module tree and names as `jax_impl`.

Order: Attention, Block (pre-norm, MLP as ff1/ff2 or gated ff1_g/ff1_x), MAPHead, ViT.
Images are NCHW: unbatched (C, H, W) -> (K,) or batched (B, C, H, W) -> (B, K).
The parameters each config builds are declared in `vit_config.arch` (tested to match).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import reduce
from operator import add
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vit_config import ViTConfig, check_image_shape, first_image
from vit_config.patches import Grids, check_patch_batch, padded_tokens
from vit_config.relpos import RelativeGrid, relative_grid
from vit_config.resample import positions_for_grid
from vit_config.rope import learned_angles, rope_angles, rope_positions, rotate

Tap = Callable[[str, torch.Tensor], torch.Tensor]


def _no_tap(name: str, value: torch.Tensor) -> torch.Tensor:
    return value


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,  # exact (erf), torch's default
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI CLIP
    "silu": F.silu,
}


class AttentionPositions(NamedTuple):
    """What positions do inside attention, computed once per forward for the token grid: a
    rotation of q and k (`rotate(q, k)` on (B, T, H, hd)), a bias added to the attention
    logits (broadcast to (B, H, T, S): a shared relative table's), the token positions a
    block's learned RoPE frequencies multiply, and the grid an attention's own relative biases
    are read from (`vit_config.relpos.RelativeGrid`). A learned table is added to the tokens
    before the blocks instead (`ViT.embed`). The plain ViT has none of them."""

    rotate: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    bias: torch.Tensor | None = None
    rope_positions: torch.Tensor | None = None  # (N, 2): what learned RoPE frequencies multiply
    relative: RelativeGrid | None = None  # (index, coords, pad) as tensors


class RelativeBias(nn.Module):
    """Relative position biases (`vit_config.relpos`): BEiT's learned `table`, or timm
    relpos's MLP `fc1`, `fc2` computing one from each offset's log coordinates."""

    def __init__(self, c: ViTConfig):
        super().__init__()
        self.form = c.rel_pos_form
        if self.form == "beit":
            self.table = nn.Parameter(torch.zeros(c.num_relative_positions, c.num_heads))
        else:
            self.fc1 = nn.Linear(2, c.rel_pos_dim)
            self.fc2 = nn.Linear(c.rel_pos_dim, c.num_heads)

    def forward(self, grid: RelativeGrid) -> torch.Tensor:
        """(H, T, T) logit biases: the table read at each pair's row, prefix tokens padded."""
        table = self.table if self.form == "beit" else self.fc2(F.relu(self.fc1(grid.coords)))
        bias = table[grid.index].permute(2, 0, 1)  # (H, T, T), or (H, N, N) before the pad
        return F.pad(bias, (grid.pad, 0, grid.pad, 0)) if grid.pad else bias


NO_POSITIONS = AttentionPositions()


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The attention core, (B, H, T, hd) each -> (B, H, T, hd): softmax(q k^T / sqrt(hd) +
    bias) v, through F.scaled_dot_product_attention (an additive float mask is a bias)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def make_norm(c: ViTConfig, d: int, eps: float | None = None) -> nn.Module:
    eps = c.ln_eps if eps is None else eps
    if c.norm == "rmsnorm":
        return nn.RMSNorm(d, eps=eps)
    return nn.LayerNorm(d, eps=eps)


class Attention(nn.Module):
    """Multi-head attention from four Linear projections, through F.scaled_dot_product_attention:
    self-attention, or cross-attention from `x` to `context` (the MAP head's probe)."""

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
    ):
        super().__init__()
        self.num_heads = heads or c.num_heads
        d = c.d_model
        self.q = nn.Linear(d, d, bias=bias)
        self.k = nn.Linear(d, d, bias=bias and k_bias)
        self.v = nn.Linear(d, d, bias=bias)
        if qk_norm:
            self.q_norm = make_norm(c, c.head_dim)
            self.k_norm = make_norm(c, c.head_dim)
        self.qk_norm = qk_norm
        if learned_rope:
            self.rope_freqs = nn.Parameter(torch.zeros(2, c.num_heads, c.head_dim // 2))
        self.learned_rope = learned_rope
        self.rope_layout, self.rope_prefix = c.rope, c.num_prefix_tokens
        if rel_bias:
            self.rel_bias = RelativeBias(c)
        self.has_rel_bias = rel_bias
        if o_norm:
            self.o_norm = make_norm(c, d)
        self.has_o_norm = o_norm
        self.o = nn.Linear(d, d, bias=proj_bias)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        positions: AttentionPositions = NO_POSITIONS,
    ) -> torch.Tensor:
        context = x if context is None else context
        b, t, d = x.shape
        hd = d // self.num_heads
        q = self.q(x).view(b, t, self.num_heads, hd)  # (B, T, H, hd)
        k, v = (proj(context).view(b, -1, self.num_heads, hd) for proj in (self.k, self.v))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if positions.rotate is not None:
            q, k = positions.rotate(q, k)
        elif self.learned_rope:  # this block's own frequencies, per head
            angles = learned_angles(positions.rope_positions, self.rope_freqs)  # (N, H, hd/2)
            q, k = (
                rotate(a, angles.cos(), angles.sin(), self.rope_layout, self.rope_prefix)
                for a in (q, k)
            )
        bias = positions.bias
        if self.has_rel_bias:
            own = self.rel_bias(positions.relative)  # (H, T, T)
            bias = own if bias is None else bias + own
        q, k, v = (a.transpose(1, 2) for a in (q, k, v))  # (B, H, T, hd)
        out = attend(q, k, v, bias).transpose(1, 2).reshape(b, t, d)  # heads concatenated
        return self.o(self.o_norm(out) if self.has_o_norm else out)


class FeedForward(nn.Module):
    """The MLP parameters' owner's forward: ff2(act(ff1 x)), or ff2(act(ff1_g x) * ff1_x x)."""

    def _init_mlp(
        self, c: ViTConfig, bias: bool, gated: bool, hidden_norm: bool = False, width: int = 0
    ) -> None:
        self.activation = c.activation
        self.gated = gated
        d, f = c.d_model, width or c.d_ff
        if self.gated:
            self.ff1_g = nn.Linear(d, f, bias=bias)
            self.ff1_x = nn.Linear(d, f, bias=bias)
        else:
            self.ff1 = nn.Linear(d, f, bias=bias)
        if hidden_norm:
            self.ff_norm = make_norm(c, f)
        self.hidden_norm = hidden_norm
        self.ff2 = nn.Linear(f, d, bias=bias)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        act = ACTIVATIONS[self.activation]
        hidden = act(self.ff1_g(x)) * self.ff1_x(x) if self.gated else act(self.ff1(x))
        return self.ff2(self.ff_norm(hidden) if self.hidden_norm else hidden)


class Block(FeedForward):
    """Encoder block, pre-norm: x + ls1 * attn(ln1(x)), then x + ls2 * mlp(ln2(x)); post-norm:
    x + ls1 * ln1(attn(x)), then x + ls2 * ln2(mlp(x)); parallel: x + ls1 * (attn(ln1(x)) +
    mlp(ln1(x)))."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        c = config
        self.form = c.block
        self.ln1 = make_norm(c, c.d_model, c.block_eps)
        self.attn = Attention(
            c,
            bias=c.qkv_bias,
            proj_bias=c.proj_bias,
            qk_norm=c.qk_norm,
            k_bias=c.k_bias,
            o_norm=c.attn_norm,
            rel_bias=c.rel_pos_bias == "block",
            learned_rope=c.rope != "none" and c.rope_freqs == "mixed",
        )
        if self.form != "parallel":
            self.ln2 = make_norm(c, c.d_model, c.block_eps)
        self._init_mlp(c, c.mlp_bias, c.mlp != "mlp", c.mlp_norm)
        if c.layer_scale:
            self.ls1 = nn.Parameter(torch.ones(c.d_model))
            if self.form != "parallel":
                self.ls2 = nn.Parameter(torch.ones(c.d_model))
        self.layer_scale = c.layer_scale

    def scaled(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return x * getattr(self, name) if self.layer_scale else x

    def attn_branch(self, x: torch.Tensor, positions: AttentionPositions) -> torch.Tensor:
        """What the attention adds to the residual stream (pre- or post-norm)."""
        if self.form == "post_norm":
            return self.scaled("ls1", self.ln1(self.attn(x, positions=positions)))
        return self.scaled("ls1", self.attn(self.ln1(x), positions=positions))

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        """What the MLP adds to the residual stream (pre- or post-norm)."""
        if self.form == "post_norm":
            return self.scaled("ls2", self.ln2(self.mlp(x)))
        return self.scaled("ls2", self.mlp(self.ln2(x)))

    def forward(
        self, x: torch.Tensor, tap: Tap = _no_tap, positions: AttentionPositions = NO_POSITIONS
    ) -> torch.Tensor:
        if self.form == "parallel":  # both branches read one norm; one LayerScale for both
            h = self.ln1(x)
            a = tap("attn", self.attn(h, positions=positions))
            return x + self.scaled("ls1", a + tap("mlp", self.mlp(h)))
        x = x + tap("attn", self.attn_branch(x, positions))
        return x + tap("mlp", self.mlp_branch(x))


class ParallelBlocks(nn.Module):
    """`num_parallel` pre-norm blocks side by side: x + sum_j attn_j, then x + sum_j mlp_j
    (timm ParallelThingsBlock), the branches added in order."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        branch = config.replace(num_parallel=1)
        self.parallel = nn.ModuleList(Block(branch) for _ in range(config.num_parallel))

    def forward(
        self, x: torch.Tensor, tap: Tap = _no_tap, positions: AttentionPositions = NO_POSITIONS
    ) -> torch.Tensor:
        x = x + tap("attn", reduce(add, (b.attn_branch(x, positions) for b in self.parallel)))
        return x + tap("mlp", reduce(add, (b.mlp_branch(x) for b in self.parallel)))


def make_block(config: ViTConfig) -> Block | ParallelBlocks:
    return ParallelBlocks(config) if config.num_parallel > 1 else Block(config)


class MAPHead(FeedForward):
    """Multihead attention pooling (SigLIP): a learned probe attends to the tokens, then
    y + mlp(norm(y)); (B, N, D) -> (B, D)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        c = config
        self.probe = nn.Parameter(torch.zeros(1, c.d_model))
        self.attn = Attention(c, heads=c.map_num_heads)
        self.norm = make_norm(c, c.d_model)
        self._init_mlp(c, True, False, width=c.map_mlp_width)  # a plain MLP, as timm and big_vision

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask`: an additive (B, 1, 1, N) key mask, for a padded batch."""
        probe = self.probe.expand(x.shape[0], -1, -1)  # (B, 1, D)
        y = self.attn(probe, context=x, positions=AttentionPositions(bias=mask))
        return (y + self.mlp(self.norm(y)))[:, 0]


class ViT(nn.Module):
    """patch_embed -> tokens (+ prefix tokens, + positions) -> norm_pre -> blocks -> ln_f ->
    pool (-> fc_norm) -> head."""

    def __init__(self, config: ViTConfig, *, dynamic_image_size: bool = False, resampling=None):
        """`dynamic_image_size=True` takes any image whose sides are multiples of the patch (as
        timm's `dynamic_img_size` and HF's `interpolate_pos_encoding`): the position table is
        resampled to the image's grid in the forward by `resampling` (a
        `weight_transfer.core.resample.Resampling`, or anything with `interpolation` and
        `antialias`; default bicubic), gradients flowing through it."""
        super().__init__()
        c = self.config = config
        self.set_dynamic_image_size(dynamic_image_size, resampling)
        p, d = c.patch_size, c.d_model
        self.patch_embed = nn.Conv2d(c.in_channels, d, kernel_size=p, stride=p, bias=c.patch_bias)
        if c.patch_norm:
            self.patch_norm = make_norm(c, d)
        if c.class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, d))
        if c.dist_token:
            self.dist_token = nn.Parameter(torch.zeros(1, d))
        if c.reg_tokens:
            self.reg_tokens = nn.Parameter(torch.zeros(c.reg_tokens, d))
        if c.pos_embed:
            self.pos_embed = nn.Parameter(torch.zeros(c.num_positions, d))
        if c.norm_pre:
            self.norm_pre = make_norm(c, d)
        if c.rel_pos_bias == "shared":
            self.rel_bias = RelativeBias(c)
        self.blocks = nn.ModuleList(make_block(c) for _ in range(c.num_layers))
        if c.final_norm == "pre_pool":
            self.ln_f = make_norm(c, d)
        if c.pool == "map":
            self.map = MAPHead(c)
        if c.final_norm == "post_pool":
            self.fc_norm = make_norm(c, c.pooled_dim)
        if c.num_classes:
            self.head = nn.Linear(c.pooled_dim, c.num_classes, bias=c.head_bias)
        if c.has_dist_head:
            self.head_dist = nn.Linear(d, c.num_classes, bias=c.head_bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.weight.dtype

    def set_dynamic_image_size(self, on: bool = True, resampling=None) -> None:
        """Take any image size (`on`), resampling the positions by `resampling`'s method."""
        self.dynamic_image_size = on
        self.interpolation = getattr(resampling, "interpolation", "bicubic")
        self.antialias = getattr(resampling, "antialias", False)

    def position_table(self, grid: tuple[int, int]) -> torch.Tensor:
        """The learned positions for a (Hp, Wp) grid: as stored at the config's grid,
        resampled at any other (dynamic image size)."""
        return positions_for_grid(
            self.pos_embed, self.config, grid, self.interpolation, self.antialias
        )  # (positioned prefix + Hp * Wp, D)

    def positions(self, grids: Grids, n: int, padded: bool) -> torch.Tensor | None:
        """The learned positions of N patch tokens on `grids` (None without a table): one
        table (positioned prefix + N, D) for a batch of one grid; for a `padded` batch, each
        image's, (B, positioned prefix + N, D), the padding's rows zero."""
        if not self.config.pos_embed:
            return None
        if not padded:
            return self.position_table(grids[0])
        tables = {grid: self.position_table(grid) for grid in set(grids)}
        return torch.stack([F.pad(tables[g], (0, 0, 0, n - g[0] * g[1])) for g in grids])

    def embed(self, x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        """(B, N, D) patch tokens -> (B, T, D): prefix tokens [cls, dist, registers] joined and
        the positions `pos` ((positioned prefix + N, D), or per image with a leading B) added
        to the tokens `pos_embed_tokens` says."""
        c, b = self.config, x.shape[0]
        prefix = [
            getattr(self, name).expand(b, -1, -1)
            for name, on in (
                ("cls_token", c.class_token),
                ("dist_token", c.dist_token),
                ("reg_tokens", c.reg_tokens),
            )
            if on
        ]  # (B, n, D) each
        if pos is None:  # positions only inside attention (RoPE), or none
            return torch.cat([*prefix, x], dim=1)
        if c.pos_embed_tokens == "all":
            return torch.cat([*prefix, x], dim=1) + pos
        if c.pos_embed_tokens == "none":
            return torch.cat([*prefix, x + pos], dim=1)
        cls_and_patches = torch.cat([prefix[0], x], dim=1) + pos  # "cls": others join after
        return torch.cat([cls_and_patches[:, :1], *prefix[1:], cls_and_patches[:, 1:]], dim=1)

    def attention_positions(self, grid: tuple[int, int]) -> AttentionPositions:
        """What positions do inside every block's attention for a (Hp, Wp) patch grid: RoPE's
        rotation of q and k (angles from the config in float64, rounded once to the model's
        dtype), relative biases (the rows each pair reads, and a shared table's biases),
        nothing for a learned table."""
        c = self.config
        device = self.patch_embed.weight.device
        if c.rel_pos_bias != "none":
            index, coords, pad = relative_grid(c, grid)
            relative = RelativeGrid(
                torch.from_numpy(index).to(device),  # (T, T) or (N, N)
                None if coords is None else torch.from_numpy(coords).to(device, self.dtype),
                pad,
            )
            shared = self.rel_bias(relative) if c.rel_pos_bias == "shared" else None
            return AttentionPositions(bias=shared, relative=relative)
        if c.rope == "none":
            return NO_POSITIONS
        if c.rope_freqs == "mixed":  # each block turns by its own learned frequencies
            where = torch.from_numpy(rope_positions(c, grid)).to(device, self.dtype)
            return AttentionPositions(rope_positions=where)
        angles = rope_angles(c, grid)  # (Hp * Wp, hd / 2)
        cos, sin = (
            torch.from_numpy(f(angles)).to(device=device, dtype=self.dtype)
            for f in (np.cos, np.sin)
        )

        def turn(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            prefix = c.num_prefix_tokens
            return rotate(q, cos, sin, c.rope, prefix), rotate(k, cos, sin, c.rope, prefix)

        return AttentionPositions(rotate=turn)

    def pool(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
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
            return torch.cat([x[:, 0], masked_mean(x[:, p:], patches)], dim=-1)
        return self.map(read, None if own is None else key_mask(own, x.dtype))

    def forward(self, images: torch.Tensor, *, return_intermediates: bool = False):
        """Logits for NCHW images; with `return_intermediates`, also a dict of named activations."""
        batched = check_image_shape(
            tuple(images.shape), self.config, "NCHW", dynamic=self.dynamic_image_size
        )
        x = images.to(self.dtype)
        x = self.patch_embed(x if batched else x[None])  # (B, D, Hp, Wp)
        grids = ((x.shape[2], x.shape[3]),) * x.shape[0]
        x = x.flatten(2).transpose(1, 2)  # (B, N, D), row-major over the grid
        out = self.encode(x, grids, return_intermediates, padded=False)
        return out if batched else first_image(out, return_intermediates)

    def forward_patches(
        self, patches: torch.Tensor, grids: Grids, *, return_intermediates: bool = False
    ):
        """Logits for a padded batch of images of different sizes (NaFlex): `patches`
        (B, N, P * P * C), each image's (Hp, Wp) in `grids` (`vit_config.patches`: its first
        Hp * Wp tokens are its patches, row-major; the rest padding, masked out of every
        attention and pooling). Each image's positions are the table resampled to its grid."""
        c = self.config
        dynamic = self.dynamic_image_size or c.pos_grid is not None
        grids = check_patch_batch(tuple(patches.shape), grids, c, dynamic=dynamic)
        weight = self.patch_embed.weight.permute(0, 2, 3, 1)  # (D, C, P, P) -> (D, P, P, C)
        x = F.linear(patches.to(self.dtype), weight.flatten(1), self.patch_embed.bias)
        return self.encode(x, grids, return_intermediates, padded=True)  # x: (B, N, D)

    def encode(self, x: torch.Tensor, grids: Grids, keep: bool, *, padded: bool):
        """(B, N, D) patch tokens, image i's on the patch grid `grids[i]` -> logits (B, K) and,
        with `keep`, the named activations. All grids are one unless `padded`."""
        c = self.config
        seen: dict[str, torch.Tensor] = {}

        def tap(name: str, value: torch.Tensor) -> torch.Tensor:
            if keep:
                seen[name] = value
            return value

        n, device = x.shape[1], x.device
        tokens = padded_tokens(grids, n, c.num_prefix_tokens) if padded else None
        valid = None if tokens is None else torch.from_numpy(tokens).to(device)
        positions = (
            AttentionPositions(bias=key_mask(valid, self.dtype))
            if padded
            else self.attention_positions(grids[0])
        )
        x = tap("patch_embed", self.patch_norm(x) if c.patch_norm else x)
        x = tap("tokens", self.embed(x, self.positions(grids, n, padded)))  # (B, T, D)
        if c.norm_pre:
            x = tap("norm_pre", self.norm_pre(x))
        for i, block in enumerate(self.blocks):
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


def key_mask(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, S) valid keys -> an additive (B, 1, 1, S) attention mask: 0, or the dtype's lowest
    value (timm's; exp of it underflows to an exact 0 weight) for padding."""
    zero = torch.zeros((), dtype=dtype, device=valid.device)
    return torch.where(valid, zero, torch.finfo(dtype).min)[:, None, None, :]


def masked_mean(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(B, T, D) -> (B, D): the mean over the tokens `valid` (B, T) marks (all, if None)."""
    if valid is None:
        return x.mean(dim=1)
    weights = valid.to(x.dtype)[..., None]  # (B, T, 1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1)
