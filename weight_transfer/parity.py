"""Parity between the two implementations: random weights, the same images, both directions.

Tolerances are relative to the logits' scale: `|a - b|max <= tol * max(1, |a|max)`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass

import jax
import ml_dtypes
import numpy as np
import torch
from flax import nnx

import jax_impl
import torch_impl
from vit_config import ArgumentError, ViTConfig
from weight_transfer.bridge import (
    nchw_to_nhwc,
    nhwc_to_nchw,
    nnx_astype,
    nnx_flat,
    nnx_from_flat,
    nnx_shapes,
    numpy_to_torch,
    to_nnx,
    to_torch,
    torch_from_state_dict,
    torch_shapes,
    torch_to_numpy,
)

# float32: a few ulps of accumulated rounding per layer at ViT-S width (HF's PT<->Flax tests use
# 1e-5 absolute on tiny models); float64: the same rounding at 2**-52 instead of 2**-23.
TOLERANCE = {"float32": 1e-5, "float64": 1e-12, "bfloat16": 5e-2}
NUMPY_DTYPES = {"float32": np.float32, "float64": np.float64, "bfloat16": ml_dtypes.bfloat16}


def random_flat(shapes: Mapping[str, tuple[int, ...]], seed: int, dtype: str = "float32"
                ) -> dict[str, np.ndarray]:
    """Random values for every parameter (no zeros, no ones): N(0, 1/fan_in) for matrices and
    kernels (fan_in read as the size over the largest axis, layout-agnostic), N(0, 0.5) otherwise.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for key in sorted(shapes):
        shape = shapes[key]
        size = int(np.prod(shape))
        std = 0.5 if len(shape) < 2 or key.endswith(("pos_embed", "cls_token")) \
            else (size // max(shape)) ** -0.5
        out[key] = (rng.standard_normal(shape) * std).astype(NUMPY_DTYPES[dtype])
    return out


def random_nnx(config: ViTConfig, seed: int = 0, dtype: str = "float32") -> jax_impl.ViT:
    """A `jax_impl.ViT` with every parameter drawn at random in its own (NNX) layout."""
    return nnx_from_flat(random_flat(nnx_shapes(config), seed, dtype), config)


def random_torch(config: ViTConfig, seed: int = 0, dtype: str = "float32") -> torch_impl.ViT:
    """A `torch_impl.ViT` with every parameter drawn at random in its own (torch) layout."""
    flat = random_flat(torch_shapes(config), seed, dtype)
    return torch_from_state_dict({k: numpy_to_torch(v) for k, v in flat.items()}, config)


def random_images(config: ViTConfig, batch: int, seed: int = 0, dtype: str = "float32"
                  ) -> np.ndarray:
    """A float NHWC batch `(batch, H, W, C)` of N(0, 1) pixels."""
    h, w = config.image_hw
    rng = np.random.default_rng(seed + 10_000)
    return rng.standard_normal((batch, h, w, config.in_channels)).astype(NUMPY_DTYPES[dtype])


@contextlib.contextmanager
def exact_matmuls() -> Iterator[None]:
    """JAX matmuls at full precision and torch TF32 off, for the duration of a comparison."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with jax.default_matmul_precision("highest"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@functools.partial(nnx.jit, static_argnames="return_intermediates")
def run_nnx(model: jax_impl.ViT, images_nhwc, return_intermediates: bool = False):
    """The model under `nnx.jit` (one compile per shape, instead of one per eager op)."""
    return model(images_nhwc, return_intermediates=return_intermediates)


def run_torch(model: torch_impl.ViT, images_nhwc: np.ndarray, **kw):
    with torch.no_grad():
        return model(numpy_to_torch(nhwc_to_nchw(images_nhwc)), **kw)


def to_numpy(x) -> np.ndarray:
    return torch_to_numpy(x) if isinstance(x, torch.Tensor) else np.asarray(x)


def max_error(a, b) -> tuple[float, float]:
    """(max |a - b|, max(1, max |a|)), in float64."""
    a, b = to_numpy(a).astype(np.float64), to_numpy(b).astype(np.float64)
    return float(np.max(np.abs(a - b))), float(max(1.0, np.max(np.abs(a))))


@dataclass
class DirectionResult:
    direction: str  # "nnx->torch" or "torch->nnx"
    dtype: str
    max_abs_error: float
    logit_scale: float
    tolerance: float

    @property
    def bound(self) -> float:
        return self.tolerance * self.logit_scale

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.max_abs_error)) and self.max_abs_error <= self.bound

    def as_dict(self) -> dict:
        return {**asdict(self), "bound": self.bound, "passed": self.passed}


def x64_for(dtype: str):
    """`jax.enable_x64(True)` for float64 work, nothing otherwise: x64 never leaks."""
    return jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()


def check_direction(config: ViTConfig, direction: str, dtype: str = "float32", *, seed: int = 0,
                    batch: int = 2) -> DirectionResult:
    """Random weights on the source side, ported, and the same images through both."""
    with x64_for(dtype), exact_matmuls():
        images = random_images(config, batch, seed, dtype)
        if direction == "nnx->torch":
            source = random_nnx(config, seed, dtype)
            ref, out = run_nnx(source, images), run_torch(to_torch(source), images)
        elif direction == "torch->nnx":
            source = random_torch(config, seed, dtype)
            ref, out = run_torch(source, images), run_nnx(to_nnx(source), images)
        else:
            raise ArgumentError(f"direction {direction!r}: expected 'nnx->torch' or 'torch->nnx'")
        err, scale = max_error(ref, out)
    return DirectionResult(direction, dtype, err, scale, TOLERANCE[dtype])


def check_models(nnx_model: jax_impl.ViT, torch_model: torch_impl.ViT, *, seed: int = 0,
                 batch: int = 2) -> DirectionResult:
    """The same random images through two loaded models (e.g. one checkpoint in both)."""
    dtype = str(np.dtype(nnx_model.dtype))
    with x64_for(dtype), exact_matmuls():
        images = random_images(nnx_model.config, batch, seed, dtype)
        err, scale = max_error(run_torch(torch_model, images), run_nnx(nnx_model, images))
    return DirectionResult("torch vs nnx", dtype, err, scale, TOLERANCE[dtype])


def check(config: ViTConfig, dtypes=("float32", "float64"), *, seed: int = 0, batch: int = 2
          ) -> list[DirectionResult]:
    return [check_direction(config, d, dt, seed=seed, batch=batch)
            for dt in dtypes for d in ("nnx->torch", "torch->nnx")]


# ---- gradients ------------------------------------------------------------------------------------


def nnx_grads(model: jax_impl.ViT, images_nhwc, labels) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """d(mean cross-entropy)/d(every parameter) as `{nnx path: array}`, and d/d(images) (NHWC)."""
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params, images):
        logits = nnx.merge(graphdef, params)(images)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jax.numpy.take_along_axis(logp, labels[:, None], axis=-1).mean()

    images = jax.numpy.asarray(images_nhwc, model.dtype)
    g_params, g_images = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, images)
    return nnx_flat(g_params), np.asarray(g_images)


def torch_grads(model: torch_impl.ViT, images_nhwc, labels
                ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The same for torch: `{state-dict key: array}` (torch layout) and d/d(images) in NHWC."""
    images = numpy_to_torch(nhwc_to_nchw(np.asarray(images_nhwc))).to(model.dtype)
    images.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(images), torch.as_tensor(np.asarray(labels)))
    loss.backward()
    grads = {k: torch_to_numpy(p.grad) for k, p in model.named_parameters()}
    return grads, nchw_to_nhwc(torch_to_numpy(images.grad))


def relative_error(ref, out) -> float:
    """max |ref - out| / max |ref| (absolute where ref is all zeros), in float64."""
    ref, out = to_numpy(ref).astype(np.float64), to_numpy(out).astype(np.float64)
    return float(np.abs(ref - out).max() / (np.abs(ref).max() or 1.0))


# ---- the layer diff -------------------------------------------------------------------------------

# A layer diverges when the float32 gap between the two sides exceeds this many times the sum of
# their own float32 errors (each side against itself in float64), plus a few float32 ulps.
FLOOR_FACTOR = 8.0
EPS32 = 2.0**-23
GAP64_BOUND = 1e-9


@dataclass
class LayerGap:
    name: str
    max_abs: float  # max |ref - cand| in float32
    max_rel: float  # max_abs / max |ref|
    noise_floor: float  # max |side32 - side64| summed over both sides: rounding alone
    gap64: float  # max |ref - cand| with both sides in float64
    divergent: bool
    note: str = ""


@dataclass
class DiffReport:
    reference: str
    candidate: str
    layers: list[LayerGap]
    first_divergence: str | None
    settings: dict

    @property
    def passed(self) -> bool:
        return self.first_divergence is None

    def as_dict(self) -> dict:
        return {"reference": self.reference, "candidate": self.candidate,
                "passed": self.passed, "first_divergence": self.first_divergence,
                "settings": self.settings, "layers": [asdict(layer) for layer in self.layers]}


def is_divergent(gap: float, floor: float, gap64: float, scale: float, unit: float) -> bool:
    """float32 beyond its own rounding, or float64 (rounding ~1e-15) beyond 1e-9 of `unit` (the
    magnitude the values are judged at): a change smaller than float32 resolves (an epsilon of
    1e-5 vs 1e-6) still shows in float64."""
    return not (gap <= FLOOR_FACTOR * floor + 4 * EPS32 * max(scale, 1e-30)
                and gap64 <= GAP64_BOUND * unit)


def _gap(a: np.ndarray | None, b: np.ndarray | None) -> float:
    if a is None or b is None or a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def compare(reference, candidate, images: np.ndarray) -> DiffReport:
    """Every named intermediate of two models on the same NHWC images: float32 gap, the noise
    floor measured by rerunning each side in float64, and the first layer that diverges.

    Either side may be a `jax_impl.ViT`, a `torch_impl.ViT`, a timm `VisionTransformer` or an HF
    `ViTForImageClassification` (hooked). JAX matmuls run at "highest" precision and torch TF32
    is off for the duration.
    """
    from weight_transfer.adapters import layer_order, side

    ref, cand = side(reference), side(candidate)
    images = np.asarray(images, np.float32)
    with exact_matmuls():
        r32, r64 = ref.run(images, False), ref.run(images, True)
        c32, c64 = cand.run(images, False), cand.run(images, True)
    layers, first = [], None
    for name in layer_order(max(ref.num_layers, cand.num_layers)):
        if name not in r32 or name not in c32:
            missing = "reference" if name not in r32 else "candidate"
            layers.append(LayerGap(name, float("nan"), float("nan"), float("nan"), float("nan"),
                                   False, f"not captured on the {missing} side"))
            continue
        gap, gap64 = _gap(r32[name], c32[name]), _gap(r64[name], c64[name])
        floor = _gap(r32[name], r64[name]) + _gap(c32[name], c64[name])
        scale = float(np.max(np.abs(r64[name]))) if r64[name].size else 0.0
        note = "" if r32[name].shape == c32[name].shape else \
            f"shapes differ: {r32[name].shape} vs {c32[name].shape}"
        divergent = is_divergent(gap, floor, gap64, scale, max(scale, 1.0))
        layers.append(LayerGap(name, gap, gap / scale if scale else gap, floor, gap64,
                               divergent, note))
        if divergent and first is None:
            first = name
    settings = {"jax_default_matmul_precision": "highest", "torch_allow_tf32": False,
                "floor_factor": FLOOR_FACTOR, "images": list(images.shape)}
    return DiffReport(ref.name, cand.name, layers, first, settings)


def compare_grads(nnx_model: jax_impl.ViT, torch_model: torch_impl.ViT, images: np.ndarray,
                  labels: np.ndarray) -> list[LayerGap]:
    """d(cross-entropy)/d(every parameter) and d/d(images), torch's mapped through the table,
    with the same noise-floor rule as `compare` (each side's float32 against its float64)."""
    import copy

    images = np.asarray(images, np.float32)
    labels = np.asarray(labels)
    config = nnx_model.config
    with exact_matmuls():
        j32, jx32 = nnx_grads(nnx_model, images, labels)
        t32, tx32 = torch_grads(torch_model, images, labels)
        with jax.enable_x64(True):
            j64, jx64 = nnx_grads(nnx_astype(nnx_model, np.float64), images.astype(np.float64),
                                  labels)
        t64, tx64 = torch_grads(copy.deepcopy(torch_model).double(), images.astype(np.float64), labels)
    from weight_transfer.bridge import torch_to_nnx_flat

    t32, t64 = torch_to_nnx_flat(t32, config), torch_to_nnx_flat(t64, config)
    j32, j64, t32, t64 = ({**g, "images": x} for g, x in
                          ((j32, jx32), (j64, jx64), (t32, tx32), (t64, tx64)))
    # Judged relative to each tensor's own scale, but never below 1e-6 of the largest gradient:
    # some gradients are exactly zero in exact arithmetic (the key bias: softmax is
    # shift-invariant) and hold only rounding noise on both sides.
    overall = max(float(np.max(np.abs(g))) for g in j64.values())
    rows = []
    for key in sorted(j32):
        a32, a64 = j32[key].astype(np.float64), j64[key]
        b32, b64 = t32[key].astype(np.float64), t64[key]
        gap, gap64 = _gap(a32, b32), _gap(a64, b64)
        floor = _gap(a32, a64) + _gap(b32, b64)
        scale = float(np.max(np.abs(a64)))
        rows.append(LayerGap(key, gap, gap / scale if scale else gap, floor, gap64,
                             is_divergent(gap, floor, gap64, scale, max(scale, 1e-6 * overall))))
    return rows
