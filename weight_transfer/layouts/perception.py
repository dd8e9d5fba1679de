"""The Perception Encoder release (facebookresearch/perception_models, `core/vision_encoder`),
as its checkpoints hold it: open_clip's names (`conv1`, `class_embedding`,
`positional_embedding`, `ln_pre`, `transformer.resblocks.*`, `ln_post`, `proj`), LayerScale
`ls_1.gamma`, and PE core's attention pool (`attn_pool.probe`, `attn_pool.attn.in_proj_*`,
`attn_pool.layernorm`, `attn_pool.mlp.c_fc`), under `visual.` in a whole CLIP checkpoint or
bare. Every PE rotates q and k (RoPE: interleaved, width first, theta 1e4, positions i + 1 with
a class token) on top of its learned table, at any grid without rescaling: what its class
computes, whatever the file (timm's PE architectures rescale to their training grid
elsewhere; at that grid the two agree)."""

from __future__ import annotations

from typing import Any

from vit_config import ViTConfig
from weight_transfer.core.resample import Resampling
from weight_transfer.core.table import Rule, rule
from weight_transfer.core.transforms import BATCH_AXIS, FUSE_QKV
from weight_transfer.formats.checkpoint import Source
from weight_transfer.layouts.base import PLAIN, Layout, fused, renamed, require
from weight_transfer.layouts.open_clip import normalise_open_clip, open_clip_table

# PE's rotary embedding (perception_models `core/vision_encoder/rope.py`: Rope2D)
PE_ROPE: dict[str, Any] = dict(
    rope="interleaved",
    rope_axes="wh",
    rope_freqs="theta",
    rope_theta=10000.0,
    rope_ref_grid=None,
    pos_embed=True,
    norm_pre=True,
)


def pe_table(config: ViTConfig) -> tuple[Rule, ...]:
    """open_clip's names (`visual.` stripped), LayerScale and PE core's attention pool."""
    b = "transformer.resblocks.{}"
    return (
        *open_clip_table(config),
        rule("blocks.{}.ls1", f"{b}.ls_1.gamma"),
        rule("blocks.{}.ls2", f"{b}.ls_2.gamma"),
        rule("map.probe", "attn_pool.probe", BATCH_AXIS),
        *fused(
            ("map.attn.q", "map.attn.k", "map.attn.v"),
            "attn_pool.attn.in_proj",
            FUSE_QKV,
            suffix=("_weight", "_bias"),
        ),
        *renamed("map.attn.o", "attn_pool.attn.out_proj"),
        *renamed("map.norm", "attn_pool.layernorm"),
        *renamed("map.ff1", "attn_pool.mlp.c_fc"),
        *renamed("map.ff2", "attn_pool.mlp.c_proj"),
    )


def class_fields(source: Source) -> tuple[dict[str, Any], dict[str, str], dict[str, str]]:
    """What PE's vision transformer computes whatever the file: its RoPE (positions from 1
    when there is a class token, which takes the zero angle), the pre-norm, a bias-free
    projection; what the file
    cannot say (the attention pool's heads, whether it reads the class token) assumed as
    PE core's."""
    cls = "class_embedding" in source.meta
    fields: dict[str, Any] = dict(PE_ROPE, rope_offset=1.0 if cls else 0.0)
    if "proj" in source.meta:  # `x @ proj`: no bias (timm's PE head adds a zero one)
        fields["head_bias"] = False
    assumed = {}
    if "attn_pool.probe" in source.meta:
        fields.update(map_heads=8, pool_prefix=cls)
        assumed["map_heads"] = "8 (PE's attn_pooler_heads, in every released config)"
        assumed["pool_prefix"] = f"{cls} (PE core's pool reads the class token with the patches)"
    return fields, {}, assumed


def check_writable(config: ViTConfig) -> None:
    """What PE's VisionTransformer computes: its RoPE and pre-norm, q/k/v biases, a plain MLP,
    a bias-free projection, pooled by its attention pool (reading every token) or its class
    token, after `ln_post` or none."""
    require(
        config,
        "PE's VisionTransformer",
        **{**PLAIN, **PE_ROPE, "layer_scale": config.layer_scale, "patch_bias": False},
        rope_offset=1.0 if config.class_token else 0.0,
        qkv_bias=True,
        pool="map" if config.pool == "map" else "cls",
        pool_prefix=config.pool == "map" and config.class_token,
        final_norm="pre_pool" if config.final_norm == "pre_pool" else "none",
        head_bias=False,
    )


LAYOUTS = (
    Layout(
        "pe",
        "torch",
        pe_table,
        r"(^|\.)attn_pool\.probe$|\.ls_1\.gamma$",
        "the Perception Encoder release (facebookresearch/perception_models vision tower: "
        "open_clip's names, LayerScale, attention pool; RoPE)",
        priority=3,  # its names are open_clip's
        normalise=normalise_open_clip,  # under `visual.` in a whole CLIP, or bare
        class_fields=class_fields,
        check_writable=check_writable,
        # PE's own resize of its table: bilinear, corners not aligned, no antialias
        resampling=lambda c: Resampling("bilinear", False, "PE's _sample_abs_posemb"),
        computes=("rope", "map_heads", "pool_prefix"),
        assumes=dict(
            activation=("gelu", "exact GELU (PE's nn.GELU)"),
            ln_eps=(1e-5, "1e-5 (PE's LayerNorm)"),
        ),
    ),
)
