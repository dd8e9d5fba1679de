"""What every checkpoint format's reader is: one type with one interface, so the rest of the
tool never asks which format it holds. Each format subclasses `Reader` (safetensors, npz,
Orbax, torch pickles); a layout's normaliser wraps one in a `Renamed` view."""

from __future__ import annotations

import hashlib
import mmap
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from weight_transfer.core.table import Meta

# The dtypes a weight may be stored in, whatever the container names them, by NumPy name.
WEIGHT_DTYPES = (
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool",
)


def weight_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a `WEIGHT_DTYPES` name. bfloat16 is ml_dtypes', imported only when a
    file holds one: importing ml_dtypes costs ~0.6 s, most of a `convert` or `inspect`."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def are_sizes(values: Any, max_dims: int | None = None) -> bool:
    """Whether `values` is a list or tuple of non-negative integers, at most `max_dims` of them
    when given (a shape as a file states it; a bool is not an integer here)."""
    return (
        isinstance(values, (list, tuple))
        and (max_dims is None or len(values) <= max_dims)
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)
    )


def map_range(path: Path, begin: int, end: int) -> memoryview:
    """Bytes [begin, end) of `path` as a private (copy-on-write) memory map: writes change this
    process's pages, never the file; unmapped when the last view of it goes."""
    start = begin - begin % mmap.ALLOCATIONGRANULARITY  # maps must start page-aligned
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), end - start, offset=start, access=mmap.ACCESS_COPY)
    return memoryview(mapped)[begin - start :]


def nested(flat: Iterable[tuple[str, Any]]) -> dict:
    """`{"a.0.b": x}` -> `{"a": {"0": {"b": x}}}`: a tree's levels from dotted names."""
    tree: dict = {}
    for key, value in flat:
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


class Reader:
    """Tensors of one checkpoint, read lazily: `meta` (shapes and dtypes) now, `load(key)` on
    demand. Subclasses set `meta`, `metadata` and `files` and define `load`; the rest has
    defaults a format overrides where it can do better."""

    meta: dict[str, Meta]
    metadata: dict[str, str]  # the format's string metadata (our manifest among it)
    files: list[Path]  # every file read: digests, and the inputs an output must not replace
    container = "file"  # "orbax" for an Orbax folder: its keys can only be that layout's
    # `load(key)[index]` copies only that block's bytes (a memory map): sharded loading reads
    # each device's block straight from the file
    maps_blocks = False

    def load(self, key: str) -> np.ndarray:
        raise NotImplementedError

    def ordered(self, keys: Iterable[str], *, digest: bool = False) -> list[str]:
        """`keys` in the order that reads the files front to back; with `digest`, the bytes
        read in that order also feed `digest()`."""
        return list(keys)

    def digest(self) -> str:
        """The file's sha256 (what `sha256sum` prints and the Hugging Face Hub lists); for
        several files, the sha256 of their sha256s concatenated in order."""
        return chain_digests([file_sha256(f) for f in self.files])

    def restore_onto(self, shardings: Mapping[str, Any]) -> dict[str, Any] | None:
        """{key: jax.Array} placed with `shardings[key]` by the format itself, or None when
        the format cannot (the arrays are then built block by block from `load`)."""
        return None

    def close(self) -> None:
        """Release what the reader holds open (files, a hashing thread)."""


class Renamed(Reader):
    """Another reader's tensors under new names (a layout's normaliser: prefixes stripped,
    scanned layers sliced, a text tower left out): `meta` as given, `load` through `read`."""

    def __init__(self, inner: Reader, meta: dict[str, Meta], read: Callable[[str], np.ndarray]):
        self.inner, self.meta, self.read = inner, meta, read
        self.metadata, self.files, self.container = inner.metadata, inner.files, inner.container

    def load(self, key: str) -> np.ndarray:
        return self.read(key)

    def close(self) -> None:
        self.inner.close()


class InMemory(Reader):
    """Arrays already in memory (a torch pickle, read whole by torch)."""

    def __init__(self, arrays: dict[str, np.ndarray], files: list[Path]):
        self.arrays, self.files, self.metadata = arrays, files, {}
        self.meta = {k: (tuple(a.shape), a.dtype) for k, a in arrays.items()}

    def load(self, key: str) -> np.ndarray:
        return self.arrays[key]


def file_sha256(path: Path) -> bytes:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").digest()


def chain_digests(digests: list[bytes]) -> str:
    if len(digests) == 1:
        return digests[0].hex()
    return hashlib.sha256(b"".join(digests)).hexdigest()
