"""timm: the `VisionTransformer` table (one table for the whole family: rules whose parameters a
config lacks are inactive), architectures read through timm's own registry (a model built on
the meta device: no weights, no download, then read attribute by attribute; what this ViT
cannot compute refused by name), the Hub folder's config.json both ways, our presets' timm
architectures, and the layer diff's hook points on a timm model. Imports timm and torch only
when called.

A state dict cannot say its heads, epsilon, activation or pooling; a timm architecture name
can: `config_from_timm("vit_base_patch16_siglip_224", {"depth": 2})`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NoReturn

import numpy as np

from vit_config import ConfigError, ViTConfig
from weight_transfer.core.errors import CheckpointError, LayoutError
from weight_transfer.core.resample import TIMM
from weight_transfer.core.table import Rule, rule
from weight_transfer.core.transforms import (
    BATCH_AXIS,
    FUSE_2,
    FUSE_QKV,
    STACK_AXIS_1,
    fuse_rows_of,
    grid_table,
    patch_linear,
)
from weight_transfer.formats.checkpoint import Source
from weight_transfer.layouts.base import (
    ASSUME_EPS6,
    ASSUME_GELU,
    EVERYTHING,
    Layout,
    fused,
    json_field,
    renamed,
)

POOLS = {"token": "cls", "avg": "mean", "map": "map"}

# Each preset's timm architecture: equal in function and parameter count (its default head:
# timm gives CLIP-B/16 1000 classes, the QuickGELU one 512).
TIMM_ARCHS = {
    "vit_ti16": "vit_tiny_patch16_224",
    "vit_s16": "vit_small_patch16_224",
    "vit_b16": "vit_base_patch16_224",
    "vit_l16": "vit_large_patch16_224",
    "vit_h14": "vit_huge_patch14_224",
    "clip_b16": "vit_base_patch16_clip_224",
    "clip_b16_quickgelu": "vit_base_patch16_clip_quickgelu_224",
    "siglip_b16": "vit_base_patch16_siglip_224",
    "siglip_b16_gap": "vit_base_patch16_siglip_gap_224",
    "siglip_so400m14": "vit_so400m_patch14_siglip_224",
    "dinov2_s14": "vit_small_patch14_dinov2",
    "dinov2_b14": "vit_base_patch14_dinov2",
    "dinov2_l14": "vit_large_patch14_dinov2",
    "dinov2_g14": "vit_giant_patch14_dinov2",
    "dinov2_b14_reg4": "vit_base_patch14_reg4_dinov2",
    "deit_b16_distilled": "deit_base_distilled_patch16_224",
    "deit3_b16": "deit3_base_patch16_224",
    "vit_medium_reg4_gap": "vit_medium_patch16_reg4_gap_256",
    "aimv2_l14": "aimv2_large_patch14_224",
    "vit_b16_xp": "vit_base_patch16_xp_224",
    "vit_s16_18x2": "vit_small_patch16_18x2_224",
    # rotary positions (timm's Eva class)
    "rope_b16": "vit_base_patch16_rope_224",
    "dinov3_s16": "vit_small_patch16_dinov3",
    "dinov3_b16": "vit_base_patch16_dinov3",
    "dinov3_l16": "vit_large_patch16_dinov3",
    "dinov3_hplus16": "vit_huge_plus_patch16_dinov3",
    "pe_spatial_b16": "vit_pe_spatial_base_patch16_512",
    "pe_core_b16": "vit_pe_core_base_patch16_224",
    "rope_mixed_b16": "vit_base_patch16_rope_mixed_224",
    "rope_reg1_gap_b16": "vit_base_patch16_rope_reg1_gap_256",
    "eva02_b14": "eva02_base_patch14_224",
    "eva02_b16_clip": "eva02_base_patch16_clip_224",
    # a learned table resampled to each image's grid in the forward (timm's NaFlexVit)
    "naflex_b16": "naflexvit_base_patch16_gap",
    # relative position biases (timm's Beit class)
    "beit_b16": "beit_base_patch16_224",
    "beitv2_b16": "beitv2_base_patch16_224",
    # relative biases from a log-coordinate MLP (timm's VisionTransformerRelPos)
    "relpos_b16": "vit_relpos_base_patch16_224",
}


def timm_mlp(ours: str, theirs: str, mlp: str) -> tuple[Rule, ...]:
    """Plain fc1/fc2; SwiGLU split as fc1_g/fc1_x (AIMv2) or packed in fc1, gate rows first
    (GluMlp, DINOv2-g)."""
    if mlp == "swiglu_packed":
        first = fused((f"{ours}.ff1_g", f"{ours}.ff1_x"), f"{theirs}.fc1", FUSE_2)
    else:
        first = (
            *renamed(f"{ours}.ff1", f"{theirs}.fc1"),
            *renamed(f"{ours}.ff1_g", f"{theirs}.fc1_g"),
            *renamed(f"{ours}.ff1_x", f"{theirs}.fc1_x"),
        )
    return (
        *first,
        *renamed(f"{ours}.ff_norm", f"{theirs}.norm"),
        *renamed(f"{ours}.ff2", f"{theirs}.fc2"),
    )


def eva_or_beit(config: ViTConfig) -> bool:
    """Whether only timm's `Eva` or `Beit` computes `config` (RoPE, relative biases, q and v
    biases alone, separate q/k/v): they store LayerScale as raw `gamma_1`, `gamma_2`."""
    return (
        config.rope != "none"
        or (config.rel_pos_bias != "none" and config.rel_pos_form == "beit")
        or not config.k_bias
        or not config.qkv_fused
    )


def timm_relative_bias(ours: str, table: str, mlp: str) -> tuple[Rule, ...]:
    """BEiT's table (Beit: `table`), or relpos's MLP (VisionTransformerRelPos: `mlp`.mlp.fc1,
    fc2)."""
    return (
        rule(f"{ours}.table", table),
        *renamed(f"{ours}.fc1", f"{mlp}.mlp.fc1"),
        *renamed(f"{ours}.fc2", f"{mlp}.mlp.fc2"),
    )


def timm_attention(ours: str, theirs: str, config: ViTConfig) -> tuple[Rule, ...]:
    """q, k, v packed in one qkv (its bias packed too, or q_bias and v_bias alone: Eva, Beit),
    or separate q_proj, k_proj, v_proj (EVA-02 B and L); norms, relative biases, proj."""
    if not config.qkv_fused:
        qkv = tuple(r for n in "qkv" for r in renamed(f"{ours}.{n}", f"{theirs}.{n}_proj"))
    elif config.k_bias:
        qkv = fused([f"{ours}.{p}" for p in "qkv"], f"{theirs}.qkv", FUSE_QKV)
    else:  # (3D, D) weight; biases on q and v only
        qkv = (
            *fused(
                [f"{ours}.{p}" for p in "qkv"], f"{theirs}.qkv", FUSE_QKV, ("weight",), (".weight",)
            ),
            rule(f"{ours}.q.bias", f"{theirs}.q_bias"),
            rule(f"{ours}.v.bias", f"{theirs}.v_bias"),
        )
    return (
        *qkv,  # 3x (D, D) <-> (3D, D)
        *renamed(f"{ours}.q_norm", f"{theirs}.q_norm"),
        *renamed(f"{ours}.k_norm", f"{theirs}.k_norm"),
        *timm_relative_bias(
            f"{ours}.rel_bias", f"{theirs}.relative_position_bias_table", f"{theirs}.rel_pos"
        ),
        *renamed(f"{ours}.o_norm", f"{theirs}.norm"),
        *renamed(f"{ours}.o", f"{theirs}.proj"),
    )


def timm_block(config: ViTConfig) -> tuple[Rule, ...]:
    """One block: timm's `Block` (`EvaBlock` and Beit's store LayerScale as raw `gamma_1`,
    `gamma_2`), `ParallelScalingBlock` (ViT-22B: one in_norm, the MLP's first layer and q, k, v
    in one in_proj, MLP rows first; its MLP bias in in_proj's or alone as `mlp_bias`; q/k
    norms on the block) or `ParallelThingsBlock` (branch j's attention under `attns.{j}`, its
    MLP under `ffns.{j}`, each with its norm and LayerScale)."""
    b = "blocks.{}"
    if config.block == "parallel":
        d = config.d_model
        in_proj = fuse_rows_of(config.d_ff, d, d, d)  # (F + 3D, D) <-> (F, D), 3x (D, D)
        parts = (f"{b}.ff1", *(f"{b}.attn.{n}" for n in "qkv"))
        leaves = ("weight", "bias") if config.qkv_bias else ("weight",)  # else: mlp_bias alone
        return (
            *renamed(f"{b}.ln1", f"{b}.in_norm"),
            *fused(parts, f"{b}.in_proj", in_proj, leaves, tuple(f".{n}" for n in leaves)),
            *([] if config.qkv_bias else [rule(f"{b}.ff1.bias", f"{b}.mlp_bias")]),
            *renamed(f"{b}.attn.q_norm", f"{b}.q_norm"),
            *renamed(f"{b}.attn.k_norm", f"{b}.k_norm"),
            *renamed(f"{b}.attn.o", f"{b}.attn_out_proj"),
            *renamed(f"{b}.ff2", f"{b}.mlp_out_proj"),
            rule(f"{b}.ls1", f"{b}.ls.gamma"),
        )
    if config.num_parallel > 1:
        return tuple(
            r
            for j in range(config.num_parallel)
            for r in (
                *renamed(f"{b}.parallel.{j}.ln1", f"{b}.attns.{j}.norm"),
                *timm_attention(f"{b}.parallel.{j}.attn", f"{b}.attns.{j}.attn", config),
                rule(f"{b}.parallel.{j}.ls1", f"{b}.attns.{j}.ls.gamma"),
                *renamed(f"{b}.parallel.{j}.ln2", f"{b}.ffns.{j}.norm"),
                *timm_mlp(f"{b}.parallel.{j}", f"{b}.ffns.{j}.mlp", config.mlp),
                rule(f"{b}.parallel.{j}.ls2", f"{b}.ffns.{j}.ls.gamma"),
            )
        )
    eva = eva_or_beit(config)
    return (
        *renamed(f"{b}.ln1", f"{b}.norm1"),
        *timm_attention(f"{b}.attn", f"{b}.attn", config),
        rule(f"{b}.ls1", f"{b}.gamma_1" if eva else f"{b}.ls1.gamma"),
        *renamed(f"{b}.ln2", f"{b}.norm2"),
        *timm_mlp(b, f"{b}.mlp", config.mlp),
        rule(f"{b}.ls2", f"{b}.gamma_2" if eva else f"{b}.ls2.gamma"),
    )


def timm_embeddings(config: ViTConfig) -> tuple[Rule, ...]:
    """Patch embedding, prefix tokens and positions: `VisionTransformer`'s, or `NaFlexVit`'s
    `embeds` for a NaFlex table (`pos_grid`): a Linear on patches flattened (ph, pw, C), the
    table kept as its (1, Hp, Wp, D) grid."""
    if config.pos_grid is None:
        return (
            *renamed("patch_embed", "patch_embed.proj"),
            *renamed("patch_norm", "patch_embed.norm"),
            rule("cls_token", "cls_token", BATCH_AXIS),  # (1, D) <-> (1, 1, D)
            rule("dist_token", "dist_token", BATCH_AXIS),
            rule("reg_tokens", "reg_token", BATCH_AXIS),  # (R, D) <-> (1, R, D)
            rule("pos_embed", "pos_embed", BATCH_AXIS),  # (P, D) <-> (1, P, D)
        )
    return (
        rule("patch_embed.weight", "embeds.proj.weight", patch_linear(config.patch_size)),
        rule("patch_embed.bias", "embeds.proj.bias"),
        *renamed("patch_norm", "embeds.norm"),
        rule("cls_token", "embeds.cls_token", BATCH_AXIS),
        rule("reg_tokens", "embeds.reg_token", BATCH_AXIS),
        rule("pos_embed", "embeds.pos_embed", grid_table(config.pos_grid)),
    )


def timm_table(config: ViTConfig) -> tuple[Rule, ...]:
    """timm `VisionTransformer` (and `VisionTransformerDistilled`), or `Eva` / `Beit` for a
    config only they compute (`eva_or_beit`). Rules whose parameters a config does not have
    are inactive, so one table serves the whole family."""
    return (
        *timm_embeddings(config),
        *renamed("norm_pre", "norm_pre"),
        # RoPE-ViT mixed: each block's (2, H, hd/2) frequencies <-> (2, L, H, hd/2)
        *(
            [
                rule(
                    tuple(f"blocks.{i}.attn.rope_freqs" for i in range(n)),
                    "rope.freqs",
                    STACK_AXIS_1,
                )
            ]
            if (n := config.num_layers)
            else []
        ),
        *timm_relative_bias(
            "rel_bias", "rel_pos_bias.relative_position_bias_table", "shared_rel_pos"
        ),
        *timm_block(config),
        *renamed("ln_f", "norm"),
        rule("map.probe", "attn_pool.latent", BATCH_AXIS),  # (1, D) <-> (1, 1, D)
        *renamed("map.attn.q", "attn_pool.q"),
        *fused(["map.attn.k", "map.attn.v"], "attn_pool.kv", FUSE_2),  # 2x (D, D) <-> (2D, D)
        *renamed("map.attn.o", "attn_pool.proj"),
        *renamed("map.norm", "attn_pool.norm"),
        *timm_mlp("map", "attn_pool.mlp", "mlp"),
        *renamed("fc_norm", "fc_norm"),
        *renamed("head", "head"),
        *renamed("head_dist", "head_dist"),
    )


def is_timm_model(name: str) -> bool:
    try:
        import timm
    except ImportError:
        return False
    return timm.is_model(name)


def build_timm(architecture: str, model_args: Mapping[str, Any] | None = None):
    """timm's model of `architecture` on the meta device (pretrained=False: nothing fetched)."""
    try:
        import timm
        import torch
    except ImportError:
        raise LayoutError(
            f"architecture {architecture!r} is resolved through timm, which is not "
            f"installed (pip install timm)"
        ) from None
    if not timm.is_model(architecture):
        raise LayoutError(
            f"{architecture!r} is not a timm architecture this timm ({timm.__version__}) knows"
        )
    args, failures = dict(model_args or {}), (TypeError, ValueError, AssertionError, RuntimeError)
    with torch.device("meta"):
        try:  # its initialisers skipped where its class allows: the meta device holds no values
            return timm.create_model(architecture, pretrained=False, weight_init="skip", **args)
        except failures:
            pass
    try:
        with torch.device("meta"):
            return timm.create_model(architecture, pretrained=False, **args)
    except failures as e:
        raise LayoutError(
            f"timm cannot build {architecture!r} with {dict(model_args or {})}: {e}"
        ) from None


def config_from_timm(architecture: str, model_args: Mapping[str, Any] | None = None) -> ViTConfig:
    """The `ViTConfig` computing what timm's `architecture` (with `model_args`) computes
    (remembered per process: building timm's model, even on the meta device, runs its weight
    initialisers, and a port asks once per form and framework)."""
    key = (architecture, repr(sorted(dict(model_args or {}).items())))
    if key not in _TIMM_CONFIGS:
        _TIMM_CONFIGS[key] = config_of_timm_model(
            build_timm(architecture, model_args),
            architecture,
            dict(model_args or {}).get("img_size"),
        )
    return _TIMM_CONFIGS[key]


_TIMM_CONFIGS: dict[tuple[str, str], ViTConfig] = {}  # ViTConfig is frozen: shared safely


def _refuse(architecture: str, what: str) -> NoReturn:
    raise LayoutError(f"timm {architecture!r}: {what}, which this ViT does not implement")


def _norm(module, architecture: str) -> tuple[str, float] | None:
    """("layernorm" | "rmsnorm", eps), or None for an Identity."""
    name = type(module).__name__
    if name in ("Identity", "NoneType"):
        return None
    if name in ("LayerNorm", "LayerNorm2d") and getattr(module, "bias", None) is not None:
        return "layernorm", float(module.eps)
    if name in ("RmsNorm", "RMSNorm"):
        return "rmsnorm", float(module.eps)
    _refuse(architecture, f"a {name} norm")


def _activation(module, architecture: str) -> str:
    name = type(module).__name__
    if name == "GELU":
        return "gelu_tanh" if getattr(module, "approximate", "none") == "tanh" else "gelu"
    if name == "GELUTanh":
        return "gelu_tanh"
    found = {"QuickGELU": "quick_gelu", "SiLU": "silu", "ReLU": "relu"}.get(name)
    if found is None:
        _refuse(architecture, f"the activation {name}")
    return found


def _mlp(mlp, architecture: str) -> dict[str, Any]:
    """The MLP's fields; a norm on its hidden units (EVA-02's sub-LN) is `mlp_norm`."""
    name = type(mlp).__name__
    forms = {"Mlp": "mlp", "SwiGLU": "swiglu"}
    form = "swiglu_packed" if name == "GluMlp" and not mlp.gate_last else forms.get(name)
    if form is None:
        _refuse(architecture, f"the MLP {name} (with its options)")
    return dict(
        mlp=form,
        d_ff=mlp.fc2.in_features,
        mlp_bias=mlp.fc2.bias is not None,
        mlp_norm=_norm(getattr(mlp, "norm", None), architecture) is not None,
    )


def _rope(m, architecture: str) -> dict[str, Any]:
    """An `Eva`'s rotary embedding as config fields (none: {})."""
    rope = getattr(m, "rope", None)
    if rope is None:
        return {}
    name = type(rope).__name__
    half = getattr(rope, "rotate_half", None)
    if half is None:  # the mixed embedding leaves the pair layout to the attention
        half = m.blocks[0].attn.rotate_half if len(m.blocks) else False
    fields: dict[str, Any] = dict(
        rope="half" if half else "interleaved",
        rope_axes={"ij": "hw", "xy": "wh"}[rope.grid_indexing],
    )
    if name == "RotaryEmbeddingMixed":
        if getattr(rope, "aug_active", False):
            _refuse(architecture, "RoPE coordinate augmentation")
        return fields | dict(rope_freqs="mixed")
    fields.update(rope_offset=float(rope.grid_offset), rope_theta=float(rope.temperature or 0))
    if name == "RotaryEmbeddingCat":
        if rope.grid_type != "index" or rope.in_pixels:
            _refuse(architecture, f"RoPE on a {rope.grid_type!r} grid with pixel bands")
        ref = rope.ref_feat_shape
        return fields | dict(rope_freqs="theta", rope_ref_grid=tuple(ref) if ref else None)
    if name == "RotaryEmbeddingDinoV3":
        if rope.min_period is not None or rope.max_period is not None:
            _refuse(architecture, "DINOv3 RoPE with min/max periods")
        return fields | dict(rope_freqs="periods", rope_coords=rope.normalize_coords)
    _refuse(architecture, f"the rotary embedding {name}")


ATTENTIONS = ("Attention", "EvaAttention", "AttentionRope", "RelPosAttention")


def _relative(module, architecture: str) -> dict[str, Any]:
    """A relative bias module's form: Beit's table (`RelativePositionBias`, or the table an
    attention holds itself), or relpos's log-coordinate MLP (`RelPosMlp`, "cr" mode)."""
    name = type(module).__name__
    if name == "RelativePositionBias":
        return dict(rel_pos_form="beit")
    if name == "RelPosMlp":
        if module.mode != "cr" or module.bias_gain is not None:
            _refuse(architecture, f"a relative position MLP in {module.mode!r} mode")
        return dict(rel_pos_form="mlp", rel_pos_dim=module.mlp.fc1.out_features)
    _refuse(architecture, f"the relative position bias {name}")


def _attention(attn, d_model: int, architecture: str) -> dict[str, Any]:
    """A block's attention as config fields: q, k, v packed or separate, with biases on all
    three, on q and v only (`k_bias=False`), or none; q/k norms, a norm before proj, a
    relative bias table."""
    name = type(attn).__name__
    if name not in ATTENTIONS:
        _refuse(architecture, f"{name} attention")
    if getattr(attn, "gate", None) is not None:
        _refuse(architecture, "gated attention")
    if attn.proj.in_features != d_model:
        _refuse(architecture, f"attention {attn.proj.in_features} wide in a {d_model} model")
    if attn.qkv is not None:
        biases = [attn.qkv.bias is not None] * 3
        if getattr(attn, "q_bias", None) is not None:
            biases = [True, False, True]
    else:
        biases = [getattr(attn, f"{n}_proj").bias is not None for n in "qkv"]
    if biases[0] != biases[2]:
        _refuse(architecture, f"q, k, v biases {biases}")
    return dict(
        num_heads=attn.num_heads,
        qkv_bias=biases[0],
        k_bias=biases[1] or not biases[0],
        qkv_fused=attn.qkv is not None,
        proj_bias=attn.proj.bias is not None,
        qk_norm=type(getattr(attn, "q_norm", None)).__name__ not in ("Identity", "NoneType"),
        attn_norm=_norm(getattr(attn, "norm", None), architecture) is not None,
        **_block_relative(attn, architecture),
    )


def _block_relative(attn, architecture: str) -> dict[str, Any]:
    """An attention's own relative biases (Beit's table, relpos's `rel_pos`), if any."""
    if getattr(attn, "relative_position_bias_table", None) is not None:
        return dict(rel_pos_bias="block", rel_pos_form="beit")
    if getattr(attn, "rel_pos", None) is not None:
        return dict(rel_pos_bias="block", **_relative(attn.rel_pos, architecture))
    return dict(rel_pos_bias="none")


def _layer_scale(block, architecture: str) -> bool:
    """LayerScale on both branches (timm `ls1`/`ls2`, Eva and Beit `gamma_1`/`gamma_2`,
    ParallelThingsBlock's branches' `ls`)."""
    if hasattr(block, "attns"):
        gains = [type(b.ls).__name__ == "LayerScale" for b in (block.attns[0], block.ffns[0])]
    elif hasattr(block, "ls1"):
        gains = [type(block.ls1).__name__ == "LayerScale", type(block.ls2).__name__ == "LayerScale"]
    else:
        gains = [getattr(block, f"gamma_{i}", None) is not None for i in (1, 2)]
    if gains[0] != gains[1]:
        _refuse(architecture, "LayerScale on one branch only")
    return gains[0]


def _block(block, d_model: int, architecture: str) -> tuple[dict[str, Any], list]:
    """A block's config fields, and the norm modules inside it (for one kind and epsilon)."""
    kind = type(block).__name__
    if kind == "ParallelScalingBlock":
        return _parallel_scaling(block, architecture)
    if kind == "ParallelThingsBlock":  # every branch built alike: the first one speaks
        attn, mlp = block.attns[0].attn, block.ffns[0].mlp
        norms = [block.attns[0].norm, block.ffns[0].norm]
    else:
        attn, mlp, norms = block.attn, block.mlp, [block.norm1, block.norm2]
    fields = dict(
        _attention(attn, d_model, architecture),
        block=BLOCKS[kind],
        num_parallel=getattr(block, "num_parallel", 1),
        layer_scale=_layer_scale(block, architecture),
        activation=_activation(mlp.act, architecture),
        **_mlp(mlp, architecture),
    )
    inner = ("q_norm", "k_norm", "norm")
    return fields, [*norms, *(getattr(attn, n, None) for n in inner), getattr(mlp, "norm", None)]


def _parallel_scaling(block, architecture: str) -> tuple[dict[str, Any], list]:
    """ViT-22B's block (timm ParallelScalingBlock): one norm, one in_proj, one LayerScale."""
    if block.out_proj is not None:
        _refuse(architecture, "a fused output projection for attention and MLP (fuse_out_proj)")
    if block.mlp_out_proj.bias is None:  # the MLP's first layer always has one
        _refuse(architecture, "an MLP with a bias on its first layer and none on its second")
    fields = dict(
        num_heads=block.num_heads,
        qkv_bias=block.in_proj.bias is not None,
        proj_bias=True,
        qk_norm=_norm(block.q_norm, architecture) is not None,
        block="parallel",
        layer_scale=type(block.ls).__name__ == "LayerScale",
        activation=_activation(block.mlp_act, architecture),
        mlp="mlp",
        d_ff=block.mlp_out_proj.in_features,
        mlp_bias=True,
    )
    return fields, [block.in_norm, block.q_norm, block.k_norm]


MODELS = (
    "VisionTransformer",
    "VisionTransformerDistilled",
    "Eva",
    "Beit",
    "VisionTransformerRelPos",
    "NaFlexVit",
)
BLOCKS = {  # timm's block classes and where their norms sit
    "Block": "pre_norm",  # VisionTransformer's and Beit's
    "EvaBlock": "pre_norm",
    "ResPostBlock": "post_norm",
    "EvaBlockPostNorm": "post_norm",
    "RelPosBlock": "pre_norm",
    "ResPostRelPosBlock": "post_norm",
    "ParallelScalingBlock": "parallel",  # ViT-22B
    "ParallelThingsBlock": "pre_norm",  # pre-norm branches side by side
}


def _embeddings(m) -> dict[str, Any]:
    """A `VisionTransformer`'s (or Eva's, Beit's) image size, tokens and position table."""
    return dict(
        image_size=tuple(m.patch_embed.img_size),
        in_channels=m.patch_embed.proj.in_channels,
        class_token=m.cls_token is not None,
        dist_token=getattr(m, "dist_token", None) is not None,
        pos_embed=getattr(m, "pos_embed", None) is not None,
        pos_embed_tokens="none" if getattr(m, "no_embed_class", False) else "all",
    )


def _naflex(m, architecture: str, image_size) -> dict[str, Any]:
    """A `NaFlexVit`'s embeddings (its padded batches: `vit_config.patches.from_timm`): its
    learned table on its own grid, resampled in every forward by its method; the image size
    as built (`img_size`), else its default input size."""
    e = m.embeds
    if getattr(m, "rope", None) is not None:
        _refuse(architecture, "RoPE in a NaFlexVit")
    if not e.is_linear or not e.channels_last or e.norm_input is not None:
        _refuse(architecture, "a NaFlex patch embedding other than a Linear on (ph, pw, C) patches")
    if e.pos_embed_use_grid_sample or e.pos_embed_interp_mode not in ("bilinear", "bicubic"):
        _refuse(architecture, f"positions resampled by grid_sample or {e.pos_embed_interp_mode}")
    if image_size is None:
        image_size = e.default_img_size or m.pretrained_cfg.get("input_size", (3, 224, 224))[1:]
    size = tuple(image_size) if isinstance(image_size, (tuple, list)) else (image_size,) * 2
    if e.pos_embed_type == "factorized":  # the sum of two 1-D tables, each resampled linearly
        grid = (e.pos_embed_y.shape[1], e.pos_embed_x.shape[1])
        if e.pos_embed_ar_preserving and grid[0] != grid[1]:
            _refuse(
                architecture,
                f"a non-square factorized table {grid} resampled to its longer side's square "
                "(timm resamples it even at its own grid, which it does not for a 2-D table)",
            )
        table = dict(
            pos_grid=grid,
            pos_interpolation="bilinear",
            pos_antialias=False,
            pos_align_corners=False,
        )
    elif e.pos_embed is not None:
        table = dict(
            pos_grid=tuple(e.pos_embed.shape[1:3]),
            pos_interpolation=e.pos_embed_interp_mode,
            pos_antialias=bool(e.pos_embed_antialias),
            pos_align_corners=bool(e.pos_embed_align_corners),
        )
    else:
        table = {}
    return dict(
        image_size=size,
        in_channels=e.in_chans,
        class_token=e.cls_token is not None,
        pos_embed=bool(table),
        pos_embed_tokens="none",
        **table,
        **(dict(pos_square=bool(e.pos_embed_ar_preserving)) if table else {}),
    )


FACTORIZED = ("embeds.pos_embed_y", "embeds.pos_embed_x")
MAX_FACTORIZED_ROWS = 256 * 256


def factorized_table(source: Source) -> tuple[Source, list[str]]:
    """NaFlexVit's factorized positions (`pos_embed_y` (1, H, D), `pos_embed_x` (1, W, D)) read
    as the table they add to the patches, `embeds.pos_embed` (1, H, W, D) with rows
    y[i] + x[j]. timm resamples each 1-D table linearly (corners not aligned, no antialias)
    and adds them; bilinear resampling of their sum is the same function, since each axis's
    weights sum to one: so the model is a learned NaFlex table, resampled bilinearly."""
    if not all(k in source.meta for k in FACTORIZED):
        return source, []
    (ys, dtype), (xs, xdtype) = (source.meta[k] for k in FACTORIZED)
    if len(ys) != 3 or len(xs) != 3 or ys[0] != 1 or xs[0] != 1 or ys[2] != xs[2]:
        raise CheckpointError(
            f"{source.path}: factorized positions {FACTORIZED[0]} {tuple(ys)} and "
            f"{FACTORIZED[1]} {tuple(xs)}: expected (1, H, D) and (1, W, D)"
        )
    if ys[1] * xs[1] > MAX_FACTORIZED_ROWS:  # (H + W) rows stored make H * W: bounded
        raise CheckpointError(
            f"{source.path}: factorized positions of a {ys[1]} x {xs[1]} grid: more than "
            f"{MAX_FACTORIZED_ROWS:,} rows once summed (timm's own tables are 24 x 24)"
        )
    if dtype != xdtype:
        raise CheckpointError(
            f"{source.path}: factorized positions in two dtypes ({dtype}, {xdtype})"
        )
    meta = {k: m for k, m in source.meta.items() if k not in FACTORIZED}
    meta["embeds.pos_embed"] = ((1, ys[1], xs[1], ys[2]), dtype)
    load = source.load

    def read(key: str) -> np.ndarray:
        if key != "embeds.pos_embed":
            return load(key)
        y, x = (load(k) for k in FACTORIZED)
        return y[:, :, None, :] + x[:, None, :, :]  # (1, H, W, D): row i, column j

    summed = source.renamed(meta, read)
    note = f"factorized positions summed into a {ys[1]} x {xs[1]} table (y[i] + x[j])"
    return dataclasses.replace(summed, notes=[*source.notes, note]), []


def config_of_timm_model(m, architecture: str = "", image_size=None) -> ViTConfig:
    """Read a timm `VisionTransformer`, `VisionTransformerDistilled`, `Eva` (RoPE ViTs: EVA,
    DINOv3, RoPE-ViT, PE...), `Beit` (relative biases) or `NaFlexVit` (its `image_size`: as
    built; the others know theirs) into a `ViTConfig`."""
    architecture = architecture or type(m).__name__
    kind = type(m).__name__
    if kind not in MODELS:
        _refuse(architecture, f"the model class {kind}")
    block = m.blocks[0] if len(m.blocks) else None
    if block is not None and type(block).__name__ not in BLOCKS:
        _refuse(architecture, f"{type(block).__name__} blocks")
    shared_bias = getattr(m, "rel_pos_bias", None) or getattr(m, "shared_rel_pos", None)
    if shared_bias is not None and block is not None and hasattr(block, "attn"):
        if _block_relative(block.attn, architecture)["rel_pos_bias"] != "none":
            _refuse(architecture, "shared relative biases and a block's own together")
    embed = m.embeds if kind == "NaFlexVit" else m.patch_embed
    if not any(c.__name__ in ("PatchEmbed", "NaFlexEmbeds") for c in type(embed).__mro__):
        _refuse(architecture, f"a {type(embed).__name__} patch embedding (a convolutional stem)")
    patch = tuple(embed.patch_size)
    if patch[0] != patch[1]:
        _refuse(architecture, f"non-square patches {patch}")
    pool = POOLS.get(m.global_pool)
    if pool is None:
        _refuse(architecture, f"global_pool={m.global_pool!r}")
    if pool == "map":
        if m.attn_pool.latent_len != 1 or type(m.attn_pool.q_norm).__name__ != "Identity":
            _refuse(architecture, "a MAP head with several latents or q/k norms")
    norms = {n: _norm(getattr(m, n, None), architecture) for n in ("norm_pre", "norm", "fc_norm")}
    patch_norm = _norm(embed.norm, architecture)
    reg = getattr(embed if kind == "NaFlexVit" else m, "reg_token", None)
    fields: dict[str, Any] = dict(
        patch_size=patch[0],
        d_model=m.embed_dim,
        num_layers=len(m.blocks),
        num_classes=m.num_classes,
        pool=pool,
        reg_tokens=reg.shape[1] if reg is not None else 0,
        norm_pre=norms["norm_pre"] is not None,
        patch_norm=patch_norm is not None,
        final_norm="pre_pool" if norms["norm"] else "post_pool" if norms["fc_norm"] else "none",
        patch_bias=embed.proj.bias is not None,
        head_bias=getattr(m.head, "bias", None) is not None if m.num_classes else True,
        **(
            dict(rel_pos_bias="shared", **_relative(shared_bias, architecture))
            if shared_bias is not None
            else {}
        ),
        **(_rope(m, architecture) if kind == "Eva" else {}),
        **(_naflex(m, architecture, image_size) if kind == "NaFlexVit" else _embeddings(m)),
    )
    present = [n for n in (*norms.values(), patch_norm) if n is not None]
    if block is not None:
        block_fields, inner = _block(block, m.embed_dim, architecture)
        fields.update(block_fields)
        if shared_bias is not None:  # the attentions have none of their own
            fields.update(rel_pos_bias="shared", **_relative(shared_bias, architecture))
        present += [n for n in (_norm(x, architecture) for x in inner) if n is not None]
    else:  # no blocks: the sizes a block would have are the MAP head's, or anything valid
        fields.update(
            num_heads=m.attn_pool.num_heads if pool == "map" else 1,
            d_ff=m.attn_pool.mlp.fc1.out_features if pool == "map" else 4 * m.embed_dim,
        )
    if not (
        fields["pos_embed"]
        or fields.get("rope", "none") != "none"
        or fields.get("rel_pos_bias", "none") != "none"
    ):
        _refuse(architecture, "no position embedding of any kind")
    kinds = {kind for kind, _ in present}
    epsilons = {eps for _, eps in present}
    if len(kinds) > 1 or len(epsilons) > 1:
        _refuse(architecture, f"norms of different kinds or epsilons {sorted(present)}")
    if present:
        fields.update(norm=kinds.pop(), ln_eps=epsilons.pop())
    if pool == "map":
        fields.update(map_heads=m.attn_pool.num_heads)
        fields.update(map_d_ff=m.attn_pool.mlp.fc1.out_features)
    # VisionTransformer pools the prefix tokens when told; Eva's MAP head always reads them
    fields.update(pool_prefix=getattr(m, "pool_include_prefix", kind == "Eva" and pool == "map"))
    try:
        return ViTConfig(**fields)
    except ConfigError as e:
        raise LayoutError(f"timm {architecture!r} maps to no valid config: {e}") from None


def timm_config_json(cfg: Mapping[str, Any], where) -> tuple[dict[str, Any], dict[str, str]]:
    """A timm Hub folder's `config.json` (`architecture`, `model_args`, `num_classes`,
    `global_pool`, `pretrained_cfg.input_size`): every field through timm's registry when
    timm is installed; otherwise the few it states, and the rest is left to be assumed.
    Returns (fields, what was assumed)."""
    architecture = json_field(cfg, "architecture", str, where)
    model_args = dict(json_field(cfg, "model_args", dict, where, {}))
    num_classes = json_field(cfg, "num_classes", int, where, None)
    global_pool = json_field(cfg, "global_pool", str, where, None)
    pretrained = json_field(cfg, "pretrained_cfg", dict, where, {})
    size = pretrained.get("input_size")
    if size is not None and not (
        isinstance(size, list)
        and len(size) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        raise CheckpointError(
            f"{where}: config.json pretrained_cfg.input_size is {size!r}; "
            f"expected [channels, height, width]"
        )
    for key, value in (("num_classes", num_classes), ("global_pool", global_pool)):
        if value is not None:
            model_args.setdefault(key, value)
    if size is not None:
        model_args.setdefault("img_size", tuple(size[1:]))
    try:
        config = config_from_timm(architecture, model_args)
    except LayoutError as e:
        if "not installed" not in str(e):
            raise
        stated: dict[str, Any] = {}
        if num_classes is not None:
            stated["num_classes"] = num_classes
        if global_pool in POOLS:
            stated["pool"] = POOLS[global_pool]
        if size is not None:
            stated["image_size"] = tuple(size[1:])
        return stated, {
            "architecture": f"{architecture} not resolved: timm is not installed; "
            f"the rest comes from the tensors and assumptions"
        }
    return config.to_dict(), {}


def timm_hub_config(config: ViTConfig) -> dict[str, Any]:
    """The `config.json` of a timm Hub folder holding `config`'s weights: the first of our
    presets' timm architectures that, given the sizes as `model_args`, builds exactly
    `config` (checked by building it on the meta device and reading it back, as a reader
    would). No such architecture: refused, naming the way out (a bare state dict)."""
    from vit_config import PRESETS

    h, w = config.image_hw
    args: dict[str, Any] = dict(
        img_size=h if h == w else [h, w],
        patch_size=config.patch_size,
        in_chans=config.in_channels,
        embed_dim=config.d_model,
        depth=config.num_layers,
        num_heads=config.num_heads,
        num_classes=config.num_classes,
    )
    if config.pos_grid is not None:  # NaFlexVit's table and how it resamples it
        args.update(
            pos_embed_grid_size=list(config.pos_grid),
            pos_embed_interp_mode=config.pos_interpolation,
            pos_embed_antialias=config.pos_antialias,
            pos_embed_align_corners=config.pos_align_corners,
            pos_embed_ar_preserving=config.pos_square,
        )
    # timm takes int(embed_dim * mlp_ratio) as the hidden width (twice d_ff for a packed
    # SwiGLU): a half above lands on it exactly
    ratios = [(n * config.d_ff + 0.5) / config.d_model for n in (1, 2)]
    tried = []
    for preset in PRESETS:
        architecture = TIMM_ARCHS.get(preset)
        if architecture is None or architecture in tried:
            continue
        tried.append(architecture)
        for ratio in ratios:
            try:
                built = config_from_timm(architecture, {**args, "mlp_ratio": ratio})
            except LayoutError:
                continue
            if built.same_model(config):
                return {
                    "architecture": architecture,
                    "num_classes": config.num_classes,
                    "model_args": {**args, "mlp_ratio": ratio},
                    "pretrained_cfg": {
                        "input_size": [config.in_channels, h, w],
                        "num_classes": config.num_classes,
                    },
                }
    raise LayoutError(
        f"no timm architecture of {', '.join(tried)} builds this config (with "
        f"its sizes as model_args); write a bare timm state dict instead (a "
        f"destination ending in .safetensors)"
    )


def hook_points(m) -> list[tuple[Any, str, str]]:
    """Where the layer diff reads a timm `VisionTransformer` (or `NaFlexVit`): (module, our
    intermediate's name, "out" for its output, "tokens" for its output as (B, N, D) (a dynamic
    size's patch embedding is (B, Hp, Wp, D)), or "in" for its first input)."""
    if hasattr(m, "embeds"):  # NaFlexVit: one module embeds, positions and joins the tokens
        points = [(m.embeds.norm, "patch_embed", "out"), (m.embeds.pos_drop, "tokens", "out")]
    else:
        points = [(m.patch_embed, "patch_embed", "tokens"), (m.pos_drop, "tokens", "out")]
    for i, b in enumerate(m.blocks):
        if hasattr(b, "ls1"):  # an Eva block applies its gamma inline: its output alone
            points += [(b.ls1, f"blocks.{i}.attn", "out"), (b.ls2, f"blocks.{i}.mlp", "out")]
        elif getattr(b, "attn_out_proj", None) is not None:  # ParallelScalingBlock: before ls
            points += [
                (b.attn_out_proj, f"blocks.{i}.attn", "out"),
                (b.mlp_out_proj, f"blocks.{i}.mlp", "out"),
            ]
        points.append((b, f"blocks.{i}", "out"))
    if hasattr(m.norm, "weight"):  # with fc_norm, timm's norm is an Identity: no ln_f point
        points.append((m.norm, "ln_f", "out"))
    return points + [(m.head, "pooled", "in")]


def diff_points(model):
    """("timm CLASS", `hook_points`) for a timm model; None for anyone else's."""
    if type(model).__module__.split(".")[0] != "timm":
        return None
    return f"timm {type(model).__name__}", hook_points


# timm's layout, which the layouts built on timm's names (open_clip's towers, EVA-02's
# release) reuse
TIMM_LAYOUT = Layout(
    "timm",
    "torch",
    timm_table,
    r"^blocks\.\d+\.attn\.qkv\.weight$|^(patch_embed|embeds)\.proj\.weight$",
    "timm VisionTransformer state dict (or Hub folder)",
    read_config_json=timm_config_json,
    write_config_json=timm_hub_config,
    resampling=lambda c: TIMM,
    lookalikes="Perception Encoder (timm vit_pe_core_*, vit_pe_spatial_*) has these "
    "keys and also rotates q and k (RoPE)",
    # timm recomputes RoPE periods; its blocks and outer norms share one norm_layer
    computes=tuple(f for f in EVERYTHING if f not in ("rope_periods", "block_ln_eps")),
    assumes=dict(activation=ASSUME_GELU, ln_eps=ASSUME_EPS6),
    normalise=factorized_table,
)
LAYOUTS = (TIMM_LAYOUT,)
