"""big_vision's tensorstore checkpoints (`big_vision.utils.save_checkpoint_ts`): a folder
`<name>-<step:09d>` holding one zarr array per leaf of the saved tree, named by its path with
'/' written '~' (`params~img~Transformer~encoderblock~LayerNorm_0~scale`), and a pointer file
`<name>-LAST` beside it naming the last complete step.

Given the folder (or the `-LAST` file), every array's `.zarray` is read and checked first
(dtype among the weights', sizes non-negative, zarr format 2, nothing but plain folders and
files: a symbolic link, which could point outside the checkpoint, is refused), and the arrays
together must not declare more than `BOMB_RATIO` times the bytes on disk (a compressed chunk
can claim any size). Values are read with tensorstore, one array when asked for. The tree's
names are joined by '.' here, as in the other trees (Orbax, msgpack).

`tensorstore` comes with `orbax-checkpoint` (`pip install 'vit-parity[orbax]'`), and is
imported only when such a folder is read.
"""

from __future__ import annotations

import json
import math
import re
import stat
from pathlib import Path

import numpy as np

from weight_transfer.core.errors import CheckpointError
from weight_transfer.core.table import Meta
from weight_transfer.formats.reader import WEIGHT_DTYPES, Reader, are_sizes, weight_dtype

ZARRAY = ".zarray"
# by the names zarr gives them (numpy's `dtype.str`; bfloat16 by name, as jax writes it)
ZARR_DTYPES = {(n if n == "bfloat16" else np.dtype(n).str): n for n in WEIGHT_DTYPES}  # -> name
BOMB_RATIO = 16  # declared bytes over bytes on disk (random weights compress ~1x), past 64 MiB
BOMB_FLOOR = 64 << 20
STEP = re.compile(r"\d+(-tmp)?")  # what save_checkpoint_ts writes into `<name>-LAST`


def is_tensorstore_checkpoint(folder: Path) -> bool:
    """A folder of zarr arrays (each a subfolder with a `.zarray`)."""
    try:
        return any((p / ZARRAY).is_file() for p in folder.iterdir() if p.is_dir())
    except OSError:
        return False


def last_checkpoint(pointer: Path) -> Path:
    """The folder a `<name>-LAST` file points to: `<name>-<its content>`, beside it."""
    text = pointer.read_text(errors="replace").strip()[:64]
    if not STEP.fullmatch(text):
        raise CheckpointError(
            f"{pointer}: a -LAST pointer holds a step ('000001000'), not {text!r}"
        )
    folder = pointer.with_name(f"{pointer.name.removesuffix('-LAST')}-{text}")
    if not folder.is_dir():
        raise CheckpointError(f"{pointer}: points to {folder.name}, which is not there")
    return folder


def _plain(path: Path, root: Path) -> None:
    mode = path.lstat().st_mode
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        raise CheckpointError(
            f"{root}: {path.relative_to(root)} is a symbolic link or a special file; a "
            f"tensorstore checkpoint is read only from its own plain folders and files"
        )


class TensorstoreReader(Reader):
    """The arrays of a big_vision tensorstore checkpoint folder."""

    container = "tensorstore"  # a tree: its names may be any layout's (porting.inference)

    def __init__(self, folder: Path):
        self.folder = folder.absolute()
        self.meta: dict[str, Meta] = {}
        self.dirs: dict[str, Path] = {}
        self.metadata: dict[str, str] = {}
        self.files = []
        declared = on_disk = 0
        for entry in sorted(self.folder.iterdir()):
            _plain(entry, self.folder)
            if not (entry.is_dir() and (entry / ZARRAY).is_file()):
                continue  # big_vision writes nothing else here; anything else is not an array
            for part in entry.rglob("*"):
                _plain(part, self.folder)
                if part.is_file():
                    self.files.append(part)
                    on_disk += part.stat().st_size
            key = self._key(entry.name)
            shape, dtype = self._zarray(entry)
            declared += math.prod(shape) * dtype.itemsize
            self.meta[key], self.dirs[key] = (shape, dtype), entry
        if not self.meta:
            raise CheckpointError(f"{folder}: no zarr arrays (folders with a .zarray)")
        if declared > BOMB_RATIO * on_disk + BOMB_FLOOR:
            raise CheckpointError(
                f"{folder}: the arrays declare {declared:,} bytes from {on_disk:,} bytes on "
                f"disk (more than {BOMB_RATIO}x): refusing to decompress them"
            )

    def _key(self, name: str) -> str:
        parts = name.split("~")
        if any(not p or "." in p for p in parts):
            raise CheckpointError(
                f"{self.folder}: the array {name!r} has an empty name part or a '.', which "
                f"joins names here; not a big_vision checkpoint"
            )
        return ".".join(parts)

    def _zarray(self, entry: Path) -> tuple[tuple[int, ...], np.dtype]:
        where = entry / ZARRAY
        try:
            if where.stat().st_size > 1 << 16:
                raise ValueError("larger than 64 KiB")
            spec = json.loads(where.read_text())
            shape, name = spec["shape"], spec["dtype"]
            ok = spec.get("zarr_format") == 2 and isinstance(shape, list) and are_sizes(shape, 32)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{where}: not a zarr array description ({e})") from None
        if not ok:
            raise CheckpointError(f"{where}: not a zarr v2 array with non-negative sizes")
        if not isinstance(name, str) or name not in ZARR_DTYPES:
            raise CheckpointError(f"{where}: dtype {name!r} (weights are {', '.join(ZARR_DTYPES)})")
        return tuple(shape), weight_dtype(ZARR_DTYPES[name])

    def load(self, key: str) -> np.ndarray:
        try:
            import tensorstore as ts
        except ImportError:
            raise CheckpointError(
                "big_vision tensorstore checkpoints need tensorstore: pip install "
                "'vit-parity[orbax]' (or tensorstore)"
            ) from None
        spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(self.dirs[key])}}
        try:
            array = ts.open(spec, open=True, read=True).result().read().result()
        except Exception as e:  # tensorstore raises its own types for damaged data
            raise CheckpointError(
                f"{self.dirs[key]}: tensorstore could not read it ({e})"
            ) from None
        shape, dtype = self.meta[key]
        array = np.asarray(array)
        if array.shape != shape or array.dtype != dtype:
            raise CheckpointError(
                f"{self.dirs[key]}: read {array.shape} {array.dtype}, its .zarray says "
                f"{shape} {dtype}"
            )
        return array
