"""Checkpoint files: read any supported layout, infer its config, convert, write atomically.

Reading is lazy (safetensors are memory-mapped and read one tensor at a time), conversion is a
chain of table streams, and safetensors outputs are written tensor by tensor, so converting a
checkpoint never holds the whole model twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap
import os
import re
import shutil
import stat
import struct
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from vit_config import ConfigError, ViTConfig, VitParityError
from weight_transfer.fileio import Background, SequentialWriter
from weight_transfer.layouts import LAYOUTS, Layout, LayoutError, detect_layout
from weight_transfer.table import (
    Meta,
    Rule,
    base_shapes,
    check_table,
    forward_targets,
    nnx_torch,
    oriented,
    stand_in,
    stream_table,
    to_contiguous,
)

FORMAT_VERSION = "1"
SAFETENSORS_DTYPES = {"F16": np.float16, "BF16": ml_dtypes.bfloat16, "F32": np.float32,
                      "F64": np.float64, "I8": np.int8, "U8": np.uint8, "I16": np.int16,
                      "I32": np.int32, "I64": np.int64, "BOOL": np.bool_}
DTYPE_CODES = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}
NPZ_MANIFEST = "__vit_parity__"


class CheckpointError(VitParityError):
    """A checkpoint file that cannot be read, trusted or written, with the path and the reason."""


# ---- reading ------------------------------------------------------------------------------------


@dataclass
class Source:
    """Tensors of one checkpoint, read lazily: `meta` now, `load(key)` on demand."""

    path: Path
    meta: dict[str, Meta]
    load: Callable[[str], np.ndarray]
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors __metadata__
    hf_config: dict[str, Any] | None = None  # config.json next to the weights
    files: list[Path] = field(default_factory=list)
    reader: SafetensorsReader | None = None  # reads in file order and hashes as it goes
    closer: Callable[[], None] | None = None  # releases what the source holds open
    folder: Path | None = None  # the folder given, when the weights were found in one

    def items(self, keys: Iterable[str] | None = None, *, digest: bool = False
              ) -> Iterator[tuple[str, np.ndarray]]:
        """The tensors in file order; with `digest`, the bytes also feed `digest()` as read."""
        keys = list(self.meta if keys is None else keys)
        if self.reader is not None:
            keys.sort(key=self.reader.position)
            self.reader.track = digest
        for key in keys:
            yield key, self.load(key)

    def close(self) -> None:
        """Stop background hashing (a conversion that failed midway leaves no thread)."""
        if self.reader is not None:
            self.reader.close()
        if self.closer is not None:
            self.closer()

    def digest(self) -> str:
        """The file's sha256 (what `sha256sum` prints and the Hugging Face Hub lists as the
        file's SHA256); for several files, the sha256 of their sha256s concatenated in order.
        Free when every byte was read in order (the reader hashed them on the way)."""
        done = self.reader.digests() if self.reader is not None else None
        return _chain(done) if done else file_digest(self.files)


def _read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header and the data offset, validated against the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path}: corrupt safetensors header (says {n} header bytes, "
                                  f"file has {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
            begin, end = info["data_offsets"]
            want = math.prod(info["shape"]) * dtype.itemsize
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {key!r} has an unknown dtype or a malformed "
                                  f"entry: {info!r}") from None
        if end - begin != want or end > data or begin < 0:
            raise CheckpointError(f"{path}: tensor {key!r} claims {info['shape']} {info['dtype']} "
                                  f"({want} bytes) at [{begin}, {end}), but the data section has "
                                  f"{data} bytes: truncated or lying header")
    return header, 8 + n


class SafetensorsReader:
    """Tensors of one or more safetensors files, each a view of its own private (copy-on-write)
    memory map, as `safetensors.torch.load_file` and `torch.load(mmap=True)` give: no copy
    through a read buffer, writes change this process's pages and never the file, and a
    tensor's pages leave this process when the last array viewing them goes. A torch model
    loaded from a file whose tensors need no transpose shares those pages with the page cache
    instead of holding a second copy. Tensors taken in file order also feed each file's sha256
    on a background thread, so the source digest costs no second pass. (As with any memory
    map, a file truncated by another process while mapped ends the process with SIGBUS.)"""

    def __init__(self, paths: list[Path]):
        self.meta: dict[str, Meta] = {}
        self.where: dict[str, tuple[int, int, int]] = {}  # key -> (file, begin, end), absolute
        self.metadata: dict[str, str] = {}
        self.paths = paths
        self.hashers, self.hashed, self.sizes = [], [], []
        self.hashing: Background | None = None  # sha256 updates off the converting thread
        self.track = False  # hash while reading (only a conversion needs the digest)
        for i, path in enumerate(paths):
            header, start = _read_safetensors_header(path)
            self.metadata.update(header.pop("__metadata__", None) or {})
            for key, info in header.items():
                if key in self.meta:
                    raise CheckpointError(f"tensor {key!r} is stored twice: in "
                                          f"{paths[self.where[key][0]]} and in {path}")
                self.meta[key] = (tuple(info["shape"]), np.dtype(SAFETENSORS_DTYPES[info["dtype"]]))
                begin, end = info["data_offsets"]
                self.where[key] = (i, start + begin, start + end)
            with open(path, "rb") as f:
                self.hashers.append(hashlib.sha256(f.read(start)))
            self.hashed.append(start)
            self.sizes.append(path.stat().st_size)

    def position(self, key: str) -> tuple[int, int]:
        return self.where[key][:2]

    def load(self, key: str) -> np.ndarray:
        i, begin, end = self.where[key]
        shape, dtype = self.meta[key]
        if begin == end:
            return np.empty(shape, dtype)
        start = begin - begin % mmap.ALLOCATIONGRANULARITY  # maps must start page-aligned
        with open(self.paths[i], "rb") as f:
            mapped = mmap.mmap(f.fileno(), end - start, offset=start, access=mmap.ACCESS_COPY)
        raw = memoryview(mapped)[begin - start:]  # unmapped when the last view is gone
        if self.track and self.hashed[i] == begin:
            self.hashing = self.hashing or Background(depth=4)
            self.hashing.submit(self.hashers[i].update, raw)
            self.hashed[i] = end
        array = np.frombuffer(raw, dtype=dtype).reshape(shape)
        # A writer that packs mixed dtypes may leave a tensor off its alignment: copy that one.
        return array if begin % dtype.itemsize == 0 else array.copy()

    def digests(self) -> list[bytes] | None:
        """Each file's sha256 if every byte was hashed, else None."""
        complete = self.hashed == self.sizes
        if complete and self.hashing is not None:
            self.hashing.drain()
        self.close()
        return [h.digest() for h in self.hashers] if complete else None

    def close(self) -> None:
        """Stop the hashing thread; updates still queued are dropped."""
        hashing, self.hashing = self.hashing, None
        if hashing is not None:
            hashing.stop()


def read_checkpoint(path: str | os.PathLike, *, allow_pickle: bool = False) -> Source:
    """Open a safetensors file, a sharded index, a Hugging Face folder, an .npz, or (only with
    `allow_pickle`) a torch .bin/.pth/.pt file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    hf_config = None
    if path.is_dir():
        cfg = path / "config.json"
        hf_config = _read_json(cfg) if cfg.exists() else None
        if hf_config is not None and not isinstance(hf_config, dict):
            raise CheckpointError(f"{cfg}: expected a JSON object, got {type(hf_config).__name__}")
        names = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin")
        path_in = next((path / n for n in names if (path / n).exists()), None)
        if path_in is None:
            raise CheckpointError(f"{path}: a folder without model.safetensors, "
                                  f"model.safetensors.index.json or pytorch_model.bin")
        source = read_checkpoint(path_in, allow_pickle=allow_pickle)
        source.hf_config, source.folder = hf_config, path
        return source
    regular_file(path)
    name = path.name
    if name.endswith(".safetensors.index.json"):
        weight_map = _read_index(path)
        shards = sorted(set(weight_map.values()))
        files = [path.parent / s for s in shards]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{path}: shard {f.name} is missing")
        reader = SafetensorsReader(files)
        stored = {k: files[reader.where[k][0]].name for k in reader.meta}
        wrong = sorted(k for k in set(weight_map) | set(stored)
                       if weight_map.get(k) != stored.get(k))
        if wrong:
            k = wrong[0]
            raise CheckpointError(f"{path}: the index and the shards disagree on {len(wrong)} "
                                  f"tensor(s), e.g. {k!r}: the index says "
                                  f"{weight_map.get(k, 'nothing')}, the shards hold it in "
                                  f"{stored.get(k, 'none')}")
        return Source(path, reader.meta, reader.load, reader.metadata, files=files, reader=reader)
    if name.endswith(".safetensors"):
        reader = SafetensorsReader([path])
        return Source(path, reader.meta, reader.load, reader.metadata, files=[path], reader=reader)
    if name.endswith(".npz"):
        reader = NpzReader(path)
        return Source(path, reader.meta, reader.load, reader.metadata, files=[path],
                      closer=reader.close)
    if name.endswith((".bin", ".pth", ".pt")):
        if not allow_pickle:
            raise CheckpointError(f"{path}: a pickle-based torch file; it is only read when asked "
                                  f"(allow_pickle=True, --allow-pickle), and then with "
                                  f"torch.load(weights_only=True)")
        return _read_torch_pickle(path)
    raise CheckpointError(f"{path}: unknown checkpoint type (expected .safetensors, "
                          f".safetensors.index.json, a folder, .npz, or .bin/.pth with pickle)")


MANIFEST_MAX_BYTES = 1 << 20


class NpzReader:
    """The arrays of an `.npz`, read one at a time: the zip directory and each member's `.npy`
    header are read first (names, dtypes, shapes), each member's declared size is checked
    against its header, and nothing is inflated before a key is asked for. A 2-byte void
    array is bfloat16 (numpy cannot name that dtype; timm's `_load_weights(load_bfloat16=True)`
    reads such arrays the same way)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable .npz ({e})") from None
        self.meta: dict[str, Meta] = {}
        self.members: dict[str, zipfile.ZipInfo] = {}
        self.metadata: dict[str, str] = {}
        try:
            for info in self.zip.infolist():
                self._add(info)
        except BaseException:
            self.zip.close()
            raise

    def _add(self, info: zipfile.ZipInfo) -> None:
        where = f"{self.path}: member {info.filename!r}"
        if not info.filename.endswith(".npy"):
            raise CheckpointError(f"{where} is not an .npy array")
        key = info.filename.removesuffix(".npy")
        if key in self.members:
            raise CheckpointError(f"{where} appears twice in the archive")
        try:
            with self.zip.open(info) as f:
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                    else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(f)
                header_bytes = f.tell()
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, RuntimeError) as e:
            raise CheckpointError(f"{where}: not a readable .npy ({e})") from None
        if dtype.hasobject:
            raise CheckpointError(f"{where} holds Python objects (pickle); refused")
        want = header_bytes + math.prod(shape) * dtype.itemsize
        if info.file_size != want:
            raise CheckpointError(f"{where} declares {info.file_size} bytes, but its header says "
                                  f"{shape} {dtype} ({want} bytes with the header): corrupt")
        if key == NPZ_MANIFEST:
            if info.file_size > MANIFEST_MAX_BYTES:
                raise CheckpointError(f"{where}: a {info.file_size}-byte manifest is too large")
            raw = self._read(info).tobytes()
            try:
                self.metadata["vit_parity"] = raw.decode()
            except UnicodeDecodeError:
                raise CheckpointError(f"{where}: the manifest is not UTF-8 text") from None
            return
        if dtype.kind == "V" and dtype.itemsize == 2 and dtype.fields is None:
            dtype = np.dtype(ml_dtypes.bfloat16)
        self.members[key] = info
        self.meta[key] = (tuple(shape), dtype)

    def _read(self, info: zipfile.ZipInfo) -> np.ndarray:
        try:
            with self.zip.open(info) as f:
                return np.lib.format.read_array(f, allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, RuntimeError) as e:
            raise CheckpointError(f"{self.path}: member {info.filename!r}: {e}") from None

    def load(self, key: str) -> np.ndarray:
        array = self._read(self.members[key])
        dtype = self.meta[key][1]
        return array.view(dtype) if array.dtype != dtype else array

    def close(self) -> None:
        self.zip.close()


def _read_torch_pickle(path: Path) -> Source:
    import torch

    from weight_transfer.bridge import torch_to_numpy

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for a bad file
        raise CheckpointError(f"{path}: torch.load(weights_only=True) failed: {e}") from None
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, got {type(sd).__name__}")
    arrays = {k: torch_to_numpy(v) for k, v in sd.items() if isinstance(v, torch.Tensor)}
    return Source(path, {k: (a.shape, a.dtype) for k, a in arrays.items()}, arrays.__getitem__,
                  files=[path])


def _read_index(path: Path) -> dict[str, str]:
    """A sharded index's `weight_map`, checked: tensor name -> a shard file beside the index."""
    index = _read_json(path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{path}: not a sharded index (expected a 'weight_map' object of "
                              f"tensor name -> shard file name)")
    for shard_name in set(weight_map.values()):
        if Path(shard_name).name != shard_name or shard_name in ("", ".", ".."):
            raise CheckpointError(f"{path}: shard path {shard_name!r} leaves the index's folder; "
                                  f"shards must be plain file names beside the index")
    return weight_map


JSON_MAX_BYTES = 64 << 20  # a config.json or an index; ViT-g's index is about 100 KB


def regular_file(path: Path) -> Path:
    """`path`, refused unless it is a regular file (a FIFO would block, a device never end)."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path}: not a regular file; checkpoints are read from regular "
                              f"files (or folders of them)")
    return path


def _read_json(path: Path) -> Any:
    """A small JSON file: regular, at most `JSON_MAX_BYTES`, UTF-8."""
    with open(regular_file(path), "rb") as f:
        raw = f.read(JSON_MAX_BYTES + 1)
    if len(raw) > JSON_MAX_BYTES:
        raise CheckpointError(f"{path}: larger than {JSON_MAX_BYTES} bytes; not a config or index")
    try:
        return json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def file_digest(files: list[Path]) -> str:
    digests = []
    for f in files:
        with open(f, "rb") as fh:
            digests.append(hashlib.file_digest(fh, "sha256").digest())
    return _chain(digests)


def _chain(digests: list[bytes]) -> str:
    if len(digests) == 1:
        return digests[0].hex()
    return hashlib.sha256(b"".join(digests)).hexdigest()


# ---- config inference ---------------------------------------------------------------------------


@dataclass
class Inferred:
    config: ViTConfig
    layout: Layout
    found: dict[str, str]  # field -> where it came from
    assumed: dict[str, str]  # field -> why this value was assumed
    dropped: list[str]  # keys left out on purpose (HF pooler)


def probe_keys(layout: Layout) -> dict[str, str]:
    """Where `layout` keeps the tensors whose shapes give the sizes, read off its own table
    (our key on the left, theirs on the right; a fused right side serves all its inputs)."""
    ours = dict(patch="patch_embed.kernel" if layout.base == "nnx" else "patch_embed.weight",
                pos="pos_embed", cls="cls_token", ff1="blocks.0.ff1.bias", head="head.bias",
                qbias="blocks.0.attn.q.bias")
    rules = oriented(layout.table(ViTConfig()), 1)  # key names do not depend on the sizes
    theirs = {k: r.right[r.left.index(k) if len(r.right) == len(r.left) else 0]
              for r in rules for k in r.left}
    return {role: theirs[key] for role, key in ours.items()}


BLOCK_INDEX = re.compile(r"(?:^|[./])(?:blocks\.|layer\.|layers\.|encoderblock_)(\d+)[./]")
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_fast": "gelu_tanh", "relu": "relu"}


_MISSING = object()


def json_field(cfg: Mapping[str, Any], key: str, kinds: type | tuple[type, ...], where: Path,
               default: Any = _MISSING) -> Any:
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


def hf_config_fields(hf: Mapping[str, Any], where: Path) -> dict[str, Any]:
    """The fields a Hugging Face ViT `config.json` states, checked: an activation or size this
    ViT cannot run is refused by name, never replaced by a default."""
    act = json_field(hf, "hidden_act", str, where, "gelu")
    if act not in HF_ACTIVATIONS:
        raise CheckpointError(f"{where}: config.json hidden_act {act!r} is not supported (known: "
                              f"{', '.join(sorted(HF_ACTIVATIONS))}); refusing rather than "
                              f"running a different activation")
    size = json_field(hf, "image_size", (int, list), where, 224)
    return dict(num_heads=json_field(hf, "num_attention_heads", int, where),
                ln_eps=json_field(hf, "layer_norm_eps", (float, int), where, 1e-12),
                activation=HF_ACTIVATIONS[act], image_size=size)


def _normalise_hf(source: Source, dropped: list[str]) -> None:
    """ViTModel -> the ViTForImageClassification names: add `vit.`; its tanh pooler is dropped;
    with no classifier, the head is set to the identity so logits are the CLS features."""
    keys = list(source.meta)
    if any(k.startswith("vit.") for k in keys) or not any(k.startswith("embeddings.") for k in keys):
        return  # already ViTForImageClassification names, or not HF at all (the table will say)
    meta, load = dict(source.meta), source.load
    renamed = {("vit." + k if not k.startswith(("pooler.", "classifier.")) else k): k for k in keys}
    for new in list(renamed):
        if new.startswith("pooler."):
            dropped.append(new)
            del renamed[new]
    source.meta = {new: meta[old] for new, old in renamed.items()}
    source.reader = None  # keys renamed: read in header order, digest the files afterwards
    extra: dict[str, np.ndarray] = {}
    if "classifier.weight" not in source.meta:
        d = next(m[0][-1] for k, m in source.meta.items() if k.endswith("layernorm.weight"))
        dtype = next(iter(source.meta.values()))[1]
        extra = {"classifier.weight": np.eye(d, dtype=dtype), "classifier.bias": np.zeros(d, dtype)}
        source.meta.update({k: (a.shape, a.dtype) for k, a in extra.items()})
        dropped.append("(no classifier: head set to the identity; logits = final-norm CLS features)")
    source.load = lambda k: extra[k] if k in extra else load(renamed[k])


def infer_config(source: Source, layout: Layout | None = None,
                 given: ViTConfig | None = None) -> Inferred:
    """The layout (detected unless given) and the `ViTConfig` (`given`, or from metadata,
    config.json and tensor shapes); says which fields were found and which were assumed."""
    dropped: list[str] = []
    layout = layout or detect_layout(source.meta)
    if layout.name in ("hf", "hf5"):
        _normalise_hf(source, dropped)
    if any(k.startswith("fc_norm.") for k in source.meta):
        raise LayoutError(f"{source.path}: a timm model with fc_norm (global_pool='avg'): its "
                          f"LayerNorm runs after pooling, a different function from this ViT's "
                          f"norm before pooling; rebuild the timm model with fc_norm=False")
    found, assumed = {}, {}
    if given is not None:
        return Inferred(given, layout, {f: "given" for f in given.to_dict()}, assumed, dropped)
    if "vit_parity" in source.metadata:
        manifest = json.loads(source.metadata["vit_parity"])
        found = {f: "vit-parity metadata" for f in manifest["config"]}
        return Inferred(ViTConfig.from_dict(manifest["config"]), layout, found, assumed, dropped)
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
    n = pos[-2] - (has_cls and layout.name != "big_vision_bv")
    layers = {int(m.group(1)) for k in source.meta for m in [BLOCK_INDEX.search(k)] if m}
    sizes = dict(patch_size=p, in_channels=c, d_model=d, num_layers=len(layers),
                 pool="cls" if has_cls else "mean", qkv_bias=probe["qbias"] in source.meta,
                 d_ff=shape("ff1")[0] if probe["ff1"] in source.meta else 4 * d,
                 num_classes=shape("head")[0] if probe["head"] in source.meta else 1000)
    found.update({f: "tensor shapes" for f in sizes})
    hf = source.hf_config or {}
    if hf:
        sizes.update(hf_config_fields(hf, source.path))
        found.update({f: "config.json" for f in ("num_heads", "ln_eps", "activation", "image_size")})
    else:
        side = math.isqrt(n)
        if side * side != n:
            raise CheckpointError(f"{source.path}: {n} position rows are not a square grid; "
                                  f"pass config=ViTConfig(...) to say the image size")
        sizes["image_size"] = side * p
        assumed["image_size"] = f"{side * p} (square, from {n} patches)"
        q = source.meta.get(probe["qbias"])
        if layout.name.startswith("big_vision") and q is not None:
            sizes["num_heads"] = q[0][0]
            found["num_heads"] = "attention kernel shape (D, heads, head_dim)"
        else:
            sizes["num_heads"] = d // 64 if d % 64 == 0 else 1
            assumed["num_heads"] = f"{sizes['num_heads']} (head_dim 64, the ViT paper's)"
        tanh = layout.name.startswith("big_vision")
        sizes["activation"] = "gelu_tanh" if tanh else "gelu"
        assumed["activation"] = ("gelu_tanh (flax nn.gelu's default, big_vision)" if tanh
                                 else "gelu exact (timm, torch)")
        sizes["ln_eps"] = 1e-6
        assumed["ln_eps"] = "1e-6 (timm, flax)"
        if layout.name == "timm" and has_cls:
            assumed["pool"] = "cls (timm global_pool='token'; a state dict cannot say 'avg')"
    try:
        config = ViTConfig(**sizes)
    except ConfigError as e:
        raise CheckpointError(f"{source.path}: the inferred config is invalid: {e}") from None
    return Inferred(config, layout, found, assumed, dropped)


# ---- conversion streams -------------------------------------------------------------------------


Hook = Callable[[str, np.ndarray, bool], np.ndarray]  # (key, array, dry run) -> array


@dataclass
class Plan:
    """A checked chain of table steps from a source layout to a target layout."""

    steps: list[list[Rule]]
    order: list[tuple[str, Meta]]  # output keys in the order the stream yields them
    inputs: list[str]  # source keys in read order
    hook: Hook | None = None  # applied to every tensor in our base layout, after the first step

    def run(self, items: Iterable[tuple[str, np.ndarray]], *, dry: bool = False,
            materialize: bool = True) -> Iterator[tuple[str, np.ndarray]]:
        """The converted tensors, one at a time; `dry` runs on stand-ins for the key order.
        Without `materialize`, transposed tensors stay views (of the source's memory map) for a
        writer that copies each into its own reused buffer (`write_safetensors`)."""
        last = len(self.steps) - 1  # copy into contiguous memory once, at the end of the chain
        for i, rules in enumerate(self.steps):
            items = stream_table(items, rules, contiguous=i == last and materialize and not dry)
            if i == 0 and self.hook is not None:
                items = ((k, self.hook(k, a, dry)) for k, a in items)
        return iter(items)


def plan_conversion(meta: Mapping[str, Meta], src: Layout, dst: Layout, config: ViTConfig,
                    *, out_config: ViTConfig | None = None, hook: Hook | None = None,
                    what: str | None = None) -> Plan:
    """Check every step on shapes alone (raising one `TransferError` listing all problems).

    `hook` may change tensors (resampling, dtype casts) between the source's table and the
    rest, which are then checked against `out_config` (default `config`).
    """
    out = out_config or config
    steps = [check_table(meta, oriented(src.table(config), config.num_layers, reverse=True),
                         base_shapes(src.base, config), what=what or src.name)]
    base = src.base
    if base != dst.base:
        rules = nnx_torch(out)
        steps.append([r.reversed() for r in rules] if base == "torch" else rules)
        base = dst.base
    base_meta = {k: (s, np.dtype("float32")) for k, s in base_shapes(base, out).items()}
    forward = oriented(dst.table(out), out.num_layers)
    steps.append(check_table(base_meta, forward, forward_targets(forward, base_meta),
                             what=dst.base))
    used = {k for r in steps[0] for k in r.left}
    inputs = [k for k in meta if k in used]
    dummies = ((k, stand_in(*meta[k])) for k in inputs)
    order = [(k, (a.shape, a.dtype)) for k, a in Plan(steps, [], inputs, hook).run(dummies, dry=True)]
    return Plan(steps, order, inputs, hook)


# ---- writing ------------------------------------------------------------------------------------


FileId = tuple[int, int]  # (st_dev, st_ino): one file, under whatever name or mount


def file_ids(path: Path, *, limit: int = 100_000) -> set[FileId]:
    """The identity of `path` (followed through links) and, for a folder, of everything in it."""
    ids: set[FileId] = set()
    with contextlib.suppress(OSError):
        st = path.stat()
        ids.add((st.st_dev, st.st_ino))
        if stat.S_ISDIR(st.st_mode):
            for root, dirs, names in os.walk(path):
                for n in dirs + names:
                    with contextlib.suppress(OSError):
                        st = (Path(root) / n).stat()
                        ids.add((st.st_dev, st.st_ino))
                if len(ids) > limit:
                    break
    return ids


def _refuse_clobbering(final: Path, protected: set[FileId]) -> None:
    if protected and file_ids(final) & protected:
        raise CheckpointError(f"{final}: the output would overwrite the input (or delete it: "
                              f"the same file, or a folder holding it, under another name or "
                              f"mount); refused even with --force: choose another output")


@contextlib.contextmanager
def atomic_output(dst: Path, *, force: bool = False, protected: set[FileId] = frozenset()
                  ) -> Iterator[Path]:
    """A temporary folder next to `dst`: write the outputs there under their final names; they
    are moved into place only if the block succeeds, so a failure leaves nothing behind.
    Nothing that exists (a dangling link included) is replaced without `force`, and nothing in
    `protected` (the inputs' file identities) is replaced or deleted at all."""
    _refuse_clobbering(dst, protected)
    if os.path.lexists(dst) and not force:
        raise CheckpointError(f"{dst}: already exists (use --force / force=True to replace it)")
    if not dst.parent.is_dir():
        raise CheckpointError(f"{dst}: the directory {dst.parent} does not exist")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        yield tmp
        finals = [dst.parent / p.name for p in sorted(tmp.iterdir())]
        clashes = [f for f in finals if os.path.lexists(f)]
        if clashes and not force:
            raise CheckpointError(f"{clashes[0]}: already exists (use --force / force=True)")
        for final in clashes:
            _refuse_clobbering(final, protected)
        for final in finals:
            if final.is_dir() and not final.is_symlink():
                shutil.rmtree(final)
            os.replace(tmp / final.name, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _header(order: list[tuple[str, Meta]], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, (shape, dtype) in order:
        size = math.prod(shape) * np.dtype(dtype).itemsize
        header[key] = {"dtype": DTYPE_CODES[np.dtype(dtype)], "shape": list(shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    # Padded (the format allows trailing spaces) so the data starts 64 bytes into a cache line:
    # memory-mapped tensors then start 64-byte aligned, as torch's allocator aligns them.
    raw += b" " * (-(8 + len(raw)) % 64)
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(path: Path, order: list[tuple[str, Meta]],
                      tensors: Iterable[tuple[str, np.ndarray]], metadata: dict[str, str]) -> None:
    """Stream tensors into one safetensors file whose header (from `order`) is written first;
    transposed views are made contiguous on the way (`fileio.SequentialWriter`)."""
    expected = dict(order)
    with SequentialWriter(path) as f:
        f.write(_header(order, metadata))
        for (key, array), (want, _) in zip(tensors, order, strict=True):
            if key != want or (array.shape, array.dtype) != expected[key]:
                raise RuntimeError(f"stream out of order at {key!r} (expected {want!r})")
            f.write(array)


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
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
             "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


DIGEST_PLACEHOLDER = "0" * 64  # the source's sha256, patched in once the stream has been read


def _patch_digest(files: list[Path], digest: str) -> None:
    """Replace the placeholder in each written header (same length: offsets stay valid)."""
    old, new = DIGEST_PLACEHOLDER.encode(), digest.encode()
    for path in files:
        with open(path, "r+b") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if path.suffix == ".safetensors" else path.stat().st_size
            start = 8 if path.suffix == ".safetensors" else 0
            f.seek(start)
            text = f.read(n)
            f.seek(start)
            f.write(text.replace(old, new, 1))


def write_layout(out: Path, layout: Layout, plan: Plan, tensors: Iterator[tuple[str, np.ndarray]],
                 config: ViTConfig, manifest: dict[str, str], max_shard_size: int | None,
                 source_digest: Callable[[], str] | None = None) -> str:
    """Write the stream as `layout` wants: a folder for hf, an .npz for big_vision, else
    safetensors (sharded with an index when `max_shard_size` splits it). `source_digest` is
    called after the stream is consumed and lands in the manifest as `source_sha256`."""
    if source_digest is not None:
        manifest = {**manifest, "source_sha256": DIGEST_PLACEHOLDER}
    metadata = {"format": "flax" if layout.base == "nnx" else "pt",
                "vit_parity": json.dumps({**manifest, "config": config.to_dict()}, sort_keys=True)}
    if layout.name.startswith("big_vision"):
        arrays = {k: to_contiguous(a) for k, a in tensors}
        if source_digest is not None:
            metadata["vit_parity"] = metadata["vit_parity"].replace(DIGEST_PLACEHOLDER,
                                                                    source_digest())
        # npz has no metadata: the manifest travels as one uint8 array of JSON bytes.
        arrays[NPZ_MANIFEST] = np.frombuffer(metadata["vit_parity"].encode(), np.uint8)
        with open(out, "wb") as f:
            np.savez(f, **arrays)
        return out.name
    if layout.name in ("hf", "hf5"):
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(hf_config_json(config), indent=2))
        metadata = {"format": "pt"}
        base = out / "model.safetensors"
    else:
        base = out
    shards = shard(plan.order, max_shard_size)
    if len(shards) == 1:
        write_safetensors(base, plan.order, tensors, metadata)
        if source_digest is not None and "vit_parity" in metadata:
            _patch_digest([base], source_digest())
        return out.name
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
    return out.name if out != base else index_path.name


def hf_config_json(config: ViTConfig) -> dict[str, Any]:
    if config.pool != "cls":
        raise LayoutError("the HF ViT reads its classifier from the class token's row: a "
                          "mean-pool model has no HF ViT equivalent")
    h, w = config.image_hw
    act = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}[config.activation]
    return {"architectures": ["ViTForImageClassification"], "model_type": "vit",
            "hidden_size": config.d_model, "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_heads, "intermediate_size": config.d_ff,
            "hidden_act": act, "layer_norm_eps": config.ln_eps,
            "image_size": h if h == w else [h, w],  # HF's ViTEmbeddings takes either
            "patch_size": config.patch_size, "num_channels": config.in_channels,
            "qkv_bias": config.qkv_bias, "num_labels": config.num_classes,
            "id2label": {str(i): f"LABEL_{i}" for i in range(config.num_classes)},
            "label2id": {f"LABEL_{i}": i for i in range(config.num_classes)},
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


__all__ = ["LAYOUTS", "CheckpointError", "Inferred", "Plan", "Source", "infer_config",
           "atomic_output", "plan_conversion", "read_checkpoint", "write_layout"]
