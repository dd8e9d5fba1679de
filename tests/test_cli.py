"""The command line: exit codes 0 / 1 / 2, JSON output, one-line errors."""

import json
import subprocess
import sys

import pytest

from weight_transfer import cli, parity


def run(*args):
    return subprocess.run([sys.executable, "-m", "weight_transfer", *args], capture_output=True,
                          text=True)


def test_check_seed_preset_json():
    r = run("check", "--preset", "seed", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert {(x["direction"], x["dtype"]) for x in report["results"]} == {
        (d, t) for d in ("nnx->torch", "torch->nnx") for t in ("float32", "float64")}
    assert all(x["passed"] and x["max_abs_error"] <= x["bound"] for x in report["results"])


@pytest.mark.parametrize("args, fragment", [
    (["check", "--preset", "vit_z"], "invalid choice"),
    (["check", "--layers", "-1", "--preset", "seed"], "num_layers=-1"),
    (["nonsense"], "invalid choice"),
])
def test_bad_input_exits_2_with_one_message(args, fragment):
    r = run(*args)
    assert r.returncode == 2
    assert fragment in r.stderr and "Traceback" not in r.stderr


def test_help_everywhere():
    for args in (["--help"], ["check", "--help"]):
        r = run(*args)
        assert r.returncode == 0 and "usage: vit-parity" in r.stdout


def test_parity_failure_exits_1(monkeypatch, capsys):
    bad = parity.DirectionResult("nnx->torch", "float32", 1.0, 1.0, 1e-5)
    monkeypatch.setattr(parity, "check", lambda *a, **k: [bad])
    assert cli.main(["check", "--preset", "seed"]) == 1
    assert "FAIL" in capsys.readouterr().out
