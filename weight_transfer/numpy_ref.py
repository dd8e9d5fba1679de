"""A NumPy ViT forward written from the seed's spec, independent of flax and torch.

Parameters come as the flat NNX dict (`blocks.0.attn.q.kernel` ...); patches are cut with
reshapes, not a convolution, so a wrong conv layout in either implementation shows up here.
`Knobs` switch on the variants other codebases use (pooling, norm position, attention scale,
CLS position...): the defaults are our ViT; the mismatch doctor turns them to test hypotheses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_erf = np.vectorize(math.erf)

ACTIVATIONS = {
    "relu": lambda x: np.maximum(x, 0),
    "gelu": lambda x: 0.5 * x * (1 + _erf(x / math.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
}


@dataclass(frozen=True)
class Knobs:
    # "cls": row 0; "mean": all tokens; "mean_patches": patch tokens only (timm 'avg' with a CLS)
    pool: str | None = None  # None: the config's
    # "before": LayerNorm, then pool (ours, timm norm); "after": pool, then LayerNorm (timm fc_norm)
    final_norm: str = "before"
    # multiplies the 1/sqrt(head_dim) score scale (sqrt(hd / D) gives 1/sqrt(d_model))
    score_factor: float = 1.0
    # "row0": the CLS token gets pos_embed row 0 (ours); "none": it gets no position
    cls_position: str = "row0"
    # "nhwc": images as given; "nchw_as_nhwc": NCHW bytes read as NHWC
    images: str = "nhwc"


def layernorm(x, scale, bias, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def read_images(images: np.ndarray, how: str) -> np.ndarray:
    """(B, H, W, C) as the model will see them."""
    if how == "nchw_as_nhwc":  # the NCHW buffer of the same images, reshaped (not transposed)
        b, h, w, c = images.shape
        return images.transpose(0, 3, 1, 2).reshape(b, h, w, c)
    return images


def forward(p: dict, images: np.ndarray, config, knobs: Knobs = Knobs()) -> dict[str, np.ndarray]:
    """Named intermediates (float64) of a batch of `(B, H, W, C)` images."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    x = read_images(np.asarray(images, np.float64), knobs.images)
    P, D, heads = config.patch_size, config.d_model, config.num_heads
    B, H, W, C = x.shape
    seen = {}
    grid = x.reshape(B, H // P, P, W // P, P, C).transpose(0, 1, 3, 2, 4, 5)  # (B, Hp, Wp, P, P, C)
    patches = grid.reshape(B, -1, P * P * C)  # rows in (kh, kw, c) order, grid row-major
    x = seen["patch_embed"] = patches @ p["patch_embed.kernel"].reshape(P * P * C, D) + p["patch_embed.bias"]
    pos = p["pos_embed"]
    has_cls = "cls_token" in p
    if has_cls:
        cls = np.broadcast_to(p["cls_token"], (B, 1, D))
        if knobs.cls_position == "none":
            pos = np.concatenate([np.zeros_like(pos[:1]), pos[1:]], axis=0)
        x = np.concatenate([cls, x], axis=1)
    x = seen["tokens"] = x + pos
    act = ACTIVATIONS[config.activation]
    bias = lambda name: p.get(name, 0.0)  # noqa: E731  (qkv_bias=False has none)
    T, hd = x.shape[1], D // heads
    for i in range(config.num_layers):
        b = f"blocks.{i}."
        h = layernorm(x, p[b + "ln1.scale"], p[b + "ln1.bias"], config.ln_eps)
        q, k, v = (h @ p[f"{b}attn.{n}.kernel"] + bias(f"{b}attn.{n}.bias") for n in "qkv")
        q, k, v = (t.reshape(B, T, heads, hd) for t in (q, k, v))
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd) * knobs.score_factor
        attn = np.einsum("bhqk,bkhd->bqhd", softmax(scores), v).reshape(B, T, D)
        a = seen[b + "attn"] = attn @ p[b + "attn.o.kernel"] + p[b + "attn.o.bias"]
        x = x + a
        h = layernorm(x, p[b + "ln2.scale"], p[b + "ln2.bias"], config.ln_eps)
        m = seen[b + "mlp"] = act(h @ p[b + "ff1.kernel"] + p[b + "ff1.bias"]) @ p[b + "ff2.kernel"] + p[b + "ff2.bias"]
        x = seen[b.rstrip(".")] = x + m
    norm = lambda t: layernorm(t, p["ln_f.scale"], p["ln_f.bias"], config.ln_eps)  # noqa: E731
    pool = knobs.pool or {"cls": "cls", "mean": "mean_patches"}[config.pool]
    take = {"cls": lambda t: t[:, 0], "mean": lambda t: t.mean(axis=1),
            "mean_patches": lambda t: t[:, int(has_cls):].mean(axis=1)}[pool]
    if knobs.final_norm == "before":
        pooled = take(seen.setdefault("ln_f", norm(x)))
    else:
        pooled = norm(take(x))
    seen["pooled"] = pooled
    seen["logits"] = pooled @ p["head.kernel"] + p["head.bias"]
    return seen
