"""The original DINOv3 release (facebookresearch/dinov3, `DinoVisionTransformer`), as its
hub checkpoints hold it: `storage_tokens` (registers), a fused `qkv` whose key bias a
`bias_mask` buffer zeroes, LayerScale `ls1.gamma`, a plain (`fc1`, `fc2`) or SwiGLU (`w1` gate,
`w2`, `w3`) MLP, and the RoPE periods the model was trained with (`rope_embed.periods`, a
persistent buffer). The file states its own periods, so they are read, not recomputed: equal
to `rope_theta`'s (to float32 rounding) they are recomputed in float64; otherwise (timm's
source says the released buffers were downcast to bfloat16) they are used as they are
(`rope_periods`), so the port computes what the original computes. timm (`checkpoint_filter_fn`)
and transformers drop the buffer and recompute theirs, so those numbers differ from the
original's by the periods' rounding."""

from __future__ import annotations

from typing import Any

import numpy as np

from vit_config import DINOV3_POSITIONS, ViTConfig
from weight_transfer.core.errors import CheckpointError
from weight_transfer.core.table import Rule, rule
from weight_transfer.core.transforms import BATCH_AXIS, FUSE_QKV, QV_MASKED_K
from weight_transfer.formats.checkpoint import Source
from weight_transfer.layouts.base import (
    PLAIN,
    Layout,
    Unused,
    fused,
    renamed,
    renaming,
    require,
)

PERIODS = "rope_embed.periods"
# What DINOv3's classes compute whatever the file (the original's DinoVisionTransformer, HF's
# DINOv3ViTModel): its positions, LayerScale, the normed class token out, no head.
FIXED: dict[str, Any] = dict(
    DINOV3_POSITIONS,
    class_token=True,
    layer_scale=True,
    pool="cls",
    final_norm="pre_pool",
    num_classes=0,
)
MASK = "blocks.{}.attn.qkv.bias_mask"


def dinov3_table(config: ViTConfig) -> tuple[Rule, ...]:
    """DinoVisionTransformer's parameters (its buffers are read by `class_fields` and written
    by `_buffers`)."""
    b = "blocks.{}"
    if not config.qkv_bias:
        biases: tuple[Rule, ...] = ()
    elif config.k_bias:  # mask_k_bias=False: a plain q|k|v bias
        biases = (rule(tuple(f"{b}.attn.{n}.bias" for n in "qkv"), f"{b}.attn.qkv.bias", FUSE_QKV),)
    else:  # mask_k_bias=True: the k third is zeroed by `bias_mask` in the forward
        biases = (
            rule((f"{b}.attn.q.bias", f"{b}.attn.v.bias"), f"{b}.attn.qkv.bias", QV_MASKED_K),
        )
    mlp = (
        (*renamed(f"{b}.ff1", f"{b}.mlp.fc1"), *renamed(f"{b}.ff2", f"{b}.mlp.fc2"))
        if config.mlp == "mlp"
        else (
            *renamed(f"{b}.ff1_g", f"{b}.mlp.w1"),
            *renamed(f"{b}.ff1_x", f"{b}.mlp.w2"),
            *renamed(f"{b}.ff2", f"{b}.mlp.w3"),
        )
    )
    return (
        *renamed("patch_embed", "patch_embed.proj"),
        rule("cls_token", "cls_token", BATCH_AXIS),
        rule("reg_tokens", "storage_tokens", BATCH_AXIS),
        *renamed(f"{b}.ln1", f"{b}.norm1"),
        *fused(
            [f"{b}.attn.{n}" for n in "qkv"], f"{b}.attn.qkv", FUSE_QKV, ("weight",), (".weight",)
        ),
        *biases,
        *renamed(f"{b}.attn.o", f"{b}.attn.proj"),
        rule(f"{b}.ls1", f"{b}.ls1.gamma"),
        *renamed(f"{b}.ln2", f"{b}.norm2"),
        *mlp,
        rule(f"{b}.ls2", f"{b}.ls2.gamma"),
        *renamed("ln_f", "norm"),
    )


_renaming = renaming(
    drop=(
        ("mask_token", "the mask token (unused at inference)"),
        ("local_cls_norm.", "the local-crop class norm (training only)"),
        ("projectors.", "EUPE's distillation projectors (training only)"),
    )
)


def normalise_dinov3(source: Source) -> tuple[Source, list[str]]:
    """The mask token and training-only norms dropped; the RoPE periods and the k-bias masks
    taken out of the tensors into `Source.buffers`, to be read (`class_fields`)."""
    source, dropped = _renaming(source)
    held = [k for k in source.meta if k == PERIODS or k.endswith(".attn.qkv.bias_mask")]
    if not held:
        return source, dropped
    buffers = {k: source.load(k) for k in held}
    source = source.named({k: k for k in source.meta if k not in buffers})
    source.buffers = {**source.buffers, **buffers}
    return source, dropped


def _exact(values: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in np.asarray(values, np.float64))


def class_fields(source: Source) -> tuple[dict[str, Any], dict[str, str], dict[str, str]]:
    """What the file's buffers say: head_dim (4 x the periods' count, hence the heads), the
    RoPE base, the periods when they are not that base's, and whether the key bias is masked.
    What nothing in the file says (the epsilon, the coordinate normalisation) is assumed."""
    where = source.path
    gated = any(k.endswith(".mlp.w1.weight") for k in source.meta)
    fields: dict[str, Any] = {  # what DinoVisionTransformer always computes (no `found`)
        **FIXED,
        "activation": "silu" if gated else "gelu",  # SwiGLUFFN's F.silu, or Mlp's nn.GELU
    }
    found: dict[str, str] = {}  # what the buffers state
    periods = source.buffers.get(PERIODS)
    if periods is None:
        raise CheckpointError(
            f"{where}: no {PERIODS!r}: the original DINOv3 keeps its RoPE periods in the file, "
            f"and without them its heads and RoPE base are unknown"
        )
    _periods(source, np.asarray(periods), fields, found)
    _key_bias(source, fields, found)
    assumed = {
        "ln_eps": "1e-05 (the released models' norm_layer 'layernormbf16'; 'layernorm' is 1e-6)",
        "rope_coords": "separate (every released model's normalize_coords)",
        "image_size": "224 (DinoVisionTransformer's img_size; its RoPE computes any grid)",
    }
    fields.update(ln_eps=1e-5, rope_coords="separate", image_size=224)
    return fields, found, assumed


def _periods(source: Source, periods: np.ndarray, fields: dict, found: dict) -> None:
    """Heads and base from the periods (base ** (4k / head_dim), k < head_dim / 4); the
    periods kept when they are not that base's to float32 rounding."""
    where, d = source.path, source.meta["cls_token"][0][-1]
    n = periods.shape[0] if periods.ndim == 1 else 0
    values = np.asarray(periods, np.float64)
    if n < 2 or d % (4 * n) or not (np.all(np.isfinite(values)) and np.all(values > 0)):
        raise CheckpointError(
            f"{where}: {PERIODS!r} has shape {tuple(periods.shape)}; expected head_dim / 4 "
            f"positive periods, head_dim dividing d_model {d}"
        )
    head_dim = 4 * n
    # log P_k = (4k / head_dim) log base: the least-squares base, to 3 significant digits
    k = np.arange(n)
    fit = np.sum(k * np.log(values)) / np.sum(k * k) * head_dim / 4
    base = float(f"{np.exp(fit):.3g}")
    exact = base ** (4 * np.arange(n) / head_dim)
    off = float(np.max(np.abs(values / exact - 1)))
    fields.update(num_heads=d // head_dim, rope_theta=base)
    found.update(
        num_heads=f"{PERIODS} ({n} periods: head_dim {head_dim})",
        rope_theta=f"{PERIODS} (its periods' base)",
        rope_periods=f"{PERIODS} (the file's own, up to {off:.1e} relative from base {base:g}'s)",
    )
    fields["rope_periods"] = None if off <= 4 * 2.0**-24 else _exact(values)


def _key_bias(source: Source, fields: dict, found: dict) -> None:
    """A `bias_mask` per block: q and v ones, k zeros (mask_k_bias) -> no key bias; none -> a
    plain q|k|v bias. Any other mask is refused by name."""
    masks = {k: v for k, v in source.buffers.items() if k.endswith("bias_mask")}
    if not masks:
        return
    for key, mask in masks.items():
        third = mask.shape[0] // 3 if mask.ndim == 1 else 0
        want = np.concatenate([np.ones(third), np.zeros(third), np.ones(third)])
        if mask.shape != want.shape or not np.array_equal(np.asarray(mask, np.float64), want):
            raise CheckpointError(
                f"{source.path}: {key!r} is not the key-bias mask (ones on q and v, zeros on k) "
                f"the original DINOv3 builds; this ViT cannot compute another"
            )
    fields.update(qkv_bias=True, k_bias=False)
    found["qkv_bias"] = "the blocks' qkv.bias_mask (a q|k|v bias)"
    found["k_bias"] = "the blocks' qkv.bias_mask (the key bias masked)"


def _buffers(config: ViTConfig) -> Unused:
    """What DinoVisionTransformer holds beside its parameters: the mask token, the RoPE
    periods (the config's own, or its base's in float32 as the original computes them) and
    each block's key-bias mask."""
    n = config.head_dim // 4
    periods = (
        np.asarray(config.rope_periods, np.float32)
        if config.rope_periods is not None
        else (config.rope_theta ** (4 * np.arange(n) / config.head_dim)).astype(np.float32)
    )
    d = config.d_model
    mask = np.concatenate([np.ones(d), np.zeros(d), np.ones(d)]).astype(np.float32)
    masked = config.qkv_bias and not config.k_bias
    return {
        "mask_token": (1, d),
        PERIODS: periods,
        **({MASK.format(i): mask for i in range(config.num_layers)} if masked else {}),
    }


def check_writable(config: ViTConfig) -> None:
    require(
        config,
        "the original DINOv3 (DinoVisionTransformer)",
        **{
            **PLAIN,
            **FIXED,
            "reg_tokens": config.reg_tokens,
            "mlp": config.mlp if config.mlp == "mlp" else "swiglu",
            "proj_bias": config.proj_bias,
            "mlp_bias": config.mlp_bias,
            "activation": "gelu" if config.mlp == "mlp" else "silu",
            "rope_coords": "separate",  # the file cannot say another; none was released
        },
    )


LAYOUTS = (
    Layout(
        "dinov3",
        "torch",
        dinov3_table,
        r"^storage_tokens$|^rope_embed\.periods$",
        "the original DINOv3 release (facebookresearch/dinov3 DinoVisionTransformer)",
        priority=3,  # its blocks' names are timm's too
        pool="cls",
        normalise=normalise_dinov3,
        class_fields=class_fields,
        unused=_buffers,
        check_writable=check_writable,
        computes=("rope", "k_bias", "rope_periods"),
    ),
)
