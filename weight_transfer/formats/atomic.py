"""Outputs that appear only when complete: written into a temporary folder beside the
destination, then renamed into place; never over an existing file without `force`, and never
over (or deleting) an input, whatever name or mount it is reached by."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from pathlib import Path

from weight_transfer.core.errors import CheckpointError

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


def _refuse_clobbering(final: Path, protected: AbstractSet[FileId]) -> None:
    if protected and file_ids(final) & protected:
        raise CheckpointError(
            f"{final}: the output would overwrite the input (or delete it: "
            f"the same file, or a folder holding it, under another name or "
            f"mount); refused even with --force: choose another output"
        )


@contextlib.contextmanager
def atomic_output(
    dst: Path, *, force: bool = False, protected: AbstractSet[FileId] = frozenset()
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
