"""Every registered layout transform and its inverse round-trip bit-exactly."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import tiny
from weight_transfer.core import transforms as T
from weight_transfer.core.table import nnx_torch


def arrays(rank, shape=None):
    return st.lists(st.integers(1, 5), min_size=rank, max_size=rank).map(
        lambda s: np.random.default_rng(sum(s)).standard_normal(shape or s).astype(np.float32)
    )


PAIRS = {
    "conv": (T.CONV, 4),
    "linear": (T.LINEAR, 2),
    "batch_axis": (T.BATCH_AXIS, 2),
    "heads_in": (T.heads_in(3), None),
    "heads_out": (T.heads_out(3), None),
    "bias_heads": (T.bias_heads(3), None),
}


@pytest.mark.parametrize("name", sorted(PAIRS))
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_pair_round_trips(name, data):
    transform, rank = PAIRS[name]
    if rank is None:  # head splits need a dimension divisible by heads=3
        d = 3 * data.draw(st.integers(1, 4))
        shape = {
            "heads_in": (data.draw(st.integers(1, 5)), d),
            "heads_out": (d, 4),
            "bias_heads": (d,),
        }[name]
        x = np.random.default_rng(d).standard_normal(shape).astype(np.float32)
    else:
        x = data.draw(arrays(rank))
    (y,) = transform.forward(x)
    (back,) = transform.inverse(y)
    np.testing.assert_array_equal(back, x)
    (again,) = transform.reversed().forward(*transform.forward(x))
    np.testing.assert_array_equal(again, x)


def test_fused_qkv_round_trips_and_keeps_row_order():
    q, k, v = (np.full((4, 4), i, np.float32) + np.arange(16).reshape(4, 4) for i in range(3))
    (fused,) = T.FUSE_QKV.forward(q, k, v)
    np.testing.assert_array_equal(fused[:4], q)
    np.testing.assert_array_equal(fused[8:], v)
    for a, b in zip(T.FUSE_QKV.inverse(fused), (q, k, v), strict=True):
        np.testing.assert_array_equal(a, b)


def test_conv_moves_in_out_axes_not_a_full_reverse():
    k = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)  # (kH, kW, I, O)
    (oihw,) = T.CONV.forward(k)
    assert oihw.shape == (5, 4, 2, 3)
    assert oihw[4, 3, 1, 2] == k[1, 2, 3, 4]
    assert oihw.shape != k.T.shape  # .T would give (5, 4, 3, 2): the spatial axes swapped


def test_every_table_transform_is_a_tested_pair():
    """The NNX<->torch table uses only pairs whose round trip is tested above."""
    for r in nnx_torch(tiny(layer_scale=True, mlp="swiglu", pool="map", class_token=False)):
        assert r.transform in (T.IDENTITY, T.CONV, T.LINEAR), r


def test_masked_k_bias_keeps_q_and_v_and_drops_the_masked_third():
    """The original DINOv3's q|k|v bias whose k third its mask zeroes: q and v come back
    bit-exact, the k third is written as zeros (it never enters the forward)."""
    q, v = (np.random.default_rng(i).standard_normal(4).astype(np.float32) for i in (1, 2))
    (fused,) = T.QV_MASKED_K.forward(q, v)
    np.testing.assert_array_equal(fused, np.concatenate([q, np.zeros(4, np.float32), v]))
    junk = fused.copy()
    junk[4:8] = 7.0  # whatever the file holds there
    for a, b in zip(T.QV_MASKED_K.inverse(junk), (q, v), strict=True):
        np.testing.assert_array_equal(a, b)


def test_fused_pairs_keep_row_order():
    g, x = (np.full((3, 2), i, np.float32) for i in range(2))
    (fused,) = T.FUSE_2.forward(g, x)
    np.testing.assert_array_equal(fused[:3], g)  # gate rows first (timm GluMlp, kv: k first)
    for a, b in zip(T.FUSE_2.inverse(fused), (g, x), strict=True):
        np.testing.assert_array_equal(a, b)


def test_rows_of_unequal_parts_keep_their_order_and_sizes():
    parts = [np.full((n, 2), i, np.float32) for i, n in enumerate((5, 3, 3, 3))]
    fuse = T.fuse_rows_of(5, 3, 3, 3)  # timm's in_proj: MLP rows first, then q, k, v
    (fused,) = fuse.forward(*parts)
    np.testing.assert_array_equal(fused[:5], parts[0])
    np.testing.assert_array_equal(fused[11:], parts[3])
    for a, b in zip(fuse.inverse(fused), parts, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="expected 14 rows"):
        fuse.inverse(fused[:13])


@pytest.mark.parametrize("dtype", [np.float32, np.float64, ml_dtypes.bfloat16])
@pytest.mark.parametrize("shape", [(700, 300), (3, 5), (256, 1030)])
def test_strip_contiguous_copy_is_exact(shape, dtype):
    from weight_transfer.formats.memory import to_contiguous

    a = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    out = to_contiguous(a.T)
    assert out.flags.c_contiguous and out.dtype == dtype
    np.testing.assert_array_equal(out, a.T)
    into = np.empty(a.T.shape, dtype)
    assert to_contiguous(a.T, out=into) is into
    np.testing.assert_array_equal(into, a.T)


def test_stack_layers_round_trips():
    layers = [np.random.default_rng(i).standard_normal((4, 3)).astype(np.float32) for i in range(5)]
    (stacked,) = T.STACK.forward(*layers)
    assert stacked.shape == (5, 4, 3)
    for a, b in zip(T.STACK.inverse(stacked), layers, strict=True):
        np.testing.assert_array_equal(a, b)


def test_cls_position_fold_keeps_the_function():
    """Not bit-exact (the CLS position is added into the token), but the same sums."""
    from weight_transfer.layouts.npz import CLS_POSITION_FOLD

    rng = np.random.default_rng(0)
    cls, pos = rng.standard_normal((1, 8)), rng.standard_normal((5, 8))
    bv_cls, bv_pos = CLS_POSITION_FOLD.forward(cls, pos)
    assert bv_cls.shape == (1, 1, 8) and bv_pos.shape == (1, 4, 8)
    back_cls, back_pos = CLS_POSITION_FOLD.inverse(bv_cls, bv_pos)
    assert back_cls.shape == cls.shape and back_pos.shape == pos.shape
    np.testing.assert_allclose(back_cls[0] + back_pos[0], cls[0] + pos[0], rtol=1e-15)
    np.testing.assert_array_equal(back_pos[1:], pos[1:])
