"""Hugging Face's `config.json` for ViT, both ways: the fields it states (checked, never
replaced by a default when present but unknown), the config.json we write, and how a
checkpoint's HF key names are normalised (ViTModel -> ViTForImageClassification)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vit_config import ViTConfig
from weight_transfer.checkpoint import Source
from weight_transfer.errors import CheckpointError, LayoutError

# transformers' ACT2FN names -> ours; the first name of each of ours is what we write.
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                  "gelu_fast": "gelu_tanh", "relu": "relu", "quick_gelu": "quick_gelu",
                  "silu": "silu", "swish": "silu"}
HF_ACTIVATION_NAMES = {ours: theirs for theirs, ours in reversed(HF_ACTIVATIONS.items())}


_MISSING = object()


def json_field(cfg: Mapping[str, Any], key: str, kinds: type | tuple[type, ...], where: Path,
               default: Any = _MISSING) -> Any:
    """`cfg[key]`, checked to be one of `kinds` (a bool is never taken for a number); absent,
    `default` (null is a value, and refused like any other of the wrong type)."""
    if key not in cfg:
        if default is _MISSING:
            raise CheckpointError(f"{where}: config.json has no {key!r}")
        return default
    value = cfg[key]
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise CheckpointError(f"{where}: config.json {key!r} is {value!r}; expected {names}")
    return value


def hf_config_fields(hf: Mapping[str, Any], where: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The fields a Hugging Face ViT (or DeiT) `config.json` states, checked: an activation or
    size this ViT cannot run is refused by name, never replaced by a default. Returns (fields,
    what was assumed): HF states everything this reads, so nothing is assumed."""
    return _common(hf, where, "gelu", 1e-12, 224), {}


def normalise_hf(source: Source) -> tuple[Source, list[str]]:
    """ViTModel -> the ViTForImageClassification names: add `vit.`; its tanh pooler is dropped;
    with no classifier, the head is set to the identity so logits are the CLS features.
    Returns a new `Source` (the one given is left as it is) and what was dropped."""
    keys = list(source.meta)
    if any(k.startswith("vit.") for k in keys) or not any(k.startswith("embeddings.") for k in keys):
        return source, []  # ViTForImageClassification names, or not HF (the table will say)
    renamed = {("vit." + k if not k.startswith(("pooler.", "classifier.")) else k): k for k in keys}
    dropped = [new for new in renamed if new.startswith("pooler.")]
    for new in dropped:
        del renamed[new]
    meta = {new: source.meta[old] for new, old in renamed.items()}
    extra: dict[str, np.ndarray] = {}
    if "classifier.weight" not in meta:
        d = next((m[0][-1] for k, m in meta.items() if k.endswith("layernorm.weight")), None)
        if d is None:
            flax = source.metadata.get("format") == "flax" or any(
                k.endswith((".kernel", ".scale")) for k in keys)
            raise CheckpointError(f"{source.path}: no final layernorm.weight, so not a Hugging Face "
                                  f"ViT in PyTorch names" + (" (these are Flax names: Hugging "
                                  f"Face Flax checkpoints are not read yet)" if flax else ""))
        dtype = next(iter(meta.values()))[1]
        extra = {"classifier.weight": np.eye(d, dtype=dtype), "classifier.bias": np.zeros(d, dtype)}
        meta.update({k: (a.shape, a.dtype) for k, a in extra.items()})
        dropped.append("(no classifier: head set to the identity; logits = final-norm CLS features)")
    load = source.load
    # keys renamed: no in-order reader (read in header order, digest the files afterwards)
    return dataclasses.replace(source, meta=meta, reader=None, load=lambda k: extra[k] if k in extra
                               else load(renamed[k])), dropped


def _hf_json(config: ViTConfig, architecture: str, model_type: str, **fields) -> dict[str, Any]:
    """What every HF vision config.json we write says: sizes, activation, epsilon, labels."""
    h, w = config.image_hw
    labels = {"num_labels": config.num_classes,
              "id2label": {str(i): f"LABEL_{i}" for i in range(config.num_classes)},
              "label2id": {f"LABEL_{i}": i for i in range(config.num_classes)}}
    return {"architectures": [architecture], "model_type": model_type,
            "hidden_size": config.d_model, "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_heads, "intermediate_size": config.d_ff,
            "hidden_act": HF_ACTIVATION_NAMES[config.activation], "layer_norm_eps": config.ln_eps,
            "image_size": h if h == w else [h, w], "patch_size": config.patch_size,
            "num_channels": config.in_channels, "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0, **(labels if config.num_classes else {}),
            **fields}


def require(config: ViTConfig, what: str, **fields: Any) -> None:
    """Refuse a model `what` cannot compute, naming each field it fixes."""
    wrong = [f"{k}={getattr(config, k)!r} (it needs {v!r})" for k, v in fields.items()
             if getattr(config, k) != v]
    if wrong:
        raise LayoutError(f"{what} cannot hold this model: {', '.join(wrong)}")


PLAIN = dict(norm="layernorm", norm_pre=False, patch_norm=False, qk_norm=False,
             layer_scale=False, reg_tokens=0, dist_token=False, mlp="mlp", proj_bias=True,
             mlp_bias=True, patch_bias=True)  # what ViT-like classes have no switch for


def hf_config_json(config: ViTConfig) -> dict[str, Any]:
    if config.pool != "cls":
        raise LayoutError("the HF ViT reads its classifier from the class token's row: a "
                          "mean-pool model has no HF ViT equivalent")
    require(config, "HF ViTForImageClassification", **PLAIN, class_token=True,
             final_norm="pre_pool", pos_embed_tokens="all", head_bias=True)
    return _hf_json(config, "ViTForImageClassification", "vit", qkv_bias=config.qkv_bias)


def deit_config_json(config: ViTConfig) -> dict[str, Any]:
    require(config, "HF DeiTForImageClassificationWithTeacher",
             **{**PLAIN, "dist_token": True}, class_token=True, pool="cls",
             final_norm="pre_pool", pos_embed_tokens="all", head_bias=True)
    return _hf_json(config, "DeiTForImageClassificationWithTeacher", "deit",
                    qkv_bias=config.qkv_bias)


def dinov2_config_json(config: ViTConfig) -> dict[str, Any]:
    """Dinov2 / Dinov2WithRegisters, the model (pooled: the normed class token) or the
    classifier (on [class token, patch mean]). HF derives the MLP width from `mlp_ratio`; the
    ratio (an integer in transformers 5) must give exactly d_ff, for SwiGLU through its
    2/3-and-round-to-8."""
    gated = config.mlp != "mlp"
    require(config, "HF Dinov2", **{**PLAIN, "layer_scale": True, "reg_tokens": config.reg_tokens,
                                     "mlp": config.mlp}, class_token=True,
             pool="cls_mean" if config.num_classes else "cls", final_norm="pre_pool",
             pos_embed_tokens="cls" if config.reg_tokens else "all",
             **({"activation": "silu"} if gated else {}))
    width = (lambda hidden: (int(hidden * 2 / 3) + 7) // 8 * 8) if gated else (lambda h: h)
    ratio = next((r for r in range(1, 17) if width(config.d_model * r) == config.d_ff), None)
    if ratio is None:
        raise LayoutError(f"d_ff {config.d_ff}: HF Dinov2 derives the MLP width from an integer "
                          f"mlp_ratio times hidden_size {config.d_model}, and none gives it")
    registers = config.reg_tokens > 0
    model_type = "dinov2_with_registers" if registers else "dinov2"
    name = "Dinov2WithRegisters" if registers else "Dinov2"
    head = "ForImageClassification" if config.num_classes else "Model"
    return _hf_json(config, f"{name}{head}", model_type, qkv_bias=config.qkv_bias,
                    mlp_ratio=ratio, use_swiglu_ffn=gated,
                    layerscale_value=1.0, drop_path_rate=0.0,
                    **({"num_register_tokens": config.reg_tokens} if registers else {}))


def siglip_config_json(config: ViTConfig) -> dict[str, Any]:
    require(config, "HF SiglipVisionModel", **PLAIN, class_token=False, pool="map",
             final_norm="pre_pool", pos_embed_tokens="all", num_classes=0)
    return _hf_json(config, "SiglipVisionModel", "siglip_vision_model")


def clip_config_json(config: ViTConfig) -> dict[str, Any]:
    """CLIPVisionModel, or CLIPVisionModelWithProjection when there is a (projection) head."""
    require(config, "HF CLIPVisionModel", **{**PLAIN, "norm_pre": True, "patch_bias": False},
             class_token=True, pool="cls", final_norm="post_pool", pos_embed_tokens="all",
             head_bias=False)
    if config.num_classes:
        return {**_hf_json(config.replace(num_classes=0), "CLIPVisionModelWithProjection",
                           "clip_vision_model"), "projection_dim": config.num_classes}
    return _hf_json(config, "CLIPVisionModel", "clip_vision_model")


# ---- the family's Hugging Face model types ---------------------------------------------------


def vision_config(hf: Mapping[str, Any], where: Path) -> Mapping[str, Any]:
    """The vision tower's config: nested in whole CLIP/SigLIP repos, the config itself
    otherwise."""
    nested = hf.get("vision_config")
    if nested is None:
        return hf
    if not isinstance(nested, dict):
        raise CheckpointError(f"{where}: config.json vision_config is {nested!r}; expected an "
                              f"object")
    return nested


def _act(cfg: Mapping[str, Any], where: Path, default: str) -> str:
    act = json_field(cfg, "hidden_act", str, where, default)
    if act not in HF_ACTIVATIONS:
        raise CheckpointError(f"{where}: config.json hidden_act {act!r} is not supported (known: "
                              f"{', '.join(sorted(HF_ACTIVATIONS))}); refusing rather than "
                              f"running a different activation")
    return HF_ACTIVATIONS[act]


def _common(cfg: Mapping[str, Any], where: Path, act: str, eps: float,
            size: int) -> dict[str, Any]:
    return dict(num_heads=json_field(cfg, "num_attention_heads", int, where),
                ln_eps=json_field(cfg, "layer_norm_eps", (float, int), where, eps),
                activation=_act(cfg, where, act),
                image_size=json_field(cfg, "image_size", (int, list), where, size))


def dinov2_config_fields(hf: Mapping[str, Any], where: Path):
    """HF `dinov2` / `dinov2_with_registers`: eps 1e-6, exact GELU (SiLU gates a SwiGLU)."""
    fields = _common(hf, where, "gelu", 1e-6, 518)
    if json_field(hf, "use_swiglu_ffn", bool, where, False):
        fields["activation"] = "silu"
    return fields, {}


def siglip_config_fields(hf: Mapping[str, Any], where: Path):
    """HF `siglip` / `siglip_vision_model`: tanh GELU, eps 1e-6, the MAP head's output."""
    cfg = vision_config(hf, where)
    return _common(cfg, where, "gelu_pytorch_tanh", 1e-6, 224), {}


def clip_config_fields(hf: Mapping[str, Any], where: Path):
    """HF `clip` / `clip_vision_model`: QuickGELU and eps 1e-5 by default."""
    cfg = vision_config(hf, where)
    return _common(cfg, where, "quick_gelu", 1e-5, 224), {}


def renaming(strip: tuple[str, ...] = (), drop: tuple[tuple[str, str], ...] = (),
             keep_only_stripped: str | None = None):
    """A normaliser: key prefixes stripped, and keys dropped with the reason reported (a text
    tower, an unused mask token), so one table reads every published variant. With
    `keep_only_stripped`, every key outside the `strip` prefixes is dropped for that reason."""
    if keep_only_stripped is not None:
        drop = (*drop, ("", keep_only_stripped))

    def normalise(source: Source) -> tuple[Source, list[str]]:
        renamed, reasons = {}, {}
        for key in source.meta:
            if keep_only_stripped is not None and key.startswith(strip):
                reason = None
            else:
                reason = next((why for prefix, why in drop if key.startswith(prefix)), None)
            if reason is not None:
                reasons.setdefault(reason, 0)
                reasons[reason] += 1
                continue
            new = next((key[len(p):] for p in strip if key.startswith(p)), key)
            renamed[new] = key
        if renamed == {k: k for k in source.meta}:
            return source, []
        dropped = [f"{n} tensor(s): {why}" for why, n in reasons.items()]
        load = source.load
        return dataclasses.replace(source, meta={n: source.meta[o] for n, o in renamed.items()},
                                   reader=None, load=lambda k: load(renamed[k])), dropped

    return normalise
