"""2-D RoPE against timm's own `Eva` (the oracle): every pair layout, axis order and frequency
scheme on non-square grids (where a swapped axis shows), at other image sizes, and each
planted mistake shown to move the logits, so the agreement is not an accident."""

import dataclasses

import numpy as np
import pytest
import torch

import weight_transfer as wt
from tests.helpers.models import from_timm, nchw, randomize
from vit_config import ViTConfig
from weight_transfer.frameworks.runners import random_images, run_nnx, run_torch
from weight_transfer.frameworks.weights import random_nnx

timm = pytest.importorskip("timm")

from weight_transfer.layouts.timm import TIMM_ARCHS, config_of_timm_model  # noqa: E402

F32 = 1e-5  # float32 logit parity, relative to max(1, |logits|)

# (preset, what it exercises): each a timm architecture, shrunk to 2 blocks
CASES = {
    "rope_b16": "interleaved pairs, width angles first ('xy'), theta 100, no table",
    "dinov3_s16": "half-split pairs, height first, DINOv3 periods, a class token and 4 registers",
    "pe_spatial_b16": "interleaved, 'xy', offset +1, ref-grid rescale, with a learned table",
}


def timm_model(preset: str, image_size, **kw):
    c = ViTConfig.preset(preset)
    return randomize(
        timm.create_model(
            TIMM_ARCHS[preset],
            pretrained=False,
            depth=2,
            img_size=image_size,
            num_classes=c.num_classes,
            **kw,
        ),
        seed=3,
    ).eval()


def port(model, config: ViTConfig):
    """timm's weights in our torch model, through the timm layout (the file a user converts)."""
    return from_timm(model.state_dict(), config, to="torch")


def close(expected, got) -> float:
    expected, got = (np.asarray(a, np.float64) for a in (expected, got))
    return float(np.abs(expected - got).max()) / max(1.0, float(np.abs(expected).max()))


@pytest.mark.parametrize("preset", CASES)
def test_rope_is_timms_on_a_non_square_grid(preset):
    """4 x 6 patches: timm's config read back, our two models fed timm's weights, equal."""
    patch = ViTConfig.preset(preset).patch_size
    size = (4 * patch, 6 * patch)
    model = timm_model(preset, size)
    config = config_of_timm_model(model)
    assert config.grid == (4, 6) and config.rope != "none"
    ours = port(model, config)
    images = random_images(config, 2, seed=4)
    with torch.no_grad():
        expected = model(nchw(images))
    assert close(expected, run_torch(ours, images)) <= F32, CASES[preset]
    assert close(expected, run_nnx(wt.to_nnx(ours), images)) <= F32, CASES[preset]


MISTAKES = {  # what a port gets wrong, and the preset it is planted in
    "the axes swapped": ("rope_b16", dict(rope_axes="hw")),
    "interleaved pairs read as half-split": ("rope_b16", dict(rope="half")),
    "half-split pairs read as interleaved": ("dinov3_s16", dict(rope="interleaved")),
    "theta-style frequencies for DINOv3's periods": ("dinov3_s16", dict(rope_freqs="theta")),
    "the +1 offset dropped": ("pe_spatial_b16", dict(rope_offset=0.0)),
    "DINOv3's coordinates normalised by the longer side": ("dinov3_s16", dict(rope_coords="max")),
    "no RoPE at all (a plain ViT)": ("pe_spatial_b16", dict(rope="none")),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_each_rope_mistake_moves_the_logits(mistake):
    """Planted in our config, each mistake takes the port outside float32 parity by at least
    10x: the agreement above is not one the tests would give to a wrong port. (The +1 offset
    is the faintest, ~1e-3: a shift of every patch's position cancels in patch-to-patch
    attention, RoPE being relative; only the unrotated class token sees absolute angles.)"""
    preset, change = MISTAKES[mistake]
    patch = ViTConfig.preset(preset).patch_size
    model = timm_model(preset, (4 * patch, 6 * patch))
    config = config_of_timm_model(model)
    wrong = port(model, dataclasses.replace(config, **change))
    images = random_images(config, 2, seed=4)
    with torch.no_grad():
        expected = model(nchw(images))
    assert close(expected, run_torch(wrong, images)) > 10 * F32, mistake


@pytest.mark.parametrize("preset", ["dinov3_s16", pytest.param("rope_b16", marks=pytest.mark.slow)])
def test_dynamic_sizes_are_timms_dynamic_img_size(preset):
    """RoPE is recomputed for each image's grid, as timm's `dynamic_img_size=True` does."""
    patch = ViTConfig.preset(preset).patch_size
    model = timm_model(preset, (4 * patch, 4 * patch), dynamic_img_size=True)
    config = config_of_timm_model(model)
    ours = port(model, config)
    ours.set_dynamic_image_size(True)
    for grid in ((3, 5), (6, 2), (4, 4)):
        images = random_images(config.replace(image_size=(grid[0] * patch, grid[1] * patch)), 2)
        with torch.no_grad():
            expected = model(nchw(images))
        assert close(expected, run_torch(ours, images)) <= F32, grid


def test_a_file_without_a_table_and_without_its_rope_is_refused(tmp_path):
    """A bare DINOv3 state dict holds no trace of its RoPE: refused, naming the way out."""
    from safetensors.torch import save_file

    from weight_transfer.core.errors import LayoutError

    model = timm_model("dinov3_s16", (64, 64))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "d.safetensors"
    )
    with pytest.raises(LayoutError, match="no position table.*--arch"):
        wt.load_checkpoint(tmp_path / "d.safetensors", "torch")


@pytest.mark.parametrize(
    "architecture, feature",
    [
        ("vit_dpwee_patch16_reg1_gap_256", "DiffParallelScalingBlock blocks"),
    ],
)
def test_what_this_vit_cannot_compute_is_refused_by_name(architecture, feature):
    from weight_transfer.core.errors import LayoutError
    from weight_transfer.layouts.timm import config_from_timm

    with pytest.raises(LayoutError, match=feature):
        config_from_timm(architecture, {"depth": 1})


@pytest.mark.parametrize("architecture", ["vit_base_patch16_xp_224", "vit_small_patch16_18x2_224"])
def test_a_bare_parallel_block_state_dict_needs_its_architecture(tmp_path, architecture):
    """Parallel blocks' keys say the block, not its norms' or activation's details: a bare
    state dict is refused naming --arch, and loads with it."""
    import timm
    from safetensors.torch import save_file

    from weight_transfer.core.errors import LayoutError

    args = dict(depth=1, img_size=32, embed_dim=48, num_heads=2)
    model = timm.create_model(architecture, pretrained=False, **args)
    path = tmp_path / "p.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    with pytest.raises(LayoutError, match=r"parallel .*--arch"):
        wt.load_checkpoint(path, "torch")
    ours = wt.load_checkpoint(
        path,
        "torch",
        arch=architecture,
        overrides=dict(num_layers=1, image_size=32, d_model=48, num_heads=2, d_ff=192),
    )
    assert ours.config.block == ("parallel" if "xp" in architecture else "pre_norm")


def test_the_rope_angles_are_float64_where_timm_rounds_to_float32():
    """Our tables are the float64 angles rounded once; timm builds them in float32: their
    difference is float32's rounding, which is why float64 comparisons with timm stall
    near 1e-7 and ours with the NumPy reference do not."""
    from vit_config.rope import rope_angles

    model = timm_model("dinov3_s16", (64, 96))
    config = config_of_timm_model(model)
    sin, cos = model.rope.get_embed(shape=[4, 6]).chunk(2, dim=-1)  # (N, hd): half, tiled
    theirs = torch.atan2(sin, cos).double().numpy()[:, : config.head_dim // 2]
    ours = np.angle(np.exp(1j * rope_angles(config, config.grid)))  # wrapped to (-pi, pi]
    gap = np.abs(np.angle(np.exp(1j * (theirs - ours)))).max()
    assert 0 < gap < 1e-5


@pytest.mark.parametrize(
    "changes, layout, field",
    [
        (dict(rope="interleaved"), "hf", "rope"),
        (dict(rope="interleaved"), "big_vision", "rope"),
        (dict(rel_pos_bias="block", pos_embed=False), "hf", "rel_pos_bias"),
        (dict(mlp_norm=True), "open_clip", "mlp_norm"),
        (dict(block="post_norm"), "google_vit", "block"),
        (dict(block_ln_eps=1e-3), "timm", "block_ln_eps"),
        (dict(block_ln_eps=1e-3), "hf", "block_ln_eps"),
    ],
)
def test_a_layout_whose_library_cannot_compute_a_feature_refuses_it(
    tmp_path, changes, layout, field
):
    """Positions inside attention and other blocks have no tensors of their own (RoPE) or
    tensors a plain ViT class has no slot for: a writer whose library lacks them refuses by
    name before writing, rather than dropping them."""
    from tests.conftest import tiny
    from weight_transfer.core.errors import LayoutError

    model = random_nnx(tiny().replace(**changes), seed=3)
    with pytest.raises(LayoutError, match=f"{field}="):
        wt.save_checkpoint(model, tmp_path / "out", layout=layout)
    assert not (tmp_path / "out").exists()
