"""Resample a position table to another patch grid, the maths only (NumPy, and JAX or torch
arrays alike): both models call it for dynamic image sizes, the porting tools for a new size.

Interpolation is written as two 1-D weight matrices (rows: output positions, columns: input
positions) computed in NumPy with PyTorch's `F.interpolate(align_corners=False)` rules:
bilinear; bicubic with a=-0.75; and with `antialias=True` the widened, normalised kernels
(bicubic a=-0.5, even when upsampling) that torch uses; or with `scipy.ndimage.zoom(order=1)`'s
(linear, corner samples aligned: big_vision). The matrices are applied with NumPy, JAX or torch
alike, so both frameworks resample identically (`resample_grid`), and the tests compare against
timm, transformers, open_clip, torch and scipy themselves. Which method each library uses is
declared in `weight_transfer.core.resample`.
"""

from __future__ import annotations

import math

import numpy as np

from vit_config import ArgumentError

# "dinov2": bicubic with original DINOv2's `scale_factor=(n_out + 0.1) / n_in`
# (interpolate_offset 0.1), which moves every sample a little from `size=`'s grid.
# "big_vision": `scipy.ndimage.zoom(grid, zoom, order=1)`, big_vision's and google-research
# vision_transformer's `resample_posemb`: linear, the first and last samples on the corners.
INTERPOLATIONS = ("bilinear", "bicubic", "dinov2", "big_vision")


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.maximum(0.0, 1.0 - np.abs(x))


f32 = np.float32


def _fma32(a, b, c) -> np.float32:
    """float32 `a * b + c` rounded once, as torch's CPU kernels (built with FMA contraction on
    x86-64) compute it: the float64 product of two float32s is exact."""
    return f32(float(a) * float(b) + float(c))


def _cubic_taps32(t: np.float32, a: np.float32 = f32(-0.75)) -> list[np.float32]:  # noqa: B008
    """torch's `get_cubic_upsample_coefficients(t)` in float32, with its contractions."""

    def near(x):  # ((a + 2) * x - (a + 3)) * x * x + 1
        return _fma32(f32(_fma32(a + f32(2), x, -(a + f32(3))) * x), x, f32(1))

    def far(x):  # ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
        return _fma32(_fma32(_fma32(a, x, -(f32(5) * a)), x, f32(8) * a), x, -(f32(4) * a))

    rest = f32(1) - t  # rounded before the + 1, as torch does
    return [far(t + f32(1)), near(t), near(rest), far(rest + f32(1))]


def weights_1d(
    n_in: int,
    n_out: int,
    interpolation: str,
    antialias: bool,
    *,
    align_corners: bool = False,
    cubic_a: float | None = None,
) -> np.ndarray:
    """(n_out, n_in) float64 matrix M with out = M @ in along one axis.

    `align_corners` and `cubic_a` (bicubic's a: torch's -0.75, or -0.5 antialiased) are how
    other code resamples (the doctor's hypotheses); no library's loader changes them."""
    if interpolation not in INTERPOLATIONS:
        raise ArgumentError(f"interpolation {interpolation!r}: expected one of {INTERPOLATIONS}")
    if interpolation == "big_vision":
        return _zoom_linear(n_in, n_out)
    scale = f32(n_in) / f32(n_out)  # torch computes scales and source coordinates in float32
    if interpolation == "dinov2":  # a scale_factor given: torch maps with float32(1 / factor)
        scale, interpolation = f32(1.0 / ((n_out + 0.1) / n_in)), "bicubic"
    m = np.zeros((n_out, n_in))
    if antialias:  # torch's separable AA kernels (PIL's), widened when downsampling, normalised
        stretch = max(float(scale), 1.0)
        support = (2.0 if interpolation == "bicubic" else 1.0) * stretch
        for i in range(n_out):
            center = float(scale) * (i + 0.5)
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), n_in)
            x = (np.arange(lo, hi) - center + 0.5) / stretch
            a = -0.5 if cubic_a is None else cubic_a
            w = _cubic(x, a) if interpolation == "bicubic" else _triangle(x)
            m[i, lo:hi] = w / w.sum()
        return m
    if align_corners:  # corner samples on the corners: source i * (n_in - 1) / (n_out - 1)
        scale = f32(n_in - 1) / f32(n_out - 1) if n_out > 1 else f32(0)
    for i in range(n_out):
        # area_pixel_compute_source_index
        src: np.float32 = f32(scale * f32(i)) if align_corners else _fma32(scale, i + 0.5, -0.5)
        if interpolation == "bilinear":
            src = max(src, f32(0.0))
            i0 = min(math.floor(src), n_in - 1)
            i1 = min(i0 + 1, n_in - 1)
            t = src - f32(i0)
            m[i, i0] += f32(1) - t
            m[i, i1] += t
        else:
            i0 = math.floor(src)
            taps = _cubic_taps32(src - f32(i0), f32(-0.75 if cubic_a is None else cubic_a))
            for j, tap in zip(range(i0 - 1, i0 + 3), taps, strict=True):
                m[i, min(max(j, 0), n_in - 1)] += tap  # border replicate
    return m


def _zoom_linear(n_in: int, n_out: int) -> np.ndarray:
    """scipy.ndimage.zoom(order=1) along one axis: output i samples input i * (n_in - 1) /
    (n_out - 1), in float64 (a single output samples the first input)."""
    m = np.zeros((n_out, n_in))
    zoom = (n_in - 1) / (n_out - 1) if n_out > 1 else 1.0
    for i in range(n_out):
        x = i * zoom
        i0 = min(math.floor(x), n_in - 1)
        t = x - i0
        m[i, i0] += 1.0 - t
        if t:
            m[i, i0 + 1] += t
    return m


def array_ops(x):
    """(stack, concatenate) for x's array library, NumPy, JAX or torch, each taking an axis
    as its second argument: the position maths runs on any of the three."""
    if type(x).__module__.startswith("torch"):
        import torch

        return (lambda a, axis: torch.stack(a, dim=axis)), (lambda a, axis: torch.cat(a, dim=axis))
    if type(x).__module__.startswith("jax"):
        import jax.numpy as jnp

        return jnp.stack, jnp.concatenate
    return np.stack, np.concatenate


def resample_grid(
    grid,
    new_hw: tuple[int, int],
    interpolation: str = "bicubic",
    antialias: bool = False,
    **variant,
):
    """(H, W, D) -> (H', W', D) for a NumPy, JAX or torch array, in the input's dtype
    (`variant`: `weights_1d`'s align_corners and cubic_a).

    Computed in float64 (JAX: float64 under x64, else float32 at highest precision), so the
    result is the exact interpolation rounded once.
    """
    h, w = grid.shape[0], grid.shape[1]
    mh = weights_1d(h, new_hw[0], interpolation, antialias, **variant)
    mw = weights_1d(w, new_hw[1], interpolation, antialias, **variant)
    if type(grid).__module__.startswith("torch"):
        import torch

        th, tw = torch.from_numpy(mh), torch.from_numpy(mw)
        return torch.einsum("ih,jw,hwd->ijd", th, tw, grid.double()).to(grid.dtype)
    if type(grid).__module__.startswith("jax"):
        import jax
        import jax.numpy as jnp

        wide = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32  # type: ignore[attr-defined]
        out = jnp.einsum(
            "ih,jw,hwd->ijd",
            mh.astype(wide),
            mw.astype(wide),
            grid.astype(wide),
            precision="highest",
        )
        return out.astype(grid.dtype)
    out = np.einsum("ih,jw,hwd->ijd", mh, mw, np.asarray(grid, np.float64))
    return out.astype(grid.dtype)


def resample_pos_embed(
    pos,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    *,
    num_prefix_tokens: int = 0,
    interpolation: str = "bicubic",
    antialias: bool = False,
    **variant,
):
    """(prefix + Hp * Wp, D) -> (prefix + Hp' * Wp', D); the [CLS] row is kept as is."""
    prefix, rows = pos[:num_prefix_tokens], pos[num_prefix_tokens:]
    d = rows.shape[-1]
    grid = resample_grid(rows.reshape(*old_grid, d), new_grid, interpolation, antialias, **variant)
    flat = grid.reshape(new_grid[0] * new_grid[1], d)
    _, concatenate = array_ops(pos)
    return concatenate([prefix, flat], 0)


def positions_for_grid(
    table,
    config,
    grid: tuple[int, int],
    interpolation: str = "bicubic",
    antialias: bool = False,
    **variant,
):
    """`config`'s position table (NumPy, JAX or torch) for a (Hp, Wp) patch grid: as stored at
    the table's own grid; at another, resampled with the prefix rows kept (what both models
    and the NumPy reference do for a dynamic image size, by the method given), or for a NaFlex
    table (`config.pos_grid`) by the config's own method, whatever is given."""
    grid = tuple(grid)
    if grid == config.table_grid:
        return table
    if config.pos_grid is not None:
        return naflex_positions(table, config, grid)
    return resample_pos_embed(
        table,
        config.grid,
        grid,
        num_prefix_tokens=config.num_positioned_prefix,
        interpolation=interpolation,
        antialias=antialias,
        **variant,
    )


def naflex_positions(table, config, grid: tuple[int, int]):
    """timm NaFlexVit's positions for a (Hp, Wp) grid: its (pos_grid) table resampled by the
    config's method to the grid, or with `pos_square` to the square of its longer side and
    the top-left (Hp, Wp) kept. (Hp * Wp, D)."""
    hp, wp = grid
    size = (max(grid), max(grid)) if config.pos_square else grid
    rows = table.reshape(*config.pos_grid, table.shape[-1])  # (H0 * W0, D) -> (H0, W0, D)
    if size != config.pos_grid:
        rows = resample_grid(
            rows,
            size,
            config.pos_interpolation,
            config.pos_antialias,
            align_corners=config.pos_align_corners,
        )
    return rows[:hp, :wp].reshape(hp * wp, table.shape[-1])
