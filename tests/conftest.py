import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per framework per worker: pytest-xdist already runs one worker per core, and
    # torch's and XLA's own thread pools on top of that oversubscribe the machine.
    os.environ.setdefault(
        "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    )
    import torch

    torch.set_num_threads(1)

import jax  # noqa: E402
import numpy as np
import pytest  # noqa: E402
import torch  # noqa: E402

from vit_config import ViTConfig  # noqa: E402

# Relative to max(1, max |logits|). float32: HF's PT<->Flax tests use 1e-5 absolute on tiny
# models; we hold ViT-S width to the same bound. float64: the same rounding at 2**-52.
TOL = {"float32": 1e-5, "float64": 1e-12}


# Minutes each (--durations): started first, so the two xdist workers share the rest while
# they run (worksteal: a worker that runs dry takes queued tests from the other).
LONGEST_FIRST = (
    "test_timm_zoo.py::test_the_timm_zoo_ports_or_is_refused",
    "test_timm_zoo.py::test_the_rope_and_relative_zoo_is_never_wrong",
    "test_sharding.py::test_every_sharding_on_both_axis_types_matches_unsharded_torch",
    "test_sharding.py::test_every_family_preset_on_both_axis_types",
    "test_family.py::test_family_hypothesis_configs",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def key(item):
        where = f"{item.path.name}::{item.originalname}"
        return rank.get(where, len(rank))

    items.sort(key=key)  # stable: everything else keeps its order


@pytest.fixture
def call(capsys):
    """In-process `vit-parity ARGS` -> CompletedProcess(args, exit code, stdout, stderr);
    argparse exits included."""
    import subprocess

    from weight_transfer import cli

    def call(*args):
        try:
            code = cli.main(list(args))
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return call


@pytest.fixture
def x64():
    """JAX float64 for one test only; the global flag is restored afterwards."""
    with jax.enable_x64(True):
        yield


def tiny(**changes) -> ViTConfig:
    """A small, non-square config; every size distinct so a swapped axis changes a shape."""
    base = dict(
        image_size=(8, 12),
        patch_size=4,
        in_channels=3,
        d_model=24,
        num_heads=3,
        d_ff=40,
        num_layers=2,
        num_classes=7,
        pool="cls",
        activation="gelu",
    )
    return ViTConfig(**{**base, **changes})


def assert_close(ref, out, dtype: str, what: str):
    ref = np.asarray(ref, np.float64)
    out = np.asarray(out, np.float64)
    assert ref.shape == out.shape, f"{what}: shapes {ref.shape} vs {out.shape}"
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(ref - out).max())
    assert err <= TOL[dtype] * scale, (
        f"{what}: max |diff| {err:.3e} > {TOL[dtype]:.0e} x {scale:.3g}"
    )


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)


pytest_plugins = ["pytester"]  # a user's pytest session in-process (the parity plugin)
