"""The layouts the ecosystem publishes, each one table over one of our two layouts.

| layout       | base  | what                                                                  |
|--------------|-------|-----------------------------------------------------------------------|
| `nnx`        | nnx   | `jax_impl.ViT` flat NNX paths (`blocks.0.attn.q.kernel`)              |
| `torch`      | torch | `torch_impl.ViT` state dict (`blocks.0.attn.q.weight`)                |
| `timm`       | torch | timm `VisionTransformer`: fused `qkv`, `(1, N+1, D)` pos_embed        |
| `hf`         | torch | HF transformers ViT, the names on published checkpoints (v4)          |
| `hf5`        | torch | HF transformers 5 in-memory names (`vit.layers.{i}.attention.q_proj`) |
| `big_vision` | nnx   | google-research/vision_transformer npz (`/`-joined, read by timm)     |
| `big_vision_bv` | nnx | big_vision npz: `pos_embedding` added before the CLS token          |

`base` says which of our flat layouts the table's left column uses; `table.nnx_torch` links
the two.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from vit_config import ViTConfig, VitParityError
from weight_transfer.table import Rule, base_shapes, rule
from weight_transfer.transforms import (
    BATCH_AXIS,
    FUSE_QKV,
    IDENTITY,
    Transform,
    bias_heads,
    heads_in,
    heads_out,
)


def renamed(ours: str, theirs: str, leaves: Iterable[str] = ("weight", "bias")) -> tuple[Rule, ...]:
    return tuple(rule(f"{ours}.{leaf}", f"{theirs}.{leaf}") for leaf in leaves)


def timm_table(config: ViTConfig) -> tuple[Rule, ...]:
    qkv = tuple(f"blocks.{{}}.attn.{p}" for p in "qkv")
    return (
        *renamed("patch_embed", "patch_embed.proj"),
        rule("cls_token", "cls_token", BATCH_AXIS),  # (1, D) <-> (1, 1, D)
        rule("pos_embed", "pos_embed", BATCH_AXIS),  # (N + 1, D) <-> (1, N + 1, D)
        *renamed("blocks.{}.ln1", "blocks.{}.norm1"),
        rule(tuple(f"{p}.weight" for p in qkv), "blocks.{}.attn.qkv.weight", FUSE_QKV),  # 3x (D, D) <-> (3D, D)
        rule(tuple(f"{p}.bias" for p in qkv), "blocks.{}.attn.qkv.bias", FUSE_QKV),
        *renamed("blocks.{}.attn.o", "blocks.{}.attn.proj"),
        *renamed("blocks.{}.ln2", "blocks.{}.norm2"),
        *renamed("blocks.{}.ff1", "blocks.{}.mlp.fc1"),
        *renamed("blocks.{}.ff2", "blocks.{}.mlp.fc2"),
        *renamed("ln_f", "norm"),
        *renamed("head", "head"),
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


def big_vision_table(config: ViTConfig, variant: str = "vit") -> tuple[Rule, ...]:
    """google-research ViT (`variant="vit"`) or big_vision (`"bv"`) npz, over the NNX layout."""
    h = config.num_heads
    mha, ln2, mlp = ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3") \
        if variant == "vit" else ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
    block = "Transformer/encoderblock_{}"
    attn = f"{block}/{mha}"
    qkv_rules = []
    for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
        qkv_rules += [rule(f"blocks.{{}}.attn.{ours}.kernel", f"{attn}/{theirs}/kernel", heads_in(h)),  # (D, D) <-> (D, H, hd)
                      rule(f"blocks.{{}}.attn.{ours}.bias", f"{attn}/{theirs}/bias", bias_heads(h))]  # (D,) <-> (H, hd)
    if variant == "vit":
        embeddings = (rule("cls_token", "cls", BATCH_AXIS),
                      rule("pos_embed", "Transformer/posembed_input/pos_embedding", BATCH_AXIS))
    elif config.class_token:
        embeddings = (rule(("cls_token", "pos_embed"), ("cls", "pos_embedding"), CLS_POSITION_FOLD),)
    else:
        embeddings = (rule("pos_embed", "pos_embedding", BATCH_AXIS),)
    return (
        *flax_renamed("patch_embed", "embedding", ("kernel", "bias")),  # HWIO on both sides
        *embeddings,
        *flax_renamed("blocks.{}.ln1", f"{block}/LayerNorm_0", ("scale", "bias")),
        *qkv_rules,
        rule("blocks.{}.attn.o.kernel", f"{attn}/out/kernel", heads_out(h)),  # (D, D) <-> (H, hd, D)
        rule("blocks.{}.attn.o.bias", f"{attn}/out/bias"),
        *flax_renamed("blocks.{}.ln2", f"{block}/{ln2}", ("scale", "bias")),
        *flax_renamed("blocks.{}.ff1", f"{block}/{mlp}/Dense_0", ("kernel", "bias")),
        *flax_renamed("blocks.{}.ff2", f"{block}/{mlp}/Dense_1", ("kernel", "bias")),
        *flax_renamed("ln_f", "Transformer/encoder_norm", ("scale", "bias")),
        *flax_renamed("head", "head", ("kernel", "bias")),
    )


def flax_renamed(ours: str, theirs: str, leaves: Iterable[str]) -> tuple[Rule, ...]:
    return tuple(rule(f"{ours}.{leaf}", f"{theirs}/{leaf}") for leaf in leaves)


def ours(base: str) -> Callable[[ViTConfig], tuple[Rule, ...]]:
    """One of our own layouts as a table of identities over its own keys."""

    def table(config: ViTConfig) -> tuple[Rule, ...]:
        return tuple(rule(k, k, IDENTITY) for k in base_shapes(base, config))

    return table


@dataclass(frozen=True)
class Layout:
    name: str
    base: str  # "nnx" or "torch": the layout of the table's left column
    table: Callable[[ViTConfig], tuple[Rule, ...]]
    marker: str  # a key pattern only this layout has
    description: str


LAYOUTS: dict[str, Layout] = {l.name: l for l in (
    Layout("nnx", "nnx", ours("nnx"), r"^blocks\.\d+\.attn\.q\.kernel$|^ln_f\.scale$",
           "jax_impl.ViT flat NNX state"),
    Layout("torch", "torch", ours("torch"), r"^blocks\.\d+\.attn\.q\.weight$|^ln_f\.weight$",
           "torch_impl.ViT state dict"),
    Layout("timm", "torch", timm_table,
           r"^blocks\.\d+\.attn\.qkv\.weight$|^patch_embed\.proj\.weight$",
           "timm VisionTransformer state dict"),
    Layout("hf", "torch", hf_table,
           r"^(vit\.)?encoder\.layer\.\d+\.|^(vit\.)?embeddings\.patch_embeddings",
           "Hugging Face transformers ViT (checkpoint names)"),
    Layout("hf5", "torch", hf5_table, r"^(vit\.)?layers\.\d+\.attention\.q_proj",
           "Hugging Face transformers 5 ViT (in-memory names)"),
    Layout("big_vision", "nnx", big_vision_table, r"^Transformer/posembed_input/pos_embedding$",
           "google-research/vision_transformer npz"),
    Layout("big_vision_bv", "nnx", lambda c: big_vision_table(c, "bv"), r"^pos_embedding$",
           "big_vision npz (position embedding added before the CLS token)"),
)}


class LayoutError(VitParityError):
    """The keys match no known layout, or a layout was asked for by an unknown name."""


def get_layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise LayoutError(f"unknown layout {name!r}; known: {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


def detect_layout(keys: Iterable[str]) -> Layout:
    """The layout whose marker keys appear; hf5 is tested before hf (both have `embeddings`)."""
    keys = list(keys)
    order = ("hf5", "hf", "timm", "torch", "nnx", "big_vision", "big_vision_bv")
    for name in order:
        if any(re.search(LAYOUTS[name].marker, k) for k in keys):
            return LAYOUTS[name]
    sample = ", ".join(sorted(keys)[:5]) or "(no tensors)"
    raise LayoutError(f"cannot tell the layout from the keys (first: {sample}); known layouts: "
                      f"{', '.join(LAYOUTS)}; pass layout=... (--from) to say which")
