"""The `vit-parity` command line (also `python -m weight_transfer`).

Exit codes: 0 success, 1 a parity failure, 2 bad input (one message on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys

from vit_config import PRESETS, ViTConfig

PROG = "vit-parity"
DEFAULT_PRESET = "vit_b16"


class UsageError(ValueError):
    """Bad input from the command line: reported in one line with exit code 2."""


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    cells = [[title for _, title in columns]] + [[_fmt(r[k]) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in cells)


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "ok" if v else "FAIL"
    if isinstance(v, float):
        return f"{v:.3e}"
    return str(v)


def cmd_check(args: argparse.Namespace) -> int:
    from weight_transfer import parity

    config = ViTConfig.preset(args.preset)
    if args.layers is not None:
        config = config.replace(num_layers=args.layers)
    results = parity.check(config, args.dtype, seed=args.seed, batch=args.batch)
    rows = [r.as_dict() for r in results]
    if args.json:
        print(json.dumps({"preset": args.preset, "config": config.to_dict(), "results": rows},
                         indent=2))
    else:
        print(f"parity check: preset {args.preset} ({config.num_params():,} parameters, "
              f"{config.num_layers} layers), batch {args.batch}, seed {args.seed}, random weights")
        print(_table(rows, [("direction", "direction"), ("dtype", "dtype"),
                            ("max_abs_error", "max |diff|"), ("bound", "bound"),
                            ("passed", "result")]))
    return 0 if all(r.passed for r in results) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="ViT parity between Flax NNX and PyTorch: check, port, debug.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("check", help="run the same images through both implementations",
                       description="Fill a preset with random weights on one side, port it to "
                       "the other, and compare logits in both directions. Exit 1 beyond "
                       "tolerance (float32 1e-5, float64 1e-12, relative to max(1, |logits|)).")
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                   help=f"model size (default {DEFAULT_PRESET})")
    p.add_argument("--layers", type=int, default=None,
                   help="override the preset's number of blocks (faster checks)")
    p.add_argument("--dtype", nargs="+", default=["float32", "float64"],
                   choices=["float32", "float64", "bfloat16"], help="dtypes to compare")
    p.add_argument("--batch", type=int, default=2, help="images per batch (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and images")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as e:  # typed user-facing errors; anything else is a bug
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
