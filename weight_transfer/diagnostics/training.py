"""Training parity: the same optimiser, weights and batches in optax and torch.optim.

Data: scikit-learn's 8x8 digits (shipped inside the package, no download), one channel,
pixels scaled to [0, 1], a fixed train / held-out split. Both frameworks start from the same
random weights and see the same batches in the same order. Each framework is also trained in
float64 from the same start: how far each float32 run drifts from its own float64 run is the
rounding noise of that run, and the cross-framework gaps are judged against it.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import numpy as np

from vit_config import ArgumentError, ViTConfig

# A small ViT for 8x8 digits: 2x2 patches -> 16 tokens + CLS.
DIGITS_CONFIG = ViTConfig(
    image_size=8,
    patch_size=2,
    in_channels=1,
    d_model=32,
    num_heads=4,
    d_ff=64,
    num_layers=2,
    num_classes=10,
    pool="cls",
    activation="gelu",
)
OPTIMIZERS = ("sgd", "adamw")
# Cross-framework gaps may reach this multiple of the summed float32-vs-float64 drifts.
DRIFT_FACTOR = 4.0


# Each optimiser's default learning rate (the CLI's defaults too).
LEARNING_RATES = {"adamw": 3e-3, "sgd": 0.1}


@dataclass(frozen=True)
class Hyper:
    optimizer: str = "adamw"
    lr: float | None = None  # None: the optimiser's default, LEARNING_RATES
    momentum: float = 0.9  # SGD (torch semantics: buf = m * buf + g; optax trace is the same)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2  # decoupled, scaled by lr, on every parameter (both libraries)
    steps: int = 200
    batch: int = 64
    seed: int = 0

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ArgumentError(f"optimizer {self.optimizer!r}: expected one of {OPTIMIZERS}")
        if self.lr is None:
            object.__setattr__(self, "lr", LEARNING_RATES[self.optimizer])


def load_digits_split(seed: int = 0, held_out: int = 297):
    """(x_train, y_train, x_test, y_test): NHWC float32 in [0, 1], int labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "training parity needs scikit-learn (pip install 'vit-parity[train]')"
        ) from None
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]  # (1797, 8, 8, 1)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    test, train = order[:held_out], order[held_out:]
    return x[train], y[train], x[test], y[test]


def batches(n: int, batch: int, steps: int, seed: int) -> list[np.ndarray]:
    """The same index batches for both frameworks: epochs of a seeded permutation."""
    rng = np.random.default_rng(seed + 1)
    out, order = [], np.array([], np.int64)
    while len(out) < steps:
        if len(order) < batch:
            order = np.concatenate([order, rng.permutation(n)])
        out.append(order[:batch])
        order = order[batch:]
    return out


def _optax(h: Hyper):
    import optax

    if h.optimizer == "sgd":
        return optax.sgd(h.lr, momentum=h.momentum)
    return optax.adamw(h.lr, b1=h.betas[0], b2=h.betas[1], eps=h.eps, weight_decay=h.weight_decay)


def _torch_opt(h: Hyper, params):
    import torch

    if h.optimizer == "sgd":
        return torch.optim.SGD(params, lr=h.lr, momentum=h.momentum)
    return torch.optim.AdamW(params, lr=h.lr, betas=h.betas, eps=h.eps, weight_decay=h.weight_decay)


def train_jax(model, h: Hyper, x, y, plan) -> tuple[list[float], object]:
    import jax
    import optax
    from flax import nnx

    graphdef, params = nnx.split(model, nnx.Param)
    tx = _optax(h)
    state = tx.init(params)

    def loss_fn(params, xb, yb):
        logits = nnx.merge(graphdef, params)(xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    @jax.jit
    def step(params, state, xb, yb):
        loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    dtype = model.dtype
    losses = []
    for idx in plan:
        params, state, loss = step(params, state, x[idx].astype(dtype), y[idx])
        losses.append(float(loss))
    return losses, nnx.merge(graphdef, params)


def train_torch(model, h: Hyper, x, y, plan) -> tuple[list[float], object]:
    import torch
    import torch.nn.functional as F

    from weight_transfer.frameworks.bridge import nhwc_to_nchw

    model = copy.deepcopy(model)
    opt = _torch_opt(h, model.parameters())
    xt = torch.from_numpy(np.ascontiguousarray(nhwc_to_nchw(x))).to(model.dtype)
    yt = torch.from_numpy(y)
    losses = []
    for idx in plan:
        idx = torch.from_numpy(idx)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xt[idx]), yt[idx])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses, model


@dataclass
class TrainReport:
    hyper: dict
    steps: int
    losses: dict[str, list[float]]  # jax32, torch32, jax64, torch64
    loss_gap: float  # max over steps |jax32 - torch32|
    loss_bound: float  # DRIFT_FACTOR x (max |jax32 - jax64| + max |torch32 - torch64|)
    weight_gap: float  # max over parameters of max |jax - torch| after the last step
    weight_bound: float
    accuracy: dict[str, float]  # held-out, float32 runs
    logit_gap: float  # max |jax - torch| held-out logits (float32)
    disagreements: list[dict] = field(default_factory=list)  # held-out digits predicted differently
    unexplained: list[dict] = field(
        default_factory=list
    )  # ... whose top-2 margin exceeds the drift

    @property
    def passed(self) -> bool:
        return (
            self.loss_gap <= self.loss_bound
            and self.weight_gap <= self.weight_bound
            and not self.unexplained
        )

    def as_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def _max_gap(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _weight_gap(a, b) -> float:
    from weight_transfer.frameworks.bridge import nnx_params

    wa, wb = nnx_params(a), nnx_params(b)
    return max(_max_gap(wa[k], wb[k]) for k in wa)


def training_init(config: ViTConfig, seed: int):
    """A trainable start where no parameter keeps a constant: flax's own init for kernels
    (LeCun normal), N(0, 0.02) for biases, pos_embed and cls_token, 1 + N(0, 0.02) for
    LayerNorm scales (timm's scale for its embeddings)."""
    from flax import nnx

    import jax_impl
    from weight_transfer.frameworks.bridge import nnx_flat, nnx_from_flat

    flat = nnx_flat(jax_impl.ViT(config, rngs=nnx.Rngs(seed)))
    rng = np.random.default_rng(seed)
    for key, value in flat.items():
        if not key.endswith("kernel"):
            noise = rng.normal(0.0, 0.02, value.shape).astype(value.dtype)
            flat[key] = (1.0 + noise if key.endswith("scale") else noise).astype(value.dtype)
    return nnx_from_flat(flat, config)


def train_parity(h: Hyper = Hyper(), config: ViTConfig = DIGITS_CONFIG) -> TrainReport:
    """Train both frameworks (float32, and float64 for the noise bound) and compare."""
    import jax

    from weight_transfer.frameworks.bridge import nnx_astype, nnx_params, to_torch
    from weight_transfer.frameworks.runners import exact_matmuls, run_nnx, run_torch

    if h.optimizer not in OPTIMIZERS:
        raise ArgumentError(f"optimizer {h.optimizer!r}: expected one of {OPTIMIZERS}")
    x, y, xt, yt = load_digits_split(h.seed)
    plan = batches(len(y), h.batch, h.steps, h.seed)
    start = training_init(config, h.seed)
    losses, final = {}, {}
    with exact_matmuls():
        losses["jax32"], final["jax32"] = train_jax(start, h, x, y, plan)
        losses["torch32"], final["torch32"] = train_torch(to_torch(start), h, x, y, plan)
        with jax.enable_x64(True):
            losses["jax64"], final["jax64"] = train_jax(
                nnx_astype(start, np.float64), h, x, y, plan
            )
            final["jax64"] = nnx_params(final["jax64"])  # read while x64 is on
        losses["torch64"], final["torch64"] = train_torch(to_torch(start).double(), h, x, y, plan)
        logits_j = np.asarray(run_nnx(final["jax32"], xt), np.float64)
        logits_t = run_torch(final["torch32"], xt).double().numpy()
    drift = lambda a, b: _max_gap(losses[a], losses[b])
    loss_bound = DRIFT_FACTOR * (drift("jax32", "jax64") + drift("torch32", "torch64"))
    wj, wt64 = nnx_params(final["jax32"]), final["jax64"]
    wt, wt64t = nnx_params(final["torch32"]), nnx_params(final["torch64"])
    weight_drift = max(_max_gap(wj[k], wt64[k]) for k in wj) + max(
        _max_gap(wt[k], wt64t[k]) for k in wt
    )
    logit_gap = _max_gap(logits_j, logits_t)
    disagreements, unexplained = [], []
    for i in np.flatnonzero(logits_j.argmax(1) != logits_t.argmax(1)):
        top2 = np.sort(logits_j[i])[-2:]
        row = {
            "index": int(i),
            "label": int(yt[i]),
            "jax": int(logits_j[i].argmax()),
            "torch": int(logits_t[i].argmax()),
            "top2_margin": float(top2[1] - top2[0]),
        }
        disagreements.append(row)
        if row["top2_margin"] > 2 * logit_gap:
            unexplained.append(row)
    return TrainReport(
        hyper=asdict(h),
        steps=h.steps,
        losses=losses,
        loss_gap=drift("jax32", "torch32"),
        loss_bound=loss_bound,
        weight_gap=_weight_gap(final["jax32"], final["torch32"]),
        weight_bound=DRIFT_FACTOR * weight_drift,
        accuracy={
            "jax": float((logits_j.argmax(1) == yt).mean()),
            "torch": float((logits_t.argmax(1) == yt).mean()),
        },
        logit_gap=logit_gap,
        disagreements=disagreements,
        unexplained=unexplained,
    )


def plot_losses(report: TrainReport, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = np.arange(1, report.steps + 1)
    for key, style in (("jax32", "-"), ("torch32", "--"), ("jax64", ":"), ("torch64", "-.")):
        ax.plot(
            steps,
            report.losses[key],
            style,
            label=key.replace("32", " float32").replace("64", " float64"),
            alpha=1.0 if key.endswith("32") else 0.6,
        )
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title(
        f"{report.hyper['optimizer']}: optax vs torch.optim on sklearn digits; "
        f"held-out acc {report.accuracy['jax']:.3f} / {report.accuracy['torch']:.3f}"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["DIGITS_CONFIG", "Hyper", "TrainReport", "plot_losses", "train_parity"]
