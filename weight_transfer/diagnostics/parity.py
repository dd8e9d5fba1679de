"""Parity between the two implementations: logits in both directions (random weights, the
same images), every named intermediate against a measured noise floor (`compare`), and the
gradients of every parameter (`compare_grads`). Tolerances and error measures live in
`weight_transfer.diagnostics.metrics`; logits are judged relative to their scale:
`|a - b|max <= tol * max(1, |a|max)`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import jax
import numpy as np
import torch
from flax import nnx

import jax_impl
import torch_impl
from vit_config import ArgumentError, ViTConfig
from weight_transfer.diagnostics.adapters import side
from weight_transfer.diagnostics.metrics import (
    FLOOR_FACTOR,
    TOLERANCE,
    LayerGap,
    layer_gap,
    magnitude,
    max_error,
)
from weight_transfer.frameworks.bridge import (
    nchw_to_nhwc,
    nhwc_to_nchw,
    nnx_astype,
    nnx_flat,
    numpy_to_torch,
    to_nnx,
    to_torch,
    torch_to_nnx_flat,
    torch_to_numpy,
)
from weight_transfer.frameworks.runners import (
    exact_matmuls,
    random_images,
    run_nnx,
    run_torch,
    x64_for,
)
from weight_transfer.frameworks.torch_bridge import torch_astype
from weight_transfer.frameworks.weights import random_nnx, random_torch


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


def check_direction(
    config: ViTConfig, direction: str, dtype: str = "float32", *, seed: int = 0, batch: int = 2
) -> DirectionResult:
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


def check_models(
    nnx_model: jax_impl.ViT, torch_model: torch_impl.ViT, *, seed: int = 0, batch: int = 2
) -> DirectionResult:
    """The same random images through two loaded models (e.g. one checkpoint in both)."""
    dtype = str(np.dtype(nnx_model.dtype))
    with x64_for(dtype), exact_matmuls():
        images = random_images(nnx_model.config, batch, seed, dtype)
        err, scale = max_error(run_torch(torch_model, images), run_nnx(nnx_model, images))
    return DirectionResult("torch vs nnx", dtype, err, scale, TOLERANCE[dtype])


def check(
    config: ViTConfig, dtypes=("float32", "float64"), *, seed: int = 0, batch: int = 2
) -> list[DirectionResult]:
    return [
        check_direction(config, d, dt, seed=seed, batch=batch)
        for dt in dtypes
        for d in ("nnx->torch", "torch->nnx")
    ]


# ---- gradients -----------------------------------------------------------------------------------


def nnx_grads(
    model: jax_impl.ViT, images_nhwc, labels, grids=None
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """d(mean cross-entropy)/d(every parameter) as `{nnx path: array}`, and d/d(images) (NHWC).
    With `grids`, `images_nhwc` is a padded batch of patches (`ViT.forward_patches`) and the
    second result d/d(patches)."""
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params, images):
        model = nnx.merge(graphdef, params)
        logits = model(images) if grids is None else model.forward_patches(images, grids)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jax.numpy.take_along_axis(logp, labels[:, None], axis=-1).mean()

    images = jax.numpy.asarray(images_nhwc, model.dtype)
    g_params, g_images = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, images)
    return nnx_flat(g_params), np.asarray(g_images)


def torch_grads(
    model: torch_impl.ViT, images_nhwc, labels, grids=None
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The same for torch: `{state-dict key: array}` (torch layout) and d/d(images) in NHWC
    (or d/d(patches), with `grids`)."""
    images = np.asarray(images_nhwc)
    images = numpy_to_torch(images if grids else nhwc_to_nchw(images)).to(model.dtype)
    images.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    logits = model(images) if grids is None else model.forward_patches(images, grids)
    loss = torch.nn.functional.cross_entropy(logits, torch.as_tensor(np.asarray(labels)))
    loss.backward()
    grads = {k: torch_to_numpy(p.grad) for k, p in model.named_parameters()}
    seen = torch_to_numpy(images.grad)
    return grads, seen if grids else nchw_to_nhwc(seen)


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
        return {
            "reference": self.reference,
            "candidate": self.candidate,
            "passed": self.passed,
            "first_divergence": self.first_divergence,
            "settings": self.settings,
            "layers": [asdict(layer) for layer in self.layers],
        }


def compare(reference, candidate, images: np.ndarray) -> DiffReport:
    """Every named intermediate of two models on the same NHWC images: float32 gap, the noise
    floor measured by rerunning each side in float64, and the first layer that diverges.

    Either side may be a `jax_impl.ViT`, a `torch_impl.ViT`, a timm `VisionTransformer` or an HF
    `ViTForImageClassification` (hooked). JAX matmuls run at "highest" precision and torch TF32
    is off for the duration.
    """
    ref, cand = side(reference), side(candidate)
    images = np.asarray(images, np.float32)
    with exact_matmuls():
        r32, r64 = ref.run(images, False), ref.run(images, True)
        c32, c64 = cand.run(images, False), cand.run(images, True)
    layers, first = [], None
    for name in ref.names + [n for n in cand.names if n not in ref.names]:
        if name not in r32 or name not in c32:
            missing = "reference" if name not in r32 else "candidate"
            layers.append(
                LayerGap(
                    name,
                    float("nan"),
                    float("nan"),
                    float("nan"),
                    float("nan"),
                    False,
                    f"not captured on the {missing} side",
                )
            )
            continue
        layers.append(layer_gap(name, r32[name], r64[name], c32[name], c64[name]))
        if layers[-1].divergent and first is None:
            first = name
    settings = {
        "jax_default_matmul_precision": "highest",
        "torch_allow_tf32": False,
        "floor_factor": FLOOR_FACTOR,
        "images": list(images.shape),
    }
    return DiffReport(ref.name, cand.name, layers, first, settings)


def compare_grads(
    nnx_model: jax_impl.ViT, torch_model: torch_impl.ViT, images: np.ndarray, labels: np.ndarray
) -> list[LayerGap]:
    """d(cross-entropy)/d(every parameter) and d/d(images), torch's mapped through the table,
    with the same noise-floor rule as `compare` (each side's float32 against its float64)."""
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels)
    config = nnx_model.config
    with exact_matmuls():
        j32, jx32 = nnx_grads(nnx_model, images, labels)
        t32, tx32 = torch_grads(torch_model, images, labels)
        with jax.enable_x64(True):
            j64, jx64 = nnx_grads(
                nnx_astype(nnx_model, np.float64), images.astype(np.float64), labels
            )
        t64, tx64 = torch_grads(
            torch_astype(torch_model, torch.float64), images.astype(np.float64), labels
        )
    t32, t64 = torch_to_nnx_flat(t32, config), torch_to_nnx_flat(t64, config)
    j32, j64, t32, t64 = (
        {**g, "images": x} for g, x in ((j32, jx32), (j64, jx64), (t32, tx32), (t64, tx64))
    )
    # Judged relative to each tensor's own scale, but never below 1e-6 of the largest gradient:
    # some gradients are exactly zero in exact arithmetic (the key bias: softmax is
    # shift-invariant) and hold only rounding noise on both sides.
    overall = max(magnitude(g) for g in j64.values())
    return [
        layer_gap(key, j32[key], j64[key], t32[key], t64[key], min_unit=1e-6 * overall)
        for key in sorted(j32)
    ]
