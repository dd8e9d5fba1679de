"""google-research/vision_transformer and big_vision npz checkpoints: one table for both
(flax's MultiHeadDotProductAttention kernels with heads in their shape), the published forms
brought to one set of names (prefixes, scanned encoders, pre_logits), and the two layouts. The
container is `formats.npz_io`."""

from __future__ import annotations

import numpy as np

from vit_config import ViTConfig
from weight_transfer.core.errors import CheckpointError
from weight_transfer.core.resample import BIG_VISION
from weight_transfer.core.table import Rule, rule
from weight_transfer.core.transforms import BATCH_AXIS, Transform
from weight_transfer.layouts.base import ASSUME_EPS6, ASSUME_TANH, Layout, flax_mha, flax_renamed


def fold_cls_position(cls, pos):
    """Ours (CLS gets pos row 0) -> big_vision (pos added before CLS joins): (1,1,D), (1,N,D)."""
    return (cls + pos[:1])[None], pos[None, 1:]


def unfold_cls_position(cls, pos):
    """big_vision -> ours: the CLS row's position is zero, its token already holds any offset."""
    return cls[0], np.concatenate([np.zeros_like(pos[0, :1]), pos[0]], axis=0)


CLS_POSITION_FOLD = Transform(
    "fold_cls_position", fold_cls_position, unfold_cls_position, arity=(2, 2)
)


def npz_table(config: ViTConfig, variant: str) -> tuple[Rule, ...]:
    """google-research ViT (`variant="vit"`) or big_vision (`"bv"`) npz, over the NNX layout.
    big_vision adds `pos_embedding` to the patches before the class token joins: our
    `pos_embed_tokens="none"`, mapped as is; a config whose class token has a position is
    written with that position folded into the token (the same function, not the same bytes)."""
    h = config.num_heads
    mha, ln2, mlp = (
        ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
        if variant == "vit"
        else ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
    )
    block = "Transformer/encoderblock_{}"
    embeddings: tuple[Rule, ...]
    if variant == "vit":
        embeddings = (
            rule("cls_token", "cls", BATCH_AXIS),
            rule("pos_embed", "Transformer/posembed_input/pos_embedding", BATCH_AXIS),
        )
    elif config.class_token and config.pos_embed_tokens != "none":
        embeddings = (
            rule(("cls_token", "pos_embed"), ("cls", "pos_embedding"), CLS_POSITION_FOLD),
        )
    else:
        embeddings = (
            rule("cls_token", "cls", BATCH_AXIS),
            rule("pos_embed", "pos_embedding", BATCH_AXIS),
        )
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
        *flax_mha("map.attn", "MAPHead_0/MultiHeadDotProductAttention_0", config.map_num_heads),
        *flax_renamed("map.norm", "MAPHead_0/LayerNorm_0", ("scale", "bias")),
        *flax_renamed("map.ff1", "MAPHead_0/MlpBlock_0/Dense_0", ("kernel", "bias")),
        *flax_renamed("map.ff2", "MAPHead_0/MlpBlock_0/Dense_1", ("kernel", "bias")),
        *flax_renamed("head", "head", ("kernel", "bias")),
    )


def google_vit_table(config: ViTConfig) -> tuple[Rule, ...]:
    return npz_table(config, "vit")


def big_vision_table(config: ViTConfig) -> tuple[Rule, ...]:
    return npz_table(config, "bv")


# Where published npz files keep the image model: google-research checkpoints saved with their
# optimiser state, big_vision, and the image tower of a SigLIP/LiT image-text model.
NPZ_PREFIXES = ("opt/target/", "params/img/", "params/")

SCANNED = "Transformer/encoderblock/"


def normalise_npz(source):
    """Published npz forms brought to one set of names: the prefix of the image model stripped
    (anything else under it reported as left out: a text tower, optimiser state), and a scanned
    encoder (`Transformer/encoderblock/...` with a leading layer axis) read as
    `Transformer/encoderblock_{i}/...`, each layer a slice taken when asked for. A
    `pre_logits` layer (the in21k representation layer) feeds the head: refused if there is a
    head, reported as dropped if not."""
    keys = list(source.meta)
    prefix = next((p for p in NPZ_PREFIXES if f"{p}embedding/kernel" in source.meta), None)
    if prefix is None:  # another model's image tower (openpi's PaliGemma/img/), or none
        stems = [k[: -len("embedding/kernel")] for k in keys if k.endswith("/embedding/kernel")]
        prefix = min(stems, key=len) if stems else ""
    renamed = {k[len(prefix) :]: (k, None) for k in keys if k.startswith(prefix)}
    dropped = (
        [
            f"{len(keys) - len(renamed)} tensor(s) outside {prefix!r} (a text tower, a "
            f"language model, optimiser state)"
        ]
        if len(renamed) < len(keys)
        else []
    )
    scanned = [k for k in renamed if k.startswith(SCANNED)]
    for key in scanned:
        original, _ = renamed.pop(key)
        shape, _ = source.meta[original]
        for i in range(shape[0]):
            renamed[f"Transformer/encoderblock_{i}/{key[len(SCANNED) :]}"] = (original, i)
    if any(k.startswith("pre_logits/") for k in renamed):
        if "head/kernel" in renamed:
            raise CheckpointError(
                f"{source.path}: a pre_logits layer (tanh(W x + b)) feeds the "
                f"head; this ViT has none, and dropping it changes the logits"
            )
        for k in [k for k in renamed if k.startswith("pre_logits/")]:
            del renamed[k]
        dropped.append("pre_logits (the in21k representation layer; no head reads it)")
    if not prefix and not scanned and not dropped:
        return source, []
    meta = {}
    for new, (original, index) in renamed.items():
        shape, dtype = source.meta[original]
        meta[new] = (shape[1:], dtype) if index is not None else (shape, dtype)
    load = source.load
    last: dict[str, np.ndarray] = {}  # the stacked member last read: layer i+1 reuses it

    def read(key):
        original, index = renamed[key]
        if index is None:
            return load(original)
        if original not in last:
            last.clear()
            last[original] = load(original)
        return last[original][index]

    return source.renamed(meta, read), dropped


LAYOUTS = (
    Layout(
        "google_vit",
        "nnx",
        google_vit_table,
        r"(^|/)Transformer/posembed_input/pos_embedding$",
        "google-research/vision_transformer npz (read by timm's _load_weights)",
        container="npz",
        heads_in_kernel=True,
        normalise=normalise_npz,
        resampling=lambda c: BIG_VISION,
        assumes=dict(activation=ASSUME_TANH, ln_eps=ASSUME_EPS6),
    ),
    Layout(
        "big_vision",
        "nnx",
        big_vision_table,
        r"(^|/)pos_embedding$",
        "big_vision npz (position embedding added before the class token joins)",
        container="npz",
        heads_in_kernel=True,
        prefix_positions=False,
        normalise=normalise_npz,
        aliases=("big_vision_bv",),
        resampling=lambda c: BIG_VISION,
        assumes=dict(activation=ASSUME_TANH, ln_eps=ASSUME_EPS6),
    ),
)
