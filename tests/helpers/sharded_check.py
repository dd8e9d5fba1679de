"""Run in a fresh process with 8 simulated CPU devices (XLA_FLAGS set by the caller): for each
case of a JSON list, load a checkpoint onto a mesh, run the model eagerly and under nnx.jit on
images split over the data axis, compare the logits with the unsharded torch model's, and
report every parameter's sharding. Prints one JSON list, a report per case."""

import json
import sys

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

import weight_transfer as wt
from weight_transfer.frameworks.runners import random_images, run_patches, run_torch


def make_mesh(shape, names, axis_type: str):
    types = (AxisType.Explicit if axis_type == "explicit" else AxisType.Auto,) * len(shape)
    if axis_type == "mesh":  # built by hand, as the tests before jax.make_mesh did: Auto axes
        return Mesh(np.array(jax.devices()).reshape(shape), tuple(names))
    return jax.make_mesh(tuple(shape), tuple(names), axis_types=types)


def run_case(case: dict, references: dict) -> dict:
    mesh = make_mesh(case["mesh"], case["names"], case["axis_type"])
    model = wt.load_checkpoint(case["path"], "jax", mesh=mesh, sharding=case["sharding"])
    if case["path"] not in references:
        reference = wt.load_checkpoint(case["path"], "torch")
        images = random_images(model.config, 8)
        references[case["path"]] = images, run_torch(reference, images).numpy()
    images, want = references[case["path"]]
    wants = {"jit": want, "eager": want}
    data_axis = case["names"][0]
    split = jax.device_put(images, NamedSharding(mesh, PartitionSpec(data_axis)))
    with jax.default_matmul_precision("highest"):
        got = {"jit": nnx.jit(lambda m, x: m(x))(model, split)}
        if case.get("eager", True):
            got["eager"] = model(images)
    if case.get("padded"):  # a padded batch of 8 sizes (NaFlex), split over the data axis too
        got["padded"], wants["padded"] = padded(model, mesh, data_axis, case["path"])
    params = {
        ".".join(map(str, path)): var.get_value()
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    trained = train(model, mesh, split) if case.get("train") else {}
    return {
        **trained,
        "max_abs": {k: float(np.abs(np.asarray(v) - wants[k]).max()) for k, v in got.items()},
        "scale": float(max(1.0, np.abs(want).max())),
        "out_spec": [str(a) for a in got["jit"].sharding.spec],
        "specs": {k: [str(a) for a in v.sharding.spec] for k, v in params.items()},
        "shapes": {k: list(v.shape) for k, v in params.items()},
        "devices": sorted({len(v.sharding.device_set) for v in params.values()}),
        "block_shapes": {k: list(v.addressable_shards[0].data.shape) for k, v in params.items()},
        "axis_types": [t.name for t in mesh.axis_types],
    }


def padded(model, mesh, data_axis: str, path: str):
    """`forward_patches` under nnx.jit on a padded batch of 8 grid sizes split over
    `data_axis`, and the unsharded torch model's logits for it."""
    from vit_config.patches import patchify

    p, rng = model.config.patch_size, np.random.default_rng(1)
    sizes = [(2, 3), (3, 2), (1, 4), (2, 2), (3, 3), (1, 1), (2, 1), (4, 1)]
    images = [rng.standard_normal((h * p, w * p, 3)).astype(np.float32) for h, w in sizes]
    patches, grids = patchify(images, p)
    want = run_patches(wt.load_checkpoint(path, "torch"), patches, grids)
    split = jax.device_put(patches, NamedSharding(mesh, PartitionSpec(data_axis)))
    return nnx.jit(lambda m, x: m.forward_patches(x, grids))(model, split), want


def train(model, mesh, images) -> dict:
    """Three AdamW steps under `jax.set_mesh`, as README shows: the losses, and whether the
    optimizer's moments are placed as the parameters are."""
    import optax

    labels = jax.device_put(
        np.arange(images.shape[0]) % model.config.num_classes,
        NamedSharding(mesh, PartitionSpec(mesh.axis_names[0])),
    )
    with jax.set_mesh(mesh):
        optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)

        @nnx.jit
        def step(model, optimizer, images, labels):
            def loss_fn(model):
                logits = model(images)
                return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

            loss, grads = nnx.value_and_grad(loss_fn)(model)
            optimizer.update(model, grads)
            return loss

        losses = [float(step(model, optimizer, images, labels)) for _ in range(3)]
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    moments = jax.tree.leaves(optimizer.opt_state[0].mu)  # adamw's first moments, same order
    same = all(p.sharding.spec == m.sharding.spec for p, m in zip(params, moments, strict=True))
    return {"losses": losses, "moments_placed_as_params": same}


def main(cases_file: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    with open(cases_file) as f:
        cases = json.load(f)
    references: dict = {}
    print(json.dumps([run_case(case, references) for case in cases]))


if __name__ == "__main__":
    main(sys.argv[1])
