import pytest

import jax_impl
import torch_impl
from vit_config import ConfigError, ViTConfig


def test_one_class_shared_by_both_implementations():
    assert jax_impl.ViTConfig is torch_impl.ViTConfig is ViTConfig


@pytest.mark.parametrize(
    "field, value",
    [
        ("d_model", 10),  # not divisible by num_heads=3
        ("image_size", (8, 10)),  # 10 not divisible by patch 4
        ("image_size", 0),
        ("image_size", (8, 12, 3)),
        ("patch_size", 0),
        ("num_heads", -1),
        ("d_ff", 2.5),
        ("num_layers", -1),
        ("num_classes", True),
        ("pool", "max"),
        ("activation", "swish"),
        ("ln_eps", 0.0),
        ("block_ln_eps", 1.0),
        ("block_ln_eps", True),
        ("qkv_bias", "yes"),
        ("reg_tokens", -1),
        ("pos_embed_tokens", "some"),
        ("final_norm", "after"),
        ("norm", "batchnorm"),
        ("mlp", "geglu"),
        ("layer_scale", 1),
        ("num_classes", -1),
        ("k_bias", "no"),
        ("block", "parallel_22b"),
        ("num_parallel", 0),
        ("num_parallel", 1.0),
        ("rel_pos_bias", "swin"),
        ("map_heads", -2),
        ("pool_prefix", 0),
    ],
)
def test_invalid_config_names_field_and_value(field, value):
    base = dict(image_size=(8, 12), patch_size=4, d_model=24, num_heads=3)
    with pytest.raises(ConfigError) as e:
        ViTConfig(**{**base, field: value})
    assert isinstance(e.value, ValueError)
    assert e.value.field == field
    assert repr(value) in str(e.value) or field == "d_model"


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(pool="cls", class_token=False), "pool"),
        (dict(pool="cls_mean", class_token=False), "pool"),
        (dict(pool="mean", dist_token=True), "dist_token"),
        (dict(pool="mean", class_token=False, pos_embed_tokens="cls"), "pos_embed_tokens"),
        (dict(pool="map", final_norm="post_pool"), "final_norm"),
        (dict(rel_pos_bias="block", reg_tokens=1), "rel_pos_bias"),
        (dict(rel_pos_bias="block", class_token=False, pool="mean"), "rel_pos_bias"),
        (dict(rel_pos_bias="shared", rope="interleaved"), "rel_pos_bias"),
        (dict(pool="map", map_heads=5), "map_heads"),
        (dict(num_parallel=2, block="parallel"), "num_parallel"),
        (dict(num_parallel=2, block="post_norm"), "num_parallel"),
        (dict(num_parallel=2, rope="half", rope_freqs="mixed"), "num_parallel"),
    ],
)
def test_combinations_no_model_has_are_refused_by_name(changes, field):
    with pytest.raises(ConfigError) as e:
        ViTConfig(image_size=(8, 12), patch_size=4, d_model=24, num_heads=3, **changes)
    assert e.value.field == field


def test_class_token_follows_pooling_unless_stated():
    assert ViTConfig(pool="mean").class_token is False
    assert ViTConfig(pool="cls").class_token is True
    assert ViTConfig(pool="mean", class_token=True).class_token is True
    assert ViTConfig(pool="mean").replace(pool="cls").class_token is True
    old = {k: v for k, v in ViTConfig(pool="mean").to_dict().items() if k != "class_token"}
    assert ViTConfig.from_dict(old).class_token is False  # files written before the field


def test_unknown_preset_lists_known():
    with pytest.raises(ConfigError, match="vit_b16"):
        ViTConfig.preset("vit_z99")


# Parameter counts of the ViT paper's code and timm (google-research/vision_transformer;
# timm's vit_*_patch16_224 model cards).
@pytest.mark.parametrize(
    "preset, count",
    [
        ("vit_ti16", 5_717_416),
        ("vit_s16", 22_050_664),
        ("vit_b16", 86_567_656),
        ("vit_l16", 304_326_632),
    ],
)
def test_preset_parameter_counts(preset, count):
    assert ViTConfig.preset(preset).num_params() == count


def test_vit_b16_count_in_both_implementations():
    import jax
    import torch
    from flax import nnx

    config = ViTConfig.preset("vit_b16")
    abstract = nnx.eval_shape(lambda: jax_impl.ViT(config, rngs=nnx.Rngs(0)))
    nnx_count = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    with torch.device("meta"):
        torch_count = sum(p.numel() for p in torch_impl.ViT(config).parameters())
    assert nnx_count == torch_count == 86_567_656


def test_seed_preset_is_the_seed_toy():
    c = ViTConfig.preset("seed")
    assert (c.image_hw, c.patch_size, c.in_channels, c.pool, c.activation) == (
        (4, 4),
        2,
        3,
        "mean",
        "relu",
    )
    assert c.num_patches == 4 and c.num_tokens == 4


def test_json_round_trip_keeps_every_field():
    c = ViTConfig(
        image_size=(8, 12),
        patch_size=4,
        d_model=24,
        num_heads=3,
        pool="mean",
        activation="gelu_tanh",
        ln_eps=1e-12,
        qkv_bias=False,
    )
    assert ViTConfig.from_json(c.to_json()) == c
    with pytest.raises(ConfigError, match="colour"):
        ViTConfig.from_dict({**c.to_dict(), "colour": "red"})


def test_moot_fields_take_their_default():
    """A field with no effect on the model is normalised, so equal models are equal configs."""
    base = dict(image_size=(8, 12), patch_size=4, d_model=24, num_heads=3)
    assert ViTConfig(**base, qkv_bias=False, k_bias=False).k_bias is True
    assert ViTConfig(**base, pool="cls", map_heads=2).map_heads == 0
    assert ViTConfig(**base, pool="map", map_heads=3).map_heads == 0  # the blocks' own count
    assert ViTConfig(**base, pool="mean", class_token=False, pool_prefix=True).pool_prefix is False
