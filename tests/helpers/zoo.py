"""The timm zoos' shared steps: build an architecture small with random weights, save it as
timm users do, load it back through vit-parity, judge it against timm's own forward."""

from __future__ import annotations

import warnings

import numpy as np
import timm
import torch

import weight_transfer as wt
from tests.conftest import TOL
from tests.helpers.models import nchw, randomize
from vit_config import VitParityError
from weight_transfer.frameworks.runners import run_nnx, run_torch


def small_timm(arch: str):
    """(model, model_args) of `arch` with 2 blocks and a 4 x 4 patch grid, or None if timm
    itself cannot build it that way."""
    with torch.device("meta"):
        default = timm.create_model(arch, pretrained=False)
    embed = getattr(default, "patch_embed", None) or getattr(default, "embeds", None)
    patch = embed.patch_size[0] if isinstance(embed.patch_size, (tuple, list)) else embed.patch_size
    args = dict(depth=2, img_size=4 * patch)
    try:
        model = timm.create_model(arch, pretrained=False, **args)
    except Exception:  # timm's own limits (fixed sizes, naflex...): not ours to judge
        return None
    return randomize(model, seed=len(arch)), args


def outcome(arch: str, model, args: dict, folder, hub: bool = True) -> str:
    """'ported', 'refused: ...', or 'WRONG ...' / 'CRASH ...' (never acceptable)."""
    from safetensors.torch import save_file
    from timm.models import save_for_hf

    size, channels = args["img_size"], model.pretrained_cfg.get("input_size", (3,))[0]
    images = np.random.default_rng(0).standard_normal((2, size, size, channels)).astype(np.float32)
    with torch.no_grad():
        expected = model(nchw(images))
    expected = getattr(expected, "logits", expected)
    bare = folder / f"{arch}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(bare))
    forms = {
        "state dict + arch": (
            bare,
            dict(arch=arch, overrides={"num_layers": 2, "image_size": args["img_size"]}),
        ),
    }
    if hub:
        save_for_hf(model, str(folder / arch), safe_serialization=True)
        forms["Hub folder"] = (folder / arch, {})
    for form, (path, hints) in forms.items():
        for framework in ("jax", "torch"):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ours = wt.load_checkpoint(path, framework, **hints)
            except VitParityError as e:
                return f"refused ({form}): {str(e).splitlines()[0][:150]}"
            except Exception as e:  # a crash: the worst kind of refusal
                return f"CRASH ({form}, {framework}): {type(e).__name__}: {e}"
            got = run_nnx(ours, images) if framework == "jax" else run_torch(ours, images)
            got = np.asarray(got, np.float64)
            want = expected.numpy().astype(np.float64)
            if got.shape != want.shape:
                return f"WRONG ({form}, {framework}): shape {got.shape} vs {want.shape}"
            gap = float(np.abs(got - want).max())
            if gap > TOL["float32"] * max(1.0, float(np.abs(want).max())):
                return f"WRONG ({form}, {framework}): max |diff| {gap:.3e}"
    return "ported"


def run_zoo(archs, tmp_path, hub: bool = True) -> dict[str, str]:
    """{architecture: outcome} over `archs`, one on disk at a time (`hub`: the
    `save_for_hf` folder too, beside the bare state dict)."""
    import shutil

    table = {}
    for arch in archs:
        built = small_timm(arch)
        folder = tmp_path / arch
        folder.mkdir()
        table[arch] = (
            "timm cannot build it small" if built is None else outcome(arch, *built, folder, hub)
        )
        shutil.rmtree(folder)  # up to ~1 GB per giant architecture: the disk holds one at a time
    return table


def summary(name: str, table: dict[str, str]) -> tuple[list[str], list[str], dict[str, str]]:
    """(buildable, ported, bad) and the table printed."""
    buildable = [a for a, r in table.items() if r != "timm cannot build it small"]
    ported = [a for a in buildable if table[a] == "ported"]
    bad = {a: r for a, r in table.items() if r.startswith(("WRONG", "CRASH"))}
    print(
        f"\n{name}: {len(table)} architectures, {len(buildable)} buildable small, "
        f"{len(ported)} ported both ways ({len(ported) / max(1, len(buildable)):.0%})"
    )
    for arch, result in table.items():
        print(f"  {arch:55s} {result}")
    return buildable, ported, bad
