"""Compare any two models layer by layer: which module is whose counterpart (from the values
of the weights), where they first part ways, judged as this project judges its own pairs (each
side's float32 error against itself in float64 is the noise floor), and which weight was
copied wrong.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field

import numpy as np

from weight_transfer.diagnostics.metrics import (
    FLOOR_FACTOR,
    TOLERANCE,
    LayerGap,
    layer_gap,
    magnitude,
)
from weight_transfer.testing.matching import (
    ParamMatch,
    align,
    match_modules,
    match_params,
    part_of,
    weight_findings,
)
from weight_transfer.testing.sides import ModelSide, model_side


@dataclass
class PairGap:
    """One matched pair, its values compared: two modules' outputs (`compare_models`), or two
    parameters' gradients (`compare_grads`)."""

    reference: str
    candidate: str
    gap: LayerGap

    @property
    def divergent(self) -> bool:
        return self.gap.divergent


@dataclass
class ModelReport:
    reference: str  # each side's description
    candidate: str
    layers: list[PairGap]  # every matched pair, in the reference's order, outputs last
    first_divergence: tuple[str, str] | None
    params: list[ParamMatch]
    unmatched: dict[str, list[str]]  # parameters with no counterpart, per side
    findings: list[str] = field(default_factory=list)  # weights copied wrong, named

    @property
    def ok(self) -> bool:
        return self.first_divergence is None

    def table(self, upto: tuple[str, str] | None = None) -> str:
        """The layers (path pair, float32 gap, noise floor, float64 gap), up to `upto`."""
        rows = [("reference", "candidate", "gap32", "floor", "gap64", "")]
        for pair in self.layers:
            g = pair.gap
            rows.append(
                (
                    pair.reference or "(output)",
                    pair.candidate or "(output)",
                    f"{g.max_abs:.2e}",
                    f"{g.noise_floor:.2e}",
                    f"{g.gap64:.2e}",
                    "DIVERGES" if g.divergent else g.note,
                )
            )
            if upto is not None and (pair.reference, pair.candidate) == upto:
                break
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        return "\n".join(
            "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=False)) + f"  {r[5]}"
            for r in rows
        )

    def explain(self) -> str:
        """One paragraph: the first divergence with its gap against the floor, the findings."""
        if self.ok:
            return f"{self.candidate} computes what {self.reference} computes, layer by layer"
        ref, cand = self.first_divergence or ("", "")
        pair = next(p for p in self.layers if (p.reference, p.candidate) == (ref, cand))
        g = pair.gap
        lines = [
            f"first divergence: reference {ref or '(output)'} <-> candidate "
            f"{cand or '(output)'}: float32 gap {g.max_abs:.3e} against a noise floor of "
            f"{g.noise_floor:.3e}; float64 gap {g.gap64:.3e}"
        ]
        scale = g.max_abs / g.max_rel if g.max_rel else 1.0
        if g.max_abs <= FLOOR_FACTOR * g.noise_floor and g.gap64 < 1e-5 * max(1.0, scale):
            lines.append(
                "  the float32 gap is within the noise floor and float64 agrees only to "
                "float32's resolution: part of one side runs in float32 even in float64 (Hugging "
                "Face's eager attention softmax, a float32 cast); not a fault of the port"
            )
        lines += [f"  {f}" for f in self.findings]
        for side, names in self.unmatched.items():
            if names:
                lines.append(f"  {side} parameters with no counterpart: {', '.join(names[:8])}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {
            "reference": self.reference,
            "candidate": self.candidate,
            "ok": self.ok,
            "first_divergence": self.first_divergence,
            "layers": [
                {"reference": p.reference, "candidate": p.candidate, **asdict(p.gap)}
                for p in self.layers
            ],
            "findings": self.findings,
            "unmatched": self.unmatched,
        }


def _sides(reference, candidate, reference_input, candidate_input):
    ref = reference if isinstance(reference, ModelSide) else model_side(reference, reference_input)
    cand = candidate if isinstance(candidate, ModelSide) else model_side(candidate, candidate_input)
    return ref, cand


def compare_models(
    reference,
    candidate,
    images: np.ndarray,
    *,
    reference_input: str | None = None,
    candidate_input: str | None = None,
    names: dict[str, str] | None = None,
    float64: bool = True,
) -> ModelReport:
    """Every matched pair of modules of two models on the same NHWC `images` (each side gets
    them in its own convention: NCHW for torch, NHWC for JAX, unless `*_input` says otherwise).

    Either side: a `torch.nn.Module`, a `flax.nnx.Module`, or a `(flax.linen.Module,
    variables)` pair. Modules are paired by the parameters they hold, found by value;
    `names={reference path: candidate path}` adds or overrides pairs. A pair diverges when its
    float32 gap exceeds the two sides' own float32 errors (each run again in float64) or its
    float64 gap exceeds 1e-9 of its scale; `float64=False` skips the float64 runs (the float32
    gap is then judged at 1e-5 of max(1, |values|), logit parity's float32 tolerance).
    """
    from weight_transfer.frameworks.runners import exact_matmuls

    ref, cand = _sides(reference, candidate, reference_input, candidate_input)
    images = np.asarray(images, np.float32)
    with exact_matmuls():
        r32, c32 = ref.run(images, False), cand.run(images, False)
        r64, c64 = (ref.run(images, True), cand.run(images, True)) if float64 else (r32, c32)
    matches, left_ref, left_cand = match_params(
        ref.params, cand.params, list(r32.outputs), list(c32.outputs)
    )
    pairs = match_modules(ref.params, cand.params, matches, list(r32.outputs), list(c32.outputs))
    if names:
        pairs = [p for p in pairs if p[0] not in names] + list(names.items())
        order = {m: i for i, m in enumerate(r32.outputs)}
        pairs.sort(key=lambda p: order.get(p[0], len(order)))
    layers, first = [], None
    outputs = [(r, c, r32.outputs, r64.outputs, c32.outputs, c64.outputs) for r, c in pairs]
    outputs.append(("", "", {"": r32.output}, {"": r64.output}, {"": c32.output}, {"": c64.output}))
    for r, c, a32, a64, b32, b64 in outputs:
        if r not in a32 or c not in b32:
            continue
        x32, x64 = align(a32[r], b32[c]), align(a64[r], b64[c])
        if x32 is None or x64 is None:
            continue  # outputs of different sizes: the pair says nothing comparable
        gap = layer_gap(f"{r} <-> {c}", a32[r], a64[r], x32, x64)
        if not float64:  # no floor measured: float32 logit parity's tolerance, relative
            scale = max(1.0, magnitude(a32[r]))
            gap.divergent = gap.max_abs > TOLERANCE["float32"] * scale
            gap.noise_floor = gap.gap64 = float("nan")
            gap.note = "float32 only: judged at 1e-5 of max(1, |values|)"
        layers.append(PairGap(r, c, gap))
        if gap.divergent and first is None:
            first = (r, c)
    findings = weight_findings(matches, ref.params, ref.framework, cand.framework)
    return ModelReport(
        ref.name,
        cand.name,
        layers,
        first,
        matches,
        {"reference": left_ref, "candidate": left_cand},
        findings,
    )


def assert_equivalent(reference, candidate, images: np.ndarray, **options) -> ModelReport:
    """`compare_models`, raising AssertionError naming both module paths of the first
    divergence, its gap against the noise floor, the weights copied wrong, and the layers up to
    it; returns the report when the two agree."""
    report = compare_models(reference, candidate, images, **options)
    if not report.ok:
        raise AssertionError(f"{report.explain()}\n\n{report.table(upto=report.first_divergence)}")
    return report


def compare_grads(
    reference,
    candidate,
    images: np.ndarray,
    *,
    loss=None,
    reference_input: str | None = None,
    candidate_input: str | None = None,
) -> list[PairGap]:
    """The gradient of `loss(output)` (default: the outputs times fixed random weights,
    summed) with respect to every matched parameter and the images, each side in float32 and
    float64, judged as `compare_models` judges outputs; the reference's gradients are carried
    through the transform its weights were copied by. `loss` gets the model's output in its own
    framework (write it with operators and `.sum()`, `.mean()`: both frameworks have them)."""
    from weight_transfer.frameworks.runners import exact_matmuls

    ref, cand = _sides(reference, candidate, reference_input, candidate_input)
    images = np.asarray(images, np.float32)
    with exact_matmuls():
        r32, r64 = ref.grads(images, False, loss), ref.grads(images, True, loss)
        c32, c64 = cand.grads(images, False, loss), cand.grads(images, True, loss)
        orders = [list(side.run(images, False).outputs) for side in (ref, cand)]
    for grads, side in ((r32, ref), (r64, ref), (c32, cand), (c64, cand)):
        if side.input_layout == "NCHW":  # the images' gradient in NHWC on both sides
            grads["images"] = grads["images"].transpose(0, 2, 3, 1)
    matches, _, _ = match_params(ref.params, cand.params, *orders)
    overall = max(magnitude(g) for g in r64.values())
    out = []
    for m in matches:
        t = m.transform
        if t is None or m.reference not in r32 or m.candidate not in c32:
            continue
        pick = functools.partial(part_of, part=t.cand_part)
        out.append(
            PairGap(
                m.reference,
                m.candidate,
                layer_gap(
                    f"{m.reference} <-> {m.candidate}",
                    t.apply(r32[m.reference]),
                    t.apply(r64[m.reference]),
                    pick(c32[m.candidate]),
                    pick(c64[m.candidate]),
                    min_unit=1e-6 * overall,
                ),
            )
        )
    out.append(
        PairGap(
            "images",
            "images",
            layer_gap("images", r32["images"], r64["images"], c32["images"], c64["images"]),
        )
    )
    return out
