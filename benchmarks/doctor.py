"""The doctor on a real-size model as a user runs it: wall time of the whole `vit-parity doctor`
process (imports and file reading included) and its peak RSS from the OS, on ViT-B/16 (random
weights, one planted fault), the reference and the candidate in different layouts (a timm file
and a torch_impl file by default, each written by `save_checkpoint`), against `vit-parity diff`
on the same pair in the same run (the least any diagnosis must do). Beside it, from inside the
same doctor process, the stages: imports, reading the reference, its float64 run, reading the
candidate, and the diagnosis itself (the replay and the search: the in-process figure).

    python benchmarks/doctor.py                    # ViT-B/16, fault: LayerNorm eps 1e-5 vs 1e-6
    python benchmarks/doctor.py --fault transposed --preset dinov2_b14 --json
    python benchmarks/doctor.py --layouts torch nnx # both files in our own layouts
    python benchmarks/doctor.py --preset dinov3_b16 --fault rope --layouts torch nnx

Each command runs in a new process, `--rounds` times, interleaved; medians.
Targets (doctor-CLI issue): the whole doctor process at most 20 s and 2 GB on this 2-core
machine; the family-models issue asks the same on `dinov3_b16` with one planted fault (a bare
timm file of a RoPE model says nothing of its RoPE, so its files are written in our layouts,
which carry their config).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vit_config import PRESETS, ViTConfig

CHILD = r"""
import atexit, json, sys, time
start = time.perf_counter()
stages = {}
def report():
    with open("/proc/self/status") as f:
        hwm = next(line.split()[1] for line in f if line.startswith("VmHWM"))
    print("PEAK_KIB", hwm, file=sys.stderr)
    print("STAGES", json.dumps(stages), file=sys.stderr)
atexit.register(report)
from weight_transfer import cli
import weight_transfer.porting as porting
from weight_transfer.diagnostics import adapters, doctor
stages["imports"] = time.perf_counter() - start
def timed(owner, name, stage):
    real = getattr(owner, name)
    def call(*args, **kwargs):
        t = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            stages[stage(args)] = stages.get(stage(args), 0.0) + time.perf_counter() - t
    setattr(owner, name, call)
timed(porting, "load_checkpoint", lambda a: f"read {a[0].rsplit('/', 1)[-1]}")
timed(adapters, "recorded", lambda a: "reference float64 run")
timed(doctor, "diagnose", lambda a: "diagnosis (in-process)")
sys.exit(cli.main(sys.argv[1:]))
"""

FAULTS = {
    "eps": "LayerNorm epsilon 1e-5 on the candidate, 1e-6 on the reference",
    "transposed": "block 5's attention output kernel copied without its transpose",
    "rope": "RoPE channel pairs interleaved on the candidate, the reference's split in halves "
    "(or the other way round); RoPE presets only",
}


def write_pair(preset: str, fault: str, folder: Path, layouts: list[str]) -> tuple[Path, Path]:
    import weight_transfer as wt
    from weight_transfer.frameworks.weights import random_nnx

    config = ViTConfig.preset(preset)
    model = random_nnx(config, seed=1)
    ref = wt.save_checkpoint(model, folder / "ref.safetensors", layout=layouts[0])
    flat = wt.nnx_flat(model)
    if fault == "eps":
        candidate = wt.nnx_from_flat(flat, config.replace(ln_eps=1e-5))
    elif fault == "rope":
        if config.rope == "none":
            raise SystemExit(f"--fault rope needs a RoPE preset; {preset} has none")
        other = {"interleaved": "half", "half": "interleaved"}[config.rope]
        candidate = wt.nnx_from_flat(flat, config.replace(rope=other))
    else:
        key = f"blocks.{min(5, config.num_layers - 1)}.attn.o.kernel"
        candidate = wt.nnx_from_flat({**flat, key: flat[key].T.copy()}, config)
    cand = wt.save_checkpoint(candidate, folder / "cand.safetensors", layout=layouts[1])
    return ref, cand


def run(command: str, ref: Path, cand: Path) -> tuple[float, int, dict, dict]:
    start = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-c", CHILD, command, str(ref), str(cand), "--json"],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    peak = (
        next(int(line.split()[1]) for line in p.stderr.splitlines() if line.startswith("PEAK_KIB"))
        * 1024
    )
    if p.returncode not in (0, 1):
        raise SystemExit(f"{command} failed ({p.returncode}):\n{p.stderr}")
    stages = next(
        json.loads(line.split(" ", 1)[1])
        for line in p.stderr.splitlines()
        if line.startswith("STAGES")
    )
    return seconds, peak, json.loads(p.stdout), stages


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="vit_b16", choices=sorted(PRESETS))
    parser.add_argument("--fault", default="eps", choices=sorted(FAULTS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--layouts",
        nargs=2,
        default=["timm", "torch"],
        metavar=("REF", "CAND"),
        help="the layouts the two files are written in (default timm torch)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    runs: dict[str, list[tuple[float, int]]] = {"diff": [], "doctor": []}
    stages: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        ref, cand = write_pair(args.preset, args.fault, Path(tmp), args.layouts)
        for _ in range(args.rounds):
            for command in ("diff", "doctor"):
                seconds, peak, out, timing = run(command, ref, cand)
                runs[command].append((seconds, peak))
                if command == "doctor":
                    findings = out["findings"]
                    stages.append(timing)
    med = {k: (statistics.median(s for s, _ in v), max(p for _, p in v)) for k, v in runs.items()}
    result = {
        "preset": args.preset,
        "fault": FAULTS[args.fault],
        "rounds": args.rounds,
        "seconds": {k: [s for s, _ in v] for k, v in runs.items()},
        "median_seconds": {k: m[0] for k, m in med.items()},
        "peak_bytes": {k: m[1] for k, m in med.items()},
        "doctor_over_diff": med["doctor"][0] / med["diff"][0],
        "layouts": args.layouts,
        "doctor_stages_seconds": {k: statistics.median(t[k] for t in stages) for k in stages[0]},
        "targets": {"doctor_seconds": 20, "doctor_bytes": 2e9},
        "findings": findings,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"doctor benchmark: {args.preset} ({ViTConfig.preset(args.preset).num_params():,} "
        f"parameters), fault: {FAULTS[args.fault]}, median of {args.rounds} interleaved rounds"
    )
    for k in ("diff", "doctor"):
        each = " ".join(f"{s:.1f}" for s in result["seconds"][k])
        print(
            f"  vit-parity {k:6s} {med[k][0]:6.1f} s (runs: {each})   peak RSS "
            f"{med[k][1] / 1e9:.2f} GB"
        )
    print(f"  doctor / diff: {result['doctor_over_diff']:.2f}; targets: doctor <= 20 s and <= 2 GB")
    print(
        f"  doctor's stages ({args.layouts[0]} reference, {args.layouts[1]} candidate), median s:"
    )
    for stage, seconds in result["doctor_stages_seconds"].items():
        print(f"    {stage:28s} {seconds:6.2f}")
    for f in findings:
        print(f"  found [{f['id']}] {f['detail']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
