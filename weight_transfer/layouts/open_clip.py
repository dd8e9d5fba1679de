"""open_clip and OpenAI CLIP image towers (`visual.*`): the table, the model names resolved
through open_clip's own registry (QuickGELU is in the model *name*, `ViT-B-32-quickgelu`, never
in the file; open_clip is imported only when a name is resolved), and the layout."""

from __future__ import annotations

from vit_config import ConfigError, ViTConfig
from weight_transfer.core.errors import LayoutError
from weight_transfer.core.resample import OPEN_CLIP
from weight_transfer.core.table import Rule, rule
from weight_transfer.core.transforms import BATCH_AXIS, FUSE_QKV, LINEAR
from weight_transfer.layouts.base import PLAIN, Layout, fused, renamed, renaming, require
from weight_transfer.layouts.timm import TIMM_LAYOUT, config_from_timm


def open_clip_table(config: ViTConfig) -> tuple[Rule, ...]:
    """open_clip / OpenAI CLIP `visual.*` (kept by the normaliser; the text tower left out):
    `class_embedding` (D,), `positional_embedding` (N + 1, D), torch MultiheadAttention's fused
    `in_proj`, `ln_post` on the tokens before the class token is taken, and `proj` (D, E), the
    bias-free projection encode_image ends with, stored (in, out)."""
    b = "transformer.resblocks.{}"
    return (
        rule("patch_embed.weight", "conv1.weight"),
        rule("cls_token", "class_embedding", BATCH_AXIS.reversed()),  # (1, D) <-> (D,)
        rule("pos_embed", "positional_embedding"),
        *renamed("norm_pre", "ln_pre"),
        *renamed("blocks.{}.ln1", f"{b}.ln_1"),
        *fused(
            [f"blocks.{{}}.attn.{p}" for p in "qkv"],
            f"{b}.attn.in_proj",
            FUSE_QKV,
            suffix=("_weight", "_bias"),
        ),
        *renamed("blocks.{}.attn.o", f"{b}.attn.out_proj"),
        *renamed("blocks.{}.ln2", f"{b}.ln_2"),
        *renamed("blocks.{}.ff1", f"{b}.mlp.c_fc"),
        *renamed("blocks.{}.ff2", f"{b}.mlp.c_proj"),
        *renamed("ln_f", "ln_post"),
        rule("head.weight", "proj", LINEAR),  # (E, D) <-> (D, E)
    )


SUPPORTED_VISION_KEYS = {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio"}


def is_open_clip_model(name: str) -> bool:
    try:
        import open_clip
    except ImportError:
        return False
    return name in open_clip.list_models()


def config_from_open_clip(name: str) -> ViTConfig:
    """The image tower of open_clip model `name` (what `encode_image` computes)."""
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None or "vision_cfg" not in cfg:
        raise LayoutError(f"open_clip model {name!r} has no vision_cfg")
    vision = cfg["vision_cfg"]
    if "timm_model_name" in vision:
        return _timm_tower(name, cfg["embed_dim"], vision)
    other = sorted(set(vision) - SUPPORTED_VISION_KEYS)
    if other:
        raise LayoutError(
            f"open_clip {name!r}: vision options {other} are not this ViT's "
            f"(a timm tower, layer scale, attention pooling...)"
        )
    width, size = vision["width"], vision["image_size"]
    try:
        return ViTConfig(
            image_size=tuple(size) if isinstance(size, list) else size,
            patch_size=vision["patch_size"],
            d_model=width,
            num_layers=vision["layers"],
            num_heads=width // vision.get("head_width", 64),
            d_ff=int(width * vision.get("mlp_ratio", 4.0)),
            num_classes=cfg["embed_dim"],
            pool="cls",
            activation="quick_gelu" if cfg.get("quick_gelu") else "gelu",
            ln_eps=1e-5,
            norm_pre=True,
            patch_bias=False,
            head_bias=False,
        )
    except ConfigError as e:
        raise LayoutError(f"open_clip {name!r} maps to no valid config: {e}") from None


_strip_visual = renaming(strip=("visual.",), keep_only_stripped="the text tower")


def normalise_open_clip(source):
    """A whole CLIP checkpoint (`visual.*`, the text tower left out), or a bare image tower
    (OpenAI's `model.visual.state_dict()`)."""
    if any(k.startswith("visual.") for k in source.meta):
        return _strip_visual(source)
    return source, []


# open_clip TimmModel options that do not change what the tower computes at inference
TIMM_TOWER_KEYS = {
    "image_size",
    "timm_model_name",
    "timm_model_pretrained",
    "timm_pool",
    "timm_proj",
    "timm_proj_bias",
    "timm_drop",
    "timm_drop_path",
    "patch_dropout",
}


def _timm_tower(name: str, embed_dim: int, vision: dict) -> ViTConfig:
    """open_clip's `TimmModel`: timm's `timm_model_name` as the trunk, pooled by `timm_pool`.
    With `timm_proj` unset (null) the trunk's own classifier (embed_dim outputs, with a bias)
    is the projection; "none": the pooled features; "linear": a `head.proj` after them (a bias
    per `timm_proj_bias`). Attention pools and an MLP projection are refused."""
    proj, pool = vision.get("timm_proj", "linear"), vision.get("timm_pool", "avg")
    other = sorted(set(vision) - TIMM_TOWER_KEYS)
    if other or proj == "mlp" or pool in ("abs_attn", "rot_attn"):
        what = other or [f"timm_proj={proj!r}" if proj == "mlp" else f"timm_pool={pool!r}"]
        raise LayoutError(f"open_clip {name!r}: timm tower options {what} are not this ViT's")
    size = vision.get("image_size", 224)
    args = {
        "img_size": tuple(size) if isinstance(size, list) else size,
        "num_classes": 0 if proj in ("none", "linear") else embed_dim,
        # a projection after the trunk keeps timm's own pooling unless one is named
        **({"global_pool": pool} if pool or proj != "linear" else {}),
    }
    config = config_from_timm(vision["timm_model_name"], args)
    if proj != "linear":
        return config
    return config.replace(num_classes=embed_dim, head_bias=bool(vision.get("timm_proj_bias")))


def normalise_timm_tower(source):
    """A whole open_clip model with a timm trunk: `visual.trunk.*` as timm's names, a
    `visual.head.proj` projection as the head; the text tower (everything else) left out."""
    names, text = {}, 0
    for key in source.meta:
        if key.startswith("visual.trunk."):
            names[key.removeprefix("visual.trunk.")] = key
        elif key.startswith("visual.head.proj."):
            names["head." + key.removeprefix("visual.head.proj.")] = key
        elif key.startswith("visual."):
            names[key] = key  # not a tower open_clip builds from these: the table will say
        else:
            text += 1
    return source.named(names), [f"{text} tensor(s): the text tower"] if text else []


def _timm_tower_name(key: str, config: ViTConfig) -> str:
    """Where open_clip keeps a timm tower's tensor: the trunk's, or a bias-free projection
    after the trunk (`timm_proj: linear`; timm's own classifiers always have a bias)."""
    if key.startswith("head.") and not config.head_bias:
        return "visual.head.proj." + key.removeprefix("head.")
    return "visual.trunk." + key


LAYOUTS = (
    Layout(
        "open_clip",
        "torch",
        open_clip_table,
        r"^(visual\.)?transformer\.resblocks\.\d+\.|^(visual\.)?class_embedding$",
        "open_clip / OpenAI CLIP image tower (visual.*; the text tower is left out)",
        priority=2,
        pool="cls",
        published=lambda key, c: f"visual.{key}",
        resampling=lambda c: OPEN_CLIP,
        check_writable=lambda c: require(
            c,
            "open_clip's VisionTransformer",
            **{**PLAIN, "norm_pre": True, "patch_bias": False},
            class_token=True,
            pool="cls",
            final_norm="pre_pool",
            pos_embed_tokens="all",
            head_bias=False,
        ),
        normalise=normalise_open_clip,
        lookalikes="the Perception Encoder release's spatial towers "
        "(facebookresearch/perception_models) have these keys and also rotate q and k "
        "(RoPE); read one with --from pe",
        # PE spatial: no final norm and no projection, which every CLIP tower has
        lookalike_keys=lambda keys: "ln_post.weight" not in keys and "proj" not in keys,
        assumes=dict(
            activation=(
                "gelu",
                "exact GELU (open_clip's default; OpenAI CLIP "
                "weights run QuickGELU: --arch NAME-quickgelu or --set "
                "activation=quick_gelu)",
            ),
            ln_eps=(1e-5, "1e-5 (open_clip, torch LayerNorm)"),
        ),
    ),
    Layout(
        "open_clip_timm",
        "torch",
        TIMM_LAYOUT.table,
        r"^visual\.trunk\.",
        "open_clip image tower on a timm trunk (visual.trunk.*, visual.head.proj: EVA02-*, "
        "PE-Core-*, SigLIP 2; --arch NAME; the text tower is left out)",
        priority=3,  # its text tower may carry open_clip's `transformer.resblocks`
        normalise=normalise_timm_tower,
        published=_timm_tower_name,
        resampling=TIMM_LAYOUT.resampling,
        computes=TIMM_LAYOUT.computes,
        assumes=TIMM_LAYOUT.assumes,
        lookalikes=TIMM_LAYOUT.lookalikes,
    ),
)
