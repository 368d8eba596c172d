"""Padding-safety analysis: may a static piece run on inputs padded up to a shape bucket?

What this pass finds
====================

A static piece sees many input shapes. To bound the number of captured device graphs the runtime
may pad a dimension of an input up to the next bucket size (batch 5 → 8), replay the graph captured
at the bucket, and slice every output back to the real size. That is only correct if padding
provably leaves the *real part* of every output unchanged, whatever the pad region holds. This
module proves it, or says precisely which node breaks it and why. It changes nothing in the graph.

    >>> plan = analyze_padding(gm, {0: 0})            # propose: input 0, dim 0
    >>> plan.safe, [str(d) for d in plan.outputs]
    (True, ['output 0 dim 0 = input 0 dim 0'])
    >>> outs = slice_outputs(plan, gm(*padded_inputs), real_inputs, padded_inputs)  # hpuopt.runtime.padder

The question, stated exactly
----------------------------

Let ``G`` be the graph, ``x`` the real inputs and ``x'`` the inputs where each proposed
``(input, dim)`` — a *pad source* — has been extended from its real extent ``n`` to the bucket
``N ≥ n`` by appending ``N − n`` positions of *arbitrary* contents at the end. The plan is *safe*
when, for every output ``o`` of ``G``, ``G(x')[o]`` restricted to the real region equals ``G(x)[o]``,
for any contents of the pad region. (When the plan records ``required_pad_value == 0.0`` the pad
contents must be zeros instead of arbitrary.) Equality is mathematical: a kernel chosen for a bigger
shape may round differently (a GEMM with another tiling), which the tests allow for with
``assert_close``.

The analysis is about *this graph*, not the Python program it came from. In a graph traced with
concrete shapes (``make_fx(tracing_mode="fake"/"real")``) ``x / x.shape[0]`` is ``div(x, 5)``: a
constant, which reads the same on padded inputs — so the graph is padding-safe even though the
program is not. That is right for the runtime, which replays the graph, but it means only a
symbolic trace (what Dynamo and AOTAutograd produce) exposes size-as-value uses to this analysis.
Conversely a shape argument baked into a concrete trace (``view(x, [5, 4])``) cannot run on a padded
input at all, and is reported.

The abstract domain
-------------------

Every value in the graph gets one abstract state, computed in one forward walk over the nodes:

*Tensor* — a tuple with one entry per dim. An entry is ``None`` when the dim has the same extent and
content position by position in the padded and the real run, or a *padded dim* ``_Dim(source,
factor, offset)`` meaning:

- its extent is ``N·factor + offset`` in the padded run and ``n·factor + offset`` in the real run;
- the real run's values sit, unchanged, in the *prefix* of that extent (the real region), and
  the ``(N − n)·factor`` positions after it are pad region — nothing else comes after the pad;
- ``factor`` is 1 for a dim that is the source itself, or the product ``R`` of the other dims a
  reshape merged *under* the source (``(B, T, C) → (B·T, C)`` makes dim 0 ``factor = T``: each
  source position owns ``T`` consecutive rows);
- ``offset`` is the size of a fixed block in front of the source's positions (``cat([cache, x])``
  along the padded dim: extent ``k + N``, offset ``k``).

The invariant kept for every tensor: *the real region of the padded run equals the real run*. A
tensor state with no padded dim therefore claims the two runs agree everywhere. Besides the dims
each tensor carries a *pad-content* fact, one of ``ZERO`` (the pad region holds exact zeros whenever
every padded input was zero-filled), ``FINITE`` (it holds finite numbers then) or ``ANY``. It is
used only to prove that an op is exact with zero padding (below); unpadded user tensors (weights,
constants) are assumed finite, and overflow is ignored.

*Symbolic integer* (``aten.sym_size``, ``operator.mul`` of sizes, a ``SymInt`` placeholder) — the
set of pad sources its value depends on, and whether it *is* exactly one source's extent. Such a
value may flow into a **shape** argument (``view``, ``expand``, ``new_zeros``, ``arange``'s end,
``slice``'s end), where the rule of that op checks it. Flowing anywhere else — a ``Scalar`` or
``Tensor`` operand (``x / x.shape[0]``), ``scalar_tensor``, a ``select`` index, ``topk``'s ``k``, a
graph output — it would carry the *padded* size into data: unsafe ("reads the padded size as a
value").

Transfer rules, per op family (``_TABLE`` at the bottom lists every op)
-----------------------------------------------------------------------

1. **No padded operand.** An op none of whose operands carries a padded dim or a padded size cannot
   tell the runs apart: its result is unpadded, whatever the op (even an unknown one).
2. **Pointwise** (``add``, ``mul``, ``gelu``, ``where``, casts, comparisons, and any op tagged
   ``torch.Tag.pointwise``): broadcast from the right; an output dim is padded when an operand's
   aligned dim is. A padded dim meeting an *unpadded* dim of extent ≠ 1 is unsafe (the padded run
   would not even broadcast: some other input of that extent was not proposed). Two different
   sources meeting on one dim are *tied*: the runtime must pad them to the same bucket
   (``PaddingPlan.ties``). The pad-content fact follows a small per-op table (``relu(0) = 0`` keeps
   ``ZERO``, ``exp(0) = 1`` gives ``FINITE``, ``log`` gives ``ANY``).
3. **Views and reshapes** (``view``, ``_unsafe_view``, ``reshape``, ``squeeze``, ``unsqueeze``,
   ``flatten``): the input and output shapes (from ``meta["val"]``) are cut into the smallest groups
   of dims with equal products, size-1 dims aside. In a group, element ``(b, r)`` of the merged
   index space (``b`` the outermost dim, ``r`` the rest) maps to ``b·R + r``. Hence:

   - the padded dim is the *outermost* of its group and the other dims of the group are unpadded:
     the real region stays a prefix of the merged space, and the group's outermost output dim
     carries it with ``factor·R/P`` (``P`` = product of the other output dims of the group), which
     must be a whole number — ``(B, T, C) → (B·T, C)`` and back ``(B·T, C) → (B, T, C)`` are both
     fine. Rows stay independent: pointwise ops, row-wise norms and matmuls over the merged dim are
     still safe, **but a reduction, softmax or sort over the merged dim mixes the rows of the pad
     with the real ones** and is caught by its own rule below, exactly as for the plain dim;
   - the padded dim is an *inner* dim of a merge (``(C, B) → (C·B)``) or a split would cut a source
     position (``(B,) → (B/2, 2)``): the pad interleaves with real positions; unsafe;
   - a size argument that bakes a constant extent into a padded output dim (concrete traces) cannot
     run on padded inputs; unsafe.

4. **Dim shuffles** — ``permute``, ``transpose``, ``t``: permute the entries. ``expand``: new or
   size-1 dims take the state of their size argument (``expand(bias, [B, C])`` with ``B`` the
   padded size gives a padded dim holding copies of one real row: safe).
5. **Indexing along a dim** — ``slice`` along a padded dim is safe when it keeps the whole dim
   (``start = 0``, ``step = 1``, ``end`` open or the dim's own size) or stays inside the real region
   by construction (constant bounds within the traced extent); any other slice shifts or cuts the
   pad: unsafe. ``select`` with a constant non-negative index is safe (the real run proved the index
   is a real position); a negative index counts from the end — which is the pad — unsafe.
   ``split``/``unbind``/``flip``/``roll`` along a padded dim: unsafe. ``index_select`` along a
   padded dim with unpadded indices reads real positions only (it rejects negative indices): safe.
   Advanced indexing (``index``, ``gather``, ``scatter``, ``index_put``): unsafe when padded, except
   the gather-rows form covered by (8).
6. **Concatenation** — along another dim: like pointwise. Along the padded dim only when the padded
   operand is the *last* one and the only padded one: ``cat([cache, x])`` keeps the real region a
   prefix (``offset`` grows by the cache length). Anywhere else the pad lands in the middle of the
   result, in front of real data of the later operands; unsafe. ``constant_pad_nd`` on the padded
   dim is the same case (its border sits behind the pad): unsafe.
7. **Contractions** — ``mm``, ``bmm``, ``addmm``, ``baddbmm``, ``mv``, ``dot``: row and batch dims
   carry over (the padded rows of ``x @ W`` are computed from the padded rows of ``x`` only).
   Contracting over a padded dim sums pad × pad products into every real output: unsafe for
   arbitrary pad, **exact when one operand's pad region is ZERO and the other's FINITE** — the plan
   then requires pad value 0 (this is the weight gradient ``grad_out.T @ x`` of a padded batch).
8. **Lookups** — ``embedding`` / ``index.Tensor`` (gather rows) with padded *indices*: the pad
   region holds indices that the lookup dereferences; arbitrary contents can be out of range (a
   device-side assert, a crash, not just a wrong value). They are therefore safe only with pad value
   0 (index 0 is valid whenever the table has a row), recorded as a requirement.
   ``embedding_dense_backward`` also sums the padded rows into row 0: exact only if the incoming
   gradient's pad is ZERO too.
9. **Reductions** (``sum``, ``mean``, ``amax``, ``var``, ``prod``, ``argmax``, ``any``, ``norm``,
   ``logsumexp`` …): over other dims, safe. Over a padded dim: the reduction reads the pad, unsafe —
   except ``sum``/``any``/``linalg_vector_norm(ord ≥ 0)`` of a ZERO pad region, which are exact with
   pad value 0. ``mean``/``var`` divide by the padded count: never exact.
10. **Normalisations** — ``native_layer_norm`` over trailing dims that exclude the padded one: a row
    op, safe; including it: unsafe. ``native_batch_norm`` and its variants in *training* reduce over
    every dim but channels: a padded batch/spatial dim changes the statistics (and the running
    stats written back): unsafe; in *eval* mode it is per-channel pointwise: safe.
    ``native_group_norm``: safe over the batch dim only. The backward ops are handled like the
    contraction they contain (weight gradients sum over the batch: zero pad needed).
11. **Softmax family** — ``_softmax``/``_log_softmax`` (and their backward) over another dim: safe;
    over the padded dim the normaliser sums ``exp`` of the pad: unsafe for any pad value.
12. **Order statistics** — ``sort``, ``topk``, ``kthvalue``, ``median``, ``mode`` along the padded
    dim compare the pad against real values: unsafe.
13. **Scans** — ``cumsum``, ``cumprod``, ``cummax``, ``cummin``, ``logcumsumexp`` along the padded
    dim are **safe**: output position ``i`` reads positions ``≤ i`` only, and the pad is appended
    after the real region, so every real position sees real inputs only. (A *reverse* scan is a
    ``flip`` first, which is unsafe by (5).) This is the one deliberate departure from "scan ⇒
    unsafe": the rule is exact, and the property test checks it with random pad.
14. **Attention** (``_scaled_dot_product_*_attention``): batch, head and query-length dims are
    independent: safe. A padded key length enters the softmax normaliser: unsafe, unless the
    attention is causal with queries and keys padded by the same source (real queries only see real
    keys). A padded mask is unsafe.
15. **Convolution and pooling** over a padded batch (or channel, for pooling) dim: safe; a padded
    spatial dim is read by the window of its neighbours: unsafe.
16. **Data-dependent shapes** (``nonzero``, ``unique``, ``masked_select`` …): the output is not
    defined position-wise; unsafe.
17. **Random ops** (tagged ``nondeterministic_seeded``: ``rand_like``, ``native_dropout`` …) on a
    padded shape: each position's sample is drawn from the right distribution, but the padded run
    consumes the generator differently, so the real region does not equal the unpadded run's draw
    (and later random ops shift too). "Same distribution" is weaker than what every other rule
    proves, and device-graph replay of random ops has its own seed/offset handling; we call it
    unsafe and say why.
18. **In-place mutation** of a padded tensor that aliases a graph input (``copy_`` into an input,
    ``add_`` on it or a view of it): the padded run mutates the runtime's padded buffer, pad
    included, and the caller's tensor (of the real size) only sees the mutation if the runtime
    copies the real region back — which input write-back does not do: unsafe, with that reason.
    Mutation of an intermediate follows the functional rule; since views of it may now hold other
    pad contents than their state says, no later op may rely on a zero pad.
19. **Anything else** with a padded operand: unsafe, "unknown op". Conservative by construction: a
    new op is never silently assumed to be position-wise.

**Safety net.** In a symbolic graph every result is also checked against its ``meta["val"]``: a
dim the state calls unpadded must not have an extent that mentions a padded source's symbol. A rule
that lost track of the padded positions is thereby reported ("does not carry the padded
positions") instead of producing a wrong plan.

When a rule fails it raises ``_Unsafe`` naming the sources involved. The node's result becomes
*poisoned*: later nodes consuming it are skipped without further reasons, so one cause is reported
once. The driver then drops the implicated sources and re-analyses with the rest, until a set of
sources is jointly safe; a source is only declared safe together with the others the plan pads.

Before / after
--------------

Nothing changes; the result is a :class:`PaddingPlan` in ``PassResult.findings``::

    x: f32[s0, 8] → linear → gelu → layer_norm([8]) → out          {input 0 dim 0: safe}
    x: f32[s0, 8] → softmax(dim=0) → out                            {input 0 dim 0: unsafe,
        UnsafeReason(node='_softmax', op='aten._softmax.default',
                     why='softmax over the padded dim 0 (input 0 dim 0) reads the pad region')}
    x: f32[s0, 8] → x.t() @ x → out                                 {input 0 dim 0: safe,
                                                                     required_pad_value=0.0}
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import sympy
import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from hpuopt.config import Config
from hpuopt.passes.base import GraphPass, PassResult, Stage
from hpuopt.records import (
    InputVerdict,
    OutputDim,
    PaddingPlan,
    PadSource,
    SizeInput,
    UnsafeReason,
)

__all__ = [
    "InputVerdict",
    "OutputDim",
    "PadSource",
    "PaddingAnalysisPass",
    "PaddingPlan",
    "SizeInput",
    "UnsafeReason",
    "analyze_padding",
    "default_pad_dims",
]

aten = torch.ops.aten

# ------------------------------------------------------------------------------------------------
# Abstract domain
# ------------------------------------------------------------------------------------------------

ZERO, FINITE, ANY = 0, 1, 2
"""Pad-content facts, ordered by inclusion: ZERO ⊂ FINITE ⊂ ANY (see the module docstring)."""


@dataclasses.dataclass(frozen=True, eq=False)
class _Dim:
    source: PadSource
    factor: Any = 1  # int | torch.SymInt (not hashable: never put a _Dim in a set)
    offset: Any = 0  # int | torch.SymInt

    @property
    def shifted(self) -> bool:
        return not _same(self.offset, 0)


@dataclasses.dataclass(frozen=True, eq=False)
class _Tensor:
    dims: tuple[_Dim | None, ...] | None  # None: no padded dim (rank possibly unknown)
    pad: int = ANY

    @property
    def padded(self) -> bool:
        return self.dims is not None and any(d is not None for d in self.dims)

    def dim(self, i: int) -> _Dim | None:
        return None if self.dims is None else self.dims[i]


@dataclasses.dataclass(frozen=True)
class _Sym:
    deps: frozenset[PadSource] = frozenset()
    exact: _Dim | None = None  # the value *is* the extent of a dim with this state


_UNPADDED = _Tensor(None, FINITE)
_POISON = object()  # the result of a node reported unsafe; consumers are skipped silently


class _Unsafe(Exception):
    def __init__(self, why: str, sources: Iterable[PadSource] | None = None) -> None:
        super().__init__(why)
        self.why = why
        self.sources = None if sources is None else frozenset(sources)


def _state_sources(state: Any) -> Iterator[PadSource]:
    if isinstance(state, _Tensor) and state.dims is not None:
        yield from (d.source for d in state.dims if d is not None)
    elif isinstance(state, _Sym):
        yield from state.deps
    elif isinstance(state, (tuple, list)):
        for s in state:
            yield from _state_sources(s)


def _same(a: Any, b: Any) -> bool:
    return bool(statically_known_true(a == b))


def _same_dim(a: _Dim, b: _Dim) -> bool:
    return _same(a.offset, b.offset) and _same(a.factor, b.factor)


def _prod(values: Iterable[Any]) -> Any:
    result: Any = 1
    for v in values:
        result = result * v
    return result


# ------------------------------------------------------------------------------------------------
# One node, with its bound arguments and their states
# ------------------------------------------------------------------------------------------------


class _Op:
    """An ``OpOverload`` call: arguments bound by schema name, their states and meta shapes."""

    def __init__(self, analysis: _Analysis, node: torch.fx.Node) -> None:
        self.an = analysis
        self.node = node
        self.target = node.target
        schema = node.target._schema  # type: ignore[union-attr]
        self.schema = schema
        self.values: dict[str, Any] = {}
        for i, arg in enumerate(schema.arguments):
            if i < len(node.args) and not arg.kwarg_only:
                self.values[arg.name] = node.args[i]
            elif arg.name in node.kwargs:
                self.values[arg.name] = node.kwargs[arg.name]
            elif arg.has_default_value():
                self.values[arg.name] = arg.default_value
            else:
                self.values[arg.name] = None

    # -- access ------------------------------------------------------------------------------

    def raw(self, name: str) -> Any:
        return self.values.get(name)

    def state(self, name: str) -> Any:
        return self.an.state_of(self.values.get(name))

    def tensor(self, name: str) -> _Tensor:
        st = self.state(name)
        return st if isinstance(st, _Tensor) else _UNPADDED

    def shape(self, name: str) -> tuple[Any, ...]:
        return self.an.shape_of(self.values.get(name))

    def out_shape(self, index: int | None = None) -> tuple[Any, ...]:
        return self.an.shape_of(self.node, index)

    def rank(self, name: str) -> int:
        return len(self.shape(name))

    def dim_arg(self, name: str, rank: int) -> int:
        d = self.raw(name)
        if not isinstance(d, int):
            raise _Unsafe(f"non-constant dim argument {name}={d!r}")
        return d % rank if rank else 0

    def dims_arg(self, name: str, rank: int, empty_means_all: bool = True) -> tuple[int, ...]:
        d = self.raw(name)
        if d is None or (empty_means_all and isinstance(d, (list, tuple)) and len(d) == 0):
            return tuple(range(rank))
        if isinstance(d, int):
            d = [d]
        if not all(isinstance(x, int) for x in d):
            raise _Unsafe(f"non-constant dims argument {name}={d!r}")
        return tuple(sorted({x % rank if rank else 0 for x in d}))


# ------------------------------------------------------------------------------------------------
# Transfer rules
# ------------------------------------------------------------------------------------------------

RuleFn = Callable[[_Op], Any]


@dataclasses.dataclass(frozen=True)
class _Rule:
    fn: RuleFn
    size_args: frozenset[str] = frozenset()
    """Arguments where a padded size is a *shape* the rule checks itself (not a value use)."""


def _literal_pad(v: Any) -> int:
    if isinstance(v, bool):
        return ZERO if not v else FINITE
    if isinstance(v, (int, float)):
        if v == 0:
            return ZERO
        return FINITE if math.isfinite(v) else ANY
    return FINITE


def _broadcast(op: _Op, operands: Sequence[str]) -> tuple[_Dim | None, ...]:
    """Output dims of a broadcasting op; checks that padded dims only meet padded or size-1 dims."""
    out_shape = op.out_shape()
    rank = len(out_shape)
    dims: list[_Dim | None] = [None] * rank
    unpadded_extent: list[list[tuple[str, Any]]] = [[] for _ in range(rank)]
    for name in operands:
        st = op.state(name)
        if not isinstance(st, _Tensor):
            continue
        shape = op.shape(name) if isinstance(op.raw(name), torch.fx.Node) else ()
        r = len(shape)
        for i in range(r):
            j = rank - r + i
            d = st.dim(i)
            if d is None:
                unpadded_extent[j].append((name, shape[i]))
                continue
            cur = dims[j]
            if cur is None:
                dims[j] = d
            elif not _same_dim(cur, d):
                raise _Unsafe(f"dim {j}: operands carry the padded extent with different layouts")
            elif cur.source != d.source:
                op.an.tie(cur.source, d.source)
    for j, d in enumerate(dims):
        if d is None:
            continue
        for name, extent in unpadded_extent[j]:
            if not _same(extent, 1):
                raise _Unsafe(
                    f"padded {d.source} meets unpadded dim {j} of operand {name!r} "
                    "(an input of the same extent that is not padded)", {d.source}
                )
    return tuple(dims)


def _pw_pad(op: _Op, kind: str, operands: Sequence[str], unary: tuple[int, int]) -> int:
    facts: list[int] = []
    for name in operands:
        v = op.raw(name)
        st = op.state(name)
        if isinstance(st, _Tensor):
            facts.append(st.pad if st.padded else FINITE)
        elif isinstance(v, (list, tuple)):
            continue
        elif v is None or isinstance(v, (torch.dtype, torch.device, torch.layout, str)):
            continue
        else:
            facts.append(_literal_pad(v) if not isinstance(v, torch.fx.Node) else FINITE)
    if not facts:
        return ANY
    worst = max(facts)
    if kind == "unary":
        tensors = [op.state(n) for n in operands if isinstance(op.state(n), _Tensor)]
        worst = max((t.pad if t.padded else FINITE for t in tensors), default=ANY)
        return (unary[0], unary[1], ANY)[worst]
    if kind == "grad":  # backward of an activation: zero where the incoming gradient is zero
        if facts[0] == ZERO and worst <= FINITE:
            return ZERO
        return FINITE if worst <= FINITE else ANY
    if kind == "add":
        return worst
    if kind == "mul":
        if worst <= FINITE and ZERO in facts:
            return ZERO
        return FINITE if worst <= FINITE else ANY
    if kind == "div":
        num = facts[0]
        den = op.raw(operands[1]) if len(operands) > 1 else None
        if isinstance(den, (int, float)) and den != 0 and math.isfinite(den):
            return num
        return ANY
    if kind == "bool":
        return FINITE
    return ANY


def _pointwise(kind: str = "any", unary: tuple[int, int] = (ANY, ANY),
               skip: tuple[str, ...] = ("alpha",)) -> RuleFn:
    def rule(op: _Op) -> _Tensor:
        operands = [
            a.name for a in op.schema.arguments
            if a.name not in skip and a.name != "out" and not _is_meta_arg(a)
        ]
        dims = _broadcast(op, operands)
        value_ops = [n for n in operands if n not in ("condition", "mask")]
        return _Tensor(dims, _pw_pad(op, kind, value_ops, unary))

    return rule


def _is_meta_arg(arg: Any) -> bool:
    t = str(arg.type)
    return any(k in t for k in ("ScalarType", "Layout", "Device", "MemoryFormat", "bool", "str",
                                "Generator"))


def _identity(op: _Op) -> _Tensor:
    st = op.tensor("self")
    return _Tensor(st.dims, st.pad)


def _size_arg_dim(op: _Op, value: Any, what: str) -> _Dim | None:
    """The state of a dim whose extent is the size argument ``value``."""
    st = op.an.state_of(value)
    if isinstance(st, _Sym) and st.deps:
        if st.exact is None:
            raise _Unsafe(f"{what} is a function of the padded size, not the size itself",
                          st.deps)
        return st.exact
    return None


# -- views and reshapes ---------------------------------------------------------------------------


def _group_dims(a: Sequence[Any], b: Sequence[Any]) -> list[tuple[list[int], list[int]]]:
    """Smallest groups of non-1 dims of ``a`` and ``b`` with equal products (a reshape's groups)."""
    ia = [i for i, s in enumerate(a) if not _same(s, 1)]
    ib = [i for i, s in enumerate(b) if not _same(s, 1)]
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(ia) and j < len(ib):
        ga, gb = [ia[i]], [ib[j]]
        pa, pb = a[ia[i]], b[ib[j]]
        i, j = i + 1, j + 1
        while not _same(pa, pb):
            if statically_known_true(pb % pa == 0) and i < len(ia):
                ga.append(ia[i])
                pa = pa * a[ia[i]]
                i += 1
            elif j < len(ib):
                gb.append(ib[j])
                pb = pb * b[ib[j]]
                j += 1
            elif i < len(ia):
                ga.append(ia[i])
                pa = pa * a[ia[i]]
                i += 1
            else:
                raise _Unsafe("cannot match the dims of the reshape (sizes not provably equal)")
        groups.append((ga, gb))
    if i < len(ia) or j < len(ib):
        raise _Unsafe("cannot match the dims of the reshape (sizes not provably equal)")
    return groups


def _reshape(op: _Op) -> _Tensor:
    st = op.tensor("self")
    in_shape, out_shape = op.shape("self"), op.out_shape()
    dims: list[_Dim | None] = [None] * len(out_shape)
    for ga, gb in _group_dims(in_shape, out_shape):
        states = [st.dim(i) for i in ga]
        head = states[0]
        if any(s is not None for s in states[1:]):
            raise _Unsafe("reshape merges the padded dim as an inner dim: pad interleaves with "
                          "real positions", {s.source for s in states[1:] if s is not None})
        if head is None:
            continue
        rest = _prod(in_shape[i] for i in ga[1:])
        inner = _prod(out_shape[i] for i in gb[1:])
        # Real prefix of the merged group: (n·factor + offset)·rest positions. Output rows hold
        # `inner` positions each, so the prefix is whole rows for every n iff `inner` divides
        # both factor·rest and offset·rest.
        factor, offset = head.factor * rest, head.offset * rest
        if not (statically_known_true(factor % inner == 0)
                and statically_known_true(offset % inner == 0)):
            raise _Unsafe(f"reshape splits the padded {head.source} across output dims "
                          f"{gb}: a source position would be cut", {head.source})
        if not _same(inner, 1):
            factor, offset = factor // inner, offset // inner
        dims[gb[0]] = _Dim(head.source, factor, offset)
    _check_size_args(op, dims, "size" if "size" in op.values else "shape")
    return _Tensor(tuple(dims), st.pad)


def _check_size_args(op: _Op, dims: Sequence[_Dim | None], name: str) -> None:
    """A padded output dim's size argument must follow the padded size (``-1`` or symbolic)."""
    sizes = op.raw(name)
    if not isinstance(sizes, (list, tuple)) or len(sizes) != len(dims):
        return
    for j, (size, d) in enumerate(zip(sizes, dims)):
        st = op.an.state_of(size)
        deps = st.deps if isinstance(st, _Sym) else frozenset()
        if d is not None and isinstance(size, int) and size != -1:
            raise _Unsafe(f"size argument {j} bakes the traced extent {size} of the padded "
                          f"{d.source} into the graph", {d.source})
        if d is None and deps:
            raise _Unsafe(f"size argument {j} depends on the padded size but the dim does not "
                          "carry it", deps)


def _view_dtype(op: _Op) -> _Tensor:
    st = op.tensor("self")
    if st.dim(len(op.shape("self")) - 1) is not None:
        raise _Unsafe("view as another dtype reinterprets the padded last dim")
    return _Tensor(st.dims, ANY)


def _permute(op: _Op) -> _Tensor:
    st = op.tensor("self")
    rank = op.rank("self")
    if op.target in (aten.t.default,):
        order = list(range(rank))[::-1]
    elif "dims" in op.values:
        order = [d % rank for d in op.raw("dims")]
    else:
        order = list(range(rank))
        a, b = op.dim_arg("dim0", rank), op.dim_arg("dim1", rank)
        order[a], order[b] = order[b], order[a]
    return _Tensor(tuple(st.dim(i) for i in order), st.pad)


def _expand(op: _Op) -> _Tensor:
    st = op.tensor("self")
    in_shape, sizes = op.shape("self"), op.raw("size")
    rank = len(sizes)
    dims: list[_Dim | None] = []
    for j, size in enumerate(sizes):
        i = j - (rank - len(in_shape))
        cur = st.dim(i) if i >= 0 else None
        if cur is not None:
            if isinstance(size, int) and size != -1:
                raise _Unsafe(f"expand size {j} bakes the traced extent {size} of the padded "
                              f"{cur.source}")
            dims.append(cur)
            continue
        if i >= 0 and not _same(in_shape[i], 1):
            if isinstance(op.an.state_of(size), _Sym) and op.an.state_of(size).deps:
                raise _Unsafe(f"expand size {j} depends on the padded size")
            dims.append(None)
            continue
        dims.append(_size_arg_dim(op, size, f"expand size {j}"))
    return _Tensor(tuple(dims), st.pad if st.padded else FINITE)


# -- indexing --------------------------------------------------------------------------------------

_OPEN_END = 2**62


def _slice(op: _Op) -> _Tensor:
    st = op.tensor("self")
    rank = op.rank("self")
    dim = op.dim_arg("dim", rank)
    d = st.dim(dim)
    start, end, step = op.raw("start"), op.raw("end"), op.raw("step")
    dims = list(st.dims or (None,) * rank)
    if d is None:
        for name in ("start", "end", "step"):
            s = op.state(name)
            if isinstance(s, _Sym) and s.deps:
                raise _Unsafe(f"slice {name} on an unpadded dim depends on the padded size", s.deps)
        return _Tensor(tuple(dims) if st.padded else None, st.pad if st.padded else FINITE)
    end_st = op.an.state_of(end)
    whole_end = (end is None or (isinstance(end, int) and end >= _OPEN_END)
                 or (isinstance(end_st, _Sym) and end_st.exact is not None
                     and end_st.exact.source == d.source and _same_dim(end_st.exact, d)))
    if start in (None, 0) and step == 1 and whole_end:
        return _Tensor(tuple(dims), st.pad)
    extent = op.shape("self")[dim]
    if (isinstance(start, int) and isinstance(end, int) and isinstance(step, int)
            and 0 <= start <= end and step > 0 and statically_known_true(end <= extent)):
        dims[dim] = None  # stays inside the traced real region (this graph was traced at n ≥ end)
        return _Tensor(tuple(dims), st.pad)
    raise _Unsafe(f"slice along the padded dim {dim} (start={start}, end={end}, step={step}) "
                  "cuts or shifts the pad region", {d.source})


def _select(op: _Op) -> _Tensor:
    st = op.tensor("self")
    rank = op.rank("self")
    dim = op.dim_arg("dim", rank)
    index = op.raw("index")
    dims = list(st.dims or (None,) * rank)
    if dims[dim] is not None and not (isinstance(index, int) and index >= 0):
        raise _Unsafe(f"select along the padded dim {dim} with index {index!r}: a negative index "
                      "counts from the end, which is the pad", {dims[dim].source})
    del dims[dim]
    return _Tensor(tuple(dims), st.pad)


def _split(op: _Op) -> tuple[_Tensor, ...] | _Tensor:
    st = op.tensor("self")
    rank = op.rank("self")
    dim = op.dim_arg("dim", rank)
    if st.dim(dim) is not None:
        raise _Unsafe(f"{op.schema.name} along the padded dim {dim}", {st.dim(dim).source})
    count = _multi(op)
    if op.target is aten.unbind.int:
        dims = list(st.dims or (None,) * rank)
        del dims[dim]
        return tuple(_Tensor(tuple(dims), st.pad) for _ in range(count))
    return tuple(_Tensor(st.dims, st.pad) for _ in range(count))


def _along_dims_unsafe(arg: str, what: str) -> RuleFn:
    """Ops that move positions along the given dims (flip, roll): unsafe when a dim is padded."""

    def rule(op: _Op) -> _Tensor:
        st = op.tensor("self")
        rank = op.rank("self")
        dims = op.dims_arg(arg, rank)
        bad = [d for d in dims if st.dim(d) is not None]
        if bad:
            raise _Unsafe(f"{what} along the padded dim {bad[0]}", {st.dim(bad[0]).source})
        return _Tensor(st.dims, st.pad)

    return rule


def _cat(op: _Op) -> _Tensor:
    names = op.raw("tensors")
    states = [op.an.state_of(t) for t in names]
    shapes = [op.an.shape_of(t) for t in names]
    out_shape = op.out_shape()
    rank = len(out_shape)
    dim = op.raw("dim") % rank
    dims: list[_Dim | None] = [None] * rank
    for j in range(rank):
        entries = [(s.dim(j) if isinstance(s, _Tensor) and len(sh) == rank else None, sh)
                   for s, sh in zip(states, shapes) if len(sh) == rank]
        if j == dim:
            padded = [k for k, (d, _) in enumerate(entries) if d is not None]
            if not padded:
                continue
            last = len(entries) - 1
            if padded != [last]:
                raise _Unsafe(f"cat along the padded dim {dim}: the pad lands in the middle of "
                              "the result (only a padded *last* operand is safe)")
            head = entries[last][0]
            assert head is not None
            prefix: Any = 0
            for _, sh in entries[:-1]:
                prefix = prefix + sh[dim]
            dims[j] = _Dim(head.source, head.factor, head.offset + prefix)
            continue
        for d, sh in entries:
            if d is None:
                continue
            if dims[j] is None:
                dims[j] = d
            elif not _same_dim(dims[j], d):  # type: ignore[arg-type]
                raise _Unsafe(f"cat operands carry the padded extent differently on dim {j}")
            elif dims[j].source != d.source:  # type: ignore[union-attr]
                op.an.tie(dims[j].source, d.source)  # type: ignore[union-attr]
        if dims[j] is not None and any(d is None for d, _ in entries):
            raise _Unsafe(f"cat: padded dim {j} meets an unpadded operand of the same extent")
    pads = [s.pad for s in states if isinstance(s, _Tensor) and s.padded]
    return _Tensor(tuple(dims), max(pads) if pads else FINITE)


def _stack(op: _Op) -> _Tensor:
    names = op.raw("tensors")
    states = [op.an.state_of(t) for t in names]
    rank = len(op.out_shape())
    dim = op.raw("dim") % rank
    in_rank = rank - 1
    dims: list[_Dim | None] = [None] * in_rank
    for j in range(in_rank):
        ds = [s.dim(j) if isinstance(s, _Tensor) else None for s in states]
        if any(d is not None for d in ds):
            if any(d is None for d in ds) or not all(_same_dim(ds[0], d) for d in ds):  # type: ignore[arg-type]
                raise _Unsafe(f"stack: operands carry the padded extent differently on dim {j}")
            dims[j] = ds[0]
            for d in ds[1:]:
                if d.source != ds[0].source:  # type: ignore[union-attr]
                    op.an.tie(ds[0].source, d.source)  # type: ignore[union-attr]
    dims.insert(dim, None)
    pads = [s.pad for s in states if isinstance(s, _Tensor) and s.padded]
    return _Tensor(tuple(dims), max(pads) if pads else FINITE)


def _index_select(op: _Op) -> _Tensor:
    st, idx = op.tensor("self"), op.tensor("index")
    rank = op.rank("self")
    dim = op.dim_arg("dim", rank)
    dims = list(st.dims or (None,) * rank)
    if idx.padded:
        _need_zero_index(op, idx, "index_select")
    dims[dim] = idx.dim(0)  # index_select rejects negative indices: padded `self` rows are unread
    return _Tensor(tuple(dims), max(st.pad if st.padded else FINITE, FINITE))


def _need_zero_index(op: _Op, idx: _Tensor, what: str) -> None:
    if idx.pad != ZERO:
        raise _Unsafe(f"{what} with padded indices: arbitrary pad contents may be out-of-range "
                      "indices (device assert); needs pad value 0")
    op.an.require_zero(f"{what} with padded indices (pad filled with index 0)")


def _embedding(op: _Op) -> _Tensor:
    w, idx = op.tensor("weight"), op.tensor("indices")
    # A padded table (dim 0) is fine: the real indices only read its real rows.
    if idx.padded:
        _need_zero_index(op, idx, "embedding")
    dims = tuple(idx.dims or (None,) * op.rank("indices")) + (w.dim(1),)
    return _Tensor(dims, FINITE)


def _embedding_backward(op: _Op) -> _Tensor:
    grad, idx = op.tensor("grad_output"), op.tensor("indices")
    if grad.dim(len(op.shape("grad_output")) - 1) is not None:
        raise _Unsafe("embedding backward with a padded embedding dim")
    if idx.padded or grad.padded:
        _need_zero_index(op, idx, "embedding backward")
        if grad.pad != ZERO:
            raise _Unsafe("embedding backward sums the padded rows' gradient into row 0; exact "
                          "only if that gradient's pad is zero")
    return _Tensor(None, FINITE)


def _index_tensor(op: _Op) -> _Tensor:
    st = op.tensor("self")
    indices = op.raw("indices")
    given = [k for k, t in enumerate(indices) if t is not None]
    if st.padded or len(given) != 1:
        raise _Unsafe("advanced indexing of a padded tensor: indices are data (negative ones "
                      "wrap into the pad)")
    k = given[0]
    idx = op.an.state_of(indices[k])
    idx = idx if isinstance(idx, _Tensor) else _UNPADDED
    if idx.padded:
        _need_zero_index(op, idx, "indexing")
    idx_rank = len(op.an.shape_of(indices[k]))
    rank = op.rank("self")
    dims = (None,) * k + tuple(idx.dims or (None,) * idx_rank) + (None,) * (rank - k - 1)
    return _Tensor(dims, FINITE)


# -- contractions ---------------------------------------------------------------------------------


def _contract(op: _Op, a: str, b: str, a_k: int, b_k: int,
              out: Sequence[tuple[str, int] | tuple[str, int, str, int]]) -> _Tensor:
    """Generic matmul: ``a``'s dim ``a_k`` contracts with ``b``'s ``b_k``; ``out`` lists dims."""
    sa, sb = op.tensor(a), op.tensor(b)
    ka, kb = sa.dim(a_k), sb.dim(b_k)
    if ka is not None or kb is not None:
        if ka is None or kb is None or not _same_dim(ka, kb):
            raise _Unsafe("contraction over a padded dim of one operand only")
        pa, pb = sa.pad, sb.pad
        if not ((pa == ZERO and pb <= FINITE) or (pb == ZERO and pa <= FINITE)):
            raise _Unsafe(f"contracts over the padded {ka.source}: pad × pad products are summed "
                          "into every real output (exact only with zero padding of an operand "
                          "whose pad stays zero)", {ka.source, kb.source})
        op.an.require_zero(f"contraction over the padded {ka.source}")
        if ka.source != kb.source:
            op.an.tie(ka.source, kb.source)
    dims: list[_Dim | None] = []
    for entry in out:
        ds = [op.tensor(entry[k]).dim(entry[k + 1]) for k in range(0, len(entry), 2)]  # type: ignore[arg-type]
        present = [d for d in ds if d is not None]
        if len(present) == 2 and not _same_dim(present[0], present[1]):
            raise _Unsafe("batch dims of a matmul carry the padded extent differently")
        if len(present) == 2 and present[0].source != present[1].source:
            op.an.tie(present[0].source, present[1].source)
        if len(present) == 1 and len(ds) == 2:
            raise _Unsafe("batch dim of a matmul is padded in one operand only")
        dims.append(present[0] if present else None)
    # The output's pad region is made of the padded operands' pad rows/columns times finite data.
    padded_facts = [s.pad for s in (sa, sb) if s.padded]
    worst = max(padded_facts, default=FINITE)
    pad = ZERO if padded_facts and worst == ZERO else (FINITE if worst <= FINITE else ANY)
    return _Tensor(tuple(dims), pad)


def _mm(op: _Op) -> _Tensor:
    return _contract(op, "self", "mat2", 1, 0, [("self", 0), ("mat2", 1)])


def _bmm(op: _Op) -> _Tensor:
    return _contract(op, "self", "mat2", 2, 1, [("self", 0, "mat2", 0), ("self", 1), ("mat2", 2)])


def _mv(op: _Op) -> _Tensor:
    return _contract(op, "self", "vec", 1, 0, [("self", 0)])


def _dot(op: _Op) -> _Tensor:
    other = "tensor" if "tensor" in op.values else "other"
    return _contract(op, "self", other, 0, 0, [])


def _with_bias(inner: RuleFn, a: str, b: str) -> RuleFn:
    """``addmm``/``baddbmm``: ``beta·self + alpha·(a @ b)``, the bias broadcast onto the product."""

    def rule(op: _Op) -> _Tensor:
        prod_state = inner(_Renamed(op, {"self": a, "mat2": b}))
        out_shape = op.out_shape()
        bias, bias_shape = op.tensor("self"), op.shape("self")
        dims = list(prod_state.dims or (None,) * len(out_shape))
        for i in range(len(bias_shape)):
            j = len(out_shape) - len(bias_shape) + i
            bd = bias.dim(i)
            if bd is None and dims[j] is not None and not _same(bias_shape[i], 1):
                raise _Unsafe(f"bias dim {i} is unpadded where the product is padded")
            if bd is not None:
                if dims[j] is None:
                    raise _Unsafe(f"padded bias dim {i} meets an unpadded product dim")
                if not _same_dim(bd, dims[j]):  # type: ignore[arg-type]
                    raise _Unsafe("bias and product carry the padded extent differently")
        fb = bias.pad if bias.padded else FINITE
        pad = ZERO if prod_state.pad == ZERO and fb == ZERO else max(prod_state.pad, fb, FINITE)
        return _Tensor(tuple(dims), pad)

    return rule


class _Renamed(_Op):
    """A view of an ``_Op`` with some arguments renamed (to reuse ``_mm`` inside ``addmm``)."""

    def __init__(self, op: _Op, names: Mapping[str, str]) -> None:  # noqa: D107
        self.__dict__.update(op.__dict__)
        self.values = {**op.values, **{new: op.values[old] for new, old in names.items()}}


# -- reductions, norms, softmax, scans, sorts ----------------------------------------------------


def _multi(op: _Op) -> int:
    """Number of results of the node (1 for a plain tensor), from its meta value."""
    val = _val(op.node)
    return len(val) if isinstance(val, (list, tuple)) else 1


def _reduction(kind: str, dim_arg: str = "dim", zero_exact: bool = False) -> RuleFn:
    """Reductions over ``dim_arg`` (all dims when absent/empty).

    ``kind`` maps the pad-content fact: ``keep`` (sum, mean, amax, prod of zeros are zero),
    ``finite`` (logsumexp), ``index`` (argmax: indices are finite). ``zero_exact``: reducing over
    the padded dim is exact when its pad region is ZERO (sum, any, norms).
    """

    def rule(op: _Op) -> Any:
        st = op.tensor("self")
        rank = op.rank("self")
        dims = op.dims_arg(dim_arg, rank) if dim_arg in op.values else tuple(range(rank))
        exact = zero_exact
        if op.schema.name == "aten::linalg_vector_norm":
            order = op.raw("ord")
            exact = isinstance(order, (int, float)) and order >= 0
        hit = [d for d in dims if st.dim(d) is not None]
        if hit:
            name = op.schema.name.split("::")[-1]
            if not (exact and st.pad == ZERO):
                raise _Unsafe(f"{name} reduces over the padded dim {hit[0]} "
                              f"({st.dim(hit[0]).source}): the result reads the pad region"
                              + (" (exact only with zero padding)" if exact else ""),
                              {st.dim(hit[0]).source})
            op.an.require_zero(f"{name} over the padded dim {hit[0]}")
        keep = bool(op.raw("keepdim"))
        out: list[_Dim | None] = []
        for i in range(rank):
            if i not in dims:
                out.append(st.dim(i))
            elif keep:
                out.append(None)
        pad = {"keep": st.pad, "index": FINITE}.get(kind, FINITE if st.pad <= FINITE else ANY)
        results = [_Tensor(tuple(out), pad if k == 0 else FINITE) for k in range(_multi(op))]
        return results[0] if len(results) == 1 else tuple(results)

    return rule


def _along_dim(what: str, *, scan: bool = False, pad: int | None = None) -> RuleFn:
    """Ops independent along every dim but ``dim`` (softmax, sort, topk, scans).

    Along ``dim`` itself they read every position: unsafe when it is padded, except for a causal
    ``scan`` (rule 13). Results may drop ``dim`` (median, kthvalue) or resize it (topk); indices
    results are finite.
    """

    def rule(op: _Op) -> Any:
        first = op.schema.arguments[0].name
        st = op.tensor(first)
        in_shape = op.shape(first)
        rank = len(in_shape)
        if op.raw("dim") is None:
            dims = tuple(range(rank))
        else:
            dims = (op.dim_arg("dim", rank),)
        hit = [d for d in dims if st.dim(d) is not None]
        if hit and not scan:
            raise _Unsafe(f"{what} over the padded dim {hit[0]} ({st.dim(hit[0]).source}) "
                          "reads the pad region", {st.dim(hit[0]).source})
        fact = st.pad if pad is None else (pad if st.pad <= FINITE else ANY)
        results: list[_Tensor] = []
        for k in range(_multi(op)):
            out_rank = len(op.out_shape(k if _multi(op) > 1 else None))
            if out_rank == rank:
                dims_k = st.dims
            elif out_rank == rank - 1 and len(dims) == 1:
                dims_k = tuple(st.dim(i) for i in range(rank) if i != dims[0])
            else:
                dims_k = None
            results.append(_Tensor(dims_k, fact if k == 0 else FINITE))
        return results[0] if len(results) == 1 else tuple(results)

    return rule


def _softmax_backward(op: _Op) -> _Tensor:
    g, y = op.tensor("grad_output"), op.tensor("output")
    dims = _broadcast(op, ["grad_output", "output"])
    dim = op.dim_arg("dim", len(dims))
    if dims[dim] is not None:
        raise _Unsafe(f"softmax backward over the padded dim {dim} reads the pad region")
    # grad_in = y * (g - sum(g * y)) (or g - exp(y) * sum(g)): zero rows of g give zero rows.
    pad = ZERO if g.pad == ZERO and (y.pad <= FINITE or not y.padded) else ANY
    return _Tensor(dims, pad)


def _layer_norm(op: _Op) -> tuple[_Tensor, ...]:
    st = op.tensor("input")
    rank = op.rank("input")
    k = len(op.raw("normalized_shape"))
    normed = range(rank - k, rank)
    hit = [st.dim(d).source for d in normed if st.dim(d) is not None]
    if hit:
        raise _Unsafe("layer_norm normalises over the padded dim: its statistics read the pad",
                      hit)
    for name in ("weight", "bias"):
        if op.tensor(name).padded:
            raise _Unsafe(f"layer_norm {name} is padded")
    dims = tuple(st.dim(i) for i in range(rank))
    stats = tuple(st.dim(i) if i < rank - k else None for i in range(rank))
    fin = FINITE if st.pad <= FINITE else ANY
    return _Tensor(dims, fin), _Tensor(stats, fin), _Tensor(stats, fin)


def _layer_norm_backward(op: _Op) -> tuple[_Tensor, ...]:
    g, x = op.tensor("grad_out"), op.tensor("input")
    rank = op.rank("input")
    k = len(op.raw("normalized_shape"))
    if any(g.dim(d) is not None or x.dim(d) is not None for d in range(rank - k, rank)):
        raise _Unsafe("layer_norm backward over the padded dim")
    dims = _broadcast(op, ["grad_out", "input"])
    mask = op.raw("output_mask") or [True, True, True]
    others = max((op.tensor(n).pad for n in ("input", "mean", "rstd") if op.tensor(n).padded),
                 default=FINITE)
    if any(d is not None for d in dims) and (mask[1] or mask[2]):
        if not (g.pad == ZERO and others <= FINITE):
            raise _Unsafe("layer_norm backward sums weight/bias gradients over the padded rows: "
                          "exact only when grad_out's pad is zero")
        op.an.require_zero("layer_norm backward sums weight/bias gradients over the padded rows")
    gin = ZERO if g.pad == ZERO and others <= FINITE else ANY
    return _Tensor(dims, gin), _UNPADDED, _UNPADDED


def _batch_norm(training_arg: str | None, outputs: int) -> RuleFn:
    """``training_arg``: the argument holding the training flag; ``None``: an eval-only op."""

    def rule(op: _Op) -> tuple[_Tensor, ...]:
        st = op.tensor("input")
        rank = op.rank("input")
        training = False if training_arg is None else bool(op.raw(training_arg))
        for name in ("weight", "bias", "running_mean", "running_var"):
            if name in op.values and op.tensor(name).padded:
                raise _Unsafe(f"batch_norm {name} is padded")
        if training:
            hit = [d for d in range(rank) if d != 1 and st.dim(d) is not None]
            if hit:
                raise _Unsafe(f"batch_norm in training computes batch statistics over the padded "
                              f"dim {hit[0]} (and writes them to the running stats)",
                              {st.dim(d).source for d in hit})
        elif st.dim(1) is not None:
            raise _Unsafe("batch_norm with a padded channel dim against unpadded running stats")
        chan = (st.dim(1),) if rank > 1 else (None,)
        main = _Tensor(st.dims, FINITE if st.pad <= FINITE else ANY)
        stats = _Tensor(chan, FINITE)
        return (main,) + (stats,) * (outputs - 1)

    return rule


def _group_norm(op: _Op) -> tuple[_Tensor, ...]:
    st = op.tensor("input")
    rank = op.rank("input")
    hit = [d for d in range(1, rank) if st.dim(d) is not None]
    if hit:
        raise _Unsafe(f"group_norm normalises over the padded dim {hit[0]}")
    fin = FINITE if st.pad <= FINITE else ANY
    return _Tensor(st.dims, fin), _Tensor((st.dim(0), None), fin), _Tensor((st.dim(0), None), fin)


def _rms_norm_fused(op: _Op) -> tuple[_Tensor, ...]:
    st = op.tensor("input")
    rank = op.rank("input")
    k = len(op.raw("normalized_shape"))
    if any(st.dim(d) is not None for d in range(rank - k, rank)):
        raise _Unsafe("rms_norm normalises over the padded dim")
    fin = FINITE if st.pad <= FINITE else ANY
    stats = tuple(st.dim(i) if i < rank - k else None for i in range(rank))
    return _Tensor(st.dims, fin), _Tensor(stats, fin)


# -- convolution, pooling, attention ---------------------------------------------------------------


def _batch_only(arg: str, independent: int, outputs: int = 1) -> RuleFn:
    """Ops independent over the first ``independent`` dims (batch, channels) and windowed after."""

    def rule(op: _Op) -> Any:
        st = op.tensor(arg)
        rank = op.rank(arg)
        hit = [d for d in range(independent, rank) if st.dim(d) is not None]
        if hit:
            raise _Unsafe(f"{op.schema.name.split('::')[-1]} reads neighbours along the padded dim "
                          f"{hit[0]}")
        for name, v in op.values.items():
            if name != arg and isinstance(s := op.state(name), _Tensor) and s.padded:
                raise _Unsafe(f"{name} is padded")
        out_rank = len(op.out_shape(0 if outputs > 1 else None))
        dims = tuple(st.dim(i) if i < independent else None for i in range(out_rank))
        bias = op.raw("bias") if "bias" in op.values else None
        pad = st.pad if (st.pad == ZERO and bias is None) else max(st.pad, FINITE)
        state = _Tensor(dims, pad)
        return state if outputs == 1 else tuple(_Tensor(dims, FINITE if k else pad)
                                                for k in range(outputs))

    return rule


def _conv_backward(op: _Op) -> tuple[_Tensor, ...]:
    g, x = op.tensor("grad_output"), op.tensor("input")
    for name, st in (("grad_output", g), ("input", x)):
        hit = [d for d in range(1, op.rank(name)) if st.dim(d) is not None]
        if hit:
            raise _Unsafe(f"convolution backward with {name} padded on dim {hit[0]}")
    if op.tensor("weight").padded:
        raise _Unsafe("convolution weight is padded")
    mask = op.raw("output_mask") or [True, True, True]
    if (g.padded or x.padded) and (mask[1] or mask[2]):
        if not (g.pad == ZERO and (x.pad <= FINITE or not x.padded)):
            raise _Unsafe("convolution backward sums weight/bias gradients over the padded batch: "
                          "exact only when grad_output's pad is zero")
        op.an.require_zero("convolution backward sums weight/bias gradients over the padded batch")
    gin_dims = (g.dim(0),) + (None,) * (op.rank("input") - 1)
    return _Tensor(gin_dims, ZERO if g.pad == ZERO else ANY), _UNPADDED, _UNPADDED


def _attention(op: _Op) -> Any:
    q, k, v = op.tensor("query"), op.tensor("key"), op.tensor("value")
    for name in ("attn_mask", "attn_bias"):
        if name in op.values and op.tensor(name).padded:
            raise _Unsafe(f"attention {name} is padded (a key-padding mask would be needed)")
    if (op.raw("dropout_p") or 0.0) > 0.0:
        raise _Unsafe("attention dropout is random (see rule 17)")
    if q.dim(3) is not None or k.dim(3) is not None:
        raise _Unsafe("attention contracts over the padded head dim")
    kl, vl = k.dim(2), v.dim(2)
    if kl is not None or vl is not None:
        ql = q.dim(2)
        causal = bool(op.raw("is_causal"))
        ok = (kl is not None and vl is not None and ql is not None and causal
              and _same_dim(kl, ql) and _same_dim(vl, ql)
              and _same(op.shape("query")[2], op.shape("key")[2]))
        if not ok:
            raise _Unsafe("attention over a padded key length: the softmax normaliser reads the "
                          "pad (safe only for causal self-attention padded on both lengths)")
    lead = []
    for d in (0, 1):
        ds = [t.dim(d) for t in (q, k, v)]
        present = [x for x in ds if x is not None]
        if present and (len(present) != 3 or not all(_same_dim(present[0], x) for x in present)):
            raise _Unsafe(f"attention operands carry the padded extent differently on dim {d}")
        lead.append(present[0] if present else None)
    out0 = _Tensor((lead[0], lead[1], q.dim(2), v.dim(3)), ANY)
    val = _val(op.node)
    if not isinstance(val, (list, tuple)):
        return out0
    results: list[_Tensor] = [out0]
    q_shape = op.shape("query")
    for item in val[1:]:
        if isinstance(item, torch.Tensor) and item.dim() >= 3 and \
                all(_same(item.shape[i], q_shape[i]) for i in range(3)):
            results.append(_Tensor((lead[0], lead[1], q.dim(2)) + (None,) * (item.dim() - 3), ANY))
        else:
            results.append(_UNPADDED)
    return tuple(results)


# -- factories, sizes, mutation --------------------------------------------------------------------


def _factory(content: int, size_arg: str = "size") -> RuleFn:
    """``content``: pad fact of the new tensor (``-1``: from the literal ``fill_value``)."""

    def rule(op: _Op) -> _Tensor:
        sizes = op.raw(size_arg)
        dims = tuple(_size_arg_dim(op, s, f"size {j}") for j, s in enumerate(sizes))
        fill = op.raw("fill_value")
        pad = _literal_pad(fill) if content == -1 else content
        if isinstance(op.state("fill_value"), _Sym) and op.state("fill_value").deps:
            raise _Unsafe("fill value reads the padded size")
        return _Tensor(dims, pad)

    return rule


def _like(content: int) -> RuleFn:
    def rule(op: _Op) -> _Tensor:
        st = op.tensor("self")
        pad = _literal_pad(op.raw("fill_value")) if content == -1 else content
        return _Tensor(st.dims, pad)

    return rule


def _arange(op: _Op) -> _Tensor:
    start, end, step = op.raw("start"), op.raw("end"), op.raw("step")
    end_state = op.an.state_of(end)
    if isinstance(end_state, _Sym) and end_state.deps:
        if start in (None, 0) and step in (None, 1) and end_state.exact is not None:
            return _Tensor((end_state.exact,), FINITE)
        raise _Unsafe("arange bounds are a function of the padded size")
    for name in ("start", "step"):
        s = op.state(name)
        if isinstance(s, _Sym) and s.deps:
            raise _Unsafe(f"arange {name} reads the padded size")
    return _Tensor(None, FINITE)


def _random(op: _Op) -> Any:
    raise _Unsafe("random op on a padded shape: the padded run draws a different stream, so the "
                  "real region differs from the unpadded run (see rule 17)")


def _data_dependent(op: _Op) -> Any:
    raise _Unsafe("output shape depends on the data (not defined position-wise)")


def _indexing_unsafe(op: _Op) -> Any:
    raise _Unsafe("data-dependent indexing of a padded tensor (indices may address the pad)")


def _copy(op: _Op) -> _Tensor:
    dst, src = op.tensor("self"), op.tensor("src")
    dims = _broadcast(op, ["self", "src"])
    for j, d in enumerate(dims):
        if d is not None and dst.dim(j) is None:
            raise _Unsafe("copies a padded tensor into an unpadded destination")
    return _Tensor(dims, src.pad if src.padded else FINITE)


def _constant_pad(op: _Op) -> _Tensor:
    st = op.tensor("self")
    rank = op.rank("self")
    pads = list(op.raw("pad"))
    dims = list(st.dims or (None,) * rank)
    for k in range(0, len(pads), 2):
        d = rank - 1 - k // 2
        before, after = pads[k], pads[k + 1]
        cur = dims[d]
        if cur is None:
            continue
        # Padding *before* shifts the real region; padding *after* puts constants behind the pad
        # region, where the real run has them right after its real positions.
        if before != 0 or after != 0:
            raise _Unsafe(f"constant_pad_nd pads the padded dim {d} ({before}, {after}): the "
                          "real run's border would sit behind the pad", {cur.source})
    value = op.raw("value")
    return _Tensor(tuple(dims), max(st.pad, _literal_pad(value or 0)))


def _repeat(op: _Op) -> _Tensor:
    st = op.tensor("self")
    reps = list(op.raw("repeats"))
    rank = op.rank("self")
    lead = len(reps) - rank
    dims: list[_Dim | None] = [None] * lead
    for i in range(rank):
        d = st.dim(i)
        if d is not None and reps[lead + i] != 1:
            raise _Unsafe(f"repeat tiles the padded dim {i}: copies of the pad interleave")
        dims.append(d)
    return _Tensor(tuple(dims), st.pad)


def _tri(op: _Op) -> _Tensor:
    st = op.tensor("self")  # the mask depends on (row - col) only, not on extents: position-wise
    return _Tensor(st.dims, st.pad)


# ------------------------------------------------------------------------------------------------
# The op table: overload packet → rule. Ops tagged ``torch.Tag.pointwise`` but absent here get the
# generic pointwise rule with pad fact ANY; ops tagged ``nondeterministic_seeded`` are random.
# ------------------------------------------------------------------------------------------------

_Z, _F, _A = ZERO, FINITE, ANY
_SHAPE = frozenset({"size", "shape", "sizes"})

_TABLE: tuple[tuple[str, _Rule, tuple[str, ...]], ...] = (
    # family                            rule                                   ops
    ("pointwise, f(0)=0, finite→finite", _Rule(_pointwise("unary", (_Z, _F))), (
        "neg", "abs", "relu", "gelu", "silu", "tanh", "sin", "sign", "sgn", "hardtanh",
        "leaky_relu", "elu", "selu", "celu", "mish", "hardswish", "floor", "ceil", "round",
        "trunc", "erf", "atan", "asinh", "positive", "frac", "deg2rad", "rad2deg", "clone",
        "_to_copy", "alias", "detach", "lift_fresh_copy", "_conj", "nan_to_num", "asin", "arctan",
    )),
    ("pointwise, f(0)=0, may overflow", _Rule(_pointwise("unary", (_Z, _A))), (
        "sqrt", "expm1", "sinh", "tan", "log1p", "square", "atanh",
    )),
    ("pointwise, f(0) finite ≠ 0", _Rule(_pointwise("unary", (_F, _F))), (
        "sigmoid", "cos", "hardsigmoid", "softplus", "logical_not", "bitwise_not", "isnan",
        "isinf", "isfinite", "signbit",
    )),
    ("pointwise, exp-like", _Rule(_pointwise("unary", (_F, _A))), ("exp", "exp2", "cosh")),
    ("pointwise, unbounded at 0", _Rule(_pointwise("unary", (_A, _A))), (
        "log", "log2", "log10", "reciprocal", "rsqrt", "lgamma", "digamma", "acos", "acosh",
        "erfinv", "logit",
    )),
    ("pointwise, additive", _Rule(_pointwise("add")), (
        "add", "sub", "rsub", "maximum", "minimum", "fmax", "fmin", "where", "masked_fill",
        "clamp", "clamp_min", "clamp_max", "copy", "lerp",
    )),
    ("pointwise, multiplicative", _Rule(_pointwise("mul")), ("mul", "logical_and", "bitwise_and")),
    ("activation backward: zero where grad is", _Rule(_pointwise("grad")), (
        "threshold_backward", "gelu_backward", "silu_backward", "tanh_backward",
        "sigmoid_backward", "hardtanh_backward", "leaky_relu_backward",
    )),
    ("pointwise, division", _Rule(_pointwise("div")), ("div",)),
    ("pointwise, boolean", _Rule(_pointwise("bool")), (
        "eq", "ne", "lt", "le", "gt", "ge", "logical_or", "logical_xor", "bitwise_or",
        "bitwise_xor",
    )),
    ("position masks (tril/triu)", _Rule(_tri), ("tril", "triu")),
    ("views/reshapes: regroup dims", _Rule(_reshape, _SHAPE), (
        "view", "_unsafe_view", "reshape", "view_copy", "unsqueeze", "squeeze", "flatten",
        "unflatten", "_reshape_alias", "squeeze_copy", "unsqueeze_copy",
    )),
    ("dim shuffles", _Rule(_permute), ("permute", "transpose", "t", "permute_copy",
                                       "transpose_copy", "t_copy")),
    ("identity", _Rule(_identity), ("contiguous", "_assert_tensor_metadata")),
    ("expand: size args checked", _Rule(_expand, _SHAPE), ("expand", "expand_copy")),
    ("slice: whole or within the real region", _Rule(_slice, frozenset({"start", "end", "step"})),
     ("slice", "slice_copy")),
    ("select: constant index ≥ 0", _Rule(_select), ("select", "select_copy")),
    ("split/unbind: not along the padded dim", _Rule(_split), (
        "split", "split_with_sizes", "unbind", "split_copy", "split_with_sizes_copy",
        "unbind_copy",
    )),
    ("flip/roll: not along the padded dim", _Rule(_along_dims_unsafe("dims", "flip")), ("flip",)),
    ("roll", _Rule(_along_dims_unsafe("dims", "roll")), ("roll",)),
    ("cat: padded operand last", _Rule(_cat), ("cat",)),
    ("stack", _Rule(_stack), ("stack",)),
    ("index_select", _Rule(_index_select), ("index_select",)),
    ("embedding: padded indices need pad 0", _Rule(_embedding), ("embedding",)),
    ("embedding backward", _Rule(_embedding_backward), ("embedding_dense_backward",)),
    ("advanced indexing (gather rows)", _Rule(_index_tensor), ("index",)),
    ("indexing by data: unsafe when padded", _Rule(_indexing_unsafe), (
        "gather", "scatter", "scatter_add", "scatter_reduce", "index_put", "index_add",
        "index_copy", "index_fill", "masked_scatter", "take", "put", "_unsafe_index",
        "_unsafe_index_put",
    )),
    ("matmul: rows/batch carry, contraction needs zero pad", _Rule(_mm), ("mm",)),
    ("bmm", _Rule(_bmm), ("bmm",)),
    ("addmm", _Rule(_with_bias(_mm, "mat1", "mat2")), ("addmm",)),
    ("baddbmm", _Rule(_with_bias(_bmm, "batch1", "batch2")), ("baddbmm",)),
    ("mv", _Rule(_mv), ("mv",)),
    ("dot", _Rule(_dot), ("dot", "vdot")),
    ("reductions, exact with zero pad", _Rule(_reduction("keep", zero_exact=True)), (
        "sum", "nansum", "any", "linalg_vector_norm",
    )),
    ("reductions", _Rule(_reduction("keep")), (
        "mean", "prod", "all", "amax", "amin", "var", "std", "norm", "var_mean", "std_mean",
        "max", "min", "aminmax",
    )),
    ("reductions to finite values", _Rule(_reduction("finite")), ("logsumexp",)),
    ("index reductions", _Rule(_reduction("index")), ("argmax", "argmin")),
    ("softmax over another dim", _Rule(_along_dim("softmax", pad=FINITE)), (
        "_softmax", "_log_softmax", "softmax", "log_softmax",
    )),
    ("softmax backward", _Rule(_softmax_backward), (
        "_softmax_backward_data", "_log_softmax_backward_data",
    )),
    ("order statistics", _Rule(_along_dim("sort")), (
        "sort", "topk", "kthvalue", "median", "nanmedian", "mode", "argsort", "msort",
    )),
    ("causal scans: safe along the padded dim", _Rule(_along_dim("scan", scan=True, pad=FINITE)), (
        "cumsum", "cumprod", "logcumsumexp", "cummax", "cummin",
    )),
    ("layer norm", _Rule(_layer_norm), ("native_layer_norm",)),
    ("layer norm backward", _Rule(_layer_norm_backward), ("native_layer_norm_backward",)),
    ("fused rms norm", _Rule(_rms_norm_fused), ("_fused_rms_norm",)),
    ("batch norm (training flag)", _Rule(_batch_norm("training", 3)), (
        "native_batch_norm", "_native_batch_norm_legit",
    )),
    ("group norm", _Rule(_group_norm), ("native_group_norm",)),
    ("convolution over the batch dim", _Rule(_batch_only("input", 1)), ("convolution",
                                                                        "_convolution")),
    ("convolution backward", _Rule(_conv_backward), ("convolution_backward",)),
    ("pooling over batch/channels", _Rule(_batch_only("self", 2)), (
        "avg_pool2d", "_adaptive_avg_pool2d", "adaptive_avg_pool2d", "avg_pool1d",
        "avg_pool3d", "upsample_nearest2d", "upsample_bilinear2d",
    )),
    ("max pooling (values, indices)", _Rule(_batch_only("self", 2, outputs=2)), (
        "max_pool2d_with_indices", "max_pool3d_with_indices",
    )),
    ("attention", _Rule(_attention), (
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention", "scaled_dot_product_attention",
    )),
    ("factories: padded size args become padded dims", _Rule(_factory(ZERO), _SHAPE), (
        "zeros", "new_zeros",
    )),
    ("factories (ones)", _Rule(_factory(FINITE), _SHAPE), ("ones", "new_ones")),
    ("factories (full)", _Rule(_factory(-1), _SHAPE), ("full", "new_full")),
    ("factories (empty)", _Rule(_factory(ANY), _SHAPE), (
        "empty", "new_empty", "empty_strided", "new_empty_strided",
    )),
    ("*_like", _Rule(_like(ZERO)), ("zeros_like",)),
    ("*_like (ones)", _Rule(_like(FINITE)), ("ones_like",)),
    ("*_like (full)", _Rule(_like(-1)), ("full_like",)),
    ("*_like (empty)", _Rule(_like(ANY)), ("empty_like",)),
    ("arange(size)", _Rule(_arange, frozenset({"start", "end", "step"})), ("arange",)),
    ("random", _Rule(_random, _SHAPE), (
        "rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like",
        "bernoulli", "native_dropout", "dropout", "normal", "uniform", "multinomial",
    )),
    ("data-dependent output shape", _Rule(_data_dependent), (
        "nonzero", "nonzero_static", "unique_dim", "_unique2", "_unique", "unique_consecutive",
        "masked_select", "repeat_interleave", "_local_scalar_dense", "item",
    )),
    ("constant_pad_nd: only after the padded dim", _Rule(_constant_pad), ("constant_pad_nd",)),
    ("repeat", _Rule(_repeat), ("repeat",)),
)


def _build_rules() -> dict[Any, _Rule]:
    rules: dict[Any, _Rule] = {}
    for _family, rule, names in _TABLE:
        for name in names:
            packet = getattr(aten, name, None) if hasattr(aten, name) else None
            if packet is not None:
                rules[packet] = rule
    return rules


RULES: dict[Any, _Rule] = _build_rules()
"""``torch.ops.aten.<op>`` overload packet → transfer rule (built from ``_TABLE``)."""

_OVERLOAD_RULES: dict[Any, _Rule] = {
    aten.view.dtype: _Rule(_view_dtype),
    aten.max.other: _Rule(_pointwise("add")),
    aten.min.other: _Rule(_pointwise("add")),
    aten._native_batch_norm_legit_no_training.default: _Rule(_batch_norm(None, 3)),
    aten._native_batch_norm_legit_functional.default: _Rule(_batch_norm("training", 5)),
}

_SYM_SIZE_OPS = {aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int,
                 aten.sym_storage_offset.default}
_MISSING = object()


def _lookup(target: Any) -> _Rule | None:
    if target in _OVERLOAD_RULES:
        return _OVERLOAD_RULES[target]
    return RULES.get(getattr(target, "overloadpacket", None))


# ------------------------------------------------------------------------------------------------
# The walk
# ------------------------------------------------------------------------------------------------


def _val(node: torch.fx.Node) -> Any:
    meta = node.meta
    for key in ("val", "example_value"):
        if key in meta:
            return meta[key]
    tm = meta.get("tensor_meta")
    return tm if tm is not None and hasattr(tm, "shape") else _MISSING


def _source_line(node: torch.fx.Node) -> str | None:
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', trace)
    if not frames:
        return trace.strip().splitlines()[-1].strip()
    path, line, func, code = frames[-1]
    return f"{path}:{line} in {func}: {code.strip()}"


class _Analysis:
    """One forward walk over the graph for a fixed set of sources."""

    def __init__(self, gm: torch.fx.GraphModule, sources: Sequence[PadSource],
                 allow_zero_pad: bool = True) -> None:
        self.gm = gm
        self.allow_zero_pad = allow_zero_pad
        self.pad_facts_stale = False
        self.sources = tuple(sources)
        self.states: dict[torch.fx.Node, Any] = {}
        self.aliases: dict[torch.fx.Node, frozenset[int]] = {}
        self.failures: list[tuple[UnsafeReason, frozenset[PadSource]]] = []
        self.zero_required = False
        self.ties: dict[tuple[PadSource, PadSource], None] = {}
        self.outputs: list[OutputDim] = []
        self.size_inputs: list[SizeInput] = []
        self.placeholder_index: dict[torch.fx.Node, int] = {}
        self.symbol_dims: dict[sympy.Symbol, tuple[int, int]] = {}
        self.source_symbols: set[sympy.Symbol] = set()

    # -- helpers used by rules ---------------------------------------------------------------

    def state_of(self, value: Any) -> Any:
        if isinstance(value, torch.fx.Node):
            return self.states.get(value, _UNPADDED)
        if isinstance(value, (list, tuple)):
            return tuple(self.state_of(v) for v in value)
        return None

    def shape_of(self, value: Any, index: int | None = None) -> tuple[Any, ...]:
        if not isinstance(value, torch.fx.Node):
            return ()
        val = _val(value)
        if index is not None and isinstance(val, (list, tuple)):
            val = val[index]
        elif isinstance(val, (list, tuple)) and val and hasattr(val[0], "shape"):
            val = val[0]
        if val is _MISSING or not hasattr(val, "shape"):
            if isinstance(val, (int, float, bool, torch.SymInt, torch.SymFloat)):
                return ()
            raise _Unsafe(f"no shape metadata (meta['val']) on node {value.name!r}")
        return tuple(val.shape)

    def tie(self, a: PadSource, b: PadSource) -> None:
        if a != b:
            self.ties[(min(a, b), max(a, b))] = None

    def require_zero(self, what: str) -> None:
        """Records that ``what`` is exact only with zero padding; raises if that is not allowed."""
        if not self.allow_zero_pad:
            raise _Unsafe(f"{what} reads the pad region: exact only with pad value 0, which the "
                          "caller does not allow (allow_zero_pad=False)")
        if self.pad_facts_stale:
            raise _Unsafe(f"{what} reads the pad region: exact only with pad value 0, and an "
                          "earlier in-place mutation makes the pad contents unknown")
        self.zero_required = True

    # -- driver --------------------------------------------------------------------------------

    def run(self) -> None:
        wanted: dict[int, list[int]] = {}
        for s in self.sources:
            wanted.setdefault(s.input, []).append(s.dim)
        index = 0
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.placeholder_index[node] = index
                self._placeholder(node, index, wanted.get(index, []))
                index += 1
        self._sym_placeholders()
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                continue
            try:
                if node.op == "output":
                    self._output(node)
                else:
                    self.states[node] = self._visit(node)
            except _Unsafe as exc:
                involved = self._involved(node)
                sources = exc.sources if exc.sources else involved
                self._fail(node, exc.why, sources or frozenset(self.sources))
                self.states[node] = _POISON

    def _fail(self, node: torch.fx.Node, why: str, sources: frozenset[PadSource]) -> None:
        reason = UnsafeReason(node=node.name, op=_op_name(node), why=why,
                              source_line=_source_line(node), sources=tuple(sorted(sources)))
        self.failures.append((reason, sources))

    def _involved(self, node: torch.fx.Node) -> frozenset[PadSource]:
        out: set[PadSource] = set()
        for arg in node.all_input_nodes:
            out.update(_state_sources(self.states.get(arg)))
        return frozenset(out)

    def _placeholder(self, node: torch.fx.Node, index: int, dims: list[int]) -> None:
        val = _val(node)
        if isinstance(val, torch.Tensor):
            for d, size in enumerate(val.shape):
                if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                    self.symbol_dims.setdefault(size.node.expr, (index, d))
        if not dims:
            self.states[node] = _Sym() if isinstance(val, (int, torch.SymInt)) else _UNPADDED
            self.aliases[node] = frozenset({index})
            return
        if not isinstance(val, torch.Tensor):
            why = ("no shape metadata (meta['val']) on the input" if val is _MISSING
                   else "proposed input is not a tensor")
            self._fail(node, why, frozenset(PadSource(index, d) for d in dims))
            self.states[node] = _POISON
            return
        rank = val.dim()
        state: list[_Dim | None] = [None] * rank
        for d in dims:
            src = PadSource(index, d)
            if not 0 <= d < rank:
                self._fail(node, f"dim {d} out of range for a rank-{rank} input", frozenset({src}))
                self.states[node] = _POISON
                return
            if _same(val.shape[d], 1) or _same(val.shape[d], 0):
                self._fail(node, f"dim {d} has extent {val.shape[d]} in the trace: padding it "
                           "would change broadcasting", frozenset({src}))
                self.states[node] = _POISON
                return
            state[d] = _Dim(src)
            size = val.shape[d]
            if isinstance(size, torch.SymInt):
                self.source_symbols.update(size.node.expr.free_symbols)
        self.states[node] = _Tensor(tuple(state), ZERO)
        self.aliases[node] = frozenset({index})

    def _sym_placeholders(self) -> None:
        """``SymInt`` placeholders equal to a padded extent become exact padded sizes."""
        extents: dict[Any, PadSource] = {}
        for node, idx in self.placeholder_index.items():
            st = self.states.get(node)
            if isinstance(st, _Tensor) and st.padded:
                val = _val(node)
                for d, dim in enumerate(st.dims or ()):
                    if dim is not None and isinstance(val.shape[d], torch.SymInt):
                        extents.setdefault(val.shape[d].node.expr, dim.source)
        for node, idx in self.placeholder_index.items():
            val = _val(node)
            if isinstance(val, torch.SymInt) and val.node.expr in extents:
                src = extents[val.node.expr]
                self.states[node] = _Sym(frozenset({src}), _Dim(src))
                self.size_inputs.append(SizeInput(idx, src))

    def _visit(self, node: torch.fx.Node) -> Any:
        args = [self.states.get(a, _UNPADDED) for a in node.all_input_nodes]
        if any(a is _POISON for a in args):
            return _POISON
        if node.op == "get_attr":
            return _UNPADDED
        involved = self._involved(node)
        target = node.target
        if node.op != "call_function":
            if involved:
                raise _Unsafe(f"unknown {node.op} on a padded value")
            return _UNPADDED
        if target is operator.getitem:
            base = self.states.get(node.args[0], _UNPADDED)
            self.aliases[node] = self.aliases.get(node.args[0], frozenset())
            if isinstance(base, tuple):
                return base[node.args[1]]
            return base if not isinstance(base, _Tensor) else _UNPADDED
        if not isinstance(target, torch._ops.OpOverload):
            # Python arithmetic on sizes (operator.mul, sym_max, ...): propagate dependence.
            if any(isinstance(a, _Tensor) and a.padded for a in args):
                raise _Unsafe("unknown op on a padded tensor")
            deps = frozenset(s for a in args for s in _state_sources(a))
            return _Sym(deps) if deps else (_Sym() if _is_sym(node) else _UNPADDED)
        self._track_alias(node)
        if target in _SYM_SIZE_OPS:
            return self._sym_size(node)
        if not involved:
            return self._unpadded_result(node)
        op = _Op(self, node)
        self._check_mutation(op)
        rule = _lookup(target)
        if rule is None and target.overloadpacket.__name__.endswith("_"):
            # In-place variant of a functional op (add_, relu_, copy_): same transfer rule.
            functional = getattr(aten, target.overloadpacket.__name__[:-1], None)
            rule = RULES.get(functional) if functional is not None else None
            if target is aten.copy_.default:
                rule = _Rule(_copy)
        self._check_value_uses(op, rule.size_args if rule else frozenset())
        if rule is None:
            if torch.Tag.nondeterministic_seeded in target.tags:
                rule = _Rule(_random)
            elif torch.Tag.pointwise in target.tags:
                rule = _Rule(_pointwise())
            else:
                raise _Unsafe("unknown op: no padding rule (conservatively unsafe)")
        result = rule.fn(op)
        self._check_extents(node, result)
        for name in _mutated_args(op):
            if isinstance(op.raw(name), torch.fx.Node) and isinstance(result, _Tensor) \
                    and result.padded:
                # Views of the mutated tensor keep their dims (mutation never reshapes) but may
                # now hold stale pad-content facts: stop trusting those facts from here on.
                self.states[op.raw(name)] = result
                self.pad_facts_stale = True
        return result

    def _unpadded_result(self, node: torch.fx.Node) -> Any:
        val = _val(node)
        if isinstance(val, (list, tuple)):
            return tuple(_Sym() if isinstance(v, torch.SymInt) else _UNPADDED for v in val)
        return _Sym() if isinstance(val, (int, torch.SymInt)) else _UNPADDED

    def _sym_size(self, node: torch.fx.Node) -> _Sym:
        base = self.states.get(node.args[0], _UNPADDED)
        if not isinstance(base, _Tensor) or not base.padded:
            return _Sym()
        if node.target is aten.sym_size.int:
            rank = len(self.shape_of(node.args[0]))
            d = base.dim(node.args[1] % rank)
            if d is None:
                return _Sym()
            return _Sym(frozenset({d.source}), d)
        return _Sym(frozenset(_state_sources(base)))

    def _track_alias(self, node: torch.fx.Node) -> None:
        schema = node.target._schema  # type: ignore[union-attr]
        if not any(r.alias_info is not None for r in schema.returns):
            return
        bases: set[int] = set()
        for i, arg in enumerate(schema.arguments):
            if arg.alias_info is None:
                continue
            v = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            if isinstance(v, torch.fx.Node):
                bases |= self.aliases.get(v, frozenset())
        self.aliases[node] = frozenset(bases)

    def _check_mutation(self, op: _Op) -> None:
        for name in _mutated_args(op):
            v = op.raw(name)
            st = self.state_of(v)
            if not isinstance(v, torch.fx.Node) or not isinstance(st, _Tensor) or not st.padded:
                continue
            if self.aliases.get(v):
                raise _Unsafe(f"in-place mutation ({op.schema.name}) of a padded graph input: the "
                              "pad region would be written back into the caller's buffer",
                              _state_sources(st))

    def _check_value_uses(self, op: _Op, size_args: frozenset[str]) -> None:
        for arg in op.schema.arguments:
            if arg.name in size_args:
                continue
            st = op.state(arg.name)
            deps = frozenset(
                s for x in (st if isinstance(st, tuple) else (st,))
                if isinstance(x, _Sym) for s in x.deps
            )
            if deps:
                raise _Unsafe(f"reads the padded size as a value (argument {arg.name!r}): the "
                              "padded run would see the bucket size", deps)

    def _check_extents(self, node: torch.fx.Node, result: Any) -> None:
        """Safety net (symbolic graphs): a dim not tracked as padded must not depend on a padded
        extent's symbol; if it does, some rule lost track of the padded dim."""
        if not self.source_symbols:
            return
        val = _val(node)
        pairs = zip(val, result) if isinstance(val, (list, tuple)) and isinstance(result, tuple) \
            else [(val, result)]
        for v, st in pairs:
            if not isinstance(v, torch.Tensor) or not isinstance(st, _Tensor):
                continue
            for i, size in enumerate(v.shape):
                if st.dim(i) is None and isinstance(size, torch.SymInt) and \
                        size.node.expr.free_symbols & self.source_symbols:
                    raise _Unsafe(f"dim {i} of the result has extent {size} which depends on the "
                                  "padded size, but does not carry the padded positions")

    def _output(self, node: torch.fx.Node) -> None:
        flat, _ = torch.utils._pytree.tree_flatten(node.args[0])
        for k, value in enumerate(flat):
            st = self.state_of(value)
            if st is _POISON:
                continue
            if isinstance(st, _Sym) and st.deps:
                raise _Unsafe(f"output {k} is a size that depends on the padded extent", st.deps)
            if not isinstance(st, _Tensor) or not st.padded:
                continue
            for d, dim in enumerate(st.dims or ()):
                if dim is None:
                    continue
                scale, scale_dims = self._express(dim.factor, dim.source)
                self.outputs.append(OutputDim(k, d, dim.source, scale, scale_dims, dim.shifted))

    def _express(self, factor: Any, source: PadSource) -> tuple[int, tuple[tuple[int, int], ...]]:
        if isinstance(factor, int):
            return factor, ()
        expr = sympy.expand(factor.node.expr)
        scale, dims = 1, []
        for term in sympy.Mul.make_args(expr):
            base, exp = term.as_base_exp()
            if term.is_Integer:
                scale *= int(term)
            elif isinstance(base, sympy.Symbol) and exp.is_Integer and base in self.symbol_dims \
                    and base not in self.source_symbols:
                dims += [self.symbol_dims[base]] * int(exp)
            else:
                raise _Unsafe(f"cannot express the output extent factor {factor} in input sizes",
                              {source})
        return scale, tuple(dims)


def _is_sym(node: torch.fx.Node) -> bool:
    return isinstance(_val(node), (torch.SymInt, int))


def _mutated_args(op: _Op) -> list[str]:
    return [a.name for a in op.schema.arguments
            if a.alias_info is not None and a.alias_info.is_write]


def _op_name(node: torch.fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return f"aten.{t.overloadpacket.__name__}.{t._overloadname}" \
            if t.namespace == "aten" else str(t)
    return getattr(t, "__name__", str(t))


# ------------------------------------------------------------------------------------------------
# Public entry points
# ------------------------------------------------------------------------------------------------


def analyze_padding(gm: torch.fx.GraphModule, pad_dims: Mapping[int, int | Sequence[int]], *,
                    allow_zero_pad: bool = True) -> PaddingPlan:
    """Decides, for each proposed ``(placeholder index, dim)``, whether it can be padded.

    ``allow_zero_pad=False``: the runtime cannot guarantee zero pad contents, so ops that are only
    exact with zero padding (sum or contraction over the padded dim, lookups with padded indices)
    are unsafe too; every safe verdict then holds for arbitrary pad contents.

    Sources implicated in an unsafe node are dropped and the rest re-analysed, so the sources the
    plan marks safe are safe *together*; outputs, ties and size inputs refer to that final set.
    """
    proposed: list[PadSource] = []
    for idx, dims in sorted(pad_dims.items()):
        for d in ([dims] if isinstance(dims, int) else list(dims)):
            proposed.append(PadSource(int(idx), int(d)))
    n_inputs = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    rejected: dict[PadSource, list[UnsafeReason]] = {}
    live = []
    for s in proposed:
        if not 0 <= s.input < n_inputs:
            rejected[s] = [UnsafeReason("<input>", "placeholder",
                                        f"no placeholder {s.input} (graph has {n_inputs})",
                                        None, (s,))]
        else:
            live.append(s)
    while True:
        analysis = _Analysis(gm, live, allow_zero_pad)
        analysis.run()
        if not analysis.failures:
            break
        dropped: set[PadSource] = set()
        for reason, sources in analysis.failures:
            for s in sources or live:
                if s in live:
                    rejected.setdefault(s, []).append(reason)
                    dropped.add(s)
        if not dropped:  # defensive: a failure naming no live source cannot loop forever
            for s in live:
                rejected.setdefault(s, []).extend(r for r, _ in analysis.failures)
            dropped = set(live)
        live = [s for s in live if s not in dropped]
    pad_value = 0.0 if analysis.zero_required and live else None
    verdicts = tuple(
        InputVerdict(s, False, None, tuple(dict.fromkeys(rejected[s]))) if s in rejected
        else InputVerdict(s, True, pad_value)
        for s in proposed
    )
    return PaddingPlan(
        inputs=verdicts,
        outputs=tuple(analysis.outputs) if live else (),
        size_inputs=tuple(analysis.size_inputs) if live else (),
        ties=tuple(analysis.ties) if live else (),
    )


def default_pad_dims(gm: torch.fx.GraphModule) -> dict[int, int]:
    """Dim 0 of every non-parameter tensor input whose dim 0 is symbolic in ``meta``."""
    proposal: dict[int, int] = {}
    index = 0
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = _val(node)
        if isinstance(val, torch.Tensor) and not isinstance(val, torch.nn.Parameter) \
                and val.dim() > 0 and isinstance(val.shape[0], torch.SymInt) \
                and not isinstance(val.shape[0].node.expr, sympy.Integer):
            proposal[index] = 0
        index += 1
    return proposal


@dataclasses.dataclass(frozen=True)
class PaddingAnalysisPass(GraphPass):
    """Finds which input dims a piece may pad to a bucket; never changes the graph.

    ``pad_dims``: an explicit proposal ``{placeholder index: dim or dims}``; ``None`` proposes
    :func:`default_pad_dims` (dim 0 of every input whose dim 0 is symbolic).
    """

    name: ClassVar[str] = "padding_analysis"
    stage: ClassVar[Stage] = "post_aot"

    pad_dims: tuple[tuple[int, tuple[int, ...]], ...] | Mapping[int, int | Sequence[int]] | None = None
    allow_zero_pad: bool = True

    def __post_init__(self) -> None:
        if self.pad_dims is not None and isinstance(self.pad_dims, Mapping):
            norm = tuple(sorted(
                (int(k), (v,) if isinstance(v, int) else tuple(v))
                for k, v in self.pad_dims.items()
            ))
            object.__setattr__(self, "pad_dims", norm)

    def run(self, gm: torch.fx.GraphModule, config: Config) -> PassResult:
        proposal = default_pad_dims(gm) if self.pad_dims is None else dict(self.pad_dims)
        plan = analyze_padding(gm, proposal, allow_zero_pad=self.allow_zero_pad)
        return PassResult(gm, modified=False, findings=(plan,))
