"""Check anyone's port: compare two models this project did not write, layer by layer, their
gradients, and the weights copied between them.

    from weight_transfer.testing import compare_models, assert_equivalent

    report = compare_models(reference, candidate, images)  # images: NHWC numpy, shared
    report.ok, report.first_divergence, report.layers, report.findings

Either side: a torch `nn.Module`, a `flax.nnx.Module`, or a `(flax.linen.Module, variables)`
pair (ours are both). Intermediates are captured from outside; counterparts are found from the
weights' values. The pytest plugin (`weight_transfer.testing.plugin`, registered through
`pytest11`) gives the same as a fixture. `docs/check-your-port.md` walks through an example.
"""

from weight_transfer.testing.compare import (
    ModelReport,
    PairGap,
    assert_equivalent,
    compare_grads,
    compare_models,
)
from weight_transfer.testing.matching import ParamMatch, Transform, fingerprint, match_params
from weight_transfer.testing.sides import model_side

__all__ = [
    "ModelReport",
    "PairGap",
    "ParamMatch",
    "Transform",
    "assert_equivalent",
    "compare_grads",
    "compare_models",
    "fingerprint",
    "match_params",
    "model_side",
]
