"""One interface over every model we compare: ours (NNX or torch) and third-party torch models.

`side(model).run(images_nhwc, float64)` returns the named intermediates as float64 NumPy
arrays, under the names `vit_config.arch.intermediates` declares (`patch_embed`, `tokens`,
`blocks.{i}.attn`, ..., `logits`); with `in_place=True` a float64 run casts the model itself
instead of a copy (for a caller that gives the model up, such as the CLI's doctor). Ours
produce them natively (`return_intermediates=True`); timm and Hugging Face models are
captured with forward hooks under the same names.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from vit_config.arch import intermediates
from weight_transfer.diagnostics.metrics import as_float64

Intermediates = dict[str, np.ndarray]


@dataclass
class Side:
    """A model to compare, as a function of (NHWC float images, float64?) -> intermediates."""

    name: str
    names: list[str]  # the intermediates it returns, in forward order
    run: Callable[..., Intermediates]  # (images, float64, in_place=False)


def _nnx_side(model) -> Side:
    from weight_transfer.frameworks.bridge import nnx_astype
    from weight_transfer.frameworks.runners import run_nnx, x64_for

    def run(images, float64, in_place=False):
        with x64_for("float64" if float64 else "float32"):
            m = nnx_astype(model, np.float64, in_place=in_place) if float64 else model
            _, seen = run_nnx(
                m, images.astype(np.float64 if float64 else np.float32), return_intermediates=True
            )
            return {k: as_float64(v) for k, v in seen.items()}

    return Side("jax_impl.ViT", intermediates(model.config), run)


def _torch_side(model) -> Side:
    import torch

    from weight_transfer.frameworks.runners import run_torch
    from weight_transfer.frameworks.torch_bridge import torch_astype

    def run(images, float64, in_place=False):
        cast = (lambda m, dtype: m.to(dtype)) if in_place else torch_astype
        m = cast(model, torch.float64) if float64 else model
        _, seen = run_torch(
            m, images.astype(np.float64 if float64 else np.float32), return_intermediates=True
        )
        return {k: as_float64(v) for k, v in seen.items()}

    return Side("torch_impl.ViT", intermediates(model.config), run)


def _hooked_side(name: str, model, points: Callable) -> Side:
    """A third-party torch model whose intermediates are captured by forward hooks.

    `points(model)` lists (module, our name, how): how is "out" (the module's output, first
    element if a tuple), "tokens" (the output as (B, N, D) tokens, from (B, Hp, Wp, D) too) or
    "in" (its first input, for the head's pooled features).
    """
    import torch

    from weight_transfer.frameworks.bridge import nhwc_to_nchw

    def run(images, float64, in_place=False):
        m = (model if in_place else copy.deepcopy(model)).double() if float64 else model
        dtype = torch.float64 if float64 else torch.float32
        seen: Intermediates = {}
        handles = []
        for module, key, how in points(m):

            def hook(mod, args, out, key=key, how=how):
                value = args[0] if how == "in" else (out[0] if isinstance(out, tuple) else out)
                if how == "tokens" and value.ndim == 4:
                    value = value.flatten(1, 2)  # (B, Hp, Wp, D) -> (B, N, D)
                seen[key] = as_float64(value)

            handles.append(module.register_forward_hook(hook))
        try:
            with torch.no_grad():
                x = torch.from_numpy(np.ascontiguousarray(nhwc_to_nchw(images))).to(dtype)
                out = m(x)
        finally:
            for h in handles:
                h.remove()
        seen["logits"] = as_float64(getattr(out, "logits", out))
        return seen

    return Side(name, [key for _, key, _ in points(model)] + ["logits"], run)


def side(model) -> Side:
    """The `Side` for one of ours, a timm `VisionTransformer` or an HF
    `ViTForImageClassification`."""
    if isinstance(model, Side):
        return model
    kind = type(model).__module__.split(".")[0]
    if kind == "jax_impl":
        return _nnx_side(model)
    if kind == "torch_impl":
        return _torch_side(model)
    from weight_transfer.layouts import diff_points

    found = diff_points(model)
    if found is not None:  # a publisher's model: hook points declared in its layouts module
        name, points = found
        return _hooked_side(name, model.eval(), points)
    raise TypeError(
        f"cannot compare a {type(model).__module__}.{type(model).__name__}: expected "
        f"jax_impl.ViT, torch_impl.ViT, a timm VisionTransformer or an HF "
        f"ViTForImageClassification"
    )


def recorded(model, images: np.ndarray) -> Side:
    """`model`'s float64 run on `images`, recorded, as a `Side` that holds no model: the
    model is cast to float64 in place for it (spent), so a caller that drops it keeps only the
    intermediates (the CLI's doctor: one model in memory at a time)."""
    from weight_transfer.frameworks.runners import exact_matmuls

    images = np.asarray(images, np.float64)
    live = side(model)
    with exact_matmuls():
        seen = live.run(images, True, in_place=True)

    def run(again, float64):
        if not float64 or not np.array_equal(np.asarray(again, np.float64), images):
            raise ValueError("a recorded side replays only its own float64 run")
        return seen

    return Side(live.name, live.names, run)
