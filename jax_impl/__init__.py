"""Vision Transformer in Flax NNX. Never imports torch."""

from jax_impl.model import Attention, Block, ViT
from jax_impl.seed import vit_cls_forward, vit_forward
from vit_config import ViTConfig

__all__ = ["Attention", "Block", "ViT", "ViTConfig", "vit_cls_forward", "vit_forward"]
