"""A NumPy ViT forward written from the maths, independent of flax and torch, for every feature
of the family (prefix tokens and their positions, LayerScale, gated MLPs, RMSNorm, q/k norms,
MAP pooling, fc_norm, the distilled head).

Parameters come as the flat NNX dict (`blocks.0.attn.q.kernel` ...); patches are cut with
reshapes, not a convolution, so a wrong conv layout in either implementation shows up here.
`Knobs` switch on the variants other codebases use (pooling, norm position, attention scale,
class-token position...): the defaults are the config's own; the mismatch doctor turns them to
test hypotheses.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy.special import erf  # Cephes' erf, vectorised: no Python call per element

from vit_config.resample import positions_for_grid

ACTIVATIONS = {
    "relu": lambda x: np.maximum(x, 0),
    "gelu": lambda x: 0.5 * x * (1 + erf(x / math.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    "quick_gelu": lambda x: x / (1 + np.exp(-1.702 * x)),
    "silu": lambda x: x / (1 + np.exp(-x)),
}


@dataclass(frozen=True)
class Knobs:
    # "cls": row 0; "mean": all tokens; "mean_patches": patch tokens only (timm 'avg')
    pool: str | None = None  # None: the config's
    # "before": the final norm, then pool (ViT, timm norm); "after": pool, then the same norm
    # (timm fc_norm); None: where the config puts it
    final_norm: str | None = None
    # multiplies the 1/sqrt(head_dim) score scale (sqrt(hd / D) gives 1/sqrt(d_model))
    score_factor: float = 1.0
    # "row0": the class token gets pos_embed row 0 (ours); "none": it gets no position
    cls_position: str = "row0"
    # "nhwc": images as given; "nchw_as_nhwc": NCHW bytes read as NHWC
    images: str = "nhwc"
    # LayerScale gains applied this many times (0: missing, 2: applied twice)
    layer_scale_power: int = 1
    # the register tokens are left out of the sequence
    drop_registers: bool = False
    # resampling the table to another grid (a dynamic image size): None keeps the model's
    # interpolation and antialias; align_corners and bicubic's a as `weights_1d` takes them
    interpolation: str | None = None
    antialias: bool | None = None
    align_corners: bool = False
    cubic_a: float | None = None
    # RoPE: the rotation starts at the first token (the prefix tokens take the first patches'
    # angles, the last patches none); the frequencies' periods rounded to "bfloat16" (DINOv3's
    # released `periods` buffer is reported to be bfloat16)
    rope_from_first_token: bool = False
    rope_periods_dtype: str | None = None
    # relative bias tables: read with query and key swapped; the class token's three slots
    # (as query, as key, with itself) at rows R-3 + these
    rel_transposed: bool = False
    rel_class_slots: tuple[int, int, int] = (0, 1, 2)

    def resampling(self, resampling=None) -> dict:
        """`positions_for_grid`'s method keywords: the model's `resampling` (anything with
        `interpolation` and `antialias`; default bicubic), with these knobs on top."""
        interpolation = self.interpolation or getattr(resampling, "interpolation", "bicubic")
        antialias = self.antialias
        if antialias is None:
            antialias = getattr(resampling, "antialias", False)
        return {
            "interpolation": interpolation,
            "antialias": antialias,
            "align_corners": self.align_corners,
            "cubic_a": self.cubic_a,
        }


def as64(kernel: np.ndarray) -> np.ndarray:
    """A kernel in float64 for one matmul (exact from float32; the doctor keeps float32
    kernels uncopied, and numpy's mixed-dtype matmul would leave BLAS)."""
    return kernel.astype(np.float64, copy=False)


def layernorm(x, scale, bias, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def rmsnorm(x, scale, eps):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * scale


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def read_images(images: np.ndarray, how: str) -> np.ndarray:
    """(B, H, W, C) as the model will see them."""
    if how == "nchw_as_nhwc":  # the NCHW buffer of the same images, reshaped (not transposed)
        b, h, w, c = images.shape
        return images.transpose(0, 3, 1, 2).reshape(b, h, w, c)
    return images


def rope_angles(c, grid: tuple[int, int], periods_dtype: str | None = None) -> np.ndarray:
    """RoPE's angles from the formulas, token by token ((Hp * Wp, hd / 2), float64): the
    token n of the row-major grid sits at row n // Wp, column n % Wp; each axis gets hd / 4
    frequencies, the height's first ("hw") or the width's ("wh"). `periods_dtype`: each
    frequency's period (theta ** (k / (hd/4)), DINOv3's base ** (4k / hd), or the config's
    own `rope_periods`) rounded to it."""
    hp, wp = grid
    quarter = c.head_dim // 4

    def period(exponent: float, k: int) -> float:
        value = c.rope_theta**exponent if c.rope_periods is None else c.rope_periods[k]
        return float(np.asarray(value, periods_dtype)) if periods_dtype else value

    out = np.zeros((hp * wp, 2 * quarter))
    for n in range(hp * wp):
        row_col = [n // wp, n % wp]
        for axis, (i, size) in enumerate(zip(row_col, grid, strict=True)):
            if c.rope_freqs == "theta":
                p = i + c.rope_offset
                if c.rope_ref_grid is not None:
                    p = p * c.rope_ref_grid[axis] / size
                angles = [p / period(k / quarter, k) for k in range(quarter)]
            else:
                n_axis = {"separate": size, "min": min(grid), "max": max(grid)}[c.rope_coords]
                coord = (i + 0.5 + c.rope_offset) / n_axis * 2 - 1
                angles = [
                    2 * math.pi * coord / period(4 * k / c.head_dim, k) for k in range(quarter)
                ]
            slot = axis if c.rope_axes == "hw" else 1 - axis
            out[n, slot * quarter : (slot + 1) * quarter] = angles
    return out


class AttentionPositions(NamedTuple):
    """What positions do inside attention (as in both models): a rotation of q and k
    (`rotate(q, k)` on (B, T, H, hd)) and a bias on the logits (broadcast to (B, H, T, S))."""

    rotate: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None
    bias: np.ndarray | None = None
    grid: tuple[int, int] | None = None  # the patch grid, for learned RoPE frequencies


NO_POSITIONS = AttentionPositions()


@functools.lru_cache(maxsize=8)
def _relative_rows(hp: int, wp: int, class_slots: tuple[int, int, int] = (0, 1, 2)) -> np.ndarray:
    """(T, T) table rows of a class token and an (hp, wp) grid, token by token; the class
    token's rows (as query, as key, with itself) are the offsets' count plus `class_slots`."""
    rows = np.empty((1 + hp * wp, 1 + hp * wp), np.int64)
    offsets = (2 * hp - 1) * (2 * wp - 1)
    for i in range(rows.shape[0]):
        for j in range(rows.shape[1]):
            if i == 0 or j == 0:  # the class token: as query, as key, with itself
                rows[i, j] = offsets + class_slots[2 if i == j else 0 if i == 0 else 1]
                continue
            (yi, xi), (yj, xj) = divmod(i - 1, wp), divmod(j - 1, wp)
            rows[i, j] = (yi - yj + hp - 1) * (2 * wp - 1) + (xi - xj + wp - 1)
    return rows


def attend(q, k, v, bias=None, score_factor: float = 1.0):
    """softmax(q k^T / sqrt(hd) * score_factor + bias) v, (B, T, H, hd) each -> (B, T, H, hd)
    (`score_factor` is the doctor's knob for a missing or doubled scale)."""
    qh, kh, vh = (np.ascontiguousarray(a.transpose(0, 2, 1, 3)) for a in (q, k, v))  # (B, H, T, hd)
    scores = (qh @ kh.swapaxes(-1, -2)) / math.sqrt(q.shape[-1]) * score_factor  # (B, H, T, S)
    if bias is not None:
        scores = scores + bias
    return (softmax(scores) @ vh).transpose(0, 2, 1, 3)  # batched BLAS, not einsum's loops


class Reference:
    """One config's parameters and the functions of the forward, each from its formula."""

    def __init__(self, p: dict, config, knobs: Knobs, resampling=None):
        self.p, self.c, self.knobs = p, config, knobs
        self.method = knobs.resampling(resampling)

    def gain(self, name: str):
        """A LayerScale gain (1 without LayerScale), to the power `knobs.layer_scale_power`."""
        return self.p[name] ** self.knobs.layer_scale_power if self.c.layer_scale else 1.0

    def norm(self, name: str, x):
        eps = self.c.block_eps if name.endswith((".ln1", ".ln2")) else self.c.ln_eps
        if self.c.norm == "rmsnorm":
            return rmsnorm(x, self.p[f"{name}.scale"], eps)
        return layernorm(x, self.p[f"{name}.scale"], self.p[f"{name}.bias"], eps)

    def linear(self, name: str, x):
        return x @ as64(self.p[f"{name}.kernel"]) + self.p.get(f"{name}.bias", 0.0)

    def attention(self, name: str, x, context, positions: AttentionPositions = NO_POSITIONS):
        """softmax(q k^T / sqrt(hd) + bias) v per head, q and k rotated first where the
        positions say, then the output projection."""
        b, t, d = x.shape
        heads = self.c.map_num_heads if name.startswith("map.") else self.c.num_heads
        hd = d // heads
        q = self.linear(f"{name}.q", x).reshape(b, t, heads, hd)  # (B, T, H, hd)
        k, v = (self.linear(f"{name}.{n}", context).reshape(b, -1, heads, hd) for n in "kv")
        if f"{name}.q_norm.scale" in self.p:
            q, k = self.norm(f"{name}.q_norm", q), self.norm(f"{name}.k_norm", k)
        if positions.rotate is not None:
            q, k = positions.rotate(q, k)
        elif self.c.rope != "none" and self.c.rope_freqs == "mixed" and name != "map.attn":
            q, k = (self.turn_learned(name, a, positions.grid) for a in (q, k))
        bias = positions.bias
        if self.c.rel_pos_bias == "block" and not name.startswith("map."):
            bias = self.relative_bias(f"{name}.rel_bias", bias)
        out = attend(q, k, v, bias, self.knobs.score_factor).reshape(b, t, d)
        if self.c.attn_norm and f"{name}.o_norm.scale" in self.p:
            out = self.norm(f"{name}.o_norm", out)
        return self.linear(f"{name}.o", out)

    def turn_learned(self, name: str, x, grid: tuple[int, int]):
        """RoPE-ViT's mixed rotation of x (B, T, H, hd) by the block's learned frequencies
        f (2, H, hd/2): patch token n at (row n // Wp, column n % Wp) turns pair k of head h
        by p1 f[0, h, k] + p2 f[1, h, k], p1 the coordinate `rope_axes` puts first."""
        c, f = self.c, self.p[f"{name}.rope_freqs"]
        prefix = c.num_prefix_tokens - self.knobs.drop_registers * c.reg_tokens
        cells = np.array([divmod(n, grid[1]) for n in range(grid[0] * grid[1])], np.float64)
        p = cells if c.rope_axes == "hw" else cells[:, ::-1]
        turn = np.exp(1j * (p[:, 0, None, None] * f[0] + p[:, 1, None, None] * f[1]))
        head, patches = x[:, :prefix], x[:, prefix:]
        hd = x.shape[-1]
        if c.rope == "interleaved":
            z = (patches[..., 0::2] + 1j * patches[..., 1::2]) * turn
            out = np.stack([z.real, z.imag], axis=-1).reshape(patches.shape)
        else:
            z = (patches[..., : hd // 2] + 1j * patches[..., hd // 2 :]) * turn
            out = np.concatenate([z.real, z.imag], axis=-1)
        return np.concatenate([head, out], axis=1)

    def relative_bias(self, name: str, bias=None):
        """The relative bias of every (query, key) pair, (H, T, T) (plus `bias`), from the
        table or MLP under `name`: patch pairs by their offset (dy, dx), query minus key.
        BEiT's table: the offset's row, the class token's three slots after the offsets (as
        query, as key, with itself). timm relpos's MLP: a ReLU MLP of (dy, dx) as sign(d)
        ln(1 + |d|), the prefix tokens unbiased."""
        c, hp, wp = self.c, *self.c.grid
        if c.rel_pos_form == "beit":
            rows = _relative_rows(hp, wp, self.knobs.rel_class_slots)
            own = self.p[f"{name}.table"][rows.T if self.knobs.rel_transposed else rows]
        else:
            cells = np.array([divmod(n, wp) for n in range(hp * wp)])  # (N, 2): (y, x)
            d = cells[:, None, :] - cells[None, :, :]  # (N, N, 2): query minus key
            d = d.swapaxes(0, 1) if self.knobs.rel_transposed else d
            hidden = np.maximum(self.linear(f"{name}.fc1", np.sign(d) * np.log(1 + np.abs(d))), 0)
            patches = self.linear(f"{name}.fc2", hidden)  # (N, N, H)
            prefix = c.num_prefix_tokens - self.knobs.drop_registers * c.reg_tokens
            own = np.zeros((prefix + hp * wp,) * 2 + patches.shape[-1:])
            own[prefix:, prefix:] = patches
        own = np.moveaxis(own, -1, 0)
        return own if bias is None else bias + own

    def attention_positions(self, grid: tuple[int, int]) -> AttentionPositions:
        """What positions do inside attention for a (Hp, Wp) grid: RoPE's rotation, its angles
        in float64 from the config; nothing for a learned table."""
        c = self.c
        if c.rel_pos_bias == "shared":
            return AttentionPositions(bias=self.relative_bias("rel_bias"))
        if c.rope == "none":
            return NO_POSITIONS
        if c.rope_freqs == "mixed":  # each block turns by its own frequencies (turn_learned)
            return AttentionPositions(grid=grid)
        dtype = self.knobs.rope_periods_dtype
        turn = np.exp(1j * rope_angles(c, grid, dtype))  # (Hp * Wp, hd / 2): a unit per pair
        prefix = c.num_prefix_tokens - self.knobs.drop_registers * c.reg_tokens
        # the turned tokens: the patches, or (a fault) as many from the first token on
        first = 0 if self.knobs.rope_from_first_token else prefix
        turned = slice(first, first + turn.shape[0])

        def rotate(x):  # (B, T, H, hd): each pair of channels a complex number, times the turn
            patches = x[:, turned]
            hd = x.shape[-1]
            if c.rope == "interleaved":  # pairs (2m, 2m+1)
                z = patches[..., 0::2] + 1j * patches[..., 1::2]
            else:  # pairs (j, j + hd/2)
                z = patches[..., : hd // 2] + 1j * patches[..., hd // 2 :]
            z = z * turn[None, :, None, :]
            if c.rope == "interleaved":
                out = np.stack([z.real, z.imag], axis=-1).reshape(patches.shape)
            else:
                out = np.concatenate([z.real, z.imag], axis=-1)
            return np.concatenate([x[:, :first], out, x[:, turned.stop :]], axis=1)

        return AttentionPositions(rotate=lambda q, k: (rotate(q), rotate(k)))

    def attention_branch(self, b: str, x, positions: AttentionPositions):
        """What block (or parallel branch) `b`'s attention adds to the residual stream."""
        if self.c.block == "post_norm":  # each norm on its branch's output
            a = self.norm(f"{b}.ln1", self.attention(f"{b}.attn", x, x, positions))
        else:
            h = self.norm(f"{b}.ln1", x)
            a = self.attention(f"{b}.attn", h, h, positions)
        return self.gain(f"{b}.ls1") * a

    def mlp_branch(self, b: str, x):
        """What block (or parallel branch) `b`'s MLP adds to the residual stream."""
        if self.c.block == "post_norm":
            m = self.norm(f"{b}.ln2", self.mlp(b, x))
        else:
            m = self.mlp(b, self.norm(f"{b}.ln2", x))
        return self.gain(f"{b}.ls2") * m

    def mlp(self, name: str, x):
        act = ACTIVATIONS[self.c.activation]
        if f"{name}.ff1.kernel" in self.p:
            hidden = act(self.linear(f"{name}.ff1", x))
        else:
            hidden = act(self.linear(f"{name}.ff1_g", x)) * self.linear(f"{name}.ff1_x", x)
        if self.c.mlp_norm and f"{name}.ff_norm.scale" in self.p:
            hidden = self.norm(f"{name}.ff_norm", hidden)
        return self.linear(f"{name}.ff2", hidden)

    def position_table(self, grid: tuple[int, int]):
        """The positions for a (Hp, Wp) grid: as stored, or resampled (in float64)."""
        table = self.p["pos_embed"]
        return positions_for_grid(table, self.c, grid, **self.method)

    def embed(self, x, grid: tuple[int, int]):
        """Patch tokens -> [cls, dist, registers, patches] with positions where configured."""
        c, p = self.c, self.p
        b = x.shape[0]
        names = ["cls_token", "dist_token"] + ([] if self.knobs.drop_registers else ["reg_tokens"])
        prefix = [np.broadcast_to(p[k], (b, *p[k].shape)) for k in names if k in p]
        if not c.pos_embed:  # positions only inside attention (RoPE)
            return np.concatenate([*prefix, x], axis=1)
        pos = self.position_table(grid)
        if c.class_token and self.knobs.cls_position == "none" and c.pos_embed_tokens != "none":
            pos = np.concatenate([np.zeros_like(pos[:1]), pos[1:]], axis=0)
        if c.pos_embed_tokens == "all":
            if self.knobs.drop_registers and c.reg_tokens:  # their position rows go with them
                first = int(c.class_token) + int(c.dist_token)
                pos = np.concatenate([pos[:first], pos[first + c.reg_tokens :]], axis=0)
            return np.concatenate([*prefix, x], axis=1) + pos
        if c.pos_embed_tokens == "none":
            return np.concatenate([*prefix, x + pos], axis=1)
        y = np.concatenate([prefix[0], x], axis=1) + pos
        return np.concatenate([y[:, :1], *prefix[1:], y[:, 1:]], axis=1)

    def pool(self, x, how: str):
        patches = x[:, self.c.num_prefix_tokens - self.knobs.drop_registers * self.c.reg_tokens :]
        if how == "cls":
            return x[:, 0]
        if how == "mean":
            return x.mean(axis=1)
        if how == "mean_patches":
            return patches.mean(axis=1)
        if how == "cls_mean":
            return np.concatenate([x[:, 0], patches.mean(axis=1)], axis=-1)
        probe = np.broadcast_to(self.p["map.probe"], (x.shape[0], 1, x.shape[-1]))  # "map"
        y = self.attention("map.attn", probe, x if self.c.pool_prefix else patches)
        return (y + self.mlp("map", self.norm("map.norm", y)))[:, 0]


def forward(
    p: dict, images: np.ndarray, config, knobs: Knobs = Knobs(), resampling=None
) -> dict[str, np.ndarray]:
    """Named intermediates (float64) of a batch of `(B, H, W, C)` images; images of another
    size than the config's get the position table resampled by `resampling` (anything with
    `interpolation` and `antialias`; default bicubic), in float64, as a dynamic-size model."""
    return dict(trace(p, images, config, knobs, resampling=resampling))


def trace(
    p: dict,
    images: np.ndarray,
    config,
    knobs: Knobs = Knobs(),
    resume: tuple[int, np.ndarray] | None = None,
    resampling=None,
) -> Iterator[tuple[str, np.ndarray]]:
    """The same intermediates, one at a time in forward order: a caller that has seen enough
    (the doctor, at the first divergence) stops the forward there. `resume=(i, x)` starts at
    block i from its input x (for corrections confined to block i and later)."""
    c = config
    # kernels are cast at each matmul (as64): a float32 model is not copied whole per call
    ref = Reference(
        {k: v if k.endswith(".kernel") else np.asarray(v, np.float64) for k, v in p.items()},
        c,
        knobs,
        resampling,
    )
    h, w = read_images(np.asarray(images), knobs.images).shape[1:3]
    grid = (h // c.patch_size, w // c.patch_size)
    if resume is None:
        x = yield from _embed(ref, images, c, knobs)
        first = 0
    else:
        first, x = resume
    positions = ref.attention_positions(grid)
    for i in range(first, c.num_layers):
        b = f"blocks.{i}"
        if c.block == "parallel":  # attention and MLP on one norm, one LayerScale for both
            h = ref.norm(f"{b}.ln1", x)
            a, m = ref.attention(f"{b}.attn", h, h, positions), ref.mlp(b, h)
            yield f"{b}.attn", a
            yield f"{b}.mlp", m
            x = x + ref.gain(f"{b}.ls1") * (a + m)
            yield b, x
            continue
        parallel = c.num_parallel > 1
        branches = [f"{b}.parallel.{j}" for j in range(c.num_parallel)] if parallel else [b]
        a = sum(ref.attention_branch(name, x, positions) for name in branches)
        yield f"{b}.attn", a
        x = x + a
        m = sum(ref.mlp_branch(name, x) for name in branches)
        yield f"{b}.mlp", m
        x = x + m
        yield b, x
    mean = "mean" if c.pool_prefix else "mean_patches"
    pool = knobs.pool or {"cls": "cls", "mean": mean}.get(c.pool, c.pool)
    norm_name = "ln_f" if c.final_norm == "pre_pool" else "fc_norm"
    where = knobs.final_norm or {"pre_pool": "before", "post_pool": "after"}.get(c.final_norm)
    if where == "before":
        x = ref.norm(norm_name, x)
        yield "ln_f", x
    pooled = ref.pool(x, pool)
    pooled = ref.norm(norm_name, pooled) if where == "after" else pooled
    yield "pooled", pooled
    logits = ref.linear("head", pooled) if c.num_classes else pooled
    if c.dist_token and c.dist_head:
        logits = (logits + (ref.linear("head_dist", x[:, 1]) if c.num_classes else x[:, 1])) / 2
    yield "logits", logits


def _embed(ref: Reference, images: np.ndarray, c, knobs: Knobs):
    """Patch embedding, tokens with positions and norm_pre, yielded; returns the blocks' input."""
    x = read_images(np.asarray(images, np.float64), knobs.images)
    P, D = c.patch_size, c.d_model
    B, H, W, C = x.shape
    grid = x.reshape(B, H // P, P, W // P, P, C).transpose(0, 1, 3, 2, 4, 5)  # (B, Hp, Wp, P, P, C)
    patches = grid.reshape(B, -1, P * P * C)  # rows in (kh, kw, c) order, grid row-major
    x = patches @ as64(ref.p["patch_embed.kernel"]).reshape(P * P * C, D) + ref.p.get(
        "patch_embed.bias", 0.0
    )
    x = ref.norm("patch_norm", x) if c.patch_norm else x
    yield "patch_embed", x
    x = ref.embed(x, (H // P, W // P))
    yield "tokens", x
    if c.norm_pre:
        x = ref.norm("norm_pre", x)
        yield "norm_pre", x
    return x
