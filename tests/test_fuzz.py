"""Fuzzing the file readers with hypothesis: random mutations of a valid safetensors header, of
an HF config.json (ViT's and DINOv3's), of the original DINOv3's RoPE and mask buffers and of
a Flax msgpack file's bytes. Every outcome is exit 0 with correct
output, or exit 2 with one line.

The oracle for "correct" is the format's own library (safetensors; flax's msgpack_restore):
whatever we accept, it must accept too, and every tensor we read or write must equal the one it
reads from the input under the same key.
"""

from __future__ import annotations

import contextlib
import io
import json
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

import weight_transfer as wt
from tests.conftest import tiny
from weight_transfer.cli import main
from weight_transfer.frameworks.weights import random_nnx

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """A torch-layout safetensors file with our manifest, and an HF folder."""
    d = tmp_path_factory.mktemp("fuzz")
    model = random_nnx(tiny(image_size=8), seed=3)
    file = wt.save_checkpoint(model, d / "m.safetensors", layout="torch")
    folder = wt.save_checkpoint(model, d / "hf", layout="hf")
    return file.read_bytes(), folder


def run_cli(*args) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in args])
    return code, err.getvalue()


def assert_clean_refusal(code: int, err: str) -> None:
    assert code == 2, (code, err)
    lines = [l for l in err.strip().splitlines() if not l.startswith("vit-parity: warning:")]
    assert len(lines) == 1 and lines[0].startswith("vit-parity: error:"), err


def split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@st.composite
def header_mutation(draw):
    kind = draw(
        st.sampled_from(
            [
                "field",
                "drop_field",
                "new_entry",
                "drop_entry",
                "metadata",
                "byte",
                "reorder",
                "extra_metadata",
            ]
        )
    )
    return kind, draw(st.integers(0, 10_000)), draw(JSON_VALUES), draw(st.integers(0, 255))


def mutate(raw: bytes, mutation) -> bytes:
    kind, pick, value, byte = mutation
    header, data = split(raw)
    keys = [k for k in header if k != "__metadata__"]
    key = keys[pick % len(keys)]
    field = ["dtype", "shape", "data_offsets"][pick % 3]
    if kind == "field":
        header[key][field] = value
    elif kind == "drop_field":
        del header[key][field]
    elif kind == "new_entry":
        header[f"extra{pick}"] = value
    elif kind == "drop_entry":
        del header[key]
    elif kind == "reorder":  # valid: a header may list tensors in any order
        keys = keys[pick % len(keys) :] + keys[: pick % len(keys)]
        header = {"__metadata__": header["__metadata__"], **{k: header[k] for k in keys}}
    elif kind == "extra_metadata":  # valid: more string metadata
        header["__metadata__"][f"note{pick}"] = json.dumps(value)
    elif kind == "metadata":
        header["__metadata__"] = value if pick % 2 else {"vit_parity": json.dumps(value)}
    else:  # one byte of the encoded header replaced
        out = bytearray(join(header, data))
        out[8 + pick % (len(out) - 8 - len(data))] = byte
        return bytes(out)
    return join(header, data)


@SETTINGS
@given(mutation=header_mutation())
def test_mutated_safetensors_headers(valid, mutation):
    raw, _ = valid
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "in.safetensors"
        src.write_bytes(mutate(raw, mutation))
        out = Path(d) / "out.safetensors"
        code, err = run_cli("convert", src, out, "--to", "torch")
        if code == 0:
            theirs, ours = load_file(str(src)), load_file(str(out))  # the library as oracle
            assert set(ours) <= set(theirs)
            for k in ours:
                np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
        else:
            assert_clean_refusal(code, err)
            assert not out.exists() and sorted(p.name for p in Path(d).iterdir()) == [
                "in.safetensors"
            ]
        assert src.read_bytes() == mutate(raw, mutation)


CONFIG_FIELDS = [
    "hidden_act",
    "num_attention_heads",
    "layer_norm_eps",
    "image_size",
    "hidden_size",
    "patch_size",
    "num_channels",
    "model_type",
    "qkv_bias",
]


def forged_folder(folder: Path, d: Path, config) -> Path:
    """A copy of the HF `folder`'s weights under `d`, beside `config` as its config.json."""
    hf = d / "hf"
    hf.mkdir()
    (hf / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    (hf / "config.json").write_text(json.dumps(config))
    return hf


@SETTINGS
@given(field=st.sampled_from(CONFIG_FIELDS + ["*whole*", "*drop*"]), value=JSON_VALUES)
def test_mutated_config_json(valid, field, value):
    _, folder = valid
    with tempfile.TemporaryDirectory() as d:
        config = json.loads((folder / "config.json").read_text())
        if field == "*whole*":
            config = value
        elif field == "*drop*":
            config.pop(CONFIG_FIELDS[len(json.dumps(value)) % len(CONFIG_FIELDS)], None)
        else:
            config[field] = value
        hf = forged_folder(folder, Path(d), config)
        out = Path(d) / "out.safetensors"
        code, err = run_cli("convert", hf, out, "--to", "torch")
        if code == 0:
            theirs = load_file(str(hf / "model.safetensors"))
            ours = wt.load_checkpoint(out, "torch")
            back = wt.save_checkpoint(ours, Path(d) / "back", layout="hf")
            for k, v in load_file(str(back / "model.safetensors")).items():
                np.testing.assert_array_equal(v, theirs[k], err_msg=k)
        else:
            assert_clean_refusal(code, err)
            assert not out.exists()


DINOV3 = dict(  # a DINOv3 as transformers computes it: RoPE periods, registers, q/v biases
    pos_embed=False,
    rope="half",
    rope_freqs="periods",
    rope_theta=100.0,
    layer_scale=True,
    num_classes=0,
    reg_tokens=1,
    k_bias=False,
    image_size=8,
)
DINOV3_FIELDS = [
    "rope_theta",
    "query_bias",
    "key_bias",
    "value_bias",
    "proj_bias",
    "mlp_bias",
    "use_gated_mlp",
    "num_register_tokens",
    "pos_embed_rescale",
    "num_attention_heads",
]


@pytest.fixture(scope="module")
def valid_dinov3(tmp_path_factory):
    """An HF DINOv3ViTModel folder (without our manifest: config.json is what is read), and
    an original-release DINOv3 file with its RoPE periods."""
    from safetensors.numpy import save_file

    d = tmp_path_factory.mktemp("dinov3")
    model = random_nnx(tiny(**DINOV3), seed=5)
    folder = wt.save_checkpoint(model, d / "hf", layout="hf_dinov3")
    original = wt.save_checkpoint(model, d / "original.safetensors", layout="dinov3")
    for path in (folder / "model.safetensors", original):  # drop our manifest
        save_file(load_file(str(path)), str(path))
    return folder, original


def assert_read_or_refused(src: Path, out: Path) -> None:
    """`convert` gives a file the same model reads back from, or exits 2 in one line."""
    code, err = run_cli("convert", src, out, "--to", "torch")
    if code == 0:
        wt.load_checkpoint(out, "torch")
    else:
        assert_clean_refusal(code, err)
        assert not out.exists()


@SETTINGS
@given(field=st.sampled_from(DINOV3_FIELDS + ["*whole*"]), value=JSON_VALUES)
def test_mutated_dinov3_config_json(valid_dinov3, field, value):
    """HF DINOv3's config.json fields forged (a RoPE base of any type, biases, registers, the
    coordinate jitter, heads): read, or refused in one line."""
    folder, _ = valid_dinov3
    with tempfile.TemporaryDirectory() as d:
        config = json.loads((folder / "config.json").read_text())
        config = value if field == "*whole*" else {**config, field: value}
        assert_read_or_refused(forged_folder(folder, Path(d), config), Path(d) / "out.safetensors")


@SETTINGS
@given(
    periods=st.lists(
        st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=0, max_size=9
    ),
    mask=st.lists(st.sampled_from([0.0, 1.0, 0.5]), min_size=0, max_size=30),
)
def test_forged_original_dinov3_buffers(valid_dinov3, periods, mask):
    """The original DINOv3's buffers forged: RoPE periods of any count and value (NaN,
    infinite, negative, zero), a key-bias mask of any pattern and length: read as a model
    those periods and masks define, or refused in one line; never a crash."""
    from safetensors.numpy import save_file

    _, original = valid_dinov3
    tensors = load_file(str(original))
    tensors["rope_embed.periods"] = np.asarray(periods, np.float32)
    tensors["blocks.0.attn.qkv.bias_mask"] = np.asarray(mask, np.float32)
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "forged.safetensors"
        save_file(tensors, str(src))
        assert_read_or_refused(src, Path(d) / "out.safetensors")


@pytest.fixture(scope="module")
def valid_msgpack(tmp_path_factory) -> bytes:
    """An HF Flax `flax_model.msgpack` of a tiny ViT, as we write it."""
    d = tmp_path_factory.mktemp("fuzz_msgpack")
    folder = wt.save_checkpoint(random_nnx(tiny(image_size=8), seed=4), d / "f", layout="hf_flax")
    return (folder / "flax_model.msgpack").read_bytes()


@st.composite
def byte_mutation(draw):
    return (
        draw(st.sampled_from(["replace", "insert", "delete", "truncate"])),
        draw(st.integers(0, 1 << 20)),
        draw(st.integers(0, 255)),
    )


def mutate_bytes(raw: bytes, mutation) -> bytes:
    kind, at, byte = mutation
    at %= len(raw)
    if kind == "replace":
        return raw[:at] + bytes([byte]) + raw[at + 1 :]
    if kind == "insert":
        return raw[:at] + bytes([byte]) + raw[at:]
    if kind == "delete":
        return raw[:at] + raw[at + 1 :]
    return raw[:at]


@SETTINGS
@given(mutation=byte_mutation())
def test_mutated_flax_msgpack(valid_msgpack, mutation):
    """A byte replaced, inserted or deleted, or the file cut short: the CLI exits 0 or refuses
    in one line; what our reader accepts, flax's own `msgpack_restore` reads as the same arrays
    under the same names (it accepts more: we refuse what it should)."""
    from flax.serialization import msgpack_restore

    from weight_transfer.formats.msgpack_io import MsgpackReader

    raw = mutate_bytes(valid_msgpack, mutation)
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "flax_model.msgpack"
        src.write_bytes(raw)
        code, err = run_cli("inspect", src)
        if code != 0:
            assert_clean_refusal(code, err)
        try:
            reader = MsgpackReader([src])
        except wt.errors.CheckpointError:
            return
        ours = {k: reader.load(k) for k in reader.meta}
    tree = msgpack_restore(raw)
    for key, value in ours.items():
        node = tree
        for part in key.split("."):
            node = node[part]
        theirs = np.asarray(node)
        assert theirs.dtype == value.dtype and theirs.shape == value.shape, key
        assert theirs.tobytes() == value.tobytes(), key
