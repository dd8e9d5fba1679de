"""The command line: exit codes 0 / 1 / 2, JSON output, one-line errors."""

import json
import subprocess
import sys

import pytest

from weight_transfer import cli
from weight_transfer.diagnostics import parity


def run(*args):
    """A real process: what a user's shell sees."""
    return subprocess.run(
        [sys.executable, "-m", "weight_transfer", *args], capture_output=True, text=True
    )


@pytest.mark.slow
def test_check_seed_preset_json():
    r = run("check", "--preset", "seed", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert {(x["direction"], x["dtype"]) for x in report["results"]} == {
        (d, t) for d in ("nnx->torch", "torch->nnx") for t in ("float32", "float64")
    }
    assert all(x["passed"] and x["max_abs_error"] <= x["bound"] for x in report["results"])


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["check", "--preset", "vit_z"], "invalid choice"),
        (["check", "--layers", "-1", "--preset", "seed"], "num_layers=-1"),
        (["nonsense"], "invalid choice"),
    ],
)
def test_bad_input_exits_2_with_one_message(call, args, fragment):
    r = call(*args)
    assert r.returncode == 2
    assert fragment in r.stderr and "Traceback" not in r.stderr


def test_help_everywhere(call):
    for args in (["--help"], ["check", "--help"], ["convert", "--help"], ["inspect", "--help"]):
        r = call(*args)
        assert r.returncode == 0 and "usage: vit-parity" in r.stdout


def test_a_real_process_prints_no_traceback(tmp_path):
    r = run("convert", str(tmp_path / "missing.safetensors"), str(tmp_path / "o"), "--to", "nnx")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        f"vit-parity: error: {tmp_path / 'missing.safetensors'}: no such file or directory"
    ]


def test_parity_failure_exits_1(monkeypatch, capsys):
    bad = parity.DirectionResult("nnx->torch", "float32", 1.0, 1.0, 1e-5)
    monkeypatch.setattr(parity, "check", lambda *a, **k: [bad])
    assert cli.main(["check", "--preset", "seed"]) == 1
    assert "FAIL" in capsys.readouterr().out


# ---- convert / inspect / check CKPT --------------------------------------------------------------


@pytest.fixture(scope="module")
def timm_file(tmp_path_factory):
    import weight_transfer as wt
    from tests.conftest import tiny
    from weight_transfer.frameworks.weights import random_torch

    path = tmp_path_factory.mktemp("cli") / "model.safetensors"
    return wt.save_checkpoint(random_torch(tiny(), seed=3), path, layout="timm")


def test_convert_inspect_check_round(call, tmp_path, timm_file):
    r = call("convert", str(timm_file), str(tmp_path / "hf"), "--to", "hf", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["layout"] == "timm" and report["output"] == str(tmp_path / "hf")
    r = call("inspect", str(tmp_path / "hf"), "--json")
    info = json.loads(r.stdout)
    assert r.returncode == 0 and info["layout"] == "hf"
    assert info["parameters"] == info["expected_parameters"]
    r = call("inspect", str(tmp_path / "hf"))
    assert "Hugging Face" in r.stdout and "parameters" in r.stdout
    r = call("check", str(tmp_path / "hf"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["results"][0]["passed"]


@pytest.mark.parametrize(
    "make_args, fragment",
    [
        (
            lambda d, f: ["convert", str(d / "missing.safetensors"), str(d / "o"), "--to", "nnx"],
            "no such file",
        ),
        (
            lambda d, f: ["convert", str(f), str(d / "nodir" / "o.safetensors"), "--to", "nnx"],
            "does not exist",
        ),
        (lambda d, f: ["convert", str(f), str(f), "--to", "nnx"], "overwrite the input"),
        (lambda d, f: ["convert", str(f), str(d / "o"), "--to", "keras"], "invalid choice"),
        (
            lambda d, f: ["convert", str(f), str(d / "o"), "--to", "nnx", "--image-size", "big"],
            "--image-size 'big'",
        ),
        (
            lambda d, f: [
                "convert",
                str(f),
                str(d / "o"),
                "--to",
                "nnx",
                "--max-shard-size",
                "lots",
            ],
            "max shard size 'lots'",
        ),
        (
            lambda d, f: ["convert", str(f), str(d / "o"), "--to", "nnx", "--from", "hf"],
            "none of the 32 hf (model.safetensors) keys belongs to this layout",
        ),
        (lambda d, f: ["inspect", str(d)], "a folder without model.safetensors"),
    ],
)
def test_bad_convert_input_exits_2(call, tmp_path, timm_file, make_args, fragment):
    before = timm_file.read_bytes()
    r = call(*make_args(tmp_path, timm_file))
    assert r.returncode == 2, r.stdout + r.stderr
    assert fragment in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.startswith(("vit-parity: error:", "usage:"))
    assert timm_file.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] in ([], ["nodir"]) or not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A reference checkpoint and a candidate with its patch kernel moved with .T and eps 1e-5."""
    import weight_transfer as wt
    from tests.conftest import tiny
    from weight_transfer.frameworks.weights import random_nnx

    d = tmp_path_factory.mktemp("pair")
    model = random_nnx(tiny(), seed=1)
    ref = wt.save_checkpoint(model, d / "ref.safetensors", layout="torch")
    flat = wt.nnx_flat(model)
    flat["patch_embed.kernel"] = flat["patch_embed.kernel"].transpose(1, 0, 2, 3)
    cand = wt.save_checkpoint(wt.nnx_from_flat(flat, tiny(ln_eps=1e-5)), d / "cand.safetensors")
    return ref, cand


@pytest.mark.slow  # 3.3 s (matplotlib); the diff's JSON is also in test_testing's reports
def test_diff_table_json_and_plot(call, tmp_path, pair):
    ref, cand = pair
    r = call("diff", str(ref), str(ref))
    assert r.returncode == 0 and "first divergence: none" in r.stdout
    r = call("diff", str(ref), str(cand), "--json", "--plot", str(tmp_path / "gap.png"))
    assert r.returncode == 1
    report = json.loads(r.stdout)
    assert report["first_divergence"] == "patch_embed" and not report["passed"]
    assert (tmp_path / "gap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_doctor_cli_names_both_faults(call, pair):
    ref, cand = pair
    r = call("doctor", str(ref), str(cand), "--json")
    assert r.returncode == 1
    d = json.loads(r.stdout)
    assert d["first_divergence"] == "patch_embed" and d["fixed"]
    assert [f["id"] for f in d["findings"]] == ["conv_kernel_spatial_swap", "ln_eps"]
    r = call("doctor", str(ref), str(ref))
    assert r.returncode == 0 and "agree" in r.stdout


@pytest.mark.slow  # 4.4 s (--durations); gradient parity itself is in the quick subset
def test_check_grads_json(call):
    r = call("check", "--preset", "seed", "--dtype", "float32", "--grads", "--json")
    assert r.returncode == 0, r.stderr
    grads = json.loads(r.stdout)["gradients"]
    assert {g["name"] for g in grads} >= {"images", "patch_embed.kernel", "head.bias"}
    assert not any(g["divergent"] for g in grads)


@pytest.mark.slow
def test_train_parity_cli(call, tmp_path):
    r = call("train-parity", "--steps", "10", "--json", "--plot", str(tmp_path / "loss.png"))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["passed"] and len(report["losses"]["torch32"]) == 10
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_progress_bar_only_on_a_terminal():
    import io

    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert cli.progress_bar("x", io.StringIO()) is None
    out = Tty()
    draw = cli.progress_bar("converting", out)
    draw(1, 4)
    draw(4, 4)
    assert "converting [#######.......................] 1/4 tensors" in out.getvalue()
    assert out.getvalue().endswith("4/4 tensors\n")


def test_convert_reports_progress(tmp_path, timm_file):
    import weight_transfer as wt

    seen = []
    wt.convert(
        timm_file,
        tmp_path / "o.safetensors",
        to="nnx",
        progress=lambda done, total: seen.append((done, total)),
    )
    assert seen[-1][0] == seen[-1][1] == len(seen) > 10


def test_torchs_new_precision_api_is_respected_and_recorded(call):
    """A caller that set torch >= 2.9's `fp32_precision` (which makes reading a legacy TF32
    flag raise) can still run a check; the check runs with TF32 off, records the context it
    ran in, and leaves the caller's setting as it found it."""
    import torch

    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch < 2.9 has no fp32_precision")
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        r = call("check", "--preset", "seed", "--dtype", "float32", "--json")
        assert r.returncode == 0, r.stderr
        precision = json.loads(r.stdout)["precision"]
        assert precision["torch_tf32"]["cuda.matmul.fp32_precision"] == "ieee"
        assert precision["jax_default_matmul_precision"] == "highest"
        assert {"jax", "flax", "torch", "numpy"} <= set(precision["versions"])
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = before
