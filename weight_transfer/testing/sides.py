"""Anyone's model as a side of a comparison: its parameters by path, and one run that records
every submodule's output in the order the calls finish, captured from outside (nothing in the
user's code changes).

- torch `nn.Module`: forward hooks on every submodule;
- `flax.nnx.Module`: each submodule's class `__call__` wrapped for the run (restored after),
  traced under `jax.jit`, so the model compiles once per run instead of dispatching op by op;
- a `(flax.linen.Module, variables)` pair (or `(module, variables, apply_kwargs)`):
  `flax.linen.intercept_methods` around `apply`, under `jax.jit` too.

Paths are dotted (`blocks.0.attn.qkv`); a parameter's owner is its path without the leaf. A
module called twice records `path#2` for its second call. Float64 runs cast every floating
parameter and buffer (JAX under `jax.enable_x64`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from weight_transfer.diagnostics.metrics import as_float64

LAYOUTS = ("NHWC", "NCHW")


@dataclass
class Run:
    """One forward: its output and each submodule's, in the order the calls finished."""

    output: np.ndarray
    outputs: dict[str, np.ndarray] = field(default_factory=dict)  # insertion: finish order


@dataclass
class ModelSide:
    name: str
    framework: str  # "torch" or "jax"
    input_layout: str  # what its forward takes: "NCHW" (torch) or "NHWC" (JAX), or stated
    params: dict[str, np.ndarray]  # path -> values as the model holds them (no copy for torch)
    run: Callable[[np.ndarray, bool], Run]  # (NHWC images, float64) -> Run
    grads: Callable[[np.ndarray, bool, Callable | None], dict[str, np.ndarray]]


def first_array(out):
    """The array a module returns: itself, a tuple's first array, a model output's `logits`
    or first array (Hugging Face), else None."""
    if hasattr(out, "shape") and hasattr(out, "dtype"):
        return out
    if hasattr(out, "logits") and getattr(out, "logits", None) is not None:
        return out.logits
    values = out.values() if isinstance(out, dict) else out
    if isinstance(values, (tuple, list)) or hasattr(values, "__iter__"):
        for v in values:
            found = first_array(v)
            if found is not None:
                return found
    return None


def _host(x) -> np.ndarray:
    """A parameter as a NumPy array in its own dtype (torch's without a copy; bfloat16 as
    float32)."""
    if type(x).__module__.startswith("torch"):
        x = x.detach().cpu()
        return (x.float() if str(x.dtype) == "torch.bfloat16" else x).numpy()
    return np.asarray(x)


def _record(seen: dict, calls: dict, path: str, value) -> None:
    """`seen[path] = value`, a module's second call as `path#2`."""
    calls[path] = calls.get(path, 0) + 1
    seen[path if calls[path] == 1 else f"{path}#{calls[path]}"] = value


def _images_for(images: np.ndarray, layout: str) -> np.ndarray:
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2) if layout == "NCHW" else images)


def default_loss(output):
    """A loss every logit reaches: the sum of the outputs times fixed weights (the same on
    both sides), in the output's own framework."""
    n = int(np.prod(output.shape))
    w = np.random.default_rng(0).standard_normal(n).reshape(tuple(output.shape))
    if type(output).__module__.startswith("torch"):
        import torch

        return (output * torch.from_numpy(w).to(output.dtype)).sum()
    return (output * w.astype(output.dtype)).sum()


# ---- torch ------------------------------------------------------------------------------------


def torch_side(model, input_layout: str = "NCHW") -> ModelSide:
    import torch

    model = model.eval()
    name = f"torch {type(model).__module__}.{type(model).__name__}"
    params = {k: _host(v) for k, v in model.named_parameters()}

    def cast(float64: bool):
        return copy.deepcopy(model).double() if float64 else model

    def run(images, float64):
        m = cast(float64)
        seen: dict[str, np.ndarray] = {}
        calls: dict[str, int] = {}
        handles = []
        for path, module in m.named_modules():
            if not path:
                continue

            def hook(mod, args, out, path=path):
                value = first_array(out)
                if value is not None and torch.is_tensor(value):
                    _record(seen, calls, path, as_float64(value))

            handles.append(module.register_forward_hook(hook))
        dtype = torch.float64 if float64 else torch.float32
        try:
            with torch.no_grad():
                x = torch.from_numpy(_images_for(images, input_layout)).to(dtype)
                out = first_array(m(x))
        finally:
            for h in handles:
                h.remove()
        _require_float64(name, out, float64)
        return Run(as_float64(out), seen)

    def grads(images, float64, loss):
        m = cast(float64)
        m.zero_grad(set_to_none=True)
        dtype = torch.float64 if float64 else torch.float32
        x = torch.from_numpy(_images_for(images, input_layout)).to(dtype).requires_grad_(True)
        (loss or default_loss)(first_array(m(x))).backward()
        out = {k: as_float64(p.grad) for k, p in m.named_parameters() if p.grad is not None}
        out["images"] = as_float64(x.grad)
        return out

    return ModelSide(name, "torch", input_layout, params, run, grads)


# ---- JAX: NNX and Linen -------------------------------------------------------------------------


def _cast_tree(tree, float64: bool):
    import jax
    import jax.numpy as jnp

    want = jnp.float64 if float64 else jnp.float32

    def cast(a):
        return jnp.asarray(a, want) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a

    return jax.tree.map(cast, tree)


def _x64(float64: bool):
    import jax

    return jax.enable_x64(True) if float64 else contextlib.nullcontext()


@contextlib.contextmanager
def _recording_calls(instances: dict[int, tuple[str, object]], seen: dict):
    """Each class of `instances` (id -> (path, module)) gets its `__call__` wrapped for the
    duration: the outermost call of a listed instance records its output (a subclass calling
    its parent's `__call__` records once)."""
    active: set[int] = set()
    calls: dict[str, int] = {}
    patched = []
    for cls in {type(m) for _, m in instances.values()}:
        original = cls.__dict__.get("__call__")

        def wrapper(self, *args, _inherited=cls.__call__, **kwargs):
            key = id(self)
            if key not in instances or key in active:
                return _inherited(self, *args, **kwargs)
            active.add(key)
            try:
                out = _inherited(self, *args, **kwargs)
            finally:
                active.discard(key)
            value = first_array(out)
            if value is not None:
                _record(seen, calls, instances[key][0], value)
            return out

        functools.update_wrapper(wrapper, cls.__call__)
        cls.__call__ = wrapper
        patched.append((cls, original))
    try:
        yield
    finally:
        for cls, original in patched:
            if original is None:
                del cls.__call__
            else:
                cls.__call__ = original


def _dotted(path) -> str:
    return ".".join(map(str, path))


def nnx_side(model, input_layout: str = "NHWC") -> ModelSide:
    from flax import nnx

    name = f"nnx {type(model).__module__}.{type(model).__name__}"
    graphdef, state = nnx.split(model)
    params = {
        _dotted(p): _host(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }

    def run(images, float64):
        return _jax_run(
            name,
            functools.partial(_nnx_jit(), graphdef, float64),
            state,
            images,
            input_layout,
            float64,
        )

    def grads(images, float64, loss):
        with _x64(float64):
            params_state, rest = _split_params(_cast_tree(state, float64))

            def objective(p, x):
                m = nnx.merge(graphdef, p, rest)
                if float64:
                    _compute_in_float64(m)
                return (loss or default_loss)(first_array(m(x)))

            flatten = lambda g: {_dotted(p): v.get_value() for p, v in nnx.to_flat_state(g)}
            return _jax_grads(objective, params_state, images, input_layout, float64, flatten)

    return ModelSide(name, "jax", input_layout, params, run, grads)


@functools.cache
def _nnx_jit():
    """`_nnx_forward` under `jax.jit`, the graph static: one compile per model structure and
    dtype, kept across comparisons."""
    import jax

    return jax.jit(_nnx_forward, static_argnums=(0, 1))


def _nnx_forward(graphdef, float64: bool, state, x):
    """The NNX model's output and every submodule's, recorded while it is traced."""
    from flax import nnx

    m = nnx.merge(graphdef, state)
    if float64:
        _compute_in_float64(m)
    instances = {
        id(sub): (_dotted(p), sub) for p, sub in nnx.iter_graph(m) if p and _is_module(sub)
    }
    seen: dict = {}
    with _recording_calls(instances, seen):
        out = first_array(m(x))
    return out, seen


@functools.cache
def _linen_jit():
    import jax

    return jax.jit(_linen_forward, static_argnums=(0, 1))


def _linen_forward(module, apply_kwargs: tuple, variables, x):
    """The Linen model's output and every submodule's `__call__`, intercepted."""
    import flax.linen as nn

    seen: dict = {}
    calls: dict = {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        path = ".".join(context.module.path)
        value = first_array(out)
        if context.method_name == "__call__" and value is not None and path:
            _record(seen, calls, path, value)
        return out

    with nn.intercept_methods(interceptor):
        out = first_array(module.apply(variables, x, **dict(apply_kwargs)))
    return out, seen


def _jax_run(name: str, forward, tree, images, layout: str, float64: bool) -> Run:
    """`forward(tree, images) -> (output, {path: output})` (jitted), with `tree` cast to the
    run's dtype (float64 under x64)."""
    with _x64(float64):
        out, seen = forward(_cast_tree(tree, float64), _as(images, layout, float64))
        _require_float64(name, out, float64)
        return Run(as_float64(out), {k: as_float64(v) for k, v in seen.items()})


def _jax_grads(objective, params, images, layout: str, float64: bool, flatten) -> dict:
    """d objective(params, images) / d params (flattened by `flatten`) and d / d images."""
    import jax

    gp, gx = jax.jit(jax.grad(objective, argnums=(0, 1)))(params, _as(images, layout, float64))
    out = {k: as_float64(v) for k, v in flatten(gp).items()}
    out["images"] = as_float64(gx)
    return out


def _compute_in_float64(model) -> None:
    """Modules that fix a float32 compute dtype (flax's `dtype=`, `param_dtype=`) told to
    compute in float64 (this merged copy only)."""
    import jax.numpy as jnp
    from flax import nnx

    for _, m in nnx.iter_graph(model):
        if isinstance(m, nnx.Module):
            for attr in ("dtype", "param_dtype"):
                if getattr(m, attr, None) in (jnp.float32, np.float32):
                    object.__setattr__(m, attr, jnp.float64)


def _require_float64(name: str, out, float64: bool) -> None:
    if float64 and not str(out.dtype).endswith("float64"):
        from vit_config import ArgumentError

        raise ArgumentError(
            f"{name}: its float64 run computed in {out.dtype} (a module fixes its dtype), so "
            f"its noise floor cannot be measured; compare with float64=False "
            f"(--no-parity-float64)"
        )


def _split_params(state):
    """(the Param state, everything else) of an NNX state."""
    from flax import nnx

    return nnx.split_state(state, nnx.Param, ...)


def _is_module(node) -> bool:
    from flax import nnx

    return isinstance(node, nnx.Module)


def _as(images: np.ndarray, layout: str, float64: bool) -> np.ndarray:
    return _images_for(images, layout).astype(np.float64 if float64 else np.float32)


def linen_side(module, variables, apply_kwargs=None, input_layout: str = "NHWC") -> ModelSide:
    from flax.traverse_util import flatten_dict

    name = f"linen {type(module).__module__}.{type(module).__name__}"
    apply_kwargs = dict(apply_kwargs or {})
    params = {".".join(k): _host(v) for k, v in flatten_dict(variables["params"]).items()}

    def run(images, float64):
        static = (module, tuple(sorted(apply_kwargs.items())))
        try:
            hash(static)
            jitted = functools.partial(_linen_jit(), *static)
        except TypeError:  # an unhashable module or argument: traced for this run only
            import jax

            jitted = jax.jit(functools.partial(_linen_forward, *static))
        return _jax_run(name, jitted, variables, images, input_layout, float64)

    def grads(images, float64, loss):
        with _x64(float64):
            cast = _cast_tree(variables, float64)

            def objective(p, x):
                out = module.apply({**cast, "params": p}, x, **apply_kwargs)
                return (loss or default_loss)(first_array(out))

            flatten = lambda g: {".".join(k): v for k, v in flatten_dict(g).items()}
            return _jax_grads(objective, cast["params"], images, input_layout, float64, flatten)

    return ModelSide(name, "jax", input_layout, params, run, grads)


def model_side(model, input_layout: str | None = None) -> ModelSide:
    """The side for a torch module, an NNX module or a `(linen module, variables[, kwargs])`."""
    if input_layout is not None and input_layout not in LAYOUTS:
        from vit_config import ArgumentError

        raise ArgumentError(f"input layout {input_layout!r}: expected one of {LAYOUTS}")
    if isinstance(model, tuple) and len(model) in (2, 3):
        return linen_side(*model, input_layout=input_layout or "NHWC")
    kind = type(model).__mro__
    names = {f"{c.__module__}.{c.__name__}" for c in kind}
    if "torch.nn.modules.module.Module" in names:
        return torch_side(model, input_layout or "NCHW")
    if any(n.startswith("flax.nnx") and n.endswith(".Module") for n in names):
        return nnx_side(model, input_layout or "NHWC")
    raise TypeError(
        f"cannot compare a {type(model).__module__}.{type(model).__name__}: expected a "
        f"torch.nn.Module, a flax.nnx.Module or a (flax.linen.Module, variables) pair"
    )
