"""NaFlex (timm `NaFlexVit`): a learned table on its own grid, resampled in every forward to the
image's grid by the model's own method. Ported the whole way (timm's `save_for_hf` folder and
bare state dicts with `arch=`, random weights, no hints) and run at grids smaller, equal to and
larger than the table's, square and not, against timm's own forward (float32 1e-5), in both
frameworks; and what a file cannot say refused by name."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

timm = pytest.importorskip("timm")
pytest.importorskip("huggingface_hub")

import torch  # noqa: E402

import weight_transfer as wt  # noqa: E402
from tests.conftest import assert_close  # noqa: E402
from tests.helpers.models import nchw, randomize  # noqa: E402
from vit_config import ArgumentError  # noqa: E402
from weight_transfer.core.errors import CheckpointError, LayoutError  # noqa: E402
from weight_transfer.frameworks.runners import run_nnx, run_patches, run_torch  # noqa: E402

SMALL = dict(depth=2, embed_dim=48, num_heads=3, pos_embed_grid_size=(5, 4))
# (architecture, how it resamples): each NaFlexVit resampling timm registers
ARCHS = {
    "naflexvit_base_patch16_gap": "bicubic, antialiased; registers, mean pool, fc_norm",
    "naflexvit_base_patch16_siglip": "bilinear, antialiased; MAP head, tanh GELU",
    "naflexvit_base_patch16_par_gap": "bicubic to the longer side's square, top-left kept",
    "naflexvit_base_patch16_radio_v3": "bilinear, aligned corners, no antialias; square; cls",
    # two 1-D tables (pos_embed_y, pos_embed_x), each linear to the longer side, then summed
    "naflexvit_base_patch16_parfac_gap": "factorized, linear; the longer side's square",
}
QUICK = "naflexvit_base_patch16_gap"
GRIDS = [(5, 4), (2, 3), (7, 9), (4, 6)]  # the table's, smaller, larger, mixed


def timm_folder(tmp_path, arch: str):
    """A small random `arch` saved as timm users publish it (`save_for_hf`), and the model."""
    from timm.models import save_for_hf

    # a factorized table resampled to the longer side's square: square, as timm's own (timm
    # resamples a non-square one even at its own grid: refused)
    small = SMALL | ({"pos_embed_grid_size": (5, 5)} if "parfac" in arch else {})
    model = randomize(timm.create_model(arch, pretrained=False, **small), seed=len(arch)).eval()
    save_for_hf(model, str(tmp_path / arch), safe_serialization=True)
    return tmp_path / arch, model


def images_for(grid, seed: int = 0) -> np.ndarray:
    h, w = (16 * n for n in grid)
    return np.random.default_rng(seed).standard_normal((2, h, w, 3)).astype(np.float32)


@pytest.mark.slow  # 2-5 s each (--durations); the quick subset runs a folder's padded batch
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_a_naflex_hub_folder_matches_timm_at_every_grid(tmp_path, arch):
    folder, model = timm_folder(tmp_path, arch)
    for grid in GRIDS:
        images = images_for(grid)
        with torch.no_grad():
            expected = model(nchw(images))
        size = (16 * grid[0], 16 * grid[1])
        for framework, run in (("jax", run_nnx), ("torch", run_torch)):
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # the folder says everything: nothing assumed
                ours = wt.load_checkpoint(folder, framework, image_size=size)
            assert ours.config.pos_grid == model.embeds.pos_embed_grid_size
            assert_close(expected, run(ours, images), "float32", f"{arch} {framework} {grid}")


def timm_padded_batch(grids, seed: int = 0) -> dict:
    """Images of different sizes batched by timm's own NaFlex data path: `Patchify` per image,
    `NaFlexCollator` padding them to one length (its `patches`, `patch_coord`, `patch_valid`)."""
    from timm.data.naflex_dataset import NaFlexCollator
    from timm.data.naflex_transforms import Patchify

    rng = np.random.default_rng(seed)
    images = [
        torch.from_numpy(rng.standard_normal((3, 16 * h, 16 * w), np.float32)) for h, w in grids
    ]
    items = [(Patchify(16)(image), 0) for image in images]
    batch, _ = NaFlexCollator(max_seq_len=max(h * w for h, w in grids) + 3)(items)
    return batch


@pytest.mark.parametrize(  # 2-3 s each (--durations): one in the quick subset
    "arch",
    [a if a == QUICK else pytest.param(a, marks=pytest.mark.slow) for a in sorted(ARCHS)],
)
def test_a_padded_batch_of_mixed_sizes_matches_timm(tmp_path, arch):
    """One batch of four sizes (the table's, smaller, larger, mixed) as timm's collator pads
    it: timm's NaFlexVit forward on the dict is the oracle, in both frameworks."""
    from vit_config.patches import from_timm

    folder, model = timm_folder(tmp_path, arch)
    batch = timm_padded_batch(GRIDS, seed=3)
    with torch.no_grad():
        expected = model(batch)
    patches, grids = from_timm(batch)
    assert grids == tuple(GRIDS)
    for framework in ("jax", "torch"):
        got = run_patches(wt.load_checkpoint(folder, framework), patches, grids)
        assert_close(expected, got, "float32", f"{arch} {framework} padded")


@pytest.mark.parametrize("framework", [pytest.param("jax", marks=pytest.mark.slow), "torch"])
def test_one_naflex_model_takes_any_grid_with_a_dynamic_image_size(tmp_path, framework):
    """One loaded model at every grid: the table is the model's, resampled in its forward."""
    folder, model = timm_folder(tmp_path, "naflexvit_base_patch16_gap")
    ours = wt.load_checkpoint(folder, framework, dynamic_image_size=True)
    run = run_nnx if framework == "jax" else run_torch
    for grid in GRIDS:
        images = images_for(grid, seed=1)
        with torch.no_grad():
            expected = model(nchw(images))
        assert_close(expected, run(ours, images), "float32", f"{framework} {grid}")


@pytest.mark.slow  # 1.5 s; the RoPE zoo ports every NaFlexVit this way at its own grid
def test_a_bare_naflex_state_dict_ports_with_its_architecture(tmp_path):
    """Full width (the registry's sizes), two blocks: `arch=` says the rest, at a grid other
    than the table's and not square."""
    from safetensors.torch import save_file

    arch = "naflexvit_so150m2_patch16_reg1_map"
    model = randomize(timm.create_model(arch, pretrained=False, depth=2), seed=3).eval()
    path = tmp_path / "naflex.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    images = images_for((3, 5), seed=2)
    with torch.no_grad():
        expected = model(nchw(images))
    stated = dict(arch=arch, overrides={"num_layers": 2}, image_size=(48, 80))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = wt.load_checkpoint(path, "torch", **stated)
    assert ours.config.pos_grid == (16, 16)
    assert_close(expected, run_torch(ours, images), "float32", arch)


def test_a_bare_naflex_state_dict_without_its_architecture_is_refused(tmp_path):
    """The keys cannot say how the table is resampled (bicubic or bilinear, antialias,
    aspect): refused, naming --arch."""
    from safetensors.torch import save_file

    model = timm.create_model("naflexvit_base_patch16_gap", pretrained=False, **SMALL)
    path = tmp_path / "naflex.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(LayoutError, match=r"NaFlexVit.*name the architecture \(--arch\)"):
        wt.load_checkpoint(path, "torch")


def test_naflex_resampling_is_the_models_own_and_not_restated(tmp_path):
    folder, _ = timm_folder(tmp_path, "naflexvit_base_patch16_gap")
    with pytest.raises(ArgumentError, match=r"pos_interpolation"):
        wt.load_checkpoint(folder, "torch", image_size=64, interpolation="bilinear")


def test_a_factorized_table_is_read_as_its_sum_and_written_as_a_table_timm_resamples_alike(
    tmp_path,
):
    """NaFlexVit's factorized positions, read as the 2-D table they add (bilinear resampling
    of y[i] + x[j] is the sum of the two linear resamplings), written back as a learned
    NaFlexVit Hub folder: timm's own model of that folder computes what the factorized
    original computes, at a grid of neither's table."""
    folder, model = timm_folder(tmp_path, "naflexvit_base_patch16_parfac_gap")
    info = wt.inspect_checkpoint(folder)
    assert any("factorized positions summed" in n for n in info["notes"]), info["notes"]
    assert info["config"]["pos_interpolation"] == "bilinear" and info["config"]["pos_square"]
    ours = wt.load_checkpoint(folder, "torch")
    written = wt.save_checkpoint(ours, tmp_path / "learned", layout="timm")
    config = json.loads((written / "config.json").read_text())
    rebuilt = timm.create_model(config["architecture"], pretrained=False, **config["model_args"])
    from safetensors.torch import load_file

    rebuilt.load_state_dict(load_file(str(written / "model.safetensors")))
    assert rebuilt.embeds.pos_embed_type == "learned"
    images = images_for((7, 3), seed=4)
    with torch.no_grad():
        want, got = model(nchw(images)), rebuilt.eval()(nchw(images))
    assert_close(want.numpy(), got.numpy(), "float32", "timm learned on ours vs factorized")


def test_a_non_square_factorized_table_timm_resamples_at_its_own_grid_is_refused(tmp_path):
    from timm.models import save_for_hf

    arch = "naflexvit_base_patch16_parfac_gap"
    model = timm.create_model(arch, pretrained=False, **SMALL)  # a (5, 4) table
    save_for_hf(model, str(tmp_path / "f"), safe_serialization=True)
    with pytest.raises(LayoutError, match=r"non-square factorized table \(5, 4\)"):
        wt.load_checkpoint(tmp_path / "f", "torch")


def test_a_factorized_table_of_the_wrong_shape_is_refused_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    folder, _ = timm_folder(tmp_path, "naflexvit_base_patch16_parfac_gap")
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["embeds.pos_embed_x"] = tensors["embeds.pos_embed_x"][:, :, :-1].contiguous()
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"embeds.pos_embed_x \(1, 5, 47\)"):
        wt.load_checkpoint(folder, "torch")
    # two honest 300-row tables would sum to 90,000 rows: refused before anything is summed
    tensors["embeds.pos_embed_y"] = torch.zeros(1, 300, 48)
    tensors["embeds.pos_embed_x"] = torch.zeros(1, 300, 48)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"300 x 300 grid: more than 65,536 rows"):
        wt.load_checkpoint(folder, "torch")


def test_our_naflex_model_written_as_a_timm_hub_folder_loads_in_timm_at_another_grid(tmp_path):
    """Ours -> `--to timm` folder -> timm `create_model(local-dir:)`, run at a grid that is
    neither the table's nor the config's."""
    from vit_config import ViTConfig
    from weight_transfer.frameworks.weights import random_nnx

    config = ViTConfig.preset("naflex_b16").replace(
        num_layers=2, d_model=48, num_heads=3, d_ff=96, image_size=64, pos_grid=(5, 4)
    )
    ours = random_nnx(config, seed=5)
    folder = wt.save_checkpoint(ours, tmp_path / "hub", layout="timm")
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    back = wt.load_checkpoint(folder, "jax", image_size=(112, 48))
    images = images_for((7, 3), seed=6)
    with torch.no_grad():
        expected = model(nchw(images))
    assert_close(expected, run_nnx(back, images), "float32", "naflex timm folder at 7 x 3")


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(pos_grid=(0, 4)), "pos_grid"),
        (dict(pos_grid=(4,)), "pos_grid"),
        (dict(pos_grid=("4", 4)), "pos_grid"),
        (dict(pos_grid=(1 << 9, 1 << 9)), "more than"),
        (dict(pos_grid=(4, 4), pos_embed_tokens="all"), "patches alone"),
        (dict(pos_grid=(4, 4), pos_interpolation="nearest"), "pos_interpolation"),
        (dict(pos_grid=(4, 4), pos_align_corners=True), "aligned corners"),
        (dict(pos_grid=(4, 4), pos_square=1), "pos_square"),
    ],
)
def test_bad_naflex_fields_are_refused_by_name(fields, match):
    from vit_config import ConfigError, ViTConfig

    with pytest.raises(ConfigError, match=match):
        ViTConfig(**{"pos_embed_tokens": "none", "class_token": False, "pool": "mean", **fields})


def _edit_config_json(folder, **model_args):
    import json

    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg["model_args"].update(model_args)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "forged, match",
    [
        (dict(pos_embed_grid_size=[100000, 100000]), r"pos_grid.*more than"),
        (dict(pos_embed_grid_size=[6, 4]), r"embeds\.pos_embed"),
        (dict(pos_embed_interp_mode="area"), r"positions resampled by .*area"),
    ],
)
def test_a_forged_naflex_config_json_is_refused_with_exit_2(tmp_path, capsys, forged, match):
    """An absurd grid (built on the meta device: nothing allocated), a grid the file's table
    does not have, a resampling this ViT does not compute: one line, exit 2, file untouched."""
    from weight_transfer.cli import main

    folder, _ = timm_folder(tmp_path, "naflexvit_base_patch16_gap")
    _edit_config_json(folder, **forged)
    before = (folder / "model.safetensors").read_bytes()
    code = main(["inspect", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and __import__("re").search(match, err), err
    assert (folder / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("layout", ["big_vision", "google_vit", "hf", "hf_siglip", "open_clip"])
def test_a_naflex_model_is_not_written_where_its_library_cannot_resample_it(tmp_path, layout):
    """No library but timm (and ours; HF SigLIP 2 bilinearly with antialias only) resamples a
    table of its own grid in the forward: a NaFlex model (here bicubic) is refused by name
    before anything is written (big_vision read a plain, SigLIP-like NaFlex model back as
    itself, but its own code would compute another function at any other grid)."""
    from vit_config import ViTConfig
    from weight_transfer.frameworks.weights import random_nnx

    config = ViTConfig(
        image_size=96,
        patch_size=16,
        d_model=48,
        num_heads=3,
        d_ff=96,
        num_layers=1,
        num_classes=0,
        pool="map",
        class_token=False,
        pos_embed_tokens="none",
        pos_grid=(4, 4),
    )
    with pytest.raises(LayoutError):
        wt.save_checkpoint(random_nnx(config, seed=1), tmp_path / "out", layout=layout)
    assert not (tmp_path / "out").exists()
