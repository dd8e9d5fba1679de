"""open_clip (and OpenAI CLIP) image towers as `ViTConfig`s, from open_clip's own model
registry: whether a checkpoint runs QuickGELU is in the model *name* (`ViT-B-32-quickgelu`),
never in the file. Imports open_clip only when called."""

from __future__ import annotations

from vit_config import ConfigError, ViTConfig
from weight_transfer.errors import LayoutError

SUPPORTED_VISION_KEYS = {"image_size", "layers", "width", "patch_size", "head_width",
                         "mlp_ratio"}


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
    other = sorted(set(vision) - SUPPORTED_VISION_KEYS)
    if other or "timm_model_name" in vision:
        raise LayoutError(f"open_clip {name!r}: vision options {other} are not this ViT's "
                          f"(a timm tower, layer scale, attention pooling...)")
    width, size = vision["width"], vision["image_size"]
    try:
        return ViTConfig(
            image_size=tuple(size) if isinstance(size, list) else size,
            patch_size=vision["patch_size"], d_model=width, num_layers=vision["layers"],
            num_heads=width // vision.get("head_width", 64),
            d_ff=int(width * vision.get("mlp_ratio", 4.0)), num_classes=cfg["embed_dim"],
            pool="cls", activation="quick_gelu" if cfg.get("quick_gelu") else "gelu",
            ln_eps=1e-5, norm_pre=True, patch_bias=False, head_bias=False)
    except ConfigError as e:
        raise LayoutError(f"open_clip {name!r} maps to no valid config: {e}") from None
