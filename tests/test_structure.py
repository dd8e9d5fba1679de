"""Import boundaries, the module trees, and nnx.jit behaviour."""

import subprocess
import sys

import numpy as np
from flax import nnx

import jax_impl
import torch_impl
from tests.conftest import tiny


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


def test_nnx_jit_traces_once_per_shape():
    traces = []

    @nnx.jit
    def forward(model, x):
        traces.append(x.shape)
        return model(x)

    model = jax_impl.ViT(tiny(), rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).standard_normal((2, 8, 12, 3)).astype(np.float32)
    eager = model(x)
    for _ in range(3):
        out = forward(model, x + 1.0)
    np.testing.assert_allclose(forward(model, x), eager, rtol=1e-6, atol=1e-6)
    assert traces == [(2, 8, 12, 3)]
    forward(model, x[0])
    assert traces == [(2, 8, 12, 3), (8, 12, 3)]
    assert out.shape == (2, 7)
