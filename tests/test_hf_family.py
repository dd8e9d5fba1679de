"""Hugging Face folders of the family, as `save_pretrained` writes them: DINOv2 (with and
without registers, SwiGLU, the classification head), SigLIP and CLIP vision towers (alone and
inside whole image-text repos), DeiT with its distillation head. Each is built locally with
every parameter random, loaded with no hints into both frameworks, and compared with
transformers' own forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import weight_transfer as wt
from tests.conftest import assert_close
from tests.helpers.models import nchw, randomize
from weight_transfer.runners import random_images, run_nnx, run_torch

T = pytest.importorskip("transformers")

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             image_size=32, patch_size=8)


def output(model, pixels: torch.Tensor) -> torch.Tensor:
    """What the model gives for an image: logits, image embeddings, or pooled features."""
    with torch.no_grad():
        if hasattr(model, "get_image_features"):
            out = model.get_image_features(pixel_values=pixels)
            return getattr(out, "pooler_output", out)
        out = model(pixel_values=pixels)
    for name in ("logits", "image_embeds", "pooler_output"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    raise AssertionError(f"no output in {type(out).__name__}")


CASES = {
    "dinov2": lambda: T.Dinov2Model(T.Dinov2Config(**SMALL)),
    "dinov2-classifier": lambda: T.Dinov2ForImageClassification(
        T.Dinov2Config(**SMALL, num_labels=3)),
    "dinov2-swiglu": lambda: T.Dinov2Model(T.Dinov2Config(**SMALL, use_swiglu_ffn=True)),
    "dinov2-registers": lambda: T.Dinov2WithRegistersModel(
        T.Dinov2WithRegistersConfig(**SMALL, num_register_tokens=2)),
    "siglip-vision": lambda: T.SiglipVisionModel(T.SiglipVisionConfig(**SMALL)),
    "siglip-whole": lambda: T.SiglipModel(T.SiglipConfig(
        vision_config=SMALL, text_config=dict(hidden_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, intermediate_size=64))),
    "clip-vision": lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**SMALL)),
    "clip-projection": lambda: T.CLIPVisionModelWithProjection(
        T.CLIPVisionConfig(**SMALL, projection_dim=16)),
    "clip-whole": lambda: T.CLIPModel(T.CLIPConfig(
        vision_config=SMALL, projection_dim=16,
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64))),
    "deit-teacher": lambda: T.DeiTForImageClassificationWithTeacher(
        T.DeiTConfig(**SMALL, num_labels=3)),
}
LAYOUT = {"dinov2": "hf_dinov2", "siglip": "hf_siglip", "clip": "hf_clip", "deit": "hf_deit"}


@pytest.mark.parametrize("framework", ["jax", "torch"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_family_folder_matches_transformers(tmp_path, case, framework):
    model = randomize(CASES[case](), seed=len(case)).eval()
    model.save_pretrained(tmp_path / case)
    info = wt.inspect_checkpoint(tmp_path / case)
    assert info["layout"] == LAYOUT[case.split("-")[0]] and not info["assumed"], info
    if case.endswith("whole"):
        assert any("text tower" in d for d in info["dropped"])
    ours = wt.load_checkpoint(tmp_path / case, framework)
    images = random_images(ours.config, 2, seed=3)
    expected = output(model, nchw(images))
    got = run_nnx(ours, images) if framework == "jax" else run_torch(ours, images)
    assert_close(expected, np.asarray(got), "float32", f"{case} -> {framework}")
