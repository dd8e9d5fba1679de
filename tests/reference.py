"""A NumPy forward written from the seed's spec, independent of flax and torch.

Parameters come as the flat NNX dict (`blocks.0.attn.q.kernel` ...); patches are cut with
reshapes, not a convolution, so a wrong conv layout in either implementation shows up here.
"""

import math

import numpy as np

_erf = np.vectorize(math.erf)

ACTIVATIONS = {
    "relu": lambda x: np.maximum(x, 0),
    "gelu": lambda x: 0.5 * x * (1 + _erf(x / math.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
}


def layernorm(x, scale, bias, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def forward(p: dict, image: np.ndarray, config) -> np.ndarray:
    """Logits `(K,)` of one `(H, W, C)` image, in float64."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    x = np.asarray(image, np.float64)
    P, D, heads = config.patch_size, config.d_model, config.num_heads
    H, W, C = x.shape
    grid = x.reshape(H // P, P, W // P, P, C).transpose(0, 2, 1, 3, 4)  # (Hp, Wp, P, P, C)
    patches = grid.reshape(-1, P * P * C)  # rows in (kh, kw, c) order, grid row-major
    x = patches @ p["patch_embed.kernel"].reshape(P * P * C, D) + p["patch_embed.bias"]
    if config.pool == "cls":
        x = np.concatenate([p["cls_token"], x], axis=0)
    x = x + p["pos_embed"]
    act = ACTIVATIONS[config.activation]
    bias = lambda name: p.get(name, 0.0)  # noqa: E731  (qkv_bias=False has none)
    for i in range(config.num_layers):
        b = f"blocks.{i}."
        h = layernorm(x, p[b + "ln1.scale"], p[b + "ln1.bias"], config.ln_eps)
        q, k, v = (h @ p[f"{b}attn.{n}.kernel"] + bias(f"{b}attn.{n}.bias") for n in "qkv")
        T, hd = x.shape[0], D // heads
        q, k, v = (t.reshape(T, heads, hd) for t in (q, k, v))
        w = softmax(np.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd))
        attn = np.einsum("hqk,khd->qhd", w, v).reshape(T, D)
        x = x + attn @ p[b + "attn.o.kernel"] + p[b + "attn.o.bias"]
        h = layernorm(x, p[b + "ln2.scale"], p[b + "ln2.bias"], config.ln_eps)
        x = x + act(h @ p[b + "ff1.kernel"] + p[b + "ff1.bias"]) @ p[b + "ff2.kernel"] + p[b + "ff2.bias"]
    x = layernorm(x, p["ln_f.scale"], p["ln_f.bias"], config.ln_eps)
    pooled = x[0] if config.pool == "cls" else x.mean(axis=0)
    return pooled @ p["head.kernel"] + p["head.bias"]
