"""Orbax checkpoints: our NNX state saved by Orbax, with our manifest beside it (the folder
format itself is `formats.orbax_io`)."""

from __future__ import annotations

from weight_transfer.layouts.base import ASSUME_EPS6, ASSUME_GELU, EVERYTHING, Layout
from weight_transfer.layouts.ours import ours

LAYOUTS = (
    Layout(
        "orbax",
        "nnx",
        ours("nnx"),
        r"^blocks\.\d+\.attn\.q\.kernel$|^ln_f\.scale$",
        "jax_impl.ViT NNX state as an Orbax checkpoint (a folder: state/ + vit_parity.json)",
        container="orbax",
        computes=EVERYTHING,
        assumes=dict(activation=ASSUME_GELU, ln_eps=ASSUME_EPS6),
    ),
)
