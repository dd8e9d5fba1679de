"""Other NNX ViT libraries' states: jax-ml/bonsai's ViTClassificationModel (its source vendored
in tests/helpers/bonsai_vit.py as the oracle), every parameter random, saved as a training loop
saves an NNX state (Orbax) or flat (safetensors): read with no hints into both frameworks, it
computes what bonsai computes; written back (`bonsai_vit`), bonsai's model takes it by path and
computes the same, every weight bit-exact."""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest
from flax import nnx

import weight_transfer as wt
from tests.conftest import assert_close
from tests.helpers import bonsai_vit
from weight_transfer.frameworks.runners import run_nnx, run_torch

CONFIG = bonsai_vit.ModelConfig(
    image_size=(16, 16),
    patch_size=(4, 4),
    num_channels=3,
    hidden_dim=24,
    attn_dropout_prob=0.0,
    dropout_prob=0.0,
    num_heads=3,
    mlp_dim=40,
    eps=1e-12,
    num_layers=2,
    num_labels=7,
)


def bonsai(seed: int):
    """bonsai's model with every parameter random (its norms are ones, its biases zeros)."""
    model = bonsai_vit.ViTClassificationModel(CONFIG, rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(state))))
    nnx.update(
        model,
        jax.tree.map(lambda p: 0.3 * jax.random.normal(next(keys), p.shape, p.dtype), state),
    )
    return model


def flat_state(model) -> dict[str, np.ndarray]:
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {".".join(str(getattr(k, "key", k)) for k in p): np.asarray(v) for p, v in leaves}


IMAGES = np.random.default_rng(3).standard_normal((2, 16, 16, 3)).astype(np.float32)


@pytest.mark.slow  # 8 s: bonsai's model compiled for the first time in a worker
@pytest.mark.parametrize("form", ["orbax", "msgpack", "safetensors"])
def test_a_bonsai_state_computes_what_bonsai_computes(tmp_path, form):
    model = bonsai(seed=1)
    want = np.asarray(model(IMAGES, rngs=None))
    if form == "orbax":
        import orbax.checkpoint as ocp

        path = tmp_path / "ckpt"
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(path, nnx.state(model, nnx.Param))
    elif form == "msgpack":  # flax's own bytes of the state's pure dict (list indices: ints)
        from flax import serialization

        path = tmp_path / "bonsai.msgpack"
        pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        path.write_bytes(serialization.msgpack_serialize(pure))
    else:
        from safetensors.numpy import save_file

        path = tmp_path / "bonsai.safetensors"
        save_file(flat_state(model), str(path))
    info = wt.inspect_checkpoint(path)
    assert info["layout"] == "bonsai_vit", info["layout"]
    assert {"activation", "ln_eps"} <= set(info["assumed"]) and "num_heads" not in info["assumed"]
    for framework in ("jax", "torch"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = wt.load_checkpoint(path, framework)
        got = run_nnx(ours, IMAGES) if framework == "jax" else run_torch(ours, IMAGES)
        assert_close(want, np.asarray(got), "float32", f"bonsai {form} -> {framework}")


@pytest.mark.slow  # 10 s: bonsai's model compiled (its forward is not jitted)
def test_written_bonsai_state_loads_into_bonsais_model(tmp_path):
    from safetensors.numpy import load_file, save_file

    original = bonsai(seed=2)
    save_file(flat_state(original), str(tmp_path / "published.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = wt.load_checkpoint(tmp_path / "published.safetensors", "torch")
    path = wt.save_checkpoint(ours, tmp_path / "ours.safetensors", layout="bonsai_vit")
    written = load_file(str(path))
    fresh = bonsai_vit.ViTClassificationModel(CONFIG, rngs=nnx.Rngs(9))
    state = nnx.state(fresh, nnx.Param)
    pure = nnx.to_pure_dict(state)
    paths = jax.tree_util.tree_flatten_with_path(pure)[0]
    names = [".".join(str(getattr(k, "key", k)) for k in p) for p, _ in paths]
    assert sorted(names) == sorted(written), set(names) ^ set(written)
    values = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(pure), [written[n] for n in names]
    )
    nnx.replace_by_pure_dict(state, values)  # by path, as bonsai's own loader assigns
    nnx.update(fresh, state)
    assert_close(
        np.asarray(original(IMAGES, rngs=None)),
        np.asarray(fresh(IMAGES, rngs=None)),
        "float32",
        "bonsai on our state vs the original",
    )
    for name, value in flat_state(original).items():
        assert value.tobytes() == written[name].tobytes(), name
