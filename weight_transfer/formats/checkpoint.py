"""Checkpoint sources: any supported file or folder opened as a lazy `Source` (tensor shapes
now, each tensor on demand). Formats live in `safetensors_io` and `npz_io`, config inference in
`inference`, conversion plans in `conversion`, writing in `writers`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from weight_transfer.core.errors import CheckpointError
from weight_transfer.core.table import Meta
from weight_transfer.formats.msgpack_io import MsgpackReader
from weight_transfer.formats.npz_io import NpzReader
from weight_transfer.formats.orbax_io import OrbaxReader, checkpoint_dir
from weight_transfer.formats.reader import InMemory, Reader, Renamed
from weight_transfer.formats.safetensors_io import SafetensorsReader
from weight_transfer.formats.tensorstore_io import (
    TensorstoreReader,
    is_tensorstore_checkpoint,
    last_checkpoint,
)


@dataclass
class Source:
    """One checkpoint as found: where it is, its format's `Reader`, and what lies beside it."""

    path: Path
    reader: Reader
    hf_config: dict[str, Any] | None = None  # config.json next to the weights
    folder: Path | None = None  # the folder given, when the weights were found in one
    notes: list[str] = field(default_factory=list)  # how the tensors were found, for reports
    # Buffers a layout's normaliser took out of the tensors to read, not copy (the original
    # DINOv3's RoPE periods and k-bias masks): `Layout.class_fields` states fields from them.
    buffers: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def meta(self) -> dict[str, Meta]:
        return self.reader.meta

    @property
    def metadata(self) -> dict[str, str]:
        return self.reader.metadata

    @property
    def files(self) -> list[Path]:
        return self.reader.files

    @property
    def container(self) -> str:
        return self.reader.container

    def load(self, key: str) -> np.ndarray:
        return self.reader.load(key)

    def items(
        self, keys: Iterable[str] | None = None, *, digest: bool = False
    ) -> Iterator[tuple[str, np.ndarray]]:
        """The tensors in file order; with `digest`, the bytes also feed `digest()` as read."""
        for key in self.reader.ordered(self.meta if keys is None else keys, digest=digest):
            yield key, self.reader.load(key)

    def renamed(self, meta: dict[str, Meta], read: Callable[[str], np.ndarray]) -> Source:
        """The same checkpoint under other names (a layout's normaliser)."""
        return dataclasses.replace(self, reader=Renamed(self.reader, meta, read))

    def named(self, names: Mapping[str, str]) -> Source:
        """The same checkpoint with each tensor under a new name (`names`: new -> stored)."""
        return self.renamed(
            {n: self.meta[k] for n, k in names.items()}, lambda n: self.load(names[n])
        )

    def close(self) -> None:
        """Release the reader (a conversion that failed midway leaves no thread)."""
        self.reader.close()

    def digest(self) -> str:
        return self.reader.digest()


def read_checkpoint(path: str | os.PathLike, *, allow_pickle: bool = False) -> Source:
    """Open a safetensors file, a sharded index, a Hugging Face folder, an .npz, an Orbax
    checkpoint folder, a Flax msgpack file (or its sharded index, or flax.training's
    `checkpoint_<step>`), a big_vision tensorstore folder (or its `<name>-LAST` pointer), or
    (only with `allow_pickle`) a torch .bin/.pth/.pt file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    hf_config = None
    if path.is_dir() and (orbax := checkpoint_dir(path)) is not None:
        reader = OrbaxReader(path, orbax)
        return Source(path, reader, folder=path, notes=[f"an Orbax checkpoint ({reader.path})"])
    if path.is_file() and path.name.endswith("-LAST"):  # big_vision's pointer to its last step
        path = last_checkpoint(regular_file(path))
    if path.is_dir() and is_tensorstore_checkpoint(path):
        return Source(
            path, TensorstoreReader(path), folder=path, notes=["a tensorstore checkpoint"]
        )
    if path.is_dir():
        cfg = path / "config.json"
        hf_config = _read_json(cfg) if cfg.exists() else None
        if hf_config is not None and not isinstance(hf_config, dict):
            raise CheckpointError(f"{cfg}: expected a JSON object, got {type(hf_config).__name__}")
        source = read_checkpoint(_weights_in_folder(path), allow_pickle=allow_pickle)
        source.hf_config, source.folder = hf_config, path
        return source
    regular_file(path)
    name = path.name
    if name.endswith(".safetensors.index.json"):
        return Source(path, _sharded_safetensors(path))
    if name.endswith(".safetensors"):
        return Source(path, SafetensorsReader([path]))
    if name.endswith(".msgpack.index.json"):
        return _msgpack_source(path, _sharded_msgpack(path))
    if name.endswith(".msgpack") or LEGACY_FLAX.fullmatch(name):
        return _msgpack_source(path, MsgpackReader([path]))
    if name.endswith(".npz"):
        return Source(path, NpzReader(path))
    if name.endswith((".bin", ".pth", ".pt")):
        if not allow_pickle:
            raise CheckpointError(
                f"{path}: a pickle-based torch file; it is only read when asked "
                f"(allow_pickle=True, --allow-pickle), and then with "
                f"torch.load(weights_only=True)"
            )
        return _read_torch_pickle(path)
    raise CheckpointError(
        f"{path}: unknown checkpoint type (expected .safetensors, "
        f".safetensors.index.json, a folder, .npz, Flax .msgpack (or its .msgpack.index.json, "
        f"or a flax.training checkpoint_<step>), or .bin/.pth with pickle)"
    )


LEGACY_FLAX = re.compile(r"checkpoint_\d+")  # flax.training.checkpoints' single-file form


def _msgpack_source(path: Path, reader: MsgpackReader) -> Source:
    """A msgpack source, noting the leaves that were not arrays (a training state's step)."""
    n = reader.others
    notes = [f"{n} leaf/leaves that are not arrays (a step, a rate...) left out"] if n else []
    return Source(path, reader, notes=notes)


def _shards(path: Path, weight_map: dict[str, str]) -> list[Path]:
    files = [path.parent / s for s in sorted(set(weight_map.values()))]
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{path}: shard {f.name} is missing")
    return files


def _sharded_msgpack(path: Path) -> MsgpackReader:
    """Hugging Face Flax's shards (`flax_model.msgpack.index.json`: names joined by '/'),
    checked against what the shards hold."""
    weight_map = {k.replace("/", "."): v for k, v in _read_index(path).items()}
    files = _shards(path, weight_map)
    reader = MsgpackReader(files)
    _check_index(path, weight_map, {k: files[reader.where[k][0]].name for k in reader.meta})
    return reader


def _sharded_safetensors(path: Path) -> SafetensorsReader:
    """The shards an index names, checked against what the shards hold."""
    weight_map = _read_index(path)
    files = _shards(path, weight_map)
    reader = SafetensorsReader(files)
    _check_index(path, weight_map, {k: files[reader.where[k][0]].name for k in reader.meta})
    return reader


def _check_index(path: Path, weight_map: dict[str, str], stored: dict[str, str]) -> None:
    wrong = sorted(k for k in set(weight_map) | set(stored) if weight_map.get(k) != stored.get(k))
    if wrong:
        k = wrong[0]
        raise CheckpointError(
            f"{path}: the index and the shards disagree on {len(wrong)} "
            f"tensor(s), e.g. {k!r}: the index says "
            f"{weight_map.get(k, 'nothing')}, the shards hold it in "
            f"{stored.get(k, 'none')}"
        )


STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "module", "ema")  # common wrappers


def _read_torch_pickle(path: Path) -> Source:
    """A torch pickle read with `weights_only=True` (memory-mapped when it is the zip format;
    a legacy file is read whole). A training checkpoint `{"model": state_dict, ...}` is
    unwrapped, and which key was used is reported in `Source.notes`."""
    import torch

    from weight_transfer.frameworks.torch_bridge import torch_to_numpy

    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # only the legacy (non-zip) format cannot be mapped
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise CheckpointError(f"{path}: torch.load(weights_only=True) failed: {e}") from None
    notes = []
    if isinstance(sd, Mapping) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        key = next((k for k in STATE_DICT_KEYS if isinstance(sd.get(k), Mapping)), None)
        if key is not None:
            sd = sd[key]
            notes.append(f"the state dict was read from the checkpoint's {key!r} entry")
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, got {type(sd).__name__}")
    arrays = {k: torch_to_numpy(v) for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not arrays:
        raise CheckpointError(
            f"{path}: no tensors found (top-level keys: {', '.join(map(str, list(sd)[:8]))})"
        )
    return Source(path, InMemory(arrays, [path]), notes=notes)


SAFE_NAMES = ("model.safetensors.index.json", "model.safetensors", "open_clip_model.safetensors")
FLAX_NAMES = ("flax_model.msgpack.index.json", "flax_model.msgpack")  # Hugging Face Flax
PICKLE_NAMES = ("pytorch_model.bin", "open_clip_pytorch_model.bin")


def _weights_in_folder(folder: Path) -> Path:
    """The one weights file of a Hub folder (HF, timm, open_clip, HF Flax): safetensors over
    Flax msgpack over pickles (the Hub's convention: the same weights, in the form read most
    safely); two candidates of one form are ambiguous."""
    safe = [folder / n for n in SAFE_NAMES if (folder / n).exists()]
    if not safe:
        safe = [folder / n for n in FLAX_NAMES if (folder / n).exists()]
    if len(safe) > 1:
        names = ", ".join(p.name for p in safe)
        raise CheckpointError(
            f"{folder}: several weight files ({names}); pass the one to read instead of the folder"
        )
    pickles = [folder / n for n in PICKLE_NAMES if (folder / n).exists()]
    if safe or len(pickles) == 1:
        return (safe or pickles)[0]
    if pickles:
        names = ", ".join(p.name for p in pickles)
        raise CheckpointError(
            f"{folder}: several weight files ({names}); pass the one to read instead of the folder"
        )
    raise CheckpointError(
        f"{folder}: a folder without {', '.join(SAFE_NAMES + FLAX_NAMES + PICKLE_NAMES)}"
    )


def _read_index(path: Path) -> dict[str, str]:
    """A sharded index's `weight_map`, checked: tensor name -> a shard file beside the index."""
    index = _read_json(path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(
            f"{path}: not a sharded index (expected a 'weight_map' object of "
            f"tensor name -> shard file name)"
        )
    for shard_name in set(weight_map.values()):
        if Path(shard_name).name != shard_name or shard_name in ("", ".", ".."):
            raise CheckpointError(
                f"{path}: shard path {shard_name!r} leaves the index's folder; "
                f"shards must be plain file names beside the index"
            )
    return weight_map


JSON_MAX_BYTES = 64 << 20  # a config.json or an index; ViT-g's index is about 100 KB


def regular_file(path: Path) -> Path:
    """`path`, refused unless it is a regular file (a FIFO would block, a device never end)."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(
            f"{path}: not a regular file; checkpoints are read from regular "
            f"files (or folders of them)"
        )
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


__all__ = ["CheckpointError", "Source", "read_checkpoint"]
