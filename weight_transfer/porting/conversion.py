"""A conversion as a checked chain of table steps: source layout -> our base layout -> (the
other base layout) -> target layout, verified on shapes alone before any tensor is read, then
streamed one tensor at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from vit_config import ViTConfig
from weight_transfer.core.table import (
    Meta,
    Rule,
    base_shapes,
    check_table,
    forward_targets,
    nnx_torch,
    oriented,
    stand_in,
    stream_table,
)
from weight_transfer.core.transforms import identity
from weight_transfer.formats.memory import to_contiguous
from weight_transfer.layouts import Layout

Hook = Callable[[str, np.ndarray, bool], np.ndarray]  # (key, array, dry run) -> array


@dataclass
class Plan:
    """A checked chain of table steps from a source layout to a target layout."""

    steps: list[list[Rule]]
    order: list[tuple[str, Meta]]  # output keys in the order the stream yields them
    inputs: list[str]  # source keys in read order
    hook: Hook | None = None  # applied to every tensor in our base layout, after the first step

    @property
    def renames_only(self) -> bool:
        """Every output tensor is a source tensor as stored, under the same key: the file is
        already in the target layout (sharded loading then reads blocks straight from it)."""
        return all(
            r.transform.forward is identity and r.left == r.right
            for rules in self.steps
            for r in rules
        )

    def run(
        self,
        items: Iterable[tuple[str, np.ndarray]],
        *,
        dry: bool = False,
        materialize: bool = True,
    ) -> Iterator[tuple[str, np.ndarray]]:
        """The converted tensors, one at a time; `dry` runs on stand-ins for the key order.
        Without `materialize`, transposed tensors stay views (of the source's memory map) for a
        writer that copies each into its own reused buffer (`write_safetensors`)."""
        last = len(self.steps) - 1  # copy into contiguous memory once, at the end of the chain
        for i, rules in enumerate(self.steps):
            copy = i == last and materialize and not dry
            items = stream_table(items, rules, finish=to_contiguous if copy else None)
            if i == 0 and self.hook is not None:
                items = ((k, self.hook(k, a, dry)) for k, a in items)
        return iter(items)


def plan_conversion(
    meta: Mapping[str, Meta],
    src: Layout,
    dst: Layout,
    config: ViTConfig,
    *,
    out_config: ViTConfig | None = None,
    hook: Hook | None = None,
    what: str | None = None,
) -> Plan:
    """Check every step on shapes alone (raising one `TransferError` listing all problems),
    after the target layout's own check that its library can compute the model.

    `hook` may change tensors (resampling, dtype casts) between the source's table and the
    rest, which are then checked against `out_config` (default `config`).
    """
    out = out_config or config
    dst.check_model(out)  # a model the target library cannot compute: say why, first
    steps = [
        check_table(
            meta,
            oriented(src.table(config), config.num_layers, reverse=True),
            base_shapes(src.base, config),
            what=what or src.name,
        )
    ]
    base = src.base
    if base != dst.base:
        rules = nnx_torch(out)
        steps.append([r.reversed() for r in rules] if base == "torch" else rules)
        base = dst.base
    base_meta = {k: (s, np.dtype("float32")) for k, s in base_shapes(base, out).items()}
    forward = oriented(dst.table(out), out.num_layers)
    steps.append(
        check_table(base_meta, forward, forward_targets(forward, base_meta), what=dst.base)
    )
    used = {k for r in steps[0] for k in r.left}
    inputs = [k for k in meta if k in used]
    dummies = ((k, stand_in(*meta[k])) for k in inputs)
    order = [
        (k, (a.shape, a.dtype)) for k, a in Plan(steps, [], inputs, hook).run(dummies, dry=True)
    ]
    return Plan(steps, order, inputs, hook)
