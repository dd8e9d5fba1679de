"""Memory for tensors on their way between files and frameworks: 64-byte aligned buffers (as
torch's and XLA's allocators give) and contiguous copies of transposed matrices in strips one
cache line wide. Used by the readers and writers and by the bridges; the rules engine itself
only yields arrays (views where a transform is a transpose)."""

from __future__ import annotations

import math

import numpy as np


def empty_aligned(shape: tuple[int, ...], dtype, align: int = 64) -> np.ndarray:
    """`np.empty`, starting on a 64-byte boundary as torch's and XLA's allocators do (numpy's
    large arrays start 16 bytes past a page): torch models that share these buffers run their
    GEMMs on aligned weights, like models built by torch itself."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def to_contiguous(a: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """`np.ascontiguousarray`, but a large transposed matrix is copied in strips one cache line
    wide: each pass fills 64 bytes of every output row while reading a few source rows as
    sequential streams. On ViT-H's (1280, 5120) and (5120, 1280) float32 matrices that is 2-3x
    numpy's own strided copy and up to 3x square 256 x 256 tiles (which read 256 rows 20 KB
    apart at once). With `out` (C-contiguous, `a`'s shape and dtype) the copy lands there, even
    if `a` is already contiguous."""
    strips = a.ndim == 2 and a.flags.f_contiguous and not a.flags.c_contiguous and a.size >= 1 << 16
    if out is None:
        if a.flags.c_contiguous:
            return a
        out = empty_aligned(a.shape, a.dtype)
    if not strips:
        np.copyto(out, a)
        return out
    width = max(1, 64 // a.itemsize)
    for j in range(0, a.shape[1], width):
        out[:, j : j + width] = a[:, j : j + width]
    return out
