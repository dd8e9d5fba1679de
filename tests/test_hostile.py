"""Hostile and unlucky files: never wrong, never destructive, bounded, every failure clean.

Each case builds its own file, runs the real CLI in a child process, and checks what a user
would: the exit code, one line on stderr and no traceback, no output left behind, every input
byte unchanged, and the child's peak memory (from `os.wait4`) under a generous bound.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import weight_transfer as wt
from tests.conftest import tiny
from weight_transfer.weights import random_nnx

MEMORY_BOUND = 1 << 30  # bytes of peak RSS: "bounded", not a speed target


@dataclass
class Run:
    code: int
    out: str
    err: str
    peak_rss: int  # bytes


# The child reports its own high-water mark (VmHWM belongs to the process image, so it starts
# at exec: the parent's memory, shared at fork, is not counted as `ru_maxrss` would).
CHILD = """
import atexit, sys
def report():
    with open("/proc/self/status") as f:
        hwm = next(line.split()[1] for line in f if line.startswith("VmHWM"))
    with open(sys.argv[1], "w") as f:
        f.write(hwm)
atexit.register(report)
from weight_transfer.cli import main
sys.exit(main(sys.argv[2:]))
"""


def cli(*args: str | Path, cwd: Path) -> Run:
    """`vit-parity ARGS` in a child process, with its own peak RSS."""
    hwm = cwd / ".peak"
    p = subprocess.run([sys.executable, "-c", CHILD, str(hwm), *map(str, args)],
                       capture_output=True, text=True, stdin=subprocess.DEVNULL)
    peak = int(hwm.read_text()) * 1024
    hwm.unlink()
    # Paths are shown as <work>: a fragment must match the message, not a folder's name.
    return Run(p.returncode, p.stdout, p.stderr.replace(str(cwd), "<work>"), peak)


def digests(*paths: Path) -> dict[str, str]:
    """sha256 of every file under the given paths (folders walked)."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")))
             if f.is_file()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def assert_refused(run: Run, fragment: str) -> None:
    assert run.code == 2, f"exit {run.code}\nstdout: {run.out}\nstderr: {run.err}"
    # Warnings (what a file could not say and was assumed) may precede the one error line.
    lines = [l for l in run.err.strip().splitlines() if not l.startswith("vit-parity: warning:")]
    assert len(lines) == 1, run.err
    assert lines[0].startswith("vit-parity: error:") and "Traceback" not in run.err
    assert fragment in lines[0], lines[0]
    assert run.peak_rss < MEMORY_BOUND, f"peak RSS {run.peak_rss / 2**20:.0f} MiB"


@pytest.fixture(scope="module")
def model():
    return random_nnx(tiny(), seed=5)


@pytest.fixture
def work(tmp_path):
    """A folder of the test's own to make files and run in."""
    return tmp_path


# ---- silently wrong output ------------------------------------------------------------------


@pytest.mark.parametrize("act", ["silu", "quick_gelu", None, 3, "gelu_10"])
def test_unknown_hf_activation_is_refused_not_read_as_gelu(work, model, act):
    folder = wt.save_checkpoint(model, work / "hf", layout="hf")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["hidden_act"] = act
    (folder / "config.json").write_text(json.dumps(cfg))
    before = digests(folder)
    run = cli("convert", folder, work / "out.safetensors", "--to", "nnx", cwd=work)
    assert_refused(run, "hidden_act")
    assert digests(folder) == before and not (work / "out.safetensors").exists()


@pytest.mark.parametrize("stored, dtype, value", [
    (np.float32, "float16", 1e6),  # float16 holds up to 65504
    (np.float64, "bfloat16", 1e300),  # bfloat16 (and float32) up to about 3.4e38
    (np.float64, "float32", 1e300),
])
def test_a_cast_that_overflows_is_refused(work, stored, dtype, value):
    from safetensors.numpy import save_file

    square = random_nnx(tiny(image_size=8), seed=6)  # a bare state dict: the grid must be square
    flat = {k: v.astype(stored) for k, v in wt.nnx_flat(square).items()}
    flat["head.bias"][0] = value
    src = work / "big.safetensors"
    save_file(flat, str(src))
    before = digests(src)
    run = cli("convert", src, work / "out.safetensors", "--to", "torch", "--dtype", dtype,
              cwd=work)
    assert_refused(run, "overflow")
    assert digests(src) == before and not (work / "out.safetensors").exists()


def test_bfloat16_npz_round_trips_and_timm_reads_it(work, model):
    timm = pytest.importorskip("timm")
    import torch
    from timm.models.vision_transformer import _load_weights

    src = wt.save_checkpoint(model, work / "m.safetensors", layout="nnx")
    out = wt.convert(src, work / "m.npz", to="google_vit", dtype="bfloat16")["output"]
    back = wt.load_checkpoint(out, "jax")
    want = {k: v.astype(ml_dtypes.bfloat16) for k, v in wt.nnx_flat(model).items()}
    got = wt.nnx_flat(back)
    assert {k: str(v.dtype) for k, v in got.items()} == {k: "bfloat16" for k in want}
    for k in want:
        np.testing.assert_array_equal(got[k].view(np.uint16), want[k].view(np.uint16), err_msg=k)
    c = tiny()
    t = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=c.image_hw,
                          patch_size=c.patch_size, embed_dim=c.d_model, depth=c.num_layers,
                          num_heads=c.num_heads, mlp_ratio=c.d_ff / c.d_model,
                          num_classes=c.num_classes)
    _load_weights(t, out, load_bfloat16=True)
    np.testing.assert_array_equal(t.head.bias.detach().numpy(),
                                  want["head.bias"].astype(np.float32))
    assert torch.equal(t.patch_embed.proj.weight.detach(), torch.from_numpy(
        want["patch_embed.kernel"].astype(np.float32).transpose(3, 2, 0, 1).copy()))


def test_a_tensor_in_two_shards_is_refused(work, model):
    many = wt.save_checkpoint(model, work / "m.safetensors", layout="torch", max_shard_size="8KB")
    index = json.loads(many.read_text())
    shards = sorted(set(index["weight_map"].values()))
    key = next(k for k, v in index["weight_map"].items() if v == shards[0])
    # the last shard gets a second copy of a tensor the index assigns to the first
    from safetensors.numpy import load_file, save_file

    last = work / shards[-1]
    tensors = load_file(str(last))
    tensors[key] = load_file(str(work / shards[0]))[key] + 1
    save_file(tensors, str(last))
    before = digests(work)
    run = cli("convert", many, work / "out.safetensors", "--to", "nnx", cwd=work)
    assert_refused(run, "stored twice")
    assert digests(work) == before


# ---- the input destroyed --------------------------------------------------------------------


def test_converting_a_folder_onto_itself_is_refused_even_with_force(work, model):
    folder = wt.save_checkpoint(model, work / "hf", layout="hf")
    (folder / "README.md").write_text("the user's notes")
    before = digests(folder)
    for dst in (folder, str(folder) + "/"):
        run = cli("convert", folder, dst, "--to", "hf", "--force", cwd=work)
        assert_refused(run, "would overwrite the input")
        assert digests(folder) == before


def test_converting_an_index_onto_its_own_shard_is_refused(work, model):
    many = wt.save_checkpoint(model, work / "model.safetensors", layout="torch",
                              max_shard_size="8KB")
    shard = sorted(set(json.loads(many.read_text())["weight_map"].values()))[0]
    before = digests(work)
    run = cli("convert", many, work / shard, "--to", "timm", "--max-shard-size", "8KB",
              "--force", cwd=work)
    assert_refused(run, "would overwrite the input")
    assert digests(work) == before and sorted(os.listdir(work)) == sorted(
        Path(p).name for p in before)


def test_an_alias_of_the_input_is_not_overwritten(work, model):
    src = wt.save_checkpoint(model, work / "m.safetensors", layout="timm")
    alias = work / "alias.safetensors"
    os.link(src, alias)  # another name for the same file (as a bind mount gives)
    before = digests(src)
    run = cli("convert", src, alias, "--to", "nnx", "--force", cwd=work)
    assert_refused(run, "would overwrite the input")
    assert digests(src) == before


def test_a_dangling_link_at_the_output_is_not_replaced_without_force(work, model):
    src = wt.save_checkpoint(model, work / "m.safetensors", layout="timm")
    link = work / "out.safetensors"
    link.symlink_to(work / "nowhere")
    run = cli("convert", src, link, "--to", "nnx", cwd=work)
    assert_refused(run, "already exists")
    assert link.is_symlink() and os.readlink(link) == str(work / "nowhere")


def test_an_existing_plot_is_not_replaced_without_force(work, model):
    ref = wt.save_checkpoint(model, work / "ref.safetensors", layout="torch")
    plot = work / "gap.png"
    plot.write_bytes(b"precious")
    run = cli("diff", ref, ref, "--plot", plot, cwd=work)
    assert_refused(run, "already exists")
    assert plot.read_bytes() == b"precious"


@pytest.mark.parametrize("args, fragment", [
    (["train-parity", "--batch", "-5"], "--batch -5"),
    (["train-parity", "--steps", "0"], "--steps 0"),
])
def test_train_parity_refuses_bad_sizes(work, args, fragment):
    assert_refused(cli(*args, cwd=work), fragment)


def test_a_fifo_input_is_refused_without_blocking(work):
    fifo = work / "model.safetensors"
    os.mkfifo(fifo)
    assert_refused(cli("inspect", fifo, cwd=work), "not a regular file")


def test_npz_members_are_checked_before_inflating(work):
    """A small .npz whose one member declares a huge array: refused from its header."""
    import zipfile

    path = work / "bomb.npz"
    header = {"descr": "<f4", "fortran_order": False, "shape": (1 << 28,)}
    buf = _npy_header(header)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        with z.open("embedding/kernel.npy", "w", force_zip64=True) as f:
            f.write(buf)
            chunk = bytes(1 << 20)
            for _ in range(1 << 10):  # 1 GiB of zeros, deflated to about 1 MB
                f.write(chunk)
    run = cli("inspect", path, cwd=work)
    assert run.code == 2 and run.peak_rss < MEMORY_BOUND, run


def _npy_header(header: dict) -> bytes:
    text = repr(header).encode()
    text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text
