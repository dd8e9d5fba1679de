"""Relative position biases, the maths only: which row of a table each (query, key) pair of
tokens reads, and (timm's relpos MLP) the coordinates a table is computed from, in NumPy from
the config. Both models read their tables with it; the NumPy reference computes each pair's
offset its own way; the tests compare against timm's `Beit` and `VisionTransformerRelPos`.

Between two patch tokens at grid cells (yq, xq) (query) and (yk, xk) (key) the row is
    (yq - yk + Hp - 1) * (2 Wp - 1) + (xq - xk + Wp - 1),
one of the (2 Hp - 1)(2 Wp - 1) offsets, height major.
- "beit": a learned table of those rows and three more for the class token (the one prefix
  token): R - 3 as the query of a patch, R - 2 as a patch's key, R - 1 with itself.
- "mlp" (timm relpos, after Swin v2 "cr"): the table is computed, per offset (dy, dx), by a
  2 -> rel_pos_dim -> heads ReLU MLP of sign(d) ln(1 + |d|) for d = dy, dx; prefix tokens get
  no bias (zeros).

The MLP computes its table for any grid (as timm does at another window size); BEiT's learned
table belongs to the config's grid: timm resizes it for another (resize_rel_pos_bias_table),
which is not implemented here, so another grid is refused by name.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from vit_config import ArgumentError


class RelativeGrid(NamedTuple):
    """What a relative bias needs of the token grid: each (query, key) pair's table row, the
    MLP form's input coordinates (None for a learned table), and how many prefix tokens take
    no bias (zeros before the patches)."""

    index: np.ndarray  # (T, T) for "beit", (N, N) for "mlp"
    coords: np.ndarray | None  # (offsets, 2): (dy, dx) as sign(d) ln(1 + |d|), "mlp" only
    pad: int


def relative_grid(config, grid: tuple[int, int]) -> RelativeGrid:
    """The rows and coordinates of `config`'s relative biases on a (Hp, Wp) grid."""
    if config.rel_pos_form == "beit" and tuple(grid) != config.grid:
        raise ArgumentError(
            f"BEiT's relative bias tables are learned for the {config.grid} patch grid, "
            f"not {tuple(grid)}: resizing them (timm's resize_rel_pos_bias_table) is not "
            f"implemented; use images of {config.image_hw} pixels"
        )
    hp, wp = grid
    cells = np.meshgrid(np.arange(hp), np.arange(wp), indexing="ij")
    ys, xs = (a.reshape(-1) for a in cells)  # (N,) each, row-major over the grid
    dy = ys[:, None] - ys[None, :] + hp - 1  # (N, N): query minus key, shifted to >= 0
    dx = xs[:, None] - xs[None, :] + wp - 1
    offsets = dy * (2 * wp - 1) + dx
    if config.rel_pos_form == "mlp":
        d = np.stack(
            np.meshgrid(np.arange(1 - hp, hp), np.arange(1 - wp, wp), indexing="ij"), -1
        ).reshape(-1, 2)  # (offsets, 2): (dy, dx), height major
        coords = np.sign(d) * np.log1p(np.abs(d))
        return RelativeGrid(offsets, coords, config.num_prefix_tokens)
    rows = config.num_relative_positions
    index = np.empty((hp * wp + 1,) * 2, np.int64)
    index[1:, 1:] = offsets
    index[0, :] = rows - 3  # the class token as query
    index[:, 0] = rows - 2  # the class token as key
    index[0, 0] = rows - 1
    return RelativeGrid(index, None, 0)
