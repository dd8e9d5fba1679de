"""Vision Transformer in PyTorch. Never imports jax or flax."""

from torch_impl.model import Attention, Block, ViT
from vit_config import ViTConfig

__all__ = ["Attention", "Block", "ViT", "ViTConfig"]
