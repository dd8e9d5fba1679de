"""Orbax checkpoints of the NNX parameter state: what JAX training code saves and restores.

`--to orbax` writes a folder:

    DST/state/            an Orbax checkpoint (StandardCheckpointer) of the parameters, nested
                          as `nnx.state(model, nnx.Param)` is: {"blocks": {"0": {"attn": ...}}}
    DST/vit_parity.json   our manifest and the config, as our other files carry them

Read back are that folder and a folder that is itself an Orbax checkpoint of a `jax_impl.ViT`'s
parameters (what `ocp.StandardCheckpointer().save(path, nnx.state(model, nnx.Param))` writes in
a training loop; its config is then read from the shapes, with the usual warnings). Only a
finalized checkpoint is read: Orbax writes its commit marker last, so a save that did not finish
is refused. Restoring onto a mesh (`load_checkpoint(dir, "jax", mesh=...)`) hands Orbax the
target shardings: each host reads only its devices' blocks.

`orbax-checkpoint` is an optional dependency (`pip install 'vit-parity[orbax]'`), imported here
only, and only when such a folder is read or written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from weight_transfer.core.errors import CheckpointError
from weight_transfer.core.table import Meta
from weight_transfer.formats.reader import Reader, nested

STATE = "state"
MANIFEST = "vit_parity.json"
MARKERS = ("_CHECKPOINT_METADATA", "_METADATA")  # Orbax writes both when a save completes
TRACES = MARKERS + ("manifest.ocdbt", "ocdbt.process_0", "commit_success.txt")
TEMPORARY = ".orbax-checkpoint-tmp"  # what Orbax names a save in progress


def _ocp():
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        raise CheckpointError(
            "Orbax checkpoints need orbax-checkpoint: pip install "
            "'vit-parity[orbax]' (or orbax-checkpoint)"
        ) from None
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax logs every step at INFO
    return ocp


def checkpoint_dir(folder: Path) -> Path | None:
    """The Orbax checkpoint in `folder` (its `state/`, a save of it in progress, or the folder
    itself), if the folder holds one, complete or not."""
    candidates = [folder / STATE, *sorted(folder.glob(f"{STATE}{TEMPORARY}*")), folder]
    for candidate in candidates:
        if candidate.is_dir() and (
            TEMPORARY in candidate.name or any((candidate / t).exists() for t in TRACES)
        ):
            return candidate
    return None


def _key(path: tuple) -> str:
    """A tree path as our flat key; the `value` leaf of a saved `nnx.Variable` is dropped."""
    parts = [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]
    return ".".join(parts[:-1] if parts and parts[-1] == "value" else parts)


class OrbaxReader(Reader):
    """An Orbax checkpoint's parameters: shapes from its metadata now, values on demand."""

    container = "orbax"

    def __init__(self, folder: Path, path: Path):
        """`folder` as given; `path` the checkpoint in it (`checkpoint_dir(folder)`)."""
        self.folder = folder
        self.path = path.absolute()  # Orbax gives no item metadata for a relative path
        ocp = _ocp()
        absent = [m for m in MARKERS if not (self.path / m).is_file()]
        if (
            absent
            or TEMPORARY in self.path.name
            or not ocp.utils.is_checkpoint_finalized(self.path)
        ):
            why = f"no {' or '.join(absent)}" if absent else "a temporary folder"
            raise CheckpointError(
                f"{self.path}: an incomplete Orbax checkpoint ({why}: the save "
                f"did not finish); nothing was read"
            )
        _check_storage(self.path)
        try:  # closed on the way out: a checkpointer left open logs its threads' failures
            with ocp.StandardCheckpointer() as checkpointer:
                item = checkpointer.metadata(self.path).item_metadata
            if item is None:  # a tree metadata Orbax cannot match to its arrays
                raise ValueError("no item metadata: the tree and the arrays disagree")
            tree = item.tree
        except Exception as e:  # Orbax raises many types for a damaged folder
            _quiet_leftovers()
            raise CheckpointError(f"{self.path}: unreadable Orbax metadata ({e})") from None
        import jax

        self._tree = tree
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        self.meta: dict[str, Meta] = {
            _key(p): (tuple(m.shape), np.dtype(m.dtype)) for p, m in leaves
        }
        self.metadata: dict[str, str] = {}
        manifest = folder / MANIFEST
        if self.path != folder and manifest.is_file():
            self.metadata["vit_parity"] = manifest.read_text()
        self.files = sorted(f for f in folder.rglob("*") if f.is_file())
        self._values: dict[str, np.ndarray] | None = None

    def load(self, key: str) -> np.ndarray:
        if self._values is None:  # the whole state, once, on the host
            self._values = self._restore(None)
        return self._values[key]

    def restore_onto(self, shardings: Mapping[str, Any]) -> dict[str, Any] | None:
        """`{key: jax.Array}` placed with `shardings[key]`, Orbax reading each device's block."""
        return self._restore(shardings)

    def _restore(self, shardings: Mapping[str, Any] | None) -> dict[str, Any]:
        import jax

        ocp = _ocp()
        if shardings is None:  # numpy on the host, whatever devices the saver had
            how = lambda p, m: ocp.RestoreArgs(restore_type=np.ndarray)
        else:
            how = lambda p, m: ocp.ArrayRestoreArgs(
                sharding=shardings[_key(p)],
                global_shape=tuple(m.shape),
                dtype=m.dtype,
            )
        args = jax.tree_util.tree_map_with_path(how, self._tree)
        try:
            with ocp.PyTreeCheckpointer() as checkpointer:
                restored = checkpointer.restore(
                    self.path, args=ocp.args.PyTreeRestore(restore_args=args)
                )
        except Exception as e:  # Orbax raises many types for a damaged folder
            _quiet_leftovers()
            raise CheckpointError(f"{self.path}: Orbax could not restore it ({e})") from None
        return {_key(p): v for p, v in jax.tree_util.tree_flatten_with_path(restored)[0]}


def _quiet_leftovers() -> None:
    """After Orbax failed on a damaged folder, its tensorstore callbacks can still fire into
    the asyncio loop Orbax has closed, each printing "Event loop is closed" as an unraisable
    exception (after our one-line refusal, or at exit). Those alone are dropped; any other
    unraisable exception goes to the hook there was."""
    import sys

    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            previous(unraisable)

    if getattr(previous, "__name__", "") != "hook" or previous.__module__ != __name__:
        sys.unraisablehook = hook


METADATA_LIMIT = 64 << 20  # a tree's _METADATA: ~150 bytes per leaf; beyond this, refused


def _check_storage(path: Path) -> None:
    """The storage `_METADATA` names must be the folder's (an OCDBT database or one array
    folder per leaf), checked before Orbax reads: Orbax itself, asked to read one storage from
    the other, leaves tensorstore callbacks running that print tracebacks after our message."""
    import json

    metadata = path / "_METADATA"
    if metadata.stat().st_size > METADATA_LIMIT:
        raise CheckpointError(f"{metadata}: {metadata.stat().st_size:,} bytes, not a tree's")
    try:
        said = json.loads(metadata.read_text()).get("use_ocdbt")
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise CheckpointError(f"{metadata}: not a JSON object, not Orbax's tree metadata") from None
    has = (path / "manifest.ocdbt").is_file()
    if said is not None and bool(said) != has:
        found = "an OCDBT database (manifest.ocdbt)" if has else "no OCDBT database"
        raise CheckpointError(
            f"{metadata}: use_ocdbt={said} but the folder holds {found}: the metadata does "
            "not describe these arrays; nothing was read"
        )


def write_orbax(
    out: Path, tensors: Iterable[tuple[str, np.ndarray]], manifest: Callable[[], str]
) -> None:
    """`out/state` (the parameters, nested) and `out/vit_parity.json` (`manifest()`, asked for
    once the tensors are written)."""
    ocp = _ocp()
    out.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(
        out.absolute() / STATE, nested((k, np.ascontiguousarray(a)) for k, a in tensors)
    )
    checkpointer.wait_until_finished()
    (out / MANIFEST).write_text(manifest())
