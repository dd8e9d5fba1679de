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
from weight_transfer.bridge import nhwc_to_nchw, numpy_to_torch, torch_to_numpy

NUMPY_DTYPES = {"float32": np.float32, "float64": np.float64, "bfloat16": ml_dtypes.bfloat16}


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


def logits_of(model, images_nhwc: np.ndarray) -> np.ndarray:
    """Either of our models' logits in its own dtype, as float64 NumPy (no intermediates)."""
    if isinstance(model, jax_impl.ViT):
        return np.asarray(run_nnx(model, images_nhwc.astype(model.dtype)), np.float64)
    out = run_torch(model, images_nhwc.astype(torch_to_numpy(next(model.parameters())).dtype))
    return torch_to_numpy(out).astype(np.float64)
