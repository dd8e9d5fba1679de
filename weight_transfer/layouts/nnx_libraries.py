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

jimm (pythoncrazy/jimm) needs no layout: its `save_pretrained` writes Hugging Face's names
(read as `hf`, `hf_clip`, `hf_siglip`).
"""

from __future__ import annotations

from vit_config import ViTConfig
from weight_transfer.core.resample import Resampling
from weight_transfer.core.table import Rule, rule
from weight_transfer.core.transforms import BATCH_AXIS
from weight_transfer.layouts.base import ASSUME_TANH, PLAIN, Layout, flax_mha, flax_renamed, require

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


LAYOUTS = (
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
