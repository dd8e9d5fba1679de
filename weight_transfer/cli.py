"""The `vit-parity` command line (also `python -m weight_transfer`).

Exit codes: 0 success, 1 a parity failure, 2 bad input (one message on stderr, no traceback),
128 + N when stopped by signal N; 3 for a bug (traceback shown).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from dataclasses import asdict

from vit_config import PRESETS, ArgumentError, ViTConfig, VitParityError

PROG = "vit-parity"
DEFAULT_PRESET = "vit_b16"


class UsageError(ArgumentError):
    """Bad input from the command line: reported in one line with exit code 2."""


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    cells = [[title for _, title in columns]] + [[_fmt(r[k]) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "ok" if v else "FAIL"
    if isinstance(v, float):
        return f"{v:.3e}"
    return str(v)


def _image_size(text: str | None):
    if text is None:
        return None
    parts = text.lower().replace(",", "x").split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise UsageError(f"--image-size {text!r}: expected N or HxW, e.g. 384 or 384x256") from None
    if len(sizes) not in (1, 2):
        raise UsageError(f"--image-size {text!r}: expected N or HxW")
    return sizes[0] if len(sizes) == 1 else tuple(sizes)


def _overrides(assignments: list[str] | None) -> dict:
    """`--set FIELD=VALUE` (repeatable) -> {field: value}: VALUE is JSON (12, 1e-5, true,
    "gelu") or a bare word ("gelu"); `image_size` also takes N or HxW."""
    out = {}
    for text in assignments or []:
        field, sep, value = text.partition("=")
        if not sep or not field:
            raise UsageError(f"--set {text!r}: expected FIELD=VALUE, e.g. num_heads=16")
        if field == "image_size":
            out[field] = _image_size(value)
            continue
        try:
            out[field] = json.loads(value)
        except json.JSONDecodeError:
            out[field] = value  # a bare word: a string
    return out


def port_options(args: argparse.Namespace):
    """The `PortOptions` the flags a command has state (every command that reads a checkpoint
    has the source options; convert adds resampling, dtype and NaN/Inf)."""
    from weight_transfer.porting.options import PortOptions

    flags = vars(args)
    return PortOptions(
        layout=args.layout,
        arch=args.arch,
        overrides=_overrides(args.set),
        allow_pickle=args.allow_pickle,
        image_size=_image_size(flags.get("image_size")),
        interpolation=flags.get("interpolation"),
        antialias=flags.get("antialias"),
        dtype=flags.get("dtype") if args.command == "convert" else None,
        allow_nonfinite=flags.get("allow_nonfinite", False),
    )


def _print_json(data, *, precision: bool = False) -> None:
    """`data` as JSON; with `precision`, the precision context the comparison ran in too."""
    if precision:
        from weight_transfer.frameworks.runners import comparison_context

        data = {**data, "precision": comparison_context()}
    print(json.dumps(data, indent=2, default=str))


def cmd_check(args: argparse.Namespace) -> int:
    _check_batch(args.batch)  # before the frameworks are imported
    if args.checkpoint is None:
        config = ViTConfig.preset(args.preset)
        if args.layers is not None:
            config = config.replace(num_layers=args.layers)
        _check_batch(args.batch, config)
    from weight_transfer.diagnostics import parity

    loaded = None  # the checkpoint in both frameworks, reused by --grads
    if args.checkpoint:
        from weight_transfer.frameworks.runners import x64_for
        from weight_transfer.porting import checkpoint_dtypes, load_checkpoint

        options = port_options(args)
        stored = checkpoint_dtypes(args.checkpoint, allow_pickle=args.allow_pickle)
        # float64 weights are checked in float64 (x64 on, for this command only); anything
        # else (float16, bfloat16, mixed) in float32, which holds them exactly.
        dtype = "float64" if stored == {"float64"} else "float32"
        if stored - {dtype}:
            print(
                f"{PROG}: note: weights stored as {', '.join(sorted(stored))} are checked in "
                f"{dtype}",
                file=sys.stderr,
            )
        with x64_for(dtype):
            loaded = (
                load_checkpoint(args.checkpoint, "jax", options, dtype=dtype),
                load_checkpoint(args.checkpoint, "torch", options, dtype=dtype),
            )
            _check_batch(args.batch, loaded[0].config)
            results = [parity.check_models(*loaded, seed=args.seed, batch=args.batch)]
        config = loaded[0].config
        what = f"checkpoint {args.checkpoint}"
    else:
        results = parity.check(config, args.dtype, seed=args.seed, batch=args.batch)
        what = f"preset {args.preset}, random weights"
    rows = [r.as_dict() for r in results]
    grads = _check_grads(args, config, loaded) if args.grads else None
    ok = all(r.passed for r in results) and (grads is None or not any(g.divergent for g in grads))
    if args.json:
        extra = {"gradients": [asdict(g) for g in grads]} if grads is not None else {}
        _print_json(
            {"what": what, "config": config.to_dict(), "results": rows, **extra}, precision=True
        )
    else:
        print(
            f"parity check: {what} ({config.num_params():,} parameters, "
            f"{config.num_layers} layers), batch {args.batch}, seed {args.seed}"
        )
        print(
            _table(
                rows,
                [
                    ("direction", "direction"),
                    ("dtype", "dtype"),
                    ("max_abs_error", "max |diff|"),
                    ("bound", "bound"),
                    ("passed", "result"),
                ],
            )
        )
        if grads is not None:
            bad = [g for g in grads if g.divergent]
            ratio = lambda g: g.max_abs / g.noise_floor if g.noise_floor else 0.0
            worst = max(grads, key=ratio)
            print(
                f"gradients of cross-entropy w.r.t. {len(grads) - 1} parameters and the "
                f"images (float32, noise floor from float64): {len(bad)} divergent; the "
                f"largest gap is {ratio(worst):.2f}x its noise floor ({worst.name})"
            )
            for g in bad:
                print(
                    f"  DIVERGENT {g.name}: max |diff| {g.max_abs:.3e}, floor "
                    f"{g.noise_floor:.3e}, float64 gap {g.gap64:.3e}"
                )
    return 0 if ok else 1


MAX_IMAGE_BYTES = 1 << 31  # one batch of random float64 images


def _check_batch(batch: int, config: ViTConfig | None = None) -> None:
    """A batch size that is positive and whose images fit in memory, refused from arithmetic."""
    if batch < 1:
        raise UsageError(f"--batch {batch}: expected a positive number")
    if (
        config is not None
        and batch * config.image_hw[0] * config.image_hw[1] * config.in_channels * 8
        > MAX_IMAGE_BYTES
    ):
        raise UsageError(
            f"--batch {batch}: {batch} images of {config.image_hw} x "
            f"{config.in_channels} would not fit in memory (limit "
            f"{MAX_IMAGE_BYTES:,} bytes)"
        )


def _check_grads(args: argparse.Namespace, config: ViTConfig, loaded=None):
    """Gradient parity on the same weights: the loaded checkpoint's, or the preset's random ones."""
    import numpy as np

    from weight_transfer.diagnostics import parity
    from weight_transfer.frameworks.bridge import to_torch
    from weight_transfer.frameworks.runners import random_images
    from weight_transfer.frameworks.weights import random_nnx

    if loaded is not None:
        jm, tm = loaded
    else:
        jm = random_nnx(config, args.seed)
        tm = to_torch(jm)
    images = random_images(config, args.batch, args.seed)
    labels = np.arange(args.batch) % config.num_classes
    return parity.compare_grads(jm, tm, images, labels)


def cmd_convert(args: argparse.Namespace) -> int:
    from weight_transfer.porting import convert

    report = convert(
        args.src,
        args.dst,
        to=args.to,
        options=port_options(args),
        max_shard_size=args.max_shard_size,
        force=args.force,
        progress=None if args.json else progress_bar("converting"),
    )
    if args.json:
        _print_json(report)
    else:
        print(
            f"converted {report['source']} ({report['layout']}) -> {report['output']} "
            f"({args.to}), {report['tensors']} tensors"
        )
        if "resampled" in report:
            r = report["resampled"]
            print(
                f"  resampled positions {'x'.join(map(str, r['from_grid']))} -> "
                f"{'x'.join(map(str, r['to_grid']))} patches, {r['method']}"
            )
        _print_provenance(report, assumed=False)  # assumptions were announced on stderr
    return 0


def progress_bar(label: str, stream=None):
    """A one-line bar on stderr when it is a terminal (and nothing otherwise)."""
    stream = stream or sys.stderr
    if not stream.isatty():
        return None

    def draw(done: int, total: int) -> None:
        filled = 30 * done // max(total, 1)
        end = "\n" if done == total else ""
        stream.write(f"\r{label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} tensors{end}")
        stream.flush()

    return draw


def _print_provenance(report: dict, *, assumed: bool = True) -> None:
    for field, why in report["assumed"].items() if assumed else ():
        print(f"  assumed {field} = {why}")
    for what in report["dropped"]:
        print(f"  dropped {what}")
    for note in report["notes"]:
        print(f"  note: {note}")


def _position_fields(config: dict) -> list[str]:
    """The fields saying how positions enter this model (a table, RoPE, relative biases, a
    NaFlex table's resize): those in use, for `inspect` to say where each was found."""
    groups = (
        (True, ("pos_embed", "pos_embed_tokens")),
        (config["rope"] != "none", [f for f in config if f.startswith("rope")]),
        (config["rel_pos_bias"] != "none", [f for f in config if f.startswith("rel_pos")]),
        (
            config["pos_grid"] is not None,
            [
                f
                for f in config
                if f.startswith("pos_") and f not in ("pos_embed", "pos_embed_tokens")
            ],
        ),
    )
    return [f for used, fields in groups if used for f in fields]


def cmd_inspect(args: argparse.Namespace) -> int:
    from weight_transfer.porting import inspect_checkpoint

    info = inspect_checkpoint(args.checkpoint, port_options(args))
    if args.json:
        _print_json(info)
        return 0
    print(f"{info['path']}: {info['layout_description']} ({info['layout']})")
    print(
        f"  parameters {info['parameters']:,} (config implies {info['expected_parameters']:,}), "
        f"{info['tensors']} tensors, {info['bytes']:,} bytes, dtypes {info['dtypes']}"
    )
    print("  config " + ", ".join(f"{k}={v}" for k, v in info["config"].items()))
    for field in _position_fields(info["config"]):
        where = "assumed" if field in info["assumed"] else info["found"].get(field, "default")
        print(f"  positions {field}={info['config'][field]} ({where})")
    _print_provenance(info)
    for key, n in info["nonfinite"].items():
        print(f"  NaN/Inf: {key} has {n}")
    return 0


FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def _is_factory(text: str) -> bool:
    """MODULE:FACTORY (or timm:ARCH), and no file or folder of that name."""
    import os

    return bool(FACTORY.match(text)) and not os.path.exists(text)


def _from_factory(text: str, reference=None, seed: int = 0):
    """The model `MODULE:FACTORY` returns (given `reference` when it takes an argument), or
    `timm:ARCH`: `timm.create_model(ARCH)` with seeded random weights (nothing downloaded)."""
    import importlib
    import inspect

    module_name, _, attr = text.partition(":")
    if module_name == "timm":
        try:
            import timm
            import torch
        except ImportError:
            raise UsageError(f"{text}: timm is not installed") from None
        if attr not in timm.list_models():
            raise UsageError(f"{text}: timm has no architecture {attr!r}")
        torch.manual_seed(seed)
        return timm.create_model(attr, pretrained=False).eval()
    try:
        factory = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"{text}: cannot import {module_name!r} ({e})") from None
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise UsageError(f"{text}: {module_name} has no {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise UsageError(f"{text}: {attr} is not callable")
    try:
        takes_reference = bool(inspect.signature(factory).parameters) and reference is not None
    except (TypeError, ValueError):
        takes_reference = False
    return factory(reference) if takes_reference else factory()


def _model_image_size(model) -> tuple[int, int] | None:
    """The image size a torch or flax model declares (timm's patch_embed, an HF config, ours)."""
    config = getattr(model, "config", None)
    for holder, attr in (
        (getattr(model, "patch_embed", None), "img_size"),
        (config, "image_hw"),
        (config, "image_size"),
    ):
        size = getattr(holder, attr, None)
        if isinstance(size, int):
            return size, size
        if isinstance(size, (tuple, list)) and len(size) == 2:
            return int(size[0]), int(size[1])
    return None


def _load_any_pair(args: argparse.Namespace):
    """REF and CAND when either is a MODULE:FACTORY: each a model (a checkpoint loaded into the
    framework asked for), and images of --image-size or the reference's declared size."""
    import numpy as np

    from weight_transfer.porting import load_checkpoint

    options = port_options(args)
    _check_batch(args.batch)

    def load(text, framework, reference=None):
        if _is_factory(text):
            return _from_factory(text, reference, args.seed)
        return load_checkpoint(text, framework, options)

    ref = load(args.reference, args.ref_framework)
    cand = load(args.candidate, args.cand_framework, ref)
    size = _image_size(args.image_size) or _model_image_size(ref) or _model_image_size(cand)
    if size is None:
        raise UsageError("neither model declares its image size: give --image-size N or HxW")
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(args.seed + 10_000)
    images = rng.standard_normal((args.batch, h, w, 3)).astype(np.float32)
    return ref, cand, images


def _compare_any(args: argparse.Namespace) -> int:
    """diff and doctor on a pair this project did not write: `weight_transfer.testing`."""
    from weight_transfer.testing import compare_models

    if getattr(args, "plot", None):
        raise UsageError("--plot draws our named layers; with MODULE:FACTORY models use --json")
    ref, cand, images = _load_any_pair(args)
    try:
        report = compare_models(ref, cand, images)
    except TypeError as e:  # a factory returned something that is not a model
        raise UsageError(str(e)) from None
    if args.json:
        _print_json(report.as_dict(), precision=True)
    else:
        print(
            f"layer diff: {report.reference} ({args.reference}) vs {report.candidate} "
            f"({args.candidate}); modules paired from the weights' values"
        )
        print(report.table())
        print(report.explain())
    return 0 if report.ok else 1


def _load_pair(args: argparse.Namespace, reference=None):
    """REF and CAND checkpoints, each into the framework asked for, and the images to use.
    With `reference`, REF is replaced by `reference(REF, images)` before CAND is loaded (the
    doctor records REF's float64 run and lets it go: one model in memory at a time). CAND's
    config is read first (headers only), so a CAND that cannot pair is refused before any
    tensor is read."""
    from weight_transfer.frameworks.runners import random_images
    from weight_transfer.porting import identify, load_checkpoint

    options = port_options(args)
    _check_batch(args.batch)
    candidate = identify(args.candidate, options)  # headers only
    candidate.source.close()
    cand_config = candidate.config
    ref = load_checkpoint(args.reference, args.ref_framework, options)
    _check_batch(args.batch, ref.config)
    if (
        ref.config.image_hw != cand_config.image_hw
        or ref.config.in_channels != cand_config.in_channels
    ):
        raise UsageError(
            f"the two models take different images: {ref.config.image_hw} x "
            f"{ref.config.in_channels} vs {cand_config.image_hw} x "
            f"{cand_config.in_channels}"
        )
    images = random_images(ref.config, args.batch, args.seed)
    if reference is not None:
        ref = reference(ref, images)
    cand = load_checkpoint(args.candidate, args.cand_framework, options)
    return ref, cand, images


def cmd_diff(args: argparse.Namespace) -> int:
    _check_plot_target(args)  # before the frameworks are imported
    if _is_factory(args.reference) or _is_factory(args.candidate):
        return _compare_any(args)
    from weight_transfer.diagnostics.parity import compare

    ref, cand, images = _load_pair(args)
    report = compare(ref, cand, images)
    if args.plot:
        _save_plot(args, lambda path: plot_report(report, path))
    if args.json:
        _print_json(report.as_dict(), precision=True)
    else:
        rows = [
            dict(
                layer=l.name,
                max_abs=l.max_abs,
                max_rel=l.max_rel,
                floor=l.noise_floor,
                gap64=l.gap64,
                ok=not l.divergent,
            )
            for l in report.layers
        ]
        print(
            f"layer diff: {report.reference} ({args.reference}) vs {report.candidate} "
            f"({args.candidate}); JAX precision highest, TF32 off"
        )
        print(
            _table(
                rows,
                [
                    ("layer", "layer"),
                    ("max_abs", "max |diff| f32"),
                    ("max_rel", "relative"),
                    ("floor", "noise floor"),
                    ("gap64", "max |diff| f64"),
                    ("ok", "result"),
                ],
            )
        )
        print(f"first divergence: {report.first_divergence or 'none'}")
    return 0 if report.passed else 1


def _check_plot_target(args: argparse.Namespace) -> None:
    """Refuse an existing --plot file (a dangling link included) unless --force, before work."""
    import os

    if args.plot and os.path.lexists(args.plot) and not args.force:
        raise UsageError(f"--plot {args.plot}: already exists (use --force to replace it)")
    if args.plot and not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
        raise UsageError(f"--plot {args.plot}: its folder does not exist")


def _save_plot(args: argparse.Namespace, draw) -> None:
    """Draw into a temporary file beside the target, then rename it into place (atomic)."""
    import os
    import tempfile

    folder, name = os.path.split(os.path.abspath(args.plot))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=os.path.splitext(name)[1], dir=folder)
    os.close(fd)
    try:
        draw(tmp)
        os.replace(tmp, args.plot)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def plot_report(report, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib (pip install 'vit-parity[plot]')") from None
    names = [l.name for l in report.layers]
    x = range(len(names))
    tiny = 1e-18  # log scale: exact zeros drawn at the bottom
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names)), 4))
    ax.semilogy(x, [max(l.max_abs, tiny) for l in report.layers], "o-", label="float32 gap")
    ax.semilogy(
        x,
        [max(l.noise_floor, tiny) for l in report.layers],
        "s--",
        label="noise floor (each side vs its float64)",
    )
    ax.semilogy(x, [max(l.gap64, tiny) for l in report.layers], "^:", label="float64 gap")
    if report.first_divergence:
        ax.axvline(
            names.index(report.first_divergence),
            color="red",
            alpha=0.4,
            label=f"first divergence: {report.first_divergence}",
        )
    ax.set_xticks(list(x), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("max |difference|")
    ax.set_title(f"{report.reference} vs {report.candidate}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_doctor(args: argparse.Namespace) -> int:
    if _is_factory(args.reference) or _is_factory(args.candidate):
        return _compare_any(args)  # anyone's pair: the first divergence and the weights named
    from weight_transfer.diagnostics.adapters import recorded
    from weight_transfer.diagnostics.doctor import diagnose

    ref, cand, images = _load_pair(args, reference=recorded)  # REF gone before CAND loads
    d = diagnose(ref, cand, images)
    if args.json:
        _print_json(d.as_dict(), precision=True)
    else:
        print(f"first divergence: {d.first_divergence or 'none: the two models agree'}")
        for f in d.findings:
            print(f"  [{f.id}] {f.detail}")
        if d.first_divergence:
            print(
                "fixed: the findings close the gap"
                if d.fixed
                else f"not fixed: still diverging at {d.remaining} (no single known correction "
                "closes it)"
            )
    return 0 if d.first_divergence is None else 1


def cmd_train_parity(args: argparse.Namespace) -> int:
    _check_plot_target(args)
    for name in ("steps", "batch"):  # refused before importing the frameworks
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} {getattr(args, name)}: expected a positive number")
    try:
        from weight_transfer.diagnostics.training import (
            DRIFT_FACTOR,
            Hyper,
            plot_losses,
            train_parity,
        )
    except ImportError as e:
        raise UsageError(str(e)) from None
    hyper = Hyper(
        optimizer=args.optimizer,
        lr=args.lr,
        steps=args.steps,
        batch=args.batch,
        seed=args.seed,
        weight_decay=args.weight_decay,
    )
    lr = hyper.lr
    try:
        report = train_parity(hyper)
    except ImportError as e:
        raise UsageError(str(e)) from None
    if args.plot:
        _save_plot(args, lambda path: plot_losses(report, path))
    if args.json:
        _print_json(report.as_dict(), precision=True)
        return 0 if report.passed else 1
    print(
        f"training parity: {args.optimizer} (lr {lr:g}), {args.steps} steps of {args.batch} "
        f"sklearn digits, optax vs torch.optim, same start and batches"
    )
    print(
        f"  loss    max gap {report.loss_gap:.3e}  bound {report.loss_bound:.3e} "
        f"({DRIFT_FACTOR:g} x each side's float32-vs-float64 drift)"
    )
    print(f"  weights max gap {report.weight_gap:.3e}  bound {report.weight_bound:.3e}")
    print(
        f"  held-out accuracy jax {report.accuracy['jax']:.4f}  torch "
        f"{report.accuracy['torch']:.4f}; logits differ by at most {report.logit_gap:.3e}"
    )
    print(
        f"  held-out digits predicted differently: {len(report.disagreements)} "
        f"({len(report.unexplained)} with a top-2 margin beyond the measured drift)"
    )
    print("PASS" if report.passed else "FAIL")
    return 0 if report.passed else 1


def _add_pair_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "reference",
        help="checkpoint of the reference model, or MODULE:FACTORY (a Python function "
        "returning a torch, NNX or (Linen module, variables) model), or timm:ARCH",
    )
    p.add_argument(
        "candidate",
        help="checkpoint of the candidate model, or MODULE:FACTORY (called with the reference "
        "model when it takes an argument)",
    )
    p.add_argument(
        "--image-size",
        default=None,
        help="images of N or HxW (checkpoints are resampled to it); default: the reference's "
        "own size",
    )
    p.add_argument(
        "--ref-framework",
        choices=["jax", "torch"],
        default="torch",
        help="load the reference into jax_impl or torch_impl (default torch)",
    )
    p.add_argument(
        "--cand-framework",
        choices=["jax", "torch"],
        default="jax",
        help="load the candidate into jax_impl or torch_impl (default jax)",
    )
    p.add_argument("--batch", type=int, default=2, help="random images per batch (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed for the images")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    _add_source_options(p)


def _add_source_options(p: argparse.ArgumentParser) -> None:
    from weight_transfer.layouts import ALIASES, LAYOUTS

    p.add_argument(
        "--from",
        dest="layout",
        choices=[*LAYOUTS, *ALIASES],
        default=None,
        help="layout of the input (detected from the key names by default)",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read .bin/.pth files (torch.load with weights_only=True)",
    )
    p.add_argument(
        "--arch",
        metavar="NAME",
        default=None,
        help="the timm architecture the weights belong to (e.g. "
        "vit_base_patch16_siglip_224): heads, epsilon, activation, tokens, pooling "
        "and norms from timm's registry (needs timm)",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="FIELD=VALUE",
        help="state a config field the file cannot say, e.g. --set num_heads=16 "
        "--set ln_eps=1e-5 --set image_size=384x256 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="ViT parity between Flax NNX and PyTorch: check, port, debug."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from weight_transfer.diagnostics.metrics import TOLERANCE

    p = sub.add_parser(
        "check",
        help="run the same images through both implementations",
        description="Fill a preset with random weights on one side, port it to "
        "the other, and compare logits in both directions. Exit 1 beyond "
        "tolerance ("
        + ", ".join(f"{k} {v:g}" for k, v in TOLERANCE.items())
        + ", relative to max(1, |logits|)).",
    )
    p.add_argument(
        "checkpoint",
        nargs="?",
        default=None,
        help="a checkpoint to load into both implementations (default: a preset "
        "with random weights)",
    )
    _add_source_options(p)
    p.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        choices=sorted(PRESETS),
        help=f"model size (default {DEFAULT_PRESET})",
    )
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help="override the preset's number of blocks (faster checks)",
    )
    p.add_argument(
        "--dtype",
        nargs="+",
        default=["float32", "float64"],
        choices=list(TOLERANCE),
        help="dtypes to compare",
    )
    p.add_argument("--batch", type=int, default=2, help="images per batch (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and images")
    p.add_argument(
        "--grads",
        action="store_true",
        help="also compare gradients w.r.t. every parameter and the images",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=cmd_check)

    from vit_config.resample import INTERPOLATIONS
    from weight_transfer.layouts import ALIASES
    from weight_transfer.porting import DTYPES, SAVE_LAYOUTS

    p = sub.add_parser(
        "convert",
        help="convert a checkpoint to another layout",
        description="Convert SRC (safetensors, sharded index, HF or timm Hub "
        "folder, .npz, Orbax folder, or .bin/.pth with --allow-pickle) to DST in "
        "another layout, one tensor at a time; the output appears only when "
        "complete. --to timm writes a Hub folder (config.json + "
        "model.safetensors, as timm's create_model('local-dir:DST') loads) unless "
        "DST ends in .safetensors (a bare state dict); --to orbax writes an Orbax "
        "checkpoint folder.",
    )
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", required=True, choices=[*SAVE_LAYOUTS, *ALIASES], help="layout to write")
    _add_source_options(p)
    p.add_argument("--image-size", default=None, help="resample position embeddings to N or HxW")
    p.add_argument(
        "--interpolation",
        default=None,
        choices=INTERPOLATIONS,
        help="position resampling (default: the source library's own, printed; "
        "timm and open_clip: bicubic antialiased; Hugging Face: bicubic; big_vision "
        "and google-research npz: big_vision, scipy's zoom order 1); dinov2 is "
        "original DINOv2's scale_factor with +0.1",
    )
    p.add_argument(
        "--antialias",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="antialias when resampling (default: as the source library does)",
    )
    p.add_argument("--dtype", default=None, choices=DTYPES, help="cast every weight")
    p.add_argument(
        "--max-shard-size",
        default=None,
        help="split the output into shards of at most this size (e.g. 2GB)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--allow-nonfinite", action="store_true", help="accept NaN/Inf weights")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser(
        "inspect",
        help="layout, config, parameter count, dtypes of a checkpoint",
        description="Describe a checkpoint: detected layout, inferred config "
        "(and what was assumed), parameter count, dtypes, sizes, NaN/Inf.",
    )
    p.add_argument("checkpoint")
    _add_source_options(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser(
        "diff",
        help="layer-by-layer gaps between two models",
        description="Run the same images through REF and CAND; for every named "
        "intermediate print the float32 gap, the noise floor (each side against "
        "its own float64 run) and the float64 gap; exit 1 if a layer diverges. "
        "Either side may be MODULE:FACTORY (any torch, NNX or Linen model, e.g. your own "
        "port): modules are then paired from the weights' values.",
    )
    _add_pair_options(p)
    p.add_argument("--plot", metavar="FILE.png", help="draw error against depth")
    p.add_argument("--force", action="store_true", help="replace an existing --plot file")
    p.set_defaults(run=cmd_diff)

    p = sub.add_parser(
        "doctor",
        help="name the fault that makes two models disagree",
        description="Find the first divergent layer, then try known corrections "
        "(transposed kernels, epsilon, GELU variant, qkv order, head split, "
        "pooling...) on the candidate one at a time; report those that close "
        "the gap. Exit 1 if the models disagree. With MODULE:FACTORY models (your own "
        "port), name the first divergent pair of modules and the weights copied wrong.",
    )
    _add_pair_options(p)
    p.set_defaults(run=cmd_doctor)

    from weight_transfer.diagnostics.training import LEARNING_RATES, OPTIMIZERS, Hyper

    p = sub.add_parser(
        "train-parity",
        help="train in optax and torch.optim side by side",
        description="Train the same small ViT on scikit-learn's digits with the "
        "same optimiser, start and batches in JAX (optax) and torch; compare "
        "losses, weights and held-out predictions against bounds derived from "
        "each framework's own float32-vs-float64 drift.",
    )
    p.add_argument(
        "--optimizer", choices=OPTIMIZERS, default=Hyper.optimizer, help="(default %(default)s)"
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="default " + ", ".join(f"{v:g} ({k})" for k, v in LEARNING_RATES.items()),
    )
    p.add_argument(
        "--weight-decay", type=float, default=Hyper.weight_decay, help="AdamW's (decoupled)"
    )
    p.add_argument("--steps", type=int, default=Hyper.steps, help="(default %(default)s)")
    p.add_argument("--batch", type=int, default=Hyper.batch, help="(default %(default)s)")
    p.add_argument("--seed", type=int, default=Hyper.seed, help="(default %(default)s)")
    p.add_argument("--plot", metavar="FILE.png", help="draw both loss curves")
    p.add_argument("--force", action="store_true", help="replace an existing --plot file")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(run=cmd_train_parity)
    return parser


class Interrupted(BaseException):
    """SIGTERM or SIGHUP, raised where the program is so that cleanup (`finally`) runs."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signum)


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(signum)


class _QuietPipe:
    """stdout that survives a reader who went away (`vit-parity ... | head`): once the pipe
    breaks, the rest is discarded and the command's own exit code stands."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self._discard()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._discard()

    def _discard(self) -> None:
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self.stream.fileno())  # so the interpreter's final flush is quiet too
        os.close(devnull)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 success, 1 a parity failure, 2 bad input (`VitParityError` or `OSError`:
    one line on stderr), 130 / 143 / 129 interrupted by SIGINT / SIGTERM / SIGHUP (temporary
    outputs removed). Anything else is a bug: its traceback is printed and the code is 3."""
    import signal
    import traceback

    args = build_parser().parse_args(argv)
    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGTERM, signal.SIGHUP)}
    stdout, sys.stdout = sys.stdout, _QuietPipe(sys.stdout)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.run(args)
    except (VitParityError, OSError) as e:  # bad input, named; anything else is a bug
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except Interrupted as e:
        print(f"{PROG}: stopped by {signal.Signals(e.signum).name}", file=sys.stderr)
        return 128 + e.signum
    except Exception:
        traceback.print_exc()
        print(
            f"{PROG}: internal error (a bug, not bad input): please report it with the "
            f"traceback above",
            file=sys.stderr,
        )
        return 3
    finally:
        sys.stdout = stdout
        for s, handler in previous.items():
            signal.signal(s, handler)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning for the user (an assumption, a dropped tensor) as one line on stderr."""
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _one_line(e: BaseException) -> str:
    """An error's message on one line (a listing of problems joined with '; '); an OSError
    without a path still names what failed."""
    if isinstance(e, OSError) and e.filename is None and e.strerror:
        return f"{e.strerror} ({type(e).__name__})"
    head, *items = str(e).splitlines()
    return (
        head + " " + "; ".join(item.strip().removeprefix("- ") for item in items) if items else head
    )


if __name__ == "__main__":
    sys.exit(main())
