"""The mismatch doctor: find where two models part ways, then name the fault that explains it.

The candidate (one of ours) is replayed in float64 by the NumPy forward (`numpy_ref`), where
each hypothesis is one correction: a layout transform of some weights, a config change, or a
`Knobs` switch for what our config cannot express (pooling, norm position, score scale...).
Corrections are tried one at a time against the reference's float64 intermediates; the one
that moves the first divergence furthest (then shrinks the gap most) is kept, and the search
goes on from there, so two faults at different depths are both found.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from vit_config import ViTConfig
from weight_transfer.numpy_ref import Knobs, forward

# float64 on both sides: the same function agrees to ~1e-14 relative; a fault shows as far more.
DIVERGENCE = 1e-9


@dataclass(frozen=True)
class Candidate:
    config: ViTConfig
    params: dict  # flat NNX layout, float64
    knobs: Knobs = Knobs()


@dataclass
class Finding:
    id: str
    detail: str


@dataclass
class Diagnosis:
    first_divergence: str | None
    findings: list[Finding] = field(default_factory=list)
    fixed: bool = False
    remaining: str | None = None  # first divergence after the corrections found

    def as_dict(self) -> dict:
        return {"first_divergence": self.first_divergence,
                "findings": [dataclasses.asdict(f) for f in self.findings], "fixed": self.fixed,
                "remaining_divergence": self.remaining}


Variant = tuple[str, Candidate]  # (detail, corrected candidate)


def _with(c: Candidate, **params) -> Candidate:
    return Candidate(c.config, {**c.params, **params}, c.knobs)


def _blocks(c: Candidate) -> range:
    return range(c.config.num_layers)


# ---- hypotheses: each yields corrections of the candidate ----------------------------------------


def conv_kernel_spatial_swap(c: Candidate) -> Iterator[Variant]:
    k = c.params["patch_embed.kernel"]  # (kH, kW, I, O)
    yield ("the patch kernel's spatial axes are swapped (kH <-> kW): it was moved with .T, "
           "which reverses all four axes, instead of permute(2, 3, 1, 0)",
           _with(c, **{"patch_embed.kernel": k.transpose(1, 0, 2, 3)}))


def conv_kernel_in_out_swap(c: Candidate) -> Iterator[Variant]:
    k = c.params["patch_embed.kernel"]
    if k.shape[2] == k.shape[3]:  # only a square kernel slips through the shape checks
        yield ("the patch kernel's input and output channel axes are swapped",
               _with(c, **{"patch_embed.kernel": k.transpose(0, 1, 3, 2)}))


def linear_not_transposed(c: Candidate) -> Iterator[Variant]:
    groups = {f"attention {n}": [f"blocks.{i}.attn.{n}.kernel" for i in _blocks(c)]
              for n in "qkvo"}
    groups.update({"MLP fc1": [f"blocks.{i}.ff1.kernel" for i in _blocks(c)],
                   "MLP fc2": [f"blocks.{i}.ff2.kernel" for i in _blocks(c)], "head": ["head.kernel"]})
    square = {g: keys for g, keys in groups.items()
              if keys and all(c.params[k].shape[0] == c.params[k].shape[1] for k in keys)}
    if len(square) > 1:
        square = {"every square": [k for keys in square.values() for k in keys], **square}
    for group, keys in square.items():
        yield (f"the {group} linear kernel(s) were copied without transposing: a torch "
               f"(out, in) weight read as a flax (in, out) kernel",
               _with(c, **{k: c.params[k].T for k in keys}))


def input_layout(c: Candidate) -> Iterator[Variant]:
    other = "nchw_as_nhwc" if c.knobs.images == "nhwc" else "nhwc"
    yield ("the images reach the two sides in different layouts: NCHW data read as NHWC "
           "(reshaped instead of transposed)",
           dataclasses.replace(c, knobs=dataclasses.replace(c.knobs, images=other)))


def ln_eps(c: Candidate) -> Iterator[Variant]:
    for eps in (1e-5, 1e-6, 1e-12):
        if eps != c.config.ln_eps:
            yield (f"LayerNorm epsilon differs: the reference uses {eps:g}, the candidate "
                   f"{c.config.ln_eps:g}", dataclasses.replace(c, config=c.config.replace(ln_eps=eps)))


def gelu_variant(c: Candidate) -> Iterator[Variant]:
    names = {"gelu": "exact GELU (erf)", "gelu_tanh": "tanh-approximate GELU (jax.nn.gelu's "
             "default)", "relu": "ReLU"}
    for act in names:
        if act != c.config.activation:
            yield (f"the MLP activation differs: the reference uses {names[act]}, the candidate "
                   f"{names[c.config.activation]}",
                   dataclasses.replace(c, config=c.config.replace(activation=act)))


def _qkv(c: Candidate, i: int) -> list[list[str]]:
    leaves = ["kernel"] + (["bias"] if c.config.qkv_bias else [])
    return [[f"blocks.{i}.attn.{n}.{leaf}" for leaf in leaves] for n in "qkv"]


def qkv_order(c: Candidate) -> Iterator[Variant]:
    for perm in itertools.permutations(range(3)):
        if perm == (0, 1, 2):
            continue
        fixed = {}
        for i in _blocks(c):
            keys = _qkv(c, i)
            for dst, src in zip(keys, [keys[j] for j in perm], strict=True):
                fixed.update({d: c.params[s] for d, s in zip(dst, src, strict=True)})
        order = ", ".join("qkv"[j] for j in perm)
        yield (f"q, k and v are permuted: the candidate's q, k, v hold the reference's {order}",
               _with(c, **fixed))


def _regroup(c: Candidate, fn: Callable[[np.ndarray], np.ndarray], axis_in: bool) -> dict:
    """Apply a permutation of the D attention features to q, k, v outputs (and o's inputs)."""
    out = {}
    for i in _blocks(c):
        for keys in _qkv(c, i):
            for k in keys:
                a = c.params[k]
                out[k] = fn(a.T).T if a.ndim == 2 else fn(a)
        if axis_in:
            out[f"blocks.{i}.attn.o.kernel"] = fn(c.params[f"blocks.{i}.attn.o.kernel"])
    return out


def qkv_interleaved(c: Candidate) -> Iterator[Variant]:
    h, hd, d = c.config.num_heads, c.config.head_dim, c.config.d_model
    if h == 1:
        return
    for direction in ("interleaved", "contiguous"):
        fixed = {}
        for i in _blocks(c):
            for leaf_keys in zip(*_qkv(c, i), strict=True):  # (q.x, k.x, v.x) for x in kernel, bias
                fused = np.concatenate([c.params[k].T if c.params[k].ndim == 2 else c.params[k]
                                        for k in leaf_keys], axis=0)  # (3D, ...) rows q|k|v
                rest = fused.shape[1:]
                # interleaved: the rows were per head [q_h k_h v_h]; contiguous: the reverse
                groups = (h, 3) if direction == "interleaved" else (3, h)
                parts = fused.reshape(*groups, hd, *rest).swapaxes(0, 1)
                parts = parts.reshape(3, d, *rest)
                for k, part in zip(leaf_keys, parts, strict=True):
                    fixed[k] = part.T if c.params[k].ndim == 2 else part
        layout = ("per head (q, k, v of head 0, then head 1...)" if direction == "interleaved"
                  else "the other way")
        yield (f"the fused qkv rows were split as contiguous q|k|v thirds but are laid out "
               f"{layout}", _with(c, **fixed))


def head_split_order(c: Candidate) -> Iterator[Variant]:
    h, hd = c.config.num_heads, c.config.head_dim
    if h == 1 or hd == 1:
        return
    for name, split in (("(head_dim, heads)", (hd, h)), ("(heads, head_dim)", (h, hd))):
        def fn(a, split=split):  # regroup the feature axis (axis 0) as split, swapped
            return a.reshape(*split, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape)
        yield (f"the attention features were split into heads as {name} instead of the other "
               f"order: each head mixes features of several heads", _with(c, **_regroup(c, fn, True)))


def attention_scale(c: Candidate) -> Iterator[Variant]:
    r = math.sqrt(c.config.head_dim / c.config.d_model)
    if r == 1:
        return
    for factor, side in ((r, "reference"), (1 / r, "candidate")):
        what = f"1/sqrt(d_model) on the {side} side"
        yield (f"attention scores are scaled by {what} instead of 1/sqrt(head_dim)",
               dataclasses.replace(c, knobs=dataclasses.replace(
                   c.knobs, score_factor=c.knobs.score_factor * factor)))


def pooling(c: Candidate) -> Iterator[Variant]:
    current = c.knobs.pool or c.config.pool
    options = ("cls", "mean", "mean_patches") if "cls_token" in c.params else ("mean",)
    words = {"cls": "reads the [CLS] row", "mean": "averages all tokens",
             "mean_patches": "averages the patch tokens (timm global_pool='avg')"}
    for pool in options:
        if pool != current:
            yield (f"pooling differs: the reference {words[pool]}, the candidate {words[current]}",
                   dataclasses.replace(c, knobs=dataclasses.replace(c.knobs, pool=pool)))


def final_norm_position(c: Candidate) -> Iterator[Variant]:
    current = c.knobs.final_norm or {"pre_pool": "before", "post_pool": "after"}.get(
        c.config.final_norm)
    if current is None:
        return  # no final norm to move
    other = "after" if current == "before" else "before"
    yield (f"the final norm runs {other} pooling on the reference side (timm fc_norm: after), "
           f"{current} it on the candidate",
           dataclasses.replace(c, knobs=dataclasses.replace(c.knobs, final_norm=other)))


def posembed_cls_slot(c: Candidate) -> Iterator[Variant]:
    if "cls_token" not in c.params:
        return
    pos = c.params["pos_embed"]
    yield ("the CLS position row is at the end of pos_embed instead of the front",
           _with(c, pos_embed=np.roll(pos, 1, axis=0)))
    yield ("the CLS position row is at the front of pos_embed but the other side expects it "
           "at the end", _with(c, pos_embed=np.roll(pos, -1, axis=0)))
    if c.knobs.cls_position == "row0":
        yield ("the reference adds no position to the CLS token (big_vision adds pos_embedding "
               "before the CLS joins)",
               dataclasses.replace(c, knobs=dataclasses.replace(c.knobs, cls_position="none")))


def posembed_grid_order(c: Candidate) -> Iterator[Variant]:
    hp, wp = c.config.grid
    if hp == 1 or wp == 1:
        return
    pos = c.params["pos_embed"]
    n = int("cls_token" in c.params)
    for name, (a, b) in (("column-major", (wp, hp)), ("row-major", (hp, wp))):
        rows = pos[n:].reshape(a, b, -1).transpose(1, 0, 2).reshape(hp * wp, -1)
        yield (f"the patch grid's position rows are in {name} order on the candidate",
               _with(c, pos_embed=np.concatenate([pos[:n], rows], axis=0)))


HYPOTHESES: dict[str, Callable[[Candidate], Iterator[Variant]]] = {
    f.__name__: f for f in (
        conv_kernel_spatial_swap, conv_kernel_in_out_swap, linear_not_transposed, input_layout,
        ln_eps, gelu_variant, qkv_order, qkv_interleaved, head_split_order, attention_scale,
        pooling, final_norm_position, posembed_cls_slot, posembed_grid_order)
}


# ---- the search ---------------------------------------------------------------------------------


def candidate_of(model) -> Candidate:
    """One of our models as the doctor's candidate (flat NNX params in float64)."""
    from weight_transfer.bridge import nnx_params

    flat = nnx_params(model)  # TypeError for anything but ours
    return Candidate(model.config, {k: v.astype(np.float64) for k, v in flat.items()})


def _score(ref: dict, cand: Candidate, images: np.ndarray, order: list[str]) -> tuple[int, float]:
    """(index of the first divergent layer, len(order) if none; that layer's relative gap)."""
    try:
        out = forward(cand.params, images, cand.config, cand.knobs)
    except (ValueError, KeyError):  # a correction that does not fit this model
        return -1, math.inf
    for i, name in enumerate(order):
        if name not in ref or name not in out:
            continue
        a, b = ref[name], out[name]
        if a.shape != b.shape:
            return i, math.inf
        gap = float(np.max(np.abs(a - b))) / max(1.0, float(np.max(np.abs(a))))
        if gap > DIVERGENCE:
            return i, gap
    return len(order), 0.0


def diagnose(reference, candidate, images: np.ndarray, *, max_faults: int = 3,
             candidate_knobs: Knobs = Knobs()) -> Diagnosis:
    """Name what makes `candidate` (one of ours) compute differently from `reference` (any
    model `compare` accepts) on NHWC `images`; see the module docstring."""
    from weight_transfer.adapters import side
    from weight_transfer.runners import exact_matmuls

    images = np.asarray(images, np.float64)
    cand = dataclasses.replace(candidate_of(candidate), knobs=candidate_knobs)
    ref_side, cand_side = side(reference), side(candidate)
    order = ref_side.names + [n for n in cand_side.names if n not in ref_side.names]
    with exact_matmuls():
        ref = ref_side.run(images, True)
        if candidate_knobs == Knobs():  # the replay must be the candidate, or nothing holds
            own = cand_side.run(images, True)["logits"]
            replay = forward(cand.params, images, cand.config)["logits"]
            if np.max(np.abs(own - replay)) > DIVERGENCE * max(1.0, np.max(np.abs(own))):
                raise RuntimeError("the NumPy replay of the candidate disagrees with the candidate")
    score = _score(ref, cand, images, order)
    first = order[score[0]] if score[0] < len(order) else None
    diagnosis = Diagnosis(first)
    for _ in range(max_faults):
        if score[0] == len(order):
            break
        rank = lambda s: (s[0], -s[1])  # noqa: E731  (later divergence, then smaller gap)
        best = None
        for hid, hypothesis in HYPOTHESES.items():
            for detail, variant in hypothesis(cand):
                s = _score(ref, variant, images, order)
                if rank(s) > rank(score) and (best is None or rank(s) > rank(best[0])):
                    best = (s, hid, detail, variant)
        if best is None or (best[0][0] == score[0] and best[0][1] > 0.5 * score[1]):
            break  # nothing moves the divergence or clearly shrinks it
        score, hid, detail, cand = best
        diagnosis.findings.append(Finding(hid, detail))
    diagnosis.fixed = score[0] == len(order)
    diagnosis.remaining = None if diagnosis.fixed else order[score[0]]
    return diagnosis
