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


@pytest.mark.slow  # 3.3 s (a process); its sibling for jax_impl stays quick
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


CONFIGS = [
    tiny(),
    tiny(pool="mean", qkv_bias=False, num_layers=0),
    tiny(pool="mean", class_token=True),
    tiny(num_layers=1, image_size=(4, 16)),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_both_models_build_exactly_the_declared_parameters(config):
    """`vit_config.arch` is the one description: both models, in the loop and scanned layouts,
    hold exactly its parameters with its shapes (the file layer converts from it alone)."""
    declared = {k: p.shape for k, p in arch.parameters(config).items()}
    for scan in (False, True):
        model = nnx.eval_shape(lambda: jax_impl.ViT(config, rngs=nnx.Rngs(0), scan_layers=scan))  # noqa: B023
        built = {
            ".".join(map(str, path)): tuple(v.get_value().shape)
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
        }
        assert built == (nnx_shapes(config, True) if scan and config.num_layers else declared)
    with torch.device("meta"):
        tm = torch_impl.ViT(config)
    assert {k: tuple(v.shape) for k, v in tm.state_dict().items()} == torch_shapes(config)
    assert (
        sum(p.size for p in arch.parameters(config).values())
        == config.num_params()
        == sum(v.numel() for v in tm.parameters())
    )


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
    """`vit-parity convert` and `inspect` need neither JAX nor PyTorch (nor ml_dtypes, ~0.6 s
    to import, for a file without bfloat16); loading into torch needs no JAX."""
    import weight_transfer as wt

    path = wt.save_checkpoint(
        random_nnx(tiny(image_size=8), seed=1), tmp_path / "m.safetensors", layout="timm"
    )
    code = f"""
import sys
from weight_transfer.cli import main
assert main(["convert", {str(path)!r}, {str(tmp_path / "o.npz")!r}, "--to", "google_vit"]) == 0
assert main(["inspect", {str(tmp_path / "o.npz")!r}]) == 0
print(" ".join(sorted(sys.modules)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert not {m.split(".")[0] for m in out.stdout.split()[-1:] + out.stdout.split()} & {
        "jax",
        "flax",
        "jaxlib",
        "torch",
        "ml_dtypes",
    }
    code = f"""
import sys, weight_transfer as wt
model = wt.load_checkpoint({str(path)!r}, "torch")
print(type(model).__name__, " ".join(sorted(sys.modules)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    mods = {m.split(".")[0] for m in out.stdout.split()}
    assert out.stdout.startswith("ViT") and "torch" in mods and not mods & {"jax", "flax"}


def test_every_layout_is_detected_from_its_own_keys():
    from weight_transfer.core.table import oriented
    from weight_transfer.layouts import LAYOUTS, detect_layout

    for config in (tiny(), tiny(pool="mean")):
        for layout in LAYOUTS.values():
            keys = {k for r in oriented(layout.table(config), config.num_layers) for k in r.right}
            if layout.published is not None:  # the names its files hold (open_clip's trunk.)
                keys = {layout.published(k, config) for k in keys}
            assert detect_layout(keys, layout.container) is layout, layout.name


@pytest.mark.slow  # 4 s; test_every_module_keeps_its_short_name is its quick sibling
def test_submodules_are_attributes_of_the_package():
    code = (
        "import weight_transfer as wt; print(wt.doctor.diagnose.__name__, "
        "wt.parity.compare.__name__, wt.training.train_parity.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["diagnose", "compare", "train_parity"]


def test_every_typed_error_is_a_vit_parity_error():
    import weight_transfer as wt
    from vit_config import ArgumentError, ConfigError, ImageShapeError, VitParityError
    from weight_transfer.cli import UsageError

    for error in (
        ArgumentError,
        ConfigError,
        ImageShapeError,
        UsageError,
        wt.CheckpointError,
        wt.LayoutError,
        wt.NonFiniteError,
        wt.TransferError,
    ):
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


FRAMEWORK_FREE = ("core", "formats", "layouts", "porting")  # and the CLI, until it loads a model
LAYERS = (
    "core",
    "formats",
    "layouts",
    "porting",
    "frameworks",
    "diagnostics",
    "testing",
    "cli",
)


def package_modules(package: str) -> list[str]:
    import pkgutil
    from pathlib import Path

    import weight_transfer

    root = Path(weight_transfer.__file__).parent
    if (root / f"{package}.py").is_file():
        return [f"weight_transfer.{package}"]
    return [f"weight_transfer.{package}"] + [
        f"weight_transfer.{package}.{m.name}" for m in pkgutil.iter_modules([str(root / package)])
    ]


def test_the_framework_free_packages_import_no_framework():
    """Every module of core, formats, layouts and porting, and the CLI, imported together in a
    fresh process: neither JAX, Flax nor PyTorch (nor our models) is loaded."""
    modules = [m for p in (*FRAMEWORK_FREE, "cli") for m in package_modules(p)]
    loaded = imported_after(", ".join(modules))
    assert not loaded & {"jax", "flax", "jaxlib", "torch", "jax_impl", "torch_impl"}, loaded


def test_each_layer_imports_only_the_layers_below_it():
    """At module level, a package imports only from packages before it in LAYERS (imports
    inside a function, made when called, may reach further: loading into a framework)."""
    import ast
    import importlib.util

    for rank, package in enumerate(LAYERS):
        for module in package_modules(package):
            tree = ast.parse(open(importlib.util.find_spec(module).origin).read())
            for node in tree.body:
                names = (
                    [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else []
                )
                for name in names:
                    parts = name.split(".")
                    if parts[0] == "weight_transfer" and len(parts) > 1:
                        assert parts[1] in LAYERS[: rank + 1], f"{module} imports {name}"


def test_every_module_keeps_its_short_name():
    """The modules of the flat era are still `weight_transfer.NAME` (attribute and import), the
    same objects as in their packages; short names are unique."""
    import importlib

    import weight_transfer as wt

    flat = [
        m
        for p in ("core", "formats", "porting", "frameworks", "diagnostics")
        for m in package_modules(p)[1:]
    ]
    leaves = [m.rsplit(".", 1)[1] for m in flat]
    assert len(set(leaves)) == len(leaves)
    for module, leaf in zip(flat, leaves, strict=True):
        real = importlib.import_module(module)
        assert (
            getattr(wt, leaf) is real and importlib.import_module(f"weight_transfer.{leaf}") is real
        )
    for old in (
        "bridge",
        "checkpoint",
        "conversion",
        "doctor",
        "errors",
        "fileio",
        "inference",
        "metrics",
        "npz_io",
        "numpy_ref",
        "orbax_io",
        "parity",
        "resample",
        "runners",
        "safetensors_io",
        "sharding",
        "table",
        "torch_bridge",
        "training",
        "transforms",
        "weights",
        "writers",
        "adapters",
        "layouts",
        "porting",
        "cli",
    ):
        assert hasattr(wt, old), old


BEIT = dict(  # BEiT: relative tables, q and v biases, LayerScale, class token, mean pooling
    rel_pos_bias="block", pos_embed=False, k_bias=False, layer_scale=True, pool="mean"
)
ROUND_TRIP_CONFIGS = [  # the first each writable layout's library can compute is used
    dict(),
    dict(pool="map", class_token=False, num_classes=0),
    dict(norm_pre=True, patch_bias=False, ln_eps=1e-5, head_bias=False),
    dict(norm_pre=True, patch_bias=False, final_norm="post_pool", head_bias=False),
    dict(norm_pre=True, patch_bias=False, final_norm="post_pool", num_classes=0),  # Flax CLIP
    dict(dist_token=True),
    dict(layer_scale=True, num_classes=0, d_ff=48),
    dict(BEIT, class_token=True, final_norm="post_pool", ln_eps=1e-12),
    dict(  # the Perception Encoder release: PE's RoPE, CLIP's pre-norm, a bias-free projection
        rope="interleaved",
        rope_axes="wh",
        rope_offset=1.0,
        norm_pre=True,
        patch_bias=False,
        head_bias=False,
        layer_scale=True,  # PE core and lang (spatial's keys are open_clip's: see its lookalike)
    ),
    # the EVA-02 release: RoPE rescaled to a pre-training grid on a square grid, q/v biases
    dict(image_size=8, rope="interleaved", rope_ref_grid=(4, 4), k_bias=False),
    dict(  # AIMv2: RMSNorms, a norm after the patches, SwiGLU, no class token
        norm="rmsnorm",
        patch_norm=True,
        mlp="swiglu",
        activation="silu",
        pool="mean",
        num_classes=0,
        qkv_bias=False,
        proj_bias=False,
    ),
    # jimm: its blocks' epsilon apart (ViT), its widths' heads of 64 and MLPs of 4x (CLIP, SigLIP)
    dict(image_size=8, activation="gelu_tanh", ln_eps=1e-12, block_ln_eps=1e-6),
    dict(
        **dict(norm_pre=True, patch_bias=False, head_bias=False, activation="quick_gelu"),
        **dict(image_size=8, num_heads=1, d_ff=96, ln_eps=1e-5, block_ln_eps=1e-6),
    ),
    dict(
        **dict(pool="map", class_token=False, num_classes=0, activation="gelu_tanh"),
        **dict(image_size=8, num_heads=1, d_ff=96),
    ),
    dict(  # DINOv3 as transformers computes it
        pos_embed=False,
        rope="half",
        rope_freqs="periods",
        rope_theta=100.0,
        layer_scale=True,
        num_classes=0,
        reg_tokens=2,
    ),
]


def test_every_registered_layout_detects_itself_and_round_trips(tmp_path):
    """Each layout the registry holds, written (if writable) from a model its library can
    compute, is detected from the file alone and reads back bit-exact."""
    import weight_transfer as wt
    from tests.helpers.models import assert_bit_exact
    from weight_transfer.frameworks.bridge import nnx_params
    from weight_transfer.layouts import LAYOUTS, MODULES

    assert {l.name for m in MODULES for l in m.LAYOUTS} == set(LAYOUTS)
    for layout in LAYOUTS.values():
        if not layout.writable:
            continue
        for changes in ROUND_TRIP_CONFIGS:
            # a layout whose table has no prefix rows holds the class position folded into
            # the token (the same function, not the same bytes): give it none
            config = tiny(
                **changes, **({} if layout.prefix_positions else {"pos_embed_tokens": "none"})
            )
            try:
                layout.check_model(config)
                break
            except wt.LayoutError:
                continue
        else:
            raise AssertionError(f"no test config fits {layout.name}")
        model = random_nnx(config, seed=3)
        path = wt.save_checkpoint(model, tmp_path / layout.name, layout=layout.name)
        info = wt.inspect_checkpoint(path)
        assert info["layout"] == layout.name, (layout.name, info["layout"])
        back = wt.load_checkpoint(path, "jax", overrides={"num_heads": config.num_heads})
        assert back.config.same_model(
            config.replace(**{k: getattr(back.config, k) for k in ("activation", "ln_eps")})
        ), layout.name
        assert_bit_exact(nnx_params(model), nnx_params(back))


def test_the_attention_seams_carry_a_rotation_and_a_bias(x64, monkeypatch):
    """Where the next position schemes plug in: `attention_positions` hands every block's
    attention a rotation of q and k and a bias on the logits. The same rotation (pairs of
    head channels turned by a per-token angle) and bias, given to both models and the NumPy
    reference, compute the same function in float64; and it is not the plain ViT's."""
    import jax.numpy as jnp

    from weight_transfer.diagnostics import numpy_ref
    from weight_transfer.frameworks.bridge import nnx_params, to_torch
    from weight_transfer.frameworks.runners import logits_of

    config = tiny(num_layers=2)
    t, hd = config.num_tokens, config.head_dim
    rng = np.random.default_rng(7)
    angle = rng.standard_normal((t, hd // 2))  # (T, hd/2)
    bias = rng.standard_normal((config.num_heads, t, t))  # (H, T, S)

    def rotation(xp, asarray):
        cos, sin = asarray(np.cos(angle))[:, None], asarray(np.sin(angle))[:, None]  # (T, 1, hd/2)

        def rotate(q, k):
            def turn(a):  # (B, T, H, hd), pairs interleaved
                a1, a2 = a[..., 0::2], a[..., 1::2]
                return xp.stack([a1 * cos - a2 * sin, a1 * sin + a2 * cos], -1).reshape(a.shape)

            return turn(q), turn(k)

        return rotate

    model = random_nnx(config, seed=8, dtype="float64")
    twin = to_torch(model)
    images = random_images(config, 2, seed=9, dtype="float64")
    plain = numpy_ref.forward(nnx_params(model), images, config)["logits"]  # (no jit cache)
    monkeypatch.setattr(
        jax_impl.ViT,
        "attention_positions",
        lambda self, grid: jax_impl.model.AttentionPositions(
            rotation(jnp, jnp.asarray), jnp.asarray(bias)
        ),
    )
    monkeypatch.setattr(
        torch_impl.ViT,
        "attention_positions",
        lambda self, grid: torch_impl.model.AttentionPositions(
            rotation(torch, torch.from_numpy), torch.from_numpy(bias)
        ),
    )
    monkeypatch.setattr(
        numpy_ref.Reference,
        "attention_positions",
        lambda self, grid: numpy_ref.AttentionPositions(rotation(np, np.asarray), bias),
    )
    expected = numpy_ref.forward(nnx_params(model), images, config)["logits"]
    # the JAX model eagerly: a jitted runner may hold a compile of the unpatched forward
    for got in (np.asarray(model(images)), logits_of(twin, images)):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12 * np.abs(expected).max())
    assert np.abs(expected - plain).max() > 1e-3  # the seam is used, not passed over
