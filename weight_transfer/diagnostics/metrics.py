"""How far apart two arrays are, and when that is more than rounding: the one set of error
measures every comparison uses (logit parity, the layer diff, gradients, the doctor).
NumPy only; framework arrays are turned into float64 NumPy first."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Logit parity, relative to the logits' scale `max(1, max |ref|)`. float32: a few ulps of
# accumulated rounding per layer at ViT-S width (HF's PT<->Flax tests use 1e-5 absolute on tiny
# models); float64: the same rounding at 2**-52 instead of 2**-23.
TOLERANCE = {"float32": 1e-5, "float64": 1e-12, "bfloat16": 5e-2}

# A layer diverges when the float32 gap between the two sides exceeds this many times the sum
# of their own float32 errors (each side against itself in float64), plus a few float32 ulps,
# or when the float64 gap exceeds GAP64_BOUND of the values' magnitude.
FLOOR_FACTOR = 8.0
EPS32 = 2.0**-23
GAP64_BOUND = 1e-9


def as_float64(x) -> np.ndarray:
    """A NumPy, JAX or torch array (bfloat16 included) as a float64 NumPy array."""
    if type(x).__module__.startswith("torch"):
        x = x.detach().cpu().float() if str(x.dtype) == "torch.bfloat16" else x.detach().cpu()
        x = x.numpy()
    return np.asarray(x).astype(np.float64)


def max_abs(a, b) -> float:
    """max |a - b| (inf when the shapes differ, 0 for empty arrays)."""
    a, b = as_float64(a), as_float64(b)
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def magnitude(a) -> float:
    """max |a| (0 for an empty array)."""
    a = as_float64(a)
    return float(np.max(np.abs(a))) if a.size else 0.0


def max_error(ref, out) -> tuple[float, float]:
    """(max |ref - out|, the scale it is judged at: max(1, max |ref|))."""
    return max_abs(ref, out), max(1.0, magnitude(ref))


def relative_error(ref, out) -> float:
    """max |ref - out| / max |ref| (absolute where ref is all zeros)."""
    return max_abs(ref, out) / (magnitude(ref) or 1.0)


def is_divergent(gap: float, floor: float, gap64: float, scale: float, unit: float) -> bool:
    """float32 beyond its own rounding, or float64 (rounding ~1e-15) beyond 1e-9 of `unit` (the
    magnitude the values are judged at): a change smaller than float32 resolves (an epsilon of
    1e-5 vs 1e-6) still shows in float64."""
    return not (
        gap <= FLOOR_FACTOR * floor + 4 * EPS32 * max(scale, 1e-30) and gap64 <= GAP64_BOUND * unit
    )


@dataclass
class LayerGap:
    name: str
    max_abs: float  # max |ref - cand| in float32
    max_rel: float  # max_abs / max |ref|
    noise_floor: float  # max |side32 - side64| summed over both sides: rounding alone
    gap64: float  # max |ref - cand| with both sides in float64
    divergent: bool
    note: str = ""


def layer_gap(name: str, ref32, ref64, cand32, cand64, *, min_unit: float = 1.0) -> LayerGap:
    """One named value on both sides, each computed in float32 and in float64: the float32 gap
    judged against the sum of each side's own float32 error, the float64 gap against 1e-9 of
    the value's magnitude (never below `min_unit`)."""
    gap, gap64 = max_abs(ref32, cand32), max_abs(ref64, cand64)
    floor = max_abs(ref32, ref64) + max_abs(cand32, cand64)
    scale = magnitude(ref64)
    shapes = (np.shape(ref32), np.shape(cand32))
    note = "" if shapes[0] == shapes[1] else f"shapes differ: {shapes[0]} vs {shapes[1]}"
    return LayerGap(
        name,
        gap,
        gap / scale if scale else gap,
        floor,
        gap64,
        is_divergent(gap, floor, gap64, scale, max(scale, min_unit)),
        note,
    )
