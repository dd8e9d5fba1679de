"""Hugging Face transformers 4.x's Flax classes (FlaxViTModel / ForImageClassification,
FlaxCLIPVisionModel and FlaxCLIPModel's image tower, FlaxDinov2Model / ForImageClassification),
in any of their files: `flax_model.msgpack`, its shards, or a `model.safetensors` whose
metadata says `format: flax`.

Their names are the PyTorch classes' re-spelled, as transformers' own PT <-> Flax conversion
spells them: a Linear's and a conv's `weight` is a `kernel` stored (in, out) and HWIO, a
LayerNorm's is a `scale`, an embedding table's an `embedding` (the msgpack tree's levels are
joined by '.' here, as a Flax safetensors file joins them). Each table is therefore derived
from its PyTorch counterpart in `huggingface` and our NNX <-> torch link, never restated; the
config.json is the same file, read and written by the same functions.

What differs from the PyTorch classes, and is handled here: FlaxDinov2 applies its LayerScale
as `layerscale_value * lambda1 * layerscale_value` (transformers 4.47's FlaxDinov2LayerScale;
torch applies `lambda1`): a file whose config.json says another value than 1 is read as Flax
computes it, and said so. FlaxDinov2's SwiGLU MLP cannot be built (it reads an undefined
`hidden_features`) and there is no FlaxCLIPVisionModelWithProjection: both are refused when
writing.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

from vit_config import ViTConfig
from weight_transfer.core.errors import AssumedConfigWarning, LayoutError
from weight_transfer.core.resample import Resampling
from weight_transfer.core.table import Rule, nnx_torch, oriented
from weight_transfer.core.transforms import IDENTITY
from weight_transfer.formats.checkpoint import Source
from weight_transfer.layouts import huggingface as hf
from weight_transfer.layouts.base import Layout, json_field

FLAX_WEIGHTS = "flax_model.msgpack"

# Configs that between them hold every layer the Hugging Face tables name: the config being
# read may lack one a probe asks about (DINOv2's LayerScale, registers, a MAP head...)
EVERY_LAYER = (
    ViTConfig(
        layer_scale=True,
        reg_tokens=1,
        dist_token=True,
        class_token=True,
        norm_pre=True,
        final_norm="post_pool",
        pool="cls",
    ),
    ViTConfig(mlp="swiglu", pool="map", class_token=False),
)


def flax_table(torch_table: Callable[[ViTConfig], tuple[Rule, ...]]):
    """The Flax spelling of a table over torch_impl's keys: each rule re-read from our NNX
    keys (whose kernels already have Flax's layout), its published names given Flax's leaves."""

    def table(config: ViTConfig) -> tuple[Rule, ...]:
        link = {  # torch key -> its NNX rule, for every layer a probe may ask about
            r.right[0]: r
            for c in (config, *(c.replace(num_layers=config.num_layers) for c in EVERY_LAYER))
            for r in nnx_torch(c)
        }
        rules = []
        for r in oriented(torch_table(config), config.num_layers):
            if not all(k in link for k in r.left):
                continue  # a layer no Flax class has (BEiT's relative bias tables)
            ours = [link[k] for k in r.left]
            if r.transform != IDENTITY and any(o.transform != IDENTITY for o in ours):
                continue  # a packed kernel (DINOv2's SwiGLU): no Flax class holds one
            leaf = ours[0].left[0].rsplit(".", 1)[-1]
            rules.append(
                Rule(
                    tuple(o.left[0] for o in ours),
                    tuple(_flax_name(k, leaf, ours[0]) for k in r.right),
                    r.transform,
                )
            )
        return tuple(rules)

    return table


def _flax_name(key: str, nnx_leaf: str, ours: Rule) -> str:
    """The Flax name of a PyTorch-class key: `weight` becomes the NNX leaf (kernel, scale),
    or `embedding` for a table our model holds as a bare parameter (nn.Embed's)."""
    stem, _, leaf = key.rpartition(".")
    if leaf != "weight":
        return key
    if ours.left[0] == ours.right[0]:  # a bare parameter: the same name on both our sides
        return f"{stem}.embedding"
    return f"{stem}.{nnx_leaf}"


def _torch(name: str) -> Layout:
    return next(l for l in hf.LAYOUTS if l.name == name)


def flax_layout(
    torch_name: str, marker: str, description: str, flax_resizes: str, **changes
) -> Layout:
    """The Flax twin of one of `huggingface`'s layouts: its table in Flax names over our NNX
    keys, everything else (config.json both ways, names as published) its own; at another
    image size its PyTorch class's resampling, announced with what the Flax class does
    (`flax_resizes`)."""
    torch = _torch(torch_name)

    def resampling(config: ViTConfig) -> Resampling:  # PyTorch's; said whose it is
        r = torch.resampling(config)
        return dataclasses.replace(r, origin=f"{r.origin}, the PyTorch class's: {flax_resizes}")

    return dataclasses.replace(
        torch,
        name=f"{torch_name.replace('hf', 'hf_flax', 1)}",
        base="nnx",
        table=flax_table(torch.table),
        marker=marker,
        description=description,
        priority=3,
        aliases=(),
        writable=True,
        weights_file=FLAX_WEIGHTS,
        resampling=resampling,
        **changes,
    )


def layer_scale_as_flax_computes(inner):
    """FlaxDinov2's normaliser: `inner`'s, then each `lambda1` times layerscale_value**2
    (what FlaxDinov2LayerScale applies), announced, when config.json's value is not 1."""

    def normalise(source: Source) -> tuple[Source, list[str]]:
        source, dropped = inner(source)
        if (source.hf_config or {}).get("use_swiglu_ffn"):
            raise LayoutError(
                f"{source.path}: config.json asks for FlaxDinov2's SwiGLU MLP, which "
                f"transformers cannot build (FlaxDinov2SwiGLUFFN reads an undefined "
                f"hidden_features): no Flax file holds one"
            )
        if source.hf_config is None:  # a tree with no config.json: the value is unknown
            if any(k.endswith(".lambda1") for k in source.meta):
                warnings.warn(
                    AssumedConfigWarning(
                        f"{source.path}: assumed layerscale_value = 1 (Dinov2Config's default; "
                        f"no config.json), so the LayerScale is lambda1 as stored: FlaxDinov2 "
                        f"applies lambda1 x layerscale_value**2"
                    ),
                    stacklevel=2,
                )
            return source, dropped
        value = json_field(source.hf_config, "layerscale_value", (float, int), source.path, 1.0)
        if value == 1:
            return source, dropped
        scale = float(value) ** 2
        warnings.warn(
            AssumedConfigWarning(
                f"{source.path}: assumed the LayerScale FlaxDinov2 computes, lambda1 x "
                f"layerscale_value**2 = lambda1 x {scale!r} (transformers 4.x's "
                f"FlaxDinov2LayerScale; PyTorch's Dinov2 applies lambda1 alone): if the file "
                f"holds PyTorch's lambda1, set layerscale_value to 1 in its config.json"
            ),
            stacklevel=2,
        )
        scaled = {k for k in source.meta if k.endswith(".lambda1")}

        def read(k: str):
            a = source.load(k)
            return (a * a.dtype.type(scale)) if k in scaled else a

        return source.renamed(dict(source.meta), read), dropped

    return normalise


def _no_projection(config: ViTConfig) -> None:
    if config.num_classes:
        raise LayoutError(
            "transformers' Flax CLIP has no vision model with a projection "
            "(FlaxCLIPVisionModelWithProjection does not exist): write hf_clip, or drop the "
            "projection (--set num_classes=0)"
        )
    hf.clip_config_json(config)


def _flax_dinov2_holds(config: ViTConfig) -> None:
    if config.mlp != "mlp":
        raise LayoutError(
            "transformers' FlaxDinov2 cannot build its SwiGLU MLP (FlaxDinov2SwiGLUFFN reads "
            "an undefined hidden_features): write hf_dinov2"
        )
    if config.reg_tokens:
        raise LayoutError(
            "transformers has no Flax Dinov2WithRegisters: write hf_dinov2 for a model with "
            "register tokens"
        )
    hf.dinov2_config_json(config)


NO_FLAX_RESIZE = "the Flax class runs at its own size only"

LAYOUTS = (
    flax_layout(
        "hf",
        r"(^|\.)encoder\.layer\.\d+\.layernorm_before\.scale$",
        "Hugging Face Flax ViT (FlaxViTModel, FlaxViTForImageClassification)",
        NO_FLAX_RESIZE,
        normalise=hf.vit_normaliser(weight="kernel", norm="scale"),
    ),
    flax_layout(
        "hf_clip",
        r"(^|\.)pre_layrnorm\.scale$",
        "Hugging Face Flax CLIP vision tower (FlaxCLIPVisionModel, or FlaxCLIPModel's image "
        "tower and projection: the text tower is left out)",
        NO_FLAX_RESIZE,
        check_writable=_no_projection,
    ),
    flax_layout(
        "hf_dinov2",
        r"(^|\.)encoder\.layer\.\d+\.norm1\.scale$",
        "Hugging Face Flax Dinov2 (FlaxDinov2Model, FlaxDinov2ForImageClassification)",
        "FlaxDinov2's own jax.image.scale_and_translate (Keys' cubic, a = -0.5) is another "
        "method, not implemented here",
        normalise=layer_scale_as_flax_computes(_torch("hf_dinov2").normalise),
        check_writable=_flax_dinov2_holds,
    ),
)
