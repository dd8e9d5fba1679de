"""Any checkpoint at another resolution, as its own library resamples it: every kind of prefix
token (a class position, registers without positions, a distillation token, no class token),
square and non-square targets, up and down, through the whole load path. The oracle is each
library's own model at the new size: timm's `create_model(..., img_size=NEW)` loading the
checkpoint through `checkpoint_filter_fn`, transformers' forward with
`interpolate_pos_encoding=True`, open_clip's `resize_pos_embed`, and big_vision's
`resample_posemb` (scipy's zoom). Every parameter is random first."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import weight_transfer as wt
from tests.conftest import assert_close
from tests.helpers.models import nchw, randomize
from vit_config import PRESETS, ViTConfig, VitParityError
from weight_transfer.core.errors import AssumedConfigWarning
from weight_transfer.frameworks.runners import random_images, run_nnx, run_torch
from weight_transfer.layouts.timm import TIMM_ARCHS

timm = pytest.importorskip("timm")

OLD = 5  # the checkpoint's patch grid (5 x 5)
NEW_GRIDS = [(7, 7), (3, 3), (6, 4)]  # up, down, non-square
# BEiT's relative tables are not resized (refused: test_beit_tables_at_another_size_...)
TIMM_PRESETS = sorted(
    p
    for p in TIMM_ARCHS
    if p not in ("vit_ti16", "vit_s16", "vit_l16", "vit_h14")
    and not (PRESETS[p].get("rel_pos_bias") and PRESETS[p].get("rel_pos_form", "beit") == "beit")
)
# The quick subset keeps one of each prefix-token kind; the rest run in the whole suite
# (0.5-5 s each, --durations).
QUICK = ("vit_b16", "dinov2_b14_reg4", "vit_medium_reg4_gap")


def tiny_config(**changes) -> ViTConfig:
    """A small ViT at the checkpoint's grid (OLD x OLD patches of 4 px)."""
    base = dict(
        image_size=OLD * 4,
        patch_size=4,
        d_model=24,
        num_heads=3,
        d_ff=40,
        num_layers=2,
        num_classes=7,
    )
    return ViTConfig(**{**base, **changes})


def load_resampled(path, grid, patch, table=True, **kw):
    """Our torch model of `path` at `grid` patches; the method must be announced when there is
    a learned `table` to resample, and must not be when there is none (RoPE alone and
    relative biases computed for any grid have nothing to resample)."""
    load = lambda: wt.load_checkpoint(  # noqa: E731
        path, "torch", image_size=(grid[0] * patch, grid[1] * patch), **kw
    )
    if table:
        with pytest.warns(AssumedConfigWarning, match="resampling"):
            return load()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model = load()
    assert not [w for w in seen if "resampling" in str(w.message)], seen
    return model


def assert_same_function(expected_model, ours, grid, patch, what, call=None):
    images = random_images(ours.config, 2, seed=sum(grid))
    assert ours.config.image_hw == (grid[0] * patch, grid[1] * patch)
    with torch.no_grad():
        expected = (call or expected_model)(nchw(images))
    assert_close(expected, run_torch(ours, images), "float32", what)


@pytest.mark.parametrize(
    "preset", [p if p in QUICK else pytest.param(p, marks=pytest.mark.slow) for p in TIMM_PRESETS]
)
def test_timm_hub_folder_at_another_size_is_timms_own(tmp_path, preset):
    """timm's `create_model("local-dir:...", pretrained=True, img_size=NEW)` resamples in its
    loader (antialiased bicubic): ours, loaded at NEW, computes the same function."""
    from timm.models import save_for_hf

    patch = PRESETS[preset]["patch_size"]
    model = randomize(
        timm.create_model(TIMM_ARCHS[preset], pretrained=False, depth=2, img_size=OLD * patch),
        seed=3,
    )
    save_for_hf(model, str(tmp_path), safe_serialization=True)
    for grid in NEW_GRIDS:
        px = (grid[0] * patch, grid[1] * patch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # timm's own logging of the resample
            expected = timm.create_model(
                f"local-dir:{tmp_path}", pretrained=True, img_size=px
            ).eval()
        # a NaFlex table is not resampled at load (the model does it, by its config's method)
        table = PRESETS[preset].get("pos_embed", True) and "pos_grid" not in PRESETS[preset]
        ours = load_resampled(tmp_path, grid, patch, table)
        assert_same_function(expected, ours, grid, patch, f"{preset} at {grid}")


def test_beit_tables_at_another_size_are_refused_by_name(tmp_path):
    """BEiT's learned relative tables belong to their grid: loading at another size, or for
    any size, is refused by name (timm itself cannot load them at another size either)."""
    from timm.models import save_for_hf

    from vit_config import ArgumentError

    model = timm.create_model("beit_base_patch16_224", pretrained=False, depth=1, img_size=64)
    save_for_hf(model, str(tmp_path), safe_serialization=True)
    for options in (dict(image_size=(96, 64)), dict(dynamic_image_size=True)):
        with pytest.raises(ArgumentError, match="relative bias tables .* not implemented"):
            wt.load_checkpoint(tmp_path, "torch", **options)


FAMILY_TOKENS = {  # every prefix-token kind, in the tiny config the other tests use
    "cls": dict(),
    "registers-positioned": dict(reg_tokens=2),
    "registers-unpositioned": dict(reg_tokens=2, pos_embed_tokens="none"),
    "registers-no-cls": dict(class_token=False, pool="mean", reg_tokens=3, pos_embed_tokens="none"),
    "no-cls": dict(class_token=False, pool="mean"),
    "distilled": dict(dist_token=True),  # timm's distilled model always positions its tokens
}


@pytest.mark.parametrize("tokens", sorted(FAMILY_TOKENS))
def test_every_prefix_kind_resamples_as_timm(tmp_path, tokens):
    """Our file in the timm layout (its manifest gives the config), resampled by us, equals
    timm's model at the new size with the same file through `checkpoint_filter_fn`."""
    from safetensors.torch import load_file
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    config = tiny_config(**FAMILY_TOKENS[tokens])
    path = wt.save_checkpoint(
        wt.weights.random_torch(config, seed=4), tmp_path / "m.safetensors", layout="timm"
    )
    for grid in NEW_GRIDS:
        cls = VisionTransformerDistilled if config.dist_token else VisionTransformer
        timm_model = cls(
            img_size=(grid[0] * 4, grid[1] * 4),
            patch_size=4,
            embed_dim=24,
            depth=2,
            num_heads=3,
            mlp_ratio=40 / 24,
            num_classes=7,
            class_token=config.class_token,
            reg_tokens=config.reg_tokens,
            no_embed_class=config.pos_embed_tokens == "none",
            global_pool="token" if config.pool == "cls" else "avg",
            fc_norm=False,
        ).eval()
        timm_model.load_state_dict(checkpoint_filter_fn(load_file(path), timm_model))
        ours = load_resampled(path, grid, 4)
        assert_same_function(timm_model, ours, grid, 4, f"{tokens} at {grid}")


T = pytest.importorskip("transformers")
from tests.test_hf_family import SMALL  # noqa: E402

HF_SMALL = {**SMALL, "image_size": OLD * 8}  # test_hf_family's sizes at the checkpoint's grid
HF_CASES = {
    "vit": lambda: T.ViTForImageClassification(T.ViTConfig(**HF_SMALL, num_labels=3)),
    "deit-teacher": lambda: T.DeiTForImageClassificationWithTeacher(
        T.DeiTConfig(**HF_SMALL, num_labels=3)
    ),
    "dinov2": lambda: T.Dinov2Model(T.Dinov2Config(**HF_SMALL)),
    "dinov2-registers": lambda: T.Dinov2WithRegistersModel(
        T.Dinov2WithRegistersConfig(**HF_SMALL, num_register_tokens=2)
    ),
    "siglip-vision": lambda: T.SiglipVisionModel(T.SiglipVisionConfig(**HF_SMALL)),
    "clip-vision": lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**HF_SMALL)),
}


def hf_output(model, pixels: torch.Tensor) -> torch.Tensor:
    """The model's output at any size: its forward with interpolate_pos_encoding=True
    (DINOv2 always interpolates, and takes no such argument)."""
    kw = {} if "Dinov2" in type(model).__name__ else {"interpolate_pos_encoding": True}
    out = model(pixel_values=pixels, **kw)
    return out.logits if getattr(out, "logits", None) is not None else out.pooler_output


@pytest.mark.parametrize(
    "case",
    [
        c if c in ("vit", "dinov2-registers") else pytest.param(c, marks=pytest.mark.slow)
        for c in sorted(HF_CASES)
    ],
)
def test_hf_folder_at_another_size_is_transformers_forward(tmp_path, case):
    model = randomize(HF_CASES[case](), seed=7)
    model.save_pretrained(tmp_path)
    for grid in NEW_GRIDS:
        ours = load_resampled(tmp_path, grid, 8)
        assert_same_function(
            model, ours, grid, 8, f"{case} at {grid}", call=lambda x: hf_output(model, x)
        )


def test_open_clip_at_another_size_is_resize_pos_embed(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIP, resize_pos_embed
    from safetensors.torch import save_file

    def clip(size):
        return CLIP(
            embed_dim=16,
            vision_cfg=dict(image_size=size, layers=2, width=64, patch_size=8, head_width=32),
            text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1),
        ).eval()

    assert open_clip  # imported for its registry; CLIP built directly
    model = randomize(clip(OLD * 8), seed=8)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / "open_clip.safetensors"
    save_file(state, str(path))
    for grid in [(7, 7), (3, 3)]:  # open_clip's grid_size is square
        resized = clip(grid[0] * 8)
        moved = dict(state)
        resize_pos_embed(moved, resized)
        resized.load_state_dict(moved)
        ours = load_resampled(path, grid, 8, overrides={"num_heads": 2})
        assert_same_function(
            resized, ours, grid, 8, f"open_clip at {grid}", call=resized.encode_image
        )


def resample_posemb(old, new_grid):
    """big_vision's `resample_posemb` (models/vit.py), for a (1, N, D) table of patches."""
    import scipy.ndimage

    gs_old = int(np.sqrt(old.shape[1]))
    grid = old.reshape(gs_old, gs_old, -1)
    zoom = (new_grid[0] / gs_old, new_grid[1] / gs_old, 1)
    return scipy.ndimage.zoom(grid, zoom, order=1).reshape(1, new_grid[0] * new_grid[1], -1)


@pytest.mark.parametrize("layout", ["big_vision", "google_vit"])
def test_npz_at_another_size_is_big_visions_resample_posemb(tmp_path, layout):
    """The npz's own code resamples with scipy's zoom (order 1): the table it gives, put in
    the same weights at the new size, computes what ours loaded at that size computes."""
    tokens = dict(pos_embed_tokens="none") if layout == "big_vision" else {}
    config = tiny_config(**tokens)
    source = wt.weights.random_torch(config, seed=9)
    path = wt.save_checkpoint(source, tmp_path / "m", layout=layout)
    prefix = config.num_positioned_prefix
    for grid in [(7, 7), (3, 3)]:
        table = source.pos_embed.detach().numpy()
        expected_table = np.concatenate(
            [table[:prefix], resample_posemb(table[None, prefix:], grid)[0]]
        )
        ours = load_resampled(path, grid, 4)
        np.testing.assert_allclose(
            ours.pos_embed.detach().numpy(),
            expected_table,
            rtol=0,
            atol=1e-6 * np.abs(expected_table).max(),
        )


def test_stated_method_overrides_and_is_recorded(tmp_path):
    """interpolation=/antialias= beat the layout's own; convert records the method and the
    source library's own way in the manifest, and loading the output again uses that way."""
    import json

    from weight_transfer.formats.checkpoint import read_checkpoint

    config = tiny_config(num_layers=1)
    src = wt.save_checkpoint(
        wt.weights.random_torch(config, seed=10), tmp_path / "t", layout="timm"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # both stated: nothing assumed
        plain = wt.load_checkpoint(
            src, "torch", image_size=28, interpolation="bicubic", antialias=False
        )
    with pytest.warns(AssumedConfigWarning, match="antialiased .timm's"):
        timms = wt.load_checkpoint(src, "torch", image_size=28)
    assert np.abs(plain.pos_embed.detach().numpy() - timms.pos_embed.detach().numpy()).max() > 1e-3
    with pytest.warns(AssumedConfigWarning, match="resampling"):
        report = wt.convert(src, tmp_path / "n.safetensors", to="nnx", image_size=28)
    assert report["resampled"]["antialias"] is True and report["resampled"]["to_grid"] == [7, 7]
    manifest = json.loads(read_checkpoint(report["output"]).metadata["vit_parity"])
    assert manifest["resampled"]["from_grid"] == [5, 5]
    assert manifest["resampling"]["origin"].startswith("timm's")
    with pytest.warns(AssumedConfigWarning, match="antialiased .timm's"):  # still timm's way
        wt.load_checkpoint(report["output"], "torch", image_size=12)


def test_arch_takes_the_grid_from_the_file(tmp_path):
    """`--arch` names an architecture whose default size differs from the checkpoint's grid:
    the file's grid wins, and is reported."""
    from safetensors.torch import save_file

    model = randomize(
        timm.create_model("vit_small_patch16_224", pretrained=False, depth=2, img_size=96), seed=11
    )
    path = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    info = wt.inspect_checkpoint(path, arch="vit_small_patch16_224", overrides={"num_layers": 2})
    assert info["config"]["image_size"] == 96 and "position rows" in info["found"]["image_size"]
    ours = wt.load_checkpoint(
        path, "torch", arch="vit_small_patch16_224", overrides={"num_layers": 2}
    )
    images = random_images(ours.config, 2, seed=1)
    with torch.no_grad():
        assert_close(model.eval()(nchw(images)), run_torch(ours, images), "float32", "arch grid")


@pytest.mark.parametrize("size", [0, -16, 30, "12x", 10**9])
def test_bad_sizes_are_refused_before_memory_is_spent(tmp_path, size):
    config = tiny_config(num_layers=1)
    src = wt.save_checkpoint(
        wt.weights.random_torch(config, seed=12), tmp_path / "t", layout="timm"
    )
    with pytest.raises(VitParityError, match="image_size|image size"):
        wt.load_checkpoint(src, "torch", image_size=size)


# ---- dynamic image size -----------------------------------------------------------------------

DYNAMIC_GRIDS = [(5, 5), (7, 7), (3, 3), (6, 4), (2, 7)]  # the native one too


def quick_only(*keep, cases):
    """Parameters, all but `keep` marked slow (each 2-8 s, --durations): the quick subset
    keeps one of a kind, the whole suite runs them all."""
    return [c if c in keep else pytest.param(c, marks=pytest.mark.slow) for c in cases]


@pytest.mark.parametrize("framework", ["jax", "torch"])
@pytest.mark.parametrize(
    "preset",
    quick_only("dinov2_b14_reg4", cases=["vit_b16", "dinov2_b14_reg4", "deit3_b16", "siglip_b16"]),
)
def test_dynamic_image_size_is_timms_dynamic_img_size(tmp_path, preset, framework):
    """timm's `dynamic_img_size=True` model and ours, from the same Hub folder, at several
    sizes square and not: the same function (timm resamples with its own method, ours too)."""
    from timm.models import save_for_hf

    patch = PRESETS[preset]["patch_size"]
    model = randomize(
        timm.create_model(
            TIMM_ARCHS[preset],
            pretrained=False,
            depth=2,
            img_size=OLD * patch,
            dynamic_img_size=True,
        ),
        seed=21,
    )
    save_for_hf(model, str(tmp_path), safe_serialization=True)
    with pytest.warns(AssumedConfigWarning, match="every other grid"):
        ours = wt.load_checkpoint(tmp_path, framework, dynamic_image_size=True)
    for grid in DYNAMIC_GRIDS:
        images = (
            np.random.default_rng(sum(grid))
            .standard_normal((2, grid[0] * patch, grid[1] * patch, 3))
            .astype(np.float32)
        )
        with torch.no_grad():
            expected = model(nchw(images))
        got = run_nnx(ours, images) if framework == "jax" else run_torch(ours, images)
        assert_close(expected, np.asarray(got), "float32", f"{preset} {framework} at {grid}")


@pytest.mark.parametrize(
    "case", quick_only("dinov2-registers", cases=["vit", "dinov2-registers", "siglip-vision"])
)
def test_dynamic_image_size_is_transformers_interpolate_pos_encoding(tmp_path, case):
    model = randomize(HF_CASES[case](), seed=22)
    model.save_pretrained(tmp_path)
    with pytest.warns(AssumedConfigWarning, match="every other grid"):
        ours = wt.load_checkpoint(tmp_path, "torch", dynamic_image_size=True)
    for grid in DYNAMIC_GRIDS:
        images = (
            np.random.default_rng(sum(grid))
            .standard_normal((2, grid[0] * 8, grid[1] * 8, 3))
            .astype(np.float32)
        )
        with torch.no_grad():
            expected = hf_output(model, nchw(images))
        assert_close(expected, run_torch(ours, images), "float32", f"{case} at {grid}")


@pytest.mark.parametrize(
    "tokens",
    quick_only("registers-unpositioned", cases=["cls", "registers-unpositioned", "distilled"]),
)
def test_dynamic_float64_is_the_numpy_reference_and_gradients_flow(x64, tokens):
    """In float64 both models at a new size equal the NumPy reference given the same
    resampling (1e-12); under nnx.jit and torch autograd the gradient reaches the stored
    position table through the resampling, and the two frameworks' gradients agree."""
    import jax

    from weight_transfer.core.resample import TIMM
    from weight_transfer.diagnostics import numpy_ref
    from weight_transfer.diagnostics.parity import nnx_grads, torch_grads
    from weight_transfer.frameworks.bridge import nnx_params, to_torch
    from weight_transfer.frameworks.weights import random_nnx

    config = tiny_config(**FAMILY_TOKENS[tokens])
    model = random_nnx(config, seed=23, dtype="float64")
    model.set_dynamic_image_size(True, TIMM)
    twin = to_torch(model)
    assert twin.dynamic_image_size and twin.antialias
    for grid in [(7, 3), (3, 6)]:
        images = np.random.default_rng(sum(grid)).standard_normal((2, grid[0] * 4, grid[1] * 4, 3))
        expected = numpy_ref.forward(nnx_params(model), images, config, resampling=TIMM)
        scale = np.abs(expected["logits"]).max()
        for got in (run_nnx(model, images), run_torch(twin, images)):
            np.testing.assert_allclose(
                np.asarray(got), expected["logits"], rtol=0, atol=1e-12 * max(1.0, scale)
            )
        labels = np.arange(2) % 7
        (jg, _), (tg, _) = nnx_grads(model, images, labels), torch_grads(twin, images, labels)
        assert np.abs(jg["pos_embed"]).max() > 0
        np.testing.assert_allclose(
            jg["pos_embed"], tg["pos_embed"], rtol=0, atol=1e-10 * np.abs(jg["pos_embed"]).max()
        )
    assert jax.config.jax_enable_x64


def test_dynamic_sizes_not_a_multiple_of_the_patch_are_refused():
    from vit_config import ImageShapeError
    from weight_transfer.frameworks.weights import random_nnx

    config = tiny_config(num_layers=1)
    model = random_nnx(config, seed=24)
    model.set_dynamic_image_size(True)
    for shape in [(1, 30, 20, 3), (1, 0, 20, 3), (1, 4 * 300, 4 * 300, 3)]:
        with pytest.raises(ImageShapeError, match="multiples of the patch|patches, more than"):
            model(np.zeros(shape, np.float32))
    fixed = random_nnx(config, seed=24)
    with pytest.raises(ImageShapeError, match="config.image_size"):
        fixed(np.zeros((1, 24, 20, 3), np.float32))
