"""Orbax checkpoints of the NNX state: written by `save_checkpoint(layout="orbax")` and
`convert --to orbax`, read back bit-exact, converted back to any layout; a training loop's own
`StandardCheckpointer` save read too; incomplete or foreign folders refused. (Restoring onto a
mesh is in test_sharding.py.)"""

import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import weight_transfer as wt
from tests.conftest import tiny
from tests.helpers.models import assert_bit_exact
from weight_transfer.core.errors import (
    AssumedConfigWarning,
    CheckpointError,
    LayoutError,
    TransferError,
)
from weight_transfer.frameworks.bridge import nnx_params
from weight_transfer.frameworks.weights import random_nnx, random_torch

ocp = pytest.importorskip("orbax.checkpoint")
FAMILY = tiny(
    pool="map",
    class_token=False,
    reg_tokens=2,
    layer_scale=True,
    mlp="swiglu",
    activation="silu",
    norm="rmsnorm",
    qk_norm=True,
    num_classes=0,
)


@pytest.mark.parametrize("config", [tiny(), FAMILY], ids=["vit", "family"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_save_and_load_are_bit_exact(tmp_path, config, dtype):
    with jax.enable_x64(dtype == "float64"):
        model = random_nnx(config, seed=3, dtype=dtype)
        out = wt.save_checkpoint(model, tmp_path / "ckpt", layout="orbax")
        assert (out / "state" / "_CHECKPOINT_METADATA").is_file()
        assert (out / "vit_parity.json").is_file()
        back = wt.load_checkpoint(out, "jax")  # the manifest says the config: no warning
        assert back.config == config
        assert_bit_exact(nnx_params(model), nnx_params(back))
        assert_bit_exact(nnx_params(model), nnx_params(wt.load_checkpoint(out, "torch")))


def test_timm_to_orbax_and_back_is_byte_identical(tmp_path):
    src = wt.save_checkpoint(
        random_torch(FAMILY, seed=4), tmp_path / "timm.safetensors", layout="timm"
    )
    report = wt.convert(src, tmp_path / "orbax", to="orbax")
    assert report["layout"] == "timm"
    back = wt.convert(tmp_path / "orbax", tmp_path / "back.safetensors", to="timm", from_="orbax")
    assert back["layout"] == "orbax" and back["config"] == FAMILY.to_dict()
    assert_bit_exact(load_file(src), load_file(tmp_path / "back.safetensors"))


def test_a_training_loops_own_orbax_save_is_read(tmp_path):
    """`StandardCheckpointer().save(path, nnx.state(model, nnx.Param))`, no manifest: read, the
    config from the shapes, what could not be read said aloud."""
    model = random_nnx(tiny(), seed=5)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "step_100", nnx.state(model, nnx.Param))
    with pytest.warns(AssumedConfigWarning, match="assumed"):
        back = wt.load_checkpoint(
            tmp_path / "step_100", "jax", overrides=dict(num_heads=3, image_size=(8, 12))
        )
    assert_bit_exact(nnx_params(model), nnx_params(back))


def test_incomplete_checkpoint_is_refused(tmp_path):
    out = wt.save_checkpoint(random_nnx(tiny(), seed=6), tmp_path / "ckpt", layout="orbax")
    (out / "state" / "_CHECKPOINT_METADATA").unlink()  # what a save cut short leaves
    with pytest.raises(
        CheckpointError,
        match=r"incomplete Orbax checkpoint \(no "
        r"_CHECKPOINT_METADATA",
    ):
        wt.load_checkpoint(out, "jax")
    (out / "state").rename(out / "state.orbax-checkpoint-tmp-1795791602")  # a save in progress
    with pytest.raises(CheckpointError, match="incomplete Orbax checkpoint"):
        wt.load_checkpoint(out, "jax")


def test_another_models_checkpoint_is_refused(tmp_path):
    with ocp.StandardCheckpointer() as checkpointer:  # an MLP's state: no ViT layout
        checkpointer.save(tmp_path / "mlp", {"dense": {"kernel": np.ones((4, 4), np.float32)}})
    with pytest.raises(LayoutError, match="cannot tell the layout"):
        wt.load_checkpoint(tmp_path / "mlp", "jax")
    # our folder, but its state swapped for another config's: every mismatch named
    out = wt.save_checkpoint(random_nnx(tiny(), seed=7), tmp_path / "a", layout="orbax")
    other = wt.save_checkpoint(random_nnx(tiny(d_model=30), seed=7), tmp_path / "b", layout="orbax")
    shutil.rmtree(out / "state")
    shutil.copytree(other / "state", out / "state")
    with pytest.raises(TransferError, match=r"shape \(24,\).*\(30,\)|30.*24"):
        wt.load_checkpoint(out, "jax")


@pytest.mark.slow  # 3 s of CLI processes; the API round trips are quick
def test_cli_round_trip_and_refusal(tmp_path):
    src = wt.save_checkpoint(
        random_torch(tiny(), seed=8), tmp_path / "m.safetensors", layout="timm"
    )
    cli = [sys.executable, "-m", "weight_transfer.cli"]
    ok = subprocess.run(
        [*cli, "convert", str(src), str(tmp_path / "o"), "--to", "orbax"],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    (tmp_path / "o" / "state" / "_METADATA").unlink()
    bad = subprocess.run(
        [*cli, "convert", str(tmp_path / "o"), str(tmp_path / "x.safetensors"), "--to", "timm"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].endswith("nothing was read")
    assert not (tmp_path / "x.safetensors").exists()


def test_relative_paths_work_both_ways(tmp_path, monkeypatch):
    """Orbax gives no item metadata for a relative path: ours are made absolute, so a relative
    path reads and writes like an absolute one."""
    monkeypatch.chdir(tmp_path)
    model = random_nnx(tiny(), seed=5)
    out = wt.save_checkpoint(model, "ckpt", layout="orbax")
    assert not out.is_absolute() and (tmp_path / "ckpt/state/_CHECKPOINT_METADATA").is_file()
    assert_bit_exact(nnx_params(model), nnx_params(wt.load_checkpoint("ckpt", "jax")))
    report = wt.convert("ckpt", "back.safetensors", to="timm")
    assert_bit_exact(nnx_params(model), nnx_params(wt.load_checkpoint(report["output"], "jax")))
