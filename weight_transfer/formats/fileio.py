"""How converted tensors reach the disk: a background thread, and a sequential file writer that
bypasses the page cache where it can.

Measured on this project's 2-core VM (`benchmarks/porting.py`, ViT-H/14, 2.5 GB): copying the
bytes into fresh page-cache pages with `write()` costs 2-9 s of kernel time, while `O_DIRECT`
writes of page-aligned buffers take about 1 s with the CPU free for the transposes and the
sha256. Large-checkpoint writers elsewhere make the same choice (DeepSpeed's `FastFileWriter`).
"""

from __future__ import annotations

import mmap
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from weight_transfer.formats.memory import to_contiguous

ALIGN = 4096  # O_DIRECT wants buffer, offset and length aligned to the device's logical block


class Background:
    """Calls run in order on one background thread, at most `depth` waiting (so at most that
    many buffers are held for it); an error surfaces at the next `submit` or at `drain`."""

    def __init__(self, depth: int = 2):
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending: deque = deque()
        self.depth = depth

    def submit(self, fn, *args) -> None:
        self.pending.append(self.pool.submit(fn, *args))
        while len(self.pending) > self.depth:
            self.pending.popleft().result()

    def drain(self) -> None:
        while self.pending:
            self.pending.popleft().result()

    def __enter__(self) -> Background:
        return self

    def stop(self) -> None:
        """Cancel what has not started, wait for what has, end the thread."""
        self.pending.clear()
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                self.drain()
        finally:
            self.stop()


class SequentialWriter:
    """A new file written front to back. Bytes gather in page-aligned staging buffers; each
    full buffer goes to the file on a background thread while the next one fills, with
    `O_DIRECT` when the platform and filesystem accept it (Linux ext4, xfs, recent tmpfs...),
    else through the page cache (a filesystem that refuses it at open or at the first write,
    macOS, or `direct=False`). The same bytes either way."""

    def __init__(self, path: Path, *, direct: bool = True, chunk: int = 8 << 20, buffers: int = 3):
        assert chunk % ALIGN == 0
        self.path, self.chunk = path, chunk
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self.fd = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(path, flags | os.O_DIRECT, 0o644)
            except OSError:
                pass  # the filesystem refuses O_DIRECT: buffered below
        self.direct = self.fd >= 0
        if not self.direct:
            self.fd = os.open(path, flags, 0o644)
        self.buffers = [mmap.mmap(-1, chunk) for _ in range(buffers)]  # anonymous: page-aligned
        self.views = [np.frombuffer(b, np.uint8) for b in self.buffers]
        self.scratch = np.empty(0, np.uint8)  # reused for transposed tensors
        self.current, self.fill, self.offset = 0, 0, 0  # buffer index, bytes in it, its offset
        self.io = Background(depth=buffers - 1)  # so the buffer about to fill is written out

    def write(self, a) -> None:
        """Append an array (a transposed view is copied into reused memory first) or bytes."""
        if isinstance(a, np.ndarray):
            if not a.flags.c_contiguous:
                if self.scratch.size < a.nbytes:
                    self.scratch = np.empty(a.nbytes, np.uint8)
                a = to_contiguous(a, out=self.scratch[: a.nbytes].view(a.dtype).reshape(a.shape))
            data = a.reshape(-1).view(np.uint8)
        else:
            data = np.frombuffer(a, np.uint8)
        while data.size:
            n = min(data.size, self.chunk - self.fill)
            self.views[self.current][self.fill : self.fill + n] = data[:n]
            self.fill += n
            data = data[n:]
            if self.fill == self.chunk:
                self._flush()

    def _flush(self) -> None:
        """Queue the current buffer (its length padded to ALIGN for O_DIRECT) and move on."""
        length = -(-self.fill // ALIGN) * ALIGN if self.direct else self.fill
        self.io.submit(self._pwrite, self.buffers[self.current], length, self.offset)
        self.offset += self.fill
        self.current = (self.current + 1) % len(self.buffers)
        self.fill = 0

    def _pwrite(self, buffer: mmap.mmap, length: int, offset: int) -> None:
        view = memoryview(buffer)[:length]
        while view:
            try:
                n = os.pwrite(self.fd, view, offset)
            except OSError:
                if not self.direct:
                    raise
                self._reopen_buffered()  # the filesystem took the open but not the write
                continue
            view, offset = view[n:], offset + n

    def _reopen_buffered(self) -> None:
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_WRONLY)
        self.direct = False

    def close(self) -> None:
        """Write what is left, trim the O_DIRECT padding, close; raises what any write raised."""
        try:
            if self.fill:
                self._flush()
            self.io.drain()
            os.ftruncate(self.fd, self.offset)
        finally:
            self.abort()

    def abort(self) -> None:
        self.io.stop()  # queued writes are dropped: the caller discards the file
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SequentialWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            self.abort()
