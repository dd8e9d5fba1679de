"""The pytest plugin (registered through the `pytest11` entry point: installing vit-parity is
enough). It gives

- the `assert_equivalent` fixture: `assert_equivalent(reference, candidate, images=None, *,
  image_size=(H, W), **options)` is `weight_transfer.testing.assert_equivalent` with the
  session's options; without `images`, `--parity-images N` random NHWC images of
  `image_size` are drawn from `--parity-seed`;
- `--parity-float64` / `--no-parity-float64`: measure each side's noise floor in float64
  (the default) or judge float32 alone at 1e-5;
- on failure, the layers up to the first divergence (path pair, gap, floor) and the named
  faults, in the test's report.

Importing it loads neither JAX nor PyTorch: every pytest session of an environment with
vit-parity installed loads it.
"""

from __future__ import annotations

import pytest


class ParityError(AssertionError):
    """A failed `assert_equivalent` from the fixture, carrying the report."""

    def __init__(self, message: str, report):
        super().__init__(message)
        self.report = report


def pytest_addoption(parser):
    group = parser.getgroup("vit-parity", "model parity (weight_transfer.testing)")
    group.addoption(
        "--parity-float64",
        dest="parity_float64",
        action="store_true",
        default=True,
        help="measure each side's float32 noise floor against a float64 run (default)",
    )
    group.addoption(
        "--no-parity-float64",
        dest="parity_float64",
        action="store_false",
        help="float32 runs only, judged at 1e-5 of max(1, |values|)",
    )
    group.addoption(
        "--parity-images",
        dest="parity_images",
        type=int,
        default=2,
        help="random images per check when a test gives none (default 2)",
    )
    group.addoption(
        "--parity-seed",
        dest="parity_seed",
        type=int,
        default=0,
        help="seed of those images (default 0)",
    )


@pytest.fixture
def assert_equivalent(request):
    """`assert_equivalent(reference, candidate, images=None, *, image_size=None, channels=3,
    **options)` with the session's --parity-* options."""
    config = request.config
    count = config.getoption("parity_images")
    if count < 1:
        raise pytest.UsageError(f"--parity-images {count}: expected a positive number")

    def check(reference, candidate, images=None, *, image_size=None, channels=3, **options):
        import numpy as np

        from weight_transfer.testing.compare import compare_models

        if images is None:
            if image_size is None:
                raise TypeError("assert_equivalent: give images, or image_size=(H, W)")
            h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
            rng = np.random.default_rng(config.getoption("parity_seed"))
            images = rng.standard_normal((count, h, w, channels)).astype(np.float32)
        options.setdefault("float64", config.getoption("parity_float64"))
        report = compare_models(reference, candidate, images, **options)
        if not report.ok:
            raise ParityError(
                f"{report.explain()}\n\n{report.table(upto=report.first_divergence)}", report
            )
        return report

    return check


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if call.excinfo is not None and isinstance(call.excinfo.value, ParityError):
        report = call.excinfo.value.report
        outcome.get_result().sections.append(("vit-parity: every layer", report.table()))
