"""Operator coverage: PyTorch's OpInfo samples through the ``hpugraph`` backend, against eager.

For each operator (an entry of ``torch.testing._internal.common_methods_invocations.op_db`` that
supports float32 on the CPU) and a few of its sample inputs, the sample becomes a function of its
tensors (``fn = lambda *tensors: op(*args, **kwargs)``, every non-tensor closed over), compiled
with ``torch.compile(fn, backend="hpugraph", dynamic=False)`` and

1. called twice on the same inputs (the first call captures, the second replays),
2. called once more on fresh random inputs of the same shapes, strides and dtypes (integer and
   bool tensors keep their values: they are indices, masks, sizes), which must go through the
   static input buffers,
3. and the first call's output is checked again at the end: a replay must never change what the
   user already holds.

Every result, every input the op may have written to, and every gradient (training variant) is
compared with eager by ``torch.testing.assert_close(equal_nan=True)``; strides of outputs are
compared as well where ``aot_eager`` reproduces eager's strides.

A failure is first re-run with ``backend="aot_eager"``: if that fails too, the problem is
Dynamo's or AOTAutograd's, and the case is skipped as ``torch-side`` with its error. Otherwise it
is an hpuopt bug and the test fails. Operators that are random in eager, whose output is
uninitialised memory, or that are nondeterministic in eager (detected: two eager calls on the
same inputs disagree) are skipped with their reason, and so is an operator Dynamo runs eagerly
for every sample (``no graph``: a graph break at the op leaves hpuopt nothing to compile).

A piece that runs uncaptured fails the test too, unless the reason is that a device would reject
one of its ops under capture (a legitimate fallback): a correct result from a replay that raised or
a buffer hpuopt could not build is still a bug, just a slow one.

Modes (one test id per operator and mode)
    ``infer``     inputs that do not require grad; default Dynamo flags.
    ``dynflags``  the same with ``capture_dynamic_output_shape_ops`` and ``capture_scalar_outputs``
                  on, for operators whose output shape or value is data dependent: they stay in
                  the graph and the split pass must cut around them.
    ``train``     float inputs require grad; gradients of ``sum(output * w)`` for a fixed random
                  ``w`` are compared too (forward and backward graphs both go through hpuopt).

The default run covers a curated subset (:data:`DEFAULT_OPS`); every other operator of op_db
runs with ``RUN_SLOW_TESTS=1`` (``test_op_full``), and so does the curated subset with every
static piece compiled by Inductor (``test_op_inductor_pieces``). A summary line
``op coverage: N passed, M failed, K skipped (...)`` is printed at the end of the module;
``OP_COVERAGE_REPORT=path.json`` also writes every case's outcome and message.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
import types
import unittest
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch._dynamo
import torch.utils._pytree as pytree

import hpuopt


def _import_op_db() -> list[Any]:
    """op_db, importing torch's test helpers without leaving their process-wide side effects.

    ``common_utils`` needs ``expecttest`` only for the base class of its ``TestCase``, which this
    module never uses: a stand-in keeps the test runnable where the package is not installed.
    On import it also freezes ``torch.backends`` flags and wraps TorchScript calls; both are
    undone, so collecting this module changes nothing for the other tests of the session.
    """
    try:
        import expecttest  # noqa: F401
    except ImportError:
        stub = types.ModuleType("expecttest")
        stub.TestCase = unittest.TestCase  # type: ignore[attr-defined]
        sys.modules["expecttest"] = stub
    frozen = torch.backends.flags_frozen()
    script_calls = (torch._C.ScriptFunction.__call__, torch._C.ScriptMethod.__call__)
    try:
        from torch.testing._internal.common_methods_invocations import op_db
    finally:
        if not frozen:
            # the flag is a global of torch/backends/__init__.py, whose module object is wrapped
            torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
        torch._C.ScriptFunction.__call__, torch._C.ScriptMethod.__call__ = script_calls
    return op_db


def _key(op: Any) -> str:
    return op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")


OPS: dict[str, Any] = {
    _key(op): op for op in _import_op_db() if torch.float32 in op.supported_dtypes("cpu")
}

# -- which operators, which modes -------------------------------------------------------------

DEFAULT_OPS: tuple[str, ...] = (
    # pointwise unary
    "abs", "acos", "asinh", "atan", "ceil", "cos", "erf", "erfinv", "exp", "expm1", "floor",
    "frac", "lgamma", "log", "log1p", "neg", "reciprocal", "round", "rsqrt", "sigmoid", "sign",
    "sin", "sqrt", "tanh", "trunc", "nan_to_num", "logit", "digamma", "special.erfcx",
    "isnan", "signbit",
    # pointwise binary / ternary
    "add", "sub", "mul", "div.no_rounding_mode", "div.floor_rounding", "remainder", "fmod", "pow",
    "atan2", "maximum", "minimum", "clamp", "lerp", "addcmul", "addcdiv", "where", "eq", "lt",
    "ne", "logical_and", "logical_not", "xlogy", "hypot", "copysign", "float_power",
    "masked_fill", "heaviside", "isclose", "__rsub__", "to", "float", "char",
    # reductions, scans, sorting
    "sum", "mean", "prod", "amax", "argmax", "max.reduction_with_dim", "min.reduction_no_dim",
    "std", "var_mean", "logsumexp", "norm", "linalg.vector_norm", "cumsum", "cumprod", "cummax",
    "logcumsumexp", "all", "any", "count_nonzero", "median", "nansum", "mode", "kthvalue", "topk",
    "sort", "argsort", "aminmax",
    # linear algebra (light)
    "mm", "bmm", "matmul", "addmm", "addmv", "baddbmm", "mv", "dot", "outer", "einsum",
    "tensordot", "kron", "linalg.det", "linalg.inv", "linalg.solve", "linalg.cholesky",
    "linalg.qr", "trace", "tril", "triu", "cross", "cdist", "diag_embed",
    # views and shapes
    "view", "reshape", "permute", "transpose", "squeeze", "unsqueeze", "expand", "flatten",
    "unflatten", "narrow", "select", "chunk", "split", "unbind", "movedim", "diagonal",
    "as_strided", "mT", "contiguous", "clone", "cat", "stack", "flip", "roll", "rot90", "repeat",
    "tile", "broadcast_to", "tensor_split", "unfold", "view_as_complex",
    # indexing, scatter/gather, data-dependent shapes
    "__getitem__", "gather", "scatter", "scatter_add", "scatter_reduce.sum", "index_select",
    "index_add", "index_copy", "index_fill", "index_put", "take", "take_along_dim",
    "masked_scatter", "masked_select", "nonzero", "nonzero_static", "unique", "unique_consecutive",
    "argwhere", "searchsorted", "bucketize", "repeat_interleave", "item", "equal", "histc",
    # torch.nn.functional
    "nn.functional.relu", "nn.functional.gelu", "nn.functional.silu", "nn.functional.elu",
    "nn.functional.hardtanh", "nn.functional.softplus", "softmax", "log_softmax",
    "nn.functional.layer_norm", "nn.functional.group_norm", "nn.functional.batch_norm",
    "nn.functional.rms_norm", "nn.functional.linear", "nn.functional.conv1d",
    "nn.functional.conv2d", "nn.functional.conv_transpose2d", "nn.functional.max_pool2d",
    "nn.functional.avg_pool2d", "nn.functional.adaptive_avg_pool2d", "nn.functional.embedding",
    "nn.functional.embedding_bag", "nn.functional.cross_entropy", "nn.functional.nll_loss",
    "nn.functional.mse_loss", "nn.functional.binary_cross_entropy_with_logits",
    "nn.functional.kl_div", "nn.functional.pad.constant", "nn.functional.pad.reflect",
    "nn.functional.interpolate.bilinear", "nn.functional.interpolate.nearest",
    "nn.functional.scaled_dot_product_attention", "nn.functional.normalize",
    "nn.functional.cosine_similarity", "nn.functional.pixel_shuffle", "nn.functional.unfold",
    "nn.functional.glu", "nn.functional.grid_sample",
    # factories and in-place
    "zeros_like", "full_like", "new_full", "arange", "linspace", "eye", "zero_", "fill",
)

# Operators whose output shape or value depends on data: they also run with Dynamo keeping them
# in the graph (``dynflags``), where the split pass has to cut around them.
DATA_DEPENDENT: frozenset[str] = frozenset({
    "nonzero", "nonzero_static", "argwhere", "unique", "unique_consecutive", "masked_select",
    "repeat_interleave", "item", "equal", "allclose", "__getitem__", "index_put", "masked_scatter",
    "histc", "histogram", "histogramdd", "bincount", "count_nonzero", "combinations", "isin",
    "take", "nn.functional.ctc_loss", "nn.functional.embedding_bag", "_segment_reduce.lengths",
    "_segment_reduce.offsets", "linalg.matrix_rank", "linalg.matrix_rank.hermitian",
    "nn.functional.max_unpool1d", "nn.functional.max_unpool2d", "nn.functional.max_unpool3d",
    "bucketize", "searchsorted", "nn.functional.one_hot",
})

# Operators whose gradients the default run checks (``train``).
DEFAULT_TRAIN: tuple[str, ...] = (
    "add", "mul", "div.no_rounding_mode", "sigmoid", "tanh", "exp", "log", "pow", "where",
    "masked_fill", "clamp", "sum", "mean", "amax", "var_mean", "logsumexp", "cumsum", "sort",
    "topk", "mm", "bmm", "matmul", "addmm", "einsum", "linalg.solve", "view", "reshape", "permute",
    "expand", "cat", "stack", "unbind", "__getitem__", "gather", "index_select", "scatter_add",
    "index_put", "nn.functional.relu", "nn.functional.gelu", "softmax", "log_softmax",
    "nn.functional.layer_norm", "nn.functional.group_norm", "nn.functional.linear",
    "nn.functional.conv2d", "nn.functional.max_pool2d", "nn.functional.avg_pool2d",
    "nn.functional.embedding", "nn.functional.cross_entropy", "nn.functional.mse_loss",
    "nn.functional.scaled_dot_product_attention", "nn.functional.pad.reflect",
    "nn.functional.normalize", "split",
)

# Random in eager: two eager calls differ, nothing to compare against.
_RANDOM_NAMES = frozenset({
    "bernoulli", "cauchy", "exponential", "geometric", "log_normal", "multinomial", "normal",
    "uniform", "nn.functional.rrelu", "nn.functional.fractional_max_pool2d",
    "nn.functional.fractional_max_pool3d", "svd_lowrank", "pca_lowrank",
})
_RANDOM_PARTS = ("rand", "dropout")
_NOT_RANDOM = frozenset({  # named like random ops, deterministic
    "native_dropout_backward", "nn.functional.feature_alpha_dropout.without_train",
})
# Whose output is uninitialised memory (or resized storage): values are not comparable.
_NOT_COMPARABLE = frozenset({
    "empty", "empty_like", "empty_permuted", "empty_strided", "new_empty", "new_empty_strided",
    "resize_", "resize_as_",
})

SAMPLES_PER_OP = int(os.environ.get("OP_COVERAGE_SAMPLES", "3"))
_SAMPLE_POOL = 24  # samples drawn from the generator to pick SAMPLES_PER_OP spread-out ones


def _static_skip(key: str) -> str | None:
    op = OPS[key]
    random = op.name in _RANDOM_NAMES or any(p in op.name for p in _RANDOM_PARTS)
    if random and key not in _NOT_RANDOM:
        return "random in eager"
    if op.name in _NOT_COMPARABLE:
        return "output not comparable (uninitialised memory)"
    return None


def _cases(keys: list[str]) -> list[Any]:
    out = []
    for key in keys:
        out.append(pytest.param(key, "infer", id=f"{key}-infer"))
        if key in DATA_DEPENDENT:
            out.append(pytest.param(key, "dynflags", id=f"{key}-dynflags"))
    return out


def _train_cases(keys: list[str]) -> list[Any]:
    return [pytest.param(k, "train", id=f"{k}-train") for k in keys if OPS[k].supports_autograd]


_DEFAULT = [k for k in DEFAULT_OPS if k in OPS]  # an op torch dropped is simply not collected
_REST = [k for k in OPS if k not in set(_DEFAULT)]
DEFAULT_CASES = _cases(_DEFAULT) + _train_cases([k for k in DEFAULT_TRAIN if k in OPS])
FULL_CASES = _cases(_REST) + _train_cases(
    [k for k in OPS if k not in set(DEFAULT_TRAIN)]
)

# -- tolerances -------------------------------------------------------------------------------

# float32 defaults of assert_close (rtol 1.3e-6, atol 1e-5), unless listed here. None is needed
# on the CPU runtime: pieces run the very ATen kernels eager runs. An entry belongs here only for
# an op whose AOTAutograd decomposition (CompositeImplicit) sums in another order than eager's
# fused kernel, with that reason next to it.
_TOLERANCES: dict[str, dict[str, float]] = {}


def _tol(key: str) -> dict[str, float]:
    return _TOLERANCES.get(key, {})


# -- inputs -----------------------------------------------------------------------------------


def _flat_sample(sample: Any) -> tuple[list[Any], Any]:
    leaves, spec = pytree.tree_flatten((sample.input, list(sample.args), dict(sample.kwargs)))
    return leaves, spec


def _make_fn(op: Any, leaves: list[Any], spec: Any) -> tuple[Callable[..., Any], list[int]]:
    """``fn(*tensors)`` calling ``op`` on the sample with ``tensors`` in the tensors' places."""
    slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    frozen = list(leaves)

    def fn(*tensors: torch.Tensor) -> Any:
        filled = list(frozen)
        for i, t in zip(slots, tensors):
            filled[i] = t
        inp, args, kwargs = pytree.tree_unflatten(filled, spec)
        return op(inp, *args, **kwargs)

    return fn, slots


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: a permutation of a contiguous layout."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _remake(t: torch.Tensor, values: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """A new tensor with ``t``'s size, strides, offset and dtype on fresh storage, holding
    ``values(storage of t)`` (a copy when ``values`` is None); leaves stay leaves."""
    with torch.no_grad():
        src = t.detach()
        n = src.untyped_storage().nbytes() // max(src.element_size(), 1)
        flat = src.as_strided((n,), (1,), 0) if n else src.new_empty(0)
        new_flat = (values(flat) if values is not None else flat.clone()).contiguous()
        if n == 0:
            out = src.clone()
        else:
            out = new_flat.as_strided(src.size(), src.stride(), src.storage_offset())
            if src._base is None and _dense(src):
                # not a view in the sample: not a view here either (Dynamo treats views apart)
                dense = torch.empty_strided(src.size(), src.stride(), dtype=src.dtype)
                out = dense.copy_(out)
    if t.requires_grad:
        out = out.detach().requires_grad_(True)
    return out


def _copy_args(args: list[torch.Tensor]) -> list[torch.Tensor]:
    memo: dict[int, torch.Tensor] = {}
    return [memo.setdefault(id(a), _remake(a, None)) for a in args]


def _is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _uniform_in_range(flat: torch.Tensor) -> torch.Tensor:
    finite = flat[torch.isfinite(flat)] if not flat.is_complex() else flat
    if flat.is_complex() or finite.numel() < 2 or finite.min() == finite.max():
        return torch.randn_like(flat)
    lo, hi = finite.min().item(), finite.max().item()
    return torch.empty_like(flat).uniform_(lo, hi)


def _scaled(flat: torch.Tensor) -> torch.Tensor:
    return flat * (0.5 + 0.5 * torch.rand(()).item())


# Fresh inputs, tried in order until eager accepts them: uniform values over the original's range;
# the original scaled by a random factor in [0.5, 1] (keeps positive-definite, sorted, signed
# inputs valid); a plain copy (new memory, same values) for ops with narrower domains.
_FRESH_STRATEGIES: tuple[tuple[str, Callable[[torch.Tensor], torch.Tensor] | None], ...] = (
    ("uniform", _uniform_in_range),
    ("scaled", _scaled),
    ("copy", None),
)


Fill = Callable[[torch.Tensor], torch.Tensor]


def _fresh_args(args: list[torch.Tensor], how: Fill | None) -> list[torch.Tensor]:
    memo: dict[int, torch.Tensor] = {}
    return [
        memo.setdefault(id(a), _remake(a, how if _is_float(a) else None)) for a in args
    ]


# -- comparison -------------------------------------------------------------------------------


class Mismatch(AssertionError):
    pass


def _assert_close(actual: Any, expected: Any, what: str, tol: dict[str, float]) -> None:
    a_leaves, a_spec = pytree.tree_flatten(actual)
    e_leaves, e_spec = pytree.tree_flatten(expected)
    if len(a_leaves) != len(e_leaves):
        raise Mismatch(f"{what}: structure differs: {a_spec} vs eager {e_spec}")
    for i, (a, e) in enumerate(zip(a_leaves, e_leaves)):
        if isinstance(e, torch.Tensor) != isinstance(a, torch.Tensor):
            raise Mismatch(f"{what}[{i}]: {type(a).__name__} vs eager {type(e).__name__}")
        if isinstance(e, torch.Tensor):
            if a.shape != e.shape or a.dtype != e.dtype:
                raise Mismatch(
                    f"{what}[{i}]: {a.dtype}{list(a.shape)} vs eager {e.dtype}{list(e.shape)}"
                )
            a, e = a.detach(), e.detach()
        try:
            torch.testing.assert_close(a, e, equal_nan=True, check_device=True, **tol)
        except AssertionError as exc:
            raise Mismatch(f"{what}[{i}]: {exc}") from None


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0, equal_nan=True)
    except AssertionError:
        return False
    return True


def _stride_diffs(actual: Any, expected: Any, what: str) -> list[str]:
    out = []
    for i, (a, e) in enumerate(zip(pytree.tree_leaves(actual), pytree.tree_leaves(expected))):
        if isinstance(a, torch.Tensor) and isinstance(e, torch.Tensor) and a.shape == e.shape:
            sig_a = [s for s, n in zip(a.stride(), a.shape) if n > 1]
            sig_e = [s for s, n in zip(e.stride(), e.shape) if n > 1]
            if a.numel() > 1 and sig_a != sig_e:
                out.append(f"{what}[{i}]: strides {a.stride()} vs eager {e.stride()}")
    return out


# -- one sample through one backend -------------------------------------------------------------


_DEVICE_REJECTION = "cannot run inside a device graph"


class SampleSkip(Exception):
    pass


@dataclasses.dataclass
class SampleResult:
    strides: list[str]
    fallbacks: list[str]
    graphs: int
    fresh: str
    uncompiled: list[str] = dataclasses.field(default_factory=list)
    """Pieces whose compile failed (``piece_compiler``): they ran their ATen ops, captured."""


@contextlib.contextmanager
def _flags(mode: str) -> Iterator[None]:
    on = mode == "dynflags"
    with torch._dynamo.config.patch(
        capture_dynamic_output_shape_ops=on, capture_scalar_outputs=on
    ):
        yield


def _detach_tree(x: Any) -> Any:
    return pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, x)


def _weights_for(out: Any) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(7)
    ws = []
    for o in pytree.tree_leaves(out):
        if isinstance(o, torch.Tensor) and o.requires_grad and _is_float(o):
            shape = torch.view_as_real(o.resolve_conj()).shape if o.is_complex() else o.shape
            ws.append(torch.randn(shape, generator=g, dtype=o.real.dtype))
        else:
            ws.append(None)
    return ws


def _call(
    fn: Callable[..., Any], args: list[torch.Tensor], train: bool, weights: list | None
) -> tuple[Any, Any]:
    """Runs ``fn``; in training, also the gradients of sum(out * w) w.r.t. the float inputs."""
    out = fn(*args)
    if not train:
        return out, None
    outs = pytree.tree_leaves(out)
    assert weights is not None
    if len(outs) != len(weights):
        raise Mismatch(f"{len(outs)} outputs vs eager {len(weights)}")
    terms = []
    for o, w in zip(outs, weights):
        if w is None:
            continue
        if not (isinstance(o, torch.Tensor) and o.requires_grad):
            raise Mismatch("an output that requires grad in eager does not here")
        terms.append(((torch.view_as_real(o.resolve_conj()) if o.is_complex() else o) * w).sum())
    wrt = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = torch.autograd.grad(sum(terms), wrt, allow_unused=True)
    return _detach_tree(out), grads


def _eager(
    fn: Callable[..., Any], args: list[torch.Tensor], train: bool, weights: list | None
) -> tuple[Any, Any]:
    try:
        return _call(fn, args, train, weights)
    except Mismatch:
        raise
    except Exception as exc:
        raise SampleSkip(f"eager raises {type(exc).__name__}: {_short(exc)}") from None


def run_sample(
    op: Any, sample: Any, backend: str, mode: str, tol: dict[str, float]
) -> SampleResult:
    """The protocol of the module docstring on one sample; raises Mismatch or the backend's
    error, SampleSkip when the sample tells nothing."""
    train = mode == "train"
    leaves, spec = _flat_sample(sample)
    fn, slots = _make_fn(op, leaves, spec)
    base = [leaves[i] for i in slots]
    if any(a.layout != torch.strided for a in base):
        raise SampleSkip("sparse input (only strided tensors are compared)")
    if train and not any(a.requires_grad for a in base):
        raise SampleSkip("no input requires grad")
    # eager, twice on the same inputs (the op may write to them: the compiled side mirrors it)
    e_args = _copy_args(base)
    pristine = _copy_args(base)
    weights = None
    if train:
        probe, _ = _eager(fn, _copy_args(base), False, None)
        weights = _weights_for(probe)
        if not any(w is not None for w in weights):
            raise SampleSkip("no differentiable output")
    torch.manual_seed(0)
    e1 = _eager(fn, e_args, train, weights)
    e1_snap = pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, e1)
    e2 = _eager(fn, e_args, train, weights)
    untouched = all(_same(a, p) for a, p in zip(e_args, pristine))
    if untouched:
        try:
            _assert_close(e2, e1_snap, "eager", {"rtol": 0, "atol": 0})
        except Mismatch:
            raise SampleSkip(
                "nondeterministic in eager (two calls on the same inputs differ)"
            ) from None
    # fresh inputs eager accepts
    fresh_name, f_base, f_expected = "", None, None
    for name, how in _FRESH_STRATEGIES:
        torch.manual_seed(1234)
        cand = _fresh_args(base, how)
        try:
            f_expected = _call(fn, _copy_args(cand), train, weights)
        except Exception:
            continue
        fresh_name, f_base = name, cand
        break
    if f_base is None:
        raise SampleSkip("eager rejects every fresh input")

    torch._dynamo.reset()
    before = hpuopt.counters.dynamo_graphs
    compiled = torch.compile(fn, backend=backend, dynamic=False)
    c_args = _copy_args(base)
    with warnings.catch_warnings(record=True) as caught, _flags(mode):
        warnings.simplefilter("always")
        torch.manual_seed(0)
        c1 = _call(compiled, c_args, train, weights)
        _assert_close(c1, e1, "call 1", tol)
        c2 = _call(compiled, c_args, train, weights)
        _assert_close(c2, e2, "call 2 (replay)", tol)
        _assert_close(c_args, e_args, "inputs after call 2", tol)
        f_args = _copy_args(f_base)
        c3 = _call(compiled, f_args, train, weights)
        _assert_close(c3, f_expected, f"call 3 (fresh inputs: {fresh_name})", tol)
        _assert_close(c1, e1, "call 1's output after later calls", tol)
        _assert_close(c2, e2, "call 2's output after call 3", tol)
    fallbacks = [
        str(w.message).split("runs uncaptured: ", 1)[1]
        for w in caught
        if "runs uncaptured: " in str(w.message)
    ]
    return SampleResult(
        strides=_stride_diffs(c1[0], e1[0], "out"),
        fallbacks=fallbacks,
        graphs=hpuopt.counters.dynamo_graphs - before,
        fresh=fresh_name,
        uncompiled=[str(w.message).split("uncompiled: ", 1)[1] for w in caught
                    if "runs its ATen ops uncompiled: " in str(w.message)],
    )


# -- one case: an operator in one mode ---------------------------------------------------------


def _short(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    # Dynamo wraps backend errors: the line naming the original error is the useful one
    for line in text:
        if "Error" in line and "torch._dynamo" not in line:
            first = line
            break
    return (first[:limit] + "...") if len(first) > limit else first


def _describe(sample: Any) -> str:
    def d(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.layout != torch.strided:
            return f"T{list(x.shape)}:{str(x.dtype).replace('torch.', '')}:{x.layout}"
        if isinstance(x, torch.Tensor):
            return f"T{list(x.shape)}:{str(x.dtype).replace('torch.', '')}" + (
                "" if x.is_contiguous() else ":nc"
            )
        return x

    leaves, spec = _flat_sample(sample)
    inp, args, kwargs = pytree.tree_unflatten([d(x) for x in leaves], spec)
    return f"input={inp} args={args} kwargs={kwargs}"


def _samples(op: Any, train: bool) -> list[Any]:
    torch.manual_seed(0)
    pool = []
    try:
        for s in op.sample_inputs("cpu", torch.float32, requires_grad=train):
            pool.append(s)
            if len(pool) >= _SAMPLE_POOL:
                break
    except Exception as exc:  # pragma: no cover - an OpInfo without CPU samples
        raise SampleSkip(f"no samples: {_short(exc)}") from None
    if len(pool) <= SAMPLES_PER_OP:
        return pool
    step = (len(pool) - 1) / (SAMPLES_PER_OP - 1) if SAMPLES_PER_OP > 1 else 0
    return [pool[round(i * step)] for i in range(SAMPLES_PER_OP)]


@dataclasses.dataclass
class CaseOutcome:
    case: str
    status: str  # passed, failed, skipped
    reason: str = ""
    details: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0


RESULTS: dict[str, CaseOutcome] = {}


def check_case(key: str, mode: str) -> CaseOutcome:
    start = time.perf_counter()
    case = f"{key}-{mode}"
    op = OPS[key]
    skip = _static_skip(key)
    if skip:
        return CaseOutcome(case, "skipped", skip)
    if mode == "train" and not op.supports_autograd:
        return CaseOutcome(case, "skipped", "no autograd support")
    tol = _tol(key)
    passed, failures, torch_side, skipped, notes, no_graph = 0, [], [], [], [], 0
    try:
        samples = _samples(op, mode == "train")
    except SampleSkip as exc:
        return CaseOutcome(case, "skipped", str(exc))
    for n, sample in enumerate(samples):
        where = f"sample {n} ({_describe(sample)})"
        try:
            res = run_sample(op, sample, "hpugraph", mode, tol)
        except SampleSkip as exc:
            skipped.append((where, str(exc)))
            continue
        except Exception as exc:  # a mismatch or an error through hpugraph
            err = f"{type(exc).__name__}: {_short(exc)}"
            try:
                run_sample(op, sample, "aot_eager", mode, tol)
            except SampleSkip:
                failures.append(f"{where}: {err}")
            except Exception as ref_exc:
                torch_side.append(
                    f"{where}: aot_eager fails too: {type(ref_exc).__name__}: {_short(ref_exc)}"
                )
            else:
                failures.append(f"{where}: {err}")
            continue
        passed += 1
        if res.strides:
            # a stride difference counts only where aot_eager reproduces eager's strides
            try:
                ref = run_sample(op, sample, "aot_eager", mode, tol)
            except Exception:
                ref = None
            if ref is not None and not ref.strides:
                failures.append(f"{where}: {'; '.join(res.strides)} (aot_eager matches eager)")
                passed -= 1
        for reason in res.fallbacks:
            # A device that rejects an op under capture is a legitimate fallback; any other
            # reason (a replay that raises, a buffer hpuopt cannot build) is hpuopt's own bug.
            if _DEVICE_REJECTION in reason:
                notes.append(f"{where}: fallback: {reason}")
            else:
                failures.append(f"{where}: piece runs uncaptured: {reason}")
                passed -= 1
                break
        if res.graphs == 0:
            no_graph += 1
        notes += [f"{where}: piece compile failed: {r}" for r in res.uncompiled]
        if res.fresh != "uniform":
            notes.append(f"{where}: fresh inputs: {res.fresh} (eager rejects uniform ones)")
    secs = time.perf_counter() - start
    if failures:
        details = failures + torch_side + notes
        return CaseOutcome(case, "failed", failures[0].splitlines()[0], details, secs)
    if passed and passed == no_graph:
        reason = "no graph: Dynamo runs every sample eagerly (graph break at the op)"
        skips = [f"{w}: {r}" for w, r in skipped]
        return CaseOutcome(case, "skipped", reason, torch_side + skips + notes, secs)
    if passed:
        skips = [f"{w}: {r}" for w, r in skipped]
        return CaseOutcome(case, "passed", "", torch_side + skips + notes, secs)
    if torch_side:
        return CaseOutcome(case, "skipped", "torch-side: " + torch_side[0], torch_side, secs)
    if skipped:
        return CaseOutcome(case, "skipped", skipped[0][1], [f"{w}: {r}" for w, r in skipped], secs)
    return CaseOutcome(case, "skipped", "no samples", [], secs)


def _run(key: str, mode: str, label: str = "") -> None:
    outcome = check_case(key, mode)
    outcome.case += label
    RESULTS[outcome.case] = outcome
    if outcome.status == "failed":
        message = f"{outcome.case}: fails through hpugraph\n" + "\n".join(outcome.details)
        pytest.fail(message, pytrace=False)
    if outcome.status == "skipped":
        pytest.skip(outcome.reason[:500])


# -- the tests ----------------------------------------------------------------------------------


def _skip_category(reason: str) -> str:
    if reason.startswith("torch-side"):
        return "torch-side"
    if reason.startswith("eager raises"):
        return "eager rejects samples"
    for cat in ("random", "not comparable", "nondeterministic", "no autograd", "no differentiable",
                "no input requires grad", "no samples", "eager rejects every", "no graph",
                "sparse input"):
        if cat in reason:
            return cat
    return reason[:40]


class _SummaryPlugin:
    """Prints the summary line with pytest's own summary, after the progress output."""

    lines: list[str] = []

    @staticmethod
    def pytest_terminal_summary(terminalreporter: Any) -> None:
        for line in _SummaryPlugin.lines:
            terminalreporter.write_line(line)
        _SummaryPlugin.lines.clear()


@pytest.fixture(scope="module", autouse=True)
def _coverage_summary(request: pytest.FixtureRequest) -> Iterator[None]:
    RESULTS.clear()
    start = time.perf_counter()
    # torch's structured-trace logger emits DEBUG records on every compile, and pytest attaches
    # its capture handlers to it: thousands of empty lines would follow every failure. Dropped
    # here unless a trace was asked for (TORCH_TRACE).
    trace_log = logging.getLogger("torch.__trace")
    drop = None if os.environ.get("TORCH_TRACE") else (lambda record: False)
    if drop is not None:
        trace_log.addFilter(drop)
    try:
        yield
    finally:
        if drop is not None:
            trace_log.removeFilter(drop)
    if not RESULTS:
        return
    counts = collections.Counter(o.status for o in RESULTS.values())
    cats = collections.Counter(
        _skip_category(o.reason) for o in RESULTS.values() if o.status == "skipped"
    )
    why = ", ".join(f"{n} {c}" for c, n in cats.most_common())
    line = (
        f"op coverage: {counts['passed']} passed, {counts['failed']} failed, "
        f"{counts['skipped']} skipped ({why or 'none'}) in {time.perf_counter() - start:.0f}s"
    )
    _SummaryPlugin.lines.append(line)
    manager = request.config.pluginmanager
    if not manager.is_registered(_SummaryPlugin):
        manager.register(_SummaryPlugin, "hpuopt-op-coverage-summary")
    path = os.environ.get("OP_COVERAGE_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump([dataclasses.asdict(o) for o in RESULTS.values()], f, indent=1)


@pytest.mark.parametrize("key, mode", DEFAULT_CASES)
def test_op(key: str, mode: str) -> None:
    """The curated subset: every operator family, a few samples each, against eager."""
    _run(key, mode)


@pytest.mark.slow
@pytest.mark.parametrize("key, mode", FULL_CASES)
def test_op_full(key: str, mode: str) -> None:
    """Every other float32 CPU operator of op_db (set RUN_SLOW_TESTS=1)."""
    _run(key, mode)


@pytest.mark.slow
@pytest.mark.parametrize("key, mode", DEFAULT_CASES)
def test_op_inductor_pieces(key: str, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The curated subset with every static piece compiled by Inductor before its capture
    (``piece_compiler="inductor"``; set RUN_SLOW_TESTS=1: about 12 minutes on two cores). A
    piece Inductor cannot compile runs its ATen ops, still captured, and is no failure here:
    the results must match eager either way."""
    monkeypatch.setenv("HPUOPT_PIECE_COMPILER", "inductor")
    _run(key, mode, label=" (inductor pieces)")
