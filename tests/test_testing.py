"""`weight_transfer.testing` on ports this project did not write: hand-written NNX, Linen and
torch models with their own names and fused or split qkv (tests/helpers/ports.py), against
timm and Hugging Face references, with faults planted in the weight copy and in the module."""

import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("timm")

from tests.helpers import ports  # noqa: E402
from weight_transfer.testing import (  # noqa: E402
    assert_equivalent,
    compare_grads,
    compare_models,
    match_params,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def timm_ref():
    return ports.timm_reference()


@pytest.fixture(scope="module")
def hf_ref():
    return ports.hf_reference()


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(5).standard_normal((2, 16, 16, 3)).astype(np.float32)


# ---- matching parameters by value ---------------------------------------------------------------


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_fingerprints_match_transposed_reshaped_and_conv_parameters():
    w, conv, pos = rand(6, 4), rand(8, 3, 2, 5, seed=1), rand(1, 7, 4, seed=2)
    ref = {"fc.weight": w, "stem.weight": conv, "pos": pos}
    cand = {
        "dense.kernel": w.T,
        "patch.kernel": conv.transpose(2, 3, 1, 0),
        "table": pos.reshape(7, 4),
        "heads.kernel": w.T.reshape(4, 2, 3),  # a DenseGeneral kernel (in, heads, head_dim)
    }
    cand["heads.kernel"] = rand(6, 4, seed=3).T.reshape(4, 2, 3)  # its own reference below
    ref["attn.weight"] = rand(6, 4, seed=3)
    matches, left_ref, left_cand = match_params(ref, cand)
    got = {m.candidate: (m.reference, m.transform.describe()) for m in matches}
    assert got == {
        "dense.kernel": ("fc.weight", "axes (1, 0)"),
        "patch.kernel": ("stem.weight", "axes (2, 3, 1, 0)"),
        "table": ("pos", "reshaped to (7, 4)"),
        "heads.kernel": ("attn.weight", "axes (1, 0), reshaped to (4, 2, 3)"),
    }
    assert not left_ref and not left_cand


def test_fused_parameters_match_their_pieces_both_ways():
    qkv = rand(9, 3)
    q, k, v = np.split(qkv, 3)
    split_cand = match_params(
        {"qkv.weight": qkv}, {"q.kernel": q.T, "k.kernel": k.T, "v.kernel": v.T}
    )
    parts = {m.candidate: m.transform.ref_part for m in split_cand[0]}
    assert parts == {"q.kernel": (0, 3, 0), "k.kernel": (0, 3, 1), "v.kernel": (0, 3, 2)}
    fused_cand = match_params({"q.weight": q, "k.weight": k, "v.weight": v}, {"qkv.weight": qkv})
    parts = {m.reference: m.transform.cand_part for m in fused_cand[0]}
    assert parts == {"q.weight": (0, 3, 0), "k.weight": (0, 3, 1), "v.weight": (0, 3, 2)}
    for m in split_cand[0]:  # the transform carries the reference onto the candidate exactly
        np.testing.assert_array_equal(
            m.transform.apply(qkv), {"q": q.T, "k": k.T, "v": v.T}[m.candidate[0]]
        )


def test_a_permutation_matches_but_no_transform_explains_it():
    w = rand(6, 4)
    permuted = w.reshape(3, 2, 4)[[2, 0, 1]].reshape(6, 4)  # heads reordered
    matches, _, _ = match_params({"o.weight": w}, {"o.weight": permuted})
    assert [(m.reference, m.transform) for m in matches] == [("o.weight", None)]


def test_equal_values_pair_within_their_modules_in_call_order():
    """A fresh model's LayerNorm scales are all ones: paired through their neighbours."""
    ones = np.ones(4, np.float32)
    ref = {f"blocks.{i}.{n}.weight": ones for i in range(2) for n in ("norm1", "norm2")}
    ref |= {f"blocks.{i}.fc.weight": rand(4, 4, seed=i) for i in range(2)}
    cand = {f"layers.{i}.{n}.scale": ones for i in (1, 0) for n in ("b", "a")}
    cand |= {f"layers.{i}.fc.kernel": rand(4, 4, seed=i).T for i in range(2)}
    order_r = [f"blocks.{i}.{n}" for i in range(2) for n in ("norm1", "fc", "norm2")]
    order_c = [f"layers.{i}.{n}" for i in range(2) for n in ("a", "fc", "b")]
    matches, _, _ = match_params(ref, cand, order_r, order_c)
    got = {m.candidate: m.reference for m in matches if "scale" in m.candidate}
    assert got == {
        "layers.0.a.scale": "blocks.0.norm1.weight",
        "layers.0.b.scale": "blocks.0.norm2.weight",
        "layers.1.a.scale": "blocks.1.norm1.weight",
        "layers.1.b.scale": "blocks.1.norm2.weight",
    }


# ---- correct ports pass -------------------------------------------------------------------------


def nnx_port(timm_ref, faults=(), **kw):
    return ports.copy_timm_into_nnx(timm_ref, ports.NNXViT(**kw), faults)


def linen_port(timm_ref, faults=(), **kw):
    return ports.LinenViT(**kw), ports.timm_to_linen(timm_ref, faults)


def torch_port(hf_ref, faults=(), **kw):
    return ports.copy_hf_into_torch(hf_ref, ports.TorchViT(**kw), faults)


CORRECT = {
    "nnx, fused qkv": ("timm", lambda r: nnx_port(r)),
    "nnx, split qkv": ("timm", lambda r: nnx_port(r, fused=False)),
    "linen": ("timm", linen_port),
    "torch, fused qkv against HF's split": ("hf", torch_port),
}


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=[pytest.mark.slow] * c.startswith("nnx")) for c in CORRECT],
)
def test_a_correct_port_passes_layer_by_layer(case, timm_ref, hf_ref, images):
    which, build = CORRECT[case]
    ref = timm_ref if which == "timm" else hf_ref
    report = compare_models(ref, build(ref), images)
    assert report.ok, report.explain() + "\n" + report.table()
    assert not report.findings and report.unmatched == {"reference": [], "candidate": []}
    # every block and every norm is paired: 2 blocks, each with its norms and MLP layers
    pairs = {(p.reference, p.candidate) for p in report.layers}
    assert len(report.layers) >= 15, report.table()
    assert ("", "") in pairs  # the outputs, last
    for p in report.layers:
        assert p.gap.noise_floor > 0 and p.gap.gap64 < 1e-12, (p.reference, p.gap)


# ---- planted faults fail and name the block -----------------------------------------------------

FAULTS = {
    # in the user's weight copy
    "nnx: one output projection untransposed": (
        lambda r, h: nnx_port(r, ("proj_untransposed",)),
        ("blocks.1.attn.proj", "layers.1.attention.out"),
        "layers.1.attention.out.kernel holds the reference's blocks.1.attn.proj.weight "
        "untransposed",
    ),
    "nnx: conv kernel with H and W swapped": (
        lambda r, h: nnx_port(r, ("conv_hw_swapped",)),
        ("patch_embed.proj", "embed"),
        "embed.kernel holds the reference's patch_embed.proj.weight with H and W swapped",
    ),
    "nnx: q and k exchanged in one block": (
        lambda r, h: nnx_port(r, ("qk_exchanged",), fused=False),
        ("blocks.1.attn.proj", "layers.1.attention.out"),
        "layers.1.attention.query.kernel holds the k part of the reference's "
        "blocks.1.attn.qkv.weight where its name says q",
    ),
    "linen: one output projection untransposed": (
        lambda r, h: linen_port(r, ("out_untransposed",)),
        ("blocks.1.attn.proj", "block1.attn_out"),
        "block1.attn_out.kernel holds the reference's blocks.1.attn.proj.weight untransposed",
    ),
    "torch: q and k exchanged in the fused copy": (
        lambda r, h: torch_port(h, ("qk_exchanged",)),
        ("vit.layers.0.attention.o_proj", "blocks.0.o"),
        "the reference's vit.layers.0.attention.q_proj.weight sits in the k part of "
        "blocks.0.qkv.weight",
    ),
    "torch: one output projection transposed": (
        lambda r, h: torch_port(h, ("o_transposed",)),
        ("vit.layers.0.attention.o_proj", "blocks.0.o"),
        "blocks.0.o.weight holds the reference's vit.layers.0.attention.o_proj.weight transposed",
    ),
    # in the user's module: the weights are right, nothing to name in them
    "nnx: LayerNorm epsilon 1e-5 (timm's is 1e-6)": (
        lambda r, h: nnx_port(r, eps=1e-5),
        ("blocks.0.norm1", "layers.0.pre_attn"),
        None,
    ),
    "nnx: tanh GELU": (
        lambda r, h: nnx_port(r, approximate=True),
        ("blocks.0.mlp.fc2", "layers.0.ffn.down"),
        None,
    ),
    "linen: LayerNorm epsilon 1e-5": (
        lambda r, h: linen_port(r, eps=1e-5),
        ("blocks.0.norm1", "block0.ln_1"),
        None,
    ),
    "torch: LayerNorm epsilon 1e-6 (HF's is 1e-12)": (
        lambda r, h: torch_port(h, eps=1e-6),
        ("vit.layers.0.layernorm_before", "blocks.0.n1"),
        None,
    ),
}


# one of each kind in the quick subset; the rest with the whole suite
SLOW_FAULTS = {
    "nnx: q and k exchanged in one block",  # 4.3 s
    "nnx: one output projection untransposed",  # also test_assert_equivalent_names_both_paths
    "nnx: conv kernel with H and W swapped",
    "linen: one output projection untransposed",
    "torch: one output projection transposed",
    "nnx: tanh GELU",
    "linen: LayerNorm epsilon 1e-5",
    "torch: LayerNorm epsilon 1e-6 (HF's is 1e-12)",
}


@pytest.mark.parametrize(
    "fault", [pytest.param(f, marks=[pytest.mark.slow] * (f in SLOW_FAULTS)) for f in FAULTS]
)
def test_a_planted_fault_fails_and_names_the_layer(fault, timm_ref, hf_ref, images):
    build, first, finding = FAULTS[fault]
    candidate = build(timm_ref, hf_ref)
    ref = hf_ref if fault.startswith("torch") else timm_ref
    report = compare_models(ref, candidate, images)
    assert report.first_divergence == first, report.explain() + "\n" + report.table()
    if finding is None:
        assert not report.findings, report.findings
    else:
        assert any(f.startswith(finding) for f in report.findings), report.findings


def test_assert_equivalent_names_both_paths_the_gap_and_the_fault(timm_ref, images):
    assert assert_equivalent(timm_ref, nnx_port(timm_ref), images).ok
    with pytest.raises(AssertionError) as raised:
        assert_equivalent(timm_ref, nnx_port(timm_ref, ("proj_untransposed",)), images)
    message = str(raised.value)
    assert "reference blocks.1.attn.proj <-> candidate layers.1.attention.out" in message
    assert "against a noise floor of" in message and "untransposed" in message
    table = message.split("\n\n", 1)[1].splitlines()
    assert table[0].split()[:5] == ["reference", "candidate", "gap32", "floor", "gap64"]
    assert table[-1].split()[:2] == ["blocks.1.attn.proj", "layers.1.attention.out"]  # stops


def test_a_float32_island_in_the_reference_is_explained(images):
    """HF's eager attention computes its softmax in float32 even in a float64 model."""
    eager = ports.hf_reference(attention="eager")
    report = compare_models(eager, torch_port(eager), images)
    assert not report.ok
    assert "float64 agrees only to float32's resolution" in report.explain()


@pytest.mark.slow
def test_a_user_map_pairs_what_values_cannot(timm_ref, images):
    """A parameter-free module (timm's LayerScale placeholder, an Identity after the
    attention) has no fingerprint: the user pairs it by name."""
    auto = compare_models(timm_ref, nnx_port(timm_ref), images)
    assert "blocks.0.ls1" not in [p.reference for p in auto.layers]
    report = compare_models(
        timm_ref, nnx_port(timm_ref), images, names={"blocks.0.ls1": "layers.0.attention"}
    )
    assert report.ok
    pairs = [(p.reference, p.candidate) for p in report.layers]
    assert ("blocks.0.ls1", "layers.0.attention") in pairs
    assert pairs.index(("blocks.0.ls1", "layers.0.attention")) < pairs.index(
        ("blocks.0.norm2", "layers.0.pre_ffn")
    )  # in the reference's order


@pytest.mark.slow
def test_float32_only_judges_at_the_logit_tolerance(timm_ref, images):
    report = compare_models(timm_ref, nnx_port(timm_ref), images, float64=False)
    assert report.ok and all(np.isnan(p.gap.noise_floor) for p in report.layers)
    bad = compare_models(
        timm_ref, nnx_port(timm_ref, ("proj_untransposed",)), images, float64=False
    )
    assert bad.first_divergence == ("blocks.1.attn.proj", "layers.1.attention.out")


@pytest.mark.slow
def test_our_own_models_are_sides_too(images):
    import weight_transfer as wt
    from tests.conftest import tiny
    from weight_transfer.frameworks.weights import random_nnx

    config = tiny(image_size=(16, 16))
    ours = random_nnx(config, seed=3)
    report = compare_models(wt.to_torch(ours), ours, images)
    assert report.ok and len(report.layers) > 10, report.table()


# ---- gradients ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_gradients_of_every_matched_parameter(timm_ref, images):
    grads = compare_grads(timm_ref, nnx_port(timm_ref), images)
    names = {g.reference for g in grads}
    assert names == set(dict(timm_ref.named_parameters())) | {"images"}
    assert not [g.reference for g in grads if g.gap.divergent]
    split = compare_grads(timm_ref, nnx_port(timm_ref, fused=False), images)  # through slices
    assert not [g.candidate for g in split if g.gap.divergent]
    tanh = compare_grads(timm_ref, nnx_port(timm_ref, approximate=True), images)
    assert {"blocks.0.mlp.fc1.weight", "images"} <= {g.reference for g in tanh if g.gap.divergent}


@pytest.mark.slow
def test_gradients_through_linen_and_a_fused_torch_copy(timm_ref, hf_ref, images):
    linen = compare_grads(timm_ref, linen_port(timm_ref), images)
    assert len(linen) == len(dict(timm_ref.named_parameters())) + 1
    assert not [g.reference for g in linen if g.gap.divergent]
    fused = compare_grads(hf_ref, torch_port(hf_ref), images, loss=lambda y: (y**2).mean())
    assert len(fused) == len(dict(hf_ref.named_parameters())) + 1
    assert not [g.reference for g in fused if g.gap.divergent]


# ---- bad input ----------------------------------------------------------------------------------


def test_what_is_not_a_model_is_refused_by_type(timm_ref, images):
    from vit_config import ArgumentError

    with pytest.raises(TypeError, match="cannot compare a builtins.dict"):
        compare_models(timm_ref, {"w": 1}, images)
    with pytest.raises(ArgumentError, match="input layout 'CHW'"):
        compare_models(timm_ref, nnx_port(timm_ref), images, candidate_input="CHW")


# ---- the pytest plugin, as a user's session loads it --------------------------------------------


def run_pytest(pytester, source: str, *args):
    """A user's pytest session on `source`, in this process (JAX and torch already imported:
    seconds, not a fresh interpreter's import time); plugins load from their entry points."""
    pytester.makepyfile(test_user=textwrap.dedent(source))
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider", "-p", "no:xdist", *args)
    return result.ret, "\n".join(result.outlines + result.errlines)


USER_TEST = """
    import pytest
    from tests.helpers import ports

    @pytest.fixture(scope="module")
    def ref():
        return ports.timm_reference()

    def test_good(ref, assert_equivalent):
        good = ports.copy_timm_into_nnx(ref, ports.NNXViT())
        report = assert_equivalent(ref, good, image_size=16)
        print("first pair", report.layers[0].reference)

    def test_bad(ref, assert_equivalent):
        bad = ports.copy_timm_into_nnx(ref, ports.NNXViT(), ("proj_untransposed",))
        assert_equivalent(ref, bad, image_size=16)
"""


@pytest.mark.slow
def test_the_plugin_is_registered_and_reports_the_layers(pytester):
    """Nothing but `pip install`: the entry point loads the plugin, the fixture takes the
    session's options, a failure prints the layers and the named fault."""
    from importlib.metadata import entry_points

    assert [e.value for e in entry_points(group="pytest11") if e.name == "vit_parity"] == [
        "weight_transfer.testing.plugin"
    ]
    code, out = run_pytest(pytester, USER_TEST, "--parity-images", "3")
    assert code == 1, out
    assert "1 failed, 1 passed" in out
    assert "first divergence: reference blocks.1.attn.proj <-> candidate" in out
    assert "holds the reference's blocks.1.attn.proj.weight untransposed" in out
    assert "vit-parity: every layer" in out  # the whole table, as a report section
    code, out = run_pytest(pytester, USER_TEST, "--no-parity-float64")
    assert "1 failed, 1 passed" in out and "float32 only" in out, out
    code, out = run_pytest(pytester, USER_TEST, "--parity-images", "0")
    assert "--parity-images 0: expected a positive number" in out, out


@pytest.mark.slow
def test_the_documented_example_passes(pytester):
    """docs/examples/test_my_port.py (timm's vit_small_patch16_224 in a hand-written NNX
    module), as a user runs it."""
    code, out = run_pytest(pytester, (ROOT / "docs" / "examples" / "test_my_port.py").read_text())
    assert code == 0, out


# ---- the CLI with MODULE:FACTORY models -----------------------------------------------------

USER_PORT = """
    from tests.helpers import ports

    def reference():
        return ports.timm_reference()

    def build(ref):
        return ports.copy_timm_into_nnx(ref, ports.NNXViT())

    def broken(ref):
        return ports.copy_timm_into_nnx(ref, ports.NNXViT(), ("proj_untransposed",))

    def not_a_model():
        return 42
"""


@pytest.fixture
def cli_call(call, tmp_path, monkeypatch):
    """`vit-parity ARGS` in-process, with a user's module `user_port` importable."""
    (tmp_path / "user_port.py").write_text(textwrap.dedent(USER_PORT))
    monkeypatch.syspath_prepend(str(tmp_path))
    return call


def test_cli_diff_and_doctor_take_factories(cli_call):
    done = cli_call("diff", "user_port:reference", "user_port:build")
    out = done.stdout
    assert done.returncode == 0, out
    assert "blocks.1.attn.proj" in out and "layers.1.attention.out" in out
    done = cli_call("doctor", "user_port:reference", "user_port:broken")
    out = done.stdout
    assert done.returncode == 1
    assert "first divergence: reference blocks.1.attn.proj <-> candidate layers.1.attention" in out
    assert "holds the reference's blocks.1.attn.proj.weight untransposed" in out


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("no_such_module:build", "user_port:build"), "cannot import 'no_such_module'"),
        (("user_port:reference", "user_port:missing"), "user_port has no 'missing'"),
        (("user_port:reference", "user_port:not_a_model"), "cannot compare a builtins.int"),
        (("timm:no_such_arch", "user_port:build"), "timm has no architecture 'no_such_arch'"),
        (("user_port:reference", "user_port:build", "--plot", "x.png"), "--plot draws"),
    ],
)
def test_cli_bad_factories_exit_2_with_one_message(cli_call, args, fragment):
    done = cli_call("diff", *args)
    assert done.returncode == 2 and fragment in done.stderr, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr


def test_timm_shorthand_builds_seeded_random_weights():
    """`timm:ARCH` downloads nothing: the same seed gives the same weights, run after run."""
    from weight_transfer.cli import _from_factory

    a, b = (_from_factory("timm:vit_tiny_patch16_224", seed=3) for _ in range(2))
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert x.equal(y), name
