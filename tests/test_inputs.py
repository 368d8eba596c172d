"""Bad and unusual inputs and outputs, each compared with eager PyTorch.

Every case runs through both public routes: ``torch.compile(..., backend="hpugraph",
options=...)`` and ``hpuopt.compile(..., **options)`` (which also keeps dynamic ops inside
Dynamo graphs). Expected values are always computed by running the same function eagerly on
clones of the same fresh random inputs.
"""

from __future__ import annotations

import collections
import dataclasses
import warnings

import pytest
import torch
import torch._dynamo

import hpuopt
from hpuopt.runtime.entry import STALE_READS_RAISE

# -- the two routes ---------------------------------------------------------------------------


def _torch_compile(fn, **options):
    return torch.compile(fn, backend="hpugraph", options=options or None)


def _hpuopt_compile(fn, **options):
    return hpuopt.compile(fn, **options)


@pytest.fixture(params=[_torch_compile, _hpuopt_compile], ids=["torch.compile", "hpuopt.compile"])
def compile_fn(request):
    return request.param


def check(compiled, fn, *args, **kwargs):
    """Calls ``fn`` eagerly and ``compiled`` on clones of the same arguments; compares the
    outputs and every tensor argument afterwards (mutations). Returns the compiled output."""

    def clone(a):
        return a.clone() if isinstance(a, torch.Tensor) else a

    ref_args = [clone(a) for a in args]
    ref_kwargs = {k: clone(v) for k, v in kwargs.items()}
    got_args = [clone(a) for a in args]
    got_kwargs = {k: clone(v) for k, v in kwargs.items()}
    expected = fn(*ref_args, **ref_kwargs)
    actual = compiled(*got_args, **got_kwargs)
    assert_tree_equal(actual, expected)
    for a, e in zip(got_args, ref_args):
        if isinstance(e, torch.Tensor):
            torch.testing.assert_close(a, e)
    return actual


def assert_tree_equal(actual, expected, path="out"):
    assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype, path
        assert actual.shape == expected.shape, path
        torch.testing.assert_close(actual, expected, msg=lambda m: f"{path}: {m}")
    elif isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_tree_equal(a, e, f"{path}[{i}]")
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), path
        for k in expected:
            assert_tree_equal(actual[k], expected[k], f"{path}[{k!r}]")
    elif dataclasses.is_dataclass(expected):
        for f in dataclasses.fields(expected):
            assert_tree_equal(getattr(actual, f.name), getattr(expected, f.name),
                              f"{path}.{f.name}")
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=1e-5, abs=1e-6), path
    else:
        assert actual == expected, path


# -- keyword and non-tensor arguments ---------------------------------------------------------


def _branchy(x, y=None, *, scale=1.0, n=2, flag=True, mode="relu"):
    out = x * scale
    if y is not None:
        out = out + y
    for _ in range(n):
        out = out.sin() + x
    if flag:
        out = out * 2
    if mode == "relu":
        out = out.relu()
    elif mode == "sigmoid":
        out = out.sigmoid()
    else:
        out = out.tanh()
    return out


def test_keyword_and_non_tensor_arguments(compile_fn):
    compiled = compile_fn(_branchy)
    cases = [
        {},
        {"scale": 0.5},
        {"scale": -2.0, "n": 3},
        {"flag": False, "mode": "sigmoid"},
        {"mode": "tanh", "n": 1},
        {"y": "tensor"},
        {"y": None, "flag": False},
    ]
    for case in cases * 2:  # twice: the second round hits the caches
        kwargs = dict(case)
        if kwargs.get("y") == "tensor":
            kwargs["y"] = torch.randn(4, 3)
        check(compiled, _branchy, torch.randn(4, 3), **kwargs)
    assert hpuopt.counters.replays > 0


def test_positional_non_tensor_arguments(compile_fn):
    def fn(x, k, alpha, use_cos, label, maybe):
        out = x * alpha + k
        out = out.cos() if use_cos else out.sin()
        if label == "double":
            out = out * 2
        if maybe is not None:
            out = out + maybe
        return out

    compiled = compile_fn(fn)
    for args in [(3, 0.25, True, "double", None), (1, -1.5, False, "single", None),
                 (3, 0.25, True, "double", None), (2, 2.0, False, "double", 7)]:
        check(compiled, fn, torch.randn(5, 2), *args)


# -- nested outputs ---------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    hidden: torch.Tensor
    logits: torch.Tensor


Pair = collections.namedtuple("Pair", ["first", "second"])


def _nested(x):
    h = (x @ x.T).relu()
    return {
        "tuple": (h, h.sum(1)),
        "list": [x.sin(), [x.cos()]],
        "pair": Pair(h + 1, x * 3),
        "n": 3,
    }


def test_nested_outputs(compile_fn):
    compiled = compile_fn(_nested)
    for b in (4, 4, 6):
        out = check(compiled, _nested, torch.randn(b, 3))
        assert isinstance(out["pair"], Pair)


def test_dataclass_output(compile_fn):
    def fn(x):
        h = x.relu() * 2
        return Result(hidden=h, logits=h.sum(-1))

    compiled = compile_fn(fn)
    for b in (3, 3, 5):
        out = check(compiled, fn, torch.randn(b, 4))
        assert isinstance(out, Result)


# -- scalar outputs ---------------------------------------------------------------------------


def test_zero_dim_tensor_outputs(compile_fn):
    def fn(x):
        return x.sum(), (x * x).mean(), x.amax()

    compiled = compile_fn(fn)
    for b in (4, 4, 7):
        out = check(compiled, fn, torch.randn(b, 3))
        assert all(o.dim() == 0 for o in out)


def test_python_float_from_item(compile_fn):
    def fn(x):
        s = (x.sin() * 2).sum().item()
        return s, x * s

    compiled = compile_fn(fn)
    for b in (4, 4, 6):
        out = check(compiled, fn, torch.randn(b, 3))
        assert isinstance(out[0], float)


# -- empty tensors ----------------------------------------------------------------------------


def test_empty_batch(compile_fn):
    w = torch.randn(3, 5)

    def fn(x):
        return (x @ w).relu() + 1, x.sum(0)

    compiled = compile_fn(fn)
    for b in (0, 0, 4, 0):
        out = check(compiled, fn, torch.randn(b, 3))
        assert out[0].shape == (b, 5)


def test_mask_that_selects_nothing(compile_fn):
    def fn(x):
        y = x.sin()
        picked = y[y > 5]  # sin <= 1: always empty
        idx = torch.nonzero(y > 5)
        return picked * 2 + 1, idx, picked.sum(), y.cos()

    compiled = compile_fn(fn)
    for b in (4, 4, 6):
        out = check(compiled, fn, torch.randn(b, 3))
        assert out[0].shape == (0,) and out[1].shape == (0, 2)


# -- non-contiguous inputs --------------------------------------------------------------------


def _affine(x):
    return (x * 2 + 1).sin() @ torch.ones(x.shape[-1], 2) + x.sum(-1, keepdim=True)


@pytest.mark.parametrize("make", [
    pytest.param(lambda: torch.randn(3, 6).T, id="transposed"),
    pytest.param(lambda: torch.randn(12, 7)[::2, 1::3], id="sliced-with-step"),
    pytest.param(lambda: torch.randn(1, 5).expand(4, 5), id="expanded"),
    pytest.param(lambda: torch.randn(5).broadcast_to(3, 5), id="broadcast"),
])
def test_non_contiguous_inputs(compile_fn, make):
    compiled = compile_fn(_affine)
    for _ in range(3):
        x = make()
        assert not x.is_contiguous()
        before = x.clone()
        check(compiled, _affine, x)
        torch.testing.assert_close(x, before)  # a read-only input stays as it was
        # the compiled function sees the caller's values, not a stale static buffer
        check(compiled, _affine, make())


def test_non_contiguous_then_contiguous(compile_fn):
    compiled = compile_fn(_affine)
    base = torch.randn(6, 4)
    check(compiled, _affine, base.T)
    check(compiled, _affine, base.T.contiguous())
    check(compiled, _affine, torch.randn(4, 6))
    check(compiled, _affine, torch.randn(8, 6)[::2])


# -- inputs that change between calls ---------------------------------------------------------


def _poly(x):
    return (x * x + x.sin()).sum(-1) * 0.5 + x.mean()


def test_dtype_changes_between_calls(compile_fn):
    compiled = compile_fn(_poly)
    for dtype in (torch.float32, torch.float64, torch.float32, torch.float64):
        out = check(compiled, _poly, torch.randn(4, 3, dtype=dtype))
        assert out.dtype == dtype


def test_rank_changes_between_calls(compile_fn):
    compiled = compile_fn(_poly)
    for shape in ((4, 3), (2, 4, 3), (5,), (4, 3), (2, 2, 2, 3)):
        check(compiled, _poly, torch.randn(shape))


def test_requires_grad_changes_between_calls(compile_fn):
    compiled = compile_fn(_poly)
    for requires_grad in (False, True, False, True):
        x = torch.randn(4, 3)
        ref = x.clone().requires_grad_(requires_grad)
        got = x.clone().requires_grad_(requires_grad)
        expected = _poly(ref)
        actual = compiled(got)
        torch.testing.assert_close(actual, expected)
        assert actual.requires_grad == expected.requires_grad
        if requires_grad:
            expected.sum().backward()
            actual.sum().backward()
            torch.testing.assert_close(got.grad, ref.grad)


# -- outputs that alias inputs or each other --------------------------------------------------


def test_output_is_input_or_a_view_of_it(compile_fn):
    def fn(x):
        return x, x.view(-1), x[1:], x * 2

    compiled = compile_fn(fn)
    for b in (4, 4, 6):
        x = torch.randn(b, 3)
        expected = fn(x.clone())
        out = compiled(x)
        assert_tree_equal(out, expected)
        # eager semantics: the first three alias the caller's tensor
        assert out[0] is x or out[0].data_ptr() == x.data_ptr()
        assert out[1].data_ptr() == x.data_ptr() and out[2]._base is not None
        x.add_(1.0)
        torch.testing.assert_close(out[0], x)
        torch.testing.assert_close(out[1], x.view(-1))
        torch.testing.assert_close(out[2], x[1:])
        torch.testing.assert_close(out[3], expected[3])  # a fresh tensor: unchanged


def test_same_tensor_returned_twice(compile_fn):
    def fn(x):
        y = (x + 1).relu()
        return y, y, y.sum()

    compiled = compile_fn(fn)
    for b in (3, 3, 5):
        out = check(compiled, fn, torch.randn(b, 4))
        # eager returns one tensor twice: writing through one is seen through the other
        out[0].mul_(3)
        torch.testing.assert_close(out[1], out[0])


# -- outputs and later calls ------------------------------------------------------------------


def _head(x):
    return (x @ torch.ones(3, 4)).relu() * 2 + x.sum()


def test_earlier_outputs_survive_later_calls(compile_fn):
    compiled = compile_fn(_head)
    held = []
    for b in (4, 4, 4, 6, 4, 6):
        x = torch.randn(b, 3)
        out = compiled(x.clone())
        held.append((out, _head(x)))
    for out, expected in held:
        torch.testing.assert_close(out, expected)
    assert hpuopt.counters.replays >= 6 and hpuopt.counters.cache_hits > 0


def test_clone_outputs_false_aliases_the_graph_buffers(compile_fn):
    """``clone_outputs=False`` returns the captured graph's own output buffers: a later replay
    of the same graph (same signature) overwrites what an earlier call returned, so the earlier
    result then reads the latest one. A call with another signature replays another graph and
    leaves it alone."""
    compiled = compile_fn(_head, clone_outputs=False)
    x1, x2, x3 = torch.randn(4, 3), torch.randn(4, 3), torch.randn(6, 3)
    out1 = compiled(x1.clone())
    torch.testing.assert_close(out1, _head(x1))
    snapshot = out1.clone()
    out2 = compiled(x2.clone())
    torch.testing.assert_close(out2, _head(x2))
    if STALE_READS_RAISE:  # a torch build with CUDA support refuses the read instead
        with pytest.raises(RuntimeError, match="overwritten by a later call"):
            out1 + 1
    else:
        torch.testing.assert_close(out1, out2)  # the documented aliasing: out1 reads the latest
        assert out1.data_ptr() == out2.data_ptr()
        assert not torch.equal(out1, snapshot)
    latest = out2.clone()
    out3 = compiled(x3.clone())  # another shape: another graph
    torch.testing.assert_close(out3, _head(x3))
    torch.testing.assert_close(out2, latest)


# -- options ----------------------------------------------------------------------------------


def _compile_and_call(compile_fn, **options):
    compiled = compile_fn(_head, **options)
    return compiled(torch.randn(4, 3))


def _config_error(excinfo_value) -> hpuopt.ConfigError | None:
    exc = excinfo_value
    while exc is not None:
        if isinstance(exc, hpuopt.ConfigError):
            return exc
        exc = getattr(exc, "inner_exception", None) or exc.__cause__
    return None


def test_unknown_option_lists_valid_options(compile_fn):
    with pytest.raises(Exception) as info:
        _compile_and_call(compile_fn, max_graph=3)
    err = _config_error(info.value)
    assert err is not None, f"expected a ConfigError, got {info.value!r}"
    text = str(err)
    assert "max_graph" in text
    for name in hpuopt.Config.field_names():
        assert name in text


def test_unknown_option_raises_at_hpuopt_compile_time():
    """``hpuopt.compile`` checks its options before anything runs (``torch.compile`` can only
    reach the backend on the first call, where Dynamo wraps the ConfigError in
    BackendCompilerFailed; test_unknown_option_lists_valid_options covers that route)."""
    with pytest.raises(hpuopt.ConfigError, match="valid options"):
        hpuopt.compile(_head, not_an_option=True)


@pytest.mark.parametrize("options", [
    {"max_graphs": "3"},
    {"max_graphs": 2.5},
    {"max_graphs": True},
    {"max_graphs": 0},
    {"strict": "yes"},
    {"strict": 1},
    {"clone_outputs": None},
    {"disable_passes": "split"},
    {"disable_passes": [1, 2]},
    {"dynamic_ops": "aten.nonzero"},
    {"runtime": "tpu"},
    {"runtime": 3},
    {"warmup_runs": -1},
], ids=lambda o: "-".join(f"{k}={v!r}" for k, v in o.items()))
def test_bad_option_values(compile_fn, options):
    with pytest.raises(Exception) as info:
        _compile_and_call(compile_fn, **options)
    assert _config_error(info.value) is not None, f"expected a ConfigError, got {info.value!r}"


# -- strict and fallbacks ---------------------------------------------------------------------


def _with_nonzero(x):
    y = x.sin() * 2
    idx = torch.nonzero(y > 0)
    return y + 1, idx


def test_uncapturable_piece_falls_back_with_warning(dynamic_op_flags, compile_fn):
    # without the split the whole graph, nonzero included, is one piece: the CPU runtime's
    # capture check rejects it, so the piece runs uncaptured and still gives the right answer
    compiled = compile_fn(_with_nonzero, disable_passes=["split"])
    with pytest.warns(UserWarning, match="uncaptured"):
        before = hpuopt.counters.snapshot()
        check(compiled, _with_nonzero, torch.randn(4, 3))
    d = hpuopt.counters.delta(before)
    assert d["fallbacks"] == 1 and d["uncaptured_runs"] == 1 and d["graphs_captured"] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not on every call
        before = hpuopt.counters.snapshot()
        check(compiled, _with_nonzero, torch.randn(4, 3))
    assert hpuopt.counters.delta(before)["uncaptured_runs"] == 1


def test_strict_turns_the_fallback_into_an_error(dynamic_op_flags, compile_fn):
    compiled = compile_fn(_with_nonzero, disable_passes=["split"], strict=True)
    with pytest.raises(hpuopt.FallbackError) as info:
        compiled(torch.randn(4, 3))
    assert "nonzero" in str(info.value)
    assert info.value.reason


def test_strict_with_the_split_captures_fine(dynamic_op_flags, compile_fn):
    compiled = compile_fn(_with_nonzero, strict=True)
    for b in (4, 4, 5):
        check(compiled, _with_nonzero, torch.randn(b, 3))
    assert hpuopt.counters.fallbacks == 0 and hpuopt.counters.replays > 0


# -- parameters reassigned between calls ------------------------------------------------------


def test_parameter_reassigned_between_calls(compile_fn):
    lin = torch.nn.Linear(3, 4)
    model = torch.nn.Sequential(lin, torch.nn.ReLU())
    compiled = compile_fn(model)
    x = torch.randn(5, 3)
    with torch.no_grad():
        check(compiled, model, x)
        check(compiled, model, torch.randn(5, 3))
        before = hpuopt.counters.snapshot()
        lin.weight.data = torch.randn_like(lin.weight)
        lin.bias.data = torch.randn_like(lin.bias)
        check(compiled, model, x)
        assert hpuopt.counters.delta(before)["recaptures"] >= 1
        check(compiled, model, torch.randn(5, 3))
        # an in-place update keeps the address: the graph reads it with no recapture
        before = hpuopt.counters.snapshot()
        lin.weight.mul_(-1.5)
        check(compiled, model, x)
        assert hpuopt.counters.delta(before)["recaptures"] == 0


# -- inputs that alias each other, mutated inputs ---------------------------------------------


def test_mutated_input_is_returned(compile_fn):
    def fn(x):
        x.add_(1.5)
        return x, x.sum()

    compiled = compile_fn(fn)
    for b in (3, 3, 5):
        x = torch.randn(b, 4)
        ref = x.clone()
        expected = fn(ref)
        out = compiled(x)
        assert_tree_equal(out, expected)
        torch.testing.assert_close(x, ref)
        assert out[0].data_ptr() == x.data_ptr()


def test_same_tensor_passed_twice_and_mutated(compile_fn):
    def fn(x, y):
        x.mul_(2)
        return y * 3 + 1  # y is x: it sees the write

    compiled = compile_fn(fn)
    for _ in range(3):
        x = torch.randn(4, 3)
        ref = x.clone()
        expected = fn(ref, ref)
        actual = compiled(x, x)
        torch.testing.assert_close(actual, expected)
        torch.testing.assert_close(x, ref)


def test_input_that_is_a_view_of_another_input(compile_fn):
    def fn(x, row):
        x.mul_(2)
        return (x + row).sum(0)

    compiled = compile_fn(fn)
    for _ in range(3):
        x = torch.randn(4, 3)
        ref = x.clone()
        expected = fn(ref, ref[1])
        actual = compiled(x, x[1])
        torch.testing.assert_close(actual, expected)
        torch.testing.assert_close(x, ref)


def test_integer_and_bool_inputs(compile_fn):
    def fn(x, mask):
        return (x * 3 + 1) % 5, torch.where(mask, x, -x), mask.logical_not()

    compiled = compile_fn(fn)
    for b in (4, 4, 6):
        check(compiled, fn, torch.randint(-10, 10, (b, 3)), torch.randn(b, 3) > 0)


def test_outputs_survive_eviction(compile_fn):
    """``max_graphs=1`` with alternating shapes evicts and re-captures on every call; what the
    caller holds from each call stays its own."""
    compiled = compile_fn(_head, max_graphs=1)
    held = []
    for b in (2, 5, 2, 5, 2):
        x = torch.randn(b, 3)
        held.append((compiled(x.clone()), _head(x)))
    for out, expected in held:
        torch.testing.assert_close(out, expected)
    assert hpuopt.counters.evictions >= 3


def test_a_non_dense_output_keeps_its_strides(compile_fn):
    """An output sliced out of a row-padded buffer (how attention aligns a bias's rows) reaches
    the caller with eager's strides, not as a dense clone: kernels read the alignment."""

    def aligned(x):
        return torch.nn.functional.pad(x * 2, (0, 16 - x.shape[-1] % 16))[..., : x.shape[-1]]

    compiled = compile_fn(aligned)
    exact = torch.compile(aligned, backend="hpugraph", options={"padding": False})
    for n in (7, 7, 9):
        x = torch.randn(3, n)
        ref, out = aligned(x), compiled(x)
        torch.testing.assert_close(out, ref)
        # padded to a bucket, the rows are aligned as eager's are (the alignment is computed
        # from the bucket's width); at exact shapes the strides are eager's own
        assert out.stride()[1] == 1 and out.stride()[0] % 16 == 0 and not out.is_contiguous()
        kept = exact(x)
        torch.testing.assert_close(kept, ref)
        assert kept.stride() == ref.stride()
