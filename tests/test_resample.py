"""Position-embedding resampling matches timm's `resample_abs_pos_embed`, in NumPy, JAX and
torch."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vit_config.resample import resample_pos_embed

timm_layers = pytest.importorskip("timm.layers")

# Relative to max |expected| (timm always interpolates in float32). Our weights reproduce
# torch's float32 CPU arithmetic, fused multiply-adds included (bilinear weights bit-identical
# to torch's, bicubic within an ulp), applied exactly and rounded once; what remains is torch's
# float32 accumulation. Measured worst case over this grid and the three backends: 4.7e-7
# (bicubic antialiased 14x14 -> 10x12). Without the FMA it was 1.2e-6 (bilinear 24 -> 14).
RESAMPLE_TOL = 1e-6  # the porting issue's number

GRIDS = [
    ((7, 7), (14, 14)),
    ((14, 14), (7, 7)),
    ((14, 14), (10, 12)),
    ((5, 9), (8, 3)),
    ((14, 14), (24, 24)),
    ((24, 24), (14, 14)),
]


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("old, new", GRIDS)
@pytest.mark.parametrize("backend", ["numpy", "jax", "torch"])
def test_matches_timm(backend, old, new, interpolation, antialias):
    pos = np.random.default_rng(sum(old + new)).standard_normal((1 + old[0] * old[1], 8))
    pos = pos.astype(np.float32)
    expected = timm_layers.resample_abs_pos_embed(
        torch.from_numpy(pos)[None],
        new_size=new,
        old_size=old,
        num_prefix_tokens=1,
        interpolation=interpolation,
        antialias=antialias,
    )[0].numpy()
    wrap = {"numpy": np.asarray, "jax": jnp.asarray, "torch": torch.from_numpy}[backend]
    got = np.asarray(
        resample_pos_embed(
            wrap(pos),
            old,
            new,
            num_prefix_tokens=1,
            interpolation=interpolation,
            antialias=antialias,
        )
    )
    assert got.shape == expected.shape == (1 + new[0] * new[1], 8)
    np.testing.assert_array_equal(got[0], pos[0])  # the CLS row is kept
    err = np.abs(got - expected).max() / np.abs(expected).max()
    assert err <= RESAMPLE_TOL, f"relative error {err:.2e}"


def test_same_grid_is_identity():
    pos = np.random.default_rng(0).standard_normal((1 + 36, 4)).astype(np.float32)
    for mode in ("bilinear", "bicubic"):
        np.testing.assert_allclose(
            resample_pos_embed(pos, (6, 6), (6, 6), num_prefix_tokens=1, interpolation=mode),
            pos,
            atol=1e-6,
        )


@pytest.mark.parametrize("n_in, n_out", [(24, 14), (14, 24), (14, 10), (16, 37), (37, 16)])
def test_weights_are_torchs_own(n_in, n_out):
    """One-hot rows through F.interpolate give torch's float32 weights: ours equal them
    (bilinear) or sit within two ulps of 1.0 (bicubic: vectorised polynomial evaluation)."""
    from vit_config.resample import weights_1d

    eye = torch.eye(n_in)[:, None, None, :]  # (n_in, 1, 1, n_in): one one-hot row per input
    for mode, atol in (("bilinear", 0.0), ("bicubic", 2.4e-7)):
        for corners in (False, True):  # align_corners: the doctor's hypothesis, torch's maths
            probed = torch.nn.functional.interpolate(
                eye, size=(1, n_out), mode=mode, align_corners=corners
            )[:, 0, 0, :].T.double()
            ours = weights_1d(n_in, n_out, mode, False, align_corners=corners)
            np.testing.assert_allclose(ours, probed.numpy(), rtol=0, atol=atol, err_msg=mode)


@pytest.mark.parametrize(
    "old, new", [((37, 37), (16, 16)), ((16, 16), (37, 37)), ((14, 14), (10, 12))]
)
@pytest.mark.parametrize("variant", ["hf", "dinov2"])
@pytest.mark.parametrize("backend", ["numpy", "jax", "torch"])
def test_matches_hf_and_original_dinov2(backend, old, new, variant):
    """HF's interpolate_pos_encoding (bicubic to `size=`, no antialias) and original DINOv2's
    (bicubic by `scale_factor=(n + 0.1) / M`), against torch running each library's call."""
    import torch.nn.functional as F

    pos = np.random.default_rng(sum(old + new)).standard_normal((1 + old[0] * old[1], 8))
    pos = pos.astype(np.float32)
    grid = torch.from_numpy(pos[1:]).reshape(1, *old, 8).permute(0, 3, 1, 2)
    if variant == "hf":
        out = F.interpolate(grid, size=new, mode="bicubic", align_corners=False)
    else:
        factor = (float(new[0] + 0.1) / old[0], float(new[1] + 0.1) / old[1])
        out = F.interpolate(grid, scale_factor=factor, mode="bicubic", antialias=False)
    expected = out.permute(0, 2, 3, 1).reshape(-1, 8).numpy()
    wrap = {"numpy": np.asarray, "jax": jnp.asarray, "torch": torch.from_numpy}[backend]
    got = np.asarray(
        resample_pos_embed(
            wrap(pos),
            old,
            new,
            num_prefix_tokens=1,
            interpolation="bicubic" if variant == "hf" else "dinov2",
        )
    )[1:]
    err = np.abs(got - expected).max() / np.abs(expected).max()
    assert err <= RESAMPLE_TOL, f"relative error {err:.2e}"
    if variant == "dinov2":  # a different function from HF's: why the variant is selectable
        hf = resample_pos_embed(pos, old, new, num_prefix_tokens=1, interpolation="bicubic")[1:]
        assert np.abs(hf - got).max() > 1e-3


@pytest.mark.parametrize("a", [-0.5, -0.75])
def test_bicubic_a_is_the_keys_kernel(a):
    """`cubic_a` (the doctor's hypothesis of a port's own bicubic) is Keys' kernel with that a,
    written out here piecewise: interior rows of an exact 2x upsampling sample t = 0.25, 0.75."""
    from vit_config.resample import weights_1d

    def keys(x):
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a if x < 2 else 0.0

    m = weights_1d(6, 12, "bicubic", False, cubic_a=a)
    for row, t in ((5, 0.25), (6, 0.75)):  # source 0.5 * (i + 0.5) - 0.5 = 2.25, 2.75
        taps = [keys(t + 1), keys(t), keys(1 - t), keys(2 - t)]
        np.testing.assert_allclose(m[row, 1:5], taps, rtol=0, atol=1e-7)
