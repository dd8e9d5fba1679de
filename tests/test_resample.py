"""Position-embedding resampling matches timm's `resample_abs_pos_embed`, in NumPy, JAX and torch."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from weight_transfer.resample import resample_pos_embed

timm_layers = pytest.importorskip("timm.layers")

# Relative to max |expected|. torch derives its interpolation weights in float32 with its own
# operation order (probing F.interpolate with one-hot inputs shows weights off the exact ones
# by up to ~1e-6, e.g. 24 -> 14 bilinear); ours apply exactly computed weights and round once.
# Measured worst case over this grid: 1.2e-6 (bilinear 24 -> 14); most cases are below 5e-7.
RESAMPLE_TOL = 2e-6

GRIDS = [((7, 7), (14, 14)), ((14, 14), (7, 7)), ((14, 14), (10, 12)), ((5, 9), (8, 3)),
         ((14, 14), (24, 24)), ((24, 24), (14, 14))]


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("old, new", GRIDS)
@pytest.mark.parametrize("backend", ["numpy", "jax", "torch"])
def test_matches_timm(backend, old, new, interpolation, antialias):
    pos = np.random.default_rng(sum(old + new)).standard_normal((1 + old[0] * old[1], 8))
    pos = pos.astype(np.float32)
    expected = timm_layers.resample_abs_pos_embed(
        torch.from_numpy(pos)[None], new_size=new, old_size=old, num_prefix_tokens=1,
        interpolation=interpolation, antialias=antialias)[0].numpy()
    wrap = {"numpy": np.asarray, "jax": jnp.asarray, "torch": torch.from_numpy}[backend]
    got = np.asarray(resample_pos_embed(wrap(pos), old, new, num_prefix_tokens=1,
                                        interpolation=interpolation, antialias=antialias))
    assert got.shape == expected.shape == (1 + new[0] * new[1], 8)
    np.testing.assert_array_equal(got[0], pos[0])  # the CLS row is kept
    err = np.abs(got - expected).max() / np.abs(expected).max()
    assert err <= RESAMPLE_TOL, f"relative error {err:.2e}"


def test_same_grid_is_identity():
    pos = np.random.default_rng(0).standard_normal((1 + 36, 4)).astype(np.float32)
    for mode in ("bilinear", "bicubic"):
        np.testing.assert_allclose(resample_pos_embed(pos, (6, 6), (6, 6), num_prefix_tokens=1,
                                                      interpolation=mode), pos, atol=1e-6)
