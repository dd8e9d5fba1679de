"""How each library resamples a position table to another grid (`Resampling`): declared here,
once, for the layouts (each publisher's default) and the models' dynamic image sizes. The maths
is `vit_config.resample`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from vit_config import ArgumentError
from vit_config.resample import INTERPOLATIONS


@dataclass(frozen=True)
class Resampling:
    """How a position table is resampled to a new grid, and whose code does it that way."""

    interpolation: str = "bicubic"
    antialias: bool = False
    origin: str = ""  # the loader or forward that resamples this way

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise ArgumentError(
                f"interpolation {self.interpolation!r}: expected one of {INTERPOLATIONS}"
            )
        if not isinstance(self.antialias, bool):
            raise ArgumentError(f"antialias {self.antialias!r}: expected a bool")

    def describe(self) -> str:
        how = f"{self.interpolation}{', antialiased' if self.antialias else ''}"
        return f"{how} ({self.origin})" if self.origin else how

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d) -> Resampling:
        if not isinstance(d, dict) or set(d) - {"interpolation", "antialias", "origin"}:
            raise ArgumentError(f"resampling {d!r}: expected interpolation, antialias, origin")
        return cls(**d)

    def stated(self, interpolation: str | None, antialias: bool | None) -> Resampling:
        """This method with what the user stated on top (None: keep this one's)."""
        if interpolation is None and antialias is None:
            return self
        return Resampling(
            self.interpolation if interpolation is None else interpolation,
            self.antialias if antialias is None else antialias,
            "stated",
        )


# Each library's own, as its loader or forward calls it (read from the installed sources).
TIMM = Resampling(
    "bicubic",
    True,
    "timm's resample_abs_pos_embed, as checkpoint_filter_fn and dynamic_img_size call it",
)

HF = Resampling(
    "bicubic", False, "transformers' interpolate_pos_encoding (ViT, DeiT, CLIP, SigLIP, DINOv2)"
)

HF_DINOV2_REGISTERS = Resampling(
    "bicubic", True, "transformers' Dinov2WithRegisters interpolate_pos_encoding"
)

OPEN_CLIP = Resampling("bicubic", True, "open_clip's resize_pos_embed")

BIG_VISION = Resampling(
    "big_vision",
    False,
    "big_vision's and vision_transformer's resample_posemb: scipy.ndimage.zoom(order=1)",
)

OURS = Resampling("bicubic", False, "vit-parity's default, for a file that names no origin")
