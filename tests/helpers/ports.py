"""Ports as users write them: their own module names, a fused qkv, their own weight-copy code,
with nothing of this project's on the candidate side. Faults are planted by name, in the copy
or in the module, the way they happen."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

# timm's `VisionTransformer(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=3,
# mlp_ratio=2, num_classes=5)`: the reference the ports below copy
SIZE = dict(image=16, patch=4, dim=24, depth=2, heads=3, hidden=48, classes=5)


def timm_reference(seed: int = 31, **kw):
    from timm.models.vision_transformer import VisionTransformer

    from tests.helpers.models import randomize

    s = SIZE
    return randomize(
        VisionTransformer(
            img_size=s["image"],
            patch_size=s["patch"],
            embed_dim=s["dim"],
            depth=s["depth"],
            num_heads=s["heads"],
            mlp_ratio=s["hidden"] / s["dim"],
            num_classes=s["classes"],
            **kw,
        ),
        seed,
    )


def _attention(q, k, v, heads):  # (B, T, D) each, any array library with swapaxes
    b, t, d = q.shape
    split = lambda x: x.reshape(b, t, heads, d // heads).swapaxes(1, 2)  # (B, H, T, hd)
    q, k, v = split(q), split(k), split(v)
    scores = q @ k.swapaxes(-1, -2) / math.sqrt(d // heads)
    return scores, v, (b, t, d)


# ---- a hand-written NNX port ------------------------------------------------------------------


class SelfAttention(nnx.Module):
    def __init__(self, dim, heads, rngs, fused=True):
        self.heads, self.fused = heads, fused
        if fused:
            self.to_qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
        else:
            self.query = nnx.Linear(dim, dim, rngs=rngs)
            self.key = nnx.Linear(dim, dim, rngs=rngs)
            self.value = nnx.Linear(dim, dim, rngs=rngs)
        self.out = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, x):
        if self.fused:
            q, k, v = jnp.split(self.to_qkv(x), 3, axis=-1)
        else:
            q, k, v = self.query(x), self.key(x), self.value(x)
        scores, v, (b, t, d) = _attention(q, k, v, self.heads)
        y = jax.nn.softmax(scores, axis=-1) @ v  # (B, H, T, hd)
        return self.out(y.swapaxes(1, 2).reshape(b, t, d))


class FeedForward(nnx.Module):
    def __init__(self, dim, hidden, rngs, approximate=False):
        self.up = nnx.Linear(dim, hidden, rngs=rngs)
        self.down = nnx.Linear(hidden, dim, rngs=rngs)
        self.approximate = approximate

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x), approximate=self.approximate))


class EncoderLayer(nnx.Module):
    def __init__(self, dim, heads, hidden, rngs, eps=1e-6, fused=True, approximate=False):
        self.pre_attn = nnx.LayerNorm(dim, epsilon=eps, rngs=rngs)
        self.attention = SelfAttention(dim, heads, rngs, fused)
        self.pre_ffn = nnx.LayerNorm(dim, epsilon=eps, rngs=rngs)
        self.ffn = FeedForward(dim, hidden, rngs, approximate)

    def __call__(self, x):
        x = x + self.attention(self.pre_attn(x))
        return x + self.ffn(self.pre_ffn(x))


class NNXViT(nnx.Module):
    """NHWC images -> logits, a class token and a learned position table."""

    def __init__(self, rngs=None, eps=1e-6, fused=True, approximate=False):
        s, rngs = SIZE, rngs or nnx.Rngs(0)
        d, p = s["dim"], s["patch"]
        self.embed = nnx.Conv(3, d, (p, p), strides=(p, p), padding="VALID", rngs=rngs)
        self.cls = nnx.Param(jnp.zeros((1, 1, d)))
        self.positions = nnx.Param(jnp.zeros((1, 1 + (s["image"] // p) ** 2, d)))
        self.layers = nnx.List(
            [
                EncoderLayer(d, s["heads"], s["hidden"], rngs, eps, fused, approximate)
                for _ in range(s["depth"])
            ]
        )
        self.final_norm = nnx.LayerNorm(d, epsilon=eps, rngs=rngs)
        self.classifier = nnx.Linear(d, s["classes"], rngs=rngs)

    def __call__(self, images):
        x = self.embed(images)  # (B, Hp, Wp, D)
        b = x.shape[0]
        x = x.reshape(b, -1, x.shape[-1])
        x = jnp.concatenate([jnp.broadcast_to(self.cls[...], (b, 1, x.shape[-1])), x], axis=1)
        x = x + self.positions[...]
        for layer in self.layers:
            x = layer(x)
        return self.classifier(self.final_norm(x)[:, 0])


def copy_timm_into_nnx(timm_model, port: NNXViT, faults=()) -> NNXViT:
    """The user's weight copy: torch (out, in) weights transposed into flax kernels."""
    sd = {k: v.detach().numpy() for k, v in timm_model.state_dict().items()}
    conv = sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0)  # (O, I, kh, kw) -> (kh, kw, I, O)
    if "conv_hw_swapped" in faults:
        conv = sd["patch_embed.proj.weight"].transpose(3, 2, 1, 0)
    port.embed.kernel[...] = conv
    port.embed.bias[...] = sd["patch_embed.proj.bias"]
    port.cls[...] = sd["cls_token"]
    port.positions[...] = sd["pos_embed"]
    for i, layer in enumerate(port.layers):
        t = f"blocks.{i}."
        layer.pre_attn.scale[...], layer.pre_attn.bias[...] = (
            sd[t + "norm1.weight"],
            sd[t + "norm1.bias"],
        )
        layer.pre_ffn.scale[...], layer.pre_ffn.bias[...] = (
            sd[t + "norm2.weight"],
            sd[t + "norm2.bias"],
        )
        qkv_w, qkv_b = sd[t + "attn.qkv.weight"], sd[t + "attn.qkv.bias"]
        att = layer.attention
        if att.fused:
            att.to_qkv.kernel[...], att.to_qkv.bias[...] = qkv_w.T, qkv_b
        else:
            w, b = np.split(qkv_w, 3), np.split(qkv_b, 3)
            order = (1, 0, 2) if "qk_exchanged" in faults and i == 1 else (0, 1, 2)
            for name, j in zip(("query", "key", "value"), order, strict=True):
                getattr(att, name).kernel[...] = w[j].T
                getattr(att, name).bias[...] = b[j]
        out = sd[t + "attn.proj.weight"]
        att.out.kernel[...] = out if "proj_untransposed" in faults and i == 1 else out.T
        att.out.bias[...] = sd[t + "attn.proj.bias"]
        layer.ffn.up.kernel[...], layer.ffn.up.bias[...] = (
            sd[t + "mlp.fc1.weight"].T,
            sd[t + "mlp.fc1.bias"],
        )
        layer.ffn.down.kernel[...], layer.ffn.down.bias[...] = (
            sd[t + "mlp.fc2.weight"].T,
            sd[t + "mlp.fc2.bias"],
        )
    port.final_norm.scale[...], port.final_norm.bias[...] = sd["norm.weight"], sd["norm.bias"]
    port.classifier.kernel[...], port.classifier.bias[...] = sd["head.weight"].T, sd["head.bias"]
    return port


# ---- a hand-written Linen port ------------------------------------------------------------------


class LinenBlock(nn.Module):
    dim: int
    heads: int
    hidden: int
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(epsilon=self.eps, name="ln_1")(x)
        q, k, v = jnp.split(nn.Dense(3 * self.dim, name="qkv")(h), 3, axis=-1)
        scores, v, (b, t, d) = _attention(q, k, v, self.heads)
        y = (jax.nn.softmax(scores, axis=-1) @ v).swapaxes(1, 2).reshape(b, t, d)
        x = x + nn.Dense(self.dim, name="attn_out")(y)
        h = nn.LayerNorm(epsilon=self.eps, name="ln_2")(x)
        h = nn.Dense(self.dim, name="mlp_out")(
            jax.nn.gelu(nn.Dense(self.hidden, name="mlp_in")(h), approximate=False)
        )
        return x + h


class LinenViT(nn.Module):
    eps: float = 1e-6

    @nn.compact
    def __call__(self, images):
        s = SIZE
        d, p = s["dim"], s["patch"]
        x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", name="stem")(images)
        b = x.shape[0]
        x = x.reshape(b, -1, d)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
        pos = self.param("pos", nn.initializers.zeros, (1, 1 + x.shape[1], d))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1) + pos
        for i in range(s["depth"]):
            x = LinenBlock(d, s["heads"], s["hidden"], self.eps, name=f"block{i}")(x)
        x = nn.LayerNorm(epsilon=self.eps, name="ln_f")(x)
        return nn.Dense(s["classes"], name="logits")(x[:, 0])


def timm_to_linen(timm_model, faults=()) -> dict:
    sd = {k: v.detach().numpy() for k, v in timm_model.state_dict().items()}
    dense = lambda n: {"kernel": sd[n + ".weight"].T, "bias": sd[n + ".bias"]}
    norm = lambda n: {"scale": sd[n + ".weight"], "bias": sd[n + ".bias"]}
    params = {
        "stem": {
            "kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
            "bias": sd["patch_embed.proj.bias"],
        },
        "cls": sd["cls_token"],
        "pos": sd["pos_embed"],
        "ln_f": norm("norm"),
        "logits": dense("head"),
    }
    for i in range(SIZE["depth"]):
        t = f"blocks.{i}."
        params[f"block{i}"] = {
            "ln_1": norm(t + "norm1"),
            "qkv": dense(t + "attn.qkv"),
            "attn_out": dense(t + "attn.proj"),
            "ln_2": norm(t + "norm2"),
            "mlp_in": dense(t + "mlp.fc1"),
            "mlp_out": dense(t + "mlp.fc2"),
        }
    if "out_untransposed" in faults:
        params["block1"]["attn_out"]["kernel"] = sd["blocks.1.attn.proj.weight"]
    return {"params": jax.tree.map(jnp.asarray, params)}


# ---- a hand-written torch port (fused qkv) of Hugging Face's ViT ----------------------------


class TorchViT(torch.nn.Module):
    """NCHW images -> logits, with a fused qkv where HF keeps q, k and v apart."""

    def __init__(self, eps=1e-12):
        super().__init__()
        s = SIZE
        d, p = s["dim"], s["patch"]
        self.stem = torch.nn.Conv2d(3, d, p, stride=p)
        self.cls = torch.nn.Parameter(torch.zeros(1, 1, d))
        self.pos = torch.nn.Parameter(torch.zeros(1, 1 + (s["image"] // p) ** 2, d))
        self.blocks = torch.nn.ModuleList(
            [TorchBlock(d, s["heads"], s["hidden"], eps) for _ in range(s["depth"])]
        )
        self.norm = torch.nn.LayerNorm(d, eps=eps)
        self.fc = torch.nn.Linear(d, s["classes"])

    def forward(self, images):
        x = self.stem(images).flatten(2).transpose(1, 2)  # (B, N, D)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.fc(self.norm(x)[:, 0])


class TorchBlock(torch.nn.Module):
    def __init__(self, dim, heads, hidden, eps):
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = torch.nn.LayerNorm(dim, eps=eps), torch.nn.LayerNorm(dim, eps=eps)
        self.qkv, self.o = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        self.f1, self.f2 = torch.nn.Linear(dim, hidden), torch.nn.Linear(hidden, dim)

    def forward(self, x):
        q, k, v = self.qkv(self.n1(x)).chunk(3, dim=-1)
        scores, v, (b, t, d) = _attention(q, k, v, self.heads)
        x = x + self.o((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.f2(torch.nn.functional.gelu(self.f1(self.n2(x))))


def hf_reference(seed: int = 33, attention: str = "sdpa"):
    from transformers import ViTConfig, ViTForImageClassification

    from tests.helpers.models import randomize

    s = SIZE
    config = ViTConfig(
        image_size=s["image"],
        patch_size=s["patch"],
        hidden_size=s["dim"],
        num_hidden_layers=s["depth"],
        num_attention_heads=s["heads"],
        intermediate_size=s["hidden"],
        num_labels=s["classes"],
        attn_implementation=attention,  # eager: a float32 softmax even in float64
    )
    return randomize(ViTForImageClassification(config), seed)


def copy_hf_into_torch(hf, port: TorchViT, faults=()) -> TorchViT:
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    e = "vit.embeddings."
    own = {
        "stem.weight": sd[e + "patch_embeddings.projection.weight"],
        "stem.bias": sd[e + "patch_embeddings.projection.bias"],
        "cls": sd[e + "cls_token"],
        "pos": sd[e + "position_embeddings"],
        "norm.weight": sd["vit.layernorm.weight"],
        "norm.bias": sd["vit.layernorm.bias"],
        "fc.weight": sd["classifier.weight"],
        "fc.bias": sd["classifier.bias"],
    }
    for i in range(SIZE["depth"]):  # transformers 5's names
        h, t = f"vit.layers.{i}.", f"blocks.{i}."
        order = ("k", "q", "v") if "qk_exchanged" in faults else ("q", "k", "v")
        for leaf in ("weight", "bias"):
            own[t + "qkv." + leaf] = torch.cat([sd[f"{h}attention.{n}_proj.{leaf}"] for n in order])
        o = sd[h + "attention.o_proj.weight"]
        own[t + "o.weight"] = o.T if "o_transposed" in faults and i == 0 else o
        own[t + "o.bias"] = sd[h + "attention.o_proj.bias"]
        for ours, theirs in (
            ("n1", "layernorm_before"),
            ("n2", "layernorm_after"),
            ("f1", "mlp.fc1"),
            ("f2", "mlp.fc2"),
        ):
            for leaf in ("weight", "bias"):
                own[f"{t}{ours}.{leaf}"] = sd[f"{h}{theirs}.{leaf}"]
    port.load_state_dict(own, strict=True)
    return port.eval()
