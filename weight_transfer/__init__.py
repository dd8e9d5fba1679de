"""The weight bridge between `jax_impl.ViT` and `torch_impl.ViT`, and the tools built on it."""

from weight_transfer.bridge import (
    nchw_to_nhwc,
    nhwc_to_nchw,
    nnx_flat,
    nnx_from_flat,
    nnx_state_to_state_dict,
    nnx_to_torch_flat,
    state_dict_to_nnx_state,
    to_nnx,
    to_torch,
    torch_flat,
    torch_from_state_dict,
    torch_to_nnx_flat,
)
from weight_transfer.table import NNX_TORCH, Rule, TransferError
from weight_transfer.transforms import Transform

__all__ = [
    "NNX_TORCH", "Rule", "TransferError", "Transform", "nchw_to_nhwc", "nhwc_to_nchw", "nnx_flat",
    "nnx_from_flat", "nnx_state_to_state_dict", "nnx_to_torch_flat", "state_dict_to_nnx_state",
    "to_nnx", "to_torch", "torch_flat", "torch_from_state_dict", "torch_to_nnx_flat",
]
from weight_transfer.checkpoint import CheckpointError  # noqa: E402
from weight_transfer.layouts import LAYOUTS, LayoutError  # noqa: E402
from weight_transfer.porting import (  # noqa: E402
    NonFiniteError,
    convert,
    inspect_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

__all__ += ["LAYOUTS", "CheckpointError", "LayoutError", "NonFiniteError", "convert",
            "inspect_checkpoint", "load_checkpoint", "save_checkpoint"]
