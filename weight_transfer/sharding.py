"""Load a checkpoint straight into an NNX model whose parameters live on a `jax.sharding.Mesh`.

- `"replicated"`: every device holds every parameter (data parallelism).
- `"fsdp"`: each parameter is split along its largest axis divisible by the mesh's first axis
  (parameters with no such axis stay replicated).

Each device's block is built by `jax.make_array_from_callback`. When the file already holds the
NNX layout (a `--to nnx` safetensors file, single or sharded), the callback copies exactly that
block out of a memory map of the tensor (like safetensors' `get_slice`): a row block is one
contiguous byte range, a column block one segment per row, so no device ever causes a whole
tensor to be copied. Other layouts are converted one tensor at a time, each
tensor held once on the host while its blocks are placed. On several hosts
(`jax.distributed.initialize`), the same code runs on each: `make_array_from_callback` only asks
for the blocks of the host's own devices, so each host reads only its shards.
"""

from __future__ import annotations

import numpy as np

from vit_config import ArgumentError

SHARDINGS = ("replicated", "fsdp")


def partition_spec(shape: tuple[int, ...], mesh, sharding: str):
    """The PartitionSpec for one parameter."""
    from jax.sharding import PartitionSpec

    if sharding == "replicated":
        return PartitionSpec()
    axis_name = mesh.axis_names[0]
    n = mesh.shape[axis_name]
    candidates = [i for i, s in enumerate(shape) if s % n == 0 and s >= n]
    if not candidates:
        return PartitionSpec()
    axis = max(candidates, key=lambda i: shape[i])
    return PartitionSpec(*[axis_name if i == axis else None for i in range(len(shape))])


def _block_reader(source, key: str):
    """A function index -> that block of the stored tensor, copied out of the reader's
    memory map of it: only the block's bytes are copied, whichever axis is split."""
    load = source.reader.load
    return lambda index: np.array(load(key)[index])


def load_sharded(prepared, mesh, sharding: str):
    """A `jax_impl.ViT` whose parameters are `jax.Array`s laid out over `mesh`."""
    import jax
    from jax.sharding import NamedSharding

    from weight_transfer.bridge import nnx_model_from_flat

    if sharding not in SHARDINGS:
        raise ArgumentError(f"sharding {sharding!r}: expected one of {SHARDINGS}")
    p = prepared
    direct = p.plan.renames_only and p.source.reader is not None and p.config == p.inferred.config
    hook = p.plan.hook or (lambda key, a, dry: a)
    arrays: dict[str, jax.Array] = {}

    def place(key: str, shape, read) -> None:
        spec = NamedSharding(mesh, partition_spec(tuple(shape), mesh, sharding))
        arrays[key] = jax.make_array_from_callback(tuple(shape), spec, read)

    if direct:  # the file is in NNX layout: every block straight from its bytes
        for key, (shape, _) in p.plan.order:
            raw = _block_reader(p.source, key)
            place(key, shape, lambda index, raw=raw, key=key: hook(key, raw(index), False))
    else:  # convert tensor by tensor; each tensor is on the host once, not once per device
        for key, array in p.plan.run(p.source.items(p.plan.inputs)):
            place(key, array.shape, lambda index, array=array: array[index])
    return nnx_model_from_flat(arrays, p.config, place=lambda array: array)  # already placed
