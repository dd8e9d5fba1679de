"""The torch side of the bridge, importing neither JAX nor flax: torch tensors <-> NumPy
(bit-exact, bfloat16 through its 16-bit pattern) and `torch_impl.ViT` from a state dict."""

from __future__ import annotations

from collections.abc import Mapping

import ml_dtypes
import numpy as np
import torch

import torch_impl
from vit_config import ViTConfig
from weight_transfer.formats.memory import empty_aligned, to_contiguous

Flat = dict[str, np.ndarray]


def torch_to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def numpy_to_torch(a: np.ndarray, *, share: bool = False) -> torch.Tensor:
    """A tensor holding a copy of `a` (64-byte aligned, as torch allocates); with `share`, `a`'s
    own buffer when it is writable and contiguous (for fresh arrays nobody else holds)."""
    if not (share and a.flags.writeable and a.flags.c_contiguous):
        a = to_contiguous(a, out=empty_aligned(a.shape, a.dtype))
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def torch_flat(state_dict_or_model: Mapping[str, torch.Tensor] | torch.nn.Module) -> Flat:
    sd = state_dict_or_model
    if isinstance(sd, torch.nn.Module):
        sd = sd.state_dict()
    return {k: torch_to_numpy(v) for k, v in sd.items()}


def torch_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: ViTConfig
) -> torch_impl.ViT:
    """Build a `torch_impl.ViT` holding exactly these tensors (no init, no second copy)."""
    with torch.device("meta"):
        model = torch_impl.ViT(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


def torch_astype(model: torch_impl.ViT, dtype: torch.dtype) -> torch_impl.ViT:
    """A copy of `model` in `dtype`, built on the meta device and filled one cast tensor at a
    time (no float32 copy of the whole model on the way, as `deepcopy(model).double()` makes)."""
    out = torch_from_state_dict(
        {k: v.detach().to(dtype) for k, v in model.state_dict().items()}, model.config
    )
    return same_image_sizes(out, model)


def same_image_sizes(model, like):
    """`model` (either framework's), taking the image sizes `like` takes (dynamic or not, and
    resampled alike)."""
    model.set_dynamic_image_size(like.dynamic_image_size, like)
    return model
