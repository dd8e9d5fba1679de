"""Hugging Face folders of the family, as `save_pretrained` writes them: DINOv2 (with and
without registers, SwiGLU, the classification head), SigLIP and CLIP vision towers (alone and
inside whole image-text repos), DeiT with its distillation head, BEiT and data2vec-vision
(relative biases), DINOv3 (RoPE), AIMv2 without its head. Each is built locally with
every parameter random, loaded with no hints into both frameworks, and compared with
transformers' own forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import weight_transfer as wt
from tests.conftest import assert_close
from tests.helpers.models import nchw, randomize
from weight_transfer.frameworks.runners import random_images, run_nnx, run_torch

T = pytest.importorskip("transformers")

SMALL = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
)

SIGLIP2 = {k: v for k, v in SMALL.items() if k != "image_size"} | {"num_patches": 16}  # 4 x 4


def output(model, pixels: torch.Tensor) -> torch.Tensor:
    """What the model gives for an image: logits, image embeddings, or pooled features."""
    if isinstance(model, (T.Siglip2VisionModel, T.Siglip2Model)):
        return siglip2_output(model, pixels)
    with torch.no_grad():
        if hasattr(model, "get_image_features"):
            out = model.get_image_features(pixel_values=pixels)
            return getattr(out, "pooler_output", out)
        out = model(pixel_values=pixels)
    for name in ("logits", "image_embeds", "pooler_output"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    if isinstance(model, T.Aimv2VisionModel):  # no head: the tokens, which timm's AIMv2 averages
        return out.last_hidden_state.mean(1)
    raise AssertionError(f"no output in {type(out).__name__}")


CASES = {
    "dinov2": lambda: T.Dinov2Model(T.Dinov2Config(**SMALL)),
    "dinov2-classifier": lambda: T.Dinov2ForImageClassification(
        T.Dinov2Config(**SMALL, num_labels=3)
    ),
    "dinov2-swiglu": lambda: T.Dinov2Model(T.Dinov2Config(**SMALL, use_swiglu_ffn=True)),
    "dinov2-registers": lambda: T.Dinov2WithRegistersModel(
        T.Dinov2WithRegistersConfig(**SMALL, num_register_tokens=2)
    ),
    "siglip-vision": lambda: T.SiglipVisionModel(T.SiglipVisionConfig(**SMALL)),
    "siglip-whole": lambda: T.SiglipModel(
        T.SiglipConfig(
            vision_config=SMALL,
            text_config=dict(
                hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
            ),
        )
    ),
    "clip-vision": lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**SMALL)),
    "clip-projection": lambda: T.CLIPVisionModelWithProjection(
        T.CLIPVisionConfig(**SMALL, projection_dim=16)
    ),
    "clip-whole": lambda: T.CLIPModel(
        T.CLIPConfig(
            vision_config=SMALL,
            projection_dim=16,
            text_config=dict(
                hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
            ),
        )
    ),
    "deit-teacher": lambda: T.DeiTForImageClassificationWithTeacher(
        T.DeiTConfig(**SMALL, num_labels=3)
    ),
    # fine-tuned without a teacher: the distillation token in the sequence, no head reads it
    "deit-classifier": lambda: T.DeiTForImageClassification(T.DeiTConfig(**SMALL, num_labels=3)),
    # relative position biases: a table per layer, or one shared; mean pooling or the class
    # token; a learned table beside them
    "beit-classifier": lambda: T.BeitForImageClassification(
        T.BeitConfig(**SMALL, use_relative_position_bias=True, num_labels=3)
    ),
    "beit-shared-cls-pool": lambda: T.BeitModel(
        T.BeitConfig(
            **SMALL,
            use_shared_relative_position_bias=True,
            use_mean_pooling=False,
            layer_scale_init_value=0.0,
        )
    ),
    "data2vec-vision": lambda: T.Data2VecVisionForImageClassification(
        T.Data2VecVisionConfig(
            **SMALL,
            use_relative_position_bias=True,
            use_absolute_position_embeddings=True,
            num_labels=3,
        )
    ),
    # RoPE computed HF's way, on a non-square grid (an axis swap would show): registers and a
    # gated MLP with the default train-time jitter (announced); no registers, a key bias,
    # bias-free output projection and MLP, no jitter
    "dinov3-registers-gated": lambda: T.DINOv3ViTModel(
        T.DINOv3ViTConfig(
            **{**SMALL, "image_size": [32, 48]},
            num_register_tokens=2,
            use_gated_mlp=True,
            hidden_act="silu",
        )
    ),
    "dinov3-plain": lambda: T.DINOv3ViTModel(
        T.DINOv3ViTConfig(
            **{**SMALL, "image_size": [40, 24]},
            key_bias=True,
            proj_bias=False,
            mlp_bias=False,
            pos_embed_rescale=None,
            rope_theta=50.0,
        )
    ),
    # AIMv2 without its attention-pooling head: RMSNorms, SwiGLU, a table for the patches
    "aimv2-vision": lambda: T.Aimv2VisionModel(
        T.Aimv2VisionConfig(**SMALL, use_head=False, qkv_bias=True, mlp_bias=True)
    ),
    # SigLIP 2: a NaFlex table (4 x 4) resized to each image's grid in the forward
    "siglip2-vision": lambda: T.Siglip2VisionModel(T.Siglip2VisionConfig(**SIGLIP2)),
}
# what a folder cannot say and is announced (HF's train-time RoPE jitter, DINOv3's default;
# the pooling after AIMv2's tokens)
ANNOUNCED = {"dinov3-registers-gated": {"rope_augmentation"}, "aimv2-vision": {"pool"}}
LAYOUT = {
    "aimv2": "hf_aimv2",
    "siglip2": "hf_siglip",
    "dinov3": "hf_dinov3",
    "dinov2": "hf_dinov2",
    "siglip": "hf_siglip",
    "clip": "hf_clip",
    "deit": "hf_deit",
    "beit": "hf_beit",
    "data2vec": "hf_beit",
}


# the JAX runs (0.5-1 s each, --durations) read the same mapped state as the torch runs, and
# both models are each other's twins (tests/test_family.py): the quick subset runs three, one
# of each kind of head (a relative-bias classifier, MAP, registers), the whole suite all
JAX_QUICK = ("beit-classifier", "siglip-vision", "dinov2-registers")


@pytest.mark.parametrize(
    "case, framework",
    [
        pytest.param(c, f, marks=pytest.mark.slow) if f == "jax" and c not in JAX_QUICK else (c, f)
        for c in sorted(CASES)
        for f in ("jax", "torch")
    ],
)
def test_hf_family_folder_matches_transformers(tmp_path, case, framework):
    model = randomize(CASES[case](), seed=len(case)).eval()
    model.save_pretrained(tmp_path / case)
    info = wt.inspect_checkpoint(tmp_path / case)
    assert info["layout"] == LAYOUT[case.split("-")[0]], info
    assert set(info["assumed"]) == ANNOUNCED.get(case, set()), info
    if case.endswith("whole"):
        assert any("text tower" in d for d in info["dropped"])
    ours = wt.load_checkpoint(tmp_path / case, framework)
    images = random_images(ours.config, 2, seed=3)
    expected = output(model, nchw(images))
    got = run_nnx(ours, images) if framework == "jax" else run_torch(ours, images)
    assert_close(expected, np.asarray(got), "float32", f"{case} -> {framework}")


WRITTEN_AS = {  # the class our folder is written for, when the published one is another
    "siglip-whole": T.SiglipVisionModel,
    "clip-whole": T.CLIPVisionModelWithProjection,
    "data2vec-vision": T.BeitForImageClassification,  # the same model, written as BEiT
}
# the original's name of a key of the class written, as both save them, where they differ
PUBLISHED = {"data2vec-vision": lambda key: key.replace("beit.", "data2vec_vision.", 1)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_written_hf_family_folder_loads_in_transformers(tmp_path, case):
    """Back the other way: ours written as that HF type's folder, loaded by transformers' own
    `from_pretrained` of the matching class (no missing or unexpected keys), computes what the
    original model computes, every weight bit-exact."""
    model = randomize(CASES[case](), seed=len(case)).eval()
    model.save_pretrained(tmp_path / "published")
    ours = wt.load_checkpoint(tmp_path / "published", "torch")
    layout = LAYOUT[case.split("-")[0]]
    folder = wt.save_checkpoint(ours, tmp_path / "ours", layout=layout)
    cls = WRITTEN_AS.get(case, type(model))
    back, info = cls.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    back.eval()
    images = random_images(ours.config, 2, seed=5)
    assert_close(
        output(model, nchw(images)),
        output(back, nchw(images)),
        "float32",
        f"{case}: transformers on our folder vs the original",
    )
    theirs, ours_back = model.state_dict(), back.state_dict()
    if case in PUBLISHED:  # in-memory names differ between the classes: compare as saved
        from safetensors.torch import load_file

        back.save_pretrained(tmp_path / "back")
        ours_back = {
            PUBLISHED[case](k): v
            for k, v in load_file(tmp_path / "back" / "model.safetensors").items()
        }
    for key, value in ours_back.items():
        if key.endswith("mask_token"):  # unused at inference: read as dropped, written as zeros
            assert not value.any(), key
            continue
        published = key if key in theirs else f"vision_model.{key}"  # whole repo: the tower
        assert torch.equal(value, theirs[published]), key


def test_a_model_the_hf_type_cannot_hold_is_refused(tmp_path):
    """A mean-pooled DINOv2 with a head: HF's Dinov2ForImageClassification pools [class,
    patch mean]; the folder would read back as another model, so nothing is written."""
    from tests.conftest import tiny
    from weight_transfer.frameworks.weights import random_torch

    config = tiny(pool="mean", class_token=True, layer_scale=True, image_size=16, d_ff=48)
    with pytest.raises(
        wt.errors.LayoutError,
        match=r"cannot hold this model: pool='mean' "
        r"\(it needs 'cls_mean'\)",
    ):
        wt.save_checkpoint(random_torch(config, seed=1), tmp_path / "d", layout="hf_dinov2")
    assert not (tmp_path / "d").exists()


def test_a_folder_that_would_read_back_differently_is_not_written(tmp_path, monkeypatch):
    """The last line of defence: every folder written is read back, in its temporary place,
    before it appears. A config.json writer that forgot a field (here the epsilon: HF ViT's
    default is 1e-12, the model's 1e-6) leaves nothing behind and names the field."""
    import dataclasses

    from tests.conftest import tiny
    from weight_transfer import layouts
    from weight_transfer.frameworks.weights import random_torch

    hf = layouts.LAYOUTS["hf"]
    forgetful = lambda c: {
        k: v for k, v in hf.write_config_json(c).items() if k != "layer_norm_eps"
    }
    monkeypatch.setitem(layouts.LAYOUTS, "hf", dataclasses.replace(hf, write_config_json=forgetful))
    with pytest.raises(wt.errors.LayoutError, match=r"ln_eps 1e-06 would read back as 1e-12"):
        wt.save_checkpoint(random_torch(tiny(), seed=2), tmp_path / "vit", layout="hf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "case, edit, message",
    [
        (
            "beit-classifier",
            lambda cfg: cfg.update(use_shared_relative_position_bias=True),
            "a shared relative bias table and one per layer",
        ),
        (
            "beit-classifier",
            lambda cfg: cfg.update(image_size=48),
            "relative_position_bias_table.*expected shape",
        ),
        ("dinov3-registers-gated", lambda cfg: cfg.update(rope_theta="100"), "rope_theta"),
        ("dinov3-registers-gated", lambda cfg: cfg.update(rope_theta=-1.0), "rope_theta"),
        (
            "dinov3-registers-gated",
            lambda cfg: cfg.update(query_bias=False),
            "query_bias=False.*value_bias=True",
        ),
        (
            "dinov3-registers-gated",
            lambda cfg: cfg.update(pos_embed_rescale="2"),
            "pos_embed_rescale",
        ),
        ("dinov3-registers-gated", lambda cfg: cfg.update(num_register_tokens=5), "reg"),
        ("aimv2-vision", lambda cfg: cfg.update(use_head=True), "use_head=true"),
        ("aimv2-vision", lambda cfg: cfg.update(is_native=True), "is_native=true"),
        ("siglip2-vision", lambda cfg: cfg.update(vision_use_head=False), "vision_use_head"),
        ("siglip2-vision", lambda cfg: cfg.update(num_patches=15), "num_patches=15"),
        ("siglip2-vision", lambda cfg: cfg.update(num_patches=1 << 40), "num_patches"),
        ("siglip2-vision", lambda cfg: cfg.update(num_patches="16"), "num_patches"),
    ],
)
def test_a_folder_that_contradicts_itself_is_refused(tmp_path, case, edit, message):
    """Forged config.json fields, refused by name, exit 2: BEiT asking for both kinds of
    relative table, or an image size its tables were not learned for (a table of the wrong
    window); DINOv3 with a RoPE base of the wrong type or sign, q and v biases unlike, a
    coordinate jitter that is not a number, registers the file lacks."""
    import json

    from weight_transfer.cli import main

    CASES[case]().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    edit(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(wt.errors.VitParityError, match=message):
        wt.load_checkpoint(tmp_path, "torch")
    assert main(["inspect", str(tmp_path)]) == 2


@pytest.mark.parametrize("framework", [pytest.param("jax", marks=pytest.mark.slow), "torch"])
@pytest.mark.parametrize("head", [False, True], ids=["model", "classifier"])
def test_vit_msn_folders_match_transformers(tmp_path, head, framework):
    """HF `vit_msn`: ViTMSNModel (its output the normed class token, read with the identity
    head) and ViTMSNForImageClassification, which transformers 5 saves with `vit.embeddings.*`
    beside an unprefixed `encoder.layer.*` (before: refused as mixed names)."""
    config = T.ViTMSNConfig(**SMALL, num_labels=3)
    model = T.ViTMSNForImageClassification(config) if head else T.ViTMSNModel(config)
    model = randomize(model, seed=7).eval()
    model.save_pretrained(tmp_path / "msn")
    ours = wt.load_checkpoint(tmp_path / "msn", framework)
    images = random_images(ours.config, 2, seed=8)
    with torch.no_grad():
        out = model(pixel_values=nchw(images))
    expected = out.logits if head else out.last_hidden_state[:, 0]
    got = run_nnx(ours, images) if framework == "jax" else run_torch(ours, images)
    assert_close(expected, np.asarray(got), "float32", f"vit_msn -> {framework}")


@pytest.mark.parametrize("pooler", [False, True], ids=["no-pooler", "tanh-pooler"])
def test_deit_model_reads_the_class_token_alone(tmp_path, pooler):
    """DeiTModel (transformers' backbone, no teacher): the distillation token stays in the
    sequence, unread; ours gives the final-norm class token (an identity head, announced as
    such, and the tanh pooler, when saved, named as dropped)."""
    model = randomize(T.DeiTModel(T.DeiTConfig(**SMALL), add_pooling_layer=pooler), seed=4).eval()
    model.save_pretrained(tmp_path / "deit")
    info = wt.inspect_checkpoint(tmp_path / "deit")
    assert info["layout"] == "hf_deit" and not info["assumed"], info
    assert any("identity" in d for d in info["dropped"])
    assert any(d.startswith("pooler.") for d in info["dropped"]) == pooler
    images = random_images(wt.load_checkpoint(tmp_path / "deit", "torch").config, 2, seed=5)
    with torch.no_grad():
        expected = model(pixel_values=nchw(images)).last_hidden_state[:, 0]
    for framework in ("jax", "torch"):
        ours = wt.load_checkpoint(tmp_path / "deit", framework)
        assert (ours.config.dist_token, ours.config.dist_head) == (True, False)
        got = run_nnx(ours, images) if framework == "jax" else run_torch(ours, images)
        assert_close(expected, np.asarray(got), "float32", f"DeiTModel -> {framework}")


def test_a_timm_dinov3_becomes_a_dinov3_folder_transformers_loads(tmp_path):
    """timm's DINOv3 (pooling its class token, as upstream and HF do) written as an HF
    DINOv3ViTModel folder: transformers loads it with no missing or unexpected key and its
    pooled output is timm's own, on a non-square grid. Two libraries' RoPE (timm divides by
    periods, HF multiplies by inverse frequencies) meet through our one config."""
    timm = pytest.importorskip("timm")
    from tests.helpers.models import from_timm
    from weight_transfer.layouts.timm import config_of_timm_model

    arch = "vit_small_patch16_dinov3"
    model = timm.create_model(
        arch, pretrained=False, depth=2, img_size=(64, 96), num_classes=0, global_pool="token"
    )
    model = randomize(model, seed=11).eval()
    config = config_of_timm_model(model, arch)
    folder = wt.save_checkpoint(
        from_timm(model.state_dict(), config, to="torch"), tmp_path / "hf", layout="hf_dinov3"
    )
    back, info = T.DINOv3ViTModel.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    images = nchw(random_images(config, 2, seed=12))
    with torch.no_grad():
        assert_close(model(images), output(back.eval(), images), "float32", "timm -> HF DINOv3")


def test_a_bare_dinov3_state_dict_is_read_with_its_rope_announced(tmp_path):
    """`model.state_dict()` of a DINOv3ViTModel saved alone (the encoder under `model.`, no
    config.json): read as HF DINOv3 with what the file cannot say (the RoPE scheme, its
    base, the epsilon, the activation) announced by name, and equal to transformers' output."""
    from safetensors.torch import save_file

    model = randomize(CASES["dinov3-plain"](), seed=13).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "d.safetensors")
    info = wt.inspect_checkpoint(tmp_path / "d.safetensors")
    assert info["layout"] == "hf_dinov3", info
    assumed = {"rope", "rope_freqs", "rope_theta", "ln_eps", "activation", "num_heads"}
    assert assumed <= set(info["assumed"]), info
    stated = {"rope_theta": 50.0, "num_heads": 2, "image_size": (40, 24)}
    ours = wt.load_checkpoint(tmp_path / "d.safetensors", "torch", overrides=stated)
    images = random_images(ours.config, 2, seed=14)
    assert_close(output(model, nchw(images)), run_torch(ours, images), "float32", "bare DINOv3")


def test_a_timm_aimv2_becomes_an_aimv2_folder_transformers_loads(tmp_path):
    """timm's AIMv2 (mean-pooled) written as an HF Aimv2VisionModel folder without its head:
    transformers loads it with no missing or unexpected key, and the mean of its tokens is
    timm's output."""
    timm = pytest.importorskip("timm")
    from tests.helpers.models import from_timm
    from weight_transfer.layouts.timm import config_of_timm_model

    arch = "aimv2_large_patch14_224"
    model = timm.create_model(arch, pretrained=False, depth=1, img_size=56, num_classes=0)
    model = randomize(model, seed=15).eval()
    config = config_of_timm_model(model, arch)
    ours = from_timm(model.state_dict(), config, to="torch")
    folder = wt.save_checkpoint(ours, tmp_path / "hf", layout="hf_aimv2")
    back, info = T.Aimv2VisionModel.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    images = nchw(random_images(config, 2, seed=16))
    with torch.no_grad():
        assert_close(model(images), output(back.eval(), images), "float32", "timm -> HF AIMv2")


def siglip2_output(model, pixels: torch.Tensor) -> torch.Tensor:
    """transformers' SigLIP 2 on whole images (NCHW): each cut into (ph, pw, C) patches as its
    image processor does, every patch valid (no padding), the image's grid as its shape."""
    b, c, h, w = pixels.shape
    p = model.config.patch_size if hasattr(model.config, "patch_size") else None
    p = p or model.config.vision_config.patch_size
    nh, nw = h // p, w // p
    patches = pixels.reshape(b, c, nh, p, nw, p).permute(0, 2, 4, 3, 5, 1).reshape(b, nh * nw, -1)
    inputs = dict(
        pixel_values=patches,
        pixel_attention_mask=torch.ones(b, nh * nw, dtype=torch.long),
        spatial_shapes=torch.tensor([[nh, nw]] * b),
    )
    with torch.no_grad():
        if hasattr(model, "get_image_features"):
            out = model.get_image_features(**inputs)
            return getattr(out, "pooler_output", out)
        return model(**inputs).pooler_output


@pytest.mark.parametrize("framework", [pytest.param("jax", marks=pytest.mark.slow), "torch"])
@pytest.mark.parametrize("whole", [False, True], ids=["vision", "whole-repo"])
def test_siglip2_folders_match_transformers_at_any_grid(tmp_path, whole, framework):
    """HF SigLIP 2 (a NaFlex table of num_patches, resized to each image's grid in the
    forward), alone or inside a whole repo, read with no hints, at grids below, at and above
    its 4 x 4 table, square or not."""
    vision = T.Siglip2VisionConfig(**SIGLIP2)
    model = (
        T.Siglip2Model(
            T.Siglip2Config(
                vision_config=vision.to_dict(),
                text_config=dict(
                    hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
                ),
            )
        )
        if whole
        else T.Siglip2VisionModel(vision)
    )
    model = randomize(model, seed=17).eval()
    model.save_pretrained(tmp_path / "siglip2")
    info = wt.inspect_checkpoint(tmp_path / "siglip2")
    assert info["layout"] == "hf_siglip" and not info["assumed"], info
    for size in ((40, 24), (16, 16), (48, 48)):
        ours = wt.load_checkpoint(tmp_path / "siglip2", framework, image_size=size)
        assert ours.config.pos_grid == (4, 4)
        images = random_images(ours.config, 2, seed=18)
        got = run_nnx(ours, images) if framework == "jax" else run_torch(ours, images)
        assert_close(output(model, nchw(images)), np.asarray(got), "float32", f"{size}")


@pytest.mark.parametrize("framework", [pytest.param("jax", marks=pytest.mark.slow), "torch"])
def test_a_siglip2_padded_batch_from_its_image_processor_matches_transformers(tmp_path, framework):
    """Images of three sizes and aspects through transformers' own Siglip2ImageProcessor
    (resized to fit max_num_patches, patchified, padded, with pixel_attention_mask and
    spatial_shapes): Siglip2VisionModel's pooled output on that batch is the oracle."""
    from vit_config.patches import from_hf
    from weight_transfer.frameworks.runners import run_patches

    model = randomize(T.Siglip2VisionModel(T.Siglip2VisionConfig(**SIGLIP2)), seed=19).eval()
    model.save_pretrained(tmp_path / "siglip2")
    processor = T.Siglip2ImageProcessor(patch_size=SIGLIP2["patch_size"], max_num_patches=24)
    rng = np.random.default_rng(20)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in PROCESSOR_IMAGES]
    inputs = processor(images=images, return_tensors="pt")
    patches, grids = from_hf(**inputs)
    assert len(set(grids)) == 3 and inputs["pixel_attention_mask"].min() == 0  # padded
    with torch.no_grad():
        expected = model(**inputs).pooler_output
    ours = wt.load_checkpoint(tmp_path / "siglip2", framework)
    got = run_patches(ours, patches, grids)
    assert_close(expected, got, "float32", f"SigLIP 2 padded batch, {framework}")


PROCESSOR_IMAGES = [(40, 100, 3), (90, 90, 3), (64, 30, 3)]  # wide, square, tall


def test_a_naflex_model_siglip2_cannot_hold_is_not_written(tmp_path):
    """A NaFlex table that is not square, or resized another way than SigLIP 2's bilinear
    antialiased resize: refused by name, nothing written."""
    from tests.conftest import tiny
    from weight_transfer.frameworks.weights import random_torch

    base = dict(pool="map", class_token=False, num_classes=0, pos_embed_tokens="none")
    for changes, field in (
        (dict(pos_grid=(2, 3), pos_interpolation="bilinear"), "square"),
        (dict(pos_grid=(3, 3), pos_interpolation="bicubic"), "pos_interpolation"),
    ):
        model = random_torch(tiny(**base, **changes), seed=1)
        with pytest.raises(wt.errors.LayoutError, match=field):
            wt.save_checkpoint(model, tmp_path / "s", layout="hf_siglip")
        assert not (tmp_path / "s").exists()


def test_a_timm_naflex_siglip2_becomes_a_siglip2_folder_transformers_loads(tmp_path):
    """timm's NaFlexVit SigLIP 2 (its table resized bilinearly with antialias in the forward)
    written as an HF Siglip2VisionModel folder: transformers loads it with no missing or
    unexpected key and its pooled output is timm's, at a non-square grid off the table's."""
    timm = pytest.importorskip("timm")
    from tests.helpers.models import from_timm
    from weight_transfer.layouts.timm import config_of_timm_model

    arch = "naflexvit_base_patch16_siglip"
    model = timm.create_model(arch, pretrained=False, depth=1, num_classes=0)
    model = randomize(model, seed=21).eval()
    config = config_of_timm_model(model, arch).replace(image_size=(64, 112))
    ours = from_timm(model.state_dict(), config, to="torch")
    folder = wt.save_checkpoint(ours, tmp_path / "hf", layout="hf_siglip")
    back, info = T.Siglip2VisionModel.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    images = random_images(config, 2, seed=22)
    with torch.no_grad():
        expected = model(nchw(images))
    assert_close(expected, output(back.eval(), nchw(images)), "float32", "timm -> HF SigLIP 2")


def test_a_bare_siglip2_state_dict_is_refused_naming_its_config_json(tmp_path):
    """A Linear patch embedding's (D, P * P * C) cannot say P from C: without config.json the
    file is refused by name, not read as a 192-pixel patch."""
    from safetensors.torch import save_file

    model = T.Siglip2VisionModel(T.Siglip2VisionConfig(**SIGLIP2))
    path = tmp_path / "siglip2.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(wt.errors.CheckpointError, match=r"Linear on flattened patches.*config"):
        wt.inspect_checkpoint(path)
