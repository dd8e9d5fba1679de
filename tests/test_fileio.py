"""The file writer behind every safetensors output: same bytes with and without O_DIRECT,
falling back when the filesystem refuses it, and errors that are not swallowed."""

import errno
import hashlib

import numpy as np
import pytest
import torch

import weight_transfer as wt
import weight_transfer.formats.fileio as fileio
from tests.conftest import tiny
from weight_transfer.formats.checkpoint import read_checkpoint
from weight_transfer.frameworks.weights import random_nnx, random_torch


def pieces():
    """Bytes, contiguous arrays and transposed views of sizes that straddle the 8 KiB buffers."""
    rng = np.random.default_rng(3)
    m = rng.standard_normal((300, 240)).astype(np.float32)  # .T takes the tiled copy
    return [
        b"header!",
        m,
        m.T,
        np.empty((0, 3), np.float32),
        rng.standard_normal(5000),
        rng.standard_normal((70, 90)).astype(np.float32).T,
        b"x" * 8192,
        np.float32(2.5),
    ]


def expected() -> bytes:
    return b"".join(
        p if isinstance(p, bytes) else np.ascontiguousarray(p).tobytes() for p in pieces()
    )


def write_pieces(path, **kw):
    with fileio.SequentialWriter(path, chunk=8192, **kw) as f:
        for p in pieces():
            f.write(p)
    return f


@pytest.mark.parametrize("direct", [True, False])
def test_writer_bytes_do_not_depend_on_the_path(tmp_path, direct):
    write_pieces(tmp_path / "out.bin", direct=direct)
    assert (tmp_path / "out.bin").read_bytes() == expected()


@pytest.mark.skipif(not hasattr(fileio.os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_writer_falls_back_when_the_open_refuses_direct_io(tmp_path, monkeypatch):
    real = fileio.os.open

    def open_(path, flags, *mode):
        if flags & fileio.os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")  # what tmpfs says
        return real(path, flags, *mode)

    monkeypatch.setattr(fileio.os, "open", open_)
    f = write_pieces(tmp_path / "out.bin")
    assert not f.direct and (tmp_path / "out.bin").read_bytes() == expected()


def test_writer_falls_back_when_a_direct_write_is_refused(tmp_path, monkeypatch):
    with fileio.SequentialWriter(tmp_path / "probe") as probe:
        direct = probe.direct
    if not direct:
        pytest.skip("this filesystem refuses O_DIRECT at open; the test above covers that")
    real, refused = fileio.os.pwrite, []

    def pwrite(fd, data, offset):
        if not refused:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(fileio.os, "pwrite", pwrite)
    f = write_pieces(tmp_path / "out.bin")
    assert refused and not f.direct and (tmp_path / "out.bin").read_bytes() == expected()


def test_writer_errors_surface(tmp_path, monkeypatch):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "pwrite", full)
    for direct in (True, False):  # a refused direct write is retried buffered, then raises
        with pytest.raises(OSError, match="No space left"):
            write_pieces(tmp_path / "out.bin", direct=direct)


def test_reader_maps_copy_on_write_and_hashes_the_file(tmp_path):
    path = wt.save_checkpoint(random_nnx(tiny(), seed=1), tmp_path / "m.safetensors")
    before = path.read_bytes()
    source = read_checkpoint(path)
    arrays = dict(source.items(digest=True))
    assert source.digest() == hashlib.sha256(before).hexdigest()  # what sha256sum prints
    for a in arrays.values():
        a[...] = 7  # private pages: this process's copy changes, the file never does
    assert path.read_bytes() == before


def test_torch_model_shares_the_file_pages_copy_on_write(tmp_path):
    model = random_torch(tiny(), seed=4)
    path = wt.save_checkpoint(model, tmp_path / "m.safetensors", layout="torch")
    before = path.read_bytes()
    loaded = wt.load_checkpoint(path, "torch")
    with torch.no_grad():
        for p in loaded.parameters():
            p.add_(1.0)  # training on a loaded model must not write through to the file
    assert path.read_bytes() == before
    again = wt.load_checkpoint(path, "torch")
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_data_starts_on_a_cache_line_and_copies_are_aligned(tmp_path):
    import struct

    from weight_transfer.frameworks.bridge import numpy_to_torch

    path = wt.save_checkpoint(random_nnx(tiny(), seed=2), tmp_path / "m.safetensors")
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert (8 + n) % 64 == 0  # so memory-mapped tensors start 64-byte aligned
    reader = read_checkpoint(path).reader
    first = min(reader.where, key=lambda key: reader.where[key][1])
    assert reader.where[first][1] == 8 + n and reader.load(first).ctypes.data % 64 == 0
    assert numpy_to_torch(np.ones((3, 5))[:, ::2]).data_ptr() % 64 == 0  # as torch allocates
