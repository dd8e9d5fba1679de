"""The weight bridge between `jax_impl.ViT` and `torch_impl.ViT`, and the tools built on it.

Packages, each importing only those before it (`docs/internals.md` has the map):

    core         the rules engine and transforms, errors, resampling         no framework
    formats      safetensors, npz, Orbax, torch pickles; atomic outputs       no framework
    layouts      one module per publisher (timm, huggingface, open_clip,      no framework
                 npz, orbax, ours) and the registry over them
    porting      read -> identify -> plan -> stream -> write: the port API     no framework
    frameworks   NNX and torch models from and to flat arrays, sharding,      JAX, torch
                 runners, random weights
    diagnostics  parity, the layer diff, the doctor, training, the NumPy      JAX, torch
                 reference
    testing      anyone's port checked: compare_models, assert_equivalent,    JAX, torch
                 compare_grads, the pytest plugin
    cli          the command line

Names are imported on first use, so `vit-parity --help` does not pay for JAX and PyTorch. Every
module of `core`, `formats`, `porting`, `frameworks` and `diagnostics` is also reachable by its
own name, as before the packages (`weight_transfer.doctor`, `import weight_transfer.bridge`):
the list is derived from the folders, not kept by hand.
"""

import importlib
import importlib.abc
import importlib.util
import pkgutil
import sys
from pathlib import Path

_EXPORTS = {
    "weight_transfer.frameworks.bridge": [
        "nchw_to_nhwc",
        "nhwc_to_nchw",
        "nnx_flat",
        "nnx_from_flat",
        "nnx_state_to_state_dict",
        "nnx_to_torch_flat",
        "state_dict_to_nnx_state",
        "to_nnx",
        "to_torch",
        "torch_flat",
        "torch_from_state_dict",
        "torch_to_nnx_flat",
        "stack_layers",
        "unstack_layers",
        "nnx_loop_flat",
    ],
    "weight_transfer.core.table": ["Rule", "nnx_torch"],
    "weight_transfer.core.transforms": ["Transform"],
    "weight_transfer.core.errors": [
        "CheckpointError",
        "LayoutError",
        "NonFiniteError",
        "TransferError",
    ],
    "weight_transfer.layouts": ["LAYOUTS"],
    "weight_transfer.porting.options": ["PortOptions"],
    "weight_transfer.porting": [
        "convert",
        "inspect_checkpoint",
        "load_checkpoint",
        "save_checkpoint",
    ],
    "vit_config": ["VitParityError"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)

# Packages whose modules are also reachable by their own name; a publisher's module is reached
# through the registry's package (`weight_transfer.layouts.timm`).
_FLAT_PACKAGES = ("core", "formats", "porting", "frameworks", "diagnostics")


def _modules() -> dict[str, str]:
    """{short name: dotted module}: the packages, the top-level modules, and every module of
    `_FLAT_PACKAGES` by its own name (read from the folders; nothing is imported)."""
    here = Path(__file__).parent
    found = {
        m.name: f"{__name__}.{m.name}"
        for m in pkgutil.iter_modules([str(here)])
        if m.name != "__main__"
    }
    for package in _FLAT_PACKAGES:
        for m in pkgutil.iter_modules([str(here / package)]):
            found.setdefault(m.name, f"{__name__}.{package}.{m.name}")
    return found


SUBMODULES = _modules()


class _ShortNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import weight_transfer.bridge` gives the module `weight_transfer.frameworks.bridge`
    (the same object, not a copy)."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package == __name__ and SUBMODULES.get(name, fullname) != fullname:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(SUBMODULES[spec.name.rpartition(".")[2]])

    def exec_module(self, module):
        pass  # the real module ran when it was imported


if not any(isinstance(f, _ShortNames) for f in sys.meta_path):
    sys.meta_path.append(_ShortNames())


def __getattr__(name: str):
    if name in SUBMODULES:
        return importlib.import_module(SUBMODULES[name])
    if name not in _WHERE:
        raise AttributeError(f"module 'weight_transfer' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__ + sorted(SUBMODULES)
