"""Hugging Face transformers: the tables of ViT (published v4 names and v5 in-memory names),
DeiT with its teacher, DINOv2 (with registers), DINOv3 (RoPE), BEiT and data2vec-vision,
CLIP and SigLIP vision towers; `config.json`
both ways (the fields it states, checked, never replaced by a default when present but
unknown; the config.json we write); how published key variants are normalised (ViTModel ->
ViTForImageClassification, towers of whole image-text repos); and the layouts."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vit_config import MAX_DYNAMIC_PATCHES, ViTConfig
from weight_transfer.core.errors import CheckpointError, LayoutError
from weight_transfer.core.resample import HF, HF_DINOV2_REGISTERS
from weight_transfer.core.table import Rule, rule
from weight_transfer.core.transforms import BATCH_AXIS, FUSE_2, FUSE_QKV, patch_linear
from weight_transfer.formats.checkpoint import Source
from weight_transfer.layouts.base import (
    PLAIN,
    Layout,
    Unused,
    fused,
    json_field,
    renamed,
    renaming,
    require,
)
from weight_transfer.layouts.dinov3 import FIXED as DINOV3_CLASS

# transformers' ACT2FN names -> ours; the first name of each of ours is what we write.
HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
    "quick_gelu": "quick_gelu",
    "silu": "silu",
    "swish": "silu",
}

HF_ACTIVATION_NAMES = {ours: theirs for theirs, ours in reversed(HF_ACTIVATIONS.items())}


def hf_table(config: ViTConfig, prefix: str = "vit.") -> tuple[Rule, ...]:
    block = f"{prefix}encoder.layer.{{}}"
    return (
        *renamed("patch_embed", f"{prefix}embeddings.patch_embeddings.projection"),
        rule("cls_token", f"{prefix}embeddings.cls_token", BATCH_AXIS),
        rule("pos_embed", f"{prefix}embeddings.position_embeddings", BATCH_AXIS),
        *renamed("blocks.{}.ln1", f"{block}.layernorm_before"),
        *renamed("blocks.{}.attn.q", f"{block}.attention.attention.query"),
        *renamed("blocks.{}.attn.k", f"{block}.attention.attention.key"),
        *renamed("blocks.{}.attn.v", f"{block}.attention.attention.value"),
        *renamed("blocks.{}.attn.o", f"{block}.attention.output.dense"),
        *renamed("blocks.{}.ln2", f"{block}.layernorm_after"),
        *renamed("blocks.{}.ff1", f"{block}.intermediate.dense"),
        *renamed("blocks.{}.ff2", f"{block}.output.dense"),
        *renamed("ln_f", f"{prefix}layernorm"),
        *renamed("head", "classifier"),
    )


def deit_table(config: ViTConfig) -> tuple[Rule, ...]:
    """HF DeiT: ViT's names under `deit.` and the distillation token; two classifiers
    (DeiTForImageClassificationWithTeacher) or the class token's alone
    (DeiTForImageClassification: `dist_head=False`)."""
    vit = tuple(r for r in hf_table(config, "deit.") if not r.right[0].startswith("classifier"))
    heads = (
        (*renamed("head", "cls_classifier"), *renamed("head_dist", "distillation_classifier"))
        if config.dist_head
        else renamed("head", "classifier")
    )
    return (*vit, rule("dist_token", "deit.embeddings.distillation_token", BATCH_AXIS), *heads)


def dinov2_table(config: ViTConfig) -> tuple[Rule, ...]:
    """HF Dinov2 / Dinov2WithRegisters (names as published; `dinov2.` stripped by the
    normaliser): LayerScale `lambda1`, packed SwiGLU `weights_in`, registers joining after the
    class token's position is added."""
    b = "encoder.layer.{}"
    return (
        *renamed("patch_embed", "embeddings.patch_embeddings.projection"),
        rule("cls_token", "embeddings.cls_token", BATCH_AXIS),
        rule("reg_tokens", "embeddings.register_tokens", BATCH_AXIS),
        rule("pos_embed", "embeddings.position_embeddings", BATCH_AXIS),
        *renamed("blocks.{}.ln1", f"{b}.norm1"),
        *renamed("blocks.{}.attn.q", f"{b}.attention.attention.query"),
        *renamed("blocks.{}.attn.k", f"{b}.attention.attention.key"),
        *renamed("blocks.{}.attn.v", f"{b}.attention.attention.value"),
        *renamed("blocks.{}.attn.o", f"{b}.attention.output.dense"),
        rule("blocks.{}.ls1", f"{b}.layer_scale1.lambda1"),
        *renamed("blocks.{}.ln2", f"{b}.norm2"),
        *(
            (*renamed("blocks.{}.ff1", f"{b}.mlp.fc1"), *renamed("blocks.{}.ff2", f"{b}.mlp.fc2"))
            if config.mlp == "mlp"
            # SwiGLU, packed gate first
            else (
                *fused(("blocks.{}.ff1_g", "blocks.{}.ff1_x"), f"{b}.mlp.weights_in", FUSE_2),
                *renamed("blocks.{}.ff2", f"{b}.mlp.weights_out"),
            )
        ),
        rule("blocks.{}.ls2", f"{b}.layer_scale2.lambda1"),
        *renamed("ln_f", "layernorm"),
        *renamed("head", "classifier"),
    )


def beit_table(config: ViTConfig) -> tuple[Rule, ...]:
    """HF BEiT and data2vec-vision (`beit.` / `data2vec_vision.` stripped by the normaliser):
    q and v biases with a bias-free key, a relative bias table per layer or one shared,
    LayerScale `lambda_1`/`lambda_2`, mean pooling into `pooler.layernorm` (or the class
    token after `layernorm`)."""
    b = "encoder.layer.{}"
    a = f"{b}.attention.attention"
    return (
        *renamed("patch_embed", "embeddings.patch_embeddings.projection"),
        rule("cls_token", "embeddings.cls_token", BATCH_AXIS),
        rule("pos_embed", "embeddings.position_embeddings", BATCH_AXIS),
        rule("rel_bias.table", "encoder.relative_position_bias.relative_position_bias_table"),
        *renamed("blocks.{}.ln1", f"{b}.layernorm_before"),
        *renamed("blocks.{}.attn.q", f"{a}.query"),
        *renamed("blocks.{}.attn.k", f"{a}.key"),
        *renamed("blocks.{}.attn.v", f"{a}.value"),
        rule(
            "blocks.{}.attn.rel_bias.table",
            f"{a}.relative_position_bias.relative_position_bias_table",
        ),
        *renamed("blocks.{}.attn.o", f"{b}.attention.output.dense"),
        rule("blocks.{}.ls1", f"{b}.lambda_1"),
        *renamed("blocks.{}.ln2", f"{b}.layernorm_after"),
        *renamed("blocks.{}.ff1", f"{b}.intermediate.dense"),
        *renamed("blocks.{}.ff2", f"{b}.output.dense"),
        rule("blocks.{}.ls2", f"{b}.lambda_2"),
        *renamed("ln_f", "layernorm"),
        *renamed("fc_norm", "pooler.layernorm"),
        *renamed("head", "classifier"),
    )


def dinov3_table(config: ViTConfig) -> tuple[Rule, ...]:
    """HF DINOv3ViTModel (names as `save_pretrained` writes them; a `state_dict()`'s
    `model.layer.*` brought to `layer.*` by the normaliser): separate q, k, v, o projections,
    LayerScale `lambda1`, a plain (`up_proj`, `down_proj`) or gated (`gate_proj` too) MLP;
    positions are RoPE alone, computed in the forward (no table in the file)."""
    b = "layer.{}"
    mlp = (
        (*renamed("blocks.{}.ff1", f"{b}.mlp.up_proj"),)
        if config.mlp == "mlp"
        else (
            *renamed("blocks.{}.ff1_g", f"{b}.mlp.gate_proj"),
            *renamed("blocks.{}.ff1_x", f"{b}.mlp.up_proj"),
        )
    )
    return (
        *renamed("patch_embed", "embeddings.patch_embeddings"),
        rule("cls_token", "embeddings.cls_token", BATCH_AXIS),
        rule("reg_tokens", "embeddings.register_tokens", BATCH_AXIS),
        *renamed("blocks.{}.ln1", f"{b}.norm1"),
        *(r for n in "qkvo" for r in renamed(f"blocks.{{}}.attn.{n}", f"{b}.attention.{n}_proj")),
        rule("blocks.{}.ls1", f"{b}.layer_scale1.lambda1"),
        *renamed("blocks.{}.ln2", f"{b}.norm2"),
        *mlp,
        *renamed("blocks.{}.ff2", f"{b}.mlp.down_proj"),
        rule("blocks.{}.ls2", f"{b}.layer_scale2.lambda1"),
        *renamed("ln_f", "norm"),
    )


def clip_table(config: ViTConfig) -> tuple[Rule, ...]:
    """HF CLIP vision tower (`vision_model.` stripped by the normaliser): `class_embedding`
    (D,), `pre_layrnorm` (sic), `post_layernorm` on the pooled token only (our fc_norm), a
    bias-free `visual_projection`."""
    return (
        rule("cls_token", "embeddings.class_embedding", BATCH_AXIS.reversed()),  # (1, D) <-> (D,)
        *renamed("norm_pre", "pre_layrnorm"),
        *hf_encoder_table(),
        *renamed("fc_norm", "post_layernorm"),
        *renamed("head", "visual_projection"),
    )


def siglip_table(config: ViTConfig) -> tuple[Rule, ...]:
    """HF SigLIP vision tower (`vision_model.` stripped): `post_layernorm` on every token, then
    the MAP `head` with a fused [q; k; v] `in_proj` as torch's MultiheadAttention stores it.
    SigLIP 2 (a NaFlex table, `pos_grid`): the patch embedding a Linear on (ph, pw, C)
    patches, the table its own square grid's rows."""
    encoder = hf_encoder_table()
    if config.pos_grid is not None:
        encoder = (
            rule(
                "patch_embed.weight",
                "embeddings.patch_embedding.weight",
                patch_linear(config.patch_size),
            ),
            *(r for r in encoder if r.left != ("patch_embed.weight",)),
        )
    return (
        *encoder,
        *renamed("ln_f", "post_layernorm"),
        rule("map.probe", "head.probe", BATCH_AXIS),
        *fused(
            ("map.attn.q", "map.attn.k", "map.attn.v"),
            "head.attention.in_proj",
            FUSE_QKV,
            leaves=("weight", "bias"),
            suffix=("_weight", "_bias"),
        ),
        *renamed("map.attn.o", "head.attention.out_proj"),
        *renamed("map.norm", "head.layernorm"),
        *renamed("map.ff1", "head.mlp.fc1"),
        *renamed("map.ff2", "head.mlp.fc2"),
    )


def hf_encoder_table() -> tuple[Rule, ...]:
    """The embeddings and blocks CLIP and SigLIP share in transformers."""
    b = "encoder.layers.{}"
    return (
        *renamed("patch_embed", "embeddings.patch_embedding"),
        rule("pos_embed", "embeddings.position_embedding.weight"),
        *renamed("blocks.{}.ln1", f"{b}.layer_norm1"),
        *(
            r
            for n, theirs in zip("qkvo", ("q_proj", "k_proj", "v_proj", "out_proj"), strict=True)
            for r in renamed(f"blocks.{{}}.attn.{n}", f"{b}.self_attn.{theirs}")
        ),
        *renamed("blocks.{}.ln2", f"{b}.layer_norm2"),
        *renamed("blocks.{}.ff1", f"{b}.mlp.fc1"),
        *renamed("blocks.{}.ff2", f"{b}.mlp.fc2"),
    )


def aimv2_table(config: ViTConfig) -> tuple[Rule, ...]:
    """HF Aimv2VisionModel (`vision_model.` stripped): an RMSNorm after the patch embedding,
    a learned table for the patches alone, RMSNorm blocks with q/k/v/out_proj (biases as
    `qkv_bias` says), a SwiGLU `ffn` (gate, up, down), the final `rms_norm`."""
    b = "encoder.layers.{}"
    return (
        *renamed("patch_embed", "embeddings.patch_embed"),
        rule("patch_norm.weight", "embeddings.rms_norm.weight"),
        rule("pos_embed", "embeddings.position_embedding.weight"),
        rule("blocks.{}.ln1.weight", f"{b}.rms_norm1.weight"),
        *(
            r
            for n, theirs in zip("qkvo", ("q_proj", "k_proj", "v_proj", "out_proj"), strict=True)
            for r in renamed(f"blocks.{{}}.attn.{n}", f"{b}.attention.{theirs}")
        ),
        rule("blocks.{}.ln2.weight", f"{b}.rms_norm2.weight"),
        *renamed("blocks.{}.ff1_g", f"{b}.ffn.gate_proj"),
        *renamed("blocks.{}.ff1_x", f"{b}.ffn.up_proj"),
        *renamed("blocks.{}.ff2", f"{b}.ffn.down_proj"),
        rule("ln_f.weight", "rms_norm.weight"),
    )


def hf5_table(config: ViTConfig, prefix: str = "vit.") -> tuple[Rule, ...]:
    block = f"{prefix}layers.{{}}"
    return (
        *renamed("patch_embed", f"{prefix}embeddings.patch_embeddings.projection"),
        rule("cls_token", f"{prefix}embeddings.cls_token", BATCH_AXIS),
        rule("pos_embed", f"{prefix}embeddings.position_embeddings", BATCH_AXIS),
        *renamed("blocks.{}.ln1", f"{block}.layernorm_before"),
        *renamed("blocks.{}.attn.q", f"{block}.attention.q_proj"),
        *renamed("blocks.{}.attn.k", f"{block}.attention.k_proj"),
        *renamed("blocks.{}.attn.v", f"{block}.attention.v_proj"),
        *renamed("blocks.{}.attn.o", f"{block}.attention.o_proj"),
        *renamed("blocks.{}.ln2", f"{block}.layernorm_after"),
        *renamed("blocks.{}.ff1", f"{block}.mlp.fc1"),
        *renamed("blocks.{}.ff2", f"{block}.mlp.fc2"),
        *renamed("ln_f", f"{prefix}layernorm"),
        *renamed("head", "classifier"),
    )


def hf_config_fields(hf: Mapping[str, Any], where: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The fields a Hugging Face ViT (or DeiT) `config.json` states, checked: an activation or
    size this ViT cannot run is refused by name, never replaced by a default. Returns (fields,
    what was assumed): HF states everything this reads, so nothing is assumed."""
    return _common(hf, where, "gelu", 1e-12, 224), {}


def vit_normaliser(weight: str = "weight", norm: str = "weight", model: str = "vit"):
    """ViTModel -> the ViTForImageClassification names (DeiTModel -> DeiTForImageClassification:
    `model="deit"`): add the `model` prefix; its tanh pooler is dropped; with no classifier,
    the head is set to the identity so logits are the CLS features. `weight` and `norm` are
    the leaf names of a Linear's and a LayerNorm's weight (torch: `weight`; Flax: `kernel` and
    `scale`). The normaliser returns a new `Source` (the one given is left as it is) and what
    was dropped."""

    def normalise(source: Source) -> tuple[Source, list[str]]:
        keys = list(source.meta)
        own = (f"{model}.", "pooler.", "classifier.")
        if not any(k.startswith(("embeddings.", "encoder.")) for k in keys):
            return source, []  # ViTForImageClassification names, or not HF (the table will say)
        if all(k.startswith(own) for k in keys):
            return source, []
        # ViTModel's bare names, or transformers 5's ViTMSNForImageClassification, which saves
        # `vit.embeddings.*` beside an unprefixed `encoder.layer.*`
        renamed = {(f"{model}.{k}" if not k.startswith(own) else k): k for k in keys}
        dropped = [new for new in renamed if new.startswith("pooler.")]
        for new in dropped:
            del renamed[new]
        meta = {new: source.meta[old] for new, old in renamed.items()}
        extra: dict[str, np.ndarray] = {}
        if f"classifier.{weight}" not in meta:
            d = next((m[0][-1] for k, m in meta.items() if k.endswith(f"layernorm.{norm}")), None)
            if d is None:
                raise CheckpointError(
                    f"{source.path}: no final layernorm.{norm}, so not a Hugging Face ViT in "
                    f"{'PyTorch' if norm == 'weight' else 'Flax'} names"
                )
            dtype = next(iter(meta.values()))[1]
            extra = {  # the identity is its own transpose: torch's (out, in), Flax's (in, out)
                f"classifier.{weight}": np.eye(d, dtype=dtype),
                "classifier.bias": np.zeros(d, dtype),
            }
            meta.update({k: (a.shape, a.dtype) for k, a in extra.items()})
            dropped.append(
                "(no classifier: head set to the identity; logits = final-norm CLS features)"
            )
        return source.renamed(
            meta, lambda k: extra[k] if k in extra else source.load(renamed[k])
        ), dropped

    return normalise


normalise_hf = vit_normaliser()


def _hf_json(config: ViTConfig, architecture: str, model_type: str, **fields) -> dict[str, Any]:
    """What every HF vision config.json we write says: sizes, activation, epsilon, labels."""
    h, w = config.image_hw
    labels = {
        "num_labels": config.num_classes,
        "id2label": {str(i): f"LABEL_{i}" for i in range(config.num_classes)},
        "label2id": {f"LABEL_{i}": i for i in range(config.num_classes)},
    }
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.d_ff,
        "hidden_act": HF_ACTIVATION_NAMES[config.activation],
        "layer_norm_eps": config.ln_eps,
        "image_size": h if h == w else [h, w],
        "patch_size": config.patch_size,
        "num_channels": config.in_channels,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        **(labels if config.num_classes else {}),
        **fields,
    }


def hf_config_json(config: ViTConfig) -> dict[str, Any]:
    if config.pool != "cls":
        raise LayoutError(
            "the HF ViT reads its classifier from the class token's row: a "
            "mean-pool model has no HF ViT equivalent"
        )
    require(
        config,
        "HF ViTForImageClassification",
        **PLAIN,
        class_token=True,
        final_norm="pre_pool",
        pos_embed_tokens="all",
        head_bias=True,
    )
    return _hf_json(config, "ViTForImageClassification", "vit", qkv_bias=config.qkv_bias)


def deit_config_json(config: ViTConfig) -> dict[str, Any]:
    """DeiTForImageClassificationWithTeacher (the mean of both heads), or
    DeiTForImageClassification (the class token's head alone, `dist_head=False`)."""
    architecture = (
        "DeiTForImageClassificationWithTeacher"
        if config.dist_head
        else "DeiTForImageClassification"
    )
    require(
        config,
        f"HF {architecture}",
        **{**PLAIN, "dist_token": True},
        class_token=True,
        pool="cls",
        final_norm="pre_pool",
        pos_embed_tokens="all",
        head_bias=True,
    )
    if not config.num_classes:
        raise LayoutError(
            f"HF {architecture} has a classifier: this model has none (num_classes=0)"
        )
    return _hf_json(config, architecture, "deit", qkv_bias=config.qkv_bias)


def dinov2_config_json(config: ViTConfig) -> dict[str, Any]:
    """Dinov2 / Dinov2WithRegisters, the model (pooled: the normed class token) or the
    classifier (on [class token, patch mean]). HF derives the MLP width from `mlp_ratio`; the
    ratio (an integer in transformers 5) must give exactly d_ff, for SwiGLU through its
    2/3-and-round-to-8."""
    gated = config.mlp != "mlp"
    require(
        config,
        "HF Dinov2",
        **{**PLAIN, "layer_scale": True, "reg_tokens": config.reg_tokens, "mlp": config.mlp},
        class_token=True,
        pool="cls_mean" if config.num_classes else "cls",
        final_norm="pre_pool",
        pos_embed_tokens="cls" if config.reg_tokens else "all",
        **({"activation": "silu"} if gated else {}),
    )
    width = (lambda hidden: (int(hidden * 2 / 3) + 7) // 8 * 8) if gated else (lambda h: h)
    ratio = next((r for r in range(1, 17) if width(config.d_model * r) == config.d_ff), None)
    if ratio is None:
        raise LayoutError(
            f"d_ff {config.d_ff}: HF Dinov2 derives the MLP width from an integer "
            f"mlp_ratio times hidden_size {config.d_model}, and none gives it"
        )
    registers = config.reg_tokens > 0
    model_type = "dinov2_with_registers" if registers else "dinov2"
    name = "Dinov2WithRegisters" if registers else "Dinov2"
    head = "ForImageClassification" if config.num_classes else "Model"
    return _hf_json(
        config,
        f"{name}{head}",
        model_type,
        qkv_bias=config.qkv_bias,
        mlp_ratio=ratio,
        use_swiglu_ffn=gated,
        layerscale_value=1.0,
        drop_path_rate=0.0,
        **({"num_register_tokens": config.reg_tokens} if registers else {}),
    )


# SigLIP 2's table as transformers resizes it: `F.interpolate(bilinear, align_corners=False,
# antialias=True)`'s weights, to each image's grid, in every forward
SIGLIP2_RESIZE: dict[str, Any] = dict(
    pos_interpolation="bilinear", pos_antialias=True, pos_align_corners=False, pos_square=False
)


def siglip_config_json(config: ViTConfig) -> dict[str, Any]:
    """SiglipVisionModel, or Siglip2VisionModel for a NaFlex table (a square `pos_grid`)."""
    naflex = config.pos_grid is not None
    require(
        config,
        "HF Siglip2VisionModel" if naflex else "HF SiglipVisionModel",
        **PLAIN,
        class_token=False,
        pool="map",
        final_norm="pre_pool",
        pos_embed_tokens="none" if naflex else "all",
        num_classes=0,
        **(SIGLIP2_RESIZE if naflex else {}),
    )
    grid = config.pos_grid
    if grid is None:
        return _hf_json(config, "SiglipVisionModel", "siglip_vision_model")
    side = grid[0]
    if grid != (side, side):
        raise LayoutError(
            f"HF Siglip2VisionModel keeps a square table (num_patches), not pos_grid="
            f"{config.pos_grid}"
        )
    # transformers keeps `image_size` as an attribute it does not use: any image runs, the
    # table resized to its grid in the forward; we read it back as the model's default size
    return _hf_json(config, "Siglip2VisionModel", "siglip2_vision_model", num_patches=side * side)


def clip_config_json(config: ViTConfig) -> dict[str, Any]:
    """CLIPVisionModel, or CLIPVisionModelWithProjection when there is a (projection) head."""
    require(
        config,
        "HF CLIPVisionModel",
        **{**PLAIN, "norm_pre": True, "patch_bias": False},
        class_token=True,
        pool="cls",
        final_norm="post_pool",
        pos_embed_tokens="all",
        head_bias=False,
    )
    if config.num_classes:
        return {
            **_hf_json(
                config.replace(num_classes=0), "CLIPVisionModelWithProjection", "clip_vision_model"
            ),
            "projection_dim": config.num_classes,
        }
    return _hf_json(config, "CLIPVisionModel", "clip_vision_model")


def beit_config_json(config: ViTConfig) -> dict[str, Any]:
    """BeitForImageClassification (BeitModel with no head): q and v biases, a relative bias
    table per layer or shared (or a learned table), LayerScale or not, mean pooling into
    `pooler.layernorm` or the class token after `layernorm`."""
    mean = config.pool == "mean"
    require(
        config,
        "HF BEiT",
        **{**PLAIN, "layer_scale": config.layer_scale},
        class_token=True,
        qkv_bias=True,
        k_bias=False,
        pool="mean" if mean else "cls",
        final_norm="post_pool" if mean else "pre_pool",
        pos_embed_tokens="all",
        rel_pos_form="beit",
        head_bias=True,
    )
    if config.rel_pos_bias == "none" and not config.pos_embed:
        raise LayoutError("HF BEiT cannot hold a model without positions")
    head = "BeitForImageClassification" if config.num_classes else "BeitModel"
    return _hf_json(
        config,
        head,
        "beit",
        use_mask_token=False,
        use_absolute_position_embeddings=config.pos_embed,
        use_relative_position_bias=config.rel_pos_bias == "block",
        use_shared_relative_position_bias=config.rel_pos_bias == "shared",
        layer_scale_init_value=1.0 if config.layer_scale else 0.0,
        use_mean_pooling=mean,
        drop_path_rate=0.0,
    )


def beit_config_fields(hf: Mapping[str, Any], where: Path):
    """HF `beit` / `data2vec-vision`: eps 1e-12, exact GELU, q and v biases, the relative
    tables and the pooling the config states."""
    fields = _common(hf, where, "gelu", 1e-12, 224)
    shared = json_field(hf, "use_shared_relative_position_bias", bool, where, False)
    own = json_field(hf, "use_relative_position_bias", bool, where, False)
    if shared and own:
        raise CheckpointError(
            f"{where}: config.json asks for a shared relative bias table and one per layer; "
            f"this ViT has one or the other"
        )
    mean = json_field(hf, "use_mean_pooling", bool, where, True)
    fields.update(
        k_bias=False,
        qkv_bias=True,
        class_token=True,
        rel_pos_bias="shared" if shared else "block" if own else "none",
        pool="mean" if mean else "cls",
        final_norm="post_pool" if mean else "pre_pool",
    )
    return fields, {}


# What HF DINOv3ViTModel always computes and no config.json field changes: DINOv3's class
# (its positions, LayerScale, the normed class token out), coordinates normalised per axis.
DINOV3_FIXED: dict[str, Any] = dict(DINOV3_CLASS, rope_coords="separate", rope_ref_grid=None)
# HF's train-time augmentation of the RoPE coordinates (none runs in eval())
DINOV3_AUGMENTATION = ("pos_embed_shift", "pos_embed_jitter", "pos_embed_rescale")


def dinov3_config_json(config: ViTConfig) -> dict[str, Any]:
    """DINOv3ViTModel: q and v biases alike (a key bias or not), biases or not on the output
    projection and the MLP, a plain or gated MLP, registers; no train-time coordinate
    augmentation (so `train()` computes what we do)."""
    require(
        config,
        "HF DINOv3ViTModel",
        **{
            **PLAIN,
            **DINOV3_FIXED,
            "reg_tokens": config.reg_tokens,
            "mlp": config.mlp if config.mlp == "mlp" else "swiglu",
            "proj_bias": config.proj_bias,
            "mlp_bias": config.mlp_bias,
        },
    )
    return _hf_json(
        config,
        "DINOv3ViTModel",
        "dinov3_vit",
        rope_theta=config.rope_theta,
        query_bias=config.qkv_bias,
        key_bias=config.qkv_bias and config.k_bias,
        value_bias=config.qkv_bias,
        proj_bias=config.proj_bias,
        mlp_bias=config.mlp_bias,
        use_gated_mlp=config.mlp == "swiglu",
        num_register_tokens=config.reg_tokens,
        layerscale_value=1.0,
        drop_path_rate=0.0,
        attention_dropout=0.0,
        **dict.fromkeys(DINOV3_AUGMENTATION),
    )


def dinov3_config_fields(hf: Mapping[str, Any], where: Path):
    """HF `dinov3_vit`: eps 1e-5, exact GELU (the gated MLP gates with hidden_act too), RoPE
    periods of base `rope_theta`, the biases each projection has. Its train-time coordinate
    augmentation is reported, not computed: `eval()` never applies it."""
    fields = _common(hf, where, "gelu", 1e-5, 224)
    query, key, value = (
        json_field(hf, f"{n}_bias", bool, where, default)
        for n, default in (("query", True), ("key", False), ("value", True))
    )
    if query != value or key and not query:
        raise CheckpointError(
            f"{where}: config.json has query_bias={query}, key_bias={key}, value_bias={value}; "
            f"this ViT has q and v biases alike, and a key bias only beside them"
        )
    fields.update(
        DINOV3_FIXED,
        rope_theta=json_field(hf, "rope_theta", (float, int), where, 100.0),
        qkv_bias=query,
        k_bias=key or not query,
        proj_bias=json_field(hf, "proj_bias", bool, where, True),
        mlp_bias=json_field(hf, "mlp_bias", bool, where, True),
        mlp="swiglu" if json_field(hf, "use_gated_mlp", bool, where, False) else "mlp",
        reg_tokens=json_field(hf, "num_register_tokens", int, where, 0),
    )
    defaults = {"pos_embed_rescale": 2.0}  # DINOv3ViTConfig's; shift and jitter: none
    augmented = {
        n: v
        for n in DINOV3_AUGMENTATION
        if (v := json_field(hf, n, (float, int, type(None)), where, defaults.get(n))) is not None
    }
    assumed = (
        {
            "rope_augmentation": (
                f"none ({', '.join(f'{n}={v}' for n, v in augmented.items())} is HF's "
                f"train-time jitter of the RoPE coordinates: eval() outputs are equal, "
                f"train() outputs are random and not computed here)"
            )
        }
        if augmented
        else {}
    )
    return fields, assumed


# What HF Aimv2VisionModel (without its head) computes whatever its config says, and the
# pooling we put after the tokens it returns (timm's aimv2 global_pool='avg')
AIMV2_FIXED: dict[str, Any] = dict(
    norm="rmsnorm",
    patch_norm=True,
    mlp="swiglu",
    class_token=False,
    pos_embed_tokens="all",
    final_norm="pre_pool",
    num_classes=0,
    pool="mean",
)
AIMV2_POOL = (
    "mean (of the final-normed tokens, as timm's AIMv2 pools them; HF Aimv2VisionModel "
    "without its head returns the tokens and pools nothing)"
)


def aimv2_config_json(config: ViTConfig) -> dict[str, Any]:
    """Aimv2VisionModel without its attention-pooling head (`use_head: false`): the tokens,
    which we pool by their mean."""
    require(
        config,
        "HF Aimv2VisionModel",
        **{
            **PLAIN,
            **AIMV2_FIXED,
            "proj_bias": config.qkv_bias,  # out_proj's bias is qkv_bias's
            "mlp_bias": config.mlp_bias,
        },
    )
    json = _hf_json(
        config,
        "Aimv2VisionModel",
        "aimv2_vision_model",
        rms_norm_eps=config.ln_eps,
        qkv_bias=config.qkv_bias,
        mlp_bias=config.mlp_bias,
        use_head=False,
        is_native=False,
        attention_dropout=0.0,
    )
    del json["layer_norm_eps"], json["hidden_dropout_prob"], json["attention_probs_dropout_prob"]
    return json


def aimv2_config_fields(hf: Mapping[str, Any], where: Path):
    """HF `aimv2_vision_model` (or a whole `aimv2` repo's vision_config): SiLU, RMSNorm eps
    1e-5, the biases `qkv_bias` and `mlp_bias` say. Its attention-pooling head (`use_head`,
    the default) and sinusoidal positions (`is_native`) are refused by name."""
    cfg = vision_config(hf, where)
    for name, default in (("use_head", True), ("is_native", False)):
        if json_field(cfg, name, bool, where, default):
            raise CheckpointError(
                f"{where}: config.json {name}=true: AIMv2's "
                + (
                    "attention-pooling head (a class-token query without a projection, no "
                    "norm or MLP)"
                    if name == "use_head"
                    else "sinusoidal positions computed per image (is_native)"
                )
                + ", which this ViT does not implement"
            )
    fields = _common(cfg, where, "silu", 1e-5, 224)
    fields["ln_eps"] = json_field(cfg, "rms_norm_eps", (float, int), where, 1e-5)
    bias = json_field(cfg, "qkv_bias", bool, where, False)
    fields.update(
        AIMV2_FIXED,
        qkv_bias=bias,
        proj_bias=bias,
        mlp_bias=json_field(cfg, "mlp_bias", bool, where, False),
    )
    return fields, {"pool": AIMV2_POOL}


def vision_config(hf: Mapping[str, Any], where: Path) -> Mapping[str, Any]:
    """The vision tower's config: nested in whole CLIP/SigLIP repos, the config itself
    otherwise."""
    nested = hf.get("vision_config")
    if nested is None:
        return hf
    if not isinstance(nested, dict):
        raise CheckpointError(
            f"{where}: config.json vision_config is {nested!r}; expected an object"
        )
    return nested


def _act(cfg: Mapping[str, Any], where: Path, default: str) -> str:
    act = json_field(cfg, "hidden_act", str, where, default)
    if act not in HF_ACTIVATIONS:
        raise CheckpointError(
            f"{where}: config.json hidden_act {act!r} is not supported (known: "
            f"{', '.join(sorted(HF_ACTIVATIONS))}); refusing rather than "
            f"running a different activation"
        )
    return HF_ACTIVATIONS[act]


def _common(cfg: Mapping[str, Any], where: Path, act: str, eps: float, size: int) -> dict[str, Any]:
    return dict(
        num_heads=json_field(cfg, "num_attention_heads", int, where),
        ln_eps=json_field(cfg, "layer_norm_eps", (float, int), where, eps),
        activation=_act(cfg, where, act),
        image_size=json_field(cfg, "image_size", (int, list), where, size),
    )


def dinov2_config_fields(hf: Mapping[str, Any], where: Path):
    """HF `dinov2` / `dinov2_with_registers`: eps 1e-6, exact GELU (SiLU gates a SwiGLU)."""
    fields = _common(hf, where, "gelu", 1e-6, 518)
    if json_field(hf, "use_swiglu_ffn", bool, where, False):
        fields["activation"] = "silu"
    return fields, {}


def siglip_config_fields(hf: Mapping[str, Any], where: Path):
    """HF `siglip` / `siglip_vision_model`: tanh GELU, eps 1e-6, the MAP head's output.
    `siglip2` / `siglip2_vision_model`: the same tower on a NaFlex table of `num_patches`
    (a square grid) resized to each image's grid (SIGLIP2_RESIZE); its padded batches of
    mixed sizes run through `forward_patches` (`vit_config.patches.from_hf`)."""
    cfg = vision_config(hf, where)
    model_type = json_field(
        cfg, "model_type", str, where, json_field(hf, "model_type", str, where, "")
    )
    if not model_type.startswith("siglip2"):
        return _common(cfg, where, "gelu_pytorch_tanh", 1e-6, 224), {}
    if not json_field(cfg, "vision_use_head", bool, where, True):
        raise CheckpointError(
            f"{where}: config.json vision_use_head=false: a SigLIP 2 tower without its "
            f"attention-pooling head returns tokens, which this ViT does not pool that way"
        )
    patches = json_field(cfg, "num_patches", int, where, 256)
    side = math.isqrt(patches) if patches > 0 else 0
    if side * side != patches or side * side > MAX_DYNAMIC_PATCHES:
        raise CheckpointError(
            f"{where}: config.json num_patches={patches}: transformers keeps a square table "
            f"of at most {MAX_DYNAMIC_PATCHES} positions"
        )
    patch = json_field(cfg, "patch_size", int, where, 16)
    fields = _common(cfg, where, "gelu_pytorch_tanh", 1e-6, side * patch)  # the table's size
    fields.update(
        SIGLIP2_RESIZE,
        patch_size=patch,
        in_channels=json_field(cfg, "num_channels", int, where, 3),
        pos_grid=(side, side),
        pos_embed_tokens="none",
        class_token=False,
        pool="map",
    )
    return fields, {}


def clip_config_fields(hf: Mapping[str, Any], where: Path):
    """HF `clip` / `clip_vision_model`: QuickGELU and eps 1e-5 by default."""
    cfg = vision_config(hf, where)
    return _common(cfg, where, "quick_gelu", 1e-5, 224), {}


def hf_defaults(activation: str, eps: float, what: str) -> dict[str, tuple[Any, str]]:
    """What a file without its config.json was assumed to hold: transformers' config defaults
    for `what` (a config.json, when there is one, states them)."""
    return dict(
        activation=(activation, f"{activation} ({what}'s default hidden_act; no config.json)"),
        ln_eps=(eps, f"{eps} ({what}'s default layer_norm_eps; no config.json)"),
    )


_HF: dict[str, Any] = dict(
    assumes=hf_defaults("gelu", 1e-12, "transformers ViTConfig"),
    container="folder",
    pool="cls",
    read_config_json=hf_config_fields,
    write_config_json=hf_config_json,
    normalise=normalise_hf,
    resampling=lambda c: HF,
)


def _dinov2_name(key: str, config: ViTConfig) -> str:
    """Dinov2Model's names are bare; a classifier's backbone sits under its model type."""
    if not config.num_classes or key.startswith("classifier."):
        return key
    return ("dinov2_with_registers." if config.reg_tokens else "dinov2.") + key


_MASK_TOKEN = "the mask token (unused at inference)"
# A whole image-text repo's text side (CLIP, AIMv2), left out
TEXT_TOWER = tuple(
    (prefix, "the text tower") for prefix in ("text_model.", "text_projection", "logit_scale")
)
_dinov3_renaming = renaming(
    strip=("model.",),  # a state_dict()'s encoder; save_pretrained writes `layer.*`
    drop=(("embeddings.mask_token", _MASK_TOKEN),),
)


def normalise_dinov3(source: Source) -> tuple[Source, list[str]]:
    """DINOv3ViTModel's names as saved or as `state_dict()` gives them; the unused mask token
    and an empty (1, 0, D) register tensor (a model without registers still has one) dropped."""
    source, dropped = _dinov3_renaming(source)
    registers = source.meta.get("embeddings.register_tokens")
    if registers is not None and 0 in registers[0]:
        source = source.named({k: k for k in source.meta if k != "embeddings.register_tokens"})
        dropped = [*dropped, "embeddings.register_tokens: empty (no registers)"]
    return source, dropped


def _dinov3_unused(config: ViTConfig) -> Unused:
    """The mask token, and the empty register tensor of a model without registers."""
    empty: Unused = (
        {} if config.reg_tokens else {"embeddings.register_tokens": (1, 0, config.d_model)}
    )
    return {"embeddings.mask_token": (1, 1, config.d_model), **empty}


def hook_points(m) -> list[tuple[Any, str, str]]:
    """Where the layer diff reads an HF `ViTForImageClassification` (v4 or v5 names)."""
    vit = m.vit
    layers = getattr(vit, "layers", None) or vit.encoder.layer
    points = [
        (vit.embeddings.patch_embeddings, "patch_embed", "out"),
        (vit.embeddings, "tokens", "out"),
    ]
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        points.append((layer.attention, f"blocks.{i}.attn", "out"))
        if mlp is not None:  # transformers 5; in v4 the MLP's residual is inside ViTOutput
            points.append((mlp, f"blocks.{i}.mlp", "out"))
        points.append((layer, f"blocks.{i}", "out"))
    return points + [(vit.layernorm, "ln_f", "out"), (m.classifier, "pooled", "in")]


def diff_points(model):
    """("transformers CLASS", `hook_points`) for an HF ViT; None for anyone else's."""
    if type(model).__module__.split(".")[0] != "transformers" or not hasattr(model, "vit"):
        return None
    return f"transformers {type(model).__name__}", hook_points


LAYOUTS = (
    Layout(
        "hf",
        "torch",
        hf_table,
        r"^(vit\.)?encoder\.layer\.\d+\.|^(vit\.)?embeddings\.patch_embeddings",
        "Hugging Face transformers ViT (checkpoint names)",
        **_HF,
    ),
    Layout(
        "hf5",
        "torch",
        hf5_table,
        r"^(vit\.)?layers\.\d+\.attention\.q_proj",
        "Hugging Face transformers 5 ViT (in-memory names)",
        writable=False,
        priority=1,
        **_HF,
    ),
    Layout(
        "hf_deit",
        "torch",
        deit_table,
        r"^(deit\.)?embeddings\.distillation_token$",
        "Hugging Face DeiT (with its teacher's head or without; DeiTModel)",
        container="folder",
        assumes=hf_defaults("gelu", 1e-12, "transformers DeiTConfig"),
        priority=2,
        read_config_json=hf_config_fields,
        write_config_json=deit_config_json,
        normalise=vit_normaliser(model="deit"),
        pool="cls",
        resampling=lambda c: HF,
    ),
    Layout(
        "hf_dinov2",
        "torch",
        dinov2_table,
        r"(^|\.)embeddings\.mask_token$|(^|\.)layer_scale1\.lambda1$",
        "Hugging Face Dinov2 / Dinov2WithRegisters (model, or image classification)",
        container="folder",
        assumes=hf_defaults("gelu", 1e-6, "transformers Dinov2Config"),
        priority=2,
        pool="cls",
        read_config_json=dinov2_config_fields,
        write_config_json=dinov2_config_json,
        published=_dinov2_name,
        resampling=lambda c: HF_DINOV2_REGISTERS if c.reg_tokens else HF,
        unused=lambda c: {"embeddings.mask_token": (1, c.d_model)},
        normalise=renaming(
            strip=("dinov2.", "dinov2_with_registers."),
            drop=(
                ("embeddings.mask_token", _MASK_TOKEN),
                ("dinov2.embeddings.mask_token", _MASK_TOKEN),
            ),
        ),
    ),
    Layout(
        "hf_dinov3",
        "torch",
        dinov3_table,
        r"(^|\.)layer\.\d+\.attention\.o_proj\.weight$",
        "Hugging Face DINOv3ViTModel / DINOv3ViTBackbone (RoPE computed HF's way)",
        container="folder",
        assumes={
            **hf_defaults("gelu", 1e-5, "transformers DINOv3ViTConfig"),
            **{
                f: (v, f"{v!r} (what transformers DINOv3ViTModel computes; no config.json)")
                for f, v in DINOV3_FIXED.items()
            },
            "rope_theta": (100.0, "100.0 (DINOv3ViTConfig's default rope_theta; no config.json)"),
        },
        priority=3,  # its blocks also carry Dinov2's `layer_scale1.lambda1`
        pool="cls",
        read_config_json=dinov3_config_fields,
        write_config_json=dinov3_config_json,
        computes=("rope", "k_bias"),
        resampling=lambda c: HF,
        unused=_dinov3_unused,
        normalise=normalise_dinov3,
    ),
    Layout(
        "hf_aimv2",
        "torch",
        aimv2_table,
        r"(^|\.)embeddings\.patch_embed\.weight$|(^|\.)encoder\.layers\.\d+\.rms_norm1\.",
        "Hugging Face Aimv2VisionModel without its head (the tokens; a whole aimv2 repo's "
        "vision_model too: the text tower is left out)",
        container="folder",
        assumes={
            **hf_defaults("silu", 1e-5, "transformers Aimv2VisionConfig"),
            "pool": ("mean", AIMV2_POOL),
        },
        priority=2,
        read_config_json=aimv2_config_fields,
        write_config_json=aimv2_config_json,
        resampling=lambda c: HF,
        normalise=renaming(
            strip=("vision_model.",),
            drop=(
                *TEXT_TOWER,
                ("visual_projection", "the projection after AIMv2's attention-pooling head"),
            ),
        ),
    ),
    Layout(
        "hf_beit",
        "torch",
        beit_table,
        r"(^|\.)lambda_1$|relative_position_bias\.relative_position_bias_table$"
        r"|^(beit|data2vec_vision)\.embeddings\.",
        "Hugging Face BEiT / data2vec-vision (model, or image classification)",
        container="folder",
        assumes=hf_defaults("gelu", 1e-12, "transformers BeitConfig"),
        priority=2,
        read_config_json=beit_config_fields,
        write_config_json=beit_config_json,
        computes=("rel_pos_bias", "k_bias"),
        published=lambda key, c: key if key.startswith("classifier.") else f"beit.{key}",
        resampling=lambda c: HF,
        normalise=renaming(
            strip=("beit.", "data2vec_vision."),
            drop=(
                ("beit.embeddings.mask_token", _MASK_TOKEN),
                ("data2vec_vision.embeddings.mask_token", _MASK_TOKEN),
            ),
        ),
    ),
    Layout(
        "hf_clip",
        "torch",
        clip_table,
        r"(^|\.)embeddings\.class_embedding$",
        "Hugging Face CLIP vision tower (CLIPVisionModel[WithProjection], or a whole CLIP "
        "repo: the text tower is left out)",
        container="folder",
        assumes=hf_defaults("quick_gelu", 1e-5, "transformers CLIPVisionConfig"),
        priority=2,
        pool="cls",
        read_config_json=clip_config_fields,
        write_config_json=clip_config_json,
        resampling=lambda c: HF,
        published=lambda key, c: (
            key if key.startswith("visual_projection.") else f"vision_model.{key}"
        ),
        normalise=renaming(strip=("vision_model.",), drop=TEXT_TOWER),
    ),
    Layout(
        "hf_siglip",
        "torch",
        siglip_table,
        r"(^|\.)embeddings\.patch_embedding\.weight$",
        "Hugging Face SigLIP and SigLIP 2 vision towers (SiglipVisionModel, Siglip2VisionModel,"
        " or a whole repo: the text tower is left out)",
        container="folder",
        assumes=hf_defaults("gelu_tanh", 1e-6, "transformers SiglipVisionConfig"),
        priority=1,
        computes=("pos_grid",),  # SigLIP 2's NaFlex table
        read_config_json=siglip_config_fields,
        write_config_json=siglip_config_json,
        resampling=lambda c: HF,
        published=lambda key, c: f"vision_model.{key}",
        normalise=renaming(
            strip=("vision_model.",),
            drop=(
                ("text_model.", "the text tower"),
                ("logit_scale", "the text tower"),
                ("logit_bias", "the text tower"),
            ),
        ),
    ),
)
