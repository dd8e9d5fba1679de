"""npz files in each published form (google-research and big_vision): key prefixes
(`opt/target/`, `params/`, `params/img/` with a text tower beside it), scanned encoders, MAP
heads, `pre_logits`. timm's own `_load_weights` is the oracle: the same file in timm and in
ours gives the same output."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import weight_transfer as wt
from tests.conftest import assert_close, tiny
from tests.helpers.models import nchw
from weight_transfer.formats.npz_io import NpzReader
from weight_transfer.frameworks.runners import random_images, run_nnx
from weight_transfer.frameworks.weights import random_nnx

timm = pytest.importorskip("timm")
pytest.importorskip("jax")  # timm's loader imports jax.numpy for bfloat16 only

SIGLIP_LIKE = tiny(
    image_size=16, pool="map", class_token=False, num_classes=0, activation="gelu_tanh"
)


def republish(path, out, prefix: str = "", scan: bool = False, extra: dict | None = None):
    """Our npz with its keys as another publisher writes them."""
    reader = NpzReader(path)
    arrays = {k: reader.load(k) for k in reader.meta}
    reader.close()
    if scan:
        stacked: dict[str, list] = {}
        for key in sorted(k for k in arrays if k.startswith("Transformer/encoderblock_")):
            i, rest = key.removeprefix("Transformer/encoderblock_").split("/", 1)
            stacked.setdefault(rest, []).append((int(i), arrays.pop(key)))
        for rest, layers in stacked.items():
            arrays[f"Transformer/encoderblock/{rest}"] = np.stack([a for _, a in sorted(layers)])
    arrays = {prefix + k: v for k, v in arrays.items()} | (extra or {})
    np.savez(out, **arrays)
    return out


def timm_twin(config, big_vision: bool = False):
    from timm.models.vision_transformer import VisionTransformer

    kw = dict(
        img_size=config.image_hw,
        patch_size=config.patch_size,
        embed_dim=config.d_model,
        depth=config.num_layers,
        num_heads=config.num_heads,
        mlp_ratio=config.d_ff / config.d_model,
        num_classes=config.num_classes,
        act_layer="gelu_tanh" if config.activation == "gelu_tanh" else "gelu",
    )
    if config.pool == "map":
        kw.update(global_pool="map", class_token=False)
    if big_vision:  # positions for the patches only; the class token joins after
        kw.update(no_embed_class=True)
    return VisionTransformer(**kw).eval()


@pytest.mark.parametrize(
    "form",
    ["google_vit/opt-target", "big_vision/params-scanned", "big_vision/params-img-map-scanned"],
)
def test_published_npz_forms_match_timms_loader(tmp_path, form):
    from timm.models.vision_transformer import _load_weights

    layout, variant = form.split("/")
    config = SIGLIP_LIKE if "map" in variant else tiny(image_size=16)
    ours = random_nnx(config, seed=13)
    plain = wt.save_checkpoint(ours, tmp_path / "plain.npz", layout=layout)
    prefix = {
        "opt-target": "opt/target/",
        "params-scanned": "params/",
        "params-img-map-scanned": "params/img/",
    }[variant]
    text = (
        {"params/txt/Encoder_0/kernel": np.ones((3, 3), np.float32)}
        if prefix == "params/img/"
        else {}
    )
    path = republish(
        plain, tmp_path / "published.npz", prefix, scan="scanned" in variant, extra=text
    )
    twin = timm_twin(config, big_vision=layout == "big_vision")
    _load_weights(twin, str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = wt.inspect_checkpoint(
            path, overrides={"num_heads": config.num_heads, "activation": config.activation}
        )
        loaded = wt.load_checkpoint(
            path, "jax", overrides={"num_heads": config.num_heads, "activation": config.activation}
        )
    if text:
        assert any("outside 'params/img/'" in d for d in info["dropped"])
    images = random_images(config, 2, seed=14)
    with torch.no_grad():
        expected = twin(nchw(images))
    assert_close(expected, np.asarray(run_nnx(loaded, images)), "float32", form)


def test_pre_logits_before_a_head_is_refused(tmp_path):
    plain = wt.save_checkpoint(
        random_nnx(tiny(image_size=16), seed=2), tmp_path / "p.npz", layout="google_vit"
    )
    path = republish(
        plain,
        tmp_path / "pre.npz",
        extra={
            "pre_logits/kernel": np.ones((24, 24), np.float32),
            "pre_logits/bias": np.ones(24, np.float32),
        },
    )
    with pytest.raises(wt.CheckpointError, match="pre_logits"):
        wt.load_checkpoint(path, "jax")


def nested(flat: dict[str, np.ndarray], leaf: str | None = None) -> dict:
    """'/'-joined names as the tree JAX training code holds (`leaf`: each array under it, as
    an NNX Variable's state keeps it in `value`)."""
    tree: dict = {}
    for key, value in flat.items():
        *parents, name = key.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = {leaf: value} if leaf else value
    return tree


def save_tree(form: str, tree: dict, tmp_path):
    """The tree as a training loop saves it: an Orbax folder, flax.training's legacy msgpack
    `checkpoint_<step>` file, or big_vision's tensorstore folder (its `-LAST` pointer given)."""
    if form == "tensorstore":
        return tssave(tree, tmp_path / "bv")
    if form == "orbax":
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp_path / "ckpt", tree)
        return tmp_path / "ckpt"
    import flax
    from flax.training import checkpoints

    with flax.config.temp_flip_flag("use_orbax_checkpointing", False):
        return Path(checkpoints.save_checkpoint(str(tmp_path / "legacy"), tree, step=3))


def tssave(tree: dict, path: Path) -> Path:
    """big_vision's `save_checkpoint_ts` (big_vision/utils.py, `tssave`): each leaf one
    tensorstore array named by its path, '/' written '~', in `<path>-<step:09d>`, then the
    `<path>-LAST` pointer."""
    import jax
    import jax.numpy as jnp
    from jax.experimental.array_serialization import serialization

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    names = ["~".join(str(getattr(k, "key", k)) for k in p) for p, _ in leaves]
    folder = Path(f"{path}-000000003")
    folder.mkdir()
    manager = serialization.GlobalAsyncCheckpointManager()
    manager.serialize_with_paths(
        [jnp.asarray(v) for _, v in leaves],
        [str(folder / n) for n in names],
        on_commit_callback=lambda: None,
    )
    manager.wait_until_finished()
    Path(f"{path}-LAST").write_text("000000003")
    return Path(f"{path}-LAST")


@pytest.mark.parametrize(
    "form, wrapping",
    [
        pytest.param(  # big_vision's training today (save_checkpoint_ts)
            "tensorstore", "params-scanned", marks=pytest.mark.slow
        ),
        ("orbax", "params-scanned"),  # big_vision's own training state, scanned
        ("orbax", "openpi"),  # openpi: PaliGemma/img/ beside its llm, NNX `value` leaves
        ("msgpack", "train-state"),  # flax.training legacy: params, opt_state, step
    ],
)
def test_big_vision_trees_from_training_code_match_timms_loader(tmp_path, form, wrapping):
    """The npz's arrays as the tree its training code saves: read by name from inside the
    container ('.'-joined there), wrappers and siblings left out and reported; the output is
    what timm's `_load_weights` makes of the same arrays as an npz."""
    from timm.models.vision_transformer import _load_weights

    config = SIGLIP_LIKE
    ours = random_nnx(config, seed=21)
    plain = wt.save_checkpoint(ours, tmp_path / "plain.npz", layout="big_vision")
    npz = republish(plain, tmp_path / "published.npz", scan=True)
    reader = NpzReader(npz)
    arrays = {k: reader.load(k) for k in reader.meta}
    reader.close()
    twin = timm_twin(config, big_vision=True)
    _load_weights(twin, str(npz))
    llm = {"llm/layers/attn/q_einsum/w": np.ones((2, 4, 4), np.float32)}
    if wrapping == "params-scanned":
        tree = {"params": nested(arrays), "step": np.int32(7)}
    elif wrapping == "openpi":
        tree = nested({f"PaliGemma/img/{k}": v for k, v in arrays.items()}, leaf="value")
        tree["PaliGemma"] |= nested(llm, leaf="value")
    else:
        tree = {"params": nested(arrays), "opt_state": {"mu": nested(arrays)}, "step": 3}
    path = save_tree(form, tree, tmp_path)
    stated = {"num_heads": config.num_heads, "activation": config.activation}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = wt.inspect_checkpoint(path, overrides=stated)
        loaded = wt.load_checkpoint(path, "jax", overrides=stated)
    assert info["layout"] == "big_vision", info["layout"]
    if wrapping != "params-scanned":  # the optimiser state or the language model, named
        assert any("outside 'PaliGemma/img/'" in d or "optimiser" in d for d in info["dropped"])
    images = random_images(config, 2, seed=22)
    with torch.no_grad():
        expected = twin(nchw(images))
    assert_close(expected, np.asarray(run_nnx(loaded, images)), "float32", f"{form} {wrapping}")
