"""timm architectures as `ViTConfig`s: a model built from timm's own registry on the meta device
(no weights, no download), then read attribute by attribute. What this ViT cannot compute is
refused by name. Imports timm and torch only when called.

A state dict cannot say its heads, epsilon, activation or pooling; a timm architecture name
can: `config_from_timm("vit_base_patch16_siglip_224", {"depth": 2})`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vit_config import ConfigError, ViTConfig
from weight_transfer.errors import LayoutError

POOLS = {"token": "cls", "avg": "mean", "map": "map"}


def is_timm_model(name: str) -> bool:
    try:
        import timm
    except ImportError:
        return False
    return timm.is_model(name)


def build_timm(architecture: str, model_args: Mapping[str, Any] | None = None):
    """timm's model of `architecture` on the meta device (pretrained=False: nothing fetched)."""
    try:
        import timm
        import torch
    except ImportError:
        raise LayoutError(f"architecture {architecture!r} is resolved through timm, which is not "
                          f"installed (pip install timm)") from None
    if not timm.is_model(architecture):
        raise LayoutError(f"{architecture!r} is not a timm architecture this timm "
                          f"({timm.__version__}) knows")
    try:
        with torch.device("meta"):
            return timm.create_model(architecture, pretrained=False, **dict(model_args or {}))
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise LayoutError(f"timm cannot build {architecture!r} with {dict(model_args or {})}: "
                          f"{e}") from None


def config_from_timm(architecture: str, model_args: Mapping[str, Any] | None = None
                     ) -> ViTConfig:
    """The `ViTConfig` computing what timm's `architecture` (with `model_args`) computes."""
    return config_of_timm_model(build_timm(architecture, model_args), architecture)


def _refuse(architecture: str, what: str) -> None:
    raise LayoutError(f"timm {architecture!r}: {what}, which this ViT does not implement")


def _norm(module, architecture: str) -> tuple[str, float] | None:
    """("layernorm" | "rmsnorm", eps), or None for an Identity."""
    name = type(module).__name__
    if name == "Identity":
        return None
    if name in ("LayerNorm", "LayerNorm2d") and getattr(module, "bias", None) is not None:
        return "layernorm", float(module.eps)
    if name in ("RmsNorm", "RMSNorm"):
        return "rmsnorm", float(module.eps)
    _refuse(architecture, f"a {name} norm")


def _activation(module, architecture: str) -> str:
    name = type(module).__name__
    if name == "GELU":
        return "gelu_tanh" if getattr(module, "approximate", "none") == "tanh" else "gelu"
    if name == "GELUTanh":
        return "gelu_tanh"
    found = {"QuickGELU": "quick_gelu", "SiLU": "silu", "ReLU": "relu"}.get(name)
    if found is None:
        _refuse(architecture, f"the activation {name}")
    return found


def _mlp(mlp, architecture: str) -> dict[str, Any]:
    name = type(mlp).__name__
    if type(getattr(mlp, "norm", None)).__name__ not in ("Identity", "NoneType"):
        _refuse(architecture, f"a norm inside the MLP ({name} with a {type(mlp.norm).__name__})")
    if name == "Mlp" and type(mlp.norm).__name__ == "Identity":
        return dict(mlp="mlp", d_ff=mlp.fc2.in_features, mlp_bias=mlp.fc2.bias is not None)
    if name == "SwiGLU" and type(mlp.norm).__name__ == "Identity":
        return dict(mlp="swiglu", d_ff=mlp.fc2.in_features, mlp_bias=mlp.fc2.bias is not None)
    if name == "GluMlp" and not mlp.gate_last and type(mlp.norm).__name__ == "Identity":
        return dict(mlp="swiglu_packed", d_ff=mlp.fc2.in_features,
                    mlp_bias=mlp.fc2.bias is not None)
    _refuse(architecture, f"the MLP {name} (with its options)")


def config_of_timm_model(m, architecture: str = "") -> ViTConfig:
    """Read a timm `VisionTransformer` (or `VisionTransformerDistilled`) into a `ViTConfig`."""
    architecture = architecture or type(m).__name__
    if type(m).__name__ not in ("VisionTransformer", "VisionTransformerDistilled"):
        _refuse(architecture, f"the model class {type(m).__name__}")
    block = m.blocks[0] if len(m.blocks) else None
    if block is not None and type(block).__name__ != "Block":
        _refuse(architecture, f"{type(block).__name__} blocks (parallel or post-norm residuals)")
    if m.pos_embed is None:
        _refuse(architecture, "no absolute position embedding")
    patch = tuple(m.patch_embed.patch_size)
    if patch[0] != patch[1]:
        _refuse(architecture, f"non-square patches {patch}")
    pool = POOLS.get(m.global_pool)
    if pool is None:
        _refuse(architecture, f"global_pool={m.global_pool!r}")
    if pool == "map":
        if m.attn_pool.latent_len != 1 or type(m.attn_pool.q_norm).__name__ != "Identity":
            _refuse(architecture, "a MAP head with several latents or q/k norms")
    if getattr(m, "pool_include_prefix", False):
        _refuse(architecture, "pooling that includes the prefix tokens")
    norms = {n: _norm(getattr(m, n), architecture) for n in ("norm_pre", "norm", "fc_norm")}
    patch_norm = _norm(m.patch_embed.norm, architecture)
    fields: dict[str, Any] = dict(
        image_size=tuple(m.patch_embed.img_size), patch_size=patch[0],
        in_channels=m.patch_embed.proj.in_channels, d_model=m.embed_dim,
        num_layers=len(m.blocks), num_classes=m.num_classes, pool=pool,
        class_token=m.cls_token is not None,
        dist_token=getattr(m, "dist_token", None) is not None,
        reg_tokens=getattr(m, "num_reg_tokens", 0) or 0,
        pos_embed_tokens="none" if m.no_embed_class else "all",
        norm_pre=norms["norm_pre"] is not None, patch_norm=patch_norm is not None,
        final_norm="pre_pool" if norms["norm"] else "post_pool" if norms["fc_norm"] else "none",
        patch_bias=m.patch_embed.proj.bias is not None,
        head_bias=getattr(m.head, "bias", None) is not None if m.num_classes else True)
    present = [n for n in (*norms.values(), patch_norm) if n is not None]
    if block is not None:
        attn = block.attn
        if type(attn).__name__ != "Attention":
            _refuse(architecture, f"{type(attn).__name__} attention")
        present += [_norm(block.norm1, architecture)]
        fields.update(num_heads=attn.num_heads, qkv_bias=attn.qkv.bias is not None,
                      proj_bias=attn.proj.bias is not None,
                      qk_norm=type(attn.q_norm).__name__ != "Identity",
                      layer_scale=type(block.ls1).__name__ == "LayerScale",
                      activation=_activation(block.mlp.act, architecture),
                      **_mlp(block.mlp, architecture))
        if type(getattr(attn, "norm", None)).__name__ not in ("Identity", "NoneType"):
            _refuse(architecture, "a norm inside attention")
    else:  # no blocks: the sizes a block would have are the MAP head's, or anything valid
        fields.update(num_heads=m.attn_pool.num_heads if pool == "map" else 1,
                      d_ff=m.attn_pool.mlp.fc1.out_features if pool == "map" else 4 * m.embed_dim)
    kinds = {kind for kind, _ in present}
    epsilons = {eps for _, eps in present}
    if len(kinds) > 1 or len(epsilons) > 1:
        _refuse(architecture, f"norms of different kinds or epsilons {sorted(present)}")
    if present:
        fields.update(norm=kinds.pop(), ln_eps=epsilons.pop())
    try:
        return ViTConfig(**fields)
    except ConfigError as e:
        raise LayoutError(f"timm {architecture!r} maps to no valid config: {e}") from None


def timm_config_json(cfg: Mapping[str, Any], where) -> tuple[dict[str, Any], dict[str, str]]:
    """A timm Hub folder's `config.json` (`architecture`, `model_args`, `num_classes`,
    `global_pool`, `pretrained_cfg.input_size`): every field through timm's registry when
    timm is installed; otherwise the few it states, and the rest is left to be assumed.
    Returns (fields, what was assumed)."""
    from weight_transfer.errors import CheckpointError
    from weight_transfer.hf_config import json_field

    architecture = json_field(cfg, "architecture", str, where)
    model_args = dict(json_field(cfg, "model_args", dict, where, {}))
    num_classes = json_field(cfg, "num_classes", int, where, None)
    global_pool = json_field(cfg, "global_pool", str, where, None)
    pretrained = json_field(cfg, "pretrained_cfg", dict, where, {})
    size = pretrained.get("input_size")
    if size is not None and not (isinstance(size, list) and len(size) == 3 and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise CheckpointError(f"{where}: config.json pretrained_cfg.input_size is {size!r}; "
                              f"expected [channels, height, width]")
    for key, value in (("num_classes", num_classes), ("global_pool", global_pool)):
        if value is not None:
            model_args.setdefault(key, value)
    if size is not None:
        model_args.setdefault("img_size", tuple(size[1:]))
    try:
        config = config_from_timm(architecture, model_args)
    except LayoutError as e:
        if "not installed" not in str(e):
            raise
        stated: dict[str, Any] = {}
        if num_classes is not None:
            stated["num_classes"] = num_classes
        if global_pool in POOLS:
            stated["pool"] = POOLS[global_pool]
        if size is not None:
            stated["image_size"] = tuple(size[1:])
        return stated, {"architecture": f"{architecture} not resolved: timm is not installed; "
                        f"the rest comes from the tensors and assumptions"}
    return config.to_dict(), {}


def timm_hub_config(config: ViTConfig) -> dict[str, Any]:
    """The `config.json` of a timm Hub folder holding `config`'s weights: the first of our
    presets' timm architectures that, given the sizes as `model_args`, builds exactly
    `config` (checked by building it on the meta device and reading it back, as a reader
    would). No such architecture: refused, naming the way out (a bare state dict)."""
    from vit_config import PRESETS, TIMM_ARCHS

    h, w = config.image_hw
    args = dict(img_size=h if h == w else [h, w], patch_size=config.patch_size,
                in_chans=config.in_channels, embed_dim=config.d_model, depth=config.num_layers,
                num_heads=config.num_heads, num_classes=config.num_classes)
    # timm takes int(embed_dim * mlp_ratio) as the hidden width (twice d_ff for a packed
    # SwiGLU): a half above lands on it exactly
    ratios = [(n * config.d_ff + 0.5) / config.d_model for n in (1, 2)]
    tried = []
    for preset in PRESETS:
        architecture = TIMM_ARCHS.get(preset)
        if architecture is None or architecture in tried:
            continue
        tried.append(architecture)
        for ratio in ratios:
            try:
                built = config_from_timm(architecture, {**args, "mlp_ratio": ratio})
            except LayoutError:
                continue
            if built.same_model(config):
                return {"architecture": architecture, "num_classes": config.num_classes,
                        "model_args": {**args, "mlp_ratio": ratio},
                        "pretrained_cfg": {"input_size": [config.in_channels, h, w],
                                           "num_classes": config.num_classes}}
    raise LayoutError(f"no timm architecture of {', '.join(tried)} builds this config (with "
                      f"its sizes as model_args); write a bare timm state dict instead (a "
                      f"destination ending in .safetensors)")
