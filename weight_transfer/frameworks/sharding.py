"""Place an NNX model's parameters on a `jax.sharding.Mesh`, by rules over logical axes.

Every parameter carries its logical axes (`vit_config.arch`: embed, heads, mlp, classes,
tokens, ...) as Flax sharding metadata. A sharding is a set of rules mapping logical axes to
mesh axes, the Flax way (`nnx.logical_axis_rules`):

- `"replicated"`: nothing split (data parallelism).
- `"fsdp"`: the embed axis split over the data axis: every kernel, norm, token and position
  in blocks, one block per device (ZeRO-3 / FSDP).
- `"tensor_parallel"`: heads and the MLP hidden axis split over the model axis (Megatron:
  q, k, v and ff1 column-parallel, o and ff2 row-parallel); the rest replicated.
- `"fsdp_tp"`: both, on a 2-D data x model mesh.
- or a mapping `{logical axis: mesh axis or None}` of your own.

Roles to mesh axes: on a 1-D mesh, its one axis; on a larger mesh, the axis named "model" (or
"tensor", "tp") is the model axis and the axis named "data" (or "fsdp", "batch"), else the
first other axis, the data axis. A dimension the mesh axis does not divide stays whole (for
heads: the number of heads, so no head is ever cut); a mesh axis that divides no dimension
it was asked to split is refused (`ShardingError`). Both mesh axis types work: on `Explicit`
axes (what `jax.make_mesh` gives) the model's forward runs in `Auto` mode inside (see
`jax_impl.ViT.__call__`).

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

from collections.abc import Mapping

import numpy as np

from vit_config import ArgumentError, ViTConfig, arch

# logical axis -> mesh axis role ("data" or "model"); every other logical axis unsplit
RULE_SETS: dict[str, dict[str, str]] = {
    "replicated": {},
    "fsdp": {"embed": "data"},
    "tensor_parallel": {"heads": "model", "mlp": "model"},
    "fsdp_tp": {"embed": "data", "heads": "model", "mlp": "model"},
}
SHARDINGS = tuple(RULE_SETS)
ROLE_NAMES = {"model": ("model", "tensor", "tp"), "data": ("data", "fsdp", "batch")}

Sharding = str | Mapping[str, str | None]


class ShardingError(ArgumentError):
    """A sharding that does not fit the mesh or the model: names the mesh axis, its size and
    the dimensions it was asked to split."""


def _role_axis(mesh, role: str) -> str:
    names = tuple(mesh.axis_names)
    if len(names) == 1:
        return names[0]
    named = [a for a in names if a in ROLE_NAMES[role]]
    if named:
        return named[0]
    if role == "data":
        others = [a for a in names if a not in ROLE_NAMES["model"]]
        return others[0]
    raise ShardingError(
        f"mesh axes {names}: none is the model axis (name one of "
        f"{ROLE_NAMES['model']}, or pass rules {{logical axis: mesh axis}})"
    )


def mesh_rules(mesh, sharding: Sharding) -> dict[str, str | None]:
    """`{logical axis: mesh axis or None}` for every axis in `vit_config.arch.AXES`."""
    if isinstance(sharding, Mapping):
        unknown = sorted(set(sharding) - set(arch.AXES))
        if unknown:
            raise ShardingError(
                f"sharding rules name unknown logical axes {unknown}: expected some of {arch.AXES}"
            )
        absent = sorted({m for m in sharding.values() if m is not None} - set(mesh.axis_names))
        if absent:
            raise ShardingError(
                f"sharding rules name mesh axes {absent} the mesh does not have "
                f"(its axes: {tuple(mesh.axis_names)})"
            )
        chosen = dict(sharding)
    elif sharding in RULE_SETS:
        chosen = {logical: _role_axis(mesh, role) for logical, role in RULE_SETS[sharding].items()}
        if sharding == "fsdp_tp" and len(set(chosen.values())) < 2:
            raise ShardingError(
                f"sharding 'fsdp_tp' needs a 2-D data x model mesh; this mesh "
                f"has axes {tuple(mesh.axis_names)}"
            )
    else:
        raise ShardingError(
            f"sharding {sharding!r}: expected one of {SHARDINGS} or a mapping "
            f"{{logical axis: mesh axis}}"
        )
    return {axis: chosen.get(axis) for axis in arch.AXES}


def logical_rules(mesh, sharding: Sharding) -> tuple[tuple[str, str | None], ...]:
    """The rules for `nnx.logical_axis_rules`, so `nnx.get_partition_spec(state)` gives this
    sharding's specs (dimensions a mesh axis does not divide aside: `partition_specs` keeps
    those whole)."""
    return tuple(mesh_rules(mesh, sharding).items())


def _splits(size: int, logical: str, config: ViTConfig) -> int:
    """How many equal parts a dimension can be cut into: heads are cut between heads."""
    return size // config.head_dim if logical == "heads" else size


def partition_specs(config: ViTConfig, mesh, sharding: Sharding) -> dict:
    """`{NNX path: PartitionSpec}` of the loop layout: each dimension on the mesh axis its
    logical axis maps to, when that axis divides it (and is not already used in the spec)."""
    from jax.sharding import PartitionSpec

    rules = mesh_rules(mesh, sharding)
    specs, split_by = {}, {m: [] for m in rules.values() if m is not None}
    for path, p in arch.parameters(config).items():
        spec = []
        for size, logical in zip(p.shape, p.axes, strict=True):
            axis = rules[logical]
            fits = (
                axis is not None
                and axis not in spec
                and _splits(size, logical, config) % mesh.shape[axis] == 0
            )
            spec.append(axis if fits else None)
            if fits:
                split_by[axis].append(path)
        specs[path] = PartitionSpec(*spec)
    for axis, paths in split_by.items():
        if not paths:
            asked = sorted(
                {
                    f"{lg} = {config.num_heads if lg == 'heads' else s}"
                    for p in arch.parameters(config).values()
                    for s, lg in zip(p.shape, p.axes, strict=True)
                    if rules[lg] == axis
                }
            )
            raise ShardingError(
                f"mesh axis {axis!r} (size {mesh.shape[axis]}) divides no "
                f"parameter dimension the sharding splits over it "
                f"({', '.join(asked)}); use a mesh axis size that divides "
                f"them, or sharding='replicated'"
            )
    return specs


def _block_reader(source, key: str):
    """A function index -> that block of the stored tensor, copied out of the reader's
    memory map of it: only the block's bytes are copied, whichever axis is split."""
    return lambda index: np.array(source.load(key)[index])


def _placed_model(arrays: dict, config: ViTConfig, specs: dict):
    """A `jax_impl.ViT` holding `arrays` (already on the mesh, laid out by `specs`), each
    parameter given the rules that reproduce its spec."""
    from weight_transfer.frameworks.bridge import nnx_model_from_flat

    model = nnx_model_from_flat(arrays, config, place=lambda array: array)  # already placed
    _pin_rules(model, specs)
    return model


def _pin_rules(model, specs: dict) -> None:
    """Give each parameter the rules that turn its logical axes into its spec, so what Flax
    derives from it (an `nnx.Optimizer`'s moments under `jax.set_mesh`) is placed the same."""
    from flax import nnx

    from weight_transfer.frameworks.bridge import _dotted

    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            axes = var.get_metadata()["out_sharding"]
            var.set_metadata(sharding_rules=tuple(zip(axes, specs[_dotted(path)], strict=False)))


def load_sharded(prepared, mesh, sharding: Sharding):
    """A `jax_impl.ViT` whose parameters are `jax.Array`s laid out over `mesh`."""
    import jax
    from jax.sharding import NamedSharding

    p = prepared
    specs = partition_specs(p.config, mesh, sharding)  # refuse before reading anything
    same = p.plan.renames_only and p.config == p.inferred.config
    hook = p.plan.hook or (lambda key, a, dry: a)
    as_stored = same and all(p.source.meta[k] == meta for k, meta in p.plan.order)
    arrays = (
        p.source.reader.restore_onto({k: NamedSharding(mesh, s) for k, s in specs.items()})
        if as_stored
        else None
    )
    if arrays is not None:  # the format placed them itself (Orbax reads each device's block)
        for key, array in arrays.items():  # the NaN/Inf screen, block by block
            for block in array.addressable_shards:
                hook(key, np.asarray(block.data), False)
        return _placed_model(arrays, p.config, specs)
    if same and p.source.reader.maps_blocks:  # NNX layout: every block straight from its bytes

        def items():
            for key, (shape, _) in p.plan.order:
                raw = _block_reader(p.source, key)
                yield key, shape, lambda index, raw=raw, key=key: hook(key, raw(index), False)
    else:  # convert tensor by tensor; each tensor is on the host once, not once per device

        def items():
            for key, array in p.plan.run(p.source.items(p.plan.inputs)):
                yield key, array.shape, lambda index, array=array: array[index]

    arrays = {
        key: jax.make_array_from_callback(tuple(shape), NamedSharding(mesh, specs[key]), read)
        for key, shape, read in items()
    }
    return _placed_model(arrays, p.config, specs)
