"""Writing converted tensors: atomically (a temporary folder, then rename), never over an input,
in each layout's container (a safetensors file or shards with an index, an HF folder, an npz),
with the manifest that makes our files describe themselves."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import itertools
import json
import math
import platform
import re
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from vit_config import ViTConfig
from weight_transfer.core.errors import CheckpointError, LayoutError
from weight_transfer.core.table import Meta
from weight_transfer.formats.memory import to_contiguous
from weight_transfer.formats.msgpack_io import write_msgpack
from weight_transfer.formats.npz_io import NPZ_MANIFEST
from weight_transfer.formats.safetensors_io import write_safetensors
from weight_transfer.layouts import Layout
from weight_transfer.porting.conversion import Plan

FORMAT_VERSION = "1"


def shard(order: list[tuple[str, Meta]], max_bytes: int | None) -> list[list[tuple[str, Meta]]]:
    """Split the key order into consecutive shards of at most `max_bytes` (HF's convention)."""
    shards: list[list[tuple[str, Meta]]] = [[]]
    size = 0
    for key, (shape, dtype) in order:
        n = math.prod(shape) * np.dtype(dtype).itemsize
        if max_bytes and shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((key, (shape, dtype)))
        size += n
    return shards


def parse_size(text: str | int | None) -> int | None:
    """`"500MB"`, `"2GB"`, `"1GiB"` or an int of bytes."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise CheckpointError(f"max shard size {text!r}: expected e.g. 500MB, 2GB or 1GiB")
    unit = (m.group(2) or "B").upper()
    scale = {
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
    }[unit]
    return int(float(m.group(1)) * scale)


DIGEST_PLACEHOLDER = "0" * 64  # the source's sha256, patched in once the stream has been read


def _patch_digest(files: list[Path], digest: str) -> None:
    """Replace the placeholder in each written header (same length: offsets stay valid)."""
    old, new = DIGEST_PLACEHOLDER.encode(), digest.encode()
    for path in files:
        with open(path, "r+b") as f:
            head = f.read(8)
            n = (
                struct.unpack("<Q", head)[0]
                if path.suffix == ".safetensors"
                else path.stat().st_size
            )
            start = 8 if path.suffix == ".safetensors" else 0
            f.seek(start)
            text = f.read(n)
            f.seek(start)
            f.write(text.replace(old, new, 1))


def written_with() -> dict[str, Any]:
    """What wrote a file, for a reader who later cannot tell a real difference from a setting:
    the libraries' versions (JAX, Flax, PyTorch when the model came from one of them, i.e. when
    loaded) and what the writing computed (nothing: tensors are copied, transposed, split,
    resampled in float64 or cast; no matmul runs, so no matmul precision applies). A
    comparison's own context (matmul precision, TF32, backend) is in `check --json`."""
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("ml_dtypes", "jax", "flax", "torch"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "__version__"):
            versions[name] = module.__version__
    try:
        versions["vit_parity"] = importlib.metadata.version("vit-parity")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        pass
    return {
        "versions": versions,
        "computation": "none: tensors copied, transposed, split, resampled (float64) or cast",
    }


def write_layout(
    out: Path,
    layout: Layout,
    plan: Plan,
    tensors: Iterator[tuple[str, np.ndarray]],
    config: ViTConfig,
    manifest: dict[str, Any],
    max_shard_size: int | None,
    source_digest: Callable[[], str] | None = None,
) -> str:
    """Write the stream in `layout.container`: an .npz, a folder (config.json + safetensors),
    an Orbax checkpoint folder, or safetensors (sharded with an index when `max_shard_size`
    splits it). `source_digest` is called after the stream is consumed and lands in the
    manifest as `source_sha256`."""
    if layout.unused is not None:  # zeros as the publisher's class initialises them, or the
        dtype = plan.order[0][1][1]  # buffers the config determines
        held = {
            k: np.zeros(v, dtype) if isinstance(v, tuple) else np.asarray(v, dtype)
            for k, v in layout.unused(config).items()
        }
        plan = dataclasses.replace(
            plan, order=[*plan.order, *((k, (a.shape, a.dtype)) for k, a in held.items())]
        )
        tensors = itertools.chain(tensors, held.items())
    if (published := layout.published) is not None:  # the names its own loader expects

        def name(key: str) -> str:
            return published(key, config)

        plan = dataclasses.replace(plan, order=[(name(k), meta) for k, meta in plan.order])
        tensors = ((name(k), a) for k, a in tensors)
    if source_digest is not None:
        manifest = {**manifest, "source_sha256": DIGEST_PLACEHOLDER}
    manifest = {**manifest, "written_with": written_with()}
    metadata = {
        "format": "flax" if layout.base == "nnx" else "pt",
        "vit_parity": json.dumps({**manifest, "config": config.to_dict()}, sort_keys=True),
    }
    if layout.container == "orbax":
        from weight_transfer.formats.orbax_io import write_orbax

        def final_manifest() -> str:  # once the stream is read and the digest is known
            text = metadata["vit_parity"]
            return text.replace(DIGEST_PLACEHOLDER, source_digest()) if source_digest else text

        write_orbax(out, tensors, final_manifest)
        return out.name
    if layout.container == "npz":
        arrays = {k: to_contiguous(a) for k, a in tensors}
        if source_digest is not None:
            metadata["vit_parity"] = metadata["vit_parity"].replace(
                DIGEST_PLACEHOLDER, source_digest()
            )
        # npz has no metadata: the manifest travels as one uint8 array of JSON bytes.
        arrays[NPZ_MANIFEST] = np.frombuffer(metadata["vit_parity"].encode(), np.uint8)
        with open(out, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]
        return out.name
    if layout.writes_folder(out) and layout.write_config_json is not None:  # (Orbax: above)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(layout.write_config_json(config), indent=2))
        metadata = {"format": "pt"}  # config.json is the folder's description, as HF reads it
        base = out / layout.weights_file
    else:
        base = out
    if base.suffix == ".msgpack":  # Hugging Face Flax
        write_msgpack(base, tensors)
        written = base.name
    else:
        written = _write_safetensors(base, plan, tensors, metadata, max_shard_size, source_digest)
    if base != out:  # a folder described by its config.json alone: it must say exactly `config`
        _check_reads_back(out, layout, config)
        return out.name
    return written


def _check_reads_back(folder: Path, layout: Layout, config: ViTConfig) -> None:
    """Read the written folder as a user would (still in its temporary place) and refuse it
    unless it reads back as `config`: a config.json that cannot say something (a pooling, a
    width the library derives from a ratio...) must not become a silently different model."""
    from weight_transfer.formats.checkpoint import read_checkpoint
    from weight_transfer.porting.inference import infer_config

    source = read_checkpoint(folder)
    try:
        got = infer_config(source).config
    finally:
        source.close()
    if not got.same_model(config):
        a, b = config.to_dict(), got.to_dict()
        diff = ", ".join(f"{k} {a[k]!r} would read back as {b[k]!r}" for k in a if a[k] != b[k])
        raise LayoutError(
            f"the {layout.name} layout cannot hold this model "
            f"({diff or 'image size'}); write another layout (nnx, torch, timm "
            f".safetensors)"
        )


def _write_safetensors(
    base: Path,
    plan: Plan,
    tensors,
    metadata: dict[str, str],
    max_shard_size: int | None,
    source_digest,
) -> str:
    """One safetensors file, or shards and an index; returns the name to report."""
    shards = shard(plan.order, max_shard_size)
    if len(shards) == 1:
        write_safetensors(base, plan.order, tensors, metadata)
        if source_digest is not None and "vit_parity" in metadata:
            _patch_digest([base], source_digest())
        return base.name
    stem = base.name.removesuffix(".safetensors")
    names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, part in zip(names, shards, strict=True):
        take = (next(tensors) for _ in range(len(part)))
        write_safetensors(base.parent / name, part, take, metadata)
        weight_map.update({k: name for k, _ in part})
    total = sum(math.prod(s) * np.dtype(d).itemsize for _, (s, d) in plan.order)
    index = {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}
    index_path = base.parent / f"{base.name}.index.json"
    index_path.write_text(json.dumps(index, indent=2))
    if source_digest is not None and "vit_parity" in metadata:
        _patch_digest([base.parent / n for n in names] + [index_path], source_digest())
    return index_path.name
