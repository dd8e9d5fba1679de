"""Training parity: optax vs torch.optim on scikit-learn's digits, same start and batches."""

import pytest

pytest.importorskip("optax")
pytest.importorskip("sklearn")

from weight_transfer.diagnostics.training import Hyper, train_parity  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("optimizer, lr", [("adamw", 3e-3), ("sgd", 0.1)])
def test_training_stays_together(optimizer, lr):
    report = train_parity(Hyper(optimizer=optimizer, lr=lr, steps=80))
    assert report.losses["jax32"][-1] < 0.9 * report.losses["jax32"][0]  # it does learn
    assert report.loss_gap <= report.loss_bound, report.as_dict()
    assert report.weight_gap <= report.weight_bound
    assert report.unexplained == []  # any other disagreement sits inside the measured drift
    assert report.passed
    if optimizer == "adamw":  # SGD learns far slower on a ViT; 80 steps leave it near chance
        assert report.accuracy["jax"] > 0.6


@pytest.mark.slow  # measured 4-9 s (pytest --durations)
def test_a_different_optimizer_on_one_side_is_caught(monkeypatch):
    """The bounds are not vacuous: torch with twice the learning rate fails them."""
    import weight_transfer.diagnostics.training as training

    real = training._torch_opt
    monkeypatch.setattr(
        training,
        "_torch_opt",
        lambda h, params: real(Hyper(**{**h.__dict__, "lr": 2 * h.lr}), params),
    )
    report = train_parity(Hyper(optimizer="sgd", lr=0.1, steps=30))
    assert not report.passed and report.loss_gap > report.loss_bound
