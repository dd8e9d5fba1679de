"""Running our two models the way every comparison runs them: the same NHWC images, exact
matmuls, float64 only inside `jax.enable_x64`."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import jax
import ml_dtypes
import numpy as np
import torch
from flax import nnx

import jax_impl
import torch_impl
from vit_config import ViTConfig
from weight_transfer.frameworks.bridge import nhwc_to_nchw, numpy_to_torch, torch_to_numpy

NUMPY_DTYPES = {"float32": np.float32, "float64": np.float64, "bfloat16": ml_dtypes.bfloat16}


def random_images(
    config: ViTConfig, batch: int, seed: int = 0, dtype: str = "float32"
) -> np.ndarray:
    """A float NHWC batch `(batch, H, W, C)` of N(0, 1) pixels."""
    h, w = config.image_hw
    rng = np.random.default_rng(seed + 10_000)
    return rng.standard_normal((batch, h, w, config.in_channels)).astype(NUMPY_DTYPES[dtype])


def _tf32_switches() -> dict[str, tuple[object, str, object]]:
    """{torch.backends path: (object, attribute, value meaning full float32)} for each TF32
    switch: torch
    >= 2.9's `fp32_precision` ("ieee") where it exists, else the legacy `allow_tf32` flags. A
    legacy flag is never read where the new API exists: torch raises once a caller has set
    the new one (as training scripts and newer transformers do)."""
    b = torch.backends
    if hasattr(b.cuda.matmul, "fp32_precision"):
        return {
            "cuda.matmul.fp32_precision": (b.cuda.matmul, "fp32_precision", "ieee"),
            "cudnn.conv.fp32_precision": (b.cudnn.conv, "fp32_precision", "ieee"),
        }
    return {
        "cuda.matmul.allow_tf32": (b.cuda.matmul, "allow_tf32", False),
        "cudnn.allow_tf32": (b.cudnn, "allow_tf32", False),
    }


@contextlib.contextmanager
def exact_matmuls() -> Iterator[None]:
    """JAX matmuls at full precision and torch TF32 off, for the duration of a comparison."""
    switches = _tf32_switches().values()
    old = [getattr(obj, name) for obj, name, _ in switches]
    for obj, name, exact in switches:
        setattr(obj, name, exact)
    try:
        with jax.default_matmul_precision("highest"):
            yield
    finally:
        for (obj, name, _), value in zip(switches, old, strict=True):
            setattr(obj, name, value)


def precision_context() -> dict:
    """The settings that decide what a comparison computes, as it runs now: JAX's matmul
    precision, x64 and backend, torch's TF32 switches, and the library versions. Recorded in
    every --json report, so a real difference can be told from a setting."""
    import flax

    return {
        "jax_default_matmul_precision": str(jax.config.jax_default_matmul_precision),
        "jax_enable_x64": bool(jax.config.jax_enable_x64),
        "jax_backend": jax.default_backend(),
        "torch_tf32": {
            path: getattr(obj, name) for path, (obj, name, _) in _tf32_switches().items()
        },
        "versions": {
            "jax": jax.__version__,
            "flax": flax.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
    }


def comparison_context() -> dict:
    """`precision_context()` as every comparison here runs: inside `exact_matmuls()`."""
    with exact_matmuls():
        return precision_context()


def x64_for(dtype: str):
    """`jax.enable_x64(True)` for float64 work, nothing otherwise: x64 never leaks."""
    return jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()


@functools.partial(nnx.jit, static_argnames="return_intermediates")
def run_nnx(model: jax_impl.ViT, images_nhwc, return_intermediates: bool = False):
    """The model under `nnx.jit` (one compile per shape, instead of one per eager op)."""
    return model(images_nhwc, return_intermediates=return_intermediates)


def run_torch(model: torch_impl.ViT, images_nhwc: np.ndarray, **kw):
    with torch.no_grad():
        return model(numpy_to_torch(nhwc_to_nchw(images_nhwc)), **kw)


def run_patches(model, patches: np.ndarray, grids) -> np.ndarray:
    """Either of our models on a padded batch (`forward_patches`): its logits as NumPy."""
    if isinstance(model, jax_impl.ViT):
        return np.asarray(model.forward_patches(jax.numpy.asarray(patches), grids))
    with torch.no_grad():
        return torch_to_numpy(model.forward_patches(numpy_to_torch(patches), grids))


def logits_of(model, images_nhwc: np.ndarray, *, jit: bool = True) -> np.ndarray:
    """Either of our models' logits in its own dtype, as float64 NumPy (no intermediates).
    `jit=False` runs a JAX model op by op: for a single call on a large model, XLA's whole-model
    compile costs more memory than it saves time (ViT-B/16: +430 MB resident against +150 MB)."""
    if isinstance(model, jax_impl.ViT):
        images = images_nhwc.astype(model.dtype)
        return np.asarray(run_nnx(model, images) if jit else model(images), np.float64)
    out = run_torch(model, images_nhwc.astype(torch_to_numpy(next(model.parameters())).dtype))
    return torch_to_numpy(out).astype(np.float64)
