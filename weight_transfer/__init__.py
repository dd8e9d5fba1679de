"""The weight bridge between `jax_impl.ViT` and `torch_impl.ViT`, and the tools built on it.

Names are imported on first use, so `vit-parity --help` does not pay for JAX and PyTorch.
"""

import importlib

_EXPORTS = {
    "weight_transfer.bridge": [
        "nchw_to_nhwc", "nhwc_to_nchw", "nnx_flat", "nnx_from_flat", "nnx_state_to_state_dict",
        "nnx_to_torch_flat", "state_dict_to_nnx_state", "to_nnx", "to_torch", "torch_flat",
        "torch_from_state_dict", "torch_to_nnx_flat", "stack_layers", "unstack_layers",
        "nnx_loop_flat"],
    "weight_transfer.table": ["Rule", "nnx_torch"],
    "weight_transfer.transforms": ["Transform"],
    "weight_transfer.errors": ["CheckpointError", "LayoutError", "NonFiniteError",
                               "TransferError"],
    "weight_transfer.layouts": ["LAYOUTS"],
    "weight_transfer.porting": ["convert", "inspect_checkpoint", "load_checkpoint",
                                "save_checkpoint"],
    "vit_config": ["VitParityError"],
}
# Submodules are attributes too (`weight_transfer.doctor.diagnose(...)`), imported on first use.
_SUBMODULES = ("adapters", "bridge", "checkpoint", "cli", "conversion", "doctor", "errors",
               "fileio", "inference", "layouts", "metrics", "npz_io", "numpy_ref", "parity",
               "porting", "resample", "runners", "safetensors_io", "sharding", "table",
               "training", "transforms", "weights", "writers")
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"weight_transfer.{name}")
    if name not in _WHERE:
        raise AttributeError(f"module 'weight_transfer' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__ + list(_SUBMODULES)
