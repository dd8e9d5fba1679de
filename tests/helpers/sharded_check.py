"""Run in a fresh process with 8 simulated CPU devices (XLA_FLAGS set by the caller):
load a checkpoint onto a mesh, compare logits with the unsharded torch model, report shardings."""

import json
import sys

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

import weight_transfer as wt
from weight_transfer.runners import random_images, run_nnx, run_torch


def main(path: str, sharding: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("fsdp",))
    model = wt.load_checkpoint(path, "jax", mesh=mesh, sharding=sharding)
    reference = wt.load_checkpoint(path, "torch")
    images = random_images(model.config, 4)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(run_nnx(model, images))
    want = run_torch(reference, images).numpy()
    params = {".".join(map(str, path)): var.get_value()
              for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    print(json.dumps({
        "max_abs": float(np.abs(got - want).max()), "scale": float(max(1.0, np.abs(want).max())),
        "specs": {k: [str(a) for a in v.sharding.spec] for k, v in params.items()},
        "shapes": {k: list(v.shape) for k, v in params.items()},
        "devices": sorted({len(v.sharding.device_set) for v in params.values()}),
        "block_shapes": {k: [list(s.data.shape) for s in v.addressable_shards][:1]
                         for k, v in params.items()},
    }))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
