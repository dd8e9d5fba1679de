"""Layout transforms: small named pure functions on arrays, registered in inverse pairs.

Every function takes one or more arrays and returns a tuple of arrays, so fused tensors (timm's
qkv) and one-to-one tensors go through the same machinery. `Transform.forward` maps the left
column of a table to its right column, `Transform.inverse` maps back; `test_transforms.py`
proves every registered pair round-trips bit-exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Arrays = tuple[np.ndarray, ...]


@dataclass(frozen=True)
class Transform:
    name: str
    forward: Callable[..., Arrays]
    inverse: Callable[..., Arrays]
    arity: tuple[int, int] = (1, 1)  # (arrays on the left, arrays on the right)

    def reversed(self) -> Transform:
        return Transform(f"inverse of {self.name}", self.inverse, self.forward, self.arity[::-1])


def identity(x):
    return (x,)


def conv_hwio_to_oihw(k):
    return (k.transpose(3, 2, 0, 1),)  # (kH, kW, I, O) -> (O, I, kH, kW)


def conv_oihw_to_hwio(k):
    return (k.transpose(2, 3, 1, 0),)  # (O, I, kH, kW) -> (kH, kW, I, O)


def linear_in_out_to_out_in(k):
    return (k.T,)  # flax kernel (in, out) -> torch weight (out, in)


def linear_out_in_to_in_out(w):
    return (w.T,)  # torch weight (out, in) -> flax kernel (in, out)


def add_batch_axis(x):
    return (x[None],)  # (N, D) -> (1, N, D), as timm stores pos_embed and cls_token


def drop_batch_axis(x):
    if x.shape[0] != 1:
        raise ValueError(f"expected a leading axis of size 1, got shape {x.shape}")
    return (x[0],)


def conv_to_patch_linear(w):
    return (w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1),)  # (O, C, p, p) -> (O, p * p * C)


def patch_linear_to_conv(w, patch: int):
    # (O, p * p * C), each patch flattened (ph, pw, C) as timm NaFlexVit's -> (O, C, p, p)
    return (w.reshape(w.shape[0], patch, patch, -1).transpose(0, 3, 1, 2),)


def rows_to_grid(x, grid: tuple[int, int]):
    return (x.reshape(1, *grid, x.shape[-1]),)  # (Hp * Wp, D) -> (1, Hp, Wp, D)


def grid_to_rows(x):
    (x,) = drop_batch_axis(x)
    return (x.reshape(-1, x.shape[-1]),)  # (1, Hp, Wp, D) -> (Hp * Wp, D)


def fuse_rows(*parts):
    return (np.concatenate(parts, axis=0),)  # q, k, v (D, ...) each -> (3D, ...), rows q|k|v


def split_rows_in_3(fused):
    return tuple(np.split(fused, 3, axis=0))


def split_rows_in_2(fused):
    return tuple(np.split(fused, 2, axis=0))  # (2D, ...) -> 2x (D, ...): kv, or gate|x


def split_rows(fused, sizes: tuple[int, ...]):
    if fused.shape[0] != sum(sizes):  # np.split would cut anywhere
        raise ValueError(f"expected {sum(sizes)} rows to split as {sizes}, got {fused.shape[0]}")
    return tuple(np.split(fused, np.cumsum(sizes)[:-1], axis=0))  # rows of unequal parts


def split_heads_in(k, num_heads: int):
    return (k.reshape(k.shape[0], num_heads, -1),)  # (D, D) -> (D, heads, hd)


def merge_heads_in(k):
    return (k.reshape(k.shape[0], -1),)  # (D, heads, hd) -> (D, D)


def split_heads_out(k, num_heads: int):
    return (k.reshape(num_heads, -1, k.shape[-1]),)  # (D, D) -> (heads, hd, D)


def merge_heads_out(k):
    return (k.reshape(-1, k.shape[-1]),)  # (heads, hd, D) -> (D, D)


def split_bias_heads(b, num_heads: int):
    return (b.reshape(num_heads, -1),)  # (D,) -> (heads, hd)


def flatten(b):
    return (b.reshape(-1),)


def stack_layers(*per_layer):
    return (np.stack(per_layer),)  # L x (...) -> (L, ...), as nnx.scan keeps them


def unstack_layers(stacked):
    return tuple(stacked)  # (L, ...) -> L x (...)


def stack_on_axis_1(*per_layer):
    return (np.stack(per_layer, axis=1),)  # L x (2, ...) -> (2, L, ...): RoPE-ViT's freqs


def unstack_axis_1(stacked):
    return tuple(np.moveaxis(stacked, 1, 0))  # (2, L, ...) -> L x (2, ...)


def qv_into_qkv(q, v):
    # q and v biases (D,) each -> a (3D,) q|k|v bias whose k part is zeros: the original
    # DINOv3's `qkv.bias`, whose k third its `bias_mask` zeroes in the forward
    return (np.concatenate([q, np.zeros_like(q), v]),)


def qv_of_qkv(fused):
    q, _, v = np.split(fused, 3)  # the k third is masked out in the forward: not a parameter
    return q, v


IDENTITY = Transform("identity", identity, identity)
STACK = Transform("stack_layers", stack_layers, unstack_layers, arity=(-1, 1))
STACK_AXIS_1 = Transform("stack_on_axis_1", stack_on_axis_1, unstack_axis_1, arity=(-1, 1))
CONV = Transform("conv_hwio_to_oihw", conv_hwio_to_oihw, conv_oihw_to_hwio)
LINEAR = Transform("linear_in_out_to_out_in", linear_in_out_to_out_in, linear_out_in_to_in_out)
BATCH_AXIS = Transform("add_batch_axis", add_batch_axis, drop_batch_axis)
FUSE_QKV = Transform("fuse_qkv_rows", fuse_rows, split_rows_in_3, arity=(3, 1))
FUSE_2 = Transform("fuse_rows_in_2", fuse_rows, split_rows_in_2, arity=(2, 1))
# Not bit-exact from the right: the k third a mask zeroes is dropped, written back as zeros
QV_MASKED_K = Transform("qv_into_masked_qkv", qv_into_qkv, qv_of_qkv, arity=(2, 1))


def fuse_rows_of(*sizes: int) -> Transform:
    """Parts of `sizes` rows stacked into one (timm ParallelScalingBlock's in_proj: the MLP's
    first layer, then q, k, v): (sizes[i], ...) each <-> (sum(sizes), ...)."""
    split = lambda fused: split_rows(fused, sizes)
    return Transform(f"fuse_rows_{'_'.join(map(str, sizes))}", fuse_rows, split, (len(sizes), 1))


def patch_linear(patch: int) -> Transform:
    """timm NaFlexVit's patch embedding, a Linear on patches flattened (ph, pw, C):
    (O, C, p, p) <-> (O, p * p * C)."""
    return Transform(
        "conv_to_patch_linear", conv_to_patch_linear, lambda w: patch_linear_to_conv(w, patch)
    )


def grid_table(grid: tuple[int, int]) -> Transform:
    """A position table kept as its grid (timm NaFlexVit): (Hp * Wp, D) <-> (1, Hp, Wp, D)."""
    return Transform("rows_to_grid", lambda x: rows_to_grid(x, grid), grid_to_rows)


def heads_in(num_heads: int) -> Transform:
    """flax MultiHeadDotProductAttention q/k/v kernel layout: (D, D) <-> (D, heads, hd)."""
    return Transform("split_heads_in", lambda k: split_heads_in(k, num_heads), merge_heads_in)


def heads_out(num_heads: int) -> Transform:
    """flax MultiHeadDotProductAttention out kernel layout: (D, D) <-> (heads, hd, D)."""
    return Transform("split_heads_out", lambda k: split_heads_out(k, num_heads), merge_heads_out)


def bias_heads(num_heads: int) -> Transform:
    """flax MultiHeadDotProductAttention q/k/v bias layout: (D,) <-> (heads, hd)."""
    return Transform("split_bias_heads", lambda b: split_bias_heads(b, num_heads), flatten)
