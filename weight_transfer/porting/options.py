"""What a port may be told beyond the file: one object, built once (by the CLI from its flags,
or by the API from its keyword arguments) and threaded from the caller to the plan."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vit_config import ArgumentError, ViTConfig


@dataclass(frozen=True)
class PortOptions:
    """Every option of `load_checkpoint`, `convert`, `inspect_checkpoint` and `prepare`."""

    layout: str | None = None  # the source's layout (`--from`), when detection should not decide
    arch: str | None = None  # a timm architecture or open_clip model name (`--arch`)
    config: ViTConfig | None = None  # the whole config, replacing what is inferred
    overrides: Mapping[str, Any] | None = None  # fields the file cannot say (`--set`)
    image_size: int | tuple[int, int] | None = None  # resample the positions to this size
    interpolation: str | None = None  # resampling method (None: the source library's own)
    antialias: bool | None = None  # (None: as the source library does)
    dtype: str | None = None  # cast every weight ("float32", "bfloat16", ...)
    allow_pickle: bool = False  # read torch .bin/.pth (weights_only=True) when asked
    allow_nonfinite: bool = False  # accept NaN/Inf weights

    @classmethod
    def of(cls, options: PortOptions | None = None, **fields: Any) -> PortOptions:
        """`options` (default: none set) with `fields` on top; an unknown name is refused."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ArgumentError(f"unknown option {unknown[0]!r}; known: {', '.join(sorted(known))}")
        return dataclasses.replace(options or cls(), **fields)
