"""The EVA-02 release (baaivision/EVA, `EVA-02/asuka/modeling_finetune.py`), as its
checkpoints hold it: timm's `Eva` names (timm's class was written from it) but for
`attn.q_bias`/`v_bias` beside separate projections, the sub-LNs `attn.inner_attn_ln` and
`mlp.ffn_ln`, SwiGLU as `w1`, `w2`, `w3` (xformers' packed `w12` in T and S), and the RoPE
tables themselves, `rope.freqs_cos`/`freqs_sin` (persistent buffers, built for one grid).

The tables are read, not copied: their width is head_dim (so the heads), their rows the grid
(so the image size), and their first width angle the fine-tune rescale (EVA-02's `pt_seq_len`,
our `rope_ref_grid`); they must be EVA-02's tables for theta 1e4, or the file is refused. The
blocks' other choices (epsilon, pooling, MLP width) are not in the file: the architecture is
named with `--arch` (timm's `eva02_*`, whose weights timm converts from these files)."""

from __future__ import annotations

from typing import Any

import numpy as np

from vit_config import ViTConfig
from vit_config.rope import rope_angles
from weight_transfer.core.errors import CheckpointError, LayoutError
from weight_transfer.formats.checkpoint import Source
from weight_transfer.layouts.base import Layout, Unused, require
from weight_transfer.layouts.timm import TIMM_LAYOUT

COS, SIN = "rope.freqs_cos", "rope.freqs_sin"
# the release's names -> timm's (the inverse of what timm's checkpoint_filter_fn renames)
RENAMES = (
    ("mlp.ffn_ln.", "mlp.norm."),
    ("attn.inner_attn_ln.", "attn.norm."),
    ("mlp.w12.", "mlp.fc1."),
    ("mlp.w1.", "mlp.fc1_g."),
    ("mlp.w2.", "mlp.fc1_x."),
    ("mlp.w3.", "mlp.fc2."),
)


def _to_timm(key: str, separate_qkv: bool) -> str:
    for theirs, timm in RENAMES:
        key = key.replace(theirs, timm)
    if separate_qkv:  # beside q_proj/k_proj/v_proj, timm names the biases the projections'
        key = key.replace("attn.q_bias", "attn.q_proj.bias").replace(
            "attn.v_bias", "attn.v_proj.bias"
        )
    return key


def _to_release(key: str, config: ViTConfig) -> str:
    """A timm name of this config as the release writes it."""
    if not config.qkv_fused:
        key = key.replace("attn.q_proj.bias", "attn.q_bias").replace(
            "attn.v_proj.bias", "attn.v_bias"
        )
    gated = config.mlp != "mlp"
    for theirs, timm in RENAMES:
        if timm == "mlp.fc2." and not gated:  # a plain MLP's fc2 is fc2
            continue
        if timm == "mlp.fc1." and config.mlp != "swiglu_packed":
            continue
        key = key.replace(timm, theirs)
    return key


def normalise_eva(source: Source) -> tuple[Source, list[str]]:
    """The release's names as timm's; the RoPE tables taken out into `Source.buffers`."""
    separate = any(k.endswith("attn.q_proj.weight") for k in source.meta)
    held = [k for k in (COS, SIN) if k in source.meta]
    names = {_to_timm(k, separate): k for k in source.meta if k not in held}
    renamed = source.named(names)
    renamed.buffers = {**source.buffers, **{k: source.load(k) for k in held}}
    return renamed, []


def class_fields(source: Source) -> tuple[dict[str, Any], dict[str, str], dict[str, str]]:
    """Heads, image size and the RoPE rescale from the tables, checked to be EVA-02's."""
    where = source.path
    cos, sin = (source.buffers.get(k) for k in (COS, SIN))
    if cos is None or sin is None:
        raise CheckpointError(
            f"{where}: no {COS!r}/{SIN!r}: an EVA-02 release file holds its RoPE tables"
        )
    d = source.meta["cls_token"][0][-1]
    n, head_dim = cos.shape if cos.ndim == 2 else (0, 0)
    side = int(round(np.sqrt(n)))
    if (
        sin.shape != cos.shape
        or side * side != n
        or not head_dim
        or head_dim % 4
        or d % head_dim
        or not (np.all(np.isfinite(cos)) and np.all(np.isfinite(sin)))
    ):
        raise CheckpointError(
            f"{where}: {COS!r} and {SIN!r} of shapes {tuple(cos.shape)} and {tuple(sin.shape)}"
            f" (finite numbers): "
            f"expected (grid * grid, head_dim) each, head_dim dividing d_model {d}"
        )
    patch = source.meta["patch_embed.proj.weight"][0][-1]
    # the first width angle at column 1 is 1 * pt / ft (frequency 1): the fine-tune rescale
    angle = float(np.arccos(np.clip(cos[1, head_dim // 2], -1.0, 1.0))) if side > 1 else 0.0
    ref = int(round(angle * side))
    fields: dict[str, Any] = dict(
        num_heads=d // head_dim,
        image_size=side * patch,
        rope="interleaved",
        rope_axes="hw",
        rope_freqs="theta",
        rope_theta=10000.0,
        rope_offset=0.0,
        rope_ref_grid=(ref, ref),  # pt_seq_len: equal to the grid when not fine-tuned larger
    )
    config = ViTConfig(
        d_model=d,
        num_heads=d // head_dim,
        **{k: v for k, v in fields.items() if k.startswith("rope")},
    )
    angles = rope_angles(config.replace(rope_ref_grid=(ref, ref)), (side, side))
    expected = np.repeat(angles, 2, axis=-1)  # interleaved: each angle on its channel pair
    off = max(
        float(np.abs(np.cos(expected) - cos).max()), float(np.abs(np.sin(expected) - sin).max())
    )
    if not off <= 1e-5:
        raise CheckpointError(
            f"{where}: {COS!r}/{SIN!r} are not EVA-02's RoPE tables (interleaved pairs, "
            f"height first, theta 1e4) for a {side} x {side} grid at any reference grid: "
            f"off by {off:.2e}"
        )
    found = {f: f"{COS} (EVA-02's RoPE tables)" for f in fields}
    found["num_heads"] = f"{COS}'s width (head_dim {head_dim})"
    found["image_size"] = f"{COS}'s rows (a {side} x {side} grid)"
    return fields, found, {}


def check_writable(config: ViTConfig) -> None:
    """What the release's VisionTransformer computes: its RoPE (interleaved, height first,
    theta 1e4 on integer positions, rescaled to a pre-training grid) on a square grid beside
    a learned table with a class position."""
    if config.image_hw[0] != config.image_hw[1]:
        raise LayoutError(f"the EVA-02 release builds square grids only, not {config.grid}")
    require(
        config,
        "the EVA-02 release (VisionTransformer)",
        rope="interleaved",
        rope_axes="hw",
        rope_freqs="theta",
        rope_theta=10000.0,
        rope_offset=0.0,
        pos_embed=True,
        class_token=True,
        pos_embed_tokens="all",
        reg_tokens=0,
        dist_token=False,
    )


def _tables(config: ViTConfig) -> Unused:
    """The RoPE tables the release keeps, for the config's grid (float32, as it builds them)."""
    grid = config.grid
    angles = np.repeat(rope_angles(config, grid), 2, axis=-1)
    return {COS: np.cos(angles).astype(np.float32), SIN: np.sin(angles).astype(np.float32)}


LAYOUTS = (
    Layout(
        "eva02",
        "torch",
        TIMM_LAYOUT.table,
        r"^rope\.freqs_cos$|\.mlp\.ffn_ln\.|\.attn\.inner_attn_ln\.",
        "the EVA-02 release (baaivision/EVA EVA-02 asuka; --arch names its timm architecture)",
        priority=3,  # its names are mostly timm's
        normalise=normalise_eva,
        class_fields=class_fields,
        published=_to_release,
        unused=_tables,
        check_writable=check_writable,
        needs_arch="an EVA-02 release file does not say its epsilon, pooling or MLP form; "
        "name its architecture with --arch (arch=), timm's eva02_* (e.g. "
        "eva02_base_patch14_224)",
        computes=("rope", "k_bias", "attn_norm", "mlp_norm"),
    ),
)
