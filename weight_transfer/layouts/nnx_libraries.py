"""Other NNX ViT libraries' states, by the names their modules give their parameters.

`bonsai_vit`: jax-ml/bonsai's `bonsai.models.vit.modeling.ViTClassificationModel` (read from
its source at commit 3628425; bonsai is not on PyPI), an `nnx.state(model, nnx.Param)` saved
as an Orbax folder, a msgpack tree or flat safetensors: `pos_embeddings.projection` (the patch
conv, HWIO), `pos_embeddings.cls_token` and `.pos_embeddings`, `layers.{i}` with
`nnx.MultiHeadAttention` (`query`/`key`/`value` kernels (D, heads, hd), `out` (heads, hd, D)),
`linear1`/`linear2`, `layernorm_before`/`layernorm_after`, then `ln` and `classifier`. Its MLP
calls `jax.nn.gelu`, whose default is the tanh approximation (HF's ViT, which it ports, is
exact): assumed, as bonsai computes it, and stated otherwise with `--set activation=gelu`.
Written as a flat safetensors of those names (`nnx.update` of their state by path loads it).

`jimm_vit`, `jimm_clip`, `jimm_siglip`: pythoncrazy/jimm's `VisionTransformer`, the image
tower of its `CLIP` (with `visual_projection`) and of its `SigLIP` (read from its source at
commit 73f4bfb; the PyPI `jimm` is an unrelated placeholder, and the repository has no
licence, so its code is not vendored: the tests' oracle is tests/fixtures/jimm.json, what
jimm's own models computed). jimm has no save of its own: a state is `nnx.state(model)` as
a training loop saves it (Orbax, msgpack) or flat. All three share `VisionTransformerBase`
(`patch_embeddings`, `cls_token` or `MAPHead`, `position_embeddings`, `ln_pre`,
`transformer.blocks.layers.{i}` with `norm1`, `nnx.MultiHeadAttention` `attn`, `norm2`,
`mlp.layers.{0,3}`, then `ln_post` over every token); a CLIP or SigLIP state's text tower is
left out. What the classes fix is laid over the file: the blocks' norms always compute with
1e-6 (`Transformer`'s default: `VisionTransformerBase` does not pass its epsilon on), the
outer norms with the model's (1e-12 ViT, 1e-5 CLIP, 1e-6 SigLIP); CLIP's MLP is QuickGELU,
SigLIP's `nnx.gelu` (tanh). The ViT's activation is assumed aloud: `nnx.gelu` (tanh), unless
it was built with `use_quick_gelu`. Written as a flat safetensors of jimm's names; a CLIP or
SigLIP tower's state updates that part of the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vit_config import ViTConfig
from weight_transfer.core.errors import LayoutError
from weight_transfer.core.resample import Resampling
from weight_transfer.core.table import Rule, rule
from weight_transfer.core.transforms import BATCH_AXIS
from weight_transfer.formats.checkpoint import Source
from weight_transfer.layouts.base import (
    ASSUME_TANH,
    PLAIN,
    Layout,
    flax_mha,
    flax_renamed,
    renaming,
    require,
)

# bonsai resizes its table in the forward with jax.image.resize(method="bicubic"): Keys' cubic
# with a = -0.5, antialiased when shrinking, which none of our methods is: said whenever used
NOT_BONSAIS = Resampling(
    "bicubic",
    False,
    "torch's bicubic, NOT bonsai's own jax.image.resize (Keys a=-0.5), which is not implemented",
)


def bonsai_table(config: ViTConfig) -> tuple[Rule, ...]:
    b = "layers.{}"
    ln, dense = ("scale", "bias"), ("kernel", "bias")
    return (
        *flax_renamed("patch_embed", "pos_embeddings.projection", dense, "."),  # HWIO both
        rule("cls_token", "pos_embeddings.cls_token", BATCH_AXIS),
        rule("pos_embed", "pos_embeddings.pos_embeddings", BATCH_AXIS),
        *flax_renamed("blocks.{}.ln1", f"{b}.layernorm_before", ln, "."),
        *flax_mha("blocks.{}.attn", f"{b}.attention", config.num_heads, "."),
        *flax_renamed("blocks.{}.ln2", f"{b}.layernorm_after", ln, "."),
        *flax_renamed("blocks.{}.ff1", f"{b}.linear1", dense, "."),
        *flax_renamed("blocks.{}.ff2", f"{b}.linear2", dense, "."),
        *flax_renamed("ln_f", "ln", ln, "."),
        *flax_renamed("head", "classifier", dense, "."),
    )


def _bonsai_holds(config: ViTConfig) -> None:
    require(
        config,
        "bonsai's ViTClassificationModel",
        **PLAIN,
        class_token=True,
        pool="cls",
        final_norm="pre_pool",
        pos_embed_tokens="all",
        qkv_bias=True,
        head_bias=True,
    )
    if not config.num_classes:
        require(
            config, "bonsai's ViTClassificationModel (it always has a classifier)", num_classes=1
        )


JIMM_COMMIT = "73f4bfb"
LN, DENSE = ("scale", "bias"), ("kernel", "bias")


@dataclass(frozen=True)
class Jimm:
    """One of jimm's models: where its image tower lies, and what its class fixes."""

    name: str
    cls: str  # jimm's class
    tower: str  # the VisionTransformerBase's attribute
    head: tuple[str, tuple[str, ...]] | None  # (its name, its leaves) after the tower
    computes: dict  # the fields its class fixes, beside PLAIN's
    ln_eps: float  # the outer norms' (the blocks' are always 1e-6)
    marker: str  # a key only its states hold


JIMM_BLOCK_EPS = 1e-6  # jimm's Transformer default, which VisionTransformerBase never overrides

JIMMS = (
    Jimm(
        "jimm_vit",
        "VisionTransformer",
        "encoder",
        ("classifier", DENSE),
        dict(class_token=True, pool="cls", patch_bias=True, head_bias=True),
        1e-12,
        r"(^|\.)encoder\.transformer\.blocks\.layers\.0\.norm1\.scale$",
    ),
    Jimm(
        "jimm_clip",
        "CLIP",
        "vision_model",
        ("visual_projection", ("kernel",)),
        dict(
            class_token=True,
            pool="cls",
            norm_pre=True,
            patch_bias=False,
            head_bias=False,
            activation="quick_gelu",
        ),
        1e-5,
        r"(^|\.)vision_model\.ln_pre\.scale$",
    ),
    Jimm(
        "jimm_siglip",
        "SigLIP",
        "vision_model",
        None,
        dict(class_token=False, pool="map", patch_bias=True, activation="gelu_tanh", num_classes=0),
        1e-6,
        r"(^|\.)vision_model\.MAPHead\.probe$",
    ),
)


def jimm_table(model: Jimm):
    t, c = model.tower, model.computes
    b = f"{t}.transformer.blocks.layers.{{}}"
    head = () if model.head is None else flax_renamed("head", *model.head, ".")
    prefix = (rule("cls_token", f"{t}.cls_token", BATCH_AXIS),) if c["class_token"] else ()
    norm_pre = flax_renamed("norm_pre", f"{t}.ln_pre", LN, ".") if c.get("norm_pre") else ()

    def table(config: ViTConfig) -> tuple[Rule, ...]:
        pool = (
            ()
            if c["pool"] != "map"
            else (
                rule("map.probe", f"{t}.MAPHead.probe", BATCH_AXIS),  # (1, D) <-> (1, 1, D)
                *flax_mha("map.attn", f"{t}.MAPHead.attn", config.map_num_heads, "."),
                *flax_renamed("map.norm", f"{t}.MAPHead.layernorm", LN, "."),
                *flax_renamed("map.ff1", f"{t}.MAPHead.mlp.layers.0", DENSE, "."),
                *flax_renamed("map.ff2", f"{t}.MAPHead.mlp.layers.2", DENSE, "."),
            )
        )
        return (
            *flax_renamed("patch_embed", f"{t}.patch_embeddings", DENSE, "."),  # HWIO both
            *prefix,
            rule("pos_embed", f"{t}.position_embeddings", BATCH_AXIS),
            *norm_pre,
            *flax_renamed("blocks.{}.ln1", f"{b}.norm1", LN, "."),
            *flax_mha("blocks.{}.attn", f"{b}.attn", config.num_heads, "."),
            *flax_renamed("blocks.{}.ln2", f"{b}.norm2", LN, "."),
            *flax_renamed("blocks.{}.ff1", f"{b}.mlp.layers.0", DENSE, "."),
            *flax_renamed("blocks.{}.ff2", f"{b}.mlp.layers.3", DENSE, "."),  # 1: act, 2: drop
            *flax_renamed("ln_f", f"{t}.ln_post", LN, "."),
            *pool,
            *head,
        )

    return table


def jimm_fixes(model: Jimm) -> dict:
    """What jimm's class computes whatever the file: its epsilons, and its activation (but
    the ViT's, which its `use_quick_gelu` chooses)."""
    blocks = None if model.ln_eps == JIMM_BLOCK_EPS else JIMM_BLOCK_EPS
    fixed = dict(ln_eps=model.ln_eps, block_ln_eps=blocks)
    return {**fixed, **{k: v for k, v in model.computes.items() if k == "activation"}}


def jimm_class_fields(model: Jimm):
    def class_fields(source: Source) -> tuple[dict[str, Any], dict[str, str], dict[str, str]]:
        return jimm_fixes(model), {}, {}

    return class_fields


def jimm_holds(model: Jimm):
    def check(config: ViTConfig) -> None:
        what = f"jimm's {model.cls}"
        fixed = dict(
            PLAIN,
            **model.computes,
            ln_eps=model.ln_eps,
            block_eps=JIMM_BLOCK_EPS,
            final_norm="pre_pool",
            pos_embed=True,
            pos_embed_tokens="all",
            qkv_bias=True,
        )
        if "activation" not in fixed and config.activation != "quick_gelu":
            fixed["activation"] = "gelu_tanh"  # or quick_gelu: its use_quick_gelu
        if model.tower == "vision_model":  # CLIP and SigLIP derive these from the width
            fixed.update(d_ff=4 * config.d_model, num_heads=max(1, config.d_model // 64))
        if model.head is not None and model.head[1] == ("kernel",) and not config.num_classes:
            fixed["num_classes"] = "a projection width"  # CLIP always has visual_projection
        require(config, what, **fixed)
        h, w = config.image_hw
        if h != w:
            raise LayoutError(
                f"{what} cannot hold this model: image_size={config.image_size!r} "
                "(it builds square images only)"
            )

    return check


_TEXT_TOWER = tuple(
    (prefix, "the text tower")
    for prefix in (
        "text_model.",
        "token_embedding.",
        "positional_embedding",
        "ln_final.",
        "text_projection.",
        "logit_scale",
        "logit_bias",
    )
)

# jimm's models run at the size they were built for: no resampling of their own
NOT_JIMMS = Resampling(
    "bicubic", False, "vit-parity's default: jimm's models do not resample their table"
)

LAYOUTS = (
    *(
        Layout(
            m.name,
            "nnx",
            jimm_table(m),
            m.marker,
            f"pythoncrazy/jimm {m.cls} NNX state"
            + ("" if m.tower == "encoder" else " (its image tower; the text tower is left out)"),
            heads_in_kernel=True,
            pool=m.computes["pool"],
            class_fields=jimm_class_fields(m),
            check_writable=jimm_holds(m),
            resampling=lambda c: NOT_JIMMS,
            normalise=None if m.tower == "encoder" else renaming(drop=_TEXT_TOWER),
            computes=("block_ln_eps",),
            assumes=(
                dict(
                    activation=(
                        ASSUME_TANH[0],
                        "tanh GELU (jimm's nnx.gelu, unless its use_quick_gelu was set)",
                    )
                )
                if "activation" not in m.computes
                else {}
            ),
        )
        for m in JIMMS
    ),
    Layout(
        "bonsai_vit",
        "nnx",
        bonsai_table,
        r"(^|\.)pos_embeddings\.pos_embeddings$",
        "jax-ml/bonsai ViTClassificationModel NNX state",
        heads_in_kernel=True,
        pool="cls",
        check_writable=_bonsai_holds,
        resampling=lambda c: NOT_BONSAIS,
        assumes=dict(
            activation=ASSUME_TANH,
            ln_eps=(1e-12, "1e-12 (bonsai's only config, vit_p16_224, HF's ViT epsilon)"),
        ),
    ),
)
