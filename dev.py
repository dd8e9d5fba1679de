#!/usr/bin/env python3
"""Set up the project's virtual environment, then run the main job or the tests.

    python dev.py check [vit-parity check options]   # parity check on the default preset
    python dev.py test  [pytest options]             # lint, format and type checks, then the
                                                     # whole test suite

Needs only Python >= 3.11. The environment lives in .venv and is (re)installed from
pyproject.toml, with the test extras, whenever pyproject.toml changes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".vit-parity-installed"
FLAX_ORACLE = VENV / "hf-flax-oracle"  # tests/helpers/hf_flax_oracle.py finds it here
FLAX_ORACLE_PACKAGES = [
    "transformers==4.47.1",
    "tokenizers<0.22",
    "huggingface_hub<1.0",
    "requests<3",
    "urllib3<3",
    "charset_normalizer<4",
    "idna<4",
    "certifi",
]


def python() -> Path:
    return BIN / ("python.exe" if os.name == "nt" else "python")


def ensure_env() -> None:
    stated = (ROOT / "pyproject.toml").read_bytes() + " ".join(FLAX_ORACLE_PACKAGES).encode()
    want = hashlib.sha256(stated).hexdigest()
    if STAMP.exists() and STAMP.read_text() == want and python().exists():
        return
    if not python().exists():
        print(f"dev.py: creating {VENV}", file=sys.stderr)
        venv.create(VENV, with_pip=True)
    print(
        "dev.py: installing vit-parity with its test extras (first run takes a few minutes)",
        file=sys.stderr,
    )
    subprocess.run(
        [str(python()), "-m", "pip", "install", "--quiet", "-e", f"{ROOT}[test]"],
        check=True,
        cwd=ROOT,
    )
    # The oracle of the Hugging Face Flax tests: transformers 4.47.1, the last line with Flax
    # classes, in a folder of its own (the venv keeps transformers 5); the tests run it in a
    # subprocess with this folder first on PYTHONPATH. --no-deps: it shares the venv's
    # numpy, jax, flax and safetensors, and brings the 4.x line's hub and tokenizers.
    subprocess.run(
        [str(python()), "-m", "pip", "install", "--quiet", "--upgrade", "--no-deps"]
        + ["--target", str(FLAX_ORACLE), *FLAX_ORACLE_PACKAGES],
        check=True,
        cwd=ROOT,
    )
    STAMP.write_text(want)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("check", "test"):
        wants_help = bool(argv) and argv[0] in ("-h", "--help")
        print(__doc__.strip(), file=sys.stdout if wants_help else sys.stderr)
        return 0 if wants_help else 2
    command, rest = argv[0], argv[1:]
    ensure_env()
    if command == "check":
        cmd = [str(python()), "-m", "weight_transfer", "check", *rest]
        return subprocess.run(cmd, cwd=ROOT).returncode
    for name, check in STATIC_CHECKS:
        print(f"dev.py: {name}", file=sys.stderr, flush=True)
        if (code := subprocess.run([str(python()), "-m", *check], cwd=ROOT).returncode) != 0:
            print(f"dev.py: {name} failed (exit {code})", file=sys.stderr)
            return code
    return subprocess.run([str(python()), "-m", "pytest", *rest], cwd=ROOT).returncode


# Run by `test` before pytest; configured in pyproject.toml. The type check covers the part of
# weight_transfer that imports no framework.
FRAMEWORK_FREE = [f"weight_transfer/{p}" for p in ("core", "formats", "layouts", "porting")]
STATIC_CHECKS = [
    ("ruff check", ["ruff", "check", "."]),
    ("ruff format --check", ["ruff", "format", "--check", "."]),
    ("mypy (framework-free part)", ["mypy", *FRAMEWORK_FREE]),
]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
