"""torch -> nnx -> torch and nnx -> torch -> nnx return every tensor bit for bit."""

import numpy as np
import pytest

from tests.conftest import tiny
from tests.helpers.models import assert_bit_exact
from weight_transfer import nnx_flat, to_nnx, to_torch, torch_flat
from weight_transfer.frameworks.runners import x64_for
from weight_transfer.frameworks.weights import random_nnx, random_torch

CONFIGS = [tiny(), tiny(pool="mean", qkv_bias=False, num_layers=0)]


# (make a random source, flatten it, carry it there and back)
WAYS = {
    "torch->nnx->torch": (random_torch, torch_flat, lambda m: to_torch(to_nnx(m))),
    "nnx->torch->nnx": (random_nnx, nnx_flat, lambda m: to_nnx(to_torch(m))),
}


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("config", CONFIGS, ids=["cls", "mean-nobias-0layers"])
@pytest.mark.parametrize("way", sorted(WAYS))
def test_round_trip_is_bit_exact(way, config, dtype):
    make, flat, there_and_back = WAYS[way]
    ctx = x64_for(dtype)
    with ctx:
        source = make(config, seed=7, dtype=dtype)
        returned = there_and_back(source)
        assert str(returned.dtype).removeprefix("torch.") == dtype
        assert_bit_exact(flat(source), flat(returned))


def test_random_fill_touches_every_parameter():
    """No parameter keeps a default init (zeros pos_embed/cls_token, ones LayerNorm scale)."""
    for flat in (nnx_flat(random_nnx(tiny())), torch_flat(random_torch(tiny()))):
        for key, value in flat.items():
            assert np.unique(value).size == value.size, f"{key} has repeated values"
