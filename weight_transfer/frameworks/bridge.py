"""Move parameters between `jax_impl.ViT` (NNX state) and `torch_impl.ViT` (state dict).

Everything crosses as flat `dict[str, np.ndarray]` keyed by dotted paths
(`blocks.0.attn.q.kernel` on the NNX side, `blocks.0.attn.q.weight` on the torch side), mapped
by the one table in `weight_transfer.core.table`. Dtypes are kept, bfloat16 included.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import jax_impl
import torch_impl
from vit_config import ArgumentError, ViTConfig, arch
from weight_transfer.core.table import Rule, apply_table, base_shapes, nnx_torch, rule
from weight_transfer.core.transforms import STACK
from weight_transfer.formats.memory import to_contiguous
from weight_transfer.frameworks.torch_bridge import (  # noqa: F401  (re-exported: weight_transfer.X)
    numpy_to_torch,
    same_image_sizes,
    torch_flat,
    torch_from_state_dict,
    torch_to_numpy,
)

Flat = dict[str, np.ndarray]

# ---- framework arrays <-> numpy (bit-exact, bfloat16 through its 16-bit pattern) ----------


def numpy_to_jax(a: np.ndarray) -> jax.Array:
    if a.dtype == np.float64 and not jax.config.jax_enable_x64:
        raise ArgumentError(
            "float64 weights need JAX x64 (jax.config.update('jax_enable_x64', True)"
            " or `with jax.enable_x64(True):`); JAX would silently demote them"
        )
    return jnp.asarray(a)


# ---- flat views of each side ----------------------------------------------------------------


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def nnx_flat(state_or_model: Any) -> Flat:
    """A model's (or an `nnx.State`'s) parameters as `{dotted path: array}`."""
    state = state_or_model
    if isinstance(state_or_model, nnx.Module):
        state = nnx.state(state_or_model, nnx.Param)
    return {_dotted(path): np.asarray(var.get_value()) for path, var in nnx.to_flat_state(state)}


@functools.lru_cache(maxsize=64)
def _abstract_nnx(
    config: ViTConfig, dtype, scan_layers: bool = False
) -> tuple[nnx.GraphDef, nnx.State]:
    abstract = nnx.eval_shape(
        lambda: jax_impl.ViT(config, rngs=nnx.Rngs(0), dtype=dtype, scan_layers=scan_layers)
    )
    return nnx.split(abstract)


@functools.lru_cache(maxsize=64)
def nnx_shapes(config: ViTConfig, scan_layers: bool = False) -> dict[str, tuple[int, ...]]:
    """jax_impl.ViT's parameter shapes, from the declared architecture (`vit_config.arch`);
    with `scan_layers`, the blocks' parameters stacked as `blocks.X` with a leading (L,) axis."""
    if not scan_layers:
        return base_shapes("nnx", config)
    stacked = {
        f"blocks.{k}": (config.num_layers, *p.shape) for k, p in arch.block_template(config).items()
    }
    return {
        k: s for k, s in base_shapes("nnx", config).items() if not k.startswith("blocks.")
    } | stacked


def scan_rules(config: ViTConfig) -> list[Rule]:
    """Loop layout (`blocks.{i}.X`, an nnx.List) <-> scanned layout (`blocks.X`, stacked on a
    leading (num_layers,) axis), derived from the declared architecture."""
    rules = [rule(k, k) for k in base_shapes("nnx", config) if not k.startswith("blocks.")]
    for leaf in arch.block_template(config):
        per_layer = tuple(f"blocks.{i}.{leaf}" for i in range(config.num_layers))
        rules.append(Rule(per_layer, (f"blocks.{leaf}",), STACK))
    return rules


def stack_layers(flat: Mapping[str, np.ndarray], config: ViTConfig) -> Flat:
    """Loop-layout NNX params -> scanned layout (bit-exact)."""
    return apply_table(
        flat, scan_rules(config), nnx_shapes(config, True), what="NNX", finish=to_contiguous
    )


def unstack_layers(flat: Mapping[str, np.ndarray], config: ViTConfig) -> Flat:
    """Scanned-layout NNX params -> loop layout (bit-exact)."""
    return apply_table(
        flat,
        [r.reversed() for r in scan_rules(config)],
        nnx_shapes(config),
        what="NNX (scanned)",
        finish=to_contiguous,
    )


def nnx_loop_flat(model: jax_impl.ViT) -> Flat:
    """A model's params in the loop layout, whichever way its blocks are stored."""
    flat = nnx_flat(model)
    return unstack_layers(flat, model.config) if model.scan_layers else flat


def require_ours(model) -> None:
    if not isinstance(model, (jax_impl.ViT, torch_impl.ViT)):
        raise TypeError(
            f"expected a jax_impl.ViT or torch_impl.ViT, got {type(model).__name__} "
            f"(port third-party models with load_checkpoint first)"
        )


def nnx_params(model: jax_impl.ViT | torch_impl.ViT) -> Flat:
    """Either of our models' parameters as `{nnx path: array}` in the loop layout."""
    require_ours(model)
    if isinstance(model, jax_impl.ViT):
        return nnx_loop_flat(model)
    return torch_to_nnx_flat(torch_flat(model), model.config)


def torch_shapes(config: ViTConfig) -> dict[str, tuple[int, ...]]:
    """torch_impl.ViT's state-dict shapes, from the declared architecture through the table."""
    return base_shapes("torch", config)


# ---- the lower-level state functions ----------------------------------------------------------


def nnx_to_torch_flat(flat: Mapping[str, np.ndarray], config: ViTConfig) -> Flat:
    """`{nnx path: array}` -> `{torch key: array}` through the table, checked against `config`."""
    return apply_table(
        flat, nnx_torch(config), torch_shapes(config), what="NNX", finish=to_contiguous
    )


def torch_to_nnx_flat(flat: Mapping[str, np.ndarray], config: ViTConfig) -> Flat:
    """`{torch key: array}` -> `{nnx path: array}`, the same table read right to left."""
    return apply_table(
        flat,
        [r.reversed() for r in nnx_torch(config)],
        nnx_shapes(config),
        what="torch",
        finish=to_contiguous,
    )


def nnx_state_to_state_dict(
    state: nnx.State | Mapping[str, np.ndarray], config: ViTConfig
) -> dict[str, torch.Tensor]:
    """An NNX parameter state (or its flat dict) -> a `torch_impl.ViT` state dict."""
    flat = (
        state
        if isinstance(state, Mapping) and not isinstance(state, nnx.State)
        else nnx_flat(state)
    )
    return {k: numpy_to_torch(v) for k, v in nnx_to_torch_flat(flat, config).items()}


def state_dict_to_nnx_state(state_dict: Mapping[str, Any], config: ViTConfig) -> nnx.State:
    """A `torch_impl.ViT` state dict (torch tensors or numpy arrays) -> an NNX parameter state."""
    flat = {
        k: torch_to_numpy(v) if isinstance(v, torch.Tensor) else np.asarray(v)
        for k, v in state_dict.items()
    }
    return _nnx_state_from_flat(torch_to_nnx_flat(flat, config), config)


def _nnx_state_from_flat(
    flat: Mapping[str, Any], config: ViTConfig, scan_layers: bool = False, place=numpy_to_jax
) -> nnx.State:
    """The NNX parameter state holding `flat`'s values, each turned into a JAX array by `place`."""
    _, abstract = _abstract_nnx(config, jnp.dtype(jnp.float32), scan_layers)
    return nnx.from_flat_state(
        [
            (path, var.replace(place(flat[_dotted(path)])))
            for path, var in nnx.to_flat_state(abstract)
        ]
    )


def nnx_model_from_flat(
    flat: Mapping[str, Any], config: ViTConfig, scan_layers: bool = False, place=numpy_to_jax
) -> jax_impl.ViT:
    """Merge already checked values into a model whose dtype is theirs (float32 if mixed)."""
    dtypes = {np.dtype(a.dtype) for a in flat.values()}
    dtype = jnp.dtype(dtypes.pop() if len(dtypes) == 1 else jnp.float32)
    graphdef, _ = _abstract_nnx(config, dtype, scan_layers)
    return nnx.merge(graphdef, _nnx_state_from_flat(flat, config, scan_layers, place))


def nnx_from_flat(
    flat: Mapping[str, np.ndarray], config: ViTConfig, *, scan_layers: bool = False
) -> jax_impl.ViT:
    """Build a `jax_impl.ViT` whose parameters are exactly `flat` (`{nnx path: array}`, in the
    loop layout, or the scanned one with `scan_layers=True`)."""
    scan_layers = scan_layers and config.num_layers > 0
    shapes = nnx_shapes(config, scan_layers)
    checked = apply_table(
        flat, [rule(k, k) for k in shapes], shapes, what="NNX", finish=to_contiguous
    )
    return nnx_model_from_flat(checked, config, scan_layers)


def nnx_astype(model: jax_impl.ViT, dtype, *, in_place: bool = False) -> jax_impl.ViT:
    """A copy of `model` computing in `dtype`, every parameter cast on the device (no host
    copies; float64 needs JAX x64 on). `in_place=True` casts `model`'s own parameters one at
    a time, each old array freed as its cast lands (never two copies of the model; `model`
    is spent)."""
    graphdef, _ = _abstract_nnx(model.config, jnp.dtype(dtype), model.scan_layers)
    state = nnx.state(model, nnx.Param)
    if not in_place:
        cast = nnx.merge(graphdef, jax.tree.map(lambda a: jnp.asarray(a, dtype), state))
        return same_image_sizes(cast, model)
    for _, var in nnx.to_flat_state(state):
        var.set_value(jnp.asarray(var.get_value(), dtype))
    return same_image_sizes(nnx.merge(graphdef, state), model)


# ---- the model-level API ------------------------------------------------------------------------


def to_torch(nnx_model: jax_impl.ViT) -> torch_impl.ViT:
    """The `torch_impl.ViT` computing the same function as `nnx_model` (same config and dtype)."""
    config = nnx_model.config
    out = torch_from_state_dict(nnx_state_to_state_dict(nnx_loop_flat(nnx_model), config), config)
    return same_image_sizes(out, nnx_model)


def to_nnx(torch_model: torch_impl.ViT, *, scan_layers: bool = False) -> jax_impl.ViT:
    """The `jax_impl.ViT` computing the same function as `torch_model` (same config and dtype);
    `scan_layers=True` builds it with stacked blocks run by nnx.scan."""
    config = torch_model.config
    flat = torch_to_nnx_flat(torch_flat(torch_model), config)
    if scan_layers and config.num_layers:
        flat = stack_layers(flat, config)
    return same_image_sizes(nnx_from_flat(flat, config, scan_layers=scan_layers), torch_model)


# ---- images --------------------------------------------------------------------------------------


def nhwc_to_nchw(images):
    """(B, H, W, C) or (H, W, C) -> (B, C, H, W) or (C, H, W); numpy, JAX or torch in, same out."""
    axes = (0, 3, 1, 2) if images.ndim == 4 else (2, 0, 1)
    return images.permute(*axes) if isinstance(images, torch.Tensor) else images.transpose(axes)


def nchw_to_nhwc(images):
    """(B, C, H, W) or (C, H, W) -> (B, H, W, C) or (H, W, C); numpy, JAX or torch in, same out."""
    axes = (0, 2, 3, 1) if images.ndim == 4 else (1, 2, 0)
    return images.permute(*axes) if isinstance(images, torch.Tensor) else images.transpose(axes)
