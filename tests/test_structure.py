"""Import boundaries, the module trees, and nnx.jit behaviour."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from flax import nnx

import jax_impl
import torch_impl
from tests.conftest import tiny
from vit_config import arch
from weight_transfer.frameworks.bridge import nnx_shapes, torch_shapes
from weight_transfer.frameworks.runners import random_images, run_torch
from weight_transfer.frameworks.weights import random_nnx, random_params, random_torch


def imported_after(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {m.split(".")[0] for m in out.stdout.split()}


def test_torch_impl_never_imports_jax_or_flax():
    mods = imported_after("torch_impl")
    assert "torch" in mods and not mods & {"jax", "flax", "jaxlib"}


def test_jax_impl_never_imports_torch():
    mods = imported_after("jax_impl")
    assert "flax" in mods and "torch" not in mods


def test_config_imports_no_framework():
    assert not imported_after("vit_config") & {"jax", "flax", "torch"}


def test_same_tree_same_names():
    jm = jax_impl.ViT(tiny(), rngs=nnx.Rngs(0))
    tm = torch_impl.ViT(tiny())
    jax_paths = {".".join(map(str, p[:-1])) for p, _ in nnx.to_flat_state(nnx.state(jm, nnx.Param))}
    torch_paths = {k.rsplit(".", 1)[0] for k in tm.state_dict()}
    # Module paths match; pos_embed and cls_token are bare parameters of the ViT itself.
    assert jax_paths - {""} == torch_paths - {"pos_embed", "cls_token"}
    assert isinstance(jm.blocks, nnx.List) and len(jm.blocks) == 2


CONFIGS = [tiny(), tiny(pool="mean", qkv_bias=False, num_layers=0),
           tiny(pool="mean", class_token=True), tiny(num_layers=1, image_size=(4, 16))]


@pytest.mark.parametrize("config", CONFIGS)
def test_both_models_build_exactly_the_declared_parameters(config):
    """`vit_config.arch` is the one description: both models, in the loop and scanned layouts,
    hold exactly its parameters with its shapes (the file layer converts from it alone)."""
    declared = {k: p.shape for k, p in arch.parameters(config).items()}
    for scan in (False, True):
        model = nnx.eval_shape(lambda: jax_impl.ViT(config, rngs=nnx.Rngs(0), scan_layers=scan))
        built = {".".join(map(str, path)): tuple(v.get_value().shape)
                 for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        assert built == (nnx_shapes(config, True) if scan and config.num_layers else declared)
    with torch.device("meta"):
        tm = torch_impl.ViT(config)
    assert {k: tuple(v.shape) for k, v in tm.state_dict().items()} == torch_shapes(config)
    assert sum(p.size for p in arch.parameters(config).values()) == config.num_params() \
        == sum(v.numel() for v in tm.parameters())


@pytest.mark.parametrize("config", CONFIGS)
def test_both_models_emit_exactly_the_declared_intermediates(config):
    images = random_images(config, 2)
    _, jax_seen = random_nnx(config)(images, return_intermediates=True)
    _, torch_seen = run_torch(random_torch(config), images, return_intermediates=True)
    assert list(jax_seen) == list(torch_seen) == arch.intermediates(config)


def test_parameter_kinds_decide_the_random_draw():
    params = random_params(tiny(), seed=0)
    declared = arch.parameters(tiny())
    assert list(params) == sorted(declared)
    for key, value in params.items():
        assert value.shape == declared[key].shape
        assert np.all(value != 0) and np.all(value != 1), key  # no default-looking values
    kernel = params["blocks.0.ff1.kernel"]
    assert abs(kernel.std() * np.sqrt(declared["blocks.0.ff1.kernel"].fan_in) - 1) < 0.1


def test_converting_and_inspecting_import_no_framework(tmp_path):
    """`vit-parity convert` and `inspect` need neither JAX nor PyTorch; loading into torch
    needs no JAX."""
    import weight_transfer as wt

    path = wt.save_checkpoint(random_nnx(tiny(image_size=8), seed=1), tmp_path / "m.safetensors",
                              layout="timm")
    code = f"""
import sys
from weight_transfer.cli import main
assert main(["convert", {str(path)!r}, {str(tmp_path / "o.npz")!r}, "--to", "google_vit"]) == 0
assert main(["inspect", {str(tmp_path / "o.npz")!r}]) == 0
print(" ".join(sorted(sys.modules)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert not {m.split(".")[0] for m in out.stdout.split()[-1:] + out.stdout.split()} & \
        {"jax", "flax", "jaxlib", "torch"}
    code = f"""
import sys, weight_transfer as wt
model = wt.load_checkpoint({str(path)!r}, "torch")
print(type(model).__name__, " ".join(sorted(sys.modules)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    mods = {m.split(".")[0] for m in out.stdout.split()}
    assert out.stdout.startswith("ViT") and "torch" in mods and not mods & {"jax", "flax"}


def test_every_layout_is_detected_from_its_own_keys():
    from weight_transfer.layouts import LAYOUTS, detect_layout
    from weight_transfer.core.table import oriented

    for config in (tiny(), tiny(pool="mean")):
        for layout in LAYOUTS.values():
            keys = {k for r in oriented(layout.table(config), config.num_layers) for k in r.right}
            assert detect_layout(keys, layout.container) is layout, layout.name


def test_submodules_are_attributes_of_the_package():
    code = ("import weight_transfer as wt; print(wt.doctor.diagnose.__name__, "
            "wt.parity.compare.__name__, wt.training.train_parity.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["diagnose", "compare", "train_parity"]


def test_every_typed_error_is_a_vit_parity_error():
    import weight_transfer as wt
    from vit_config import ArgumentError, ConfigError, ImageShapeError, VitParityError
    from weight_transfer.cli import UsageError

    for error in (ArgumentError, ConfigError, ImageShapeError, UsageError, wt.CheckpointError,
                  wt.LayoutError, wt.NonFiniteError, wt.TransferError):
        assert issubclass(error, VitParityError) and issubclass(error, ValueError), error


def test_a_bug_is_not_bad_input(monkeypatch, capsys):
    """Only typed errors (and OSError) are exit 2; anything else shows its traceback, exit 3."""
    from weight_transfer import cli, porting

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(porting, "inspect_checkpoint", broken)
    assert cli.main(["inspect", "whatever.safetensors"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'a bug'" in err and "a bug, not bad input" in err
