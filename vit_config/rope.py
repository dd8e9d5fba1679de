"""2-D rotary position embedding (RoPE), the maths only: the angles in float64 NumPy from the
config, and the rotation for NumPy, JAX or torch arrays alike. Both models and the NumPy
reference call it, so the three rotate identically; the tests compare against timm's `Eva`.

Angles, per patch token (row-major over the (Hp, Wp) grid) and per pair of channels: the
height's head_dim/4 angles then the width's ("hw"), or the width's first ("wh").
- "theta" (EVA-02, PE, RoPE-ViT, timm sbb): angle_k = p * rope_theta ** (-k / (head_dim/4)),
  p = i + rope_offset, rescaled to `rope_ref_grid` as p * ref / n (EVA-02's fine-tune rule).
- "periods" (DINOv3): angle_k = 2 pi c / rope_theta ** (4k / head_dim), on centred coordinates
  c = 2 (i + 0.5 + rope_offset) / n - 1, n per `rope_coords`; with `rope_periods`, the
  periods a file holds in place of rope_theta ** (4k / head_dim).

Rotation of a query or key row x (head_dim channels) by angles a (head_dim/2):
- "interleaved": pairs (2m, 2m+1): x[2m] cos a_m - x[2m+1] sin a_m, x[2m+1] cos a_m + x[2m] sin a_m;
- "half": pairs (j, j + head_dim/2), the same formula.
- "mixed" (RoPE-ViT): learned frequencies per block and head, angle = p1 f[0] + p2 f[1] on the
  integer positions, computed in the forward from the parameters.
Prefix tokens (class, registers) are never rotated.

The angles are computed in float64 and rounded once to the model's dtype; timm, HF and the
original DINOv3 compute them in float32 (so a float64 comparison with them stalls near 1e-7).
"""

from __future__ import annotations

import numpy as np

from vit_config.resample import array_ops


def rope_positions(config, grid: tuple[int, int]) -> np.ndarray:
    """(Hp * Wp, 2) float64 integer positions of the patch tokens, the axis `rope_axes` puts
    first in column 0: what learned ("mixed") frequencies multiply."""
    ys, xs = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    first, second = (ys, xs) if config.rope_axes == "hw" else (xs, ys)
    return np.stack([first.reshape(-1), second.reshape(-1)], -1).astype(np.float64)


def learned_angles(positions, freqs):
    """RoPE-ViT's mixed angles, (N, H, hd / 2), from positions (N, 2) and one block's learned
    frequencies (2, H, hd / 2), in their library and dtype (gradients flow to both)."""
    return positions[:, 0, None, None] * freqs[0] + positions[:, 1, None, None] * freqs[1]


def rope_angles(config, grid: tuple[int, int]) -> np.ndarray:
    """(Hp * Wp, head_dim / 2) float64 angles for a (Hp, Wp) patch grid."""
    hp, wp = grid
    quarter = config.head_dim // 4
    k = np.arange(quarter, dtype=np.float64)
    sides = [hp, wp]
    if config.rope_freqs == "theta":
        coords = [np.arange(n, dtype=np.float64) + config.rope_offset for n in sides]
        if config.rope_ref_grid is not None:
            coords = [
                c / n * r for c, n, r in zip(coords, sides, config.rope_ref_grid, strict=True)
            ]
        freqs = config.rope_theta ** (-k / quarter)  # (D/4,)
    else:
        denominators = {
            "separate": sides,
            "min": [min(sides)] * 2,
            "max": [max(sides)] * 2,
        }[config.rope_coords]
        coords = [
            2.0 * (np.arange(n, dtype=np.float64) + 0.5 + config.rope_offset) / d - 1.0
            for n, d in zip(sides, denominators, strict=True)
        ]
        periods = (
            np.asarray(config.rope_periods, np.float64)
            if config.rope_periods is not None
            else config.rope_theta ** (4.0 * k / config.head_dim)
        )
        freqs = 2.0 * np.pi / periods
    ys, xs = np.meshgrid(coords[0], coords[1], indexing="ij")  # (Hp, Wp) each
    first, second = (ys, xs) if config.rope_axes == "hw" else (xs, ys)
    angles = np.concatenate(
        [first.reshape(-1, 1) * freqs, second.reshape(-1, 1) * freqs], axis=-1
    )  # (N, D/2): one axis's D/4 angles, then the other's
    return angles


def rotate(x, cos, sin, layout: str, prefix: int):
    """`x` (B, T, H, hd) with its patch tokens (all but the first `prefix`) rotated by the
    angles whose cos and sin are given as (T - prefix, hd / 2), or per head as
    (T - prefix, H, hd / 2) (learned frequencies), in x's library and dtype."""
    stack, concat = array_ops(x)
    head, patches = x[:, :prefix], x[:, prefix:]
    # (1, N, 1, hd/2), or (1, N, H, hd/2) per head
    c, s = (a[None, :, None, :] if a.ndim == 2 else a[None] for a in (cos, sin))
    if layout == "interleaved":
        even, odd = patches[..., 0::2], patches[..., 1::2]
        pairs = stack([even * c - odd * s, odd * c + even * s], -1)  # (B, N, H, hd/2, 2)
        turned = pairs.reshape(patches.shape)
    else:
        half = patches.shape[-1] // 2
        first, second = patches[..., :half], patches[..., half:]
        turned = concat([first * c - second * s, second * c + first * s], -1)
    return concat([head, turned], 1) if prefix else turned
