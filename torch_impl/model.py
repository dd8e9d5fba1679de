"""Vision Transformer in PyTorch, with the same module tree and names as `jax_impl`.

Order: Attention, Block (pre-LN, MLP as ff1/ff2), ViT. Images are NCHW:
unbatched (C, H, W) -> (K,) or batched (B, C, H, W) -> (B, K).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vit_config import ViTConfig, check_image_shape

Tap = Callable[[str, torch.Tensor], torch.Tensor]


def _no_tap(name: str, value: torch.Tensor) -> torch.Tensor:
    return value


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,  # exact (erf), torch's default
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class Attention(nn.Module):
    """Multi-head self-attention from four Linear projections, through F.scaled_dot_product_attention."""

    def __init__(self, d_model: int, num_heads: int, *, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(d_model, d_model, bias=qkv_bias)
        self.k = nn.Linear(d_model, d_model, bias=qkv_bias)
        self.v = nn.Linear(d_model, d_model, bias=qkv_bias)
        self.o = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        split = (b, t, self.num_heads, d // self.num_heads)
        q, k, v = (proj(x).view(split).transpose(1, 2) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, hd), scale 1/sqrt(hd)
        return self.o(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LN encoder block: x + attn(ln1(x)), then x + ff2(act(ff1(ln2(x))))."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        c = config
        self.ln1 = nn.LayerNorm(c.d_model, eps=c.ln_eps)
        self.attn = Attention(c.d_model, c.num_heads, qkv_bias=c.qkv_bias)
        self.ln2 = nn.LayerNorm(c.d_model, eps=c.ln_eps)
        self.ff1 = nn.Linear(c.d_model, c.d_ff)
        self.ff2 = nn.Linear(c.d_ff, c.d_model)
        self.activation = c.activation

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff2(ACTIVATIONS[self.activation](self.ff1(x)))

    def forward(self, x: torch.Tensor, tap: Tap = _no_tap) -> torch.Tensor:
        x = x + tap("attn", self.attn(self.ln1(x)))
        return x + tap("mlp", self.mlp(self.ln2(x)))


class ViT(nn.Module):
    """patch_embed -> flatten -> [CLS] -> + pos_embed -> blocks -> ln_f -> pool -> head."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        c = self.config = config
        p = c.patch_size
        self.patch_embed = nn.Conv2d(c.in_channels, c.d_model, kernel_size=p, stride=p)
        if c.class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, c.d_model))
        self.pos_embed = nn.Parameter(torch.zeros(c.num_positions, c.d_model))
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.num_layers))
        self.ln_f = nn.LayerNorm(c.d_model, eps=c.ln_eps)
        self.head = nn.Linear(c.d_model, c.num_classes)

    @property
    def dtype(self) -> torch.dtype:
        return self.pos_embed.dtype

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, D): the class token's row, or the mean of the patch tokens."""
        if self.config.pool == "cls":
            return x[:, 0]
        return x[:, self.config.num_prefix_tokens:].mean(dim=1)

    def forward(self, images: torch.Tensor, *, return_intermediates: bool = False):
        """Logits for NCHW images; with `return_intermediates`, also a dict of named activations."""
        batched = check_image_shape(tuple(images.shape), self.config, "NCHW")
        x = images.to(self.dtype)
        x = x if batched else x[None]
        seen: dict[str, torch.Tensor] = {}

        def tap(name: str, value: torch.Tensor) -> torch.Tensor:
            if return_intermediates:
                seen[name] = value if batched else value[0]
            return value

        x = self.patch_embed(x)  # (B, D, Hp, Wp)
        x = tap("patch_embed", x.flatten(2).transpose(1, 2))  # (B, N, D), row-major over the grid
        if self.config.class_token:
            x = torch.cat([self.cls_token.expand(x.shape[0], 1, -1), x], dim=1)  # (B, 1 + N, D)
        x = tap("tokens", x + self.pos_embed)
        for i, block in enumerate(self.blocks):
            x = tap(f"blocks.{i}", block(x, lambda n, v, i=i: tap(f"blocks.{i}.{n}", v)))
        x = tap("ln_f", self.ln_f(x))
        pooled = tap("pooled", self.pool(x))  # (B, D)
        logits = tap("logits", self.head(pooled))  # (B, K)
        logits = logits if batched else logits[0]
        return (logits, seen) if return_intermediates else logits
