"""Our own two layouts: `jax_impl.ViT`'s flat NNX state and `torch_impl.ViT`'s state dict, each
a table of identities over its own keys (the NNX <-> torch link is `core.table.nnx_torch`)."""

from __future__ import annotations

from collections.abc import Callable

from vit_config import ViTConfig
from weight_transfer.core.table import Rule, base_shapes, rule
from weight_transfer.core.transforms import IDENTITY
from weight_transfer.layouts.base import ASSUME_EPS6, ASSUME_GELU, EVERYTHING, Layout


def ours(base: str) -> Callable[[ViTConfig], tuple[Rule, ...]]:
    """One of our own layouts as a table of identities over its own keys."""

    def table(config: ViTConfig) -> tuple[Rule, ...]:
        return tuple(rule(k, k, IDENTITY) for k in base_shapes(base, config))

    return table


LAYOUTS = (
    Layout(
        "nnx",
        "nnx",
        ours("nnx"),
        r"^blocks\.\d+\.attn\.q\.kernel$|^ln_f\.scale$",
        "jax_impl.ViT flat NNX state",
        computes=EVERYTHING,
        assumes=dict(activation=ASSUME_GELU, ln_eps=ASSUME_EPS6),
    ),
    Layout(
        "torch",
        "torch",
        ours("torch"),
        r"^blocks\.\d+\.attn\.q\.weight$|^ln_f\.weight$",
        "torch_impl.ViT state dict",
        computes=EVERYTHING,
        assumes=dict(activation=ASSUME_GELU, ln_eps=ASSUME_EPS6),
    ),
)
