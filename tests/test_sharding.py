"""Loading straight onto a JAX mesh of 8 simulated CPU devices (in a subprocess)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import weight_transfer as wt
from tests.conftest import tiny
from weight_transfer.weights import random_torch
from weight_transfer.sharding import partition_spec

HELPER = Path(__file__).parent / "helpers" / "sharded_check.py"
MULTIHOST = HELPER.parent / "multihost_check.py"
# d_model 32 and d_ff 64 divide by 8 devices; 7 classes and 3-pixel patches do not.
CONFIG = tiny(d_model=32, num_heads=4, d_ff=64)


def run_sharded(path, sharding):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "PYTHONPATH": str(HELPER.parents[2])}
    out = subprocess.run([sys.executable, str(HELPER), str(path), sharding], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("mesh")
    model = random_torch(CONFIG, seed=9)
    return {"nnx": wt.save_checkpoint(model, d / "nnx", layout="nnx", max_shard_size="20KB"),
            "timm": wt.save_checkpoint(model, d / "timm.safetensors", layout="timm")}


# The family on the mesh: MAP, registers, LayerScale, SwiGLU, RMSNorm, q/k norms, no head.
FAMILY = tiny(d_model=32, num_heads=4, d_ff=64, pool="map", class_token=False, reg_tokens=2,
              layer_scale=True, mlp="swiglu", activation="silu", norm="rmsnorm", qk_norm=True,
              num_classes=0)


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["replicated", "fsdp"])
def test_a_family_model_loads_onto_the_mesh(tmp_path, sharding):
    path = wt.save_checkpoint(random_torch(FAMILY, seed=10), tmp_path / "f", layout="timm")
    r = run_sharded(path, sharding)
    assert r["max_abs"] <= 1e-5 * r["scale"] and r["devices"] == [8]
    if sharding == "fsdp":
        assert r["specs"]["blocks.0.ff1_g.kernel"] == ["None", "fsdp"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["nnx", "timm"])
@pytest.mark.parametrize("sharding", ["replicated", "fsdp"])
def test_sharded_load_matches_unsharded_torch(files, layout, sharding):
    r = run_sharded(files[layout], sharding)
    assert r["max_abs"] <= 1e-5 * r["scale"]
    assert r["devices"] == [8]  # every parameter lives on all 8 devices (whole or in blocks)
    for key, spec in r["specs"].items():
        shape = r["shapes"][key]
        if sharding == "replicated":
            assert all(a == "None" for a in spec), (key, spec)
            assert r["block_shapes"][key][0] == shape
        else:
            want = [str(a) for a in partition_spec(tuple(shape), _Mesh8(), "fsdp")]
            assert strip(spec) == strip(want), (key, spec, want)
    if sharding == "fsdp":
        assert r["specs"]["blocks.0.ff1.kernel"] == ["None", "fsdp"]  # (32, 64): the 64 axis
        assert r["block_shapes"]["blocks.0.ff1.kernel"][0] == [32, 8]
        assert r["specs"]["head.bias"] == []  # 7 classes: replicated


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["replicated", "fsdp"])
def test_two_processes_read_only_their_own_blocks(files, sharding):
    """Multi-host in miniature: two `jax.distributed` processes on localhost, 4 devices each,
    one global mesh of 8. Both get the unsharded torch model's logits, and each copies out of
    the file exactly the blocks its own devices hold (FSDP: half of every split tensor)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": str(HELPER.parents[2])}
    procs = [subprocess.Popen([sys.executable, str(MULTIHOST), str(files["nnx"]), sharding,
                               str(i), str(port)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert sorted(r["process"] for r in reports) == [0, 1]
    assert reports[0]["local_devices"] != reports[1]["local_devices"]
    for r in reports:
        assert r["max_abs"] <= 1e-5 * r["scale"]
        assert r["copied_blocks_are_local_blocks"]  # nothing copied for other hosts' devices
        if sharding == "fsdp":  # this host's devices hold about half of each split tensor
            assert r["local_bytes"] < 0.75 * r["global_bytes"]
        else:
            assert r["local_bytes"] == r["global_bytes"]


def strip(spec: list[str]) -> list[str]:
    """PartitionSpec drops trailing Nones: compare without them."""
    while spec and spec[-1] == "None":
        spec = spec[:-1]
    return spec


class _Mesh8:
    axis_names = ("fsdp",)
    shape = {"fsdp": 8}


def test_partition_spec_rules():
    assert tuple(partition_spec((32, 64), _Mesh8(), "fsdp")) == (None, "fsdp")
    assert tuple(partition_spec((7,), _Mesh8(), "fsdp")) == ()
    assert tuple(partition_spec((32, 64), _Mesh8(), "replicated")) == ()


def test_mesh_needs_jax():
    with pytest.raises(ValueError, match="framework must be 'jax'"):
        wt.load_checkpoint("x.safetensors", "torch", mesh=object())
