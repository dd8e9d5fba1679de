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
from weight_transfer.layouts.timm import config_from_timm


def zoo_args(arch: str) -> dict:
    """The zoo's size: 2 blocks and a 4 x 4 patch grid."""
    try:  # the port's own reading of timm's model, remembered for the load to come
        patch = config_from_timm(arch).patch_size
    except VitParityError:
        with torch.device("meta"):
            default = timm.create_model(arch, pretrained=False)
        embed = getattr(default, "patch_embed", None) or getattr(default, "embeds", None)
        size = embed.patch_size
        patch = size[0] if isinstance(size, (tuple, list)) else size
    return dict(depth=2, img_size=4 * patch)


def small_timm(arch: str, args: dict):
    """(model, args) of `arch` built at `args` with every parameter random, or None if timm
    itself cannot build it that way."""
    try:
        model = _create(arch, args)
    except Exception:  # timm's own limits (fixed sizes, naflex...): not ours to judge
        return None
    return randomize(model, seed=len(arch)), args


def _create(arch: str, args: dict):
    """timm's model, its weight initialisers skipped where its class allows (every parameter is
    drawn again by `randomize`, or the build is on the meta device)."""
    try:
        return timm.create_model(arch, pretrained=False, weight_init="skip", **args)
    except Exception:  # a class without the option: built as timm builds it by default
        return timm.create_model(arch, pretrained=False, **args)


def twin_key(arch: str, args: dict):
    """What makes two architectures one case at the zoo's size: timm's class and every
    state-dict name and shape (built on the meta device), and both configs vit-parity reads
    for it (the Hub folder's, built with `args`; the state dict's, the registered model with
    the two sizes stated); None when any cannot be had (the architecture is then run on its
    own, and refused on its own if it is)."""
    try:
        with torch.device("meta"):
            model = _create(arch, args)
        built = config_from_timm(arch, args)
        stated = config_from_timm(arch).replace(num_layers=2, image_size=args["img_size"])
    except Exception:
        return None
    shapes = tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())
    return type(model).__name__, shapes, repr(built), repr(stated)


def outcome(arch: str, model, args: dict, folder, hub: bool = True) -> str:
    """'ported', 'refused: ...', or 'WRONG ...' / 'CRASH ...' (never acceptable).

    The bare state dict (with `arch=`) goes the whole load path into both frameworks and is
    judged against timm's forward. The Hub folder (no hints) is judged against the state
    dict's port: the same config and, tensor by tensor, the same bits for the models to be
    built from (what both frameworks compute is then the state dict's, already judged); its
    models are not built again (the zoo's time is the suite's)."""
    from safetensors.torch import save_file
    from timm.models import save_for_hf

    size, channels = args["img_size"], model.pretrained_cfg.get("input_size", (3,))[0]
    images = np.random.default_rng(0).standard_normal((2, size, size, channels)).astype(np.float32)
    with torch.no_grad():
        expected = model(nchw(images))
    expected = getattr(expected, "logits", expected)
    bare = folder / f"{arch}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(bare))
    stated = dict(arch=arch, overrides={"num_layers": 2, "image_size": args["img_size"]})
    for framework in ("jax", "torch"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ours = wt.load_checkpoint(bare, framework, **stated)
        except VitParityError as e:
            return f"refused (state dict + arch): {str(e).splitlines()[0][:150]}"
        except Exception as e:  # a crash: the worst kind of refusal
            return f"CRASH (state dict + arch, {framework}): {type(e).__name__}: {e}"
        got = run_nnx(ours, images) if framework == "jax" else run_torch(ours, images)
        got = np.asarray(got, np.float64)
        want = expected.numpy().astype(np.float64)
        if got.shape != want.shape:
            return f"WRONG (state dict + arch, {framework}): shape {got.shape} vs {want.shape}"
        gap = float(np.abs(got - want).max())
        if gap > TOL["float32"] * max(1.0, float(np.abs(want).max())):
            return f"WRONG (state dict + arch, {framework}): max |diff| {gap:.3e}"
    if not hub:
        return "ported"
    save_for_hf(model, str(folder / arch), safe_serialization=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            port = _ported(folder / arch, {})
    except VitParityError as e:
        return f"refused (Hub folder): {str(e).splitlines()[0][:150]}"
    except Exception as e:
        return f"CRASH (Hub folder): {type(e).__name__}: {e}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        judged = _ported(bare, stated)
    if not port[0].same_model(judged[0]):
        theirs, ours = port[0].to_dict(), judged[0].to_dict()
        fields = {k: (v, ours.get(k)) for k, v in theirs.items() if v != ours.get(k)}
        return f"WRONG (Hub folder): config fields {fields} differ from the state dict's port"
    for name, value in judged[1].items():
        if name not in port[1] or not _same_bits(port[1][name], value):
            return f"WRONG (Hub folder): {name} differs from the state dict's port"
    return "ported"


def _ported(path, hints: dict):
    """(config, {name: array}) of the models `path` builds (the torch layout's tensors: the
    JAX model is built from the same plan but for the transforms between the two layouts)."""
    from weight_transfer.layouts import LAYOUTS
    from weight_transfer.porting import PortOptions, prepare

    p = prepare(path, LAYOUTS["torch"], PortOptions.of(None, **hints))
    return p.config, dict(p.plan.run(p.source.items(p.plan.inputs)))


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def run_zoo(archs, tmp_path, hub: bool = True) -> tuple[dict[str, str], dict[str, str]]:
    """({architecture: outcome}, {twin: its representative}) over `archs`, one on disk at a
    time (`hub`: the `save_for_hf` folder too, beside the bare state dict). Architectures that
    timm builds identically at the zoo's size (`twin_key`: e.g. `vit_base_patch16_224` and
    `_384`, whose only difference, the image size, the zoo sets) are one case: the first is
    ported and judged against timm, the others take its outcome."""
    import shutil

    table: dict[str, str] = {}
    twins: dict[str, str] = {}
    first: dict[tuple, str] = {}
    for arch in archs:
        args = zoo_args(arch)
        key = twin_key(arch, args)
        if key is not None and key in first:
            twins[arch] = first[key]
            table[arch] = table[first[key]]
            continue
        if key is not None:
            first[key] = arch
        built = small_timm(arch, args)
        folder = tmp_path / arch
        folder.mkdir()
        table[arch] = (
            "timm cannot build it small" if built is None else outcome(arch, *built, folder, hub)
        )
        shutil.rmtree(folder)  # up to ~1 GB per giant architecture: the disk holds one at a time
    return table, twins


def summary(
    name: str, table: dict[str, str], twins: dict[str, str]
) -> tuple[list[str], list[str], dict[str, str]]:
    """(buildable, ported, bad) and the table printed (a twin with its representative)."""
    buildable = [a for a, r in table.items() if r != "timm cannot build it small"]
    ported = [a for a in buildable if table[a] == "ported"]
    bad = {a: r for a, r in table.items() if r.startswith(("WRONG", "CRASH"))}
    print(
        f"\n{name}: {len(table)} architectures, {len(buildable)} buildable small, "
        f"{len(ported)} ported both ways ({len(ported) / max(1, len(buildable)):.0%}); "
        f"{len(table) - len(twins)} run, {len(twins)} built identically to one run"
    )
    for arch, result in table.items():
        print(f"  {arch:55s} {result}" + (f" (as {twins[arch]})" if arch in twins else ""))
    return buildable, ported, bad
