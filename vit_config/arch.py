"""The architecture as data: every layer's parameters (NNX paths, shapes, kinds) and the named
intermediates, derived from a `ViTConfig` alone. Imports no framework.

Both models build exactly these parameters and emit exactly these intermediates (tested), so
everything else derives from here: the NNX <-> torch table (`weight_transfer.table`), shapes
for converting files without building a model, random initialisation, the doctor's parameter
groups, parameter counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vit_config import ViTConfig

# What a parameter is, which decides how it is drawn at random and which doctor hypotheses
# touch it: "conv" (a patch kernel, HWIO), "kernel" (a linear kernel, (in, out)), "bias",
# "scale" (a norm's gain), "embedding" (learned tokens and positions).
KINDS = ("conv", "kernel", "bias", "scale", "embedding")


@dataclass(frozen=True)
class Param:
    shape: tuple[int, ...]
    kind: str
    fan_in: int = 1  # inputs per output (kernels): the scale of a random draw

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Layer:
    """One module of the tree: its path and type, and its parameters by NNX leaf name."""

    path: str
    type: str  # "conv", "linear", "norm" or "param" (a bare array, its path is its name)
    params: dict[str, Param]

    def flat(self) -> dict[str, Param]:
        if self.type == "param":
            return {self.path: self.params[""]}
        return {f"{self.path}.{leaf}": p for leaf, p in self.params.items()}


def conv(path: str, c_in: int, c_out: int, patch: int, bias: bool = True) -> Layer:
    params = {"kernel": Param((patch, patch, c_in, c_out), "conv", patch * patch * c_in)}
    if bias:
        params["bias"] = Param((c_out,), "bias")
    return Layer(path, "conv", params)


def linear(path: str, d_in: int, d_out: int, bias: bool = True) -> Layer:
    params = {"kernel": Param((d_in, d_out), "kernel", d_in)}
    if bias:
        params["bias"] = Param((d_out,), "bias")
    return Layer(path, "linear", params)


def norm(path: str, d: int) -> Layer:
    return Layer(path, "norm", {"scale": Param((d,), "scale"), "bias": Param((d,), "bias")})


def param(path: str, *shape: int) -> Layer:
    return Layer(path, "param", {"": Param(tuple(shape), "embedding")})


def block_layers(c: ViTConfig, prefix: str) -> list[Layer]:
    """One encoder block: pre-norm attention (four projections) and pre-norm MLP."""
    d = c.d_model
    return [
        norm(f"{prefix}.ln1", d),
        *(linear(f"{prefix}.attn.{n}", d, d, bias=c.qkv_bias) for n in "qkv"),
        linear(f"{prefix}.attn.o", d, d),
        norm(f"{prefix}.ln2", d),
        linear(f"{prefix}.ff1", d, c.d_ff),
        linear(f"{prefix}.ff2", c.d_ff, d),
    ]


def layers(c: ViTConfig) -> list[Layer]:
    """The module tree in forward order (the models' attribute names)."""
    d = c.d_model
    tree = [conv("patch_embed", c.in_channels, d, c.patch_size)]
    if c.class_token:
        tree.append(param("cls_token", 1, d))
    tree.append(param("pos_embed", c.num_positions, d))
    for i in range(c.num_layers):
        tree += block_layers(c, f"blocks.{i}")
    tree.append(norm("ln_f", d))
    tree.append(linear("head", d, c.num_classes))
    return tree


def parameters(c: ViTConfig) -> dict[str, Param]:
    """`{flat NNX path: Param}` of the loop layout (blocks as `blocks.{i}.`), in tree order."""
    return {k: p for layer in layers(c) for k, p in layer.flat().items()}


def block_template(c: ViTConfig) -> dict[str, Param]:
    """The parameters of one block, keyed by path below `blocks.{i}.`."""
    return {k.removeprefix("b."): p for layer in block_layers(c, "b") for k, p in layer.flat().items()}


def intermediates(c: ViTConfig) -> list[str]:
    """The named activations both models return with `return_intermediates=True`, in order:
    patch tokens, tokens entering the blocks, each block's attention and MLP branch outputs
    and its output, the final norm, the pooled features, the logits."""
    names = ["patch_embed", "tokens"]
    for i in range(c.num_layers):
        names += [f"blocks.{i}.attn", f"blocks.{i}.mlp", f"blocks.{i}"]
    return names + ["ln_f", "pooled", "logits"]
