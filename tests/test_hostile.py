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
from weight_transfer.frameworks.weights import random_nnx

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
    p = subprocess.run(
        [sys.executable, "-c", CHILD, str(hwm), *map(str, args)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    peak = int(hwm.read_text()) * 1024
    hwm.unlink()
    # Paths are shown as <work>: a fragment must match the message, not a folder's name.
    return Run(p.returncode, p.stdout, p.stderr.replace(str(cwd), "<work>"), peak)


def digests(*paths: Path) -> dict[str, str]:
    """sha256 of every file under the given paths (folders walked)."""
    files = [
        f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()
    ]
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


@pytest.mark.parametrize("act", ["gelu_10", None, 3, "swiglu"])
def test_unknown_hf_activation_is_refused_not_read_as_gelu(work, model, act):
    folder = wt.save_checkpoint(model, work / "hf", layout="hf")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["hidden_act"] = act
    (folder / "config.json").write_text(json.dumps(cfg))
    before = digests(folder)
    run = cli("convert", folder, work / "out.safetensors", "--to", "nnx", cwd=work)
    assert_refused(run, "hidden_act")
    assert digests(folder) == before and not (work / "out.safetensors").exists()


@pytest.mark.parametrize(
    "stored, dtype, value",
    [
        (np.float32, "float16", 1e6),  # float16 holds up to 65504
        (np.float64, "bfloat16", 1e300),  # bfloat16 (and float32) up to about 3.4e38
        (np.float64, "float32", 1e300),
    ],
)
def test_a_cast_that_overflows_is_refused(work, stored, dtype, value):
    from safetensors.numpy import save_file

    square = random_nnx(tiny(image_size=8), seed=6)  # a bare state dict: the grid must be square
    flat = {k: v.astype(stored) for k, v in wt.nnx_flat(square).items()}
    flat["head.bias"][0] = value
    src = work / "big.safetensors"
    save_file(flat, str(src))
    before = digests(src)
    run = cli("convert", src, work / "out.safetensors", "--to", "torch", "--dtype", dtype, cwd=work)
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
    t = timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        img_size=c.image_hw,
        patch_size=c.patch_size,
        embed_dim=c.d_model,
        depth=c.num_layers,
        num_heads=c.num_heads,
        mlp_ratio=c.d_ff / c.d_model,
        num_classes=c.num_classes,
    )
    _load_weights(t, out, load_bfloat16=True)
    np.testing.assert_array_equal(
        t.head.bias.detach().numpy(), want["head.bias"].astype(np.float32)
    )
    assert torch.equal(
        t.patch_embed.proj.weight.detach(),
        torch.from_numpy(
            want["patch_embed.kernel"].astype(np.float32).transpose(3, 2, 0, 1).copy()
        ),
    )


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
    many = wt.save_checkpoint(
        model, work / "model.safetensors", layout="torch", max_shard_size="8KB"
    )
    shard = sorted(set(json.loads(many.read_text())["weight_map"].values()))[0]
    before = digests(work)
    run = cli(
        "convert",
        many,
        work / shard,
        "--to",
        "timm",
        "--max-shard-size",
        "8KB",
        "--force",
        cwd=work,
    )
    assert_refused(run, "would overwrite the input")
    assert digests(work) == before and sorted(os.listdir(work)) == sorted(
        Path(p).name for p in before
    )


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


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["train-parity", "--batch", "-5"], "--batch -5"),
        (["train-parity", "--steps", "0"], "--steps 0"),
    ],
)
def test_train_parity_refuses_bad_sizes(work, args, fragment):
    assert_refused(cli(*args, cwd=work), fragment)


@pytest.mark.parametrize(
    "key, feature",
    [
        ("blocks.0.attn.relative_position_bias_table", "relative position bias"),
        ("blocks.0.attn.rope.freqs", "rotary position embeddings"),
    ],
)
def test_features_outside_this_vit_are_refused_by_name(work, model, key, feature):
    from safetensors.numpy import load_file, save_file

    path = wt.save_checkpoint(model, work / "m.safetensors", layout="timm")
    tensors = load_file(str(path)) | {key: np.ones((3, 3), np.float32)}
    save_file(tensors, str(work / "extra.safetensors"))
    assert_refused(cli("inspect", work / "extra.safetensors", cwd=work), feature)


def test_a_folder_with_several_weight_files_is_refused(work, model):
    folder = wt.save_checkpoint(model, work / "hf", layout="hf")
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "open_clip_model.safetensors").write_bytes(weights)
    assert_refused(cli("inspect", folder, cwd=work), "several weight files")


def test_a_fifo_input_is_refused_without_blocking(work):
    fifo = work / "model.safetensors"
    os.mkfifo(fifo)
    assert_refused(cli("inspect", fifo, cwd=work), "not a regular file")


@pytest.mark.slow  # 3.9 s (--durations): the npz's other forgeries stay quick
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


# ---- unbounded resources from a small file --------------------------------------------------


def _safetensors(path: Path, header: dict, data: bytes = b"") -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _manifested(model, work: Path, **config_changes) -> Path:
    """Our own file, with its manifest's config edited."""
    path = wt.save_checkpoint(model, work / "m.safetensors", layout="nnx")
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    manifest = json.loads(header["__metadata__"]["vit_parity"])
    manifest["config"].update(config_changes)
    header["__metadata__"]["vit_parity"] = json.dumps(manifest)
    return _safetensors(work / "forged.safetensors", header, raw[8 + n :])


@pytest.mark.parametrize(
    "changes, fragment",
    [
        (dict(num_layers=1_000_000), "num_layers=1000000"),
        (dict(d_model=10**9, num_heads=1, d_ff=10**9), "expected shape"),
    ],
)
def test_a_forged_config_costs_nothing(work, model, changes, fragment):
    path = _manifested(model, work, **changes)
    run = cli("convert", path, work / "out.safetensors", "--to", "torch", cwd=work)
    assert_refused(run, fragment)
    assert run.peak_rss < 400 << 20


def test_a_million_empty_tensors_are_refused(work):
    header = {
        f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(150_000)
    }
    assert_refused(
        cli("inspect", _safetensors(work / "many.safetensors", header), cwd=work), "150000 tensors"
    )


def test_overlapping_offsets_are_refused(work, model):
    def overlap(header):  # every same-shaped tensor points at the first one's bytes
        first = _first(header)
        for key, info in header.items():
            if key != "__metadata__" and info["shape"] == first["shape"]:
                info["data_offsets"] = first["data_offsets"]

    path = _edit_header(wt.save_checkpoint(model, work / "m.safetensors", layout="torch"), overlap)
    assert_refused(
        cli("convert", path, work / "o.safetensors", "--to", "nnx", cwd=work), "offsets must tile"
    )


@pytest.mark.parametrize("target", ["/dev/zero", "fifo"])
def test_config_and_index_must_be_regular_files(work, model, target):
    folder = wt.save_checkpoint(model, work / "hf", layout="hf")
    (folder / "config.json").unlink()
    if target == "fifo":
        os.mkfifo(work / "fifo")
        target = work / "fifo"
    (folder / "config.json").symlink_to(target)
    assert_refused(cli("inspect", folder, cwd=work), "not a regular file")
    (work / "model.safetensors.index.json").symlink_to(target)
    assert_refused(
        cli("inspect", work / "model.safetensors.index.json", cwd=work), "not a regular file"
    )


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--image-size", "100000"], "would need"),
    ],
)
def test_sizes_too_large_are_refused_before_allocating(work, model, args, fragment):
    path = wt.save_checkpoint(model, work / "m.safetensors", layout="torch")
    run = cli("convert", path, work / "o.safetensors", "--to", "nnx", *args, cwd=work)
    assert_refused(run, fragment)


def test_a_huge_batch_is_refused_before_allocating(work):
    assert_refused(
        cli("check", "--preset", "seed", "--batch", "1000000000", cwd=work),
        "would not fit in memory",
    )


# ---- spec-valid files -----------------------------------------------------------------------


def test_a_header_in_another_order_than_the_data_converts(work, model):
    def reverse(header):
        items = list(header.items())
        header.clear()
        header.update(reversed(items))

    path = _edit_header(wt.save_checkpoint(model, work / "m.safetensors", layout="torch"), reverse)
    out = wt.convert(path, work / "o.safetensors", to="timm")["output"]
    back = wt.load_checkpoint(out, "jax")
    for key, value in wt.nnx_flat(model).items():
        np.testing.assert_array_equal(wt.nnx_flat(back)[key], value, err_msg=key)


@pytest.mark.slow  # 4 s each; the quick subset checks files through test_cli's check tests
@pytest.mark.parametrize("dtype", ["float64", "mixed", "float16"])
def test_check_runs_any_stored_dtype(work, dtype):
    from safetensors.numpy import save_file

    config = tiny(image_size=8)
    flat = wt.nnx_to_torch_flat(wt.nnx_flat(random_nnx(config, seed=2)), config)
    cast = {
        "float64": lambda k: np.float64,
        "float16": lambda k: np.float16,
        "mixed": lambda k: np.float16 if k.endswith("bias") else np.float32,
    }[dtype]
    path = work / "m.safetensors"
    save_file({k: v.astype(cast(k)) for k, v in flat.items()}, str(path))
    run = cli("check", path, "--set", "num_heads=3", "--json", cwd=work)
    assert run.code == 0, run.err
    result = json.loads(run.out)["results"][0]
    assert result["passed"] and result["dtype"] == ("float64" if dtype == "float64" else "float32")


@pytest.mark.parametrize("legacy", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_torch_pickles_legacy_and_wrapped(work, model, legacy):
    import torch

    sd = wt.nnx_state_to_state_dict(wt.nnx_flat(model), model.config)
    path = work / "m.pth"
    torch.save({"model": sd, "epoch": 3}, path, _use_new_zipfile_serialization=not legacy)
    run = cli(
        "convert",
        path,
        work / "o.safetensors",
        "--to",
        "nnx",
        "--allow-pickle",
        "--set",
        "image_size=8x12",
        "--set",
        "num_heads=3",
        cwd=work,
    )
    assert run.code == 0, run.err
    assert "read from the checkpoint's 'model' entry" in run.out
    back = wt.load_checkpoint(work / "o.safetensors", "jax")
    for key, value in wt.nnx_flat(model).items():
        np.testing.assert_array_equal(wt.nnx_flat(back)[key], value, err_msg=key)


# ---- failures that are not clean ------------------------------------------------------------


def _edit_header(path: Path, edit) -> Path:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    return _safetensors(path.with_name("edited.safetensors"), header, raw[8 + n :])


def _first(header: dict) -> dict:
    return next(v for k, v in header.items() if k != "__metadata__")


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda h: _first(h).update(data_offsets=["0", "4"]), "malformed entry"),
        pytest.param(  # the forgeries below a kind's first: in the whole suite (~1 s each)
            lambda h: _first(h).update(data_offsets=[0.0, 4.0]),
            "malformed entry",
            marks=pytest.mark.slow,
        ),
        (lambda h: _first(h).update(shape=[True, 3]), "malformed entry"),
        (lambda h: h.update(__metadata__={"a": 1}), "__metadata__"),
        pytest.param(
            lambda h: h.update(__metadata__=["a"]), "__metadata__", marks=pytest.mark.slow
        ),
        (lambda h: h["__metadata__"].update(vit_parity="{}"), "no config object"),
        pytest.param(
            lambda h: h["__metadata__"].update(vit_parity="[]"),
            "no config object",
            marks=pytest.mark.slow,
        ),
        (lambda h: h["__metadata__"].update(vit_parity='{"config": 3}'), "no config object"),
        (
            lambda h: h["__metadata__"].update(vit_parity='{"config": {"d_model": "x"}}'),
            "config is invalid",
        ),
        (lambda h: h["__metadata__"].update(vit_parity="not json"), "not JSON"),
    ],
)
def test_malformed_headers_and_manifests(work, model, edit, fragment):
    path = _edit_header(wt.save_checkpoint(model, work / "m.safetensors", layout="nnx"), edit)
    assert_refused(
        cli("convert", path, work / "o.safetensors", "--to", "torch", cwd=work), fragment
    )


def test_npz_that_is_not_npz(work, model):
    import zipfile

    with zipfile.ZipFile(work / "text.npz", "w") as z:
        z.writestr("embedding/kernel.txt", "hello")
    assert_refused(cli("inspect", work / "text.npz", cwd=work), "not an .npy array")
    np.save(work / "array.npy", np.zeros(3))
    os.rename(work / "array.npy", work / "array.npz")
    assert_refused(cli("inspect", work / "array.npz", cwd=work), "not a readable .npz")


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"num_attention_heads": "three"}', "expected int"),
        ('{"hidden_act": "gelu"}', "no 'num_attention_heads'"),
    ],
)
def test_bad_config_json(work, model, text, fragment):
    folder = wt.save_checkpoint(model, work / "hf", layout="hf")
    (folder / "config.json").write_text(text)
    assert_refused(
        cli("convert", folder, work / "o.safetensors", "--to", "nnx", cwd=work), fragment
    )


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors"])
def test_an_index_cannot_point_outside_its_folder(work, shard):
    index = work / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"head.bias": shard}}))
    assert_refused(cli("inspect", index, cwd=work), "leaves the index's folder")


def test_a_signal_mid_conversion_cleans_up(work, model, monkeypatch, capsys):
    """SIGTERM, SIGHUP and SIGINT while writing: no partial or temporary file is left, one
    line on stderr, exit 128 + the signal."""
    import signal

    from weight_transfer.porting import writers

    src = wt.save_checkpoint(model, work / "m.safetensors", layout="torch")
    real = writers.write_safetensors
    # SIGINT as a terminal delivers it: KeyboardInterrupt (a test process can inherit another
    # disposition, from the runner or an earlier test: the CLI keeps what it inherits)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            _convert_interrupted_by(sig, src, work, writers, real, monkeypatch, capsys)
    finally:
        signal.signal(signal.SIGINT, previous)


def _convert_interrupted_by(sig, src, work, writers, real, monkeypatch, capsys):
    """One conversion stopped by `sig` while writing: exit 128 + sig, one line, nothing left."""
    from weight_transfer import cli as cli_module

    def interrupted(path, *args, **kwargs):
        path.write_bytes(b"partial")
        os.kill(os.getpid(), sig)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(writers, "write_safetensors", interrupted)
    before = sorted(os.listdir(work))
    code = cli_module.main(["convert", str(src), str(work / "o.safetensors"), "--to", "nnx"])
    err = capsys.readouterr().err
    assert code == 128 + sig, (sig, code, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert sorted(os.listdir(work)) == before  # no output, no hidden temporary folder


def test_a_closed_stdout_after_the_output_is_written_is_not_an_error(work, model):
    src = wt.save_checkpoint(model, work / "m.safetensors", layout="torch")
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "weight_transfer",
            "convert",
            str(src),
            str(work / "o.safetensors"),
            "--to",
            "nnx",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    p.stdout.close()  # the reader went away (`| head -0`)
    err = p.stderr.read().decode()
    assert p.wait() == 0, err
    assert "Traceback" not in err
    assert wt.load_checkpoint(work / "o.safetensors", "jax").config == model.config


def test_an_incomplete_flax_format_hf_safetensors_is_refused_not_a_crash(work):
    """An HF Flax-format `model.safetensors` (metadata format: flax, Flax leaf names) was a
    StopIteration (exit 3); it is read as the hf_flax layout now, and one missing most of its
    tensors is refused naming them."""
    from safetensors.numpy import save_file

    folder = work / "flax_vit"
    folder.mkdir()
    d = 8
    tensors = {
        "embeddings.cls_token": np.zeros((1, 1, d), np.float32),
        "embeddings.patch_embeddings.projection.kernel": np.zeros((4, 4, 3, d), np.float32),
        "encoder.layer.0.layernorm_before.scale": np.zeros(d, np.float32),
        "encoder.layer.0.attention.attention.query.kernel": np.zeros((d, d), np.float32),
        "layernorm.scale": np.zeros(d, np.float32),
    }
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "flax"})
    (folder / "config.json").write_text('{"model_type": "vit", "num_attention_heads": 2}')
    assert_refused(cli("inspect", folder, cwd=work), "hf_flax layout")


# ---- Flax msgpack: what flax.serialization accepts and a reader must not ---------------------


def _ext_array(shape, dtype: str, data: bytes):
    import msgpack

    return msgpack.ExtType(1, msgpack.packb((shape, dtype, data), use_bin_type=True))


def _forged(work: Path, tree, name: str = "flax_model.msgpack", tail: bytes = b"") -> Path:
    import msgpack

    path = work / name
    path.write_bytes(msgpack.packb(tree, use_bin_type=True, strict_types=False) + tail)
    return path


def _deep(n: int) -> dict:
    tree: dict = {"w": _ext_array([1], "float32", bytes(4))}
    for _ in range(n):
        tree = {"a": tree}
    return tree


W = lambda: _ext_array([2, 2], "float32", bytes(16))  # noqa: E731  a well-formed leaf

FORGERIES = {  # what flax.serialization.msgpack_restore accepts, or fails on late
    "string-dtype": ({"w": _ext_array([2], "U2", bytes(16))}, b"", "dtype 'U2'"),
    "datetime-dtype": (
        {"w": _ext_array([2], "datetime64[s]", bytes(16))},
        b"",
        "dtype 'datetime64[s]'",
    ),
    "object-dtype": ({"w": _ext_array([2], "object", bytes(16))}, b"", "dtype 'object'"),
    "negative-shape": (
        {"w": _ext_array([-1, 2], "float32", bytes(16))},
        b"",
        "not non-negative sizes",
    ),
    "lying-shape": ({"w": _ext_array([1 << 40], "float32", bytes(16))}, b"", "with 16 bytes"),
    "float-key": ({"a": {7.5: W()}}, b"", "not a string or an index"),
    "negative-key": ({"a": {-7: W()}}, b"", "not a string or an index"),
    "unknown-ext": ({"w": "EXT42"}, b"", "ext type 42"),  # an ext msgpack packs in the test
    "trailing-bytes": ({"w": W()}, b"\x00", "1 bytes after the tree"),
    "nesting-bomb": (_deep(200), b"", "nesting deeper than 64"),
    "chunked-bomb": (
        {
            "w": {
                "__msgpack_chunked_array__": True,
                "shape": {"0": 1 << 40},
                "chunks": {"0": _ext_array([4], "float32", bytes(16))},
            }
        },
        b"",
        "chunks hold 4 values",
    ),
    "chunk-missing": (
        {
            "w": {
                "__msgpack_chunked_array__": True,
                "shape": {"0": 8},
                "chunks": {"1": _ext_array([8], "float32", bytes(32))},
            }
        },
        b"",
        "malformed",
    ),
    "value-bomb": ({"w": list(range(1_100_000))}, b"", "more than 1,000,000 values"),
}
QUICK_FORGERIES = ("string-dtype", "lying-shape", "nesting-bomb", "chunked-bomb")  # ~1.5 s each


@pytest.mark.parametrize(
    "forgery",
    [
        pytest.param(name, marks=[pytest.mark.slow] * (name not in QUICK_FORGERIES))
        for name in FORGERIES
    ],
)
def test_a_forged_flax_msgpack_is_refused_before_memory_is_spent(work, forgery):
    """Each refused by name, exit 2, peak memory bounded (`assert_refused`)."""
    import msgpack

    tree, tail, fragment = FORGERIES[forgery]
    if tree.get("w") == "EXT42":
        tree = {"w": msgpack.ExtType(42, b"\x00" * 8)}
    assert_refused(cli("inspect", _forged(work, tree, tail=tail), cwd=work), fragment)


@pytest.mark.slow
def test_a_truncated_flax_msgpack_is_refused(work):
    """A bin length beyond the end of the file (a download cut short)."""
    path = _forged(work, {"w": _ext_array([64], "float64", bytes(512))})
    path.write_bytes(path.read_bytes()[:-100])
    assert_refused(cli("inspect", path, cwd=work), "runs past the end")


@pytest.mark.slow
def test_a_flax_msgpack_whose_tree_mixes_layouts_is_refused(work, model):
    """HF Flax names beside our own NNX names in one tree: one layout is detected and every
    key of the other is named as not belonging to it."""
    from flax.serialization import msgpack_restore, msgpack_serialize

    folder = wt.save_checkpoint(model, work / "hf", layout="hf_flax")
    tree = msgpack_restore((folder / "flax_model.msgpack").read_bytes())
    tree["blocks"] = {"0": {"attn": {"q": {"kernel": np.zeros((24, 24), np.float32)}}}}
    (folder / "flax_model.msgpack").write_bytes(msgpack_serialize(tree))
    assert_refused(cli("inspect", folder, cwd=work), "unexpected")


# ---- big_vision tensorstore folders ------------------------------------------------------------


def _zarr_folder(work: Path, **zarray) -> Path:
    """A tensorstore checkpoint folder of one zarr array whose `.zarray` says `zarray`."""
    folder = work / "bv-000000001"
    array = folder / "params~head~kernel"
    array.mkdir(parents=True)
    spec = {"zarr_format": 2, "shape": [4], "chunks": [4], "dtype": "<f4", "compressor": None}
    spec |= {"fill_value": None, "filters": None, "order": "C"} | zarray
    (array / ".zarray").write_text(json.dumps(spec))
    (array / "0").write_bytes(bytes(16))
    return folder


@pytest.mark.parametrize(
    "forgery, fragment",
    [
        ("object-dtype", "dtype '|O'"),
        pytest.param("bomb", "refusing to decompress", marks=pytest.mark.slow),
        pytest.param("link-outside", "symbolic link", marks=pytest.mark.slow),
        pytest.param("pointer-outside", "holds a step", marks=pytest.mark.slow),
    ],
)
def test_a_forged_tensorstore_folder_is_refused(work, forgery, fragment):
    """What a tensorstore folder can lie about: a dtype, a size its compressed chunks would
    inflate to, an array (a symbolic link) outside the folder, a `-LAST` pointer elsewhere."""
    target = {
        "object-dtype": lambda: _zarr_folder(work, dtype="|O"),
        "bomb": lambda: _zarr_folder(work, shape=[1 << 34], chunks=[1 << 20]),
    }.get(forgery)
    if target is not None:
        path = target()
    elif forgery == "link-outside":
        path = _zarr_folder(work)
        outside = work / "elsewhere"
        outside.mkdir()
        (path / "params~head~bias").symlink_to(outside)
    else:
        _zarr_folder(work)
        path = work / "bv-LAST"
        path.write_text("../../etc")
    assert_refused(cli("inspect", path, cwd=work), fragment)


def _orbax_with_metadata(work: Path, model, edit) -> Path:
    """Our Orbax folder of `model` with its `_METADATA` JSON edited by `edit` (or replaced by
    `edit`'s bytes)."""
    folder = wt.save_checkpoint(model, work / "ckpt", layout="orbax")
    metadata = folder / "state" / "_METADATA"
    if isinstance(edit, bytes):
        metadata.write_bytes(edit)
    else:
        tree = json.loads(metadata.read_text())
        edit(tree)
        metadata.write_text(json.dumps(tree))
    return folder


def _rename_a_leaf(tree: dict) -> None:
    leaves = tree["tree_metadata"]
    key = next(iter(leaves))
    leaf = leaves.pop(key)
    leaf["key_metadata"][-1]["key"] = "renamed"
    leaves[key.replace("'bias'", "'renamed'")] = leaf


@pytest.mark.slow  # 3 CLI processes, ~4 s each
@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda tree: tree.update(use_ocdbt=False), "use_ocdbt=False but the folder holds"),
        (_rename_a_leaf, "unreadable Orbax metadata"),
        (b"\xff not json", "not a JSON object"),
    ],
    ids=["storage", "renamed-leaf", "not-json"],
)
def test_orbax_metadata_that_lies_is_refused_in_one_line(work, model, edit, fragment):
    """Orbax metadata edited so it no longer describes the arrays: one line, exit 2, and none
    of the "Event loop is closed" tracebacks Orbax's tensorstore callbacks print after a
    failed read (they came about one run in four, after the message)."""
    folder = _orbax_with_metadata(work, model, edit)
    before = digests(folder)
    assert_refused(cli("convert", folder, work / "out", "--to", "timm", cwd=work), fragment)
    assert digests(folder) == before and not (work / "out").exists()
