"""The scanned layer stack: same function as the loop, bit-exact conversion between layouts."""

import jax
import numpy as np
import pytest
from flax import nnx

import jax_impl
import weight_transfer as wt
from tests.conftest import assert_close, tiny
from tests.helpers.models import assert_bit_exact
from weight_transfer.frameworks.runners import random_images, run_nnx, run_torch
from weight_transfer.frameworks.weights import random_nnx, random_torch


@pytest.mark.parametrize(
    "config",
    [
        tiny(),
        tiny(pool="mean", qkv_bias=False, num_layers=3),
        tiny(block="parallel", layer_scale=True),  # ViT-22B's block
        tiny(num_parallel=2, layer_scale=True),  # branches: blocks.parallel.{j}
    ],
    ids=["vit", "no-qkv-bias", "parallel", "branches"],
)
def test_scan_layout_round_trip_and_logits(config):
    loop = random_nnx(config, seed=3)
    stacked = wt.stack_layers(wt.nnx_flat(loop), config)
    q = "blocks.parallel.1.attn.q.kernel" if config.num_parallel > 1 else "blocks.attn.q.kernel"
    assert stacked[q].shape == (config.num_layers, 24, 24)
    assert_bit_exact(wt.nnx_flat(loop), wt.unstack_layers(stacked, config))
    scanned = wt.nnx_from_flat(stacked, config, scan_layers=True)
    assert scanned.scan_layers and not isinstance(scanned.blocks, nnx.List)
    images = random_images(config, 2)
    with jax.default_matmul_precision("highest"):
        ref, seen_ref = run_nnx(loop, images, return_intermediates=True)
        out, seen = run_nnx(scanned, images, return_intermediates=True)
    assert sorted(seen) == sorted(seen_ref)
    for name in seen:
        assert_close(seen_ref[name], seen[name], "float32", name)
    assert_close(ref, out, "float32", "scan vs loop")


def test_scan_bridges_to_torch_both_ways():
    config = tiny()
    source = random_torch(config, seed=4)
    scanned = wt.to_nnx(source, scan_layers=True)
    assert scanned.scan_layers
    assert_bit_exact(wt.torch_flat(source), wt.torch_flat(wt.to_torch(scanned)))
    images = random_images(config, 2)
    with jax.default_matmul_precision("highest"):
        assert_close(
            run_torch(source, images), run_nnx(scanned, images), "float32", "torch vs scanned nnx"
        )


@pytest.mark.slow  # 3.8 s (--durations): the scanned layouts' round trips stay quick
def test_scan_init_builds_per_layer_params():
    model = jax_impl.ViT(tiny(num_layers=3), rngs=nnx.Rngs(0), scan_layers=True)
    q = np.asarray(model.blocks.attn.q.kernel[...])
    assert q.shape == (3, 24, 24) and not np.allclose(q[0], q[1])


@pytest.mark.slow  # 3.9 s (--durations); the scanned and loop parity stays quick
def test_fused_attention_is_the_same_function():
    config = tiny()
    loop = random_nnx(config, seed=8)
    graphdef, state = nnx.split(loop)
    fused = jax_impl.ViT(config, rngs=nnx.Rngs(0), fused_attention=True)
    nnx.update(fused, state)
    images = random_images(config, 2)
    with jax.default_matmul_precision("highest"):
        assert_close(run_nnx(loop, images), run_nnx(fused, images), "float32", "fused attention")
