"""Which parameter and which module of one model is whose counterpart in another, from the
values alone: the user's weight copy already says it.

A parameter's fingerprint is a hash of its values as a multiset (in float32): the same under a
transpose, a reshape, a head or channel permutation. Equal fingerprints pair parameters; a
parameter whose values are exactly the union of several others' is a fused one (qkv) split in
pieces. Each pair
then gets the transform that relates the arrays (a slice of the fused array, an axis order, a
reshape), found by trying the few candidates the shapes allow. Modules pair when they hold
counterpart parameters and nothing else. NumPy only.
"""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

Part = tuple[int, int, int]  # (axis, parts, index): equal slices of an array along one axis


def part_of(a: np.ndarray, part: Part | None) -> np.ndarray:
    if part is None:
        return a
    axis, parts, index = part
    return np.split(a, parts, axis=axis)[index]


@dataclass(frozen=True)
class Transform:
    """candidate[cand_part] == reshape(transpose(reference[ref_part], axes), shape)."""

    ref_part: Part | None = None
    axes: tuple[int, ...] | None = None
    shape: tuple[int, ...] | None = None
    cand_part: Part | None = None

    def apply(self, ref: np.ndarray) -> np.ndarray:
        out = part_of(ref, self.ref_part)
        out = out.transpose(self.axes) if self.axes is not None else out
        return out.reshape(self.shape) if self.shape is not None else out

    def describe(self) -> str:
        steps = []
        if self.ref_part:
            axis, parts, index = self.ref_part
            steps.append(f"part {index + 1} of {parts} along axis {axis}")
        if self.axes is not None:
            steps.append(f"axes {self.axes}")
        if self.shape is not None:
            steps.append(f"reshaped to {self.shape}")
        if self.cand_part:
            axis, parts, index = self.cand_part
            steps.append(f"as part {index + 1} of {parts} along axis {axis} of the candidate's")
        return ", ".join(steps) or "as is"


@dataclass(frozen=True)
class ParamMatch:
    reference: str
    candidate: str
    transform: Transform | None  # None: the same values in an order no transform explains


_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def fingerprint(a: np.ndarray) -> tuple[int, int, int]:
    """(size, two 64-bit sums of a mixed hash of each value's float32 bits): the same for the
    same values in any order (integer sums wrap exactly, in any order), in one pass, where
    sorting would cost n log n."""
    bits = np.ascontiguousarray(a, np.float32).reshape(-1).view(np.uint32).astype(np.uint64)
    h = bits * _MIX[0]
    h ^= h >> np.uint64(31)
    h *= _MIX[1]
    h ^= h >> np.uint64(29)
    g = h * _MIX[2]
    g ^= g >> np.uint64(32)
    return bits.size, int(h.sum(dtype=np.uint64)), int(g.sum(dtype=np.uint64))


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.astype(np.float32), b.astype(np.float32))


def relate(ref: np.ndarray, cand: np.ndarray, ref_part: Part | None = None) -> Transform | None:
    """The transform taking `ref` (or its `ref_part`) to `cand`: the identity, an axis order, an
    axis order then a reshape; the identity first, then the fewest moved axes."""
    r = part_of(ref, ref_part)
    if r.size != cand.size:
        return None
    orders = sorted(
        itertools.permutations(range(r.ndim)),
        key=lambda p: sum(i != j for i, j in enumerate(p)),
    )
    for axes in orders if r.ndim <= 5 else [tuple(range(r.ndim))]:
        moved = r.transpose(axes)
        identity = axes == tuple(range(r.ndim))
        if moved.shape == cand.shape and _same(moved, cand):
            return Transform(ref_part, None if identity else axes)
        if moved.shape != cand.shape and _same(moved.reshape(cand.shape), cand):
            return Transform(ref_part, None if identity else axes, cand.shape)
    return None


def _fused(bigs: dict, smalls: dict) -> dict[str, list[str]]:
    """{big: [smalls]} where the smalls' values, together, are exactly the big's."""
    if not bigs or not smalls:
        return {}
    names = list(bigs)
    values = np.concatenate([np.asarray(bigs[n], np.float32).ravel() for n in names])
    owner = np.repeat(np.arange(len(names)), [bigs[n].size for n in names])
    order = np.argsort(values, kind="stable")
    values, owner = values[order], owner[order]
    groups: dict[str, list[str]] = defaultdict(list)
    for name, a in smalls.items():
        flat = np.asarray(a, np.float32).ravel()
        if not flat.size:
            continue
        sample = flat[:: max(1, flat.size // 8)][:8]
        lo, hi = np.searchsorted(values, sample, "left"), np.searchsorted(values, sample, "right")
        holders = None
        for a_lo, a_hi in zip(lo, hi, strict=True):
            here = set(owner[a_lo:a_hi].tolist())
            holders = here if holders is None else holders & here
        holders = {h for h in holders or () if bigs[names[h]].size > flat.size}
        if len(holders) == 1:
            groups[names[holders.pop()]].append(name)
    found = {}
    for big, parts in groups.items():
        pieces = np.concatenate([np.asarray(smalls[p], np.float32).ravel() for p in parts])
        if pieces.size == bigs[big].size and np.array_equal(
            np.sort(pieces), np.sort(np.asarray(bigs[big], np.float32).ravel())
        ):
            found[big] = parts
    return found


def _split_relations(big: np.ndarray, pieces: dict) -> dict[str, Part | None]:
    """Each piece's slice of `big`: (axis, parts, index) with `relate` finding a transform."""
    out: dict[str, Part | None] = {}
    parts = len(pieces)
    for name, piece in pieces.items():
        out[name] = None
        for axis in range(big.ndim):
            if big.shape[axis] % parts:
                continue
            for index in range(parts):
                part = (axis, parts, index)
                if part_of(big, part).size == piece.size and relate(big, piece, part):
                    out[name] = part
                    break
            if out[name]:
                break
    return out


def match_params(
    ref: dict[str, np.ndarray],
    cand: dict[str, np.ndarray],
    ref_order: list[str] | None = None,
    cand_order: list[str] | None = None,
):
    """([ParamMatch], unmatched reference names, unmatched candidate names). `*_order`: each
    side's modules in the order their calls finished, which pairs parameters of equal values
    (a fresh model's LayerNorm scales are all ones) within the modules their neighbours place."""
    by_print: dict[tuple, list[str]] = defaultdict(list)
    for name, a in ref.items():
        by_print[fingerprint(a)].append(name)
    cand_print: dict[tuple, list[str]] = defaultdict(list)
    for name, a in cand.items():
        cand_print[fingerprint(a)].append(name)
    pairs = {}  # candidate -> reference
    for key, names in cand_print.items():
        if len(names) == 1 and len(by_print.get(key, ())) == 1:
            pairs[names[0]] = by_print[key][0]
    claimed = set(pairs.values())
    for key, names in cand_print.items():
        refs = [r for r in by_print.get(key, ()) if r not in claimed]
        if refs and (len(names) > 1 or len(by_print[key]) > 1):
            resolved = _resolve(names, refs, pairs, ref_order or [], cand_order or [])
            pairs.update(resolved)
            claimed.update(resolved.values())
    matches = [ParamMatch(r, c, relate(ref[r], cand[c])) for c, r in pairs.items()]
    left_cand = {n: a for n, a in cand.items() if n not in pairs}
    by_print = {k: [n for n in names if n not in claimed] for k, names in by_print.items()}
    left_ref = {n: ref[n] for names in by_print.values() for n in names}
    # the reference fused, the candidate split (qkv -> q, k, v)
    for big, parts in _fused(left_ref, left_cand).items():
        for name, part in _split_relations(ref[big], {p: cand[p] for p in parts}).items():
            t = relate(ref[big], cand[name], part) if part else None
            matches.append(ParamMatch(big, name, t))
            left_cand.pop(name)
        left_ref.pop(big)
    # the candidate fused, the reference split
    for big, parts in _fused(left_cand, left_ref).items():
        for name, part in _split_relations(cand[big], {p: ref[p] for p in parts}).items():
            t = None
            if part:
                inverse = relate(part_of(cand[big], part), ref[name])
                t = relate(ref[name], part_of(cand[big], part)) if inverse else None
                t = Transform(None, t.axes, t.shape, part) if t else None
            matches.append(ParamMatch(name, big, t))
            left_ref.pop(name)
        left_cand.pop(big)
    return matches, sorted(left_ref), sorted(left_cand)


def _common(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


def _resolve(cands, refs, pairs, ref_order, cand_order) -> dict[str, str]:
    """Parameters of equal values paired: each candidate within the reference module its
    nearest ancestor's uniquely matched parameters point to (deepest first), then in the
    order their modules ran on each side."""
    finish_r = {m: i for i, m in enumerate(ref_order)}
    finish_c = {m: i for i, m in enumerate(cand_order)}

    def anchor(c: str) -> tuple[int, str]:
        path = owner(c)
        while True:
            held = [pairs[n] for n in pairs if not path or n.startswith(path + ".")]
            if held:
                return path.count(".") + bool(path), _common([owner(r) for r in held])
            if not path:
                return 0, ""
            path = owner(path)

    groups: dict[tuple[int, str], list[str]] = defaultdict(list)
    for c in cands:
        groups[anchor(c)].append(c)
    free, out = list(refs), {}
    for (_, prefix), members in sorted(groups.items(), key=lambda g: -g[0][0]):
        here = [r for r in free if not prefix or r.startswith(prefix + ".")]
        while not here and prefix:  # one neighbour placed it too deep: widen to its parent
            prefix = owner(prefix)
            here = [r for r in free if not prefix or r.startswith(prefix + ".")]
        here.sort(key=lambda r: (finish_r.get(owner(r), -1), r))
        members.sort(key=lambda c: (finish_c.get(owner(c), -1), c))
        for c, r in zip(members, here, strict=False):
            out[c] = r
            free.remove(r)
    return out


# ---- modules ------------------------------------------------------------------------------------


def owner(path: str) -> str:
    return path.rpartition(".")[0]


def _under(module: str, names) -> set[str]:
    return {n for n in names if not module or n.startswith(module + ".")}


def match_modules(
    ref_params, cand_params, matches: list[ParamMatch], ref_order: list[str], cand_order: list[str]
) -> list[tuple[str, str]]:
    """(reference module, candidate module) pairs, in the reference's finish order: modules
    holding counterpart parameters and nothing else; equal holdings (a wrapper around one
    module) are paired in each side's finish order."""
    to_cand, to_ref = defaultdict(set), defaultdict(set)
    for m in matches:
        to_cand[m.reference].add(m.candidate)
        to_ref[m.candidate].add(m.reference)
    ref_groups, cand_groups = defaultdict(list), defaultdict(list)
    for module in ref_order:
        held = frozenset(_under(module.split("#")[0], ref_params))
        if held and all(to_cand[n] for n in held):
            ref_groups[held].append(module)
    for module in cand_order:
        held = _under(module.split("#")[0], cand_params)
        if held and all(to_ref[n] for n in held):
            image = frozenset(r for n in held for r in to_ref[n])
            if {c for r in image for c in to_cand[r]} == held:  # no counterpart lives elsewhere
                cand_groups[image].append(module)
    pairs = []
    for held, modules in ref_groups.items():
        pairs += zip(modules, cand_groups.get(held, []), strict=False)
    finish = {m: i for i, m in enumerate(ref_order)}
    return sorted(pairs, key=lambda p: finish[p[0]])


def align(ref_out: np.ndarray, cand_out: np.ndarray) -> np.ndarray | None:
    """The candidate's output in the reference's layout: as is, channels moved (NCHW/NHWC), or
    a grid flattened to tokens (same batch and feature sizes); None when nothing fits."""
    options = [cand_out]
    if cand_out.ndim >= 3:
        options += [np.moveaxis(cand_out, 1, -1), np.moveaxis(cand_out, -1, 1)]
    for c in options:
        if c.shape == ref_out.shape:
            return c
    for c in options:
        if (
            c.size == ref_out.size
            and c.shape[0] == ref_out.shape[0]
            and c.shape[-1] == ref_out.shape[-1]
        ):
            return c.reshape(ref_out.shape)
    return None


# ---- what a transform says about the weight copy -----------------------------------------------

_ROLE = re.compile(r"(?:^|[._])(q|k|v|query|key|value)(?:_proj)?$")


def _role(path: str) -> int | None:
    match = _ROLE.search(owner(path))
    return "qkv".index(match[1][0]) if match else None


def expected_axes(ref_framework: str, cand_framework: str, ref_leaf: str, cand_leaf: str, ndim):
    """The axis order a correct copy uses: torch's Linear (out, in) and Conv (O, I, kh, kw)
    against flax's kernels (in, out) and (kh, kw, I, O); the identity otherwise."""
    if ref_framework == cand_framework:
        return None
    torch_leaf, jax_leaf = (
        (ref_leaf, cand_leaf) if ref_framework == "torch" else (cand_leaf, ref_leaf)
    )
    if torch_leaf != "weight" or jax_leaf != "kernel":
        return None
    if ndim == 2:
        return (1, 0)
    if ndim == 4:
        return (2, 3, 1, 0) if ref_framework == "torch" else (3, 2, 0, 1)
    return None


def weight_findings(
    matches: list[ParamMatch], ref_params: dict, ref_framework: str, cand_framework: str
) -> list[str]:
    """Each parameter copied under a transform its use contradicts, named."""
    out = []
    for m in matches:
        t, leaf = m.transform, (m.reference.rpartition(".")[2], m.candidate.rpartition(".")[2])
        if t is None:
            out.append(
                f"{m.candidate} holds the values of the reference's {m.reference} in an order "
                f"no transpose or reshape gives (a permutation of heads or channels)"
            )
            continue
        if t.ref_part and t.ref_part[1] == 3 and (role := _role(m.candidate)) is not None:
            if t.ref_part[2] != role:
                out.append(
                    f"{m.candidate} holds the {'qkv'[t.ref_part[2]]} part of the reference's "
                    f"{m.reference} where its name says {'qkv'[role]}: q, k, v exchanged"
                )
        if t.cand_part and t.cand_part[1] == 3 and (role := _role(m.reference)) is not None:
            if t.cand_part[2] != role:
                out.append(
                    f"the reference's {m.reference} sits in the {'qkv'[t.cand_part[2]]} part of "
                    f"{m.candidate}: q, k, v exchanged"
                )
        ndim = np.ndim(ref_params[m.reference])
        want = expected_axes(ref_framework, cand_framework, *leaf, ndim)  # type: ignore[arg-type]
        got = t.axes
        if want != got and ndim in (2, 4) and not (want is None and got is None):
            out.append(_axes_fault(m, want, got, ndim))
    return out


def _axes_fault(m: ParamMatch, want, got, ndim: int) -> str:
    if ndim == 2:
        how = "untransposed" if got is None else "transposed"
        why = (
            "both sides store this weight the same way"
            if want is None
            else "torch Linear weights are (out, in), flax kernels (in, out)"
        )
        return f"{m.candidate} holds the reference's {m.reference} {how} ({why})"
    if want and got and tuple(want[i] for i in (1, 0, 2, 3)) == got:
        return f"{m.candidate} holds the reference's {m.reference} with H and W swapped"
    if want and got and tuple(want[i] for i in (0, 1, 3, 2)) == got:
        return f"{m.candidate} holds the reference's {m.reference} with in and out swapped"
    return f"{m.candidate} holds the reference's {m.reference} in axis order {got}, not {want}"
