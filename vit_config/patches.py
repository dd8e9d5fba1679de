"""Padded batches of patches (NaFlex): images of different sizes in one batch.

A batch is `patches` (B, N, P * P * C), each patch's pixels in (P, P, C) order (channels
fastest, as timm's `batch_patchify` and transformers' SigLIP 2 image processor give them), and
`grids`, each image's (Hp, Wp) patch grid: image i's patches are its first Hp * Wp tokens in
row-major order, the rest of its N tokens padding. Padding is masked out of every attention
and every pooling, so each image's logits are its own alone (the models' `forward_patches`).

This is the one form both collators produce (timm's `NaFlexCollator`, transformers'
`Siglip2ImageProcessor`); `from_timm` and `from_hf` read theirs and refuse any other order,
since both libraries give a table's positions to the tokens by their order. Importing this
module imports neither JAX nor PyTorch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vit_config import MAX_DYNAMIC_PATCHES, ImageShapeError, ViTConfig

Grids = tuple[tuple[int, int], ...]


def valid_mask(grids: Grids, n: int) -> np.ndarray:
    """(B, N) bool: True for each image's own patches, False for its padding."""
    counts = np.array([h * w for h, w in grids])
    return np.arange(n)[None, :] < counts[:, None]


def padded_tokens(grids: Grids, n: int, prefix: int) -> np.ndarray:
    """(B, prefix + N) bool: the tokens of a padded batch that are an image's own (its prefix
    tokens and its patches), False for padding."""
    return np.concatenate([np.ones((len(grids), prefix), bool), valid_mask(grids, n)], axis=1)


def check_patch_batch(
    shape: tuple[int, ...], grids: Sequence[Sequence[int]], config: ViTConfig, *, dynamic: bool
) -> Grids:
    """Validate a padded batch's `patches` shape and its `grids` against `config`; return the
    grids as a tuple of (Hp, Wp) int pairs. `dynamic`: any grid, else only the config's."""
    shape, p, c = tuple(shape), config.patch_size, config.in_channels
    if len(shape) != 3 or shape[2] != p * p * c:
        raise ImageShapeError(
            f"expected patches of shape (B, N, {p * p * c}) (P * P * C = {p} * {p} * {c}), "
            f"got {shape}"
        )
    b, n = shape[0], shape[1]
    try:
        pairs = tuple((int(h), int(w)) for h, w in grids)
    except (TypeError, ValueError):
        msg = f"grids: expected one (Hp, Wp) pair per image, got {grids!r}"
        raise ImageShapeError(msg) from None
    if len(pairs) != b:
        raise ImageShapeError(f"grids: {len(pairs)} pairs for a batch of {b} images")
    for i, (h, w) in enumerate(pairs):
        if h < 1 or w < 1 or h * w > n:
            raise ImageShapeError(
                f"grids[{i}] = {(h, w)}: expected positive sides with Hp * Wp at most the "
                f"batch's {n} tokens"
            )
        if not dynamic and (h, w) != config.grid:
            raise ImageShapeError(
                f"grids[{i}] = {(h, w)}: this model takes only its config's grid "
                f"{config.grid}; load it with a dynamic image size for any other"
            )
    if n > MAX_DYNAMIC_PATCHES:
        raise ImageShapeError(f"{n:,} tokens per image, more than {MAX_DYNAMIC_PATCHES:,}")
    _check_positions(config)
    return pairs


def _check_positions(config: ViTConfig) -> None:
    """Padded batches position patches by a learned table (or none); a rotary or relative
    scheme's per-image angles or bias tables are not built for them."""
    for feature, on in (
        ("RoPE", config.rope != "none"),
        ("relative position biases", config.rel_pos_bias != "none"),
    ):
        if on:
            raise ImageShapeError(
                f"padded patch batches are not supported with {feature}: give the images "
                "whole, one size per batch"
            )


def patchify(images: Sequence[np.ndarray], patch_size: int, max_patches: int | None = None):
    """HWC images of any sizes (sides multiples of the patch) -> (patches (B, N, P * P * C),
    grids), padded with zeros to N = `max_patches` (default: the largest image's count)."""
    grids = []
    for i, image in enumerate(images):
        if image.ndim != 3 or image.shape[0] % patch_size or image.shape[1] % patch_size:
            raise ImageShapeError(
                f"images[{i}]: expected HWC with H and W multiples of {patch_size}, "
                f"got shape {image.shape}"
            )
        grids.append((image.shape[0] // patch_size, image.shape[1] // patch_size))
    n = max_patches or max(h * w for h, w in grids)
    if any(h * w > n for h, w in grids):
        raise ImageShapeError(f"an image has more patches than max_patches={n}")
    dim = patch_size * patch_size * images[0].shape[2]
    patches = np.zeros((len(images), n, dim), np.result_type(*images))
    for i, (image, (h, w)) in enumerate(zip(images, grids, strict=True)):
        rows = image.reshape(h, patch_size, w, patch_size, -1).transpose(0, 2, 1, 3, 4)
        patches[i, : h * w] = rows.reshape(h * w, dim)  # (Hp, Wp, P, P, C) -> (N_i, P*P*C)
    return patches, tuple(grids)


def from_timm(batch) -> tuple[np.ndarray, Grids]:
    """timm's NaFlex batch (`patches`, `patch_coord` (B, N, 2) as (y, x), `patch_valid`
    (B, N)) -> (patches, grids). Each image's valid patches must come first, in row-major
    order: timm adds the resampled table to the tokens in that order whatever their
    coordinates say, so any other order is refused rather than guessed."""
    patches = _numpy(batch["patches"])
    coord, valid = _numpy(batch["patch_coord"]), _numpy(batch["patch_valid"]).astype(bool)
    if coord.shape != (*patches.shape[:2], 2) or valid.shape != patches.shape[:2]:
        raise ImageShapeError(
            f"patch_coord {coord.shape} and patch_valid {valid.shape} must be (B, N, 2) and "
            f"(B, N) for patches {patches.shape}"
        )
    grids = []
    for i in range(len(patches)):
        count = int(valid[i].sum())
        if count == 0 or valid[i, count:].any():
            raise ImageShapeError(f"image {i}: patch_valid must be its patches first, then padding")
        h, w = (int(s) + 1 for s in coord[i, :count].max(axis=0))
        _check_row_major(coord[i, :count], (h, w), f"image {i}: patch_coord")
        grids.append((h, w))
    return patches, tuple(grids)


def from_hf(pixel_values, pixel_attention_mask, spatial_shapes) -> tuple[np.ndarray, Grids]:
    """transformers' SigLIP 2 inputs (`pixel_values` (B, N, P * P * C),
    `pixel_attention_mask` (B, N), `spatial_shapes` (B, 2)) -> (patches, grids)."""
    patches, mask = _numpy(pixel_values), _numpy(pixel_attention_mask).astype(bool)
    shapes = _numpy(spatial_shapes)
    if mask.shape != patches.shape[:2] or shapes.shape != (len(patches), 2):
        raise ImageShapeError(
            f"pixel_attention_mask {mask.shape} and spatial_shapes {shapes.shape} must be "
            f"(B, N) and (B, 2) for pixel_values {patches.shape}"
        )
    grids = tuple((int(h), int(w)) for h, w in shapes)
    if any(h < 1 or w < 1 for h, w in grids):
        raise ImageShapeError(f"spatial_shapes {grids}: every side must be positive")
    expected = valid_mask(grids, patches.shape[1])
    if not np.array_equal(mask, expected):
        raise ImageShapeError(
            "pixel_attention_mask must mark each image's first Hp * Wp tokens "
            "(spatial_shapes) and nothing else"
        )
    return patches, grids


def _check_row_major(coord: np.ndarray, grid: tuple[int, int], what: str) -> None:
    h, w = grid
    rows, cols = np.divmod(np.arange(len(coord)), w)
    if len(coord) != h * w or not (
        np.array_equal(coord[:, 0], rows) and np.array_equal(coord[:, 1], cols)
    ):
        raise ImageShapeError(f"{what}: expected the {h} x {w} grid's cells in row-major order")


def _numpy(array) -> np.ndarray:
    """A NumPy view of a NumPy, JAX or PyTorch array (detached, on the host)."""
    if hasattr(array, "detach"):
        array = array.detach().cpu()
        return array.float().numpy() if str(array.dtype) == "torch.bfloat16" else array.numpy()
    return np.asarray(array)
