"""Loading straight onto a JAX mesh of 8 simulated CPU devices (in a subprocess): both mesh axis
types, every sharding rule set, the plain ViT and every family preset; the rules as Flax's own
`nnx.logical_axis_rules`; bad meshes and shardings refused before anything is read."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec

import jax_impl
import weight_transfer as wt
from tests.conftest import tiny
from vit_config import ViTConfig, arch
from weight_transfer.frameworks.sharding import (
    RULE_SETS,
    ShardingError,
    logical_rules,
    partition_specs,
)
from weight_transfer.frameworks.weights import random_torch
from weight_transfer.layouts.timm import TIMM_ARCHS

HELPER = Path(__file__).parent / "helpers" / "sharded_check.py"
MULTIHOST = HELPER.parent / "multihost_check.py"
# d_model 32, 4 heads and d_ff 64 divide by 8 devices; 7 classes and 3-pixel patches do not.
CONFIG = tiny(d_model=32, num_heads=4, d_ff=64)


def run_cases(tmp_path, cases: list[dict]) -> list[dict]:
    """Run `cases` in one child with 8 simulated devices (see helpers/sharded_check.py)."""
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps(cases))
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "PYTHONPATH": str(HELPER.parents[2]),
    }
    out = subprocess.run(
        [sys.executable, str(HELPER), str(spec)], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# Each sharding on the mesh it is meant for: 1-D meshes named as users name them, 2-D data x model.
MESHES = {
    "replicated": ([8], ["data"]),
    "fsdp": ([8], ["fsdp"]),
    "tensor_parallel": ([2, 4], ["data", "model"]),
    "fsdp_tp": ([2, 4], ["data", "model"]),
}
AXIS_TYPES = ("explicit", "auto")  # jax.make_mesh's default, and the older Mesh(...) kind


def case(path, sharding, axis_type, **more) -> dict:
    shape, names = MESHES[sharding]
    return dict(
        path=str(path), sharding=sharding, mesh=shape, names=names, axis_type=axis_type, **more
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("mesh")
    model = random_torch(CONFIG, seed=9)
    return {
        "nnx": wt.save_checkpoint(model, d / "nnx", layout="nnx", max_shard_size="20KB"),
        "timm": wt.save_checkpoint(model, d / "timm.safetensors", layout="timm"),
        "orbax": wt.save_checkpoint(model, d / "orbax", layout="orbax"),
    }


# What each sharding does to the plain ViT (d_model 32, 4 heads of 8, d_ff 64, 7 classes), by
# hand: {parameter: (spec, one device's block)}.
EXPECTED = {
    "replicated": {"blocks.0.ff1.kernel": ([], [32, 64]), "pos_embed": ([], [7, 32])},
    "fsdp": {
        "blocks.0.ff1.kernel": (["fsdp", "None"], [4, 64]),  # embed split, 4 rows each
        "blocks.0.ff2.kernel": (["None", "fsdp"], [64, 4]),
        "blocks.0.attn.q.kernel": (["fsdp", "None"], [4, 32]),
        "blocks.0.ln1.scale": (["fsdp"], [4]),
        "patch_embed.kernel": (["None", "None", "None", "fsdp"], [4, 4, 3, 4]),
        "pos_embed": (["None", "fsdp"], [7, 4]),
        "head.kernel": (["fsdp", "None"], [4, 7]),
        "head.bias": (["None"], [7]),
    },  # classes are not split
    "tensor_parallel": {
        "blocks.0.attn.q.kernel": (["None", "model"], [32, 8]),  # a head each
        "blocks.0.attn.q.bias": (["model"], [8]),
        "blocks.0.attn.o.kernel": (["model", "None"], [8, 32]),  # row-parallel
        "blocks.0.attn.o.bias": (["None"], [32]),
        "blocks.0.ff1.kernel": (["None", "model"], [32, 16]),
        "blocks.0.ff2.kernel": (["model", "None"], [16, 32]),
        "blocks.0.ln1.scale": (["None"], [32]),
        "pos_embed": (["None", "None"], [7, 32]),
    },
    "fsdp_tp": {
        "blocks.0.ff1.kernel": (["data", "model"], [16, 16]),
        "blocks.0.attn.o.kernel": (["model", "data"], [8, 16]),
        "pos_embed": (["None", "data"], [7, 16]),
    },
}


@pytest.mark.slow
def test_every_sharding_on_both_axis_types_matches_unsharded_torch(tmp_path, files):
    """Loaded onto `jax.make_mesh`'s Explicit axes and onto Auto axes, each sharding runs
    eagerly and under nnx.jit and gives the unsharded torch model's logits; each parameter
    is split as asked. From the NNX file (blocks read straight from its bytes), from timm's
    layout (converted tensor by tensor) and from an Orbax checkpoint (Orbax reads the blocks);
    the NNX file on both axis types, the other two each sharding on one (alternating), since
    only how the blocks are read differs between them."""
    cases = [
        case(files[layout], sharding, axis_type, train=layout == "nnx")
        for layout in ("nnx", "timm", "orbax")
        for j, sharding in enumerate(MESHES)
        for k, axis_type in enumerate(AXIS_TYPES)
        if layout == "nnx" or (j + k + (layout == "orbax")) % 2 == 0
    ]
    for c, r in zip(cases, run_cases(tmp_path, cases), strict=True):
        what = (c["sharding"], c["axis_type"], Path(c["path"]).name)
        assert r["axis_types"] == [c["axis_type"].capitalize()] * len(c["mesh"]), what
        for mode, gap in r["max_abs"].items():
            assert gap <= 1e-5 * r["scale"], (what, mode, gap)
        assert r["devices"] == [8], what  # every parameter lives on all 8 devices
        assert r["out_spec"][:1] == [c["names"][0]], what  # logits split like the images
        for key, (spec, block) in EXPECTED[c["sharding"]].items():
            assert strip(r["specs"][key]) == strip(spec), (what, key, r["specs"][key])
            assert r["block_shapes"][key] == block, (what, key)
        if c["train"]:  # a sharded training step: the loss falls, moments sit with their params
            assert r["losses"][2] < r["losses"][0] and r["moments_placed_as_params"], (what, r)


@pytest.mark.slow  # a child process with 8 devices: 4 s
def test_a_mesh_built_by_hand_still_works(tmp_path, files):
    """`Mesh(devices, names)` (Auto axes), as before `jax.make_mesh`."""
    [r] = run_cases(tmp_path, [case(files["nnx"], "fsdp", "mesh", eager=False)])
    assert r["max_abs"]["jit"] <= 1e-5 * r["scale"] and r["axis_types"] == ["Auto"]


def shrunk(preset: str) -> ViTConfig:
    """A family preset with every feature kept, at sizes 8 devices divide."""
    c = ViTConfig.preset(preset)
    return dataclasses.replace(
        c,
        d_model=32,
        num_heads=4,
        d_ff=64,
        num_layers=2,
        image_size=2 * c.patch_size,
        num_classes=min(c.num_classes, 10),
    )


FAMILY_PRESETS = sorted(
    p for p in TIMM_ARCHS if p not in ("vit_ti16", "vit_s16", "vit_b16", "vit_l16", "vit_h14")
)


@pytest.mark.slow
def test_every_family_preset_on_both_axis_types(tmp_path):
    """Every family preset (MAP, registers, LayerScale, SwiGLU, RMSNorm, q/k norms, no head,
    distillation...) on both axis types, fsdp on one and tensor-parallel on the other (the
    pairing alternating between presets), under nnx.jit. (Every sharding on both axis types
    is test_every_sharding_on_both_axis_types_matches_unsharded_torch's.)"""
    cases = []
    for i, preset in enumerate(FAMILY_PRESETS):
        path = wt.save_checkpoint(
            random_torch(shrunk(preset), seed=i), tmp_path / f"{preset}.safetensors", layout="timm"
        )
        cases += [
            case(
                path,
                sharding,
                AXIS_TYPES[(i + j) % len(AXIS_TYPES)],
                eager=False,
                preset=preset,
                padded=shrunk(preset).pos_grid is not None,  # NaFlex: a padded batch too
            )
            for j, sharding in enumerate(("fsdp", "tensor_parallel"))
        ]
    for c, r in zip(cases, run_cases(tmp_path, cases), strict=True):
        what = (c["preset"], c["sharding"], c["axis_type"])
        assert all(gap <= 1e-5 * r["scale"] for gap in r["max_abs"].values()), (what, r)
        assert ("padded" in r["max_abs"]) == c["padded"], what
        assert r["devices"] == [8], what
        split = [k for k, spec in r["specs"].items() if any(a != "None" for a in spec)]
        assert split, what  # something is split
        asked = RULE_SETS[c["sharding"]]
        for key in split:  # and only along the logical axes the rule set splits
            axes = arch.parameters(shrunk(c["preset"]))[key].axes
            assert all(a == "None" or axes[i] in asked for i, a in enumerate(r["specs"][key])), (
                what,
                key,
            )


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["replicated", "fsdp"])
def test_two_processes_read_only_their_own_blocks(files, sharding):
    """Multi-host in miniature: two `jax.distributed` processes on localhost, 4 devices each,
    one global mesh of 8. Both get the unsharded torch model's logits, and each copies out of
    the file exactly the blocks its own devices hold (FSDP: half of every split tensor)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "PYTHONPATH": str(HELPER.parents[2]),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(MULTIHOST), str(files["nnx"]), sharding, str(i), str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
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


# ---- the rules, in process (AbstractMesh: a mesh's axes and sizes, no devices needed) ------------

MESH_2D = AbstractMesh((2, 4), ("data", "model"))


@pytest.mark.slow  # 3.2 s (--durations)
def test_flax_derives_the_same_specs_from_the_annotations():
    """A model built by hand carries its logical axes; under `nnx.logical_axis_rules` with a
    rule set, `nnx.get_partition_spec` gives the specs the loader uses."""
    model = jax_impl.ViT(CONFIG, rngs=nnx.Rngs(0))
    assert model.blocks[0].attn.o.kernel.get_metadata()["out_sharding"] == ("heads", "embed")
    for sharding in RULE_SETS:
        with nnx.logical_axis_rules(logical_rules(MESH_2D, sharding)):
            specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
        flax_specs = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(specs)}
        assert flax_specs == partition_specs(CONFIG, MESH_2D, sharding), sharding
    assert partition_specs(CONFIG, MESH_2D, "fsdp_tp")["blocks.1.ff1.kernel"] == PartitionSpec(
        "data", "model"
    )


@pytest.mark.slow  # 4 s (--durations)
def test_scanned_blocks_carry_a_layers_axis():
    model = jax_impl.ViT(CONFIG, rngs=nnx.Rngs(0), scan_layers=True)
    assert model.blocks.ff1.kernel.get_metadata()["out_sharding"] == ("layers", "embed", "mlp")


def test_heads_are_never_cut():
    """3 heads of 8 on a model axis of 4: 24 columns divide by 4, but a head would be cut, so
    the attention stays whole; the MLP (d_ff 64) is still split."""
    config = tiny(d_model=24, num_heads=3, d_ff=64)
    specs = partition_specs(config, MESH_2D, "tensor_parallel")
    assert specs["blocks.0.attn.q.kernel"] == PartitionSpec(None, None)
    assert specs["blocks.0.ff1.kernel"] == PartitionSpec(None, "model")


def test_own_rules():
    specs = partition_specs(CONFIG, MESH_2D, {"mlp": "model", "classes": None})
    assert specs["blocks.0.ff2.kernel"] == PartitionSpec("model", None)
    assert specs["blocks.0.attn.q.kernel"] == PartitionSpec(None, None)


@pytest.mark.parametrize(
    "mesh, sharding, message",
    [
        (
            AbstractMesh((7,), ("data",)),
            "fsdp",
            r"mesh axis 'data' \(size 7\) divides no parameter "
            r"dimension .*embed = 32",
        ),
        (
            AbstractMesh((3,), ("model",)),
            "tensor_parallel",
            r"size 3\) divides no .*heads = 4, mlp = 64",
        ),
        (AbstractMesh((8,), ("data",)), "zero3", r"sharding 'zero3': expected one of"),
        (AbstractMesh((8,), ("data",)), "fsdp_tp", r"needs a 2-D data x model mesh"),
        (AbstractMesh((2, 4), ("a", "b")), "tensor_parallel", r"none is the model axis"),
        (MESH_2D, {"embedding": "data"}, r"unknown logical axes \['embedding'\]"),
        (MESH_2D, {"embed": "fsdp"}, r"mesh axes \['fsdp'\] the mesh does not have"),
    ],
)
def test_bad_sharding_is_refused_before_reading(tmp_path, mesh, sharding, message):
    path = wt.save_checkpoint(random_torch(CONFIG, seed=1), tmp_path / "m.safetensors")
    with pytest.raises(ShardingError, match=message):
        wt.load_checkpoint(path, "jax", mesh=mesh, sharding=sharding)


def test_mesh_needs_jax():
    with pytest.raises(ValueError, match="framework must be 'jax'"):
        wt.load_checkpoint("x.safetensors", "torch", mesh=object())
