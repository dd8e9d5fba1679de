"""Load, save and convert checkpoints in every supported layout (the porting API)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vit_config import ArgumentError, ViTConfig
from vit_config.resample import resample_pos_embed
from weight_transfer.core.errors import (
    AssumedConfigWarning,
    CheckpointError,
    LayoutError,
    NonFiniteError,
)
from weight_transfer.core.resample import Resampling
from weight_transfer.core.table import meta_of
from weight_transfer.formats.atomic import atomic_output, file_ids
from weight_transfer.formats.checkpoint import Source, read_checkpoint
from weight_transfer.formats.reader import weight_dtype
from weight_transfer.layouts import LAYOUTS, WRITABLE, Layout, get_layout
from weight_transfer.porting.conversion import Plan, plan_conversion
from weight_transfer.porting.inference import Inferred, infer_config, read_manifest
from weight_transfer.porting.options import PortOptions
from weight_transfer.porting.writers import FORMAT_VERSION, parse_size, write_layout

SAVE_LAYOUTS = WRITABLE  # the layouts `save_checkpoint` and `convert --to` write
DTYPES = ("float32", "float64", "bfloat16", "float16")


@dataclass
class Prepared:
    source: Source
    inferred: Inferred
    config: ViTConfig  # after resampling
    plan: Plan
    resampling: Resampling  # how the position table is (or would be) resampled
    resampled: bool  # whether it is


def _numpy_dtype(dtype: str | None):
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r}: expected one of {DTYPES}")
    return weight_dtype(dtype)


def _hook(config: ViTConfig, out: ViTConfig, dtype, allow_nonfinite: bool, resampling: Resampling):
    """What happens to each tensor in our base layout: NaN/Inf check, resampling, dtype."""

    def hook(key: str, a: np.ndarray, dry: bool) -> np.ndarray:
        screen = not dry and not allow_nonfinite
        if screen and (bad := count_nonfinite(a)):
            raise NonFiniteError(
                f"weight {key!r} holds {bad} NaN/Inf value(s); refused "
                f"(allow_nonfinite=True, --allow-nonfinite to load)"
            )
        b = a
        if key == "pos_embed" and out.table_grid != config.table_grid:
            b = resample_pos_embed(
                np.asarray(b),
                config.grid,
                out.grid,
                num_prefix_tokens=config.num_positioned_prefix,
                interpolation=resampling.interpolation,
                antialias=resampling.antialias,
            )
        with np.errstate(over="ignore"):  # an overflow is reported just below, by name
            b = b.astype(dtype, copy=False) if dtype is not None else b
        # Finite in, not finite out: the cast (or resampling in half precision) overflowed.
        if screen and b is not a and (bad := count_nonfinite(b)):
            import ml_dtypes  # its finfo knows bfloat16; imported here only (~0.6 s)

            raise NonFiniteError(
                f"weight {key!r}: {bad} value(s) overflow {b.dtype} (largest "
                f"|value| {float(np.max(np.abs(a.astype(np.float64)))):.6g}, "
                f"{b.dtype} holds up to {float(ml_dtypes.finfo(b.dtype).max):.6g}); "
                f"refused (allow_nonfinite=True, --allow-nonfinite to write it)"
            )
        return b

    return hook


def count_nonfinite(a: np.ndarray) -> int:
    """NaN and Inf values in a float array (a sum first: the common case costs no copy; an
    overflowing sum only sends it to the exact count)."""
    if a.dtype.kind != "f" and str(a.dtype) != "bfloat16":
        return 0
    if np.isfinite(np.sum(a, dtype=np.float64 if a.dtype == np.float64 else np.float32)):
        return 0
    return int((~np.isfinite(a.astype(np.float32))).sum())


def prepare(
    src: str | os.PathLike,
    to: Layout,
    options: PortOptions | None = None,
    *,
    dynamic_image_size: bool = False,
) -> Prepared:
    """Read `src`, infer its layout and config, and check the whole conversion to `to`
    (`dynamic_image_size`: the model will resample its positions at every other size, so the
    method is announced as if resampling now)."""
    o = options or PortOptions()
    stated = Resampling().stated(o.interpolation, o.antialias)  # checked before reading
    inferred = identify(src, o)
    source, config = inferred.source, inferred.config
    out = config.replace(image_size=o.image_size) if o.image_size is not None else config
    resampling = native_resampling(inferred).stated(o.interpolation, o.antialias)
    # a NaFlex table keeps its own grid (the model resamples it in every forward)
    resampled = out.table_grid != config.table_grid
    if config.pos_grid is not None and (o.interpolation is not None or o.antialias is not None):
        raise ArgumentError(
            f"{source.path}: a NaFlex model resamples its position table in every forward by "
            f"its own method ({config.pos_interpolation}, antialias={config.pos_antialias}); "
            f"to change it, set pos_interpolation / pos_antialias (--set), not "
            f"--interpolation/--antialias"
        )
    if (out.grid != config.grid or dynamic_image_size) and config.rel_pos_bias != "none":
        if config.rel_pos_form == "beit":
            raise ArgumentError(
                f"{source.path}: BEiT's relative bias tables are learned for the "
                f"{config.grid} patch grid ({config.image_hw} px); resizing them (timm's "
                f"resize_rel_pos_bias_table) is not implemented: load it at its own size"
            )
    if (resampled or dynamic_image_size) and config.pos_embed and config.pos_grid is None:
        if out.num_positions * out.d_model * 8 > MAX_RESAMPLE_BYTES:
            raise ArgumentError(
                f"image size {out.image_size}: {out.num_positions} positions x "
                f"{out.d_model} would need {out.num_positions * out.d_model * 8:,}"
                f" bytes to resample (limit {MAX_RESAMPLE_BYTES:,})"
            )
        if o.interpolation is None or o.antialias is None:
            where = (
                f"{config.grid} -> {out.grid} patches"
                if resampled
                else ("at every other grid (dynamic image size)")
            )
            inferred.assumed["resampling"] = (
                f"{resampling.describe()}, {where} (another: --interpolation, "
                f"--antialias/--no-antialias; interpolation=, antialias=)"
            )
        else:
            inferred.found["resampling"] = f"given: {stated.describe()}"
    warn_assumptions(inferred)
    hook = _hook(config, out, _numpy_dtype(o.dtype), o.allow_nonfinite, resampling)
    plan = plan_conversion(
        source.meta,
        inferred.layout,
        to,
        config,
        out_config=out,
        hook=hook,
        what=f"{inferred.layout.name} ({source.path.name})",
    )
    return Prepared(source, inferred, out, plan, resampling, resampled)


def identify(src: str | os.PathLike, options: PortOptions) -> Inferred:
    """Read `src` (lazily) and tell its layout and config, with what `options` state."""
    return infer_config(
        read_checkpoint(src, allow_pickle=options.allow_pickle),
        get_layout(options.layout) if options.layout else None,
        options.config,
        options.overrides,
        options.arch,
    )


def native_resampling(inferred: Inferred) -> Resampling:
    """How the file's own library resamples its positions: the one our manifest recorded
    when we wrote it from a published layout, else its layout's (`Layout.resampling`)."""
    manifest = read_manifest(inferred.source) or {}
    if "resampling" in manifest:
        try:
            return Resampling.from_dict(manifest["resampling"])
        except (ArgumentError, TypeError) as e:
            raise CheckpointError(
                f"{inferred.source.path}: the manifest's resampling is invalid: {e}"
            ) from None
    return inferred.layout.resampling(inferred.config)


MAX_RESAMPLE_BYTES = 1 << 32  # float64 working copy of a resampled position table


def warn_assumptions(inferred: Inferred) -> None:
    """Say, loudly, what the file could not say and was assumed (`AssumedConfigWarning`)."""
    if inferred.assumed:
        listing = "; ".join(f"{k} = {why}" for k, why in inferred.assumed.items())
        warnings.warn(
            AssumedConfigWarning(
                f"{inferred.source.path}: assumed {listing}; if any is wrong, state it with "
                f"--set FIELD=VALUE (overrides={{field: value}}) or name the architecture with "
                f"--arch (arch=)"
            ),
            stacklevel=3,
        )


def load_checkpoint(
    path: str | os.PathLike,
    framework: str = "jax",
    options: PortOptions | None = None,
    *,
    mesh=None,
    sharding: str | Mapping[str, str | None] = "replicated",
    dynamic_image_size: bool = False,
    **option_fields: Any,
):
    """A ready `jax_impl.ViT` (framework="jax") or `torch_impl.ViT` (framework="torch").

    `path`: a safetensors file, a sharded `*.safetensors.index.json`, a Hugging Face folder
    (config.json + weights), an `.npz`, an Orbax checkpoint folder, or with `allow_pickle` a
    torch `.bin`/`.pth`.
    The options (`PortOptions`, or its fields as keywords: `image_size=384`): `layout` is
    detected from the key names unless given; `config` replaces the inferred config,
    `overrides` ({field: value}) corrects fields of it (what a bare state dict cannot say:
    heads, epsilon, activation, a non-square image size); what had to be assumed is announced
    with an `AssumedConfigWarning`; `arch` names a timm architecture (resolved through timm's
    registry: heads, epsilon, activation, tokens, pooling, norms) for a bare state dict;
    `image_size` resamples the position embeddings as the file's own library does
    (`Layout.resampling`: timm's `resample_abs_pos_embed`, transformers' forward-time
    `interpolate_pos_encoding`, open_clip's `resize_pos_embed`, big_vision's `resample_posemb`;
    our files: the one their manifest recorded); `interpolation` ("bicubic", "bilinear",
    "dinov2", "big_vision") and `antialias` override it.
    With `mesh` (a `jax.sharding.Mesh`, `Explicit` or `Auto` axes), the JAX model's parameters
    are placed on it by `sharding`: "replicated", "fsdp", "tensor_parallel", "fsdp_tp", or
    rules `{logical axis: mesh axis}` (see `weight_transfer.frameworks.sharding`); each
    device's block is read from the file alone.
    `dynamic_image_size=True` gives a model taking any image whose sides are multiples of the
    patch, its positions resampled in the forward by the file's own library's method (as
    `image_size=`; `interpolation`/`antialias` override it).
    """
    if framework not in ("jax", "torch"):
        raise ArgumentError(f"framework {framework!r}: expected 'jax' or 'torch'")
    if mesh is not None and framework != "jax":
        raise ArgumentError("mesh= places a JAX model's parameters; framework must be 'jax'")
    to = LAYOUTS["nnx" if framework == "jax" else "torch"]
    p = prepare(
        path, to, PortOptions.of(options, **option_fields), dynamic_image_size=dynamic_image_size
    )
    model = _build(p, framework, mesh, sharding)
    model.set_dynamic_image_size(dynamic_image_size, p.resampling)
    return model


def _build(p: Prepared, framework: str, mesh, sharding):
    """The model of a prepared port, on `mesh` if given."""
    if mesh is not None:
        from weight_transfer.frameworks.sharding import load_sharded

        return load_sharded(p, mesh, sharding)
    tensors = p.plan.run(p.source.items(p.plan.inputs))
    if framework == "jax":
        from weight_transfer.frameworks.bridge import nnx_from_flat

        return nnx_from_flat(dict(tensors), p.config)
    from weight_transfer.frameworks.torch_bridge import numpy_to_torch, torch_from_state_dict

    # Each tensor becomes a torch tensor as it arrives, sharing its buffer (a fresh array, or
    # the reader's copy-on-write map of the file), and the model is built on the meta device
    # and assigned them: one copy of the weights in memory, none at all for untransposed ones.
    return torch_from_state_dict({k: numpy_to_torch(v, share=True) for k, v in tensors}, p.config)


def _model_flat(model) -> tuple[Layout, dict[str, np.ndarray]]:
    if type(model).__module__.startswith("jax_impl"):
        from weight_transfer.frameworks.bridge import nnx_flat

        return LAYOUTS["nnx"], nnx_flat(model)
    if type(model).__module__.startswith("torch_impl"):
        from weight_transfer.frameworks.torch_bridge import torch_flat

        return LAYOUTS["torch"], torch_flat(model)
    raise TypeError(f"expected a jax_impl.ViT or torch_impl.ViT, got {type(model).__name__}")


def _target(path: str | os.PathLike, layout: Layout, max_shard_size) -> Path:
    """Where `layout` is written: a folder as given, a file with its container's suffix."""
    if not layout.writable:
        raise LayoutError(
            f"layout {layout.name!r} is read, not written; write one of {', '.join(WRITABLE)}"
        )
    if max_shard_size is not None and (
        layout.container in ("npz", "orbax") or layout.weights_file.endswith(".msgpack")
    ):
        what = "msgpack" if layout.container == "folder" else layout.container
        raise ArgumentError(
            f"max shard size: the {layout.name} layout is written as one "
            f"{what} checkpoint, which is not split by size"
        )
    path = Path(path)
    if layout.writes_folder(path) or path.suffix:
        return path
    return path.with_suffix("." + layout.container)


def save_checkpoint(
    model,
    path: str | os.PathLike,
    *,
    layout: str = "nnx",
    max_shard_size: int | str | None = None,
    force: bool = False,
) -> Path:
    """Write one of our models in any writable layout, in that layout's container: a
    safetensors file (sharded with an index when `max_shard_size` is given), a folder (hf), an
    .npz (google_vit, big_vision), an Orbax checkpoint folder (orbax). Atomic."""
    dst_layout = get_layout(layout)
    src_layout, flat = _model_flat(model)
    plan = plan_conversion(meta_of(flat), src_layout, dst_layout, model.config)
    out = _target(path, dst_layout, max_shard_size)
    manifest = {
        "format_version": FORMAT_VERSION,
        "layout": dst_layout.name,
        "source": f"{type(model).__module__.split('.')[0]}.ViT in memory",
    }
    with atomic_output(out, force=force) as tmp:
        tensors = plan.run(flat.items(), materialize=False)  # the writer makes them contiguous
        name = write_layout(
            tmp / out.name,
            dst_layout,
            plan,
            tensors,
            model.config,
            manifest,
            parse_size(max_shard_size),
        )
    return out.parent / name


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    to: str,
    options: PortOptions | None = None,
    from_: str | None = None,
    max_shard_size: int | str | None = None,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    **option_fields: Any,
) -> dict[str, Any]:
    """Convert a checkpoint file to another layout, one tensor at a time; returns a report.
    The options are `load_checkpoint`'s (`from_` is `layout`, the source's);
    `progress(done, total)` is called after each tensor (the CLI draws a bar with it)."""
    if from_ is not None:
        option_fields["layout"] = from_
    dst_layout = get_layout(to)
    out = _target(dst, dst_layout, max_shard_size)
    p = prepare(src, dst_layout, PortOptions.of(options, **option_fields))
    inputs = [p.source.path, *p.source.files, *([p.source.folder] if p.source.folder else [])]
    protected = set().union(*(file_ids(f) for f in inputs))  # every input file, under any name
    manifest = {
        "format_version": FORMAT_VERSION,
        "layout": dst_layout.name,
        "source_layout": p.inferred.layout.name,
        # the source library's own way, kept for the next resampling of these weights
        "resampling": p.resampling.to_dict(),
        **resampled(p),
    }
    tensors = p.plan.run(p.source.items(p.plan.inputs, digest=True), materialize=False)
    if progress is not None:
        tensors = _counted(tensors, len(p.plan.order), progress)
    try:
        with atomic_output(out, force=force, protected=protected) as tmp:
            name = write_layout(
                tmp / out.name,
                dst_layout,
                p.plan,
                tensors,
                p.config,
                manifest,
                parse_size(max_shard_size),
                source_digest=p.source.digest,
            )
    finally:
        p.source.close()
    return {"source": str(p.source.path), "output": str(out.parent / name), **report(p)}


def _counted(items, total: int, progress: Callable[[int, int], None]):
    for done, item in enumerate(items, 1):
        yield item
        progress(done, total)


def resampled(p: Prepared) -> dict[str, Any]:
    """What was resampled and how: {"resampled": {...}}, or {} at the file's own grid."""
    if not p.resampled:
        return {}
    return {
        "resampled": {
            "from_grid": list(p.inferred.config.grid),
            "to_grid": list(p.config.grid),
            "method": p.resampling.describe(),
            **p.resampling.to_dict(),
        }
    }


def report(p: Prepared) -> dict[str, Any]:
    return {
        "layout": p.inferred.layout.name,
        "config": p.config.to_dict(),
        **resampled(p),
        "found": p.inferred.found,
        "assumed": p.inferred.assumed,
        "dropped": p.inferred.dropped,
        "notes": p.source.notes,
        "tensors": len(p.plan.order),
    }


def checkpoint_dtypes(path: str | os.PathLike, *, allow_pickle: bool = False) -> set[str]:
    """The dtypes a checkpoint stores, read from its header or directory (no tensor is read)."""
    source = read_checkpoint(path, allow_pickle=allow_pickle)
    try:
        return {str(dtype) for _, dtype in source.meta.values()}
    finally:
        source.close()


def inspect_checkpoint(
    path: str | os.PathLike, options: PortOptions | None = None, **option_fields: Any
) -> dict[str, Any]:
    """Layout, inferred config, parameter count, dtypes, sizes and NaN/Inf counts of a file
    (the options that say what a file cannot: `layout`, `arch`, `config`, `overrides`,
    `allow_pickle`)."""
    inferred = identify(path, PortOptions.of(options, **option_fields))
    source = inferred.source
    # Every key and shape checked against the config before any tensor is read.
    plan_conversion(
        source.meta,
        inferred.layout,
        LAYOUTS[inferred.layout.base],
        inferred.config,
        what=f"{inferred.layout.name} ({source.path.name})",
    )
    tensors = 0
    dtypes: dict[str, int] = {}
    nonfinite: dict[str, int] = {}
    size = 0
    for key, a in source.items():
        tensors += int(np.prod(a.shape))
        dtypes[str(a.dtype)] = dtypes.get(str(a.dtype), 0) + 1
        size += a.nbytes
        if bad := count_nonfinite(a):
            nonfinite[key] = bad
    return {
        "path": str(source.path),
        "layout": inferred.layout.name,
        "layout_description": inferred.layout.description,
        "config": inferred.config.to_dict(),
        "found": inferred.found,
        "assumed": inferred.assumed,
        "dropped": inferred.dropped,
        "notes": source.notes,
        "parameters": tensors,
        "expected_parameters": inferred.config.num_params(),
        "tensors": len(source.meta),
        "dtypes": dtypes,
        "bytes": size,
        "nonfinite": nonfinite,
        "metadata": source.metadata,
    }


__all__ = [
    "SAVE_LAYOUTS",
    "CheckpointError",
    "LayoutError",
    "NonFiniteError",
    "convert",
    "inspect_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]
