"""The safetensors format: a validated header, tensors read as copy-on-write memory maps
(hashed on the way), and a streaming writer whose data starts on a cache line.

Format: 8 bytes little-endian header length, a JSON header (`{name: {dtype, shape,
data_offsets}}` plus an optional `__metadata__` string map), then the data section, which the
tensors' offsets must tile exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from weight_transfer.core.errors import CheckpointError
from weight_transfer.core.table import Meta
from weight_transfer.formats.fileio import Background, SequentialWriter
from weight_transfer.formats.reader import (
    Reader,
    are_sizes,
    chain_digests,
    file_sha256,
    map_range,
    weight_dtype,
)

SAFETENSORS_DTYPES = {  # code -> NumPy name (`reader.weight_dtype`)
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "I8": "int8",
    "U8": "uint8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
    "BOOL": "bool",
}
DTYPE_CODES = {name: code for code, name in SAFETENSORS_DTYPES.items()}  # keyed by dtype.name


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header and the data offset, validated against the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(
                f"{path}: corrupt safetensors header (says {n} header bytes, file has {size})"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(
            f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)"
        )
    if len(header) > MAX_TENSORS:
        raise CheckpointError(
            f"{path}: {len(header)} tensors; a ViT checkpoint has at most a "
            f"few thousand (limit {MAX_TENSORS})"
        )
    data = size - 8 - n
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        shape, begin, end, dtype = _entry(path, key, info)
        want = math.prod(shape) * dtype.itemsize
        if end - begin != want or end > data or begin < 0:
            raise CheckpointError(
                f"{path}: tensor {key!r} claims {list(shape)} {info['dtype']} "
                f"({want} bytes) at [{begin}, {end}), but the data section has "
                f"{data} bytes: truncated or lying header"
            )
        spans.append((begin, end, key))
    # The tensors must tile the data section: no overlap (one block serving two tensors), no
    # gap, nothing after the last (as the safetensors library itself requires).
    at = 0
    for begin, end, key in sorted(spans):
        if begin != at:
            what = "overlaps the tensor before it" if begin < at else f"leaves a gap at byte {at}"
            raise CheckpointError(
                f"{path}: tensor {key!r} at [{begin}, {end}) {what}: the "
                f"offsets must tile the data section"
            )
        at = end
    if at != data:
        raise CheckpointError(
            f"{path}: the tensors end at byte {at} of a {data}-byte data "
            f"section: the offsets must tile it"
        )
    return header, 8 + n


MAX_TENSORS = 100_000


def _entry(path: Path, key: str, info: Any) -> tuple[tuple[int, ...], int, int, np.dtype]:
    """(shape, begin, end, dtype) of one header entry, every field type-checked."""

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    try:
        dtype = weight_dtype(SAFETENSORS_DTYPES[info["dtype"]])
        shape, offsets = info["shape"], info["data_offsets"]
        ok = (
            isinstance(shape, list)
            and are_sizes(shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(map(is_int, offsets))
        )
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise CheckpointError(
            f"{path}: tensor {key!r} has an unknown dtype or a malformed entry: {str(info)[:200]}"
        )
    return tuple(shape), offsets[0], offsets[1], dtype


class SafetensorsReader(Reader):
    """Tensors of one or more safetensors files, each a view of its own private (copy-on-write)
    memory map, as `safetensors.torch.load_file` and `torch.load(mmap=True)` give: no copy
    through a read buffer, writes change this process's pages and never the file, and a
    tensor's pages leave this process when the last array viewing them goes. A torch model
    loaded from a file whose tensors need no transpose shares those pages with the page cache
    instead of holding a second copy. Tensors taken in file order also feed each file's sha256
    on a background thread, so the source digest costs no second pass. (As with any memory
    map, a file truncated by another process while mapped ends the process with SIGBUS.)"""

    maps_blocks = True

    def __init__(self, paths: list[Path]):
        self.meta: dict[str, Meta] = {}
        self.where: dict[str, tuple[int, int, int]] = {}  # key -> (file, begin, end), absolute
        self.metadata: dict[str, str] = {}
        self.files = self.paths = paths
        self.hashers: list = []
        self.hashed: list[int] = []
        self.sizes: list[int] = []
        self.hashing: Background | None = None  # sha256 updates off the converting thread
        self.track = False  # hash while reading (only a conversion needs the digest)
        for i, path in enumerate(paths):
            header, start = read_header(path)
            self.metadata.update(header.pop("__metadata__", None) or {})
            for key, info in header.items():
                if key in self.meta:
                    raise CheckpointError(
                        f"tensor {key!r} is stored twice: in "
                        f"{paths[self.where[key][0]]} and in {path}"
                    )
                self.meta[key] = (
                    tuple(info["shape"]),
                    weight_dtype(SAFETENSORS_DTYPES[info["dtype"]]),
                )
                begin, end = info["data_offsets"]
                self.where[key] = (i, start + begin, start + end)
            with open(path, "rb") as f:
                self.hashers.append(hashlib.sha256(f.read(start)))
            self.hashed.append(start)
            self.sizes.append(path.stat().st_size)
        # Keys in file order (the format lets a header list them in any order): everything
        # downstream reads them in this order, front to back.
        self.meta = {k: self.meta[k] for k in sorted(self.meta, key=self.where.__getitem__)}

    def ordered(self, keys: Iterable[str], *, digest: bool = False) -> list[str]:
        self.track = digest
        return sorted(keys, key=lambda key: self.where[key][:2])

    def load(self, key: str) -> np.ndarray:
        i, begin, end = self.where[key]
        shape, dtype = self.meta[key]
        if begin == end:
            return np.empty(shape, dtype)
        raw = map_range(self.paths[i], begin, end)
        if self.track and self.hashed[i] == begin:
            self.hashing = self.hashing or Background(depth=4)
            self.hashing.submit(self.hashers[i].update, raw)
            self.hashed[i] = end
        array = np.frombuffer(raw, dtype=dtype).reshape(shape)
        # A writer that packs mixed dtypes may leave a tensor off its alignment: copy that one.
        return array if begin % dtype.itemsize == 0 else array.copy()

    def digest(self) -> str:
        """Free when every byte was read in order (hashed on the way); else a second pass."""
        complete = self.hashed == self.sizes
        if complete and self.hashing is not None:
            self.hashing.drain()
        self.close()
        return chain_digests(
            [h.digest() for h in self.hashers] if complete else [file_sha256(f) for f in self.files]
        )

    def close(self) -> None:
        """Stop the hashing thread; updates still queued are dropped."""
        hashing, self.hashing = self.hashing, None
        if hashing is not None:
            hashing.stop()


def encode_header(order: list[tuple[str, Meta]], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, (shape, dtype) in order:
        size = math.prod(shape) * np.dtype(dtype).itemsize
        header[key] = {
            "dtype": DTYPE_CODES[np.dtype(dtype).name],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    # Padded (the format allows trailing spaces) so the data starts 64 bytes into a cache line:
    # memory-mapped tensors then start 64-byte aligned, as torch's allocator aligns them.
    raw += b" " * (-(8 + len(raw)) % 64)
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(
    path: Path,
    order: list[tuple[str, Meta]],
    tensors: Iterable[tuple[str, np.ndarray]],
    metadata: dict[str, str],
) -> None:
    """Stream tensors into one safetensors file whose header (from `order`) is written first;
    transposed views are made contiguous on the way (`fileio.SequentialWriter`)."""
    expected = dict(order)
    with SequentialWriter(path) as f:
        f.write(encode_header(order, metadata))
        for (key, array), (want, _) in zip(tensors, order, strict=True):
            if key != want or (array.shape, array.dtype) != expected[key]:
                raise RuntimeError(f"stream out of order at {key!r} (expected {want!r})")
            f.write(array)
