"""What a checkpoint is: its layout (detected from key names) and its `ViTConfig` (from our
manifest, a config.json, or tensor shapes), with which fields were found and which assumed."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


from vit_config import ConfigError, ViTConfig
from weight_transfer.checkpoint import Source
from weight_transfer.errors import CheckpointError, LayoutError
from weight_transfer.layouts import Layout, detect_layout
from weight_transfer.table import oriented

@dataclass
class Inferred:
    config: ViTConfig
    layout: Layout
    found: dict[str, str]  # field -> where it came from
    assumed: dict[str, str]  # field -> why this value was assumed
    dropped: list[str]  # keys left out on purpose (HF pooler)
    source: Source  # what to read: the source given, with its keys normalised by the layout


def probe_keys(layout: Layout) -> dict[str, str]:
    """Where `layout` keeps the tensors whose shapes give the sizes, read off its own table
    (our key on the left, theirs on the right; a fused right side serves all its inputs)."""
    kernel = "kernel" if layout.base == "nnx" else "weight"
    ours = dict(patch=f"patch_embed.{kernel}", pos="pos_embed", cls="cls_token",
                ff1="blocks.0.ff1.bias", head="head.bias", qbias="blocks.0.attn.q.bias",
                qkernel=f"blocks.0.attn.q.{kernel}")
    rules = oriented(layout.table(ViTConfig()), 1)  # key names do not depend on the sizes
    theirs = {k: r.right[r.left.index(k) if len(r.right) == len(r.left) else 0]
              for r in rules for k in r.left}
    return {role: theirs[key] for role, key in ours.items()}


BLOCK_INDEX = re.compile(r"(?:^|[./])(?:blocks\.|layer\.|layers\.|encoderblock_)(\d+)[./]")
def infer_config(source: Source, layout: Layout | None = None,
                 given: ViTConfig | None = None, overrides: Mapping[str, Any] | None = None
                 ) -> Inferred:
    """The layout (detected unless given) and the `ViTConfig` (`given`, or from our manifest,
    a config.json the layout reads, and tensor shapes, with `overrides` stated by the user on
    top); says which fields were found and which were assumed. `source` is left as it is:
    `Inferred.source` is what to read from."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(ViTConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(unknown[0], overrides[unknown[0]],
                          f"unknown field; known: {sorted(ViTConfig.__dataclass_fields__)}")
    layout = layout or detect_layout(source.meta)
    dropped: list[str] = []
    if layout.normalise is not None:
        source, dropped = layout.normalise(source)
    if any(k.startswith("fc_norm.") for k in source.meta):
        raise LayoutError(f"{source.path}: a timm model with fc_norm (global_pool='avg'): its "
                          f"LayerNorm runs after pooling, a different function from this ViT's "
                          f"norm before pooling; rebuild the timm model with fc_norm=False")
    if given is not None or "vit_parity" in source.metadata:
        config = given if given is not None else manifest_config(source)
        # the tokens stay what the file holds, whatever pooling is stated
        config = dataclasses.replace(config, **overrides)
        found = {f: "given" if given is not None else "vit-parity metadata"
                 for f in config.to_dict()}
        assumed = {}
    else:
        config, found, assumed = _from_shapes(source, layout, overrides)
    found.update({f: "given" for f in overrides})
    assumed = {f: why for f, why in assumed.items() if f not in overrides}
    check_claims(config, source, layout)
    return Inferred(config, layout, found, assumed, dropped, source)


def manifest_config(source: Source) -> ViTConfig:
    """The config our own files carry in their metadata, checked for shape before use."""
    try:
        manifest = json.loads(source.metadata["vit_parity"])
    except (json.JSONDecodeError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{source.path}: the vit_parity manifest is not JSON ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
        raise CheckpointError(f"{source.path}: the vit_parity manifest has no config object")
    try:
        return ViTConfig.from_dict(manifest["config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{source.path}: the manifest's config is invalid: {e}") from None


def block_indices(keys) -> set[int]:
    return {int(m.group(1)) for k in keys for m in [BLOCK_INDEX.search(k)] if m}


def check_claims(config: ViTConfig, source: Source, layout: Layout) -> None:
    """Cheap checks of a stated config against the tensors present, before anything is built
    from it (a forged `num_layers: 1000000` must cost nothing)."""
    layers = block_indices(source.meta)
    if config.num_layers != len(layers):
        raise CheckpointError(f"{source.path}: the config says num_layers={config.num_layers}, "
                              f"the file holds {len(layers)} blocks")


def _from_shapes(source: Source, layout: Layout, stated: Mapping[str, Any]
                 ) -> tuple[ViTConfig, dict, dict]:
    """The config read off tensor shapes, a config.json the layout reads, and what the layout
    assumes for the rest (`Layout.assumes`), each field labelled with where it came from."""
    probe = probe_keys(layout)
    try:
        shape = lambda role: source.meta[probe[role]][0]  # noqa: E731
        patch, pos = shape("patch"), shape("pos")
    except KeyError as e:
        raise CheckpointError(f"{source.path}: cannot infer the config, {e} is missing "
                              f"({layout.name} layout)") from None
    spatial_first = layout.base == "nnx"  # HWIO kernels
    p, c = (patch[0], patch[2]) if spatial_first else (patch[-1], patch[1])
    d = pos[-1]
    has_cls = probe["cls"] in source.meta
    n = pos[-2] - (has_cls and layout.prefix_positions)  # patch positions
    sizes = dict(patch_size=p, in_channels=c, d_model=d, num_layers=len(block_indices(source.meta)),
                 class_token=has_cls, qkv_bias=probe["qbias"] in source.meta,
                 d_ff=shape("ff1")[0] if probe["ff1"] in source.meta else 4 * d,
                 num_classes=shape("head")[0] if probe["head"] in source.meta else 1000)
    found = {f: "tensor shapes" for f in sizes}
    assumed = {}
    if not has_cls:
        sizes["pool"], found["pool"] = "mean", "no class token"
    elif layout.pool is not None:
        sizes["pool"], found["pool"] = layout.pool, f"the {layout.name} layout"
    else:
        sizes["pool"] = "cls"
        assumed["pool"] = "cls (a class token is present; the weights cannot say it is pooled)"
    if layout.read_config_json is not None and source.hf_config is not None:
        from_json = layout.read_config_json(source.hf_config, source.path)
        sizes.update(from_json)
        found.update({f: "config.json" for f in from_json})
    sizes.update(stated)  # the user's word beats anything inferred below
    if "image_size" not in sizes:
        side = math.isqrt(n)
        if side * side != n:
            raise CheckpointError(f"{source.path}: {n} position rows are not a square grid, so "
                                  f"the image size is ambiguous; say it with --set "
                                  f"image_size=HxW (overrides={{'image_size': (h, w)}})")
        sizes["image_size"] = side * p
        assumed["image_size"] = f"{side * p} (square, from {n} patches)"
    if "num_heads" not in sizes:
        q = source.meta.get(probe["qkernel"])
        if layout.heads_in_kernel and q is not None and len(q[0]) == 3:
            sizes["num_heads"] = q[0][1]
            found["num_heads"] = "attention kernel shape (D, heads, head_dim)"
        else:
            sizes["num_heads"] = d // 64 if d % 64 == 0 else 1
            assumed["num_heads"] = f"{sizes['num_heads']} (head_dim 64, the ViT paper's)"
    for name, (value, why) in layout.assumes.items():
        if name not in found and name not in stated:
            sizes[name], assumed[name] = value, why
    try:
        return ViTConfig(**sizes), found, assumed
    except ConfigError as e:
        raise CheckpointError(f"{source.path}: the inferred config is invalid: {e}") from None
