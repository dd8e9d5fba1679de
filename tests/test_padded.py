"""Padded batches of images of different sizes (NaFlex; `ViT.forward_patches`): each image's
logits in a padded batch are its own alone, so the NumPy reference run on each image by
itself is the oracle (float64 1e-12, both frameworks); gradients agree between the frameworks
(float64 1e-10) and never reach the padding; what the padding holds changes nothing; bad
batches are refused by name. timm's and transformers' own padded forwards are the oracles in
tests/test_naflex.py and tests/test_hf_family.py."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_family import family
from vit_config import ImageShapeError
from vit_config.patches import from_hf, from_timm, patchify
from weight_transfer import torch_to_nnx_flat
from weight_transfer.core.resample import TIMM
from weight_transfer.diagnostics import numpy_ref
from weight_transfer.diagnostics.metrics import relative_error
from weight_transfer.diagnostics.parity import nnx_grads, torch_grads
from weight_transfer.frameworks.bridge import nnx_params, to_torch
from weight_transfer.frameworks.runners import run_patches
from weight_transfer.frameworks.weights import random_nnx

# a NaFlex table each way timm resamples it, and learned tables of the image's grid (a
# dynamic image size) with prefix tokens positioned (all, or the class token alone) and
# pooled, MAP, mean and class token with mean
CASES = [
    "naflex-bicubic-antialias",
    "naflex-bilinear-square-corners",
    "mean-with-prefix",
    "map-own-heads-with-prefix",
    "positions-cls-only",
    "cls-mean",
]
GRIDS = [(2, 3), (1, 2), (3, 4), (4, 1)]  # the config's, smaller, larger, another aspect
TOKENS = 13  # the largest image's 12 patches and one token of padding


def model_pair(case: str, seed: int = 0, dtype: str = "float64"):
    """A JAX model of `case` taking any grid (float64 needs the x64 fixture), and its torch
    twin."""
    model = random_nnx(family(case), seed=seed, dtype=dtype)
    model.set_dynamic_image_size(True, TIMM)
    return model, to_torch(model)


def padded_batch(config, seed: int = 0):
    """Images at GRIDS (float64, HWC) and their padded batch (patches, grids)."""
    rng = np.random.default_rng(seed)
    p, c = config.patch_size, config.in_channels
    images = [rng.standard_normal((h * p, w * p, c)) for h, w in GRIDS]
    patches, grids = patchify(images, p, max_patches=TOKENS)
    return images, patches, grids


@pytest.mark.parametrize(  # 2.5-3.5 s each (--durations): the first quick
    "case", [CASES[0], *(pytest.param(c, marks=pytest.mark.slow) for c in CASES[1:])]
)
def test_each_image_of_a_padded_batch_is_the_numpy_reference_alone(x64, case):
    model, twin = model_pair(case, seed=1)
    images, patches, grids = padded_batch(model.config, seed=2)
    params = nnx_params(model)
    expected = np.stack(
        [
            numpy_ref.forward(params, image[None], model.config, resampling=TIMM)["logits"][0]
            for image in images
        ]
    )
    scale = max(1.0, np.abs(expected).max())
    for name, got in (
        ("jax", run_patches(model, patches, grids)),
        ("torch", run_patches(twin, patches, grids)),
    ):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12 * scale, err_msg=name)


@pytest.mark.slow  # 2.5-3 s each (--durations)
@pytest.mark.parametrize("case", CASES)
def test_padded_gradients_agree_and_never_reach_the_padding(x64, case):
    """d loss / d every parameter and d loss / d patches, JAX against torch (float64 1e-10);
    the padding's gradient is exactly zero in both."""
    model, twin = model_pair(case, seed=3)
    _, patches, grids = padded_batch(model.config, seed=4)
    labels = np.arange(len(grids)) % model.config.num_classes
    g_jax, gp_jax = nnx_grads(model, patches, labels, grids)
    g_torch, gp_torch = torch_grads(twin, patches, labels, grids)
    g_torch = torch_to_nnx_flat(g_torch, model.config)
    assert set(g_torch) == set(g_jax)
    for key in sorted(g_jax):
        if key.endswith("attn.k.bias"):  # zero but for rounding: softmax is shift-invariant
            continue
        assert np.abs(g_jax[key]).max() > 0, f"{key}: zero gradient, the test would be vacuous"
        assert relative_error(g_jax[key], g_torch[key]) <= 1e-10, key
    assert relative_error(gp_jax, gp_torch) <= 1e-10
    for i, (h, w) in enumerate(grids):
        assert np.abs(gp_jax[i, : h * w]).max() > 0
        for side, grad in (("jax", gp_jax), ("torch", gp_torch)):
            assert not grad[i, h * w :].any(), f"{side}: image {i}'s padding has a gradient"


@pytest.mark.slow  # ~2 s each
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_what_the_padding_holds_changes_nothing(framework):
    """Zeros or noise a thousand times larger in the padding: bit for bit the same logits."""
    model, twin = model_pair("naflex-bicubic-antialias", seed=5, dtype="float32")
    _, patches, grids = padded_batch(model.config, seed=6)
    patches = patches.astype(np.float32)
    noisy = patches.copy()
    for i, (h, w) in enumerate(grids):
        noisy[i, h * w :] = 1e3 * np.random.default_rng(i).standard_normal(noisy[i, h * w :].shape)
    ours = model if framework == "jax" else twin
    np.testing.assert_array_equal(
        run_patches(ours, noisy, grids), run_patches(ours, patches, grids)
    )


@pytest.mark.slow  # 2 s
def test_a_padded_batch_under_nnx_jit_is_the_eager_forward(x64):
    """The grids are Python ints, closed over: one compile per set of grids."""
    model, _ = model_pair("naflex-bilinear-square-corners", seed=7)
    _, patches, grids = padded_batch(model.config, seed=8)
    jitted = nnx.jit(lambda m, p: m.forward_patches(p, grids))
    np.testing.assert_allclose(
        np.asarray(jitted(model, jnp.asarray(patches))),
        run_patches(model, patches, grids),
        rtol=0,
        atol=1e-12,
    )


@pytest.mark.slow  # 3 s
def test_a_single_whole_image_batch_is_the_image_forward():
    """One grid, no padding: `forward_patches` is `forward` (float32, rounding apart: the
    patch embedding is a matmul instead of a convolution)."""
    model, _ = model_pair("map-own-heads-with-prefix", seed=9, dtype="float32")
    image = np.random.default_rng(10).standard_normal((1, 8, 12, 3)).astype(np.float32)
    patches, grids = patchify(list(image), model.config.patch_size)
    np.testing.assert_allclose(
        run_patches(model, patches, grids), np.asarray(model(image)), rtol=1e-5, atol=1e-5
    )


# ---- bad batches: refused by name ---------------------------------------------------------


def test_bad_padded_batches_are_refused_by_name():
    model, twin = model_pair("naflex-bicubic-antialias", seed=11, dtype="float32")
    _, patches, grids = padded_batch(model.config, seed=12)
    patches = patches.astype(np.float32)
    for bad_patches, bad_grids, match in (
        (patches[..., :-1], grids, r"patches of shape \(B, N, 48\)"),
        (patches, grids[:-1], "3 pairs for a batch of 4"),
        (patches, ((2, 3), (1, 2), (3, 5), (4, 1)), r"grids\[2\] = \(3, 5\).*13 tokens"),
        (patches, ((2, 3), (0, 2), (3, 4), (4, 1)), r"grids\[1\] = \(0, 2\)"),
        (patches, ((2, 3), "ab", (3, 4), (4, 1)), "one \\(Hp, Wp\\) pair per image"),
    ):
        for ours in (model, twin):
            with pytest.raises(ImageShapeError, match=match):
                run_patches(ours, bad_patches, bad_grids)


def test_a_model_of_one_size_takes_only_its_grid():
    model = random_nnx(family("mean-with-prefix"), seed=13)
    _, patches, grids = padded_batch(model.config, seed=14)
    with pytest.raises(ImageShapeError, match=r"grids\[1\] = \(1, 2\).*dynamic image size"):
        run_patches(model, patches.astype(np.float32), grids)


@pytest.mark.parametrize("case", ["rope-half-periods-registers", "beit-relative-bias"])
def test_rotary_and_relative_positions_are_refused_for_padded_batches(case):
    model = random_nnx(family(case), seed=15)
    model.set_dynamic_image_size(True)
    _, patches, grids = padded_batch(model.config, seed=16)
    feature = "RoPE" if "rope" in case else "relative position biases"
    with pytest.raises(ImageShapeError, match=f"not supported with {feature}"):
        run_patches(model, patches.astype(np.float32), grids)


def timm_form(patches: np.ndarray, grids) -> dict:
    """A padded batch as timm's NaFlexCollator gives it: (y, x) coordinates, a valid mask,
    zeros for the padding's coordinates."""
    coord = np.zeros((*patches.shape[:2], 2), np.int64)
    valid = np.zeros(patches.shape[:2], bool)
    for i, (h, w) in enumerate(grids):
        coord[i, : h * w] = np.stack(np.divmod(np.arange(h * w), w), -1)
        valid[i, : h * w] = True
    return dict(patches=patches, patch_coord=coord, patch_valid=valid)


def test_timm_and_hf_batches_in_another_order_are_refused():
    """Both libraries give the table's positions to tokens by their order: a batch whose
    patches are not each image's first, in row-major order, cannot be read without a guess."""
    _, patches, grids = padded_batch(family("naflex-bicubic-antialias"), seed=17)
    batch = timm_form(patches, grids)
    assert from_timm(batch)[1] == grids
    swapped = {**batch, "patch_coord": batch["patch_coord"][..., ::-1].copy()}
    with pytest.raises(ImageShapeError, match="image 0: patch_coord.*row-major"):
        from_timm(swapped)
    holes = {**batch, "patch_valid": np.roll(batch["patch_valid"], 1, axis=1)}
    with pytest.raises(ImageShapeError, match="image 0: patch_valid must be its patches first"):
        from_timm(holes)
    mask = batch["patch_valid"].astype(np.int32)
    shapes = np.array(grids)
    assert from_hf(patches, mask, shapes)[1] == grids
    with pytest.raises(ImageShapeError, match="pixel_attention_mask must mark"):
        from_hf(patches, mask, shapes[::-1])
    with pytest.raises(ImageShapeError, match=r"spatial_shapes \(4, 3\)"):
        from_hf(patches, mask, np.zeros((4, 3), np.int64))


# ---- the batch readers under hypothesis: accepted exactly when the batch is the standard form


@settings(max_examples=80, deadline=None, derandomize=True)
@given(
    data=st.data(),
    grids=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=3),
)
def test_forged_timm_and_hf_batches_are_read_or_refused_by_name(data, grids):
    """Random edits to a well-formed batch's coordinates, valid mask, spatial shapes or shapes:
    each reader returns the grids whose row-major cells the batch holds, or refuses with an
    ImageShapeError; never another exception, never other grids."""
    patches = np.zeros((len(grids), 16 + data.draw(st.integers(0, 2)), 3), np.float32)
    batch = timm_form(patches, grids)
    coord, valid = batch["patch_coord"], batch["patch_valid"]
    shapes = np.array(grids, np.int64)
    for _ in range(data.draw(st.integers(0, 3))):
        i, n = data.draw(st.integers(0, len(grids) - 1)), data.draw(st.integers(0, 15))
        what = data.draw(st.sampled_from(["coord", "valid", "shape"]))
        if what == "coord":
            coord[i, n, data.draw(st.integers(0, 1))] = data.draw(st.integers(-2, 6))
        elif what == "valid":
            valid[i, n] = not valid[i, n]
        else:
            shapes[i, data.draw(st.integers(0, 1))] = data.draw(st.integers(-1, 6))
    if data.draw(st.booleans()):
        coord = coord[..., :1] if data.draw(st.booleans()) else coord[:, :-1]  # wrong shapes
    stated = tuple((int(h), int(w)) for h, w in shapes)
    for read, args, standard in (
        (from_timm, (dict(patches=patches, patch_coord=coord, patch_valid=valid),), None),
        (from_hf, (patches, valid.astype(np.int32), shapes), stated),
    ):
        try:
            _, got = read(*args)
        except ImageShapeError:
            continue
        for i, (h, w) in enumerate(got):  # what was read is what the batch holds
            assert h >= 1 and w >= 1
            assert valid[i, : h * w].all() and not valid[i, h * w :].any()
            cells = np.stack(np.divmod(np.arange(h * w), w), -1)
            if standard is None:
                np.testing.assert_array_equal(coord[i, : h * w], cells)
        assert standard is None or got == standard
