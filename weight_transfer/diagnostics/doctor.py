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
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from vit_config import ViTConfig, arch
from vit_config.resample import weights_1d
from weight_transfer.diagnostics.numpy_ref import Knobs, forward, trace

# float64 on both sides: the same function agrees to ~1e-14 relative; a fault shows as far more.
DIVERGENCE = 1e-9
REPLAY_CHECK = 1e-4  # the candidate's own float32 logits against its float64 NumPy replay


@dataclass(frozen=True)
class Candidate:
    config: ViTConfig
    params: dict  # flat NNX layout, float64
    knobs: Knobs = Knobs()
    focus: int | None = None  # the block of the first divergence: corrections confined to it
    # a dynamic-size model's method (`interpolation`, `antialias`), and the images' patch grid
    resampling: object | None = None
    grid: tuple[int, int] | None = None

    def blocks(self) -> list[tuple[str, list[int]]]:
        """Where a per-block correction is tried: every block, and the focus block alone (a
        fault confined to one layer, such as one output projection copied untransposed)."""
        every = list(range(self.config.num_layers))
        scopes = [("", every)]
        if self.focus is not None and len(every) > 1:
            scopes.append((f" (block {self.focus} only)", [self.focus]))
        return scopes


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
        return {
            "first_divergence": self.first_divergence,
            "findings": [dataclasses.asdict(f) for f in self.findings],
            "fixed": self.fixed,
            "remaining_divergence": self.remaining,
        }


Variant = tuple[str, Candidate]  # (detail, corrected candidate)


def _with(c: Candidate, **params) -> Candidate:
    return dataclasses.replace(c, params={**c.params, **params})


def _knobs(c: Candidate, **changes) -> Candidate:
    return dataclasses.replace(c, knobs=dataclasses.replace(c.knobs, **changes))


def _config(c: Candidate, **changes) -> Candidate:
    return dataclasses.replace(c, config=dataclasses.replace(c.config, **changes))


BLOCK = re.compile(r"^blocks\.(\d+)\.")


def kernel_groups(c: Candidate) -> dict[str, list[str]]:
    """Linear kernels grouped by their path with the block index as `{}` (derived from the
    declared architecture): "blocks.{}.attn.q.kernel" -> one per block, "head.kernel"..."""
    groups: dict[str, list[str]] = {}
    for key, p in arch.parameters(c.config).items():
        if p.kind == "kernel":
            groups.setdefault(BLOCK.sub("blocks.{}.", key), []).append(key)
    return groups


# ---- hypotheses: each yields corrections of the candidate ----------------------------------------


def conv_kernel_spatial_swap(c: Candidate) -> Iterator[Variant]:
    k = c.params["patch_embed.kernel"]  # (kH, kW, I, O)
    yield (
        "the patch kernel's spatial axes are swapped (kH <-> kW): it was moved with .T, "
        "which reverses all four axes, instead of permute(2, 3, 1, 0)",
        _with(c, **{"patch_embed.kernel": k.transpose(1, 0, 2, 3)}),
    )


def conv_kernel_in_out_swap(c: Candidate) -> Iterator[Variant]:
    k = c.params["patch_embed.kernel"]
    if k.shape[2] == k.shape[3]:  # only a square kernel slips through the shape checks
        yield (
            "the patch kernel's input and output channel axes are swapped",
            _with(c, **{"patch_embed.kernel": k.transpose(0, 1, 3, 2)}),
        )


def linear_not_transposed(c: Candidate) -> Iterator[Variant]:
    square = {
        g: keys
        for g, keys in kernel_groups(c).items()
        if all(c.params[k].shape[0] == c.params[k].shape[1] for k in keys)
    }
    if len(square) > 1:
        square = {"every square": [k for keys in square.values() for k in keys], **square}
    for group, keys in square.items():
        for scope, blocks in c.blocks():
            chosen = [k for k in keys if not BLOCK.match(k) or int(BLOCK.match(k)[1]) in blocks]
            if chosen and (scope == "" or len(chosen) < len(keys)):
                yield (
                    f"the {group} linear kernel(s){scope} were copied without transposing: a "
                    f"torch (out, in) weight read as a flax (in, out) kernel",
                    _with(c, **{k: c.params[k].T for k in chosen}),
                )


def input_layout(c: Candidate) -> Iterator[Variant]:
    other = "nchw_as_nhwc" if c.knobs.images == "nhwc" else "nhwc"
    yield (
        "the images reach the two sides in different layouts: NCHW data read as NHWC "
        "(reshaped instead of transposed)",
        _knobs(c, images=other),
    )


def ln_eps(c: Candidate) -> Iterator[Variant]:
    for eps in (1e-5, 1e-6, 1e-12):
        if eps != c.config.ln_eps:
            yield (
                f"LayerNorm epsilon differs: the reference uses {eps:g}, the candidate "
                f"{c.config.ln_eps:g}",
                _config(c, ln_eps=eps),
            )


def block_ln_eps(c: Candidate) -> Iterator[Variant]:
    for eps in (1e-5, 1e-6, 1e-12):
        if eps != c.config.block_eps:
            yield (
                f"the blocks' LayerNorm epsilon differs: the reference's blocks use {eps:g} "
                f"(its outer norms {c.config.ln_eps:g}, as jimm's blocks always use 1e-6), "
                f"the candidate's {c.config.block_eps:g}",
                _config(c, block_ln_eps=None if eps == c.config.ln_eps else eps),
            )


ACTIVATION_NAMES = {
    "gelu": "exact GELU (erf)",
    "gelu_tanh": "tanh-approximate GELU (jax.nn.gelu's and flax's default)",
    "quick_gelu": "QuickGELU, x * sigmoid(1.702 x) (OpenAI CLIP)",
    "silu": "SiLU",
    "relu": "ReLU",
}


def activation_variant(c: Candidate) -> Iterator[Variant]:
    for act, words in ACTIVATION_NAMES.items():
        if act != c.config.activation:
            yield (
                f"the MLP activation differs: the reference uses {words}, the candidate "
                f"{ACTIVATION_NAMES[c.config.activation]}",
                _config(c, activation=act),
            )


def norm_pre_presence(c: Candidate) -> Iterator[Variant]:
    if c.config.norm_pre:
        yield (
            "the candidate normalises the tokens before the first block (CLIP's ln_pre), the "
            "reference does not",
            _config(c, norm_pre=False),
        )
    else:
        d = c.config.d_model
        unit = {"norm_pre.scale": np.ones(d)} | (
            {"norm_pre.bias": np.zeros(d)} if c.config.norm == "layernorm" else {}
        )
        yield (
            "the reference normalises the tokens before the first block (CLIP's ln_pre; "
            "shown with a unit gain), the candidate does not",
            dataclasses.replace(
                _with(c, **unit), config=dataclasses.replace(c.config, norm_pre=True)
            ),
        )


def registers(c: Candidate) -> Iterator[Variant]:
    if not c.config.reg_tokens:
        return
    yield (
        "the reference has no register tokens (they were dropped)",
        _knobs(c, drop_registers=True),
    )
    if c.config.pool == "mean":
        yield (
            "the reference counts the register (and class) tokens in its mean; they must be "
            "left out",
            _knobs(c, pool="mean"),
        )


def layer_scale_count(c: Candidate) -> Iterator[Variant]:
    if not c.config.layer_scale:
        return
    yield "the reference has no LayerScale (the gains are missing)", _knobs(c, layer_scale_power=0)
    yield (
        "the reference applies LayerScale twice (HF's removed FlaxDinov2 did)",
        _knobs(c, layer_scale_power=2),
    )


def map_qkv_order(c: Candidate) -> Iterator[Variant]:
    if c.config.pool != "map":
        return
    names = "qkv"
    for perm in itertools.permutations(range(3)):
        if perm == (0, 1, 2):
            continue
        fixed = {
            f"map.attn.{names[dst]}.{leaf}": c.params[f"map.attn.{names[src]}.{leaf}"]
            for dst, src in enumerate(perm)
            for leaf in ("kernel", "bias")
        }
        order = ", ".join(names[j] for j in perm)
        yield (
            f"the MAP head's q, k, v are permuted (its fused kv or in_proj split in the "
            f"wrong order): the candidate's q, k, v hold the reference's {order}",
            _with(c, **fixed),
        )


def _qkv(c: Candidate, i: int) -> list[list[str]]:
    """Block i's [q, k, v] parameter keys, each [kernel(, bias)]: biases only when all three
    have one (q and v alone, EVA's and BEiT's, are left where they are)."""
    biased = c.config.qkv_bias and c.config.k_bias
    leaves = ["kernel"] + (["bias"] if biased else [])
    return [[f"blocks.{i}.attn.{n}.{leaf}" for leaf in leaves] for n in "qkv"]


def qkv_order(c: Candidate) -> Iterator[Variant]:
    for perm in itertools.permutations(range(3)):
        if perm == (0, 1, 2):
            continue
        for scope, blocks in c.blocks():
            fixed = {}
            for i in blocks:
                keys = _qkv(c, i)
                for dst, src in zip(keys, [keys[j] for j in perm], strict=True):
                    fixed.update({d: c.params[s] for d, s in zip(dst, src, strict=True)})
            order = ", ".join("qkv"[j] for j in perm)
            yield (
                f"q, k and v are permuted{scope}: the candidate's q, k, v hold the "
                f"reference's {order}",
                _with(c, **fixed),
            )


def _regroup(
    c: Candidate, fn: Callable[[np.ndarray], np.ndarray], axis_in: bool, blocks: list[int]
) -> dict:
    """Apply a permutation of the D attention features to q, k, v outputs (and o's inputs)."""
    out = {}
    for i in blocks:
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
    for direction, (scope, blocks) in itertools.product(("interleaved", "contiguous"), c.blocks()):
        fixed = {}
        for i in blocks:
            for leaf_keys in zip(*_qkv(c, i), strict=True):  # (q.x, k.x, v.x) for x in kernel, bias
                fused = np.concatenate(
                    [c.params[k].T if c.params[k].ndim == 2 else c.params[k] for k in leaf_keys],
                    axis=0,
                )  # (3D, ...) rows q|k|v
                rest = fused.shape[1:]
                # interleaved: the rows were per head [q_h k_h v_h]; contiguous: the reverse
                groups = (h, 3) if direction == "interleaved" else (3, h)
                parts = fused.reshape(*groups, hd, *rest).swapaxes(0, 1)
                parts = parts.reshape(3, d, *rest)
                for k, part in zip(leaf_keys, parts, strict=True):
                    fixed[k] = part.T if c.params[k].ndim == 2 else part
        layout = (
            "per head (q, k, v of head 0, then head 1...)"
            if direction == "interleaved"
            else "the other way"
        )
        yield (
            f"the fused qkv rows{scope} were split as contiguous q|k|v thirds but are laid "
            f"out {layout}",
            _with(c, **fixed),
        )


def head_split_order(c: Candidate) -> Iterator[Variant]:
    h, hd = c.config.num_heads, c.config.head_dim
    if h == 1 or hd == 1:
        return
    for (name, split), (scope, blocks) in itertools.product(
        (("(head_dim, heads)", (hd, h)), ("(heads, head_dim)", (h, hd))), c.blocks()
    ):

        def fn(a, split=split):  # regroup the feature axis (axis 0) as split, swapped
            return a.reshape(*split, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape)

        yield (
            f"the attention features{scope} were split into heads as {name} instead of the "
            f"other order: each head mixes features of several heads",
            _with(c, **_regroup(c, fn, True, blocks)),
        )


def attention_scale(c: Candidate) -> Iterator[Variant]:
    r = math.sqrt(c.config.head_dim / c.config.d_model)
    if r == 1:
        return
    for factor, side in ((r, "reference"), (1 / r, "candidate")):
        what = f"1/sqrt(d_model) on the {side} side"
        yield (
            f"attention scores are scaled by {what} instead of 1/sqrt(head_dim)",
            _knobs(c, score_factor=c.knobs.score_factor * factor),
        )


POOL_WORDS = {
    "cls": "reads the class token's row",
    "mean": "averages all tokens",
    "mean_patches": "averages the patch tokens (timm global_pool='avg')",
    "cls_mean": "concatenates the class token's row with the patch mean",
    "map": "pools with its MAP head",
}


def pooling(c: Candidate) -> Iterator[Variant]:
    current = c.knobs.pool or {"mean": "mean_patches"}.get(c.config.pool, c.config.pool)
    options = ["mean", "mean_patches"] + (["cls"] if c.config.class_token else [])
    for pool in options:
        if pool != current:
            yield (
                f"pooling differs: the reference {POOL_WORDS[pool]}, the candidate "
                f"{POOL_WORDS[current]}",
                _knobs(c, pool=pool),
            )


def final_norm_position(c: Candidate) -> Iterator[Variant]:
    current = c.knobs.final_norm or {"pre_pool": "before", "post_pool": "after"}.get(
        c.config.final_norm
    )
    if current is None:
        return  # no final norm to move
    other = "after" if current == "before" else "before"
    yield (
        f"the final norm runs {other} pooling on the reference side (timm fc_norm: after), "
        f"{current} it on the candidate",
        _knobs(c, final_norm=other),
    )


def posembed_cls_slot(c: Candidate) -> Iterator[Variant]:
    if "cls_token" not in c.params or "pos_embed" not in c.params:
        return
    pos = c.params["pos_embed"]
    yield (
        "the CLS position row is at the end of pos_embed instead of the front",
        _with(c, pos_embed=np.roll(pos, 1, axis=0)),
    )
    yield (
        "the CLS position row is at the front of pos_embed but the other side expects it "
        "at the end",
        _with(c, pos_embed=np.roll(pos, -1, axis=0)),
    )
    if c.knobs.cls_position == "row0":
        yield (
            "the reference adds no position to the CLS token (big_vision adds pos_embedding "
            "before the CLS joins)",
            _knobs(c, cls_position="none"),
        )


def posembed_grid_order(c: Candidate) -> Iterator[Variant]:
    hp, wp = c.config.table_grid
    if hp == 1 or wp == 1 or "pos_embed" not in c.params:
        return
    pos = c.params["pos_embed"]
    n = c.config.num_positioned_prefix
    for name, (a, b) in (("column-major", (wp, hp)), ("row-major", (hp, wp))):
        rows = pos[n:].reshape(a, b, -1).transpose(1, 0, 2).reshape(hp * wp, -1)
        yield (
            f"the patch grid's position rows are in {name} order on the candidate",
            _with(c, pos_embed=np.concatenate([pos[:n], rows], axis=0)),
        )


# How a reference may resample positions, as knobs, with whose code does it that way.
RESAMPLING_VARIANTS: tuple[tuple[dict, str], ...] = (
    ({"antialias": True}, "with antialias on (timm's resample_abs_pos_embed, open_clip)"),
    ({"antialias": False}, "with antialias off (transformers' interpolate_pos_encoding)"),
    ({"cubic_a": -0.5}, "bicubic with a = -0.5 (the Keys kernel of PIL and TensorFlow)"),
    ({"cubic_a": -0.75}, "bicubic with a = -0.75 (torch's plain bicubic)"),
    (
        {"align_corners": True, "antialias": False},
        "with align_corners=True and no antialias (corner samples on the corners)",
    ),
    (
        {"interpolation": "dinov2", "antialias": False},
        "with the original DINOv2's +0.1 offset (scale_factor=(n + 0.1) / n)",
    ),
    (
        {"interpolation": "bicubic"},
        "to the exact size, without the original DINOv2's +0.1 offset",
    ),
    ({"interpolation": "bilinear"}, "bilinear, not bicubic"),
    ({"interpolation": "big_vision"}, "as big_vision does (scipy.ndimage.zoom, order 1)"),
)


def resampling_method(c: Candidate) -> Iterator[Variant]:
    """At another grid than the stored table's (a dynamic-size candidate), the reference may
    resample the table otherwise. Variants with the same weights (up to float32 rounding) as
    the candidate's are skipped; variants equal to each other are named together. (A NaFlex
    table is resampled by its config's own method, in every forward: not a knob here.)"""
    if c.grid in (None, c.config.grid) or "pos_embed" not in c.params or c.config.pos_grid:
        return

    def weights(knobs: Knobs) -> list[np.ndarray] | None:
        method = knobs.resampling(c.resampling)
        if method["align_corners"] and method["antialias"]:
            return None  # torch has no antialiased align_corners
        return [
            weights_1d(n_in, n_out, **method)
            for n_in, n_out in zip(c.config.grid, c.grid, strict=True)
        ]

    def same(a, b) -> bool:
        return all(np.max(np.abs(x - y)) < 1e-6 for x, y in zip(a, b, strict=True))

    current = weights(c.knobs)
    found: list[tuple[list[np.ndarray], list[str], Knobs]] = []
    for change, how in RESAMPLING_VARIANTS:
        knobs = dataclasses.replace(c.knobs, **change)
        w = weights(knobs)
        if w is None or same(w, current):
            continue
        twin = next((f for f in found if same(f[0], w)), None)
        if twin:
            twin[1].append(how)
        else:
            found.append((w, [how], knobs))
    for _, hows, knobs in found:
        detail = "; the same weights as ".join(hows)
        yield (
            f"the reference resamples the positions to the {c.grid[0]}x{c.grid[1]} grid "
            f"{detail}, where the candidate uses {_method(c.knobs.resampling(c.resampling))}",
            dataclasses.replace(c, knobs=knobs),
        )


# A NaFlex table's resize, as the libraries that have one do it (timm NaFlexVit's kinds,
# transformers' SigLIP 2): (config fields, how)
NAFLEX_RESIZES: tuple[tuple[dict, str], ...] = (
    (
        dict(pos_interpolation="bicubic", pos_antialias=True, pos_align_corners=False),
        "bicubic with antialias (timm naflexvit_*_gap)",
    ),
    (
        dict(pos_interpolation="bilinear", pos_antialias=True, pos_align_corners=False),
        "bilinear with antialias (transformers SigLIP 2, timm naflexvit_*_siglip)",
    ),
    (
        dict(pos_interpolation="bilinear", pos_antialias=False, pos_align_corners=True),
        "bilinear, corners aligned, no antialias (C-RADIO)",
    ),
    (
        dict(pos_interpolation="bicubic", pos_antialias=False, pos_align_corners=False),
        "bicubic without antialias",
    ),
)


def naflex_resize(c: Candidate) -> Iterator[Variant]:
    """A NaFlex table (its own grid, resized in every forward) resized another way by the
    reference: another method, antialias or corner alignment, or to the longer side's square
    first (timm's pos_embed_ar_preserving). Only where the image's grid is not the table's."""
    cfg = c.config
    if cfg.pos_grid is None or (c.grid or cfg.grid) == cfg.pos_grid:
        return
    own = (cfg.pos_interpolation, cfg.pos_antialias, cfg.pos_align_corners)
    for fields, how in NAFLEX_RESIZES:
        if tuple(fields.values()) != own:
            yield (
                f"the reference resizes its NaFlex table {how}, not "
                f"{cfg.pos_interpolation}{' with antialias' if cfg.pos_antialias else ''}"
                f"{', corners aligned' if cfg.pos_align_corners else ''}",
                _config(c, **fields),
            )
    square = "without" if cfg.pos_square else "after"
    yield (
        f"the reference resizes its NaFlex table {square} first squaring the grid to its longer "
        f"side (timm's pos_embed_ar_preserving)",
        _config(c, pos_square=not cfg.pos_square),
    )


def _method(m: dict) -> str:
    parts = [m["interpolation"], "antialiased" if m["antialias"] else "no antialias"]
    if m["align_corners"]:
        parts.append("align_corners")
    if m["cubic_a"] is not None:
        parts.append(f"a = {m['cubic_a']}")
    return ", ".join(parts)


# RoPE as the published families compute it, for a candidate that rotates nothing
ROPE_FAMILIES = (
    (
        "RoPE-ViT's (interleaved, width first, theta 100)",
        dict(rope="interleaved", rope_axes="wh", rope_theta=100.0),
    ),
    (
        "DINOv3's (half-split, periods base 100)",
        dict(rope="half", rope_freqs="periods", rope_theta=100.0),
    ),
    ("EVA-02's (interleaved, height first, theta 1e4)", dict(rope="interleaved")),
)


def rope_variant(c: Candidate) -> Iterator[Variant]:
    """The ways two RoPE implementations differ (each a one-field change of the candidate's
    config), or RoPE missing on the candidate altogether."""
    cfg = c.config
    if cfg.rope == "none":
        if cfg.head_dim % 4 == 0 and cfg.rel_pos_bias == "none":
            for name, fields in ROPE_FAMILIES:
                yield f"the reference rotates q and k with {name} RoPE", _config(c, **fields)
        return
    other = {"interleaved": "half", "half": "interleaved"}[cfg.rope]
    yield (
        f"the reference pairs RoPE channels {other} "
        f"({'(j, j + head_dim/2)' if other == 'half' else '(2m, 2m+1)'}), not {cfg.rope}",
        _config(c, rope=other),
    )
    axes = {"hw": "wh", "wh": "hw"}[cfg.rope_axes]
    yield (
        f"the reference puts the {'width' if axes == 'wh' else 'height'}'s RoPE angles first "
        f"(height and width swapped; visible on non-square grids only)",
        _config(c, rope_axes=axes),
    )
    if cfg.rope_freqs == "mixed":  # learned frequencies: nothing else to vary
        pass
    elif cfg.rope_freqs == "theta":
        for theta in (100.0, 10000.0):
            if theta != cfg.rope_theta:
                yield f"the reference's RoPE theta is {theta:g}", _config(c, rope_theta=theta)
        yield (
            "the reference uses DINOv3's periods on centred coordinates, not theta-style "
            "frequencies on integer positions",
            _config(c, rope_freqs="periods", rope_theta=100.0, rope_offset=0.0),
        )
        offset = 1.0 if cfg.rope_offset == 0 else 0.0
        yield f"the reference's RoPE positions start at {offset:g}", _config(c, rope_offset=offset)
        if cfg.rope_ref_grid is not None:
            yield (
                "the reference does not rescale RoPE positions to a reference grid",
                _config(c, rope_ref_grid=None),
            )
    else:
        yield (
            "the reference uses theta-style frequencies (1e4) on integer positions, not "
            "DINOv3's periods",
            _config(c, rope_freqs="theta", rope_theta=10000.0, rope_periods=None),
        )
        for coords in ("separate", "min", "max"):
            if coords != cfg.rope_coords:
                yield (
                    f"the reference normalises RoPE coordinates by {coords} side(s)",
                    _config(c, rope_coords=coords),
                )
    yield "the reference has no RoPE (a learned table alone)", _config(c, rope="none")


def rope_prefix(c: Candidate) -> Iterator[Variant]:
    """RoPE laid on the tokens from the first one (a port that forgot the prefix tokens: they
    take the first patches' angles, the last patches none)."""
    if c.config.rope != "none" and c.config.num_prefix_tokens:
        yield (
            "the reference rotates from the first token: its prefix tokens take the first "
            "patches' RoPE angles and its last patches none (the prefix offset forgotten)",
            _knobs(c, rope_from_first_token=True),
        )


def rope_table_precision(c: Candidate) -> Iterator[Variant]:
    """RoPE frequencies from periods held in bfloat16 (DINOv3's released `periods` buffer).
    Tables merely built in float32 (timm, HF) are a float32 island, named as such."""
    if c.config.rope != "none":
        yield (
            "the reference's RoPE periods are bfloat16 (DINOv3's released `periods` buffer "
            "is reported to be): its angles are off by up to 0.4% of each frequency",
            _knobs(c, rope_periods_dtype="bfloat16"),
        )


def relative_bias_index(c: Candidate) -> Iterator[Variant]:
    """A relative bias table read another way: query and key swapped, or the class token's
    three slots (as query, as key, with itself) in another order."""
    if c.config.rel_pos_bias == "none":
        return
    yield (
        "the reference reads its relative bias table with query and key swapped (the "
        "index transposed)",
        _knobs(c, rel_transposed=True),
    )
    roles = ("as query", "as key", "with itself")
    for slots in itertools.permutations(range(3)):
        if slots != c.knobs.rel_class_slots:
            order = ", ".join(f"{roles[i]} at R-{3 - slots[i]}" for i in range(3))
            yield (
                f"the reference keeps the class token's relative bias slots in another order "
                f"({order}; the offsets' count R-3 first)",
                _knobs(c, rel_class_slots=slots),
            )


def block_norm_placement(c: Candidate) -> Iterator[Variant]:
    """Pre-norm vs post-norm residual blocks (the same parameters either way)."""
    if not c.config.num_layers:
        return
    if c.config.block == "pre_norm":
        yield (
            "the reference's blocks are post-norm: each norm on its branch's output "
            "(x + norm(attn(x)); timm ResPostBlock, EVA use_post_norm)",
            _config(c, block="post_norm"),
        )
    else:
        yield (
            "the reference's blocks are pre-norm: each norm on its branch's input "
            "(x + attn(norm(x)))",
            _config(c, block="pre_norm"),
        )


def inner_norms(c: Candidate) -> Iterator[Variant]:
    """A norm the candidate has inside its branches and the reference lacks (EVA-02's
    sub-LN): on the MLP's hidden units, or on the attention output before its projection.
    The other way round cannot be replayed: the reference's gains are not the candidate's."""
    if c.config.mlp_norm:
        yield (
            "the reference has no norm on the MLP's hidden units (the candidate has EVA-02's "
            "sub-LN there)",
            _config(c, mlp_norm=False),
        )
    if c.config.attn_norm:
        yield (
            "the reference has no norm on the attention output before its projection (the "
            "candidate has EVA-02's sub-LN there)",
            _config(c, attn_norm=False),
        )


HYPOTHESES: dict[str, Callable[[Candidate], Iterator[Variant]]] = {
    f.__name__: f
    for f in (
        conv_kernel_spatial_swap,
        conv_kernel_in_out_swap,
        linear_not_transposed,
        input_layout,
        ln_eps,
        block_ln_eps,
        activation_variant,
        qkv_order,
        qkv_interleaved,
        head_split_order,
        attention_scale,
        pooling,
        final_norm_position,
        posembed_cls_slot,
        posembed_grid_order,
        resampling_method,
        naflex_resize,
        rope_variant,
        rope_prefix,
        rope_table_precision,
        relative_bias_index,
        block_norm_placement,
        inner_norms,
        norm_pre_presence,
        registers,
        layer_scale_count,
        map_qkv_order,
    )
}


# ---- the search ---------------------------------------------------------------------------------


def candidate_of(model) -> Candidate:
    """One of our models as the doctor's candidate: flat NNX params for the float64 replay.

    Float32 kernels stay float32, as the model holds them (no copy: 99% of the weights):
    they only ever meet float64 activations in a matmul, which casts them exactly, so the
    replay is the same float64 computation. Everything else (norms, biases, tokens,
    positions, the MAP probe, which start float64 paths of their own) is cast to float64."""
    from weight_transfer.frameworks.bridge import nnx_params

    flat = nnx_params(model)  # TypeError for anything but ours
    kinds = {k: p.kind for k, p in arch.parameters(model.config).items()}
    return Candidate(
        model.config,
        {
            k: v
            if kinds[k] in ("kernel", "conv") and v.dtype == np.float32
            else v.astype(np.float64)
            for k, v in flat.items()
        },
        resampling=model if model.dynamic_image_size else None,
    )


def _score(
    ref: dict, cand: Candidate, images: np.ndarray, order: list[str], base: Base | None = None
) -> tuple[int, float]:
    """(index of the first divergent layer, len(order) if none; that layer's relative gap).
    The replay stops at the first divergence: no hypothesis pays for the layers after it. A
    correction of weights in block i and later only (against `base`) starts from the base's
    input to block i: the layers before it are the base's, already scored."""
    position = {name: i for i, name in enumerate(order)}
    start = base.resume_point(cand) if base is not None else None
    if start is not None and position.get(f"blocks.{start}.attn", 0) > base.score[0]:
        return base.score  # the base already diverges before anything this changes
    resume = (start, base.inputs[start]) if start is not None else None
    first = position.get(f"blocks.{start}.attn", 0) if start is not None else 0
    compared: set[str] = set()

    def skipped_before(p: int) -> tuple[int, float] | None:
        """A reference layer before `p` the variant never produced (a correction that only
        hides a layer, such as moving a norm past a class-token pooling, earns nothing)."""
        for name in order[first:p]:
            if name in ref and name not in compared:
                return position[name], math.inf
        return None

    try:
        for name, b in trace(cand.params, images, cand.config, cand.knobs, resume, cand.resampling):
            if name not in ref or name not in position:
                continue
            compared.add(name)
            a = ref[name]
            if a.shape != b.shape:
                return skipped_before(position[name]) or (position[name], math.inf)
            gap = float(np.max(np.abs(a - b))) / max(1.0, float(np.max(np.abs(a))))
            if gap > DIVERGENCE:
                return skipped_before(position[name]) or (position[name], gap)
    except (ValueError, KeyError, IndexError):  # a correction that does not fit this model
        return -1, math.inf
    return skipped_before(len(order)) or (len(order), 0.0)


@dataclass
class Base:
    """The candidate the search stands on: its score and each block's input in its replay."""

    cand: Candidate
    score: tuple[int, float]
    inputs: dict[int, np.ndarray]

    @classmethod
    def of(
        cls, cand: Candidate, score: tuple[int, float], images: np.ndarray, order: list[str]
    ) -> Base:
        """Replays `cand` up to its first divergence (no further: a correction to a later
        block cannot move it) keeping each block's input."""
        inputs, last = {}, None
        stop = order[score[0]] if 0 <= score[0] < len(order) else None
        try:
            for name, x in trace(
                cand.params, images, cand.config, cand.knobs, resampling=cand.resampling
            ):
                if name.endswith(".attn") and (block := BLOCK.match(name)):
                    inputs[int(block[1])] = last
                if not name.endswith((".attn", ".mlp")):
                    last = x  # the residual stream: tokens, norm_pre, each block's output
                if name == stop:
                    break
        except (ValueError, KeyError, IndexError):
            inputs = {}
        return cls(cand, score, inputs)

    def resume_point(self, variant: Candidate) -> int | None:
        """The first block whose weights `variant` changes, if it changes nothing else."""
        c = self.cand
        if (
            variant.config != c.config
            or variant.knobs != c.knobs
            or variant.params.keys() != c.params.keys()
        ):
            return None
        changed = [k for k, v in variant.params.items() if v is not c.params[k]]
        blocks = [BLOCK.match(k) for k in changed]
        if not changed or not all(blocks):
            return None
        first = min(int(m[1]) for m in blocks)
        return first if first in self.inputs else None


def _focus(name: str) -> int | None:
    match = BLOCK.match(name + ".")
    return int(match[1]) if match else None


def diagnose(
    reference,
    candidate,
    images: np.ndarray,
    *,
    max_faults: int = 3,
    candidate_knobs: Knobs = Knobs(),  # noqa: B008 (frozen: one shared default is safe)
) -> Diagnosis:
    """Name what makes `candidate` (one of ours) compute differently from `reference` (any
    model `compare` accepts, or a `Side`, such as `adapters.recorded`'s) on NHWC `images`; see
    the module docstring."""
    from weight_transfer.diagnostics.adapters import side
    from weight_transfer.frameworks.bridge import require_ours
    from weight_transfer.frameworks.runners import exact_matmuls, logits_of

    require_ours(candidate)  # before any work: only ours can be replayed
    images = np.asarray(images, np.float64)
    ref_side, cand_side = side(reference), side(candidate)
    order = ref_side.names + [n for n in cand_side.names if n not in ref_side.names]
    check = candidate_knobs == Knobs()  # the replay must be the candidate, or nothing holds
    with exact_matmuls():
        ref = ref_side.run(images, True)
        # the candidate's own logits, in its own dtype (no float64 copy of it: memory on large
        # models); any structural difference is orders of magnitude above float32's rounding
        own = logits_of(candidate, images, jit=False) if check else None
    grid = tuple(n // candidate.config.patch_size for n in images.shape[1:3])
    cand = dataclasses.replace(candidate_of(candidate), knobs=candidate_knobs, grid=grid)
    if check:
        replay = forward(cand.params, images, cand.config, resampling=cand.resampling)["logits"]
        if np.max(np.abs(own - replay)) > REPLAY_CHECK * max(1.0, np.max(np.abs(own))):
            raise RuntimeError("the NumPy replay of the candidate disagrees with the candidate")
    score = _score(ref, cand, images, order)
    first = order[score[0]] if score[0] < len(order) else None
    diagnosis = Diagnosis(first)
    for _ in range(max_faults):
        if score[0] == len(order):
            break
        cand = dataclasses.replace(cand, focus=_focus(order[score[0]]))
        base = Base.of(cand, score, images, order)
        rank = lambda s: (s[0], -s[1])  # (later divergence, then smaller gap)
        best = None
        for hid, hypothesis in HYPOTHESES.items():
            for detail, variant in hypothesis(cand):
                s = _score(ref, variant, images, order, base)
                if rank(s) > rank(score) and (best is None or rank(s) > rank(best[0])):
                    best = (s, hid, detail, variant)
        if best is None or (best[0][0] == score[0] and best[0][1] > 0.5 * score[1]):
            break  # nothing moves the divergence or clearly shrinks it
        score, hid, detail, cand = best
        diagnosis.findings.append(Finding(hid, detail))
    diagnosis.fixed = score[0] == len(order)
    diagnosis.remaining = None if diagnosis.fixed else order[score[0]]
    if not diagnosis.fixed and score[0] >= 0:
        diagnosis.findings += signatures(
            ref,
            forward(cand.params, images, cand.config, cand.knobs, cand.resampling),
            order,
            order[score[0]],
        )
    return diagnosis


FLOAT32_RESOLUTION = 1e-5  # relative gaps below this, in float64, are float32 rounding


def signatures(ref: dict, out: dict, order: list[str], layer: str) -> list[Finding]:
    """What a gap no correction closes still says: agreement that stalls at float32's
    resolution in float64 (a float32 island in the reference), or two outputs in a constant
    ratio (a missing or extra scaling)."""
    gaps = [
        float(np.max(np.abs(ref[n] - out[n]))) / max(1.0, float(np.max(np.abs(ref[n]))))
        for n in order
        if n in ref and n in out and ref[n].shape == out[n].shape
    ]
    if gaps and max(gaps) < FLOAT32_RESOLUTION:
        return [
            Finding(
                "float32_island",
                f"the two agree only to {max(gaps):.1e} relative in "
                f"float64, float32's resolution: part of the reference runs in float32 "
                f"even in float64 (HF eager attention's softmax, float32 position "
                f"resampling, OpenAI CLIP's LayerNorm); not a fault of the port",
            )
        ]
    a, b = ref.get(layer), out.get(layer)
    if a is None or b is None or a.shape != b.shape:
        return []
    big = np.abs(b) > 1e-6 * np.max(np.abs(b))
    ratio = a[big] / b[big]
    if ratio.size and abs(ratio.mean() - 1) > 1e-6 and ratio.std() <= 1e-6 * abs(ratio.mean()):
        return [
            Finding(
                "constant_ratio",
                f"the reference's {layer} is {ratio.mean():.6g} x the "
                f"candidate's, everywhere: a missing or extra scaling (a normalisation, "
                f"a scale factor) before this point",
            )
        ]
    return []
