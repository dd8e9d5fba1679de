"""Checkpoint files: round trips for every layout, shards, and bad input that loses nothing."""

import hashlib
import json
import struct
import threading

import numpy as np
import pytest
import torch

import weight_transfer as wt
from tests.conftest import tiny
from tests.helpers.models import assert_bit_exact
from weight_transfer.formats.checkpoint import CheckpointError, read_checkpoint
from weight_transfer.frameworks.weights import random_nnx, random_torch

LAYOUTS = ["nnx", "torch", "timm", "hf", "google_vit"]


@pytest.fixture(scope="module")
def model():
    return random_nnx(tiny(), seed=11)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_file_round_trip_is_bit_exact(tmp_path, model, layout, framework):
    path = wt.save_checkpoint(model, tmp_path / "m", layout=layout)
    back = wt.load_checkpoint(path, framework)  # layout and config from the file alone
    assert back.config == model.config
    flat = (
        wt.nnx_flat(back)
        if framework == "jax"
        else wt.torch_to_nnx_flat(wt.torch_flat(back), back.config)
    )
    assert_bit_exact(wt.nnx_flat(model), flat)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_torch_model_round_trip_keeps_dtype(tmp_path, dtype):
    source = random_torch(tiny(pool="mean"), seed=2, dtype=dtype)
    path = wt.save_checkpoint(source, tmp_path / "t.safetensors", layout="timm")
    back = wt.load_checkpoint(path, "torch")
    assert_bit_exact(wt.torch_flat(source), wt.torch_flat(back))


@pytest.mark.parametrize("layout", ["torch", "hf"])
def test_sharded_and_unsharded_load_the_same(tmp_path, model, layout):
    one = wt.save_checkpoint(model, tmp_path / "one", layout=layout)
    many = wt.save_checkpoint(model, tmp_path / "many", layout=layout, max_shard_size="8KB")
    index = many / "model.safetensors.index.json" if layout == "hf" else many
    weight_map = json.loads(index.read_text())["weight_map"]
    assert len(set(weight_map.values())) > 3
    a, b = read_checkpoint(one), read_checkpoint(many)
    assert a.meta == b.meta
    for key in a.meta:
        np.testing.assert_array_equal(a.load(key), b.load(key), err_msg=key)
    assert_bit_exact(
        wt.nnx_flat(wt.load_checkpoint(one, "jax")), wt.nnx_flat(wt.load_checkpoint(many, "jax"))
    )


def test_file_describes_itself(tmp_path, model):
    path = wt.save_checkpoint(model, tmp_path / "m.safetensors", layout="nnx")
    meta = read_checkpoint(path).metadata
    manifest = json.loads(meta["vit_parity"])
    assert manifest["config"] == model.config.to_dict() and manifest["layout"] == "nnx"
    out = wt.convert(path, tmp_path / "t.safetensors", to="timm")
    manifest = json.loads(read_checkpoint(out["output"]).metadata["vit_parity"])
    assert manifest["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()  # sha256sum
    assert manifest["source_layout"] == "nnx" and manifest["format_version"] == "1"
    # what wrote it, for telling a real difference from a setting later
    import numpy

    assert manifest["written_with"]["versions"]["numpy"] == numpy.__version__
    assert manifest["written_with"]["computation"].startswith("none")


def test_convert_chain_through_every_layout_is_bit_exact(tmp_path, model):
    path = wt.save_checkpoint(model, tmp_path / "start.safetensors", layout="nnx")
    for i, layout in enumerate(["timm", "google_vit", "hf", "torch", "nnx"]):
        path = wt.convert(path, tmp_path / f"step{i}", to=layout)["output"]
    assert_bit_exact(wt.nnx_flat(model), wt.nnx_flat(wt.load_checkpoint(path, "jax")))


def test_convert_resamples_and_casts(tmp_path, model):
    path = wt.save_checkpoint(model, tmp_path / "m.safetensors", layout="timm")
    out = wt.convert(
        path, tmp_path / "big.safetensors", to="timm", image_size=(16, 24), dtype="bfloat16"
    )
    loaded = wt.load_checkpoint(out["output"], "torch")
    assert loaded.config.image_hw == (16, 24) and loaded.dtype == torch.bfloat16
    assert loaded.pos_embed.shape == (1 + 4 * 6, 24)


# ---- bad input ----------------------------------------------------------------------------------


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def saved(tmp_path, model):
    return wt.save_checkpoint(model, tmp_path / "good.safetensors", layout="torch")


def rewrite_header(path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def corrupt_truncated(p):
    p.write_bytes(p.read_bytes()[:-100])


def corrupt_lying_header(p):
    rewrite_header(p, lambda h: h["head.weight"].update(shape=[700, 24]))


def corrupt_garbage_header(p):
    p.write_bytes(struct.pack("<Q", 20) + b"{not json at all....")


def corrupt_huge_header_size(p):
    p.write_bytes(struct.pack("<Q", 2**40) + p.read_bytes()[8:])


def corrupt_unknown_dtype(p):
    rewrite_header(p, lambda h: h["head.bias"].update(dtype="X99"))


def corrupt_integer_dtype(p):
    rewrite_header(p, lambda h: h["head.bias"].update(dtype="I32"))


@pytest.mark.parametrize(
    "corrupt, fragment",
    [
        (corrupt_truncated, "truncated or lying header"),
        (corrupt_lying_header, "'head.weight' claims [700, 24]"),
        (corrupt_garbage_header, "corrupt safetensors header"),
        (corrupt_huge_header_size, "corrupt safetensors header"),
        (corrupt_unknown_dtype, "'head.bias' has an unknown dtype"),
        (corrupt_integer_dtype, "'head.bias': expected a float dtype"),
    ],
)
def test_corrupt_files_give_one_clear_error_and_no_output(tmp_path, saved, corrupt, fragment):
    corrupt(saved)
    before = digest(saved)
    out = tmp_path / "out.safetensors"
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        wt.convert(saved, out, to="timm")
    assert not out.exists() and digest(saved) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.safetensors"]


def test_missing_extra_and_misshaped_tensors_listed_at_once(tmp_path, model):
    from safetensors.numpy import save_file

    flat = wt.nnx_to_torch_flat(wt.nnx_flat(model), model.config)
    del flat["head.bias"]
    flat["blocks.0.attn.extra"] = np.zeros(3, np.float32)
    flat["blocks.1.ff1.weight"] = np.ascontiguousarray(flat["blocks.1.ff1.weight"].T)
    save_file(flat, tmp_path / "bad.safetensors")
    with pytest.raises(wt.TransferError) as e:
        wt.load_checkpoint(tmp_path / "bad.safetensors", "jax", config=model.config)
    msg = str(e.value)
    assert "missing torch (bad.safetensors) key 'head.bias'" in msg
    assert "unexpected torch (bad.safetensors) key 'blocks.0.attn.extra'" in msg
    assert "'blocks.1.ff1.weight': expected shape (40, 24), got (24, 40)" in msg


def test_unknown_layout(tmp_path):
    from safetensors.numpy import save_file

    save_file({"encoder.weird": np.zeros(3, np.float32)}, tmp_path / "x.safetensors")
    with pytest.raises(wt.LayoutError, match="cannot tell the layout.*encoder.weird"):
        wt.load_checkpoint(tmp_path / "x.safetensors")
    with pytest.raises(wt.LayoutError, match="unknown layout 'keras'"):
        wt.load_checkpoint(tmp_path / "x.safetensors", layout="keras")


def test_nan_weights_refused_unless_allowed(tmp_path, model):
    flat = wt.nnx_flat(model)
    flat["blocks.1.ff2.kernel"] = flat["blocks.1.ff2.kernel"].copy()
    flat["blocks.1.ff2.kernel"][0, 0] = np.nan
    bad = wt.nnx_from_flat(flat, model.config)
    path = wt.save_checkpoint(bad, tmp_path / "nan.safetensors")
    assert wt.inspect_checkpoint(path)["nonfinite"] == {"blocks.1.ff2.kernel": 1}
    threads = threading.active_count()
    with pytest.raises(wt.NonFiniteError, match="'blocks.1.ff2.kernel' holds 1 NaN/Inf"):
        wt.convert(path, tmp_path / "out.safetensors", to="timm")
    assert not (tmp_path / "out.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left
    assert threading.active_count() == threads  # hashing and writing threads stopped
    wt.convert(path, tmp_path / "out.safetensors", to="timm", allow_nonfinite=True)


def test_output_rules(tmp_path, saved):
    with pytest.raises(CheckpointError, match="does not exist"):
        wt.convert(saved, tmp_path / "no" / "such" / "dir.safetensors", to="timm")
    target = tmp_path / "exists.safetensors"
    target.write_bytes(b"precious")
    with pytest.raises(CheckpointError, match="already exists.*--force"):
        wt.convert(saved, target, to="timm")
    assert target.read_bytes() == b"precious"
    wt.convert(saved, target, to="timm", force=True)
    assert read_checkpoint(target).meta
    with pytest.raises(CheckpointError, match="would overwrite the input"):
        wt.convert(saved, saved, to="torch", force=True)


def test_pickle_only_when_asked(tmp_path):
    source = random_torch(tiny())
    path = tmp_path / "model.pth"
    torch.save(source.state_dict(), path)
    with pytest.raises(CheckpointError, match="pickle.*only read when asked"):
        wt.load_checkpoint(path, "torch")
    back = wt.load_checkpoint(path, "torch", allow_pickle=True, config=tiny())
    assert_bit_exact(wt.torch_flat(source), wt.torch_flat(back))
    torch.save({"not": "tensors", "fn": print}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        wt.load_checkpoint(tmp_path / "evil.pth", "torch", allow_pickle=True)


def test_unknown_file_kinds(tmp_path):
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint type"):
        wt.load_checkpoint(tmp_path / "w.onnx")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a readable .npz"):
        wt.load_checkpoint(tmp_path / "bad.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="a folder without model.safetensors"):
        wt.load_checkpoint(tmp_path / "empty")


def test_unknown_dtype_is_refused(tmp_path, saved):
    with pytest.raises(CheckpointError, match="dtype 'int8': expected one of"):
        wt.convert(saved, tmp_path / "o.safetensors", to="nnx", dtype="int8")
    assert not (tmp_path / "o.safetensors").exists()


def test_one_options_object_or_its_fields_as_keywords(tmp_path, model):
    """`PortOptions` threads the porting options from the caller to the plan; the API takes it
    or its fields as keywords, and refuses a misspelt option by name."""
    from vit_config import ArgumentError
    from weight_transfer.porting.options import PortOptions

    path = wt.save_checkpoint(model, tmp_path / "m.safetensors", layout="timm")
    options = PortOptions(dtype="float64", overrides={"ln_eps": 1e-6})
    a = wt.load_checkpoint(path, "torch", options)
    b = wt.load_checkpoint(path, "torch", dtype="float64", overrides={"ln_eps": 1e-6})
    assert a.dtype == b.dtype == torch.float64
    assert_bit_exact(wt.torch_flat(a), wt.torch_flat(b))
    with pytest.raises(ArgumentError, match="unknown option 'image_sise'"):
        wt.load_checkpoint(path, "torch", image_sise=16)
