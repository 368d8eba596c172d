"""Property tests of the split: random DAG programs with dynamic ops at random places.

A program is drawn as *data* (a :class:`Program`: input width, a list of ops that name earlier
values by index, the values returned) and turned into a Python function that interprets the
description when called, so hypothesis can shrink and print it. Ops come from a pool of
elementwise ops, matmuls against weights made when the program is built, reductions, views,
in-place ops (on intermediates and on an input of the function) and dynamic ops: boolean-mask
indexing, ``nonzero``, ``.item()`` used as a multiplier, ``unique`` and ``masked_select``.

Two properties:

(a) pass level — the ATen graph of the program (``make_fx``, symbolic) split by ``SplitPass``:
    every dynamic op sits in a dynamic piece, no static piece holds one (nor defines an unbacked
    symbol, nor consumes a data-dependent scalar), and the stitched pieces compute what the
    original graph computes, mutations of the inputs included;
(b) end to end — ``torch.compile(fn, backend="hpugraph")`` with the Dynamo dynamic-op flags on
    or off equals eager on fresh random inputs (outputs and the mutated input), over two calls
    of one shape and one call with another leading size; earlier outputs do not change under
    later calls; and the counters add up.
"""

from __future__ import annotations

import dataclasses
import itertools
import linecache
import math
from typing import Any

import pytest
import torch
import torch._dynamo
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import hpuopt
from hpuopt.passes.split import SplitPass
from hpuopt.testing import aten_graph

aten = torch.ops.aten

# -- programs ---------------------------------------------------------------------------------

DYNAMIC_KINDS = ("mask", "nonzero", "item", "unique", "masked_select")

# ATen ops the dynamic kinds above trace to (boolean-mask indexing is aten.index.Tensor; no other
# op of the pool produces it). Decided here from the program pool, not from hpuopt's own tables.
DYNAMIC_ATEN = {
    "aten.index.Tensor",
    "aten.nonzero.default",
    "aten._local_scalar_dense.default",
    "aten._unique2.default",
    "aten.masked_select.default",
}


@dataclasses.dataclass(frozen=True)
class Program:
    """``dim``: width of every input ``(B, dim)``; ``n_inputs`` inputs are values 0..n-1; op k
    produces value ``n_inputs + k``; ``outputs`` indexes the values returned."""

    dim: int
    n_inputs: int
    ops: tuple[tuple[Any, ...], ...]
    outputs: tuple[int, ...]

    @property
    def dynamic(self) -> bool:
        return any(op[0] in DYNAMIC_KINDS for op in self.ops)

    @property
    def mutates_input(self) -> bool:
        return any(op[0] == "input_inplace" for op in self.ops)


def make_weights(program: Program) -> list[torch.Tensor]:
    """One weight per matmul op, made from the op's seed (independent of the global RNG)."""
    weights = []
    for op in program.ops:
        if op[0] == "matmul":
            _, _, rows, cols, seed = op
            g = torch.Generator().manual_seed(seed)
            weights.append(torch.randn(rows, cols, generator=g) / math.sqrt(rows))
    return weights


def source(program: Program, weights_as_inputs: bool = False) -> str:
    """Straight-line Python for ``program``, one line per op.

    Generated code rather than a loop over the ops at call time: Dynamo gives up on a whole
    frame when a graph break (a dynamic op with the flags off) falls inside a loop, so an
    interpreter loop would never reach the backend in that setting."""
    n_in = program.n_inputs
    n_w = sum(op[0] == "matmul" for op in program.ops)
    params = [f"v{i}" for i in range(n_in)] + ([f"w{j}" for j in range(n_w)]
                                               if weights_as_inputs else [])
    lines = [f"def fn({', '.join(params)}):"]
    w = 0
    for k, op in enumerate(program.ops):
        n = n_in + k
        kind = op[0]
        if kind == "unary":
            line = f"v{n} = torch.{op[2]}(v{op[1]})"
        elif kind == "binary":
            other = f"v{op[3]}" if op[3] is not None else repr(op[4])
            line = f"v{n} = v{op[1]} {'+' if op[2] == 'add' else '*'} {other}"
        elif kind == "matmul":
            line = f"v{n} = v{op[1]} @ w{w}"
            w += 1
        elif kind == "reduce":
            _, src, how, dim, keepdim = op
            line = f"v{n} = v{src}.{how}({dim}, keepdim={keepdim})"
        elif kind == "reshape":
            line = f"v{n} = v{op[1]}.reshape({op[2]!r})"
        elif kind == "transpose":
            line = f"v{n} = v{op[1]}.transpose({op[2]}, {op[3]})"
        elif kind == "unsqueeze":
            line = f"v{n} = v{op[1]}.unsqueeze({op[2]})"
        elif kind == "slice":
            _, src, dim, start, step = op
            line = f"v{n} = v{src}[{':, ' * dim}{start}::{step}]"
        elif kind in ("inplace", "input_inplace"):
            _, tgt, how, other_idx, const = op
            other = f"v{other_idx}" if other_idx is not None else repr(const)
            line = f"v{n} = v{tgt}.{how}({other})"
        elif kind == "mask":
            line = f"v{n} = v{op[1]}[v{op[1]} > 0]"
        elif kind == "nonzero":
            line = f"v{n} = torch.nonzero(v{op[1]} > 0).float()"
        elif kind == "item":
            line = f"s{n} = v{op[1]}.sum().tanh().item(); v{n} = v{op[2]} * s{n}"
        elif kind == "unique":
            line = f"v{n} = torch.unique((v{op[1]} * 2).round())"
        elif kind == "masked_select":
            line = f"v{n} = torch.masked_select(v{op[1]}, v{op[1]} > 0.5)"
        else:  # pragma: no cover - the strategy only draws the kinds above
            raise AssertionError(kind)
        lines.append("    " + line)
    lines.append(f"    return ({''.join(f'v{i}, ' for i in program.outputs)})")
    return "\n".join(lines) + "\n"


_programs_built = itertools.count()


def build(program: Program, weights_as_inputs: bool = False):
    """The Python function of ``program``. Its matmul weights are made here and read as
    globals, unless ``weights_as_inputs`` makes them trailing arguments (``make_fx`` cannot
    trace closed-over tensors in symbolic mode)."""
    text = source(program, weights_as_inputs)
    filename = f"<hpuopt-program-{next(_programs_built)}>"
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    namespace: dict[str, Any] = {"torch": torch}
    if not weights_as_inputs:
        namespace.update({f"w{j}": t for j, t in enumerate(make_weights(program))})
    exec(compile(text, filename, "exec"), namespace)
    return namespace["fn"]


def _sym(shape) -> list[int]:
    return [i for i, d in enumerate(shape) if not isinstance(d, int)]


def _mul_dims(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return a * b
    return f"({a}*{b})"


@st.composite
def programs(
    draw,
    max_ops: int = 8,
    dynamic: bool = True,
    exclude: tuple[str, ...] = (),
    mutate_input: bool = False,
) -> Program:
    """Random DAG programs. Shapes are tracked symbolically: ``"B"`` is the leading size of the
    inputs, ``"u<k>"`` the data-dependent size made by op ``k``; two values combine
    elementwise only when their shapes are the same tuple."""
    dim = draw(st.sampled_from([3, 4, 6]))
    n_inputs = draw(st.integers(1, 2))
    shapes: list[tuple] = [("B", dim)] * n_inputs
    ops: list[tuple] = []
    n_ops = draw(st.integers(1, max_ops))
    kinds = ["unary", "binary", "matmul", "reduce", "reshape", "transpose", "unsqueeze",
             "slice", "inplace", "inplace", "input_inplace", "input_inplace"]
    if dynamic:
        kinds += list(DYNAMIC_KINDS) * 2  # dynamic ops are the point: draw them often
    kinds = [k for k in kinds if k not in exclude]
    forced = draw(st.integers(0, n_ops - 1)) if mutate_input else -1
    for k in range(n_ops):
        new_index = n_inputs + len(ops)
        kind = "input_inplace" if k == forced else draw(st.sampled_from(kinds))
        src = draw(st.integers(0, len(shapes) - 1))
        shape = shapes[src]
        same = [i for i, s in enumerate(shapes) if s == shape]
        op: tuple | None = None
        out = None
        if kind == "unary":
            op, out = (kind, src, draw(st.sampled_from(["sin", "relu", "sigmoid"]))), shape
        elif kind == "binary":
            how = draw(st.sampled_from(["add", "mul"]))
            if draw(st.booleans()):
                op = (kind, src, how, draw(st.sampled_from(same)), None)
            else:
                op = (kind, src, how, None, draw(st.sampled_from([0.5, -1.5, 2.0])))
            out = shape
        elif kind == "matmul":
            if shape and isinstance(shape[-1], int):
                cols = draw(st.integers(2, 5))
                op = (kind, src, shape[-1], cols, draw(st.integers(0, 2**16)))
                out = shape[:-1] + (cols,)
        elif kind == "reduce":
            how = draw(st.sampled_from(["sum", "amax"]))
            d = draw(st.integers(0, len(shape) - 1))
            keepdim = len(shape) == 1 or draw(st.booleans())
            # amax of an empty dim raises in eager too: only reduce sizes known to be >= 1
            if how == "sum" or isinstance(shape[d], int) or shape[d] == "B":
                op = (kind, src, how, d, keepdim)
                out = shape[:d] + ((1,) if keepdim else ()) + shape[d + 1 :]
        elif kind == "reshape":
            sym = _sym(shape)
            if len(shape) >= 2 and all(i < 2 for i in sym) and draw(st.booleans()):
                # merge the first two dims
                lead = _mul_dims(shape[0], shape[1])
                target = (lead if isinstance(lead, int) else -1,) + shape[2:]
                op, out = (kind, src, target), (lead,) + shape[2:]
            elif shape and isinstance(shape[-1], int) and shape[-1] in (4, 6) and len(sym) <= 1:
                a = 2
                b = shape[-1] // 2
                target = tuple(-1 if not isinstance(s, int) else s for s in shape[:-1]) + (a, b)
                op, out = (kind, src, target), shape[:-1] + (a, b)
        elif kind == "transpose":
            if len(shape) >= 2:
                d0, d1 = draw(st.lists(st.integers(0, len(shape) - 1), min_size=2, max_size=2,
                                       unique=True))
                op = (kind, src, d0, d1)
                out = list(shape)
                out[d0], out[d1] = out[d1], out[d0]
                out = tuple(out)
        elif kind == "unsqueeze":
            if len(shape) < 4:
                d = draw(st.integers(0, len(shape)))
                op, out = (kind, src, d), shape[:d] + (1,) + shape[d:]
        elif kind == "slice":
            dims = [i for i, s in enumerate(shape) if isinstance(s, int) and s >= 2]
            if dims:
                d = draw(st.sampled_from(dims))
                start = draw(st.integers(0, shape[d] - 1))
                step = draw(st.integers(1, 2))
                op = (kind, src, d, start, step)
                out = shape[:d] + (len(range(start, shape[d], step)),) + shape[d + 1 :]
        elif kind in ("inplace", "input_inplace"):
            tgt = src if kind == "inplace" else draw(st.integers(0, n_inputs - 1))
            if kind == "inplace" and tgt < n_inputs:
                tgt = None  # intermediates only; input mutation is its own kind
            if tgt is not None:
                how = draw(st.sampled_from(["add_", "mul_"]))
                tshape = shapes[tgt]
                others = [i for i, s in enumerate(shapes) if s == tshape and i != tgt]
                if others and draw(st.booleans()):
                    op = (kind, tgt, how, draw(st.sampled_from(others)), None)
                else:
                    op = (kind, tgt, how, None, draw(st.sampled_from([0.5, -1.5, 2.0])))
                out = tshape
        elif kind in ("mask", "nonzero", "unique", "masked_select"):
            if kind == "nonzero":
                out = (f"u{k}", len(shape))
            else:
                out = (f"u{k}",)
            op = (kind, src)
        elif kind == "item":
            op, out = (kind, src, draw(st.sampled_from(same + [0]))), None
            out = shapes[op[2]]
        if op is None:  # the drawn kind does not fit this value: a unary op instead
            op, out = ("unary", src, "sigmoid"), shape
        ops.append(op)
        shapes.append(out)
        assert len(shapes) == new_index + 1
    n_vals = len(shapes)
    extra = draw(st.lists(st.integers(0, n_vals - 1), max_size=3, unique=True))
    outputs = tuple(dict.fromkeys([n_vals - 1, *extra]))
    return Program(dim=dim, n_inputs=n_inputs, ops=tuple(ops), outputs=outputs)


def fresh_inputs(program: Program, batch: int) -> list[torch.Tensor]:
    return [torch.randn(batch, program.dim) for _ in range(program.n_inputs)]


def clones(xs):
    return [x.clone() for x in xs]


def assert_same(actual, expected, what: str) -> None:
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5, equal_nan=True,
                                   msg=lambda m, i=i: f"{what} [{i}]: {m}")


SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)

# -- (a) the pass on make_fx graphs -----------------------------------------------------------


def _piece_modules(split_gm: torch.fx.GraphModule):
    for node in split_gm.graph.find_nodes(op="call_module"):
        yield node, node.meta["hpuopt.piece"], split_gm._modules[node.target]


def _ops(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def _data_dependent_scalar(val: Any) -> bool:
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    return isinstance(val, (torch.SymFloat, torch.SymBool)) and bool(free_unbacked_symbols(val))


@given(program=programs(), batch=st.integers(2, 5))
@settings(SETTINGS, max_examples=40)
def test_split_pass_isolates_dynamic_ops_and_preserves_semantics(program, batch):
    fn = build(program, weights_as_inputs=True)
    weights = make_weights(program)
    example = fresh_inputs(program, batch)
    gm = aten_graph(fn, *clones(example), *weights, tracing_mode="symbolic")
    original_dynamic = sum(op in DYNAMIC_ATEN for op in _ops(gm))
    result = SplitPass()(gm, hpuopt.Config())
    split_gm = result.graph_module
    split_gm.graph.lint()

    # every dynamic op is in a dynamic piece; static pieces hold none and define no unbacked
    # symbol nor read a data-dependent scalar
    in_dynamic = 0
    pieces = list(_piece_modules(split_gm))
    assert [info for _, info, _ in pieces] == list(result.findings)
    for node, info, sub in pieces:
        ops = _ops(sub)
        if info.static:
            bad = [op for op in ops if op in DYNAMIC_ATEN]
            assert not bad, f"static piece {info.name} holds dynamic ops {bad}\n{sub.code}"
            for n in sub.graph.nodes:
                # (placeholders carry their producer's metadata, bindings included)
                if n.op == "call_function":
                    assert not n.meta.get("unbacked_bindings"), f"{n} in static {info.name}"
                if n.op == "placeholder":
                    assert not _data_dependent_scalar(n.meta.get("val")), (
                        f"static piece {info.name} takes data-dependent scalar {n}\n{sub.code}"
                    )
        else:
            in_dynamic += sum(op in DYNAMIC_ATEN for op in ops)
            assert info.reasons, f"dynamic piece {info.name} without a recorded reason"
    assert in_dynamic == original_dynamic
    event(f"dynamic ops={original_dynamic} pieces={len(pieces)}")
    assert (original_dynamic > 0) == any(not info.static for _, info, _ in pieces)

    # convex and order-keeping: the stitched pieces compute the original graph, on several
    # fresh inputs and another leading size (mutated inputs compared too)
    for b in (batch, batch, batch + 3):
        xs = fresh_inputs(program, b)
        ref_in, got_in = clones(xs), clones(xs)
        expected = gm(*ref_in, *weights)
        actual = split_gm(*got_in, *weights)
        assert_same(actual, expected, f"split graph outputs, batch {b}")
        assert_same(got_in, ref_in, f"split graph inputs after the call, batch {b}")
        assert_same(expected, fn(*clones(xs), *weights), "make_fx graph vs eager")  # oracle


# -- (b) end to end ---------------------------------------------------------------------------


def _run_end_to_end(program: Program, batch: int, flags: bool, options=None) -> None:
    torch._dynamo.reset()
    hpuopt.reset()
    fn = build(program)
    compiled = torch.compile(fn, backend="hpugraph", options=options)
    kept: list[tuple[tuple, tuple]] = []  # (compiled outputs, eager outputs) of every call
    with torch._dynamo.config.patch(
        capture_dynamic_output_shape_ops=flags, capture_scalar_outputs=flags
    ):
        for call, b in enumerate((batch, batch, batch + 3)):
            xs = fresh_inputs(program, b)
            ref_in, got_in = clones(xs), clones(xs)
            expected = fn(*ref_in)
            before = hpuopt.counters.snapshot()
            actual = compiled(*got_in)
            d = hpuopt.counters.delta(before)
            assert_same(actual, expected, f"call {call} outputs")
            assert_same(got_in, ref_in, f"call {call}: inputs after the call (mutation)")
            kept.append((tuple(t.clone() for t in expected), actual))

            # the counters add up: every run of a static piece is a hit or a miss, and ends
            # in a replay or an uncaptured run; the split leaves no capture to fail
            assert d["fallbacks"] == 0 and d["uncaptured_runs"] == 0, d
            assert d["replays"] == d["cache_hits"] + d["cache_misses"], d
            assert d["graphs_captured"] == d["cache_misses"], d
            if hpuopt.counters.pieces_static > 0 and d["dynamo_graphs"] == 0:
                assert d["replays"] > 0, d
            if call == 1 and not program.dynamic:
                # same shape, static program: every piece is a cache hit, nothing new
                assert d["graphs_captured"] == 0 and d["dynamo_graphs"] == 0, d
                if hpuopt.counters.pieces_static:
                    assert d["cache_hits"] > 0, d
    c = hpuopt.counters
    event(f"flags={flags} dynamic={program.dynamic} mutates_input={program.mutates_input}")
    event(f"dynamo graphs={c.dynamo_graphs} static pieces={c.pieces_static} "
          f"dynamic pieces={c.pieces_dynamic} replays>0={c.replays > 0}")
    # what a caller holds from an earlier call is untouched by later replays
    for call, (expected, actual) in enumerate(kept):
        assert_same(actual, expected, f"call {call} outputs after later calls")
    assert hpuopt.counters.pieces_static > 0 or program.dynamic or not hpuopt.counters.aot_graphs


# Input mutation is drawn by test_end_to_end_input_mutation.
@given(program=programs(max_ops=7, exclude=("input_inplace",)), batch=st.integers(2, 4))
@settings(SETTINGS, max_examples=30)
def test_end_to_end_matches_eager_flags_off(program, batch):
    _run_end_to_end(program, batch, flags=False)


@given(program=programs(max_ops=7, exclude=("input_inplace",)),
       batch=st.integers(2, 4))
@settings(SETTINGS, max_examples=30)
def test_end_to_end_matches_eager_flags_on(program, batch):
    _run_end_to_end(program, batch, flags=True)


@given(program=programs(max_ops=6, mutate_input=True),
       batch=st.integers(2, 4), flags=st.booleans())
@settings(SETTINGS, max_examples=20)
def test_end_to_end_input_mutation(program, batch, flags):
    _run_end_to_end(program, batch, flags)


def _mutate_after_mask(x):
    v = x[x > 0]
    x.add_(0.5)
    return x.sin(), v


def test_input_mutation_after_dynamic_op_reaches_caller(dynamic_op_flags):
    """The write-back of an input mutation can land in a piece of its own, whose outputs
    nobody reads: the cleanup pass must keep it (the piece module is marked impure)."""
    compiled = torch.compile(_mutate_after_mask, backend="hpugraph")
    x = torch.randn(3, 4)
    ref, got = x.clone(), x.clone()
    expected = _mutate_after_mask(ref)
    actual = compiled(got)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(got, ref)


def test_input_mutation_after_dynamic_op_reaches_caller_without_cleanup(dynamic_op_flags):
    """The same program with the cleanup pass disabled: the split itself keeps the mutation."""
    compiled = torch.compile(_mutate_after_mask, backend="hpugraph",
                             options={"disable_passes": ["cleanup"]})
    for _ in range(2):
        x = torch.randn(3, 4)
        ref, got = x.clone(), x.clone()
        expected = _mutate_after_mask(ref)
        actual = compiled(got)
        torch.testing.assert_close(actual, expected)
        torch.testing.assert_close(got, ref)


def _unique_of(x):
    return torch.unique((x * 2).round())


def test_unique_flags_on_is_not_replayed_stale(dynamic_op_flags):
    compiled = torch.compile(_unique_of, backend="hpugraph")
    for _ in range(3):
        x = torch.randn(3, 4)
        torch.testing.assert_close(compiled(x), _unique_of(x))


def test_split_static_pieces_take_no_tuple_inputs():
    gm = aten_graph(_unique_of, torch.randn(3, 4), tracing_mode="symbolic")
    split_gm = SplitPass()(gm, hpuopt.Config()).graph_module
    for _, info, sub in _piece_modules(split_gm):
        if info.static:
            for n in sub.graph.find_nodes(op="placeholder"):
                assert not isinstance(n.meta.get("val"), (tuple, list)), (info.name, sub.code)


@given(program=programs(max_ops=6, dynamic=False), batch=st.integers(2, 4))
@settings(SETTINGS, max_examples=10)
def test_end_to_end_static_programs_hit_the_cache(program, batch):
    _run_end_to_end(program, batch, flags=False)


# -- side-effect order ------------------------------------------------------------------------


def _mutate_around_dynamic(x: torch.Tensor, w: torch.Tensor):
    x.add_(w)  # before the dynamic op
    picked = x[x > 0]  # reads the first mutation
    total = picked.sum()
    x.mul_(2.0)  # after it
    mid = x * 1.0  # reads the second mutation
    n = torch.nonzero(x > 1.0).shape[0]
    x.sub_(total / 100)  # after the second dynamic op, using its result
    return picked, total, mid, n


@pytest.mark.parametrize("flags", [False, True], ids=["flags-off", "flags-on"])
def test_side_effect_order_around_dynamic_ops(flags):
    compiled = torch.compile(_mutate_around_dynamic, backend="hpugraph")
    with torch._dynamo.config.patch(
        capture_dynamic_output_shape_ops=flags, capture_scalar_outputs=flags
    ):
        for b in (4, 4, 7):
            x = torch.randn(b, 5)
            w = torch.randn(b, 5)
            ref_x, got_x = x.clone(), x.clone()
            expected = _mutate_around_dynamic(ref_x, w)
            before = hpuopt.counters.snapshot()
            actual = compiled(got_x, w)
            d = hpuopt.counters.delta(before)
            torch.testing.assert_close(got_x, ref_x)
            torch.testing.assert_close(actual[0], expected[0])
            torch.testing.assert_close(actual[1], expected[1])
            torch.testing.assert_close(actual[2], expected[2])
            assert actual[3] == expected[3]
            assert d["fallbacks"] == 0
    assert hpuopt.counters.replays > 0


def test_side_effect_order_split_pass():
    """At the pass level: the in-place nodes keep their relative order across pieces, and the
    stitched graph mutates the input exactly as the original does."""
    x = torch.randn(4, 5)
    w = torch.randn(4, 5)
    gm = aten_graph(_mutate_around_dynamic, x.clone(), w, tracing_mode="symbolic")
    def mutations(g: torch.fx.GraphModule) -> list[str]:
        return [str(n.target) for n in g.graph.nodes if n.op == "call_function"
                and isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable]

    mut_order = mutations(gm)
    assert mut_order == ["aten.add_.Tensor", "aten.mul_.Tensor", "aten.sub_.Tensor"], gm.code
    split_gm = SplitPass()(gm, hpuopt.Config()).graph_module
    seen = []
    for _, _, sub in _piece_modules(split_gm):
        seen += mutations(sub)
    assert seen == mut_order
    for b in (4, 6):
        xs = torch.randn(b, 5)
        ws = torch.randn(b, 5)
        ref, got = xs.clone(), xs.clone()
        expected = gm(ref, ws)
        actual = split_gm(got, ws)
        torch.testing.assert_close(got, ref)
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e)
