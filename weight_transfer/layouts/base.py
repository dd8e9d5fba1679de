"""What every publisher's module is made of: the `Layout` declaration, the rule helpers its
table is written with, the shared config.json helpers (typed fields, refusals by field), and
the normaliser factory that brings published key variants to one table."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vit_config import ViTConfig
from weight_transfer.core.errors import CheckpointError, LayoutError
from weight_transfer.core.resample import OURS, Resampling
from weight_transfer.core.table import Rule, rule
from weight_transfer.core.transforms import Transform, bias_heads, heads_in, heads_out
from weight_transfer.formats.checkpoint import Source


def renamed(ours: str, theirs: str, leaves: Iterable[str] = ("weight", "bias")) -> tuple[Rule, ...]:
    return tuple(rule(f"{ours}.{leaf}", f"{theirs}.{leaf}") for leaf in leaves)


def fused(
    ours: Iterable[str],
    theirs: str,
    transform: Transform,
    leaves: tuple[str, ...] = ("weight", "bias"),
    suffix: tuple[str, ...] = (".weight", ".bias"),
) -> tuple[Rule, ...]:
    """Linears stacked by rows into one (timm's qkv, kv, packed SwiGLU fc1; torch
    MultiheadAttention's `in_proj_weight`), weight and bias."""
    ours = tuple(ours)
    return tuple(
        rule(tuple(f"{o}.{leaf}" for o in ours), f"{theirs}{end}", transform)
        for leaf, end in zip(leaves, suffix, strict=True)
    )


def flax_renamed(ours: str, theirs: str, leaves: Iterable[str], sep: str = "/") -> tuple[Rule, ...]:
    """A flax module's leaves under its path (`sep`: '/' in an npz, '.' in an NNX state)."""
    return tuple(rule(f"{ours}.{leaf}", f"{theirs}{sep}{leaf}") for leaf in leaves)


def flax_mha(ours: str, theirs: str, heads: int, sep: str = "/") -> tuple[Rule, ...]:
    """flax MultiHeadDotProductAttention (Linen) or nnx.MultiHeadAttention: q/k/v kernels
    (D, heads, hd), biases (heads, hd), the output kernel (heads, hd, D)."""
    rules = []
    for o, t in (("q", "query"), ("k", "key"), ("v", "value")):
        rules += [
            rule(
                f"{ours}.{o}.kernel", f"{theirs}{sep}{t}{sep}kernel", heads_in(heads)
            ),  # (D, D) <-> (D, H, hd)
            rule(f"{ours}.{o}.bias", f"{theirs}{sep}{t}{sep}bias", bias_heads(heads)),
        ]  # (D,) <-> (H, hd)
    return (
        *rules,
        rule(
            f"{ours}.o.kernel", f"{theirs}{sep}out{sep}kernel", heads_out(heads)
        ),  # (D, D) <-> (H, hd, D)
        rule(f"{ours}.o.bias", f"{theirs}{sep}out{sep}bias"),
    )


# What a publisher's class holds beside the parameters: {key: shape (zeros) or the values}
Unused = dict[str, tuple[int, ...] | np.ndarray]


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
    read_config_json: (
        Callable[[Mapping[str, Any], Path], tuple[dict[str, Any], dict[str, str]]] | None
    ) = None
    write_config_json: Callable[[ViTConfig], dict[str, Any]] | None = None
    # Key names brought to the table's (ViTModel -> ViTForImageClassification): the new
    # source and what was dropped.
    normalise: Callable[[Source], tuple[Source, list[str]]] | None = None
    # Fields the layout's class fixes whatever the file (no `found` entry: laid over a stated
    # config too, as that class computes them), fields the file's own buffers state (`found`:
    # a stated config must agree; `Source.buffers`, taken out by the normaliser), and what is
    # assumed (a stated config wins): (fields, found, assumed).
    class_fields: (
        Callable[[Source], tuple[dict[str, Any], dict[str, str], dict[str, str]]] | None
    ) = None
    # The published name of a table key when we write (the inverse of what `normalise`
    # strips: `vision_model.`, `dinov2.` before a classifier...).
    published: Callable[[str, ViTConfig], str] | None = None
    # Tensors the publisher's class has and we do not compute with (DINOv2's mask token),
    # written as that class initialises them: {table key: shape} -> zeros, or {key: values}
    # (buffers the config determines: the original DINOv3's RoPE periods, its k-bias masks).
    unused: Callable[[ViTConfig], Unused] | None = None
    # Raises for a model the layout's library cannot compute (a folder layout's
    # write_config_json does it too: see `check_model`).
    check_writable: Callable[[ViTConfig], Any] | None = None
    # How the layout's own library resamples the position table to another grid (its loader,
    # or its forward with interpolate_pos_encoding): the default for `image_size=`.
    resampling: Callable[[ViTConfig], Resampling] = lambda config: OURS
    # Published models whose bare weights carry exactly this layout's keys and shapes but
    # compute another function (positions also rotary): what a file alone cannot rule out.
    lookalikes: str = ""
    # Why a file of this layout cannot be read without its architecture (`--arch`), if it
    # cannot: its shapes and buffers leave the function open.
    needs_arch: str = ""
    # The keys a lookalike's file holds (the rest of the layout's files are not lookalikes);
    # None: every file of the layout may be one.
    lookalike_keys: Callable[[Mapping[str, Any]], bool] | None = None
    # Which of `BEYOND_VIT` (attention positions and block forms a plain ViT class has no
    # switch for) the layout's library computes: every one for ours and timm, none for the
    # classic ViT classes. A config using another is refused before anything is written.
    computes: tuple[str, ...] = ()
    # The weights file a folder layout writes beside its config.json (HF Flax: flax_model.msgpack)
    weights_file: str = "model.safetensors"

    def writes_folder(self, path: Path) -> bool:
        """Whether writing to `path` makes a folder: HF types and Orbax always, timm (a Hub
        folder) unless the name ends in .safetensors."""
        return self.container in ("folder", "orbax") or (
            self.write_config_json is not None and not path.suffix
        )

    def check_model(self, config: ViTConfig) -> None:
        """Raise, naming the field, for a model this layout's library cannot compute: before
        anything is planned or read."""
        beyond = {k: v for k, v in BEYOND_VIT.items() if k not in self.computes}
        require(config, self.description, **beyond)
        if self.check_writable is not None:
            self.check_writable(config)
        elif self.container == "folder" and self.write_config_json is not None:
            self.write_config_json(config)  # the config.json writers refuse what they cannot say


# Fields whose other values no plain ViT class computes (positions inside attention, other
# blocks), at the value every class computes: a layout declares which it can hold (`computes`).
BEYOND_VIT: dict[str, Any] = dict(
    rope="none",
    rel_pos_bias="none",
    k_bias=True,
    attn_norm=False,
    mlp_norm=False,
    block="pre_norm",
    map_heads=0,
    map_d_ff=0,
    pool_prefix=False,
    pos_grid=None,  # a NaFlex table, resampled in every forward by the model's own method
    rope_periods=None,  # a file's own RoPE periods (timm and HF recompute theirs)
    block_ln_eps=None,  # the blocks' norms with another epsilon than the rest's (jimm)
)
EVERYTHING = tuple(BEYOND_VIT)

ASSUME_GELU = ("gelu", "exact GELU (timm, torch)")

ASSUME_TANH = ("gelu_tanh", "tanh GELU (flax nn.gelu's default, big_vision)")

ASSUME_EPS6 = (1e-6, "1e-6 (timm, flax)")


_MISSING = object()


def json_field(
    cfg: Mapping[str, Any],
    key: str,
    kinds: type | tuple[type, ...],
    where: Path,
    default: Any = _MISSING,
) -> Any:
    """`cfg[key]`, checked to be one of `kinds` (a bool is never taken for a number); absent,
    `default` (null is a value, and refused like any other of the wrong type)."""
    if key not in cfg:
        if default is _MISSING:
            raise CheckpointError(f"{where}: config.json has no {key!r}")
        return default
    value = cfg[key]
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise CheckpointError(f"{where}: config.json {key!r} is {value!r}; expected {names}")
    return value


def require(config: ViTConfig, what: str, **fields: Any) -> None:
    """Refuse a model `what` cannot compute, naming each field it fixes."""
    if not config.num_classes:  # no head: its bias is moot (ViTConfig keeps the default)
        fields.pop("head_bias", None)
    wrong = [
        f"{k}={getattr(config, k)!r} (it needs {v!r})"
        for k, v in fields.items()
        if getattr(config, k) != v
    ]
    if wrong:
        raise LayoutError(f"{what} cannot hold this model: {', '.join(wrong)}")


PLAIN = dict(
    norm="layernorm",
    norm_pre=False,
    patch_norm=False,
    qk_norm=False,
    layer_scale=False,
    reg_tokens=0,
    dist_token=False,
    mlp="mlp",
    proj_bias=True,
    mlp_bias=True,
    patch_bias=True,
)  # what ViT-like classes have no switch for


def renaming(
    strip: tuple[str, ...] = (),
    drop: tuple[tuple[str, str], ...] = (),
    keep_only_stripped: str | None = None,
):
    """A normaliser: key prefixes stripped, and keys dropped with the reason reported (a text
    tower, an unused mask token), so one table reads every published variant. With
    `keep_only_stripped`, every key outside the `strip` prefixes is dropped for that reason."""
    if keep_only_stripped is not None:
        drop = (*drop, ("", keep_only_stripped))

    def normalise(source: Source) -> tuple[Source, list[str]]:
        renamed: dict[str, str] = {}
        reasons: dict[str, int] = {}
        for key in source.meta:
            if keep_only_stripped is not None and key.startswith(strip):
                reason = None
            else:
                reason = next((why for prefix, why in drop if key.startswith(prefix)), None)
            if reason is not None:
                reasons.setdefault(reason, 0)
                reasons[reason] += 1
                continue
            new = next((key[len(p) :] for p in strip if key.startswith(p)), key)
            renamed[new] = key
        if renamed == {k: k for k in source.meta}:
            return source, []
        dropped = [f"{n} tensor(s): {why}" for why, n in reasons.items()]
        return source.named(renamed), dropped

    return normalise
