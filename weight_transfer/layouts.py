"""The layouts the ecosystem publishes, each one table over one of our two layouts.

| layout       | base  | what                                                                  |
|--------------|-------|-----------------------------------------------------------------------|
| `nnx`        | nnx   | `jax_impl.ViT` flat NNX paths (`blocks.0.attn.q.kernel`)              |
| `torch`      | torch | `torch_impl.ViT` state dict (`blocks.0.attn.q.weight`)                |
| `timm`       | torch | timm `VisionTransformer`: fused `qkv`, `(1, N+1, D)` pos_embed        |
| `hf`         | torch | HF transformers ViT, the names on published checkpoints (v4)          |
| `hf5`        | torch | HF transformers 5 in-memory names (`vit.layers.{i}.attention.q_proj`) |
| `google_vit` | nnx   | google-research/vision_transformer npz (`/`-joined, read by timm)     |
| `big_vision` | nnx   | big_vision npz: `pos_embedding` added before the class token joins    |
|              |       | (`big_vision_bv`, its earlier name, is an alias)                    |

`base` says which of our flat layouts the table's left column uses; `table.nnx_torch` links
the two.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vit_config import ViTConfig
from weight_transfer.checkpoint import Source
from weight_transfer.errors import LayoutError
from weight_transfer.npz_io import normalise_npz
from weight_transfer.hf_config import (
    clip_config_fields,
    clip_config_json,
    deit_config_json,
    dinov2_config_fields,
    dinov2_config_json,
    hf_config_fields,
    hf_config_json,
    PLAIN,
    normalise_hf,
    renaming,
    require,
    siglip_config_fields,
    siglip_config_json,
)
from weight_transfer.resample import (
    BIG_VISION,
    HF,
    HF_DINOV2_REGISTERS,
    OPEN_CLIP,
    OURS,
    TIMM,
    Resampling,
)
from weight_transfer.timm_arch import timm_config_json, timm_hub_config
from weight_transfer.table import Rule, base_shapes, rule
from weight_transfer.transforms import (
    BATCH_AXIS,
    FUSE_2,
    LINEAR,
    FUSE_QKV,
    IDENTITY,
    Transform,
    bias_heads,
    heads_in,
    heads_out,
)


def renamed(ours: str, theirs: str, leaves: Iterable[str] = ("weight", "bias")) -> tuple[Rule, ...]:
    return tuple(rule(f"{ours}.{leaf}", f"{theirs}.{leaf}") for leaf in leaves)


def fused(ours: Iterable[str], theirs: str, transform: Transform,
          leaves: tuple[str, ...] = ("weight", "bias"),
          suffix: tuple[str, ...] = (".weight", ".bias")) -> tuple[Rule, ...]:
    """Linears stacked by rows into one (timm's qkv, kv, packed SwiGLU fc1; torch
    MultiheadAttention's `in_proj_weight`), weight and bias."""
    ours = tuple(ours)
    return tuple(rule(tuple(f"{o}.{leaf}" for o in ours), f"{theirs}{end}", transform)
                 for leaf, end in zip(leaves, suffix, strict=True))


def timm_mlp(ours: str, theirs: str, mlp: str) -> tuple[Rule, ...]:
    """Plain fc1/fc2; SwiGLU split as fc1_g/fc1_x (AIMv2) or packed in fc1, gate rows first
    (GluMlp, DINOv2-g)."""
    if mlp == "swiglu_packed":
        first = fused((f"{ours}.ff1_g", f"{ours}.ff1_x"), f"{theirs}.fc1", FUSE_2)
    else:
        first = (*renamed(f"{ours}.ff1", f"{theirs}.fc1"), *renamed(f"{ours}.ff1_g", f"{theirs}.fc1_g"),
                 *renamed(f"{ours}.ff1_x", f"{theirs}.fc1_x"))
    return (*first, *renamed(f"{ours}.ff2", f"{theirs}.fc2"))


def timm_table(config: ViTConfig) -> tuple[Rule, ...]:
    """timm `VisionTransformer` (and `VisionTransformerDistilled`). Rules whose parameters a
    config does not have are inactive, so one table serves the whole family."""
    b = "blocks.{}"
    return (
        *renamed("patch_embed", "patch_embed.proj"),
        *renamed("patch_norm", "patch_embed.norm"),
        rule("cls_token", "cls_token", BATCH_AXIS),  # (1, D) <-> (1, 1, D)
        rule("dist_token", "dist_token", BATCH_AXIS),
        rule("reg_tokens", "reg_token", BATCH_AXIS),  # (R, D) <-> (1, R, D)
        rule("pos_embed", "pos_embed", BATCH_AXIS),  # (P, D) <-> (1, P, D)
        *renamed("norm_pre", "norm_pre"),
        *renamed(f"{b}.ln1", f"{b}.norm1"),
        *fused([f"{b}.attn.{p}" for p in "qkv"], f"{b}.attn.qkv", FUSE_QKV),  # 3x (D, D) <-> (3D, D)
        *renamed(f"{b}.attn.q_norm", f"{b}.attn.q_norm"),
        *renamed(f"{b}.attn.k_norm", f"{b}.attn.k_norm"),
        *renamed(f"{b}.attn.o", f"{b}.attn.proj"),
        rule(f"{b}.ls1", f"{b}.ls1.gamma"),
        *renamed(f"{b}.ln2", f"{b}.norm2"),
        *timm_mlp(b, f"{b}.mlp", config.mlp),
        rule(f"{b}.ls2", f"{b}.ls2.gamma"),
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
    """HF DeiTForImageClassificationWithTeacher: ViT's names under `deit.`, two classifiers."""
    vit = tuple(r for r in hf_table(config, "deit.") if not r.right[0].startswith("classifier"))
    return (*vit, rule("dist_token", "deit.embeddings.distillation_token", BATCH_AXIS),
            *renamed("head", "cls_classifier"), *renamed("head_dist", "distillation_classifier"))


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
        *((*renamed("blocks.{}.ff1", f"{b}.mlp.fc1"), *renamed("blocks.{}.ff2", f"{b}.mlp.fc2"))
          if config.mlp == "mlp" else  # SwiGLU, packed gate first
          (*fused(("blocks.{}.ff1_g", "blocks.{}.ff1_x"), f"{b}.mlp.weights_in", FUSE_2),
           *renamed("blocks.{}.ff2", f"{b}.mlp.weights_out"))),
        rule("blocks.{}.ls2", f"{b}.layer_scale2.lambda1"),
        *renamed("ln_f", "layernorm"),
        *renamed("head", "classifier"),
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
    the MAP `head` with a fused [q; k; v] `in_proj` as torch's MultiheadAttention stores it."""
    return (
        *hf_encoder_table(),
        *renamed("ln_f", "post_layernorm"),
        rule("map.probe", "head.probe", BATCH_AXIS),
        *fused(("map.attn.q", "map.attn.k", "map.attn.v"), "head.attention.in_proj", FUSE_QKV,
               leaves=("weight", "bias"), suffix=("_weight", "_bias")),
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
        *(r for n, theirs in zip("qkvo", ("q_proj", "k_proj", "v_proj", "out_proj"), strict=True)
          for r in renamed(f"blocks.{{}}.attn.{n}", f"{b}.self_attn.{theirs}")),
        *renamed("blocks.{}.ln2", f"{b}.layer_norm2"),
        *renamed("blocks.{}.ff1", f"{b}.mlp.fc1"),
        *renamed("blocks.{}.ff2", f"{b}.mlp.fc2"),
    )


def open_clip_table(config: ViTConfig) -> tuple[Rule, ...]:
    """open_clip / OpenAI CLIP `visual.*` (kept by the normaliser; the text tower left out):
    `class_embedding` (D,), `positional_embedding` (N + 1, D), torch MultiheadAttention's fused
    `in_proj`, `ln_post` on the tokens before the class token is taken, and `proj` (D, E), the
    bias-free projection encode_image ends with, stored (in, out)."""
    b = "transformer.resblocks.{}"
    return (
        rule("patch_embed.weight", "conv1.weight"),
        rule("cls_token", "class_embedding", BATCH_AXIS.reversed()),  # (1, D) <-> (D,)
        rule("pos_embed", "positional_embedding"),
        *renamed("norm_pre", "ln_pre"),
        *renamed("blocks.{}.ln1", f"{b}.ln_1"),
        *fused([f"blocks.{{}}.attn.{p}" for p in "qkv"], f"{b}.attn.in_proj", FUSE_QKV,
               suffix=("_weight", "_bias")),
        *renamed("blocks.{}.attn.o", f"{b}.attn.out_proj"),
        *renamed("blocks.{}.ln2", f"{b}.ln_2"),
        *renamed("blocks.{}.ff1", f"{b}.mlp.c_fc"),
        *renamed("blocks.{}.ff2", f"{b}.mlp.c_proj"),
        *renamed("ln_f", "ln_post"),
        rule("head.weight", "proj", LINEAR),  # (E, D) <-> (D, E)
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


def fold_cls_position(cls, pos):
    """Ours (CLS gets pos row 0) -> big_vision (pos added before CLS joins): (1,1,D), (1,N,D)."""
    return (cls + pos[:1])[None], pos[None, 1:]


def unfold_cls_position(cls, pos):
    """big_vision -> ours: the CLS row's position is zero, its token already holds any offset."""
    return cls[0], np.concatenate([np.zeros_like(pos[0, :1]), pos[0]], axis=0)


CLS_POSITION_FOLD = Transform("fold_cls_position", fold_cls_position, unfold_cls_position,
                              arity=(2, 2))


def flax_mha(ours: str, theirs: str, heads: int) -> tuple[Rule, ...]:
    """flax MultiHeadDotProductAttention: q/k/v kernels (D, heads, hd), biases (heads, hd),
    the output kernel (heads, hd, D)."""
    rules = []
    for o, t in (("q", "query"), ("k", "key"), ("v", "value")):
        rules += [rule(f"{ours}.{o}.kernel", f"{theirs}/{t}/kernel", heads_in(heads)),  # (D, D) <-> (D, H, hd)
                  rule(f"{ours}.{o}.bias", f"{theirs}/{t}/bias", bias_heads(heads))]  # (D,) <-> (H, hd)
    return (*rules, rule(f"{ours}.o.kernel", f"{theirs}/out/kernel", heads_out(heads)),  # (D, D) <-> (H, hd, D)
            rule(f"{ours}.o.bias", f"{theirs}/out/bias"))


def npz_table(config: ViTConfig, variant: str) -> tuple[Rule, ...]:
    """google-research ViT (`variant="vit"`) or big_vision (`"bv"`) npz, over the NNX layout.
    big_vision adds `pos_embedding` to the patches before the class token joins: our
    `pos_embed_tokens="none"`, mapped as is; a config whose class token has a position is
    written with that position folded into the token (the same function, not the same bytes)."""
    h = config.num_heads
    mha, ln2, mlp = ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3") \
        if variant == "vit" else ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
    block = "Transformer/encoderblock_{}"
    if variant == "vit":
        embeddings = (rule("cls_token", "cls", BATCH_AXIS),
                      rule("pos_embed", "Transformer/posembed_input/pos_embedding", BATCH_AXIS))
    elif config.class_token and config.pos_embed_tokens != "none":
        embeddings = (rule(("cls_token", "pos_embed"), ("cls", "pos_embedding"), CLS_POSITION_FOLD),)
    else:
        embeddings = (rule("cls_token", "cls", BATCH_AXIS),
                      rule("pos_embed", "pos_embedding", BATCH_AXIS))
    return (
        *flax_renamed("patch_embed", "embedding", ("kernel", "bias")),  # HWIO on both sides
        *embeddings,
        *flax_renamed("blocks.{}.ln1", f"{block}/LayerNorm_0", ("scale", "bias")),
        *flax_mha("blocks.{}.attn", f"{block}/{mha}", h),
        *flax_renamed("blocks.{}.ln2", f"{block}/{ln2}", ("scale", "bias")),
        *flax_renamed("blocks.{}.ff1", f"{block}/{mlp}/Dense_0", ("kernel", "bias")),
        *flax_renamed("blocks.{}.ff2", f"{block}/{mlp}/Dense_1", ("kernel", "bias")),
        *flax_renamed("ln_f", "Transformer/encoder_norm", ("scale", "bias")),
        rule("map.probe", "MAPHead_0/probe", BATCH_AXIS),  # (1, D) <-> (1, 1, D)
        *flax_mha("map.attn", "MAPHead_0/MultiHeadDotProductAttention_0", h),
        *flax_renamed("map.norm", "MAPHead_0/LayerNorm_0", ("scale", "bias")),
        *flax_renamed("map.ff1", "MAPHead_0/MlpBlock_0/Dense_0", ("kernel", "bias")),
        *flax_renamed("map.ff2", "MAPHead_0/MlpBlock_0/Dense_1", ("kernel", "bias")),
        *flax_renamed("head", "head", ("kernel", "bias")),
    )


def google_vit_table(config: ViTConfig) -> tuple[Rule, ...]:
    return npz_table(config, "vit")


def big_vision_table(config: ViTConfig) -> tuple[Rule, ...]:
    return npz_table(config, "bv")


def flax_renamed(ours: str, theirs: str, leaves: Iterable[str]) -> tuple[Rule, ...]:
    return tuple(rule(f"{ours}.{leaf}", f"{theirs}/{leaf}") for leaf in leaves)


def ours(base: str) -> Callable[[ViTConfig], tuple[Rule, ...]]:
    """One of our own layouts as a table of identities over its own keys."""

    def table(config: ViTConfig) -> tuple[Rule, ...]:
        return tuple(rule(k, k, IDENTITY) for k in base_shapes(base, config))

    return table


@dataclass(frozen=True)
class Layout:
    """One published layout: its table over one of our base layouts, and everything else the
    tool needs to know about it, declared here rather than tested for by name elsewhere."""

    name: str
    base: str  # "nnx" or "torch": the layout of the table's left column
    table: Callable[[ViTConfig], tuple[Rule, ...]]
    marker: str  # a key pattern that identifies the layout
    description: str
    container: str = "safetensors"  # what `--to` writes: "safetensors", "folder" (HF), "npz",
    # "orbax" (a folder)
    writable: bool = True
    priority: int = 0  # detection tries higher first (where another layout's marker also matches)
    aliases: tuple[str, ...] = ()
    # What the file cannot say and this layout's own code assumes: field -> (value, why).
    assumes: Mapping[str, tuple[Any, str]] = field(default_factory=dict)
    heads_in_kernel: bool = False  # q kernels stored (D, heads, head_dim): heads are found
    prefix_positions: bool = True  # the position table has rows for the prefix tokens too
    pool: str | None = None  # the pooling the layout's architecture always uses, if it does
    # A config.json beside the weights: its fields (`hf_config_fields`) and the one we write.
    read_config_json: Callable[[Mapping[str, Any], Path],
                               tuple[dict[str, Any], dict[str, str]]] | None = None
    write_config_json: Callable[[ViTConfig], dict[str, Any]] | None = None
    # Key names brought to the table's (ViTModel -> ViTForImageClassification): the new
    # source and what was dropped.
    normalise: Callable[[Source], tuple[Source, list[str]]] | None = None
    # The published name of a table key when we write (the inverse of what `normalise`
    # strips: `vision_model.`, `dinov2.` before a classifier...).
    published: Callable[[str, ViTConfig], str] | None = None
    # Tensors the publisher's class has and we do not compute with (DINOv2's mask token),
    # written as that class initialises them: {table key: shape} -> zeros.
    unused: Callable[[ViTConfig], dict[str, tuple[int, ...]]] | None = None
    # Raises for a model the layout's library cannot compute (a folder layout's
    # write_config_json does it too: see `check_model`).
    check_writable: Callable[[ViTConfig], Any] | None = None
    # How the layout's own library resamples the position table to another grid (its loader,
    # or its forward with interpolate_pos_encoding): the default for `image_size=`.
    resampling: Callable[[ViTConfig], Resampling] = lambda config: OURS
    # Published models whose bare weights carry exactly this layout's keys and shapes but
    # compute another function (positions also rotary): what a file alone cannot rule out.
    lookalikes: str = ""

    def writes_folder(self, path: Path) -> bool:
        """Whether writing to `path` makes a folder: HF types and Orbax always, timm (a Hub
        folder) unless the name ends in .safetensors."""
        return self.container in ("folder", "orbax") or (
            self.write_config_json is not None and not path.suffix)

    def check_model(self, config: ViTConfig) -> None:
        """Raise, naming the field, for a model this layout's library cannot compute: before
        anything is planned or read."""
        if self.check_writable is not None:
            self.check_writable(config)
        elif self.container == "folder" and self.write_config_json is not None:
            self.write_config_json(config)  # the config.json writers refuse what they cannot say


_GELU = ("gelu", "exact GELU (timm, torch)")
_TANH = ("gelu_tanh", "tanh GELU (flax nn.gelu's default, big_vision)")
_EPS6 = (1e-6, "1e-6 (timm, flax)")
_HF = dict(container="folder", pool="cls", read_config_json=hf_config_fields,
           write_config_json=hf_config_json, normalise=normalise_hf, resampling=lambda c: HF)

def _dinov2_name(key: str, config: ViTConfig) -> str:
    """Dinov2Model's names are bare; a classifier's backbone sits under its model type."""
    if not config.num_classes or key.startswith("classifier."):
        return key
    return ("dinov2_with_registers." if config.reg_tokens else "dinov2.") + key


LAYOUTS: dict[str, Layout] = {l.name: l for l in (
    Layout("nnx", "nnx", ours("nnx"), r"^blocks\.\d+\.attn\.q\.kernel$|^ln_f\.scale$",
           "jax_impl.ViT flat NNX state", assumes=dict(activation=_GELU, ln_eps=_EPS6)),
    Layout("orbax", "nnx", ours("nnx"), r"^blocks\.\d+\.attn\.q\.kernel$|^ln_f\.scale$",
           "jax_impl.ViT NNX state as an Orbax checkpoint (a folder: state/ + vit_parity.json)",
           container="orbax", assumes=dict(activation=_GELU, ln_eps=_EPS6)),
    Layout("torch", "torch", ours("torch"), r"^blocks\.\d+\.attn\.q\.weight$|^ln_f\.weight$",
           "torch_impl.ViT state dict", assumes=dict(activation=_GELU, ln_eps=_EPS6)),
    Layout("timm", "torch", timm_table,
           r"^blocks\.\d+\.attn\.qkv\.weight$|^patch_embed\.proj\.weight$",
           "timm VisionTransformer state dict (or Hub folder)", read_config_json=timm_config_json,
           write_config_json=timm_hub_config, resampling=lambda c: TIMM,
           lookalikes="Perception Encoder (timm vit_pe_core_*, vit_pe_spatial_*) has these "
           "keys and also rotates q and k (RoPE), which this ViT does not compute",
           assumes=dict(activation=_GELU, ln_eps=_EPS6)),
    Layout("hf", "torch", hf_table,
           r"^(vit\.)?encoder\.layer\.\d+\.|^(vit\.)?embeddings\.patch_embeddings",
           "Hugging Face transformers ViT (checkpoint names)", **_HF),
    Layout("hf5", "torch", hf5_table, r"^(vit\.)?layers\.\d+\.attention\.q_proj",
           "Hugging Face transformers 5 ViT (in-memory names)", writable=False, priority=1,
           **_HF),
    Layout("hf_deit", "torch", deit_table, r"^deit\.embeddings\.distillation_token$",
           "Hugging Face DeiTForImageClassificationWithTeacher", container="folder",
           priority=2, read_config_json=hf_config_fields, write_config_json=deit_config_json,
           pool="cls", resampling=lambda c: HF),
    Layout("hf_dinov2", "torch", dinov2_table,
           r"(^|\.)embeddings\.mask_token$|(^|\.)layer_scale1\.lambda1$",
           "Hugging Face Dinov2 / Dinov2WithRegisters (model, or image classification)",
           container="folder", priority=2, pool="cls", read_config_json=dinov2_config_fields,
           write_config_json=dinov2_config_json, published=_dinov2_name,
           resampling=lambda c: HF_DINOV2_REGISTERS if c.reg_tokens else HF,
           unused=lambda c: {"embeddings.mask_token": (1, c.d_model)},
           normalise=renaming(strip=("dinov2.", "dinov2_with_registers."),
                              drop=(("embeddings.mask_token", "the mask token (unused at "
                                     "inference)"), ("dinov2.embeddings.mask_token",
                                                     "the mask token (unused at inference)")))),
    Layout("hf_clip", "torch", clip_table, r"(^|\.)embeddings\.class_embedding$",
           "Hugging Face CLIP vision tower (CLIPVisionModel[WithProjection], or a whole CLIP "
           "repo: the text tower is left out)", container="folder", priority=2,
           pool="cls", read_config_json=clip_config_fields, write_config_json=clip_config_json,
           resampling=lambda c: HF,
           published=lambda key, c: key if key.startswith("visual_projection.")
           else f"vision_model.{key}",
           normalise=renaming(strip=("vision_model.",), drop=(
               ("text_model.", "the text tower"), ("text_projection", "the text tower"),
               ("logit_scale", "the text tower")))),
    Layout("hf_siglip", "torch", siglip_table,
           r"(^|\.)embeddings\.patch_embedding\.weight$",
           "Hugging Face SigLIP vision tower (SiglipVisionModel, or a whole SigLIP repo: the "
           "text tower is left out)", container="folder", priority=1,
           read_config_json=siglip_config_fields, write_config_json=siglip_config_json,
           resampling=lambda c: HF,
           published=lambda key, c: f"vision_model.{key}",
           normalise=renaming(strip=("vision_model.",), drop=(
               ("text_model.", "the text tower"), ("logit_scale", "the text tower"),
               ("logit_bias", "the text tower")))),
    Layout("open_clip", "torch", open_clip_table,
           r"^(visual\.)?transformer\.resblocks\.\d+\.|^(visual\.)?class_embedding$",
           "open_clip / OpenAI CLIP image tower (visual.*; the text tower is left out)",
           priority=2, pool="cls", published=lambda key, c: f"visual.{key}",
           resampling=lambda c: OPEN_CLIP,
           check_writable=lambda c: require(
               c, "open_clip's VisionTransformer", **{**PLAIN, "norm_pre": True,
                                                      "patch_bias": False},
               class_token=True, pool="cls", final_norm="pre_pool", pos_embed_tokens="all",
               head_bias=False),
           normalise=renaming(strip=("visual.",), keep_only_stripped="the text tower"),
           assumes=dict(activation=("gelu", "exact GELU (open_clip's default; OpenAI CLIP "
                                    "weights run QuickGELU: --arch NAME-quickgelu or --set "
                                    "activation=quick_gelu)"),
                        ln_eps=(1e-5, "1e-5 (open_clip, torch LayerNorm)"))),
    Layout("google_vit", "nnx", google_vit_table, r"(^|/)Transformer/posembed_input/pos_embedding$",
           "google-research/vision_transformer npz (read by timm's _load_weights)",
           container="npz", heads_in_kernel=True, normalise=normalise_npz,
           resampling=lambda c: BIG_VISION, assumes=dict(activation=_TANH, ln_eps=_EPS6)),
    Layout("big_vision", "nnx", big_vision_table, r"(^|/)pos_embedding$",
           "big_vision npz (position embedding added before the class token joins)",
           container="npz", heads_in_kernel=True, prefix_positions=False,
           normalise=normalise_npz, aliases=("big_vision_bv",),
           resampling=lambda c: BIG_VISION,
           assumes=dict(activation=_TANH, ln_eps=_EPS6)),
)}
ALIASES = {alias: l.name for l in LAYOUTS.values() for alias in l.aliases}
WRITABLE = tuple(name for name, l in LAYOUTS.items() if l.writable)


def get_layout(name: str) -> Layout:
    if name in ALIASES:
        return LAYOUTS[ALIASES[name]]
    if name not in LAYOUTS:
        raise LayoutError(f"unknown layout {name!r}; known: {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


def detect_layout(keys: Iterable[str], container: str | None = None) -> Layout:
    """The layout whose marker the keys carry, higher `priority` first (hf5 shares a marker
    with hf); every layout in `LAYOUTS` is tried. Keys in an Orbax folder (`container`
    "orbax") are read as the Orbax layout, which only such a folder can hold."""
    keys = list(keys)
    for layout in sorted(LAYOUTS.values(), key=lambda l: -l.priority):
        if (layout.container == "orbax") != (container == "orbax"):
            continue
        if any(re.search(layout.marker, k) for k in keys):
            return layout
    sample = ", ".join(sorted(keys)[:5]) or "(no tensors)"
    raise LayoutError(f"cannot tell the layout from the keys (first: {sample}); known layouts: "
                      f"{', '.join(LAYOUTS)}; pass layout=... (--from) to say which")
