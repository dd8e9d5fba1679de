"""The one framework-free ViT configuration, shared by `jax_impl` and `torch_impl`.

Importing this module imports neither JAX nor PyTorch.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ACTIVATIONS",
    "POOLS",
    "PRESETS",
    "ArgumentError",
    "ConfigError",
    "ImageShapeError",
    "ViTConfig",
    "VitParityError",
    "CHOICES",
    "DINOV3_POSITIONS",
    "check_image_shape",
    "first_image",
    "positioned_prefix",
]

POOLS = ("cls", "mean", "map", "cls_mean")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "quick_gelu", "silu")


def positioned_prefix(pos_embed_tokens: str, num_prefix_tokens: int) -> int:
    """How many of the prefix tokens have a row in the position table: the one statement of
    the rows (`ViTConfig.num_positioned_prefix`, and reading a table's rows back)."""
    return {"all": num_prefix_tokens, "none": 0, "cls": 1}[pos_embed_tokens]


CHOICES = {  # every field with a fixed set of values
    "pool": POOLS,
    "activation": ACTIVATIONS,
    "pos_embed_tokens": ("all", "none", "cls"),
    "final_norm": ("pre_pool", "post_pool", "none"),
    "norm": ("layernorm", "rmsnorm"),
    "mlp": ("mlp", "swiglu", "swiglu_packed"),
    "rope": ("none", "interleaved", "half"),
    "rope_axes": ("hw", "wh"),
    "rope_freqs": ("theta", "periods", "mixed"),
    "rope_coords": ("separate", "min", "max"),
    "block": ("pre_norm", "post_norm", "parallel"),
    "rel_pos_bias": ("none", "block", "shared"),
    "rel_pos_form": ("beit", "mlp"),
    "pos_interpolation": ("bilinear", "bicubic"),
}
BOOLS = (
    "qkv_bias",
    "class_token",
    "dist_token",
    "dist_head",
    "norm_pre",
    "patch_norm",
    "layer_scale",
    "qk_norm",
    "proj_bias",
    "mlp_bias",
    "patch_bias",
    "head_bias",
    "pos_embed",
    "k_bias",
    "qkv_fused",
    "attn_norm",
    "mlp_norm",
    "pool_prefix",
    "pos_antialias",
    "pos_align_corners",
    "pos_square",
)


class VitParityError(ValueError):
    """Bad input, named: the base of every error this project raises for what a user gave it
    (a config, a file, an argument). The CLI reports these (and `OSError`) in one line with
    exit code 2; any other exception is a bug and keeps its traceback."""


class ArgumentError(VitParityError):
    """An argument outside what a function or command accepts (a framework, dtype, sharding,
    interpolation or optimiser name, a size)."""


class ConfigError(VitParityError):
    """A `ViTConfig` field holds a value no ViT can be built from."""

    def __init__(self, field: str, value: Any, why: str):
        self.field, self.value = field, value
        super().__init__(f"ViTConfig.{field}={value!r}: {why}")


@dataclass(frozen=True)
class ViTConfig:
    # Input image size in pixels: an int for square images, or (H, W).
    image_size: int | tuple[int, int] = 224
    # Side of the square, non-overlapping patches (the conv's kernel and stride).
    patch_size: int = 16
    # Image channels (3 for RGB).
    in_channels: int = 3
    # Token width, D.
    d_model: int = 768
    # Attention heads; head_dim = d_model // num_heads.
    num_heads: int = 12
    # Hidden width of the MLP (4 * d_model in the ViT paper).
    d_ff: int = 3072
    # Encoder blocks (0 is allowed: patch embedding, final norm and head only).
    num_layers: int = 12
    # Classifier outputs; 0: no head, the model returns its pooled features (timm
    # num_classes=0, HF pooler_output).
    num_classes: int = 1000
    # "cls": the class token's row (ViT paper, timm, HF); "mean": the mean of the patch tokens
    # (the seed; timm global_pool="avg", prefix tokens left out); "map": attention pooling by a
    # learned probe (SigLIP, timm "map"); "cls_mean": the class token's row concatenated with
    # the patch mean (HF Dinov2ForImageClassification).
    pool: str = "cls"
    # MLP activation: "gelu" exact (timm, HF, torch default), "gelu_tanh" (flax nn.gelu default,
    # big_vision), "relu" (the seed).
    activation: str = "gelu"
    # Norm epsilon: flax and timm 1e-6, torch nn.LayerNorm default 1e-5 (CLIP), HF ViT 1e-12.
    ln_eps: float = 1e-6
    # The blocks' ln1 and ln2 epsilon, where it is not ln_eps (None: ln_eps). jimm's blocks
    # always use 1e-6 (its Transformer's default) while its outer norms use the model's.
    block_ln_eps: float | None = None
    # Bias on the query, key and value projections (timm qkv_bias); the output projection
    # always has one.
    qkv_bias: bool = True
    # With qkv_bias: whether the key has one too. False: biases on q and v only (EVA, BEiT:
    # timm stores q_bias and v_bias and a zero k bias that is not saved).
    k_bias: bool = True
    # How timm stores q, k and v: one packed qkv (ViT, BEiT, EVA-01) or q_proj, k_proj,
    # v_proj (EVA-02 B and L). The same function and parameters; only the timm names differ.
    qkv_fused: bool = True
    # A learned class token before the patch tokens (ViT paper, timm class_token). Independent
    # of pooling; None means "as the pooling implies": present for the pools that read it
    # ("cls", "cls_mean"), absent otherwise.
    class_token: bool | None = None
    # Learned register tokens after the class token, dropped at pooling (DINOv2-reg, timm reg).
    reg_tokens: int = 0
    # A distillation token after the class token (DeiT distilled; it needs pool="cls").
    # `dist_head`: the output averages the two tokens', each through its own head (`head`,
    # `head_dist`) when there are heads (timm VisionTransformerDistilled at inference, HF
    # DeiTForImageClassificationWithTeacher), the two tokens' features without (timm's
    # num_classes=0); False: the class token alone is read, the distillation token stays in
    # the sequence (HF DeiTForImageClassification and DeiTModel, fine-tuned without a teacher).
    dist_token: bool = False
    dist_head: bool = True
    # Which prefix tokens carry a position: "all" (ViT, timm), "none" (positions for patches
    # only: timm no_embed_class, DeiT-3, big_vision), "cls" (the class token and the patches;
    # registers join after: original DINOv2 with registers and HF).
    pos_embed_tokens: str = "all"
    # The final norm: "pre_pool" on every token (ViT), "post_pool" on the pooled features
    # (timm fc_norm), or "none".
    final_norm: str = "pre_pool"
    # A norm on the tokens before the first block (CLIP's ln_pre, timm norm_pre).
    norm_pre: bool = False
    # A norm on the patch embeddings before positions are added (AIMv2).
    patch_norm: bool = False
    # "layernorm" or "rmsnorm" (AIMv2), for every norm of the model.
    norm: str = "layernorm"
    # Learned per-channel gains on both residual branches (CaiT/DINOv2/DeiT-3 LayerScale).
    layer_scale: bool = False
    # "mlp": fc2(act(fc1 x)); "swiglu": fc2(act(fc1_g x) * fc1_x x) (AIMv2, DINOv2-g), with
    # `activation` as the gate's; "swiglu_packed": the same function and parameters, which timm
    # stores as one packed fc1, gate first (DINOv2-g).
    mlp: str = "mlp"
    # A norm over head_dim on queries and keys.
    qk_norm: bool = False
    # A norm on the heads' concatenated output before the output projection, and one on the
    # MLP's hidden units before its second layer (EVA-02's sub-LN; timm scale_attn_inner /
    # scale_attn_norm and scale_mlp / scale_mlp_norm).
    attn_norm: bool = False
    mlp_norm: bool = False
    # "pre_norm": x + attn(ln1(x)), then x + mlp(ln2(x)) (ViT); "post_norm": each norm on its
    # branch's output, x + ln1(attn(x)), then x + ln2(mlp(x)) (timm ResPostBlock, EVA's
    # use_post_norm, Swin v2); "parallel": attention and MLP side by side on one norm,
    # x + ls1 * (attn(ln1(x)) + mlp(ln1(x))) (ViT-22B; timm ParallelScalingBlock, which stores
    # q, k, v and the MLP's first layer as one `in_proj`): no ln2, no ls2. LayerScale, where
    # present, scales the branch last.
    block: str = "pre_norm"
    # Parallel branches of pre-norm blocks ("Three things everyone should know about ViTs";
    # timm ParallelThingsBlock's num_parallel): x + sum_j ls1_j * attn_j(ln1_j(x)), then
    # x + sum_j ls2_j * mlp_j(ln2_j(x)), branch j's parameters under `blocks.{i}.parallel.{j}`.
    num_parallel: int = 1
    # Relative position biases added to the attention logits: "block" one table per block,
    # "shared" one for all blocks. `rel_pos_form` "beit": a learned table, a row per (dy, dx)
    # offset of the grid, then three for the class token (as query, as key, both), a column
    # per head (BEiT, data2vec); "mlp": the table computed by a 2 -> rel_pos_dim -> heads ReLU
    # MLP of each offset's log coordinates, prefix tokens unbiased (timm relpos).
    rel_pos_bias: str = "none"
    rel_pos_form: str = "beit"
    rel_pos_dim: int = 128
    # Heads of the MAP head's attention; 0: the blocks' num_heads (Perception Encoder core: 8
    # whatever the blocks have).
    map_heads: int = 0
    # Hidden width of the MAP head's MLP; 0: the blocks' d_ff (PE core gigantic: 4 x d_model).
    map_d_ff: int = 0
    # Whether "mean" and "map" pooling read the prefix tokens too (timm's pool_include_prefix;
    # Eva's MAP head always does: Perception Encoder core). False: the patch tokens only.
    pool_prefix: bool = False
    # Biases: attention output, MLP, patch embedding (CLIP has none), classifier head.
    proj_bias: bool = True
    mlp_bias: bool = True
    patch_bias: bool = True
    head_bias: bool = True
    # A learned absolute position table added to the tokens (False: RoPE alone, DINOv3).
    pos_embed: bool = True
    # 2-D rotary position embedding on the patch tokens' queries and keys (prefix tokens are
    # never rotated), per head: "none"; "interleaved" rotates channel pairs (2m, 2m+1) (EVA-02,
    # PE, RoPE-ViT, timm sbb); "half" rotates (j, j + head_dim/2) (DINOv3). Each of the
    # head_dim/2 angles belongs to one axis: `rope_axes` "hw" puts the height's head_dim/4
    # angles first (EVA-02, DINOv3: "ij"), "wh" the width's (PE, RoPE-ViT: "xy").
    rope: str = "none"
    rope_axes: str = "hw"
    # "theta": angle_k = p * rope_theta ** (-k / (head_dim/4)) on integer patch positions
    # p = i + rope_offset (PE: +1), rescaled by `rope_ref_grid` (EVA-02's ref_feat_shape:
    # p * ref / grid); "periods": DINOv3's angle_k = 2 pi c / rope_theta ** (4k / head_dim) on
    # centred coordinates c = 2 (i + 0.5) / n - 1, n per `rope_coords` ("separate": each
    # axis its own length; "min"/"max": the shorter/longer side for both); "mixed": RoPE-ViT's
    # learned frequencies, each block and head its own (2, heads, head_dim/2) `rope_freqs`,
    # angle_k = p1 f[0, k] + p2 f[1, k] on integer positions, p1 the axis `rope_axes` puts
    # first (rope_theta only seeds them: it does not enter the function).
    rope_freqs: str = "theta"
    rope_theta: float = 10000.0
    rope_offset: float = 0.0
    rope_ref_grid: tuple[int, int] | None = None
    rope_coords: str = "separate"
    # "periods" only: the head_dim/4 periods themselves, as a file holds them (the original
    # DINOv3's `rope_embed.periods`, reported to be rounded to bfloat16), used in place of
    # rope_theta ** (4k / head_dim). None: computed from rope_theta.
    rope_periods: tuple[float, ...] | None = None
    # NaFlex (timm NaFlexVit): the learned table has its own patch grid `pos_grid` (Hp, Wp),
    # resampled in every forward to the image's grid by `pos_interpolation` ("bicubic" or
    # "bilinear", torch's `F.interpolate` rules, with `pos_antialias` and `pos_align_corners`);
    # `pos_square`: to a square of the grid's longer side, then its top-left (Hp, Wp) kept
    # (timm's pos_embed_ar_preserving). Positions for patches only (pos_embed_tokens="none").
    # None: the table is the image's grid (resampled only for a dynamic image size, by the
    # port's method).
    pos_grid: tuple[int, int] | None = None
    pos_interpolation: str = "bicubic"
    pos_antialias: bool = True
    pos_align_corners: bool = False
    pos_square: bool = False

    def __post_init__(self):
        if isinstance(self.image_size, (list, tuple)):
            object.__setattr__(self, "image_size", tuple(self.image_size))
        for name in ("rope_ref_grid", "pos_grid", "rope_periods"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.class_token is None:
            object.__setattr__(self, "class_token", self.pool in ("cls", "cls_mean"))
        self._validate()
        # fields without effect take their defaults, so equal models are equal configs
        if self.num_classes == 0:  # no head: whether it has a bias is moot
            object.__setattr__(self, "head_bias", True)
        if not self.dist_token:  # no distillation token: whether it is read is moot
            object.__setattr__(self, "dist_head", True)
        if not self.qkv_bias:  # no biases: whether the key would have one is moot
            object.__setattr__(self, "k_bias", True)
        if self.pool not in ("mean", "map") or self.num_prefix_tokens == 0:
            object.__setattr__(self, "pool_prefix", False)
        if self.pool != "map" or self.map_heads == self.num_heads:  # no MAP head, or the same
            object.__setattr__(self, "map_heads", 0)
        if self.pool != "map" or self.map_d_ff == self.d_ff:
            object.__setattr__(self, "map_d_ff", 0)
        if self.rel_pos_bias == "none":
            object.__setattr__(self, "rel_pos_form", "beit")
        if self.rope == "none":  # no RoPE: its settings are moot
            for name in (
                "rope_axes",
                "rope_freqs",
                "rope_theta",
                "rope_offset",
                "rope_ref_grid",
                "rope_periods",
            ):
                object.__setattr__(self, name, ViTConfig.__dataclass_fields__[name].default)
            object.__setattr__(self, "rope_coords", "separate")
        if self.rope_freqs == "mixed":  # the seed of learned frequencies is not the function
            object.__setattr__(self, "rope_theta", 10000.0)
        if self.rel_pos_bias == "none" or self.rel_pos_form != "mlp":
            object.__setattr__(self, "rel_pos_dim", 128)
        if self.pos_grid is None:  # no NaFlex table: how it would be resampled is moot
            for name in ("pos_interpolation", "pos_antialias", "pos_align_corners", "pos_square"):
                object.__setattr__(self, name, ViTConfig.__dataclass_fields__[name].default)

    def _validate(self) -> None:
        size = self.image_size
        sides = size if isinstance(size, tuple) else (size,)
        if len(sides) not in (1, 2) or not all(_is_positive_int(s) for s in sides):
            raise ConfigError(
                "image_size", size, "expected a positive int or a (H, W) pair of them"
            )
        for name in ("patch_size", "in_channels", "d_model", "num_heads", "d_ff"):
            if not _is_positive_int(getattr(self, name)):
                raise ConfigError(name, getattr(self, name), "expected a positive int")
        for name in ("rel_pos_dim", "num_parallel"):
            if not _is_positive_int(getattr(self, name)):
                raise ConfigError(name, getattr(self, name), "expected a positive int")
        for name in ("num_layers", "num_classes", "reg_tokens", "map_heads", "map_d_ff"):
            if not (
                isinstance(getattr(self, name), int)
                and not isinstance(getattr(self, name), bool)
                and getattr(self, name) >= 0
            ):
                raise ConfigError(name, getattr(self, name), "expected an int >= 0")
        if self.d_model % self.num_heads:
            raise ConfigError(
                "d_model", self.d_model, f"not divisible by num_heads={self.num_heads}"
            )
        for side in self.image_hw:
            if side % self.patch_size:
                raise ConfigError(
                    "image_size",
                    size,
                    f"side {side} is not divisible by patch_size={self.patch_size}",
                )
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ConfigError(name, getattr(self, name), f"expected one of {choices}")
        for name in ("ln_eps", "block_ln_eps"):
            eps = getattr(self, name)
            if name == "block_ln_eps" and eps is None:
                continue
            if (
                isinstance(eps, bool)
                or not isinstance(eps, (int, float))
                or not (0 < eps < 1)
                or not math.isfinite(eps)
            ):
                raise ConfigError(name, eps, "expected a float in (0, 1)")
        for name in BOOLS:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, getattr(self, name), "expected a bool")
        needs_class_token = {
            "pool": self.pool in ("cls", "cls_mean"),
            "dist_token": self.dist_token,
            "pos_embed_tokens": self.pos_embed_tokens == "cls",
        }
        for name, needs in needs_class_token.items():
            if needs and not self.class_token:
                raise ConfigError(name, getattr(self, name), "needs class_token=True")
        if self.dist_token and self.pool != "cls":
            raise ConfigError(
                "dist_token",
                True,
                "the distillation token's output averages with the class token's, or is "
                "left unread beside it: needs pool='cls'",
            )
        if self.pool == "map" and self.d_model % self.map_num_heads:
            raise ConfigError(
                "map_heads", self.map_heads, f"d_model={self.d_model} is not divisible by it"
            )
        if self.final_norm == "post_pool" and self.pool == "map":
            raise ConfigError("final_norm", self.final_norm, "MAP pooling has its own norm")
        beit = self.rel_pos_bias != "none" and self.rel_pos_form == "beit"
        if beit and not (self.class_token and self.num_prefix_tokens == 1):
            raise ConfigError(
                "rel_pos_bias",
                self.rel_pos_bias,
                "BEiT's tables have slots for one class token and no other prefix token",
            )
        if self.rel_pos_bias != "none" and self.rope != "none":
            raise ConfigError(
                "rel_pos_bias",
                self.rel_pos_bias,
                "relative biases and RoPE together: no "
                "published ViT has both (rope='none' or rel_pos_bias='none')",
            )
        if self.num_parallel > 1 and self.block != "pre_norm":
            raise ConfigError(
                "num_parallel",
                self.num_parallel,
                f"parallel branches are pre-norm blocks, not block={self.block!r}",
            )
        if self.num_parallel > 1 and self.rope != "none" and self.rope_freqs == "mixed":
            raise ConfigError(
                "num_parallel",
                self.num_parallel,
                "parallel branches with learned RoPE frequencies: no published ViT has them",
            )
        self._validate_rope()
        self._validate_naflex()

    def _validate_naflex(self) -> None:
        grid = self.pos_grid
        if grid is None:
            return
        if not (isinstance(grid, tuple) and len(grid) == 2 and all(map(_is_positive_int, grid))):
            raise ConfigError("pos_grid", grid, "expected None or a (Hp, Wp) pair of ints")
        if grid[0] * grid[1] > MAX_DYNAMIC_PATCHES:
            raise ConfigError("pos_grid", grid, f"more than {MAX_DYNAMIC_PATCHES:,} positions")
        if not self.pos_embed or self.pos_embed_tokens != "none":
            raise ConfigError(
                "pos_grid",
                grid,
                "a NaFlex table positions the patches alone: needs pos_embed=True and "
                "pos_embed_tokens='none'",
            )
        if self.pos_antialias and self.pos_align_corners:
            raise ConfigError(
                "pos_align_corners",
                True,
                "antialiased resampling with aligned corners is not implemented (no "
                "published NaFlex model uses it)",
            )

    def _validate_rope(self) -> None:
        for name in ("rope_theta", "rope_offset"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(name, v, "expected a finite number")
        if self.rope_theta <= 0:
            raise ConfigError("rope_theta", self.rope_theta, "expected a positive number")
        ref = self.rope_ref_grid
        if ref is not None and not (
            isinstance(ref, tuple) and len(ref) == 2 and all(_is_positive_int(s) for s in ref)
        ):
            raise ConfigError("rope_ref_grid", ref, "expected None or a (Hp, Wp) pair of ints")
        if self.rope_freqs == "mixed" and (
            self.rope_offset or self.rope_ref_grid is not None or self.rope_coords != "separate"
        ):
            raise ConfigError(
                "rope_freqs",
                "mixed",
                "learned frequencies on integer positions: rope_offset, rope_ref_grid and "
                "rope_coords do not apply",
            )
        if self.rope != "none" and self.head_dim % 4:
            raise ConfigError(
                "rope", self.rope, f"2-D RoPE needs head_dim divisible by 4, not {self.head_dim}"
            )
        periods = self.rope_periods
        if periods is None or self.rope == "none":
            return
        if self.rope_freqs != "periods":
            raise ConfigError(
                "rope_periods", "...", f"only for rope_freqs='periods', not {self.rope_freqs!r}"
            )
        if not isinstance(periods, tuple) or len(periods) != self.head_dim // 4:
            raise ConfigError(
                "rope_periods",
                f"{len(periods) if isinstance(periods, tuple) else periods!r} value(s)",
                f"expected head_dim / 4 = {self.head_dim // 4} periods",
            )
        if not all(
            isinstance(p, (int, float)) and not isinstance(p, bool) and math.isfinite(p) and p > 0
            for p in periods
        ):
            raise ConfigError("rope_periods", periods, "expected positive finite numbers")

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def block_eps(self) -> float:
        """The epsilon of each block's ln1 and ln2."""
        return self.ln_eps if self.block_ln_eps is None else self.block_ln_eps

    @property
    def image_hw(self) -> tuple[int, int]:
        s = self.image_size
        return s if isinstance(s, tuple) else (s, s)

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (Hp, Wp)."""
        h, w = self.image_hw
        return h // self.patch_size, w // self.patch_size

    @property
    def table_grid(self) -> tuple[int, int]:
        """The position table's patch grid: NaFlex's own (`pos_grid`), else the image's."""
        return self.pos_grid or self.grid

    @property
    def num_patches(self) -> int:
        hp, wp = self.grid
        return hp * wp

    @property
    def has_dist_head(self) -> bool:
        """Whether a `head_dist` classifies the distillation token (`dist_head` with heads)."""
        return self.dist_token and self.dist_head and self.num_classes > 0

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens: class, distillation, registers (in that order)."""
        return int(self.class_token) + int(self.dist_token) + self.reg_tokens

    @property
    def num_tokens(self) -> int:
        """Tokens through the blocks: prefix tokens, then patches."""
        return self.num_prefix_tokens + self.num_patches

    @property
    def num_positioned_prefix(self) -> int:
        """Prefix tokens that carry a position (`pos_embed_tokens`)."""
        return positioned_prefix(self.pos_embed_tokens, self.num_prefix_tokens)

    @property
    def num_positions(self) -> int:
        """Rows of the position embedding: the positioned prefix tokens, then the table's grid."""
        hp, wp = self.table_grid
        return self.num_positioned_prefix + hp * wp

    @property
    def map_mlp_width(self) -> int:
        """Hidden width of the MAP head's MLP (`map_d_ff`, or the blocks')."""
        return self.map_d_ff or self.d_ff

    @property
    def map_num_heads(self) -> int:
        """Heads of the MAP head's attention (`map_heads`, or the blocks')."""
        return self.map_heads or self.num_heads

    @property
    def num_relative_positions(self) -> int:
        """Rows of a BEiT relative bias table: every (dy, dx) offset of the grid, and the
        class token's three slots."""
        hp, wp = self.grid
        return (2 * hp - 1) * (2 * wp - 1) + 3

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled features (the head's input)."""
        return 2 * self.d_model if self.pool == "cls_mean" else self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def num_params(self) -> int:
        """Parameter count, from the declared architecture (both implementations match it)."""
        from vit_config.arch import parameters

        return sum(p.size for p in parameters(self).values())

    # ---- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in ("image_size", "rope_ref_grid", "pos_grid", "rope_periods"):
            if isinstance(d[name], tuple):
                d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(unknown[0], d[unknown[0]], f"unknown field; known: {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ViTConfig:
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> ViTConfig:
        """A copy with `changes`; a new `pool` without `class_token` re-derives the token from
        the pooling, as construction does."""
        if "pool" in changes:
            changes.setdefault("class_token", None)
        return dataclasses.replace(self, **changes)

    def same_model(self, other: ViTConfig) -> bool:
        """The same function: equal, a square image size written as N or (N, N) alike."""
        return self.replace(image_size=self.image_hw) == other.replace(image_size=other.image_hw)

    @classmethod
    def preset(cls, name: str) -> ViTConfig:
        if name not in PRESETS:
            raise ConfigError("preset", name, f"unknown preset; known: {sorted(PRESETS)}")
        return cls(**PRESETS[name])


def _is_positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


# The ViT paper's sizes (Dosovitskiy et al. 2020, Table 1; Ti and S from Touvron et al. 2021,
# DeiT Table 1) with timm's conventions: 224 px, CLS pool, exact GELU, eps 1e-6, 1000 classes.
_PAPER = dict(image_size=224, num_classes=1000, pool="cls", activation="gelu", ln_eps=1e-6)
_B = dict(d_model=768, num_heads=12, d_ff=3072, num_layers=12)  # ViT-B
_CLIP = dict(_B, image_size=224, patch_size=16, norm_pre=True, patch_bias=False, ln_eps=1e-5)
_SIGLIP = dict(image_size=224, num_classes=0, pool="map", activation="gelu")  # timm: exact GELU
_DINOV2 = dict(image_size=518, patch_size=14, num_classes=0, layer_scale=True)
# timm's reg4 gap recipe: 4 registers and no class token, LayerScale, mean pooling into
# fc_norm, positions for the patches only
_REG4_GAP = dict(
    _PAPER,
    pool="mean",
    class_token=False,
    reg_tokens=4,
    pos_embed_tokens="none",
    layer_scale=True,
    final_norm="post_pool",
)
# DINOv3 as timm registers it (avg pool, no head): RoPE alone, half-split pairs, periods
# base 100 on centred coordinates; a class token and 4 registers, LayerScale, no qkv bias.
# DINOv3's positions in every library: RoPE alone, half-split pairs, the height's angles
# first, periods on centred coordinates (its base, rope_theta, 100 in every release)
DINOV3_POSITIONS = dict(
    pos_embed=False, rope="half", rope_axes="hw", rope_freqs="periods", rope_offset=0.0
)
_DINOV3 = dict(
    DINOV3_POSITIONS,
    image_size=256,
    patch_size=16,
    num_classes=0,
    pool="mean",
    class_token=True,
    ln_eps=1e-5,
    qkv_bias=False,
    reg_tokens=4,
    layer_scale=True,
    rope_theta=100.0,
)
# Naver RoPE-ViT B/16: RoPE alone (interleaved pairs, width angles first), LayerScale
_ROPE_VIT = dict(
    _PAPER,
    patch_size=16,
    **_B,
    layer_scale=True,
    pos_embed=False,
    rope="interleaved",
    rope_axes="wh",
)
# Perception Encoder's trunk: a learned table and RoPE (+1, width angles first), CLIP's norms
_PE = dict(
    _B,
    patch_size=16,
    class_token=True,
    ln_eps=1e-5,
    norm_pre=True,
    patch_bias=False,
    rope="interleaved",
    rope_axes="wh",
    rope_offset=1.0,
)
_EVA02 = dict(
    activation="silu",
    mlp="swiglu",
    mlp_norm=True,
    k_bias=False,
    qkv_fused=False,
    rope="interleaved",
    rope_ref_grid=(16, 16),
)
_BEIT = dict(
    pool="mean",
    class_token=True,
    k_bias=False,
    final_norm="post_pool",
    layer_scale=True,
    rel_pos_bias="block",
    pos_embed=False,
)
PRESETS: dict[str, dict[str, Any]] = {
    # The seed's toy: 4x4x3 images, P=2 (4 patches), mean pool, ReLU, flax LayerNorm eps.
    "seed": dict(
        image_size=4,
        patch_size=2,
        d_model=8,
        num_heads=2,
        d_ff=16,
        num_layers=2,
        num_classes=5,
        pool="mean",
        activation="relu",
        ln_eps=1e-6,
    ),
    "vit_ti16": dict(_PAPER, patch_size=16, d_model=192, num_heads=3, d_ff=768, num_layers=12),
    "vit_s16": dict(_PAPER, patch_size=16, d_model=384, num_heads=6, d_ff=1536, num_layers=12),
    "vit_b16": dict(_PAPER, patch_size=16, **_B),
    "vit_l16": dict(_PAPER, patch_size=16, d_model=1024, num_heads=16, d_ff=4096, num_layers=24),
    "vit_h14": dict(_PAPER, patch_size=14, d_model=1280, num_heads=16, d_ff=5120, num_layers=32),
    # The family, each equal in function and parameter count to its timm architecture
    # (weight_transfer.layouts.timm.TIMM_ARCHS).
    "clip_b16": dict(_CLIP, num_classes=1000),
    "clip_b16_quickgelu": dict(_CLIP, num_classes=512, activation="quick_gelu"),
    "siglip_b16": dict(_SIGLIP, patch_size=16, **_B),
    "siglip_b16_gap": dict(_SIGLIP, patch_size=16, **_B, pool="mean"),
    "siglip_so400m14": dict(
        _SIGLIP, patch_size=14, d_model=1152, num_heads=16, d_ff=4304, num_layers=27
    ),
    "dinov2_s14": dict(_DINOV2, d_model=384, num_heads=6, d_ff=1536, num_layers=12),
    "dinov2_b14": dict(_DINOV2, **_B),
    "dinov2_l14": dict(_DINOV2, d_model=1024, num_heads=16, d_ff=4096, num_layers=24),
    "dinov2_g14": dict(
        _DINOV2,
        d_model=1536,
        num_heads=24,
        d_ff=4096,
        num_layers=40,
        mlp="swiglu_packed",
        activation="silu",
    ),
    # timm folds the class token's position into the token (pos_embed covers patches only)
    "dinov2_b14_reg4": dict(_DINOV2, **_B, reg_tokens=4, pos_embed_tokens="none"),
    "deit_b16_distilled": dict(_PAPER, patch_size=16, **_B, dist_token=True),
    "deit3_b16": dict(_PAPER, patch_size=16, **_B, layer_scale=True, pos_embed_tokens="none"),
    "vit_medium_reg4_gap": dict(
        _REG4_GAP, image_size=256, patch_size=16, d_model=512, num_heads=8, d_ff=2048, num_layers=12
    ),
    # parallel blocks: ViT-22B's (timm's xp: RMSNorm, q/k norms, no qkv bias, norm_pre) and
    # "Three things"' two pre-norm branches per block (18 x 2)
    "vit_b16_xp": dict(
        _PAPER,
        patch_size=16,
        **_B,
        block="parallel",
        norm="rmsnorm",
        qkv_bias=False,
        qk_norm=True,
        norm_pre=True,
        patch_bias=False,
        pos_embed_tokens="none",
    ),
    "vit_s16_18x2": dict(
        _PAPER,
        patch_size=16,
        d_model=384,
        num_heads=6,
        d_ff=1536,
        num_layers=18,
        layer_scale=True,
        num_parallel=2,
    ),
    "rope_b16": dict(_ROPE_VIT, rope_theta=100.0),  # Naver RoPE-ViT, axial: theta 100
    "dinov3_s16": dict(_DINOV3, d_model=384, num_heads=6, d_ff=1536, num_layers=12),
    "dinov3_b16": dict(_DINOV3, **_B),
    "dinov3_l16": dict(_DINOV3, d_model=1024, num_heads=16, d_ff=4096, num_layers=24),
    "dinov3_hplus16": dict(
        _DINOV3,
        d_model=1280,
        num_heads=20,
        d_ff=5120,
        num_layers=32,
        mlp="swiglu",
        activation="silu",
    ),
    "pe_spatial_b16": dict(  # Perception Encoder spatial: the trunk, no head
        _PE,
        image_size=512,
        num_classes=0,
        pool="mean",
        final_norm="none",
        rope_ref_grid=(32, 32),
    ),
    # Perception Encoder core: the trunk and a MAP head with its own 8 heads reading the
    # class token too, into a 1024-wide projection
    "pe_core_b16": dict(
        _PE,
        image_size=224,
        num_classes=1024,
        pool="map",
        map_heads=8,
        pool_prefix=True,
        rope_ref_grid=(14, 14),
    ),
    # EVA-02 (timm Eva): RoPE with a learned table, q and v biases only, separate q/k/v, a
    # SwiGLU with a norm on its hidden units (the CLIP tower also one before attn.proj)
    "eva02_b14": dict(
        _B,
        image_size=224,
        patch_size=14,
        d_ff=2048,
        num_classes=0,
        pool="mean",
        class_token=True,
        final_norm="post_pool",
        **_EVA02,
    ),
    "eva02_b16_clip": dict(
        _B, image_size=224, patch_size=16, d_ff=2048, num_classes=512, attn_norm=True, **_EVA02
    ),
    # RoPE-ViT mixed: every block and head its own learned frequencies
    "rope_mixed_b16": dict(_ROPE_VIT, rope_freqs="mixed"),
    # RoPE-ViT as the sbb recipe: q and v biases only, one register, no class token, avg pool
    "rope_reg1_gap_b16": dict(
        _PAPER,
        image_size=256,
        patch_size=16,
        **_B,
        pool="mean",
        class_token=False,
        reg_tokens=1,
        k_bias=False,
        final_norm="post_pool",
        layer_scale=True,
        pos_embed=False,
        rope="interleaved",
        rope_ref_grid=(16, 16),
    ),
    # NaFlexVit (timm naflexvit): a 16 x 16 learned table for the patches alone, resampled in
    # every forward to the image's grid (bicubic, antialiased); 4 registers and no class
    # token, LayerScale, mean pooling into fc_norm
    "naflex_b16": dict(_REG4_GAP, image_size=384, patch_size=16, **_B, pos_grid=(16, 16)),
    # BEiT (timm Beit): a relative bias table per block and no absolute table, q and v
    # biases only, LayerScale, mean pooling into fc_norm
    "beit_b16": dict(_PAPER, patch_size=16, **_B, **_BEIT),
    "beitv2_b16": dict(_PAPER, patch_size=16, **_B, **_BEIT),
    # timm relpos: each block's biases computed by a log-coordinate MLP, no absolute table, no
    # class token, no qkv bias, LayerScale, mean pooling into fc_norm
    "relpos_b16": dict(
        _PAPER,
        patch_size=16,
        **_B,
        pool="mean",
        class_token=False,
        qkv_bias=False,
        final_norm="post_pool",
        layer_scale=True,
        rel_pos_bias="block",
        rel_pos_form="mlp",
        pos_embed=False,
    ),
    "aimv2_l14": dict(
        image_size=224,
        patch_size=14,
        d_model=1024,
        num_heads=8,
        d_ff=2816,
        num_layers=24,
        num_classes=0,
        pool="mean",
        norm="rmsnorm",
        ln_eps=1e-5,
        mlp="swiglu",
        activation="silu",
        patch_norm=True,
        qkv_bias=False,
        proj_bias=False,
        mlp_bias=False,
    ),
}


MAX_DYNAMIC_PATCHES = 1 << 16  # a 4096 x 4096 image at patch 16: far beyond any ViT's use


class ImageShapeError(VitParityError):
    """An image batch whose rank, channels or size does not fit the model's config."""


def first_image(out, keep: bool):
    """A forward's result for the first (only) image of a batch: logits (B, K) -> (K,) and,
    with `keep`, its intermediates (logits, {name: (B, ...)}) likewise."""
    return (out[0][0], {k: v[0] for k, v in out[1].items()}) if keep else out[0]


def check_image_shape(
    shape: tuple[int, ...], config: ViTConfig, layout: str, *, dynamic: bool = False
) -> bool:
    """Validate an image shape in `layout` ("NHWC" or "NCHW"); return True when batched.
    `dynamic`: any size whose sides are positive multiples of the patch (at most
    `MAX_DYNAMIC_PATCHES` patches), instead of `config.image_size`."""
    shape = tuple(shape)
    if len(shape) not in (3, 4):
        raise ImageShapeError(
            f"expected a {layout[1:]} image or a {layout} batch (rank 3 or 4), "
            f"got shape {shape} (rank {len(shape)})"
        )
    names = layout if len(shape) == 4 else layout[1:]
    dims = dict(zip(names, shape, strict=True))
    if dims["C"] != config.in_channels:
        raise ImageShapeError(
            f"expected C={config.in_channels} in {names} layout, got shape "
            f"{shape} with C={dims['C']}"
        )
    hw, p = (dims["H"], dims["W"]), config.patch_size
    if dynamic:
        if not all(side > 0 and side % p == 0 for side in hw):
            raise ImageShapeError(
                f"expected H and W to be positive multiples of the patch size {p} (dynamic "
                f"image size), got shape {shape} with H, W = {hw}"
            )
        if (hw[0] // p) * (hw[1] // p) > MAX_DYNAMIC_PATCHES:
            raise ImageShapeError(
                f"H, W = {hw}: {(hw[0] // p) * (hw[1] // p):,} patches, more than "
                f"{MAX_DYNAMIC_PATCHES:,} (the position table would be resampled to them)"
            )
        return len(shape) == 4
    if hw != config.image_hw:
        raise ImageShapeError(
            f"expected H, W = {config.image_hw} in {names} layout "
            f"(config.image_size), got shape {shape} with H, W = "
            f"{(dims['H'], dims['W'])}"
        )
    return len(shape) == 4
