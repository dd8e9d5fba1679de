"""Helpers shared by test modules (test modules never import each other)."""

from __future__ import annotations

import numpy as np
import torch


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(f"u{a.dtype.itemsize}")


def assert_bit_exact(before: dict, after: dict):
    assert sorted(before) == sorted(after)
    for key in before:
        assert before[key].dtype == after[key].dtype, key
        assert before[key].shape == after[key].shape, key
        np.testing.assert_array_equal(bits(before[key]), bits(after[key]), err_msg=key)


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter of a third-party torch model drawn at random (no default inits)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(
                torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5 if p.ndim > 1 else 0.5)
            )
    return module.eval()


def nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def from_timm(state: dict, config, to: str = "nnx"):
    """timm-layout tensors (a state dict) as our model of `config` ("nnx" or "torch"),
    through the timm layout's table: the conversion a user's file goes through."""
    import weight_transfer as wt
    from weight_transfer.core.table import meta_of
    from weight_transfer.layouts import LAYOUTS
    from weight_transfer.porting.conversion import plan_conversion

    flat = {k: v.detach().numpy() if hasattr(v, "detach") else v for k, v in state.items()}
    plan = plan_conversion(meta_of(flat), LAYOUTS["timm"], LAYOUTS[to], config)
    ported = dict(plan.run(flat.items()))
    if to == "nnx":
        return wt.nnx_from_flat(ported, config)
    return wt.torch_from_state_dict(
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in ported.items()}, config
    )
