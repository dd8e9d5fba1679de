"""Declarative mapping tables and the one engine that applies them in either direction.

A table is a tuple of `Rule`s: left key(s), right key(s), and a named `Transform` from left to
right. `{}` in a key stands for the block index. The reverse direction is the same table read
from the right (`Transform.reversed`); there is never a second table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from vit_config import ViTConfig, arch
from weight_transfer.core.errors import TransferError
from weight_transfer.core.transforms import CONV, IDENTITY, LINEAR, Transform

FLOAT_KINDS = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class Rule:
    left: tuple[str, ...]
    right: tuple[str, ...]
    transform: Transform = IDENTITY

    def expand(self, num_layers: int) -> list[Rule]:
        if not any("{}" in k for k in self.left + self.right):
            return [self]
        return [
            Rule(
                tuple(k.replace("{}", str(i)) for k in self.left),
                tuple(k.replace("{}", str(i)) for k in self.right),
                self.transform,
            )
            for i in range(num_layers)
        ]

    def reversed(self) -> Rule:
        return Rule(self.right, self.left, self.transform.reversed())


def rule(
    left: str | tuple[str, ...], right: str | tuple[str, ...], transform: Transform = IDENTITY
) -> Rule:
    as_tuple = lambda k: (k,) if isinstance(k, str) else tuple(k)
    return Rule(as_tuple(left), as_tuple(right), transform)


# jax_impl (flat NNX paths) <-> torch_impl (state-dict keys). The trees are equal, so only leaf
# names and layouts change, and they change by the type of layer alone.
LEAVES: dict[str, tuple[tuple[str, str, Transform], ...]] = {
    "conv": (
        ("kernel", "weight", CONV),
        ("bias", "bias", IDENTITY),
    ),  # (P, P, C, D) <-> (D, C, P, P)
    "linear": (("kernel", "weight", LINEAR), ("bias", "bias", IDENTITY)),  # (in, out) <-> (out, in)
    "norm": (("scale", "weight", IDENTITY), ("bias", "bias", IDENTITY)),
    "param": (("", "", IDENTITY),),  # a bare array: the same name and layout on both sides
}


def nnx_torch(config: ViTConfig) -> list[Rule]:
    """The NNX <-> torch table for `config`, one rule per parameter of `vit_config.arch`."""
    rules = []
    for layer in arch.layers(config):
        for nnx_leaf, torch_leaf, transform in LEAVES[layer.type]:
            if nnx_leaf in layer.params:
                key = lambda leaf: f"{layer.path}.{leaf}" if leaf else layer.path  # noqa: B023
                rules.append(Rule((key(nnx_leaf),), (key(torch_leaf),), transform))
    return rules


def base_shapes(base: str, config: ViTConfig) -> dict[str, tuple[int, ...]]:
    """Our two layouts' shapes from the declared architecture alone (no framework):
    `base="nnx"` (jax_impl's flat state) or `"torch"` (torch_impl's state dict)."""
    nnx = {k: p.shape for k, p in arch.parameters(config).items()}
    if base == "nnx":
        return nnx
    return forward_targets(nnx_torch(config), {k: (s, np.dtype(np.int8)) for k, s in nnx.items()})


Meta = tuple[tuple[int, ...], np.dtype]  # (shape, dtype) of a tensor not yet loaded


def stand_in(shape: tuple[int, ...], dtype=np.int8) -> np.ndarray:
    """A zero-strided stand-in with `shape`, to run a transform on shapes alone."""
    return np.broadcast_to(np.zeros((), dtype), shape)


def meta_of(arrays: Mapping[str, np.ndarray]) -> dict[str, Meta]:
    return {k: (tuple(a.shape), a.dtype) for k, a in arrays.items()}


def output_meta(rules: list[Rule], source: Mapping[str, Meta]) -> dict[str, Meta]:
    """Shapes and dtypes the (already checked) `rules` produce from `source`, without data."""
    out = {}
    for r in rules:
        outs = r.transform.forward(*(stand_in(*source[k]) for k in r.left))
        out.update({k: (a.shape, a.dtype) for k, a in zip(r.right, outs, strict=True)})
    return out


def shape_hint(
    actual: tuple[int, ...], expected: tuple[int, ...], target: tuple[int, ...] | None = None
) -> str:
    if target is not None and actual == target and actual != expected:
        return ": looks already converted (it has the shape the target layout wants)"
    if sorted(actual) == sorted(expected) and actual != expected:
        order = [expected.index(s) for s in actual] if len(set(actual)) == len(actual) else None
        how = f" (axes {tuple(order)} of the expected)" if order else ""
        return f": looks transposed, a permutation of the expected shape{how}"
    return ""


def check_table(
    source: Mapping[str, Meta],
    rules: list[Rule],
    target_shapes: Mapping[str, tuple[int, ...]],
    *,
    what: str = "source",
) -> list[Rule]:
    """The rules that fill a target with `target_shapes` from `source` (`{key: (shape, dtype)}`).

    Total and checked: every source tensor must be consumed and every target filled, with each
    source shape equal to what the target demands; otherwise one `TransferError` lists all.
    """
    active = [r for r in rules if all(k in target_shapes for k in r.right)]
    filled = {k for r in active for k in r.right}
    problems, missing, unexpected, mismatched = [], [], [], []
    for key in sorted(set(target_shapes) - filled):
        problems.append(f"no rule fills target key {key!r}")
    expected: dict[str, tuple[tuple[int, ...], Rule]] = {}
    for r in active:
        shapes = r.transform.inverse(*(stand_in(target_shapes[k]) for k in r.right))
        for key, arr in zip(r.left, shapes, strict=True):
            expected[key] = (arr.shape, r)
    for key, (shape, r) in expected.items():
        if key not in source:
            missing.append(key)
            problems.append(
                f"missing {what} key {key!r}: expected shape {shape} "
                f"(fills {', '.join(map(repr, r.right))})"
            )
            continue
        actual, dtype = tuple(source[key][0]), str(source[key][1])
        if actual != shape:
            target = target_shapes[r.right[0]] if len(r.right) == 1 else None
            mismatched.append(key)
            problems.append(
                f"{what} key {key!r}: expected shape {shape}, got {actual}"
                f"{shape_hint(actual, shape, target)} (fills "
                f"{', '.join(map(repr, r.right))} via {r.transform.name})"
            )
        elif dtype not in FLOAT_KINDS:
            mismatched.append(key)
            problems.append(
                f"{what} key {key!r}: expected a float dtype {FLOAT_KINDS}, got {dtype}"
            )
    for key in sorted(set(source) - set(expected)):
        unexpected.append(key)
        problems.append(f"unexpected {what} key {key!r} with shape {tuple(source[key][0])}")
    if source and len(unexpected) == len(source):
        problems.insert(
            0, f"none of the {len(source)} {what} keys belongs to this layout: is the layout right?"
        )
    if problems:
        raise TransferError(problems, missing=missing, unexpected=unexpected, mismatched=mismatched)
    return active


def stream_table(
    items: Iterable[tuple[str, np.ndarray]],
    rules: list[Rule],
    *,
    finish: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """Apply checked rules to `(key, array)` pairs as they come, holding only a rule's inputs
    (q, k and v of one block for a fused qkv) until it can fire. Outputs may be views (a
    transpose of the input); `finish` (a copy into fresh memory, say) is applied to each."""
    by_key = {k: r for r in rules for k in r.left}
    waiting: dict[Rule, dict[str, np.ndarray]] = {}
    for key, array in items:
        r = by_key[key]
        got = waiting.setdefault(r, {})
        got[key] = array
        if len(got) == len(r.left):
            del waiting[r]
            outs = r.transform.forward(*(got[k] for k in r.left))
            for k, a in zip(r.right, outs, strict=True):
                yield k, finish(a) if finish is not None else a


def apply_table(
    source: Mapping[str, np.ndarray],
    rules: list[Rule],
    target_shapes: Mapping[str, tuple[int, ...]],
    *,
    what: str = "source",
    finish: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Map in-memory `source` through oriented, expanded `rules`; see `check_table` and
    `stream_table`."""
    active = check_table(meta_of(source), rules, target_shapes, what=what)
    used = {k for r in active for k in r.left}
    return dict(
        stream_table(((k, v) for k, v in source.items() if k in used), active, finish=finish)
    )


def forward_targets(rules: list[Rule], source: Mapping[str, Meta]) -> dict[str, tuple[int, ...]]:
    """Target shapes for a table read forward: what every rule whose inputs exist produces."""
    usable = [r for r in rules if all(k in source for k in r.left)]
    return {k: m[0] for k, m in output_meta(usable, source).items()}


def oriented(table: tuple[Rule, ...], num_layers: int, *, reverse: bool = False) -> list[Rule]:
    rules = [e for r in table for e in r.expand(num_layers)]
    return [r.reversed() for r in rules] if reverse else rules
