"""Bad input gets a clear, typed error naming what is wrong."""

import numpy as np
import pytest
import torch

import jax_impl
import torch_impl
from tests.conftest import tiny
from vit_config import ImageShapeError
from weight_transfer import (
    TransferError,
    nnx_flat,
    nnx_from_flat,
    nnx_to_torch_flat,
    state_dict_to_nnx_state,
    to_torch,
    torch_flat,
    torch_to_nnx_flat,
)
from weight_transfer.frameworks.weights import random_nnx, random_torch


@pytest.fixture(scope="module")
def models():
    return random_nnx(tiny()), random_torch(tiny())


@pytest.mark.parametrize(
    "shape, fragment",
    [
        ((8, 12), "rank 3 or 4"),
        ((1, 1, 8, 12, 3), "rank 3 or 4"),
        ((2, 8, 12, 4), "C=4"),
        ((2, 12, 8, 3), "H, W = (12, 8)"),
        ((2, 3, 8, 12), "C=12"),  # NCHW handed to the NHWC model
    ],
)
def test_nnx_image_shape_errors(models, shape, fragment):
    with pytest.raises(ImageShapeError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        models[0](np.zeros(shape, np.float32))


@pytest.mark.parametrize(
    "shape, fragment",
    [
        ((3, 8), "rank 3 or 4"),
        ((2, 4, 8, 12), "C=4"),
        ((2, 8, 12, 3), "C=8"),  # NHWC handed to the NCHW model
        ((3, 12, 8), r"H, W = \(12, 8\)"),
    ],
)
def test_torch_image_shape_errors(models, shape, fragment):
    with pytest.raises(ImageShapeError, match=fragment):
        models[1](torch.zeros(shape))


def test_image_error_is_a_value_error():
    assert issubclass(ImageShapeError, ValueError) and issubclass(TransferError, ValueError)


def broken(sd: dict) -> dict:
    sd = dict(sd)
    del sd["head.bias"]  # missing
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(72, 24)  # unexpected
    sd["patch_embed.weight"] = sd["patch_embed.weight"].permute(2, 3, 1, 0)  # HWIO, not OIHW
    sd["blocks.1.ff1.weight"] = sd["blocks.1.ff1.weight"].T  # transposed linear
    sd["pos_embed"] = sd["pos_embed"][:-1]  # wrong length
    return sd


def test_broken_state_dict_lists_every_problem_at_once(models):
    with pytest.raises(TransferError) as e:
        state_dict_to_nnx_state(broken(models[1].state_dict()), tiny())
    msg = str(e.value)
    assert "5 problem(s)" in msg
    assert "missing torch key 'head.bias'" in msg
    assert "unexpected torch key 'blocks.0.attn.qkv.weight'" in msg
    assert (
        "'patch_embed.weight': expected shape (24, 3, 4, 4), got (4, 4, 3, 24): "
        "looks already converted" in msg
    )
    assert (
        "'blocks.1.ff1.weight': expected shape (40, 24), got (24, 40): looks already converted"
        in msg
    )
    assert "'pos_embed': expected shape (7, 24), got (6, 24)" in msg
    assert e.value.missing == ["head.bias"]
    assert e.value.unexpected == ["blocks.0.attn.qkv.weight"]
    assert sorted(e.value.mismatched) == ["blocks.1.ff1.weight", "patch_embed.weight", "pos_embed"]


def test_permuted_conv_kernel_is_called_transposed(models):
    flat = torch_flat(models[1])
    flat["patch_embed.weight"] = flat["patch_embed.weight"].transpose(
        0, 1, 3, 2
    )  # 4x4 spatial: same
    flat["patch_embed.weight"] = np.ascontiguousarray(
        flat["patch_embed.weight"].transpose(1, 0, 2, 3)
    )
    with pytest.raises(TransferError, match=r"got \(3, 24, 4, 4\): looks transposed"):
        torch_to_nnx_flat(flat, tiny())


def test_wrong_config_for_the_weights(models):
    with pytest.raises(TransferError, match="missing NNX key 'blocks.2"):
        nnx_to_torch_flat(nnx_flat(models[0]), tiny(num_layers=3))


def test_integer_weights_refused(models):
    flat = nnx_flat(models[0])
    flat["head.bias"] = flat["head.bias"].astype(np.int32)
    with pytest.raises(TransferError, match="'head.bias': expected a float dtype.*got int32"):
        nnx_from_flat(flat, tiny())


def test_float64_without_x64_is_refused():
    flat = {k: v.astype(np.float64) for k, v in torch_flat(random_torch(tiny())).items()}
    with pytest.raises(ValueError, match="x64"):
        state_dict_to_nnx_state(flat, tiny())


def test_inputs_are_not_modified(models):
    before = {k: v.clone() for k, v in models[1].state_dict().items()}
    jm = to_torch(random_nnx(tiny()))
    assert jm is not models[1]
    state_dict_to_nnx_state(models[1].state_dict(), tiny())
    for k, v in models[1].state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.slow  # 6 s (--durations); bfloat16 round trips are quick in test_roundtrip
def test_bfloat16_on_request_and_bad_dtype():
    from flax import nnx

    m = jax_impl.ViT(tiny(), rngs=nnx.Rngs(0), dtype="bfloat16")
    assert m(np.zeros((8, 12, 3), np.float32)).dtype == np.dtype("bfloat16")
    with pytest.raises(ValueError, match="float64 needs JAX x64"):
        jax_impl.ViT(tiny(), rngs=nnx.Rngs(0), dtype="float64")
    with pytest.raises(ValueError, match="int8 is not supported"):
        jax_impl.ViT(tiny(), rngs=nnx.Rngs(0), dtype="int8")
    assert torch_impl.ViT(tiny()).to(torch.bfloat16)(torch.zeros(3, 8, 12)).dtype == torch.bfloat16
