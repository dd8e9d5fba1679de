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
KINDS = ("conv", "kernel", "bias", "scale", "embedding")  # scale: norm gains and LayerScale


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


def norm(path: str, d: int, kind: str = "layernorm") -> Layer:
    """LayerNorm (scale and bias) or RMSNorm (scale only)."""
    params = {"scale": Param((d,), "scale")}
    if kind == "layernorm":
        params["bias"] = Param((d,), "bias")
    return Layer(path, "norm", params)


def param(path: str, *shape: int, kind: str = "embedding") -> Layer:
    return Layer(path, "param", {"": Param(tuple(shape), kind)})


def mlp_layers(c: ViTConfig, prefix: str, bias: bool, gated: bool) -> list[Layer]:
    """ff1 -> activation -> ff2, or the gated form: ff2(act(ff1_g x) * ff1_x x)."""
    d, f = c.d_model, c.d_ff
    if not gated:
        first = [linear(f"{prefix}.ff1", d, f, bias)]
    else:
        first = [linear(f"{prefix}.ff1_g", d, f, bias), linear(f"{prefix}.ff1_x", d, f, bias)]
    return [*first, linear(f"{prefix}.ff2", f, d, bias)]


def block_layers(c: ViTConfig, prefix: str) -> list[Layer]:
    """One encoder block: pre-norm attention (four projections, optional q/k norms over
    head_dim) and pre-norm MLP, each branch optionally scaled per channel (LayerScale)."""
    d = c.d_model
    return [
        norm(f"{prefix}.ln1", d, c.norm),
        *(linear(f"{prefix}.attn.{n}", d, d, bias=c.qkv_bias) for n in "qkv"),
        *(norm(f"{prefix}.attn.{n}_norm", c.head_dim, c.norm) for n in "qk" if c.qk_norm),
        linear(f"{prefix}.attn.o", d, d, bias=c.proj_bias),
        *([param(f"{prefix}.ls1", d, kind="scale")] if c.layer_scale else []),
        norm(f"{prefix}.ln2", d, c.norm),
        *mlp_layers(c, prefix, c.mlp_bias, c.mlp != "mlp"),
        *([param(f"{prefix}.ls2", d, kind="scale")] if c.layer_scale else []),
    ]


def map_layers(c: ViTConfig, prefix: str = "map") -> list[Layer]:
    """Multihead attention pooling (SigLIP's MAP head, timm AttentionPoolLatent): a learned
    probe attends to the patch tokens, then y + mlp(norm(y)). Biases always on; the MLP is a
    plain one as wide as the encoder's, whatever the blocks use."""
    d = c.d_model
    return [param(f"{prefix}.probe", 1, d),
            *(linear(f"{prefix}.attn.{n}", d, d) for n in "qkvo"),
            norm(f"{prefix}.norm", d, c.norm),
            *mlp_layers(c, prefix, True, gated=False)]


def layers(c: ViTConfig) -> list[Layer]:
    """The module tree in forward order (the models' attribute names)."""
    d = c.d_model
    tree = [conv("patch_embed", c.in_channels, d, c.patch_size, bias=c.patch_bias)]
    if c.patch_norm:
        tree.append(norm("patch_norm", d, c.norm))
    if c.class_token:
        tree.append(param("cls_token", 1, d))
    if c.dist_token:
        tree.append(param("dist_token", 1, d))
    if c.reg_tokens:
        tree.append(param("reg_tokens", c.reg_tokens, d))
    tree.append(param("pos_embed", c.num_positions, d))
    if c.norm_pre:
        tree.append(norm("norm_pre", d, c.norm))
    for i in range(c.num_layers):
        tree += block_layers(c, f"blocks.{i}")
    if c.final_norm == "pre_pool":
        tree.append(norm("ln_f", d, c.norm))
    if c.pool == "map":
        tree += map_layers(c)
    if c.final_norm == "post_pool":
        tree.append(norm("fc_norm", c.pooled_dim, c.norm))
    if c.num_classes:
        tree.append(linear("head", c.pooled_dim, c.num_classes, bias=c.head_bias))
    if c.dist_token:
        tree.append(linear("head_dist", d, c.num_classes, bias=c.head_bias))
    return tree


def parameters(c: ViTConfig) -> dict[str, Param]:
    """`{flat NNX path: Param}` of the loop layout (blocks as `blocks.{i}.`), in tree order."""
    return {k: p for layer in layers(c) for k, p in layer.flat().items()}


def block_template(c: ViTConfig) -> dict[str, Param]:
    """The parameters of one block, keyed by path below `blocks.{i}.`."""
    return {k.removeprefix("b."): p for layer in block_layers(c, "b") for k, p in layer.flat().items()}


def intermediates(c: ViTConfig) -> list[str]:
    """The named activations both models return with `return_intermediates=True`, in order:
    patch tokens (after `patch_norm`), tokens with positions, `norm_pre` (if any), each
    block's attention and MLP branch outputs (after LayerScale) and its output, the final norm
    on every token (if any), the pooled features (the head's input: after MAP or `fc_norm`),
    the logits (the pooled features again when there is no head)."""
    names = ["patch_embed", "tokens"] + (["norm_pre"] if c.norm_pre else [])
    for i in range(c.num_layers):
        names += [f"blocks.{i}.attn", f"blocks.{i}.mlp", f"blocks.{i}"]
    if c.final_norm == "pre_pool":
        names.append("ln_f")
    return names + ["pooled", "logits"]
