"""The layer diff and the mismatch doctor: each classic fault planted on purpose, then named."""

import numpy as np
import pytest
import torch

import weight_transfer as wt
from tests.conftest import tiny
from vit_config import ViTConfig
from vit_config.arch import intermediates
from weight_transfer.diagnostics import numpy_ref
from weight_transfer.diagnostics.adapters import Side, side
from weight_transfer.diagnostics.doctor import diagnose
from weight_transfer.diagnostics.parity import compare
from weight_transfer.frameworks.runners import random_images
from weight_transfer.frameworks.weights import random_nnx

CONFIG = tiny()  # (8, 12) images, P=4: a 2 x 3 grid; D=24, 3 heads, d_ff 40, 2 blocks


@pytest.fixture(scope="module")
def ref():
    return random_nnx(CONFIG, seed=21)


@pytest.fixture(scope="module")
def images():
    return random_images(CONFIG, 2, seed=22)


def planted(model, config=None, **edits):
    flat = wt.nnx_flat(model)
    for key, fn in edits.items():
        flat[key] = fn(flat[key])
    return wt.nnx_from_flat(flat, config or model.config)


def every_block(leaf: str, fn, names="qkvo"):
    return {f"blocks.{i}.attn.{n}.{leaf}": fn for i in range(CONFIG.num_layers) for n in names}


# ---- the diff ------------------------------------------------------------------------------------


def test_numpy_replay_matches_every_intermediate(ref, images):
    """The doctor's NumPy replay computes what our models compute, layer by layer."""
    replay = numpy_ref.forward(wt.nnx_flat(ref), images, CONFIG)
    ours = side(ref).run(images, True)
    assert sorted(replay) == sorted(ours) == sorted(intermediates(CONFIG))
    for name in ours:
        np.testing.assert_allclose(replay[name], ours[name], rtol=0, atol=1e-12, err_msg=name)


def test_compare_correct_pair_passes_with_floor(ref, images):
    report = compare(ref, wt.to_torch(ref), images)
    assert report.passed and report.first_divergence is None
    assert [layer.name for layer in report.layers] == intermediates(CONFIG)
    for layer in report.layers:
        assert layer.noise_floor > 0 and layer.gap64 < 1e-12, layer
    assert report.settings["jax_default_matmul_precision"] == "highest"


def test_compare_names_the_first_divergent_layer(ref, images):
    bad = planted(ref, **{"blocks.1.ff1.bias": lambda b: b + 1e-3})
    report = compare(wt.to_torch(ref), bad, images)
    assert report.first_divergence == "blocks.1.mlp"
    gaps = {layer.name: layer for layer in report.layers}
    assert not gaps["blocks.1.attn"].divergent and gaps["blocks.1.mlp"].divergent
    assert gaps["blocks.1.mlp"].max_abs > 100 * gaps["blocks.1.mlp"].noise_floor


timm = pytest.importorskip("timm")


def timm_model(img_size=(8, 12), seed=23, **kw):
    from timm.models.vision_transformer import VisionTransformer

    from tests.helpers.models import randomize

    return randomize(
        VisionTransformer(
            img_size=img_size,
            patch_size=4,
            embed_dim=24,
            depth=2,
            num_heads=3,
            mlp_ratio=40 / 24,
            num_classes=7,
            **kw,
        ),
        seed,
    )


def port_of_timm(model, **config_changes):
    from tests.helpers.models import from_timm

    sd = {k.replace("fc_norm.", "norm."): v for k, v in model.state_dict().items()}
    return from_timm(sd, CONFIG.replace(**config_changes))


def test_compare_against_timm_layer_by_layer(images):
    model = timm_model(global_pool="token")
    report = compare(model, port_of_timm(model), images)
    assert report.passed, [
        (layer.name, layer.max_abs, layer.noise_floor) for layer in report.layers
    ]
    assert report.reference.startswith("timm")


@pytest.mark.parametrize("block", ["ParallelScalingBlock", "ParallelThingsBlock"])
def test_compare_against_timm_parallel_blocks_layer_by_layer(images, block):
    """ViT-22B's block is read at its two output projections (the branches before the one
    LayerScale, as our models tap them); parallel branches at each block's output."""
    import timm.models.vision_transformer as vt

    from tests.helpers.models import from_timm
    from weight_transfer.layouts.timm import config_of_timm_model

    model = timm_model(global_pool="token", block_fn=getattr(vt, block), init_values=0.5)
    config = config_of_timm_model(model)
    assert (config.block, config.num_parallel) == (
        ("parallel", 1) if block == "ParallelScalingBlock" else ("pre_norm", 2)
    )
    report = compare(model, from_timm(model.state_dict(), config), images)
    assert report.passed, [(x.name, x.max_abs, x.noise_floor) for x in report.layers]
    assert {"blocks.1.attn", "blocks.1"} <= {x.name for x in report.layers}


def timm_naflex(seed: int):
    """timm's NaFlexVit (bicubic, antialiased), 2 blocks of CONFIG's sizes, its table a 5 x 3
    grid (not the images'), every parameter random; and its config at CONFIG's image size."""
    import timm

    from tests.helpers.models import randomize
    from weight_transfer.layouts.timm import config_of_timm_model

    model = timm.create_model(
        "naflexvit_base_patch16_gap",
        pretrained=False,
        depth=2,
        patch_size=CONFIG.patch_size,
        embed_dim=CONFIG.d_model,
        num_heads=CONFIG.num_heads,
        pos_embed_grid_size=(5, 3),
        in_chans=CONFIG.in_channels,
    )
    model = randomize(model, seed=seed).eval()
    return model, config_of_timm_model(model, image_size=CONFIG.image_size)


@pytest.mark.slow  # 3.3 s (--durations)
def test_compare_against_timm_naflex_layer_by_layer(images):
    """NaFlexVit embeds, positions and joins the tokens in one module: read at its parts.
    timm resamples the table in float32 even in a float64 run: every float32 gap is within
    the noise floor, the float64 gaps stall at float32's resolution from `tokens` on, and the
    doctor names that a float32 island, not a fault of the port."""
    from tests.helpers.models import from_timm

    model, config = timm_naflex(seed=2)
    assert config.pos_grid == (5, 3)
    port = from_timm(model.state_dict(), config)
    report = compare(model, port, images)
    assert [x.name for x in report.layers][:2] == ["patch_embed", "tokens"]
    assert "blocks.1" in {x.name for x in report.layers}
    assert all(x.max_abs <= x.noise_floor for x in report.layers), report.as_dict()
    assert report.first_divergence == "tokens" and report.layers[1].gap64 < 1e-6
    assert [f.id for f in diagnose(model, port, images).findings] == ["float32_island"]


# ---- the doctor ----------------------------------------------------------------------------------


def head_permutation(a, transpose=False):
    h, hd = CONFIG.num_heads, CONFIG.head_dim
    a = a.T if transpose else a
    out = a.reshape(h, hd, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape)
    return out.T if transpose else out


def interleave_qkv(flat):
    h, hd, d = CONFIG.num_heads, CONFIG.head_dim, CONFIG.d_model
    for i in range(CONFIG.num_layers):
        for leaf in ("kernel", "bias"):
            keys = [f"blocks.{i}.attn.{n}.{leaf}" for n in "qkv"]
            rows = [flat[k].T if leaf == "kernel" else flat[k] for k in keys]
            fused = np.concatenate(rows).reshape(3, h, hd, *rows[0].shape[1:])
            fused = fused.swapaxes(0, 1).reshape(3 * d, *rows[0].shape[1:])  # per-head rows
            for k, part in zip(keys, np.split(fused, 3), strict=True):
                flat[k] = part.T if leaf == "kernel" else part
    return flat


def column_major_positions(pos):
    hp, wp = CONFIG.grid
    rows = pos[1:].reshape(hp, wp, -1).transpose(1, 0, 2).reshape(hp * wp, -1)
    return np.concatenate([pos[:1], rows])


def make_fault(name, ref):
    """(reference, candidate) with exactly one planted fault."""
    if name == "conv_kernel_spatial_swap":
        return ref, planted(ref, **{"patch_embed.kernel": lambda k: k.transpose(1, 0, 2, 3)})
    if name == "conv_kernel_in_out_swap":
        square = random_nnx(CONFIG.replace(in_channels=24), seed=5)
        return square, planted(square, **{"patch_embed.kernel": lambda k: k.transpose(0, 1, 3, 2)})
    if name == "linear_not_transposed":
        return ref, planted(ref, **every_block("kernel", lambda k: k.T))
    if name == "input_layout":
        clean = side(ref)
        misfed = Side(
            "misfed",
            intermediates(CONFIG),
            lambda im, f64: clean.run(numpy_ref.read_images(im, "nchw_as_nhwc"), f64),
        )
        return misfed, ref
    if name == "ln_eps":
        return ref, planted(ref, CONFIG.replace(ln_eps=1e-5))
    if name == "block_ln_eps":  # the reference's blocks alone at 1e-5 (jimm's kind of port)
        return planted(ref, CONFIG.replace(block_ln_eps=1e-5)), ref
    if name == "activation_variant":
        return ref, planted(ref, CONFIG.replace(activation="quick_gelu"))
    if name == "norm_pre_presence":  # the candidate has a pre-norm the reference does not
        flat = wt.nnx_flat(ref) | {
            "norm_pre.scale": np.full(CONFIG.d_model, 1.5, np.float32),
            "norm_pre.bias": np.full(CONFIG.d_model, 0.1, np.float32),
        }
        return ref, wt.nnx_from_flat(flat, CONFIG.replace(norm_pre=True))
    if name == "registers":  # the candidate has registers the reference does not
        config = CONFIG.replace(pos_embed_tokens="none", pool="mean", class_token=True)
        base = random_nnx(config, seed=7)
        flat = wt.nnx_flat(base) | {"reg_tokens": np.ones((2, CONFIG.d_model), np.float32)}
        return base, wt.nnx_from_flat(flat, config.replace(reg_tokens=2, class_token=True))
    if name == "layer_scale_count":  # the reference applies LayerScale twice
        model = random_nnx(CONFIG.replace(layer_scale=True), seed=8)
        return numpy_side(model, numpy_ref.Knobs(layer_scale_power=2)), model
    if name == "map_qkv_order":
        config = CONFIG.replace(pool="map", class_token=False)
        model = random_nnx(config, seed=9)
        swap = {
            "map.attn.k.kernel": "map.attn.v.kernel",
            "map.attn.v.kernel": "map.attn.k.kernel",
            "map.attn.k.bias": "map.attn.v.bias",
            "map.attn.v.bias": "map.attn.k.bias",
        }
        flat = wt.nnx_flat(model)
        return model, wt.nnx_from_flat(flat | {k: flat[v] for k, v in swap.items()}, config)
    if name == "qkv_order":
        flat = wt.nnx_flat(ref)
        for i in range(CONFIG.num_layers):
            for leaf in ("kernel", "bias"):
                q, k = f"blocks.{i}.attn.q.{leaf}", f"blocks.{i}.attn.k.{leaf}"
                flat[q], flat[k] = flat[k], flat[q]
        return ref, wt.nnx_from_flat(flat, CONFIG)
    if name == "qkv_interleaved":
        return ref, wt.nnx_from_flat(interleave_qkv(wt.nnx_flat(ref)), CONFIG)
    if name == "head_split_order":
        edits = every_block("kernel", lambda k: head_permutation(k, transpose=True), "qkv")
        edits.update(every_block("bias", head_permutation, "qkv"))
        edits.update(every_block("kernel", head_permutation, "o"))
        return ref, planted(ref, **edits)
    if name == "attention_scale":
        # 4 heads of 6: sqrt(head_dim / d_model) = 1/2 exactly, so float32 weights scale exactly
        four = random_nnx(CONFIG.replace(num_heads=4), seed=6)
        half = {
            f"blocks.{i}.attn.q.{leaf}": (lambda w: w * 0.5)
            for i in range(CONFIG.num_layers)
            for leaf in ("kernel", "bias")
        }
        return four, planted(four, **half)
    if name == "pooling":
        model = timm_model(global_pool="avg", class_token=True, fc_norm=False)
        return model, port_of_timm(model)
    if name == "final_norm_position":
        model = timm_model(global_pool="avg", class_token=False, fc_norm=True)
        return model, port_of_timm(model, pool="mean")
    if name == "posembed_cls_slot":
        return ref, planted(ref, pos_embed=lambda p: np.roll(p, -1, axis=0))
    if name == "posembed_grid_order":
        return ref, planted(ref, pos_embed=column_major_positions)
    if name == "resampling_method":  # timm resamples antialiased, the candidate as HF does
        return dynamic_pair()
    if name == "naflex_resize":  # timm's NaFlexVit resizes bicubic, the port bilinear
        from tests.helpers.models import from_timm

        model, config = timm_naflex(seed=4)
        port = wt.nnx_flat(from_timm(model.state_dict(), config))
        return model, wt.nnx_from_flat(port, config.replace(pos_interpolation="bilinear"))
    if name == "rope_variant":  # timm's RoPE-ViT; the port puts the height's angles first
        return rope_pair(rope_axes="hw")
    if name == "rope_prefix":  # the reference forgot the prefix offset
        model = random_nnx(CONFIG.replace(rope="interleaved", reg_tokens=1), seed=31)
        return numpy_side(model, numpy_ref.Knobs(rope_from_first_token=True)), model
    if name == "rope_table_precision":  # DINOv3's periods buffer in bfloat16
        # head_dim 16: periods 100 ** (k / 4), three of the four inexact in bfloat16
        config = CONFIG.replace(d_model=48, rope="half", rope_freqs="periods", rope_theta=100.0)
        model = random_nnx(config, seed=32)
        return numpy_side(model, numpy_ref.Knobs(rope_periods_dtype="bfloat16")), model
    if name == "relative_bias_index":  # timm's BEiT; the port's table read transposed
        return beit_pair(transposed=True)
    if name == "block_norm_placement":  # timm's post-norm blocks ported as pre-norm
        model = timm_model(block_fn=ResPostBlock(), global_pool="token")
        return model, port_of_timm(model)
    if name == "inner_norms":  # the candidate normalises the MLP's hidden units, the reference not
        flat = wt.nnx_flat(ref)
        rng = np.random.default_rng(33)
        for i in range(CONFIG.num_layers):
            for leaf in ("scale", "bias"):
                flat[f"blocks.{i}.ff_norm.{leaf}"] = rng.standard_normal(CONFIG.d_ff).astype(
                    np.float32
                )
        return ref, wt.nnx_from_flat(flat, CONFIG.replace(mlp_norm=True))
    raise KeyError(name)


def ResPostBlock():  # noqa: N802 (timm's class, imported late)
    from timm.models.vision_transformer import ResPostBlock

    return ResPostBlock


def beit_pair(transposed=False, class_slots=(0, 1, 2)):
    """A small timm BEiT (2 x 3 patches: offsets (dy, dx) and (-dy, -dx) differ) and our port
    of it whose relative tables are rearranged so that our reading of them is what a port
    reading the index transposed, or the class slots in `class_slots`' order, computes."""
    from tests.helpers.models import from_timm, randomize
    from weight_transfer.layouts.timm import config_of_timm_model

    model = randomize(
        timm.create_model(
            "beit_base_patch16_224",
            pretrained=False,
            depth=2,
            img_size=(8, 12),
            patch_size=4,
            embed_dim=24,
            num_heads=3,
            num_classes=7,
        ),
        34,
    ).eval()
    config = config_of_timm_model(model)
    flat = wt.nnx_flat(from_timm(model.state_dict(), config))
    offsets = config.num_relative_positions - 3
    for i in range(config.num_layers):
        table = flat[f"blocks.{i}.attn.rel_bias.table"]
        # transposed: row (-dy, -dx) read where (dy, dx) belongs (the offsets' rows
        # reversed), and the class token as key where it is the query (its first two slots)
        slots = [class_slots[i] for i in ((1, 0, 2) if transposed else (0, 1, 2))]
        rows = np.concatenate(
            [table[:offsets][::-1] if transposed else table[:offsets], table[offsets:][slots]]
        )
        flat[f"blocks.{i}.attn.rel_bias.table"] = rows
    return model, wt.nnx_from_flat(flat, config)


def rope_pair(arch="vit_base_patch16_rope_224", size=(32, 48), **wrong):
    """A small timm RoPE model (2 x 3 patches of 16: the axes tell apart) and our port of it
    with `wrong` config fields."""
    from tests.helpers.models import from_timm, randomize
    from weight_transfer.layouts.timm import config_of_timm_model

    model = randomize(
        timm.create_model(
            arch, pretrained=False, depth=2, img_size=size, embed_dim=32, num_heads=2, num_classes=7
        ),
        26,
    ).eval()
    config = config_of_timm_model(model)
    port = wt.nnx_flat(from_timm(model.state_dict(), config))  # timm's config maps the names
    return model, wt.nnx_from_flat(port, config.replace(**wrong))


# faults seen only at another image size than the checkpoint's (a 4 x 5 grid from 2 x 3)
FAULT_IMAGE_SIZE = {"resampling_method": (16, 20), "rope_variant": (32, 48)}
# timm resamples in float32 even in a float64 model (`posemb.float()`): once the method is
# named, the two agree to float32's resolution, which the doctor names as well
# timm's RoPE tables are float32 too (closer than 1e-9 or not, by the images): either way.
AFTER_FIX = {
    "resampling_method": ["float32_island"],
    "rope_variant": ["float32_island"],
    "naflex_resize": ["float32_island"],
}
MAY_BE_FIXED = {"rope_variant", "naflex_resize"}


def dynamic_pair(resampling=None):
    """A timm model with `dynamic_img_size=True` and our port of it taking any size too,
    resampling its table by `resampling` (default: as HF does, no antialias)."""
    from weight_transfer.core.resample import HF

    model = timm_model(dynamic_img_size=True)
    port = port_of_timm(model)
    port.set_dynamic_image_size(True, resampling or HF)
    return model, port


FAULTS = [
    "conv_kernel_spatial_swap",
    "conv_kernel_in_out_swap",
    "linear_not_transposed",
    "input_layout",
    "ln_eps",
    "block_ln_eps",
    "activation_variant",
    "qkv_order",
    "qkv_interleaved",
    "head_split_order",
    "attention_scale",
    "pooling",
    "final_norm_position",
    "posembed_cls_slot",
    "posembed_grid_order",
    "norm_pre_presence",
    "registers",
    "layer_scale_count",
    "map_qkv_order",
    "resampling_method",
    "naflex_resize",
    "rope_variant",
    "rope_prefix",
    "rope_table_precision",
    "relative_bias_index",
    "block_norm_placement",
    "inner_norms",
]


def numpy_side(model, knobs) -> Side:
    """A reference computed by the NumPy forward with a variant switched on."""
    params = {k: v.astype(np.float64) for k, v in wt.nnx_flat(model).items()}
    return Side(
        "numpy",
        intermediates(model.config),
        lambda images, f64: numpy_ref.forward(params, images, model.config, knobs),
    )


def test_every_hypothesis_has_a_planted_fault():
    from weight_transfer.diagnostics.doctor import HYPOTHESES

    assert sorted(HYPOTHESES) == sorted(FAULTS)


# the slowest (3 to 4 s each, measured) run with the whole suite; the quick subset keeps the rest
SLOW_FAULTS = {
    "naflex_resize",  # also test_doctor_names_how_a_naflex_table_is_resized
    "rope_variant",  # also test_doctor_names_each_rope_difference
    "rope_prefix",
    "rope_table_precision",
    "relative_bias_index",  # also test_doctor_names_the_class_slots_of_a_relative_bias_table
    "resampling_method",  # also test_doctor_names_how_the_reference_resamples
    "registers",
    "map_qkv_order",
    "conv_kernel_spatial_swap",
    "final_norm_position",
    "input_layout",
    "qkv_interleaved",
    "attention_scale",
}


@pytest.mark.parametrize(
    "fault", [pytest.param(f, marks=[pytest.mark.slow] * (f in SLOW_FAULTS)) for f in FAULTS]
)
def test_doctor_names_exactly_the_planted_fault(ref, fault):
    reference, candidate = make_fault(fault, ref)
    size = FAULT_IMAGE_SIZE.get(fault, candidate.config.image_hw)
    images = random_images(candidate.config.replace(image_size=size), 2, seed=22)
    assert not compare(reference, candidate, images).passed  # the plant really breaks parity
    d = diagnose(reference, candidate, images)
    ids = [f.id for f in d.findings]
    if fault in MAY_BE_FIXED and ids == [fault]:
        assert d.fixed, d.as_dict()
    else:
        assert ids == [fault, *AFTER_FIX.get(fault, [])], d.as_dict()
        assert d.fixed == (fault not in AFTER_FIX)
    assert d.first_divergence is not None


@pytest.mark.slow
@pytest.mark.parametrize(
    "first, second",
    [
        ("conv_kernel_spatial_swap", "ln_eps"),
        ("qkv_order", "activation_variant"),
        ("posembed_grid_order", "head_split_order"),
    ],
)
def test_doctor_finds_two_faults_at_once(ref, images, first, second):
    _, one = make_fault(first, ref)
    flat = wt.nnx_flat(one)
    _, two = make_fault(second, wt.nnx_from_flat(flat, ref.config))
    if second in ("ln_eps", "activation_variant"):  # config faults: carry the first's weights
        two = wt.nnx_from_flat(flat, two.config)
    d = diagnose(ref, two, images)
    assert sorted(f.id for f in d.findings) == sorted([first, second]), d.as_dict()
    assert d.fixed


def test_a_fault_in_one_layer_is_found_and_confined(ref, images):
    """One block's output projection copied without its transpose, the other blocks right."""
    candidate = planted(ref, **{"blocks.1.attn.o.kernel": lambda k: k.T})
    d = diagnose(ref, candidate, images)
    assert d.first_divergence == "blocks.1.attn" and d.fixed, d.as_dict()
    assert [f.id for f in d.findings] == ["linear_not_transposed"]
    assert "block 1 only" in d.findings[0].detail and "attn.o" in d.findings[0].detail


def test_a_constant_ratio_is_named(ref, images):
    """A head scaled by a constant (a missing or extra normalisation): no correction closes
    it, and the doctor says what the two outputs share."""
    candidate = planted(ref, **{"head.kernel": lambda k: k * 2, "head.bias": lambda b: b * 2})
    d = diagnose(ref, candidate, images)
    assert not d.fixed and d.first_divergence == "logits"
    assert [f.id for f in d.findings] == ["constant_ratio"], d.as_dict()
    assert "0.5" in d.findings[0].detail


def test_a_float32_island_in_the_reference_is_named(ref, images):
    """A reference that computes in float32 even when asked for float64 (HF's eager softmax,
    float32 resampling): agreement stalls near 1e-7, which the doctor recognises."""
    clean = side(wt.to_torch(ref))
    island = Side(
        "float32 island",
        intermediates(CONFIG),
        lambda im, f64: clean.run(im.astype(np.float32), False),
    )
    d = diagnose(island, ref, images)
    assert [f.id for f in d.findings] == ["float32_island"], d.as_dict()


def test_correct_pairs_get_no_findings(ref, images):
    for reference, candidate in [
        (ref, wt.to_torch(ref)),
        (wt.to_torch(ref), ref),
        (timm_model(global_pool="token"), None),
    ]:
        candidate = candidate or port_of_timm(reference)
        d = diagnose(reference, candidate, images)
        assert d.findings == [] and d.fixed and d.first_divergence is None


def test_doctor_refuses_a_third_party_candidate(ref, images):
    with pytest.raises(TypeError, match="jax_impl.ViT or torch_impl.ViT"):
        diagnose(ref, torch.nn.Linear(2, 2), images)


def test_vit_config_sizes_for_doctor_are_distinct():
    assert len({CONFIG.d_model, CONFIG.d_ff, CONFIG.head_dim, CONFIG.num_heads}) == 4
    assert ViTConfig.preset("seed") != CONFIG


@pytest.mark.parametrize("framework", ["torch", pytest.param("jax", marks=pytest.mark.slow)])
def test_a_recorded_reference_diagnoses_alike_and_holds_no_model(ref, images, framework):
    """What the CLI does to keep one model in memory: the reference's float64 run recorded
    (the model cast in place, then dropped) gives the same diagnosis as the live reference."""
    from weight_transfer.diagnostics.adapters import recorded

    reference, candidate = make_fault("ln_eps", ref)
    live = diagnose(reference, candidate, images)
    spent = (
        wt.to_torch(reference)
        if framework == "torch"
        else wt.nnx_from_flat(wt.nnx_flat(reference), reference.config)
    )
    side = recorded(spent, images)
    first = next(spent.parameters()) if framework == "torch" else spent.pos_embed[...]
    assert first.dtype in (torch.float64, np.float64)  # cast in place: spent
    assert diagnose(side, candidate, images).as_dict() == live.as_dict()
    with pytest.raises(ValueError, match="only its own float64 run"):
        side.run(images + 1, True)


def test_a_replay_resumed_at_a_block_is_the_full_replay(ref, images):
    """The doctor replays corrections confined to block i and later from the base's input to
    block i: that must be exactly the full replay from there on."""
    from weight_transfer.diagnostics.doctor import candidate_of
    from weight_transfer.diagnostics.numpy_ref import trace

    cand = candidate_of(ref)
    images = np.asarray(images, np.float64)
    full = dict(trace(cand.params, images, cand.config))
    resumed = dict(trace(cand.params, images, cand.config, resume=(1, full["blocks.0"])))
    assert next(iter(resumed)) == "blocks.1.attn"
    assert resumed.keys() <= full.keys() and "logits" in resumed
    for name, value in resumed.items():
        assert np.array_equal(value, full[name]), name


# ---- resampling at another size: each library's method planted in a real timm forward ------


def dinov2_original(pos_embed, new_size, old_size, num_prefix_tokens, **_):
    """facebookresearch/dinov2's `interpolate_pos_encoding` (square grids), transcribed: a
    `scale_factor` with its `interpolate_offset` 0.1, not a size."""
    cls, rows = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    m, dim = old_size[0], rows.shape[-1]
    sx = float(new_size[1] + 0.1) / m
    sy = float(new_size[0] + 0.1) / m
    rows = torch.nn.functional.interpolate(
        rows.reshape(1, m, m, dim).permute(0, 3, 1, 2), scale_factor=(sx, sy), mode="bicubic"
    )
    assert tuple(rows.shape[-2:]) == tuple(new_size)
    return torch.cat([cls, rows.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def align_corners(pos_embed, new_size, old_size, num_prefix_tokens, **_):
    """timm's resampling with `align_corners=True` and no antialias, as ports often write it."""
    cls, rows = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = rows.shape[-1]
    rows = torch.nn.functional.interpolate(
        rows.reshape(1, *old_size, dim).permute(0, 3, 1, 2),
        size=new_size,
        mode="bicubic",
        align_corners=True,
    )
    return torch.cat([cls, rows.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


@pytest.mark.parametrize(
    "plant, image_size, candidate, named",
    [
        # timm's own antialiased bicubic, downsampling (2 x 3 -> 1 x 2): the widened kernel
        (None, (4, 8), "HF", "with antialias on"),
        # upsampling (2 x 3 -> 4 x 5): torch's antialiased bicubic is the a = -0.5 kernel,
        # normalised at the borders
        pytest.param(None, (16, 20), "HF", "with antialias on", marks=pytest.mark.slow),
        # a candidate that antialiases against a reference that does not
        (align_corners, (16, 20), "TIMM", "align_corners=True"),
        pytest.param(
            dinov2_original, (12, 12), "HF", "DINOv2's +0.1 offset", marks=pytest.mark.slow
        ),
        # the reverse: the candidate has the offset, the reference resamples to the size
        pytest.param(
            None,
            (12, 12),
            "dinov2",
            "without the original DINOv2's +0.1 offset",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_doctor_names_how_the_reference_resamples(monkeypatch, plant, image_size, candidate, named):
    from weight_transfer.core import resample

    method = getattr(resample, candidate, None) or resample.Resampling(candidate, True)
    reference, port = dynamic_pair(method)
    if candidate == "dinov2" or plant is dinov2_original:  # square grids for DINOv2's code
        reference, port = square_dynamic_pair(method)
    if plant is not None:
        import timm.models.vision_transformer as vt

        monkeypatch.setattr(vt, "resample_abs_pos_embed", plant)
    images = random_images(port.config.replace(image_size=image_size), 2, seed=24)
    d = diagnose(reference, port, images)
    # then float32's resolution, named: timm resamples in float32 (`posemb.float()`), and our
    # weights are torch's float32 ones (the file's dtype) where the plants run in float64
    assert [f.id for f in d.findings] == ["resampling_method", "float32_island"], d.as_dict()
    assert named in d.findings[0].detail, d.as_dict()
    assert d.first_divergence == "tokens"


def square_dynamic_pair(resampling):
    model = timm_model(img_size=(8, 8), seed=25, dynamic_img_size=True)
    port = port_of_timm(model, image_size=(8, 8))
    port.set_dynamic_image_size(True, resampling)
    return model, port


@pytest.mark.slow
def test_the_same_method_at_another_size_has_no_finding():
    from weight_transfer.core.resample import TIMM

    reference, port = dynamic_pair(TIMM)
    images = random_images(port.config.replace(image_size=(16, 20)), 2, seed=24)
    d = diagnose(reference, port, images)  # timm resamples in float32: nothing else differs
    assert [f.id for f in d.findings] == ["float32_island"], d.as_dict()


# ---- RoPE: each difference between two implementations, planted against timm's own Eva -------


@pytest.mark.parametrize(
    "arch, wrong, named",
    [
        # 1.5-3 s each (--durations): in the whole suite
        pytest.param(
            "vit_base_patch16_rope_224",
            dict(rope="half"),
            "channels interleaved",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "vit_small_patch16_dinov3",
            dict(rope_freqs="theta", rope_theta=1e4),
            "DINOv3's periods",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "vit_small_patch16_dinov3",
            dict(rope_coords="max"),
            "by separate side",
            marks=pytest.mark.slow,
        ),
        pytest.param(  # 2.2 s
            "vit_pe_spatial_base_patch16_512",
            dict(rope_offset=0.0),
            "positions start at 1",
            marks=pytest.mark.slow,
        ),
        pytest.param(  # learned frequencies: the coordinates the first component multiplies
            "vit_base_patch16_rope_mixed_224",
            dict(rope_axes="hw"),
            "width's RoPE angles first",
            marks=pytest.mark.slow,
        ),
        ("vit_base_patch16_rope_224", dict(rope="none"), "RoPE-ViT's"),
    ],
)
def test_doctor_names_each_rope_difference(arch, wrong, named):
    """timm computes RoPE tables in float32: once the fault is named, a float32 island is
    what remains, and the doctor says so."""
    reference, candidate = rope_pair(arch, **wrong)
    images = random_images(candidate.config, 2, seed=27)
    d = diagnose(reference, candidate, images)
    assert [f.id for f in d.findings][:1] == ["rope_variant"], d.as_dict()
    assert named in d.findings[0].detail, d.as_dict()
    assert [f.id for f in d.findings][1:] in ([], ["float32_island"]), d.as_dict()


@pytest.mark.parametrize("slots", [(1, 0, 2), pytest.param((2, 1, 0), marks=pytest.mark.slow)])
def test_doctor_names_the_class_slots_of_a_relative_bias_table(slots):
    """Against timm's BEiT: a port that keeps the class token's three bias slots in another
    order is named, with the order the reference uses."""
    reference, candidate = beit_pair(class_slots=slots)
    images = random_images(candidate.config, 2, seed=35)
    d = diagnose(reference, candidate, images)
    assert [f.id for f in d.findings] == ["relative_bias_index"], d.as_dict()
    assert "slots in another order" in d.findings[0].detail and d.fixed


@pytest.mark.parametrize(
    "wrong, named",
    [
        pytest.param(  # 2 s; the square case keeps the hypothesis in the quick subset
            dict(pos_interpolation="bilinear"),
            "bicubic with antialias (timm naflexvit_*_gap)",
            marks=pytest.mark.slow,
        ),
        (dict(pos_square=True), "without first squaring the grid"),
    ],
    ids=["method", "square"],
)
def test_doctor_names_how_a_naflex_table_is_resized(images, wrong, named):
    """Against timm's NaFlexVit (bicubic, antialiased, its 5 x 3 table resized to the images'
    grid in every forward): a port stating another resize, or a square first, is named with
    the way timm does it; what remains is timm's float32 resize, a float32 island."""
    from tests.helpers.models import from_timm

    model, config = timm_naflex(seed=3)
    assert config.grid != config.pos_grid
    port = wt.nnx_from_flat(
        wt.nnx_flat(from_timm(model.state_dict(), config)), config.replace(**wrong)
    )
    d = diagnose(model, port, images)
    assert [f.id for f in d.findings][:1] == ["naflex_resize"], d.as_dict()
    assert named in d.findings[0].detail, d.as_dict()
    assert [f.id for f in d.findings][1:] in ([], ["float32_island"]), d.as_dict()
