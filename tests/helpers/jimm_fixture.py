"""jimm's models as tests/fixtures/jimm.json records them: each model's parameter tree (the
paths and shapes `nnx.state(model, nnx.Param)` has, list indices as ints) and what jimm's own
forward computed in float64 once every parameter was filled from `fill` below. The values are
made by integer arithmetic (splitmix64), so the tree is rebuilt here, on any machine, to the
bit that jimm saw; tests/fixtures/make_jimm.py wrote the file from jimm's source."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).parent.parent / "fixtures" / "jimm.json"


def fill(shape, seed: int) -> np.ndarray:
    """Values in [-0.5, 0.5), each a multiple of 2**-24 (exact in float32), from splitmix64."""
    n = int(np.prod(shape, dtype=np.int64))
    with np.errstate(over="ignore"):
        z = np.arange(n, dtype=np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(40)).astype(np.float64) / 2**24 - 0.5).reshape(shape)


def tree(params: list, dtype=np.float64) -> dict:
    """The nested pure dict of `params` ([path, shape] pairs), leaf i filled with seed i + 1."""
    out: dict = {}
    for i, (path, shape) in enumerate(params):
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = fill(shape, i + 1).astype(dtype)
    return out


def flat(params: list, dtype=np.float64) -> dict[str, np.ndarray]:
    """The same tree with '.'-joined names, as a flat safetensors holds it."""
    return {
        ".".join(map(str, path)): fill(shape, i + 1).astype(dtype)
        for i, (path, shape) in enumerate(params)
    }


def images(shape) -> np.ndarray:
    return 2 * fill(shape, 10_000)


def models() -> dict:
    return json.loads(FIXTURE.read_text())["models"]
