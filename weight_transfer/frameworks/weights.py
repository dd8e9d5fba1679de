"""Random weights for every parameter, drawn by what the parameter is (`vit_config.arch`)."""

from __future__ import annotations

import numpy as np

import jax_impl
import torch_impl
from vit_config import ViTConfig, arch
from weight_transfer.frameworks.bridge import (
    nnx_from_flat,
    nnx_to_torch_flat,
    numpy_to_torch,
    torch_from_state_dict,
)
from weight_transfer.frameworks.runners import NUMPY_DTYPES


def random_params(
    config: ViTConfig, seed: int = 0, dtype: str = "float32"
) -> dict[str, np.ndarray]:
    """`{nnx path: array}` with every parameter random (no zeros, no ones: default inits hide
    transfer bugs): kernels N(0, 1/fan_in), everything else (biases, norm gains, tokens,
    positions) N(0, 0.5)."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, p in sorted(arch.parameters(config).items()):
        std = p.fan_in**-0.5 if p.kind in ("conv", "kernel") else 0.5
        out[key] = (rng.standard_normal(p.shape) * std).astype(NUMPY_DTYPES[dtype])
    return out


def random_nnx(config: ViTConfig, seed: int = 0, dtype: str = "float32") -> jax_impl.ViT:
    """A `jax_impl.ViT` with every parameter random."""
    return nnx_from_flat(random_params(config, seed, dtype), config)


def random_torch(config: ViTConfig, seed: int = 0, dtype: str = "float32") -> torch_impl.ViT:
    """A `torch_impl.ViT` with every parameter random (a different draw from `random_nnx`'s
    for the same seed)."""
    flat = nnx_to_torch_flat(random_params(config, seed + 7919, dtype), config)
    return torch_from_state_dict({k: numpy_to_torch(v) for k, v in flat.items()}, config)
