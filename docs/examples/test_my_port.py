"""A hand-written Flax NNX port of timm's vit_small_patch16_224, checked against timm itself.

Run it with `pytest docs/examples/test_my_port.py` once vit-parity is installed: its pytest
plugin gives the `assert_equivalent` fixture. Nothing of vit-parity is in the port: its own
names, a fused qkv, its own weight copy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
from flax import nnx

DIM, HEADS, DEPTH, PATCH, CLASSES = 384, 6, 12, 16, 1000


class Attention(nnx.Module):
    def __init__(self, rngs):
        self.qkv = nnx.Linear(DIM, 3 * DIM, rngs=rngs)
        self.out = nnx.Linear(DIM, DIM, rngs=rngs)

    def __call__(self, x):
        b, t, _ = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, HEADS, DIM // HEADS)
        q, k, v = (qkv[:, :, i].swapaxes(1, 2) for i in range(3))  # (B, H, T, hd)
        weights = jax.nn.softmax(q @ k.swapaxes(-1, -2) / np.sqrt(DIM // HEADS), axis=-1)
        return self.out((weights @ v).swapaxes(1, 2).reshape(b, t, DIM))


class Layer(nnx.Module):
    def __init__(self, rngs):
        self.norm_a = nnx.LayerNorm(DIM, epsilon=1e-6, rngs=rngs)
        self.attention = Attention(rngs)
        self.norm_b = nnx.LayerNorm(DIM, epsilon=1e-6, rngs=rngs)
        self.up = nnx.Linear(DIM, 4 * DIM, rngs=rngs)
        self.down = nnx.Linear(4 * DIM, DIM, rngs=rngs)

    def __call__(self, x):
        x = x + self.attention(self.norm_a(x))
        return x + self.down(jax.nn.gelu(self.up(self.norm_b(x)), approximate=False))


class MyViT(nnx.Module):
    def __init__(self, rngs):
        self.patchify = nnx.Conv(3, DIM, (PATCH, PATCH), strides=PATCH, padding="VALID", rngs=rngs)
        self.cls = nnx.Param(jnp.zeros((1, 1, DIM)))
        self.pos = nnx.Param(jnp.zeros((1, 1 + (224 // PATCH) ** 2, DIM)))
        self.layers = nnx.List([Layer(rngs) for _ in range(DEPTH)])
        self.norm = nnx.LayerNorm(DIM, epsilon=1e-6, rngs=rngs)
        self.head = nnx.Linear(DIM, CLASSES, rngs=rngs)

    def __call__(self, images):  # (B, H, W, 3) -> (B, CLASSES)
        x = self.patchify(images)
        x = x.reshape(x.shape[0], -1, DIM)  # (B, N, D)
        cls = jnp.broadcast_to(self.cls[...], (x.shape[0], 1, DIM))
        x = jnp.concatenate([cls, x], axis=1) + self.pos[...]
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x)[:, 0])


def port(timm_model) -> MyViT:
    """The weight copy: torch's (out, in) weights transposed into flax's (in, out) kernels."""
    sd = {k: v.detach().numpy() for k, v in timm_model.state_dict().items()}
    model = MyViT(nnx.Rngs(0))
    model.patchify.kernel[...] = sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0)
    model.patchify.bias[...] = sd["patch_embed.proj.bias"]
    model.cls[...], model.pos[...] = sd["cls_token"], sd["pos_embed"]
    linear = lambda name: (sd[f"{name}.weight"].T, sd[f"{name}.bias"])
    norm = lambda name: (sd[f"{name}.weight"], sd[f"{name}.bias"])
    for i, layer in enumerate(model.layers):
        b, att = f"blocks.{i}", layer.attention
        layer.norm_a.scale[...], layer.norm_a.bias[...] = norm(f"{b}.norm1")
        layer.norm_b.scale[...], layer.norm_b.bias[...] = norm(f"{b}.norm2")
        att.qkv.kernel[...], att.qkv.bias[...] = linear(f"{b}.attn.qkv")
        att.out.kernel[...], att.out.bias[...] = linear(f"{b}.attn.proj")
        layer.up.kernel[...], layer.up.bias[...] = linear(f"{b}.mlp.fc1")
        layer.down.kernel[...], layer.down.bias[...] = linear(f"{b}.mlp.fc2")
    model.norm.scale[...], model.norm.bias[...] = norm("norm")
    model.head.kernel[...], model.head.bias[...] = linear("head")
    return model


@pytest.fixture(scope="module")
def reference():
    # random weights here; pretrained=True checks the published ones the same way
    return timm.create_model("vit_small_patch16_224", pretrained=False).eval()


def test_my_port_is_timms_function(reference, assert_equivalent):
    assert_equivalent(reference, port(reference), image_size=224)
