"""The layouts the ecosystem publishes, one module per publisher, and the registry over them.

| module        | layouts                                                              |
|---------------|----------------------------------------------------------------------|
| `ours`        | `nnx` (`jax_impl.ViT` flat state), `torch` (`torch_impl.ViT` state dict) |
| `orbax`       | `orbax`: our NNX state as an Orbax checkpoint                        |
| `timm`        | `timm`: `VisionTransformer` state dicts and Hub folders               |
| `huggingface` | `hf`, `hf5`, `hf_deit`, `hf_dinov2`, `hf_dinov3`, `hf_aimv2`, `hf_beit`,     |
|               | `hf_clip`, `hf_siglip`                                               |
| `hf_flax`     | `hf_flax`, `hf_flax_clip`, `hf_flax_dinov2`: transformers 4.x's Flax classes |
| `open_clip`   | `open_clip`: `visual.*` image towers; `open_clip_timm`: `visual.trunk.*` |
| `npz`         | `google_vit`, `big_vision` (`big_vision_bv`, its earlier name, an alias) |
| `nnx_libraries` | `bonsai_vit`, `jimm_vit`, `jimm_clip`, `jimm_siglip`: other NNX ViT    |
|               | libraries' states                                                    |
| `dinov3`      | `dinov3`: the original DINOv3 release (facebookresearch/dinov3)       |
| `perception`  | `pe`: the Perception Encoder release (facebookresearch/perception_models) |
| `eva`         | `eva02`: the EVA-02 release (baaivision/EVA)                          |

Each publisher's module holds everything the tool knows of it: its tables (over one of our
two base layouts; `core.table.nnx_torch` links those), its `Layout` entries, its config.json
reader and writer, its architecture reader, its normaliser and the layer diff's hook points
on its models. A new publisher is one module here and one name in `PUBLISHERS`; detection,
`--from`/`--to` choices, the writable list and the tests iterate the registry.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable

from weight_transfer.core.errors import LayoutError
from weight_transfer.layouts.base import Layout

# The publishers, in the order their layouts are listed (detection goes by `Layout.priority`).
PUBLISHERS = (
    "ours",
    "orbax",
    "timm",
    "huggingface",
    "hf_flax",
    "open_clip",
    "npz",
    "nnx_libraries",
    "dinov3",
    "perception",
    "eva",
)
MODULES = tuple(importlib.import_module(f"{__name__}.{name}") for name in PUBLISHERS)

LAYOUTS: dict[str, Layout] = {
    layout.name: layout for module in MODULES for layout in module.LAYOUTS
}
ALIASES = {alias: l.name for l in LAYOUTS.values() for alias in l.aliases}

WRITABLE = tuple(name for name, l in LAYOUTS.items() if l.writable)


def get_layout(name: str) -> Layout:
    if name in ALIASES:
        return LAYOUTS[ALIASES[name]]
    if name not in LAYOUTS:
        raise LayoutError(f"unknown layout {name!r}; known: {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


def detect_layout(keys: Iterable[str], container: str | None = None) -> Layout:
    """The layout whose marker the keys carry, higher `priority` first (hf5 shares a marker
    with hf); every layout in `LAYOUTS` is tried. Keys in an Orbax folder (`container`
    "orbax") are tried as the Orbax layout (our NNX state) first, which only such a folder can
    hold; a tree of another layout's names may be saved there too."""
    keys = list(keys)
    # an Orbax folder is first our NNX state (the orbax layout), then any other layout's tree
    first = [l for l in LAYOUTS.values() if l.container == "orbax" and container == "orbax"]
    rest = sorted(
        (l for l in LAYOUTS.values() if l.container != "orbax"), key=lambda l: -l.priority
    )
    for layout in first + rest:
        if any(re.search(layout.marker, k) for k in keys):
            return layout
    sample = ", ".join(sorted(keys)[:5]) or "(no tensors)"
    raise LayoutError(
        f"cannot tell the layout from the keys (first: {sample}); known layouts: "
        f"{', '.join(LAYOUTS)}; pass layout=... (--from) to say which"
    )


def diff_points(model):
    """(a description, `hook_points(model)`: the layer diff's hook points) for a model of a
    publisher that declares them (`diff_points` in its module); None for anyone else's."""
    for module in MODULES:
        points = getattr(module, "diff_points", None)
        found = points(model) if points is not None else None
        if found is not None:
            return found
    return None


__all__ = [
    "ALIASES",
    "LAYOUTS",
    "Layout",
    "MODULES",
    "PUBLISHERS",
    "WRITABLE",
    "detect_layout",
    "diff_points",
    "get_layout",
]
