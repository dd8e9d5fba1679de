"""The architecture as data: every layer's parameters (NNX paths, shapes, kinds) and the named
intermediates, derived from a `ViTConfig` alone. Imports no framework.

Both models build exactly these parameters and emit exactly these intermediates (tested), so
everything else derives from here: the NNX <-> torch table (`weight_transfer.core.table`), shapes
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

# The logical axis of each parameter dimension, the names sharding rules map to mesh axes (the
# Flax way: `nnx.logical_axis_rules` + `nnx.get_partition_spec`). "heads" is a flattened
# (num_heads * head_dim) axis, head-major; "layers" leads the scanned blocks' stacked parameters.
AXES = (
    "layers",
    "patch_height",
    "patch_width",
    "channels",
    "tokens",
    "embed",
    "heads",
    "head_dim",
    "mlp",
    "classes",
    "relative_positions",  # a relative bias table's offsets (never sharded)
    "attention_heads",  # a count of heads, not flattened (a relative bias table's columns)
    "grid_axes",  # one per axis of the patch grid: a relative bias MLP's (dy, dx) inputs,
    # learned RoPE frequencies' two components
    "rope_pairs",  # head_dim / 2 rotated channel pairs
    "relative_hidden",  # a relative bias MLP's hidden units
)


@dataclass(frozen=True)
class Param:
    shape: tuple[int, ...]
    kind: str
    axes: tuple[str, ...]  # the logical axis of each dimension, from AXES
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
    """A patch embedding: kernel HWIO, (p, p, C, D)."""
    params = {
        "kernel": Param(
            (patch, patch, c_in, c_out),
            "conv",
            ("patch_height", "patch_width", "channels", "embed"),
            patch * patch * c_in,
        )
    }
    if bias:
        params["bias"] = Param((c_out,), "bias", ("embed",))
    return Layer(path, "conv", params)


def linear(
    path: str, d_in: int, d_out: int, bias: bool = True, axes: tuple[str, str] = ("embed", "embed")
) -> Layer:
    """A dense layer: kernel (in, out), its logical axes `axes`."""
    params = {"kernel": Param((d_in, d_out), "kernel", axes, d_in)}
    if bias:
        params["bias"] = Param((d_out,), "bias", axes[1:])
    return Layer(path, "linear", params)


def norm(path: str, d: int, kind: str = "layernorm", axis: str = "embed") -> Layer:
    """LayerNorm (scale and bias) or RMSNorm (scale only)."""
    params = {"scale": Param((d,), "scale", (axis,))}
    if kind == "layernorm":
        params["bias"] = Param((d,), "bias", (axis,))
    return Layer(path, "norm", params)


def param(
    path: str, *shape: int, kind: str = "embedding", axes: tuple[str, ...] = ("tokens", "embed")
) -> Layer:
    return Layer(path, "param", {"": Param(tuple(shape), kind, axes[-len(shape) :])})


def mlp_layers(
    c: ViTConfig,
    prefix: str,
    bias: bool,
    gated: bool,
    hidden_norm: bool = False,
    width: int | None = None,
) -> list[Layer]:
    """ff1 -> activation -> ff2, or the gated form: ff2(act(ff1_g x) * ff1_x x); with
    `hidden_norm`, a norm on the hidden units before ff2 (EVA-02's sub-LN: `ff_norm`).
    `width` hidden units (default the blocks' d_ff)."""
    d, f = c.d_model, width or c.d_ff
    up, down = ("embed", "mlp"), ("mlp", "embed")
    names = ("ff1",) if not gated else ("ff1_g", "ff1_x")
    return [
        *(linear(f"{prefix}.{n}", d, f, bias, up) for n in names),
        *([norm(f"{prefix}.ff_norm", f, c.norm, "mlp")] if hidden_norm else []),
        linear(f"{prefix}.ff2", f, d, bias, down),
    ]


def attention_layers(
    c: ViTConfig,
    prefix: str,
    bias: bool = True,
    proj_bias: bool = True,
    qk_norm: bool = False,
    k_bias: bool = True,
    o_norm: bool = False,
    rel_bias: bool = False,
    learned_rope: bool = False,
) -> list[Layer]:
    """Four projections (q, k, v column-parallel over heads, o row-parallel; `k_bias=False`:
    biases on q and v only), optional q/k norms over head_dim between them, an optional norm
    on o's input (`o_norm`, EVA-02's sub-LN), and an optional table of relative position
    biases per head (`rel_bias`, BEiT)."""
    d, heads = c.d_model, ("embed", "heads")
    return [
        *(linear(f"{prefix}.{n}", d, d, bias and (n != "k" or k_bias), heads) for n in "qkv"),
        *(norm(f"{prefix}.{n}_norm", c.head_dim, c.norm, "head_dim") for n in "qk" if qk_norm),
        *([rope_frequencies(c, f"{prefix}.rope_freqs")] if learned_rope else []),
        *(relative_bias_layers(c, f"{prefix}.rel_bias") if rel_bias else []),
        *([norm(f"{prefix}.o_norm", d, c.norm, "heads")] if o_norm else []),
        linear(f"{prefix}.o", d, d, proj_bias, heads[::-1]),
    ]


def rope_frequencies(c: ViTConfig, path: str) -> Layer:
    """RoPE-ViT's learned (mixed) frequencies of one block: per head, each pair's angle is
    f[0] times one grid coordinate plus f[1] times the other."""
    return param(
        path,
        2,
        c.num_heads,
        c.head_dim // 2,
        kind="embedding",
        axes=("grid_axes", "attention_heads", "rope_pairs"),
    )


def relative_bias_layers(c: ViTConfig, path: str) -> list[Layer]:
    """Relative position biases (`vit_config.relpos`): BEiT's table, one row per (dy, dx)
    offset of the config's grid then three for the class token, one column per head; or timm
    relpos's 2 -> rel_pos_dim -> heads MLP computing one."""
    if c.rel_pos_form == "beit":
        return [
            param(
                f"{path}.table",
                c.num_relative_positions,
                c.num_heads,
                kind="bias",
                axes=("relative_positions", "attention_heads"),
            )
        ]
    return [
        linear(f"{path}.fc1", 2, c.rel_pos_dim, True, ("grid_axes", "relative_hidden")),
        linear(
            f"{path}.fc2", c.rel_pos_dim, c.num_heads, True, ("relative_hidden", "attention_heads")
        ),
    ]


def block_layers(c: ViTConfig, prefix: str) -> list[Layer]:
    """One encoder block: attention (four projections, optional q/k norms over head_dim, an
    optional norm before o and relative biases) and MLP (an optional hidden norm), each with
    its norm (before the branch, or after it: `block`), each branch optionally scaled per
    channel (LayerScale). A "parallel" block has one norm and one LayerScale for both; with
    `num_parallel` branches, each is a whole pre-norm block under `parallel.{j}`."""
    if c.num_parallel > 1:
        branch = c.replace(num_parallel=1)
        return [
            layer
            for j in range(c.num_parallel)
            for layer in block_layers(branch, f"{prefix}.parallel.{j}")
        ]
    d, side_by_side = c.d_model, c.block == "parallel"
    return [
        norm(f"{prefix}.ln1", d, c.norm),
        *attention_layers(
            c,
            f"{prefix}.attn",
            c.qkv_bias,
            c.proj_bias,
            c.qk_norm,
            c.k_bias,
            c.attn_norm,
            c.rel_pos_bias == "block",
            c.rope_freqs == "mixed" and c.rope != "none",
        ),
        *([param(f"{prefix}.ls1", d, kind="scale")] if c.layer_scale else []),
        *([] if side_by_side else [norm(f"{prefix}.ln2", d, c.norm)]),
        *mlp_layers(c, prefix, c.mlp_bias, c.mlp != "mlp", c.mlp_norm),
        *([param(f"{prefix}.ls2", d, kind="scale")] if c.layer_scale and not side_by_side else []),
    ]


def map_layers(c: ViTConfig, prefix: str = "map") -> list[Layer]:
    """Multihead attention pooling (SigLIP's MAP head, timm AttentionPoolLatent): a learned
    probe attends to the patch tokens, then y + mlp(norm(y)). Biases always on; the MLP is a
    plain one, as wide as the encoder's unless `map_d_ff` says, whatever the blocks use."""
    d = c.d_model
    return [
        param(f"{prefix}.probe", 1, d),
        *attention_layers(c, f"{prefix}.attn"),
        norm(f"{prefix}.norm", d, c.norm),
        *mlp_layers(c, prefix, True, gated=False, width=c.map_mlp_width),
    ]


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
    if c.pos_embed:
        tree.append(param("pos_embed", c.num_positions, d))
    if c.norm_pre:
        tree.append(norm("norm_pre", d, c.norm))
    if c.rel_pos_bias == "shared":
        tree += relative_bias_layers(c, "rel_bias")
    for i in range(c.num_layers):
        tree += block_layers(c, f"blocks.{i}")
    if c.final_norm == "pre_pool":
        tree.append(norm("ln_f", d, c.norm))
    if c.pool == "map":
        tree += map_layers(c)
    if c.final_norm == "post_pool":
        tree.append(norm("fc_norm", c.pooled_dim, c.norm))
    if c.num_classes:
        tree.append(linear("head", c.pooled_dim, c.num_classes, c.head_bias, ("embed", "classes")))
    if c.has_dist_head:
        tree.append(linear("head_dist", d, c.num_classes, c.head_bias, ("embed", "classes")))
    return tree


def logical_axes(c: ViTConfig, scan_layers: bool = False) -> dict[str, tuple[str, ...]]:
    """`{NNX path: logical axes}`; with `scan_layers`, the blocks' stacked as `blocks.X` with
    a leading "layers" axis."""
    axes = {k: p.axes for k, p in parameters(c).items()}
    if not scan_layers:
        return axes
    stacked = {f"blocks.{k}": ("layers", *p.axes) for k, p in block_template(c).items()}
    return {k: a for k, a in axes.items() if not k.startswith("blocks.")} | stacked


def parameters(c: ViTConfig) -> dict[str, Param]:
    """`{flat NNX path: Param}` of the loop layout (blocks as `blocks.{i}.`), in tree order."""
    return {k: p for layer in layers(c) for k, p in layer.flat().items()}


def block_template(c: ViTConfig) -> dict[str, Param]:
    """The parameters of one block, keyed by path below `blocks.{i}.`."""
    return {
        k.removeprefix("b."): p for layer in block_layers(c, "b") for k, p in layer.flat().items()
    }


def intermediates(c: ViTConfig) -> list[str]:
    """The named activations both models return with `return_intermediates=True`, in order:
    patch tokens (after `patch_norm`), tokens with positions, `norm_pre` (if any), each
    block's attention and MLP branch outputs (after LayerScale) and its output, the final norm
    on every token (if any), the pooled features (the head's input: after MAP or `fc_norm`),
    the logits (the pooled features again when there is no head). A "parallel" block's
    branch outputs are before its one LayerScale; parallel branches' are summed."""
    names = ["patch_embed", "tokens"] + (["norm_pre"] if c.norm_pre else [])
    for i in range(c.num_layers):
        names += [f"blocks.{i}.attn", f"blocks.{i}.mlp", f"blocks.{i}"]
    if c.final_norm == "pre_pool":
        names.append("ln_f")
    return names + ["pooled", "logits"]
