"""BEiT's relative position bias, the maths only: which row of a bias table each (query, key)
pair of tokens reads, in NumPy from the config. Both models gather their tables with it; the
NumPy reference computes the offsets its own way; the tests compare against timm's `Beit`.

A table has (2 Hp - 1)(2 Wp - 1) + 3 rows and one column per head. Between two patch tokens at
grid cells (yq, xq) (query) and (yk, xk) (key) the row is
    (yq - yk + Hp - 1) * (2 Wp - 1) + (xq - xk + Wp - 1),
and the class token (the one prefix token) reads the last three of the R rows: R - 3 as the
query of a patch, R - 2 as a patch's key, R - 1 with itself.

The table belongs to the config's grid; timm resizes it for another (resize_rel_pos_bias_table),
which is not implemented here: another grid is refused by name.
"""

from __future__ import annotations

import numpy as np

from vit_config import ArgumentError


def relative_index(config, grid: tuple[int, int]) -> np.ndarray:
    """(T, T) int64: the table row of each (query, key) pair of the 1 + Hp * Wp tokens."""
    if tuple(grid) != config.grid:
        raise ArgumentError(
            f"relative position bias tables are learned for the {config.grid} patch grid, "
            f"not {tuple(grid)}: resizing them (timm's resize_rel_pos_bias_table) is not "
            f"implemented; use images of {config.image_hw} pixels"
        )
    hp, wp = grid
    rows = config.num_relative_positions
    cells = np.meshgrid(np.arange(hp), np.arange(wp), indexing="ij")
    ys, xs = (a.reshape(-1) for a in cells)  # (N,) each, row-major over the grid
    dy = ys[:, None] - ys[None, :] + hp - 1  # (N, N): query minus key, shifted to >= 0
    dx = xs[:, None] - xs[None, :] + wp - 1
    index = np.empty((hp * wp + 1,) * 2, np.int64)
    index[1:, 1:] = dy * (2 * wp - 1) + dx
    index[0, :] = rows - 3  # the class token as query
    index[:, 0] = rows - 2  # the class token as key
    index[0, 0] = rows - 1
    return index
