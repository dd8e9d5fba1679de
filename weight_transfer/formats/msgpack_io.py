"""Flax's msgpack checkpoints (`flax.serialization.to_bytes`: Hugging Face Flax's
`flax_model.msgpack` and its shards, legacy `flax.training.checkpoints` files), read without
JAX, flax or the msgpack package, and written as Flax writes them.

Format: msgpack, a tree of string-keyed maps whose leaves are arrays, each an ext value of
type 1 holding msgpack's `(shape, dtype name, C-order bytes)` (type 3: a numpy scalar, the
same at shape ()). An array over 2**30 bytes is a map `{"__msgpack_chunked_array__": true,
"shape": {"0": d0, ...}, "chunks": {"0": <flat piece>, ...}}`.

The reader walks the tree over a memory map and records where each array's bytes lie: shapes
and dtypes are known, and every claim checked, before a tensor is loaded, and each tensor is
then a view of the file (`flax.serialization.msgpack_restore` reads the whole file into memory
and keeps its arrays besides: 2.25x the file). What flax accepts and a reader must not is
refused by name: string, datetime and object dtypes, negative or lying shapes, keys other
than strings and list indices (an `nnx.Sequential`'s, in `nnx.to_pure_dict`; read as their
decimal names), unknown ext types, malformed chunked arrays, deep nesting, trailing bytes.
Leaves that are not arrays (a training state's step, a learning rate) are left out and
counted.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from weight_transfer.core.errors import CheckpointError
from weight_transfer.core.table import Meta
from weight_transfer.formats.fileio import SequentialWriter
from weight_transfer.formats.reader import (
    WEIGHT_DTYPES,
    Reader,
    are_sizes,
    map_range,
    nested,
    weight_dtype,
)

# The dtypes a weight can have, by the names flax writes (`arr.dtype.name`)
ARRAY, COMPLEX, SCALAR = 1, 2, 3  # flax's ext types
CHUNKED = "__msgpack_chunked_array__"
MAX_DEPTH = 64  # a ViT's tree is 8 deep; a training state's, about 12
MAX_NODES = 1_000_000  # values parsed (each costs a Python object): a ViT-g has ~10,000
MAX_DIMS = 32


class _Array:
    """Where one array's bytes lie in the file (or its chunks' do)."""

    __slots__ = ("dtype", "shape", "spans")

    def __init__(self, dtype: np.dtype, shape: tuple[int, ...], spans: list[tuple[int, int]]):
        self.dtype, self.shape, self.spans = dtype, shape, spans


class _Bin:
    __slots__ = ("begin", "end")

    def __init__(self, begin: int, end: int):
        self.begin, self.end = begin, end


class _Other:
    """A leaf that is neither an array nor an integer (a float, None, a complex): left out."""


OTHER = _Other()


class _Parser:
    """msgpack values of `buf[pos:end]`, with bin values as spans of the buffer and ext values
    as `_Array`s (or refused)."""

    def __init__(self, buf, path: Path):
        self.buf, self.path, self.nodes = buf, path, 0

    def fail(self, pos: int, what: str):
        raise CheckpointError(f"{self.path}: not a Flax msgpack checkpoint: {what} at byte {pos}")

    def take(self, pos: int, n: int, end: int) -> int:
        if n < 0 or pos + n > end:
            self.fail(pos, f"a value of {n} bytes runs past the end ({end})")
        return pos + n

    def uint(self, pos: int, n: int, end: int) -> tuple[int, int]:
        nxt = self.take(pos, n, end)
        return int.from_bytes(self.buf[pos:nxt], "big"), nxt

    def value(self, pos: int, end: int, depth: int, where: str) -> tuple[Any, int]:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            self.fail(pos, f"more than {MAX_NODES:,} values (no ViT checkpoint has as many)")
        if depth > MAX_DEPTH:
            self.fail(pos, f"nesting deeper than {MAX_DEPTH} at {where or 'the top'}")
        nxt = self.take(pos, 1, end)
        b = self.buf[pos]
        if b <= 0x7F:  # positive fixint
            return b, nxt
        if b >= 0xE0:  # negative fixint
            return b - 0x100, nxt
        if 0x80 <= b <= 0x8F:
            return self.map(nxt, b & 0x0F, end, depth, where)
        if 0x90 <= b <= 0x9F:
            return self.array(nxt, b & 0x0F, end, depth, where)
        if 0xA0 <= b <= 0xBF:
            return self.text(nxt, b & 0x1F, end), self.take(nxt, b & 0x1F, end)
        if b in (0xC0, 0xC2, 0xC3):  # nil, false, true
            return OTHER, nxt
        if b in (0xC4, 0xC5, 0xC6):  # bin 8/16/32
            n, at = self.uint(nxt, 1 << (b - 0xC4), end)
            stop = self.take(at, n, end)
            return _Bin(at, stop), stop
        if b in (0xC7, 0xC8, 0xC9):  # ext 8/16/32
            n, at = self.uint(nxt, 1 << (b - 0xC7), end)
            return self.ext(at, n, end, depth, where)
        if b in (0xCA, 0xCB):  # float 32/64
            return OTHER, self.take(nxt, 4 if b == 0xCA else 8, end)
        if 0xCC <= b <= 0xD3:  # uint 8..64, int 8..64
            n = 1 << ((b - 0xCC) % 4)
            return int.from_bytes(
                self.buf[nxt : self.take(nxt, n, end)], "big", signed=b >= 0xD0
            ), (nxt + n)
        if 0xD4 <= b <= 0xD8:  # fixext 1..16
            return self.ext(nxt, 1 << (b - 0xD4), end, depth, where)
        if b in (0xD9, 0xDA, 0xDB):  # str 8/16/32
            n, at = self.uint(nxt, 1 << (b - 0xD9), end)
            return self.text(at, n, end), self.take(at, n, end)
        if b in (0xDC, 0xDD):  # array 16/32
            n, at = self.uint(nxt, 2 if b == 0xDC else 4, end)
            return self.array(at, n, end, depth, where)
        if b in (0xDE, 0xDF):  # map 16/32
            n, at = self.uint(nxt, 2 if b == 0xDE else 4, end)
            return self.map(at, n, end, depth, where)
        self.fail(pos, f"the byte 0x{b:02x}, which msgpack never starts a value with")
        raise AssertionError  # unreachable: fail raises

    def text(self, pos: int, n: int, end: int) -> str:
        try:
            return bytes(self.buf[pos : self.take(pos, n, end)]).decode()
        except UnicodeDecodeError:
            self.fail(pos, "a string that is not UTF-8")
            raise AssertionError from None

    def map(self, pos: int, n: int, end: int, depth: int, where: str) -> tuple[dict, int]:
        out: dict[str, Any] = {}
        for _ in range(n):
            key, pos = self.value(pos, end, depth + 1, where)
            if type(key) is int and key >= 0:  # a list index: nnx.Sequential, nnx.List
                key = str(key)
            if not isinstance(key, str):
                self.fail(pos, f"a key that is not a string or an index under {where or 'the top'}")
            if key in out:
                self.fail(pos, f"the key {key!r} twice under {where or 'the top'}")
            out[key], pos = self.value(pos, end, depth + 1, f"{where}/{key}")
        return out, pos

    def array(self, pos: int, n: int, end: int, depth: int, where: str) -> tuple[list, int]:
        out = []
        for i in range(n):
            item, pos = self.value(pos, end, depth + 1, f"{where}[{i}]")
            out.append(item)
        return out, pos

    def ext(self, pos: int, n: int, end: int, depth: int, where: str) -> tuple[Any, int]:
        kind = struct.unpack(">b", self.buf[pos : self.take(pos, 1, end)])[0]
        body, stop = pos + 1, self.take(pos + 1, n, end)
        if kind == COMPLEX:
            return OTHER, stop
        if kind not in (ARRAY, SCALAR):
            self.fail(pos, f"ext type {kind} at {where} (flax writes 1, 2 and 3)")
        inner, at = self.value(body, stop, depth + 1, where)
        if at != stop:
            self.fail(at, f"an array at {where} with bytes after its data")
        return self.described(inner, where, pos), stop

    def described(self, inner: Any, where: str, pos: int) -> _Array:
        """The array an ext payload `(shape, dtype name, bytes)` describes, every claim checked."""
        if not (isinstance(inner, list) and len(inner) == 3):
            self.fail(pos, f"an array at {where} that is not (shape, dtype, bytes)")
        shape, name, data = inner
        if name not in WEIGHT_DTYPES:
            self.fail(pos, f"dtype {name!r} at {where} (weights are {', '.join(WEIGHT_DTYPES)})")
        dims = self.dims(shape, where, pos)
        if not isinstance(data, _Bin):
            self.fail(pos, f"an array at {where} whose data is not bytes")
        dtype = weight_dtype(name)
        if math.prod(dims) * dtype.itemsize != data.end - data.begin:
            self.fail(
                pos,
                f"an array at {where} claiming {list(dims)} {name} "
                f"({math.prod(dims) * dtype.itemsize} bytes) with {data.end - data.begin} bytes",
            )
        return _Array(dtype, dims, [(data.begin, data.end)])

    def dims(self, shape: Any, where: str, pos: int) -> tuple[int, ...]:
        if not (isinstance(shape, list) and are_sizes(shape, MAX_DIMS)):
            self.fail(pos, f"an array at {where} whose shape {shape!r} is not non-negative sizes")
        return tuple(shape)


def _flatten(tree: dict, path: Path) -> tuple[dict[str, _Array], int]:
    """{dotted key: array} of a parsed tree (chunked arrays joined), and how many leaves
    were not arrays."""
    out: dict[str, _Array] = {}
    others = 0

    def walk(node: Any, key: str) -> None:
        nonlocal others
        if isinstance(node, dict) and CHUNKED in node:
            out[key] = _chunked(node, key, path)
        elif isinstance(node, dict):
            for k, v in node.items():
                if "." in k or not k:
                    raise CheckpointError(
                        f"{path}: the key {k!r} under {key or 'the top'} is empty or holds "
                        f"a '.', which joins names here; not a Flax parameter tree"
                    )
                walk(v, f"{key}.{k}" if key else k)
        elif isinstance(node, _Array):
            out[key] = node
        else:
            others += 1

    walk(tree, "")
    return out, others


def _chunked(node: dict, key: str, path: Path) -> _Array:
    """A chunked array's pieces: flat, of one dtype, filling its shape exactly."""

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: the chunked array {key!r} is malformed: {why}")

    shape, chunks = node.get("shape"), node.get("chunks")
    if set(node) != {CHUNKED, "shape", "chunks"} or not isinstance(chunks, dict):
        raise bad(f"expected {CHUNKED}, shape and chunks, got {sorted(node)}")
    if not isinstance(shape, dict) or any(k != str(i) for i, k in enumerate(shape)):
        raise bad("its shape is not a map of '0', '1', ... to sizes")
    if any(k != str(i) for i, k in enumerate(chunks)) or not chunks:
        raise bad("its chunks are not a map of '0', '1', ... to arrays")
    pieces = list(chunks.values())
    if not all(isinstance(p, _Array) and len(p.shape) == 1 for p in pieces):
        raise bad("a chunk is not a flat array")
    if len({p.dtype for p in pieces}) != 1:
        raise bad("its chunks have different dtypes")
    dims = tuple(shape.values())
    if not are_sizes(dims, MAX_DIMS):
        raise bad(f"its shape {dims!r} is not sizes")
    if math.prod(dims) != sum(p.shape[0] for p in pieces):
        raise bad(f"its chunks hold {sum(p.shape[0] for p in pieces)} values, its shape {dims}")
    return _Array(pieces[0].dtype, dims, [s for p in pieces for s in p.spans])


def parse_msgpack(path: Path) -> tuple[dict[str, _Array], int]:
    """The arrays of one Flax msgpack file (dotted keys) and the number of other leaves."""
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: an empty file, not a Flax msgpack checkpoint")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        parser = _Parser(memoryview(mm), path)
        try:
            tree, at = parser.value(0, size, 0, "")
            if at != size:
                parser.fail(at, f"{size - at} bytes after the tree")
            if not isinstance(tree, dict):
                parser.fail(0, "a top level that is not a map")
            return _flatten(tree, path)
        finally:
            parser.buf.release()


class MsgpackReader(Reader):
    """Tensors of Flax msgpack files (one, or the shards of an index): each a view of a
    private (copy-on-write) memory map of its bytes; a chunked array is joined into one."""

    container = "msgpack"  # a tree: its names may be any layout's (porting.inference.TREES)

    def __init__(self, paths: list[Path]):
        self.meta: dict[str, Meta] = {}
        self.where: dict[str, tuple[int, _Array]] = {}
        self.metadata: dict[str, str] = {"format": "flax"}
        self.files = paths
        self.others = 0
        for i, path in enumerate(paths):
            arrays, others = parse_msgpack(path)
            self.others += others
            for key, a in arrays.items():
                if key in self.meta:
                    raise CheckpointError(
                        f"tensor {key!r} is stored twice: in {paths[self.where[key][0]]} and in "
                        f"{path}"
                    )
                self.meta[key] = (a.shape, a.dtype)
                self.where[key] = (i, a)

    def load(self, key: str) -> np.ndarray:
        i, a = self.where[key]
        pieces = [self._span(self.files[i], b, e, a.dtype) for b, e in a.spans]
        flat = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        return flat.reshape(a.shape)

    @staticmethod
    def _span(path: Path, begin: int, end: int, dtype: np.dtype) -> np.ndarray:
        if begin == end:
            return np.empty(0, dtype)
        array = np.frombuffer(map_range(path, begin, end), dtype=dtype)
        # flax packs arrays one after another: most start off their alignment, copied then
        return array if begin % dtype.itemsize == 0 else array.copy()


# Writing ----------------------------------------------------------------------------------


def _str(s: str) -> bytes:
    raw = s.encode()
    n = len(raw)
    if n < 32:
        return bytes([0xA0 | n]) + raw
    if n < 1 << 8:
        return bytes([0xD9, n]) + raw
    return b"\xda" + struct.pack(">H", n) + raw


def _map(n: int) -> bytes:
    if n < 16:
        return bytes([0x80 | n])
    return b"\xde" + struct.pack(">H", n) if n < 1 << 16 else b"\xdf" + struct.pack(">I", n)


def _int(v: int) -> bytes:
    return bytes([v]) if v < 128 else b"\xcf" + struct.pack(">Q", v)


def _sized(code8: int, n: int) -> bytes:
    """The length header of a bin (`code8` 0xC4) or ext (0xC7) value: 8, 16 or 32 bit."""
    if n < 1 << 8:
        return bytes([code8, n])
    return (
        bytes([code8 + 1]) + struct.pack(">H", n)
        if n < 1 << 16
        else bytes([code8 + 2]) + struct.pack(">I", n)
    )


def _array_head(a: np.ndarray) -> bytes:
    """Everything of an array's ext value before its data bytes: flax's
    `packb((shape, dtype name, bytes))` inside an ext of type 1."""
    shape = bytes([0x90 | a.ndim]) + b"".join(_int(d) for d in a.shape)  # ndim < 16
    payload = b"\x93" + shape + _str(a.dtype.name) + _sized(0xC4, a.nbytes)
    return _sized(0xC7, len(payload) + a.nbytes) + bytes([ARRAY]) + payload


MAX_LEAF_BYTES = 1 << 30  # flax chunks larger arrays; none of a ViT's is this large


def write_msgpack(path: Path, tensors: Iterator[tuple[str, np.ndarray]]) -> None:
    """Dotted keys as a nested map, each array as flax's ext 1 value, in the order given
    within each map (the tensors are gathered first: a map states its size up front)."""

    def small(key: str, a: np.ndarray) -> np.ndarray:
        if a.nbytes >= MAX_LEAF_BYTES:
            raise CheckpointError(
                f"{key!r} has {a.nbytes:,} bytes; flax splits arrays over {MAX_LEAF_BYTES:,} "
                f"into chunks, which is not written here"
            )
        return a

    tree = nested((key, small(key, a)) for key, a in tensors)

    with SequentialWriter(path) as f:

        def emit(node: dict) -> None:
            f.write(_map(len(node)))
            for k, v in node.items():
                f.write(_str(k))
                if isinstance(v, dict):
                    emit(v)
                else:
                    f.write(_array_head(v))
                    f.write(v)

        emit(tree)
