"""The EVA-02 release (baaivision/EVA, EVA-02/asuka) as its checkpoints hold it, against timm
as the oracle: timm's own `checkpoint_filter_fn` reads the release's names (so the files here
are what timm accepts as EVA-02's), and timm's `Eva` forward computes the model. The RoPE
tables are built here as the release's `VisionRotaryEmbeddingFast` builds them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import weight_transfer as wt
from tests.conftest import assert_close
from tests.helpers.models import nchw, randomize
from vit_config import ViTConfig
from weight_transfer.frameworks.runners import random_images, run_nnx, run_torch

timm = pytest.importorskip("timm")
from timm.models.eva import checkpoint_filter_fn  # noqa: E402

BASE, TINY = "eva02_base_patch14_224", "eva02_tiny_patch14_224"


def timm_eva(arch: str, size: int = 224):
    model = timm.create_model(arch, pretrained=False, depth=2, num_classes=0, img_size=size)
    return randomize(model, seed=41).eval()


def rope_tables(head_dim: int, ft: int, pt: int = 16, theta: float = 10000.0):
    """`VisionRotaryEmbeddingFast(dim=head_dim // 2, pt_seq_len=pt, ft_seq_len=ft)`'s buffers,
    transcribed from EVA-02/asuka/rope.py (einops' repeat and broadcat written out)."""
    dim = head_dim // 2
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(ft) / ft * pt
    freqs = torch.einsum("..., f -> ... f", t, freqs).repeat_interleave(2, -1)  # (n r), r=2
    grid = torch.cat([freqs[:, None, :].expand(ft, ft, -1), freqs[None].expand(ft, ft, -1)], -1)
    return grid.cos().view(-1, grid.shape[-1]), grid.sin().view(-1, grid.shape[-1])


def release_names(model, ft: int = 16, **table) -> dict[str, torch.Tensor]:
    """A timm EVA-02's weights under the release's names (the inverse of timm's filter):
    `q_bias`/`v_bias` beside separate projections, `inner_attn_ln`, `ffn_ln`, SwiGLU `w1`,
    `w2`, `w3` (xformers' packed `w12`), and the RoPE tables."""
    sd = model.state_dict()
    separate = any(k.endswith("q_proj.weight") for k in sd)
    gated = type(model.blocks[0].mlp).__name__ in ("SwiGLU", "GluMlp")
    swaps = [("mlp.norm.", "mlp.ffn_ln."), ("attn.norm.", "attn.inner_attn_ln.")]
    swaps += [("mlp.fc1_g.", "mlp.w1."), ("mlp.fc1_x.", "mlp.w2.")]
    swaps += [("mlp.fc2.", "mlp.w3."), ("mlp.fc1.", "mlp.w12.")] if gated else []
    swaps += [("q_proj.bias", "q_bias"), ("v_proj.bias", "v_bias")] if separate else []
    out = {}
    for key, value in sd.items():
        if key.startswith("rope"):
            continue
        for timm_name, theirs in swaps:
            key = key.replace(timm_name, theirs)
        out[key] = value
    head_dim = model.embed_dim // model.blocks[0].attn.num_heads
    out["rope.freqs_cos"], out["rope.freqs_sin"] = rope_tables(head_dim, ft, **table)
    return out


def timm_reads(tensors: dict, arch: str, size: int = 224):
    model = timm.create_model(arch, pretrained=False, depth=2, num_classes=0, img_size=size)
    model.load_state_dict(checkpoint_filter_fn(dict(tensors), model), strict=True)
    return model.eval()


def save(tmp_path, tensors) -> str:
    path = tmp_path / "eva02.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def output(model, images) -> np.ndarray:
    with torch.no_grad():
        return model(nchw(images)).numpy()


@pytest.mark.parametrize(
    "arch, framework",
    [
        (BASE, "torch"),
        pytest.param(TINY, "torch", marks=pytest.mark.slow),
        pytest.param(BASE, "jax", marks=pytest.mark.slow),
    ],
)
def test_an_eva02_release_file_loads_with_its_architecture(tmp_path, arch, framework):
    """B (sub-LNs, split SwiGLU, separate q/k/v) and T (xformers' packed SwiGLU, fused qkv):
    with --arch, the heads, image size and RoPE rescale the tables say agree with timm's
    architecture, and the model is timm's on what timm's filter reads from the same file."""
    tensors = release_names(timm_eva(arch))
    oracle = timm_reads(tensors, arch)
    path = save(tmp_path, tensors)
    ours = wt.load_checkpoint(path, framework, arch=arch, overrides={"num_layers": 2})
    images = random_images(ours.config, 2, seed=42)
    got = run_nnx(ours, images) if framework == "jax" else run_torch(ours, images)
    assert_close(output(oracle, images), np.asarray(got), "float32", f"EVA-02 {arch}")


def test_a_fine_tuned_grid_reads_its_rescale_from_the_tables(tmp_path):
    """Tables built for an 8 x 8 grid against the 16 x 16 pre-training grid (EVA-02's
    `ft_seq_len`/`pt_seq_len`): the rescale is read off them, and the model is timm's at
    that size."""
    tensors = release_names(timm_eva(BASE, 112), ft=8)
    path = save(tmp_path, tensors)
    info = wt.inspect_checkpoint(path, arch=BASE, overrides={"num_layers": 2})
    config = ViTConfig.from_dict(info["config"])
    assert config.rope_ref_grid == (16, 16) and config.image_hw == (112, 112)
    ours = wt.load_checkpoint(path, "torch", arch=BASE, overrides={"num_layers": 2})
    images = random_images(ours.config, 2, seed=43)
    oracle = timm_reads(tensors, BASE, 112)
    assert_close(output(oracle, images), run_torch(ours, images), "float32", "EVA-02 at 112")


def test_written_in_the_release_names_timm_reads_it(tmp_path):
    """Back: written as the release's file (its tables built from the config), timm's filter
    reads it strict and computes the same; the tables are the release's own to float32."""
    from safetensors.torch import load_file

    tensors = release_names(timm_eva(BASE))
    ours = wt.load_checkpoint(
        save(tmp_path, tensors), "torch", arch=BASE, overrides={"num_layers": 2}
    )
    out = wt.save_checkpoint(ours, tmp_path / "back.safetensors", layout="eva02")
    written = load_file(out)
    for key in ("rope.freqs_cos", "rope.freqs_sin"):
        np.testing.assert_allclose(written[key], tensors[key], atol=2e-6)
    images = random_images(ours.config, 2, seed=44)
    assert_close(
        output(timm_reads(tensors, BASE), images),
        output(timm_reads(written, BASE), images),
        "float32",
        "written",
    )


@pytest.mark.parametrize(
    "edit, message",
    [
        (None, "--arch"),
        (
            lambda t: t.update(
                zip(
                    ("rope.freqs_cos", "rope.freqs_sin"),
                    rope_tables(64, 16, theta=100.0),
                    strict=True,
                )
            ),
            "theta 1e4",
        ),
        (lambda t: t.update({"rope.freqs_cos": torch.ones(15, 64)}), "rope.freqs_cos"),
        (lambda t: t.update({"rope.freqs_sin": torch.full((256, 64), float("nan"))}), "rope"),
        (lambda t: t.update({"rope.freqs_cos": torch.ones(256, 63)}), "rope.freqs_cos"),
    ],
    ids=["no-arch", "theta-100", "rows", "nan", "width"],
)
def test_an_eva02_release_file_is_refused_by_name(tmp_path, edit, message):
    """Without --arch (its blocks' form is not in the file), or with tables that are not
    EVA-02's (another theta, rows that are no square grid, NaN, a width dividing no head):
    refused by name, exit 2."""
    from weight_transfer.cli import main

    tensors = release_names(timm_eva(BASE))
    if edit is not None:
        edit(tensors)
    path = save(tmp_path, tensors)
    arch = [] if edit is None else ["--arch", BASE, "--set", "num_layers=2"]
    with pytest.raises(wt.errors.VitParityError, match=message):
        wt.load_checkpoint(
            path, "torch", **({} if edit is None else dict(arch=BASE, overrides={"num_layers": 2}))
        )
    assert main(["inspect", path, *arch]) == 2
