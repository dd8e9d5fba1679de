"""`weight_transfer.testing.compare_models` (anyone's pair: modules captured from outside and
paired from the weights' values) against our own layer diff (`diagnostics.parity.compare`:
named intermediates our models emit, timm's hooked) on the same pair in the same run: ViT-B/16
with random weights, a timm reference and our NNX model as the candidate, float32 and float64
runs on both sides, NHWC images.

    python benchmarks/compare_models.py               # ViT-B/16, batch 2, 3 rounds
    python benchmarks/compare_models.py --preset vit_s16 --batch 4 --json

Target (debug-any-port issue): compare_models at most 2x the time of our diff.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from vit_config import PRESETS, ViTConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="vit_b16", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    import weight_transfer as wt
    from weight_transfer.diagnostics.parity import compare
    from weight_transfer.frameworks.runners import random_images
    from weight_transfer.frameworks.weights import random_nnx
    from weight_transfer.testing import compare_models

    config = ViTConfig.preset(args.preset)
    candidate = random_nnx(config, seed=0)
    reference = wt.to_torch(candidate)
    images = random_images(config, args.batch, seed=1)
    times: dict[str, list[float]] = {"diff": [], "compare_models": []}
    for _ in range(args.rounds):  # interleaved, so drift in the machine hits both
        for name, run in (
            ("diff", lambda: compare(reference, candidate, images)),
            ("compare_models", lambda: compare_models(reference, candidate, images)),
        ):
            start = time.perf_counter()
            report = run()
            times[name].append(time.perf_counter() - start)
            ok = report.passed if name == "diff" else report.ok
            assert ok, f"{name} found a divergence in a correct pair"
    medians = {k: statistics.median(v) for k, v in times.items()}
    ratio = medians["compare_models"] / medians["diff"]
    result = {
        "preset": args.preset,
        "batch": args.batch,
        "rounds": args.rounds,
        "median_s": medians,
        "ratio_compare_models_to_diff": ratio,
        "target_ratio": 2.0,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.preset}, batch {args.batch}, medians of {args.rounds} rounds:")
        for k, v in medians.items():
            print(f"  {k:15s} {v:7.2f} s")
        print(f"  compare_models / diff = {ratio:.2f} (target <= 2.0)")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
