"""What a checkpoint is: its layout (detected from key names) and its `ViTConfig` (from our
manifest, a config.json, or tensor shapes), with which fields were found and which assumed."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from vit_config import CHOICES, ConfigError, ViTConfig, positioned_prefix
from weight_transfer.core.errors import CheckpointError, LayoutError
from weight_transfer.core.table import Rule, oriented, stand_in
from weight_transfer.formats.checkpoint import Source
from weight_transfer.layouts import Layout, detect_layout


@dataclass
class Inferred:
    config: ViTConfig
    layout: Layout
    found: dict[str, str]  # field -> where it came from
    assumed: dict[str, str]  # field -> why this value was assumed
    dropped: list[str]  # keys left out on purpose (HF pooler)
    source: Source  # what to read: the source given, with its keys normalised by the layout


class Probe:
    """Where `layout` keeps each of our parameters, read off its own table (a fused tensor
    serves all its inputs): `has("blocks.0.ls1")`, and `shape("head.kernel")` in our base
    layout's terms (the rule's inverse applied to the stored shape: a projection stored
    (in, out) still reports (out, in) for a torch-based layout). Keys are written in NNX leaf
    names (`kernel`, `scale`) and mapped to torch's (`weight`) for torch-based layouts."""

    def __init__(self, source: Source, layout: Layout):
        self.source, self.layout = source, layout
        self.rules: dict[str, list[Rule]] = {}
        # key names do not depend on sizes; positions as stored (big_vision: no class row);
        # where the forms name a parameter differently (a distillation token's model with
        # or without its own head), each name is tried
        for config in (
            ViTConfig(pos_embed_tokens="none"),
            ViTConfig(mlp="swiglu", pos_embed_tokens="none"),
            ViTConfig(dist_token=True, dist_head=False, pos_embed_tokens="none"),
            ViTConfig(pos_embed_tokens="none", pos_grid=(1, 1)),  # NaFlex's table and patches
        ):
            for r in oriented(layout.table(config), 1):
                for k in r.left:
                    if r not in self.rules.setdefault(k, []):
                        self.rules[k].append(r)

    def ours(self, key: str) -> str:
        return re.sub(r"\.(kernel|scale)$", ".weight", key) if self.layout.base == "torch" else key

    def rule(self, ours: str) -> Rule | None:
        """The rule filling `ours` whose stored keys the file holds (else the first)."""
        rules = self.rules.get(self.ours(ours), [])
        held = (r for r in rules if all(k in self.source.meta for k in r.right))
        return next(held, rules[0] if rules else None)

    def key(self, ours: str) -> str | None:
        r = self.rule(ours)
        if r is None:
            return None
        return r.right[r.left.index(self.ours(ours)) if len(r.right) == len(r.left) else 0]

    def has(self, ours: str) -> bool:
        return self.key(ours) in self.source.meta

    def shape(self, ours: str) -> tuple[int, ...]:
        r = self.rule(ours)
        if r is None or not all(k in self.source.meta for k in r.right):
            raise CheckpointError(
                f"{self.source.path}: cannot infer the config, "
                f"{self.key(ours) or ours!r} is missing ({self.layout.name} "
                f"layout)"
            )
        outs = r.transform.inverse(*(stand_in(self.source.meta[k][0]) for k in r.right))
        return tuple(outs[r.left.index(self.ours(ours))].shape)


BLOCK_INDEX = re.compile(
    r"(?:^|[./])(?:blocks\.|resblocks\.|layer\.|layers\.|encoderblock_)"
    r"(\d+)[./]"
)


def infer_config(
    source: Source,
    layout: Layout | None = None,
    given: ViTConfig | None = None,
    overrides: Mapping[str, Any] | None = None,
    arch: str | None = None,
) -> Inferred:
    """The layout (detected unless given) and the `ViTConfig` (`given`, or from our manifest,
    a config.json the layout reads, and tensor shapes, with `overrides` stated by the user on
    top); `arch` names a timm architecture whose registry entry gives the config (resolved by
    `timm_arch`). Says which fields were found and which were assumed. `source` is left as it
    is: `Inferred.source` is what to read from."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(ViTConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(
            unknown[0],
            overrides[unknown[0]],
            f"unknown field; known: {sorted(ViTConfig.__dataclass_fields__)}",
        )
    stated = given is not None or arch is not None or "vit_parity" in source.metadata
    if (
        not stated and source.hf_config is None
    ):  # a config from the shapes alone: what they cannot express is refused now
        refuse_unsupported(source)
    source, dropped = training_tree(source)
    layout = layout or tree_layout(source)
    if layout.container == "npz" and source.container in TREES:
        source = slash_joined(source)  # a big_vision tree: its npz's '/' names
    if layout.normalise is not None:
        source, normalised = layout.normalise(source)
        dropped += normalised
    if given is None and arch is not None:
        from weight_transfer.layouts import open_clip
        from weight_transfer.layouts.open_clip import config_from_open_clip, is_open_clip_model
        from weight_transfer.layouts.timm import config_from_timm, is_timm_model

        # a name both know is timm's, unless the file is open_clip's
        if is_open_clip_model(arch) and (layout in open_clip.LAYOUTS or not is_timm_model(arch)):
            given, origin = config_from_open_clip(arch), f"open_clip model {arch}"
        else:
            given, origin = config_from_timm(arch), f"timm architecture {arch}"
    else:
        origin = "given"
    if given is not None or "vit_parity" in source.metadata:
        config = given if given is not None else manifest_config(source)
        # the tokens stay what the file holds, whatever pooling is stated
        config = dataclasses.replace(config, **overrides)
        found = {
            f: origin if given is not None else "vit-parity metadata" for f in config.to_dict()
        }
        assumed: dict[str, str] = {}
        if arch is not None and given is not None and "image_size" not in overrides:
            config = _grid_of_file(source, layout, config, found)
        if layout.class_fields is not None:
            config = _class_fields_over(source, layout, config, found, overrides)
    elif layout.needs_arch:
        raise LayoutError(f"{source.path}: {layout.needs_arch}")
    else:
        config, found, assumed = _from_shapes(source, layout, overrides)
    found.update({f: "given" for f in overrides})
    assumed = {f: why for f, why in assumed.items() if f not in overrides}
    refuse_unsupported(source, config)
    check_claims(config, source, layout)
    return Inferred(config, layout, found, assumed, dropped, source)


# Containers holding a tree from JAX training code (its levels joined by '.'), whose names may
# be any layout's: Flax msgpack files, Orbax folders, big_vision tensorstore folders.
TREES = ("msgpack", "orbax", "tensorstore")
# What training code wraps a model's parameters in: Linen's variables and flax's TrainState
# ({"params": ..., "opt_state": ..., "step": ...}; MaxText nests params twice), the legacy
# flax.optim optimizer ({"optimizer": {"target": ...}}), an NNX Variable's `value` leaf.
WRAPPERS = ("params.", "optimizer.target.")


def training_tree(source: Source) -> tuple[Source, list[str]]:
    """A tree's model parameters under the names their layout gives them: training wrappers
    stripped (what lies beside them, optimiser state and step, reported as left out) and NNX
    `value` leaves dropped from the names. Other containers are left as they are."""
    if source.container not in TREES:
        return source, []
    names = {re.sub(r"\.value$", "", k): k for k in source.meta}
    left_out = 0
    while wrapper := next((w for w in WRAPPERS if any(n.startswith(w) for n in names)), None):
        inside = {n[len(wrapper) :]: k for n, k in names.items() if n.startswith(wrapper)}
        left_out += len(names) - len(inside)
        names = inside
    if names == {k: k for k in source.meta}:
        return source, []
    dropped = (
        [f"{left_out} tensor(s) beside the parameters (optimiser state, step)"] if left_out else []
    )
    return source.named(names), dropped


def tree_layout(source: Source) -> Layout:
    """The layout of `source`'s names; a tree's names are also tried joined by '/' (a
    big_vision or google-research model saved from its training state). Neither found: the
    error of the names as stored."""
    try:
        return detect_layout(source.meta, source.container)
    except LayoutError as as_stored:
        if source.container in TREES:
            with contextlib.suppress(LayoutError):
                return detect_layout([k.replace(".", "/") for k in source.meta])
        raise as_stored from None


def slash_joined(source: Source) -> Source:
    return source.named({k.replace(".", "/"): k for k in source.meta})


# Features recognised by their parameters: refused by name unless the config (stated, from an
# architecture or our manifest) computes them; a config from the shapes alone never does.
UNSUPPORTED: dict[str, tuple[str, Callable[[ViTConfig], bool] | None]] = {
    r"relative_position_bias_table|rel_pos_|relative_position_index": (
        "relative position bias (BEiT)",
        lambda c: c.rel_pos_bias != "none",
    ),
    r"\.attn\.q_bias$": ("q and v biases without a k bias (EVA, BEiT)", lambda c: not c.k_bias),
    r"^rope\.freqs$": (
        "RoPE-ViT's learned (mixed) RoPE frequencies",
        lambda c: c.rope != "none" and c.rope_freqs == "mixed",
    ),
    # (the original DINOv3's periods are read by its layout, never copied)
    r"^(?!rope\.freqs$|rope_embed\.periods$).*(rope|freqs_cis|rotary)": (
        "rotary position embeddings (RoPE: EVA-02, DINOv3)",
        None,
    ),
    r"(^|\.)head\.output_proj\.weight$": (
        "AIMv2's attention-pooling head (a class-token query without a projection, no norm or MLP)",
        None,
    ),
    r"^cls_norm\.": (
        "a norm of its own for the class and register tokens (the original DINOv3 7B's "
        "untie_cls_and_patch_norms)",
        None,
    ),
    r"lambda_init|lambda_q|\.diff_": ("differential attention", None),
    r"\.attn_out_proj\.|\.in_proj\.|\.mlp_out_proj\.": (
        "parallel blocks (ViT-22B style: timm ParallelScalingBlock)",
        lambda c: c.block == "parallel",
    ),
    r"^blocks\.\d+\.(attns|ffns)\.\d+\.": (
        "parallel branches (timm ParallelThingsBlock)",
        lambda c: c.num_parallel > 1,
    ),
    r"^embeds\.(proj|pos_embed|cls_token|reg_token)": (
        "timm NaFlexVit (its position table resampled to each image's grid in the forward)",
        lambda c: c.pos_grid is not None,
    ),
    r"\.norm1_post\.|\.post_norm\.|\.post_attention_layernorm\.": (
        "residual post-norm (SwinV2 style)",
        None,
    ),
}


def _grid_of_file(
    source: Source, layout: Layout, config: ViTConfig, found: dict[str, str]
) -> ViTConfig:
    """An architecture's config at the grid its checkpoint holds: the file's position rows
    win over the architecture's default image size (a square grid; else say it with
    --set image_size)."""
    if not config.pos_embed:  # RoPE alone: any grid; the architecture's size stands
        return config
    if config.pos_grid is not None:  # NaFlex: the table's own grid, whatever the image size
        key = Probe(source, layout).key("pos_embed")
        table = source.meta[key][0] if key in source.meta else ()
        grid = tuple(table[-3:-1]) if len(table) == 4 else config.pos_grid
        if grid != config.pos_grid:
            found["pos_grid"] = f"{grid} from the file's table (its registry: {config.pos_grid})"
            config = config.replace(pos_grid=grid)
        return config
    rows = Probe(source, layout).shape("pos_embed")[-2]
    stored = config.num_positions if layout.prefix_positions else config.num_patches
    if rows == stored:
        return config
    patches = rows - (stored - config.num_patches)
    side = math.isqrt(max(patches, 0))
    if patches <= 0 or side * side != patches:
        raise CheckpointError(
            f"{source.path}: {rows} position rows are not a square grid after "
            f"the architecture's {stored - config.num_patches} positioned "
            f"prefix token(s); say the size with --set image_size=HxW "
            f"(overrides={{'image_size': (h, w)}})"
        )
    size = side * config.patch_size
    found["image_size"] = (
        f"{size} from the file's {rows} position rows (the architecture's "
        f"default is {config.image_size})"
    )
    return config.replace(image_size=size)


def refuse_unsupported(source: Source, config: ViTConfig | None = None) -> None:
    """Refuse a file holding a feature `config` does not compute (None: a config still to be
    read from the shapes, which cannot say the feature)."""
    for pattern, (feature, computed) in UNSUPPORTED.items():
        key = next((k for k in source.meta if re.search(pattern, k)), None)
        if key is None or (config is not None and computed is not None and computed(config)):
            continue
        if computed is None:
            why = "which this ViT does not implement; refusing rather than dropping it"
        elif config is None:
            why = "which the shapes alone cannot configure: name the architecture (--arch)"
        else:
            why = "which the stated config does not have; refusing rather than dropping it"
        raise LayoutError(f"{source.path}: {key!r} belongs to {feature}, {why}")


def read_manifest(source: Source) -> dict[str, Any] | None:
    """The manifest our own files carry in their metadata (None for other files)."""
    if "vit_parity" not in source.metadata:
        return None
    try:
        manifest = json.loads(source.metadata["vit_parity"])
    except (json.JSONDecodeError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{source.path}: the vit_parity manifest is not JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(
            f"{source.path}: the vit_parity manifest has no config object (it is not a JSON object)"
        )
    return manifest


def manifest_config(source: Source) -> ViTConfig:
    """The config our own files carry in their metadata, checked for shape before use."""
    manifest = read_manifest(source)
    if manifest is None or not isinstance(manifest.get("config"), dict):
        raise CheckpointError(f"{source.path}: the vit_parity manifest has no config object")
    try:
        return ViTConfig.from_dict(manifest["config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{source.path}: the manifest's config is invalid: {e}") from None


def block_indices(source: Source, layout: Layout) -> set[int]:
    """The blocks the file holds: the indices in its keys where the layout's table puts a
    block's tensors (a MAP head's `mlp.layers.2` is not a block), else wherever a key names
    a block the way publishers do."""
    templates = {k for r in layout.table(ViTConfig(pos_embed_tokens="none")) for k in r.right}
    patterns = [
        re.compile(re.escape(k).replace(re.escape("{}"), r"(\d+)")) for k in templates if "{}" in k
    ]
    held = {int(m.group(1)) for k in source.meta for p in patterns for m in [p.fullmatch(k)] if m}
    return held or {int(m.group(1)) for k in source.meta for m in [BLOCK_INDEX.search(k)] if m}


def _class_fact(layout: Layout) -> str:
    """Where a field the layout's class computes whatever the file was found."""
    return f"the {layout.name} layout's class"


def _class_fields_over(
    source: Source, layout: Layout, config: ViTConfig, found: dict, overrides: Mapping[str, Any]
) -> ViTConfig:
    """A stated config (an architecture's, a manifest's) with what the layout's class fixes
    laid over it (the original DINOv3 pools its class token, whatever timm's architecture
    does), and what the file's buffers state: RoPE periods are used (the function the file
    computes); any other field they state (heads, a masked key bias) must agree, or the file
    is refused. The user's overrides win."""
    fields, stated, assumed = layout.class_fields(source)  # type: ignore[misc]
    for name in stated:
        if name in overrides or name == "rope_periods":
            continue
        if dataclasses.replace(config, **{name: fields[name]}).same_model(config):
            continue
        raise CheckpointError(
            f"{source.path}: {stated[name]} says {name}={fields[name]!r}, the stated "
            f"config {name}={getattr(config, name)!r}; the file is not that model"
        )
    fixed = {
        f: v
        for f, v in fields.items()
        if (f not in stated or f == "rope_periods")
        and f not in assumed
        and f not in overrides
        and getattr(config, f) != v
    }
    for f in fixed:
        found[f] = stated.get(f, _class_fact(layout))
    return dataclasses.replace(config, **fixed) if fixed else config


def check_claims(config: ViTConfig, source: Source, layout: Layout) -> None:
    """Cheap checks of a stated config against the tensors present, before anything is built
    from it (a forged `num_layers: 1000000` must cost nothing)."""
    layers = block_indices(source, layout)
    if config.num_layers != len(layers):
        raise CheckpointError(
            f"{source.path}: the config says num_layers={config.num_layers}, "
            f"the file holds {len(layers)} blocks"
        )


def _shape_fields(probe: Probe) -> tuple[dict, dict, dict]:
    """The fields which tensors exist and their shapes say: (fields, where each was found,
    what was assumed)."""
    source, layout = probe.source, probe.layout
    has, shape = probe.has, probe.shape
    patch = shape("patch_embed.kernel")
    p, c = (patch[0], patch[2]) if layout.base == "nnx" else (patch[-1], patch[1])  # HWIO / OIHW
    d = patch[3] if layout.base == "nnx" else patch[0]
    sizes: dict[str, Any] = dict(
        patch_size=p,
        in_channels=c,
        d_model=d,
        num_layers=len(block_indices(source, layout)),
        class_token=has("cls_token"),
        dist_token=has("dist_token"),
        # a head on the distillation token, or the class token's alone (HF without a teacher)
        dist_head=has("head_dist.kernel") or not (has("dist_token") and has("head.kernel")),
        reg_tokens=shape("reg_tokens")[-2] if has("reg_tokens") else 0,
        patch_bias=has("patch_embed.bias"),
        patch_norm=has("patch_norm.scale"),
        norm_pre=has("norm_pre.scale"),
        layer_scale=has("blocks.0.ls1"),
        qk_norm=has("blocks.0.attn.q_norm.scale"),
        qkv_bias=has("blocks.0.attn.q.bias"),
        proj_bias=has("blocks.0.attn.o.bias"),
        head_bias=has("head.bias"),
        final_norm="pre_pool"
        if has("ln_f.scale")
        else "post_pool"
        if has("fc_norm.scale")
        else "none",
    )
    found = {f: "which tensors exist, and their shapes" for f in sizes}
    assumed: dict[str, str] = {}
    sizes.update(_mlp_fields(probe, sizes["num_layers"]))
    found.update({f: "MLP tensor shapes" for f in ("mlp", "d_ff", "mlp_bias")})
    head = shape("head.kernel") if has("head.kernel") else None
    sizes["num_classes"] = 0 if head is None else head[0 if layout.base == "torch" else 1]
    head_in = None if head is None else head[1 if layout.base == "torch" else 0]
    if has("map.probe"):
        sizes["pool"], found["pool"] = "map", "a MAP head"
    elif head_in == 2 * d:
        sizes["pool"], found["pool"] = "cls_mean", "the head reads 2 x d_model features"
    elif not sizes["class_token"]:
        sizes["pool"], found["pool"] = "mean", "no class token"
    elif layout.pool is not None:
        sizes["pool"], found["pool"] = layout.pool, f"the {layout.name} layout"
    elif sizes["final_norm"] == "post_pool":
        sizes["pool"], found["pool"] = "mean", "fc_norm (timm's global_pool='avg')"
    else:
        sizes["pool"] = "cls"
        assumed["pool"] = (
            "cls (a class token is present; the weights cannot say it is pooled: "
            "timm global_pool='token')"
        )
    norm_key = next(
        (
            k
            for k in ("blocks.0.ln1", "ln_f", "fc_norm", "norm_pre", "patch_norm")
            if has(f"{k}.scale")
        ),
        None,
    )
    if norm_key is not None and not has(f"{norm_key}.bias"):
        sizes["norm"] = "rmsnorm"
        assumed["norm"] = "rmsnorm (the norms have no bias; a bias-free LayerNorm would differ)"
    return sizes, found, assumed


def _from_shapes(
    source: Source, layout: Layout, stated: Mapping[str, Any]
) -> tuple[ViTConfig, dict, dict]:
    """The config read off which tensors exist and their shapes, a config.json the layout
    reads, the user's `stated` fields, and what the layout assumes for the rest
    (`Layout.assumes`), each field labelled with where it came from."""
    probe = Probe(source, layout)
    has, shape = probe.has, probe.shape
    pos = shape("pos_embed") if has("pos_embed") else None  # None: positions inside attention
    from_json: dict[str, Any] = {}
    json_assumed: dict[str, str] = {}
    if layout.read_config_json is not None and source.hf_config is not None:
        from_json, json_assumed = layout.read_config_json(source.hf_config, source.path)
    sizes: dict[str, Any] = {}
    found: dict[str, str] = {}
    assumed: dict[str, str] = {}
    # what the tensors say, unless config.json gave the whole config (timm's registry): then
    # they are checked against it at load, not read for it
    if not set(from_json) >= set(ViTConfig.__dataclass_fields__):
        sizes, found, assumed = _shape_fields(probe)
    patch = shape("patch_embed.kernel")
    if len(patch) == 2 and not {"patch_size", "in_channels"} <= set(from_json) | set(stated):
        raise CheckpointError(  # a Linear on flattened patches (SigLIP 2's): P * P * C in one
            f"{source.path}: the patch embedding is {list(patch)}, a Linear on flattened "
            "patches (SigLIP 2, NaFlex), whose patch size and channels its shape cannot say "
            "apart: give the file with its config.json (a Hugging Face folder)"
        )
    sizes.update(from_json)
    found.update({f: "config.json" for f in from_json})
    assumed = {f: why for f, why in assumed.items() if f not in from_json} | json_assumed
    if layout.class_fields is not None:
        from_buffers, buffers_found, buffers_assumed = layout.class_fields(source)
        sizes.update(from_buffers)
        found.update({f: _class_fact(layout) for f in from_buffers if f not in buffers_assumed})
        found.update(buffers_found)
        assumed = {f: why for f, why in assumed.items() if f not in from_buffers}
        assumed.update(buffers_assumed)
    d = sizes["d_model"]
    sizes.update(stated)  # the user's word beats anything inferred below
    prefix = int(sizes["class_token"]) + int(sizes["dist_token"]) + sizes["reg_tokens"]
    if pos is not None and sizes.get("pos_grid") is not None:
        pass  # a NaFlex table on its own grid (config.json's), checked at load like any tensor
    elif pos is not None:
        _positions(source, layout, sizes, pos[-2], prefix, found, assumed)
    elif all(  # neither stated nor what the layout's class always computes
        sizes.get(f, layout.assumes.get(f, ("none",))[0]) == "none"
        for f in ("rope", "rel_pos_bias")
    ):
        raise LayoutError(
            f"{source.path}: no position table, so positions are computed inside attention "
            f"(RoPE: DINOv3, RoPE-ViT; or a relative bias) and the weights cannot say how; "
            f"name the architecture with --arch (arch=) or keep its config.json beside it"
        )
    else:
        sizes["pos_embed"], found["pos_embed"] = False, "no position table in the file"
    if "num_heads" not in sizes:
        q_key = probe.key("blocks.0.attn.q.kernel")
        q = source.meta.get(q_key) if q_key is not None else None
        if layout.heads_in_kernel and q is not None and len(q[0]) == 3:
            sizes["num_heads"] = q[0][1]
            found["num_heads"] = "attention kernel shape (D, heads, head_dim)"
        elif sizes["qk_norm"]:
            sizes["num_heads"] = d // shape("blocks.0.attn.q_norm.scale")[0]
            found["num_heads"] = "q_norm's width (head_dim)"
        else:
            sizes["num_heads"] = d // 64 if d % 64 == 0 else 1
            assumed["num_heads"] = f"{sizes['num_heads']} (head_dim 64, the ViT paper's)"
    if sizes.get("mlp", "mlp") != "mlp" and "activation" not in sizes:
        sizes["activation"] = "silu"
        assumed["activation"] = "silu (the gated MLP is SwiGLU, as in AIMv2 and DINOv2-g)"
    for name, (value, why) in layout.assumes.items():
        if name not in sizes:
            sizes[name], assumed[name] = value, why
    looks = layout.lookalike_keys is None or layout.lookalike_keys(source.meta)
    if layout.lookalikes and looks and source.hf_config is None:
        assumed["positions"] = (
            f"a learned table only (the weights cannot say whether q and k "
            f"are also rotated: {layout.lookalikes}); if the file is such a "
            f"model, name its architecture with --arch (arch=)"
        )
    try:
        return ViTConfig(**sizes), found, assumed
    except ConfigError as e:
        raise CheckpointError(f"{source.path}: the inferred config is invalid: {e}") from None


def _mlp_fields(probe: Probe, layers: int) -> dict[str, Any]:
    """Plain MLP, split SwiGLU (ff1_g/ff1_x), or packed SwiGLU (one fc1 with twice the rows
    fc2 reads: a plain MLP's fc1 has exactly as many), its width and whether it has biases."""
    if not layers:
        return {}
    kernel_axis = 0 if probe.layout.base == "torch" else 1  # output features of ff1
    if probe.has("blocks.0.ff1_g.kernel"):
        f = probe.shape("blocks.0.ff1_g.kernel")[kernel_axis]
        packed = probe.key("blocks.0.ff1_g.kernel") == probe.key("blocks.0.ff1_x.kernel")
        return dict(
            mlp="swiglu_packed" if packed else "swiglu",
            d_ff=f,
            mlp_bias=probe.has("blocks.0.ff1_g.bias"),
        )
    fc1 = probe.shape("blocks.0.ff1.kernel")[kernel_axis]
    fc2_in = probe.shape("blocks.0.ff2.kernel")[1 - kernel_axis]
    mlp = "swiglu_packed" if fc1 == 2 * fc2_in else "mlp"
    return dict(mlp=mlp, d_ff=fc2_in, mlp_bias=probe.has("blocks.0.ff1.bias"))


def _positions(
    source: Source, layout: Layout, sizes: dict, rows: int, prefix: int, found: dict, assumed: dict
) -> None:
    """Which prefix tokens carry a position, and the image size, from the position rows: the
    patch grid must be stated (`image_size`) or a square, and the remaining rows must be all,
    none or only the class token of the prefix tokens."""
    p = sizes["patch_size"]
    kinds = CHOICES["pos_embed_tokens"] if layout.prefix_positions else ("none",)
    modes = {kind: positioned_prefix(kind, prefix) for kind in kinds}  # "all" first
    if not sizes.get("class_token"):
        modes.pop("cls", None)
    if "image_size" in sizes:
        cfg_hw = sizes["image_size"]
        hw = [cfg_hw, cfg_hw] if isinstance(cfg_hw, int) else cfg_hw
        if not (
            isinstance(hw, (list, tuple))
            and len(hw) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in hw)
        ):
            raise ConfigError("image_size", cfg_hw, "expected a positive int or a (H, W) pair")
        patches = (hw[0] // p) * (hw[1] // p)
        fits = [m for m, n in modes.items() if rows - patches == n]
        if not fits:
            raise CheckpointError(
                f"{source.path}: {rows} position rows fit neither the "
                f"{patches} patches of image_size {cfg_hw} nor those plus the "
                f"{prefix} prefix token(s)"
            )
    else:
        fits = [m for m, n in modes.items() if rows > n and math.isqrt(rows - n) ** 2 == rows - n]
        if not fits:
            raise CheckpointError(
                f"{source.path}: {rows} position rows are not a square grid "
                f"(with or without the prefix tokens), so the image size is "
                f"ambiguous; say it with --set image_size=HxW "
                f"(overrides={{'image_size': (h, w)}})"
            )
        side = math.isqrt(rows - modes[fits[0]])
        sizes["image_size"] = side * p
        assumed["image_size"] = f"{side * p} (square, from {side * side} patches)"
    if "pos_embed_tokens" not in sizes:
        sizes["pos_embed_tokens"] = fits[0]  # "all" first: when prefix == 0 every mode fits
        found["pos_embed_tokens"] = f"{rows} position rows"
