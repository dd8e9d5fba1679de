"""The .npz format (google-research and big_vision checkpoints): read lazily from the zip
directory and each member's .npy header, written with the manifest as one byte array."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np

from weight_transfer.core.errors import CheckpointError
from weight_transfer.core.table import Meta
from weight_transfer.formats.reader import Reader, weight_dtype

NPZ_MANIFEST = "__vit_parity__"  # npz has no metadata: the manifest is a uint8 array of JSON
MANIFEST_MAX_BYTES = 1 << 20


class NpzReader(Reader):
    """The arrays of an `.npz`, read one at a time: the zip directory and each member's `.npy`
    header are read first (names, dtypes, shapes), each member's declared size is checked
    against its header, and nothing is inflated before a key is asked for. A 2-byte void
    array is bfloat16 (numpy cannot name that dtype; timm's `_load_weights(load_bfloat16=True)`
    reads such arrays the same way)."""

    def __init__(self, path: Path):
        self.path = path
        self.files = [path]
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
                read_header = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape, fortran, dtype = read_header(f)
                header_bytes = f.tell()
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, RuntimeError) as e:
            raise CheckpointError(f"{where}: not a readable .npy ({e})") from None
        if dtype.hasobject:
            raise CheckpointError(f"{where} holds Python objects (pickle); refused")
        want = header_bytes + math.prod(shape) * dtype.itemsize
        if info.file_size != want:
            raise CheckpointError(
                f"{where} declares {info.file_size} bytes, but its header says "
                f"{shape} {dtype} ({want} bytes with the header): corrupt"
            )
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
            dtype = weight_dtype("bfloat16")
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
