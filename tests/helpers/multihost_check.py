"""One of two JAX processes (4 simulated CPU devices each, XLA_FLAGS set by the caller) joined by
`jax.distributed` on localhost with gloo collectives: load a checkpoint onto the 8-device global
mesh, run the sharded forward, compare with the unsharded torch model, and report how many
bytes this process copied out of the file against the bytes its own devices hold."""

import json
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

import weight_transfer as wt  # noqa: E402
import weight_transfer.frameworks.sharding as sharding_module  # noqa: E402
from weight_transfer.frameworks.runners import random_images, run_torch  # noqa: E402


def main(path: str, sharding: str, process_id: int, port: int) -> None:
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id
    )
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    copied = {}  # (key, block index) -> bytes copied out of the file for it
    block_reader = sharding_module._block_reader

    def counting(source, key):
        read = block_reader(source, key)

        def block(index):
            array = read(index)
            copied[key, _bounds(index, array.ndim)] = array.nbytes
            return array

        return block

    sharding_module._block_reader = counting
    mesh = Mesh(np.array(jax.devices()), ("fsdp",))
    model = wt.load_checkpoint(path, "jax", mesh=mesh, sharding=sharding)
    images = random_images(model.config, 4)  # the same on both processes (seeded)
    replicated = NamedSharding(mesh, PartitionSpec())
    x = jax.make_array_from_callback(images.shape, replicated, lambda index: images[index])
    with jax.default_matmul_precision("highest"):
        logits = nnx.jit(lambda m, x: m(x))(model, x)
    got = multihost_utils.process_allgather(logits, tiled=True)
    want = run_torch(wt.load_checkpoint(path, "torch"), images).numpy()
    params = {
        ".".join(map(str, path)): var.get_value()
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    local = {
        (key, _bounds(s.index, v.ndim)): s.data.nbytes
        for key, v in params.items()
        for s in v.addressable_shards
    }
    print(
        json.dumps(
            {
                "process": jax.process_index(),
                "max_abs": float(np.abs(np.asarray(got) - want).max()),
                "scale": float(max(1.0, np.abs(want).max())),
                "copied_blocks_are_local_blocks": copied == local,  # same blocks, same sizes
                "local_bytes": sum(
                    local.values()
                ),  # each distinct block of this process's devices once
                "global_bytes": sum(v.nbytes for v in params.values()),
                "local_devices": sorted(d.id for d in jax.local_devices()),
            }
        )
    )
    jax.distributed.shutdown()


def _bounds(index, ndim: int) -> tuple:
    """A block index as hashable (start, stop) pairs (the full extent as (None, None))."""
    index = tuple(index) + (slice(None),) * (ndim - len(index))
    return tuple((s.start, s.stop) for s in index)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
