"""The CPU runtime's replay writing a piece's outputs straight into its output buffers.

Why
---
A device graph's kernels write its outputs where the capture put them: a replay costs no copy.
The CPU runtime emulates a replay by running the piece again, which returns fresh tensors, and
then copied every output into the graph's output buffers. That copy is pure emulation (a device
never pays it), yet in training it is one copy of every activation and of every gradient per
step: the largest cost of the CPU runtime beyond the ops themselves.

How
---
For a piece run by its ATen graph (the ``"eager"`` piece compiler), :func:`plan_writes` rewrites
the graph so that the op producing an output calls its ``out=`` overload (``mm.out``,
``native_layer_norm.out`` ...) with the output's buffer: the op writes there, and everything
after it in the graph reads the buffer. An output that is a view of such an op's result (``t``,
``view``, a ``getitem`` of a multi-output op) is the same view of the buffer. The result is the
device graph's behaviour: the same buffers written in place by every replay.

Only what is proven safe is written in place; every other output is still copied:

* the producing op is a functional ATen overload whose ``out=`` overload takes the same
  arguments (names and types) plus one out argument per returned tensor;
* the capture's probe shows the output sharing memory with that result, with the same dtype, and
  the result contiguous (some out= kernels fill a buffer of another layout differently), not
  memory of an input or of another result;
* the graph mutates nothing but its own inputs (an op writing to a value the graph computed
  could write into a buffer).

* the rewrite, run once at capture on the probe's inputs (as they were before the probe, with
  the probe's random state), gives every written output the probe's value: an ``out=`` overload
  may compute something else (``binary_cross_entropy.out`` on the CPU does not reduce like
  ``binary_cross_entropy``), and an output that is a lazy conjugate or negation of a result is
  never taken for a view of its memory.

The first replay checks again that every written output came back as a view of its buffer; if
not, the graph goes back to copying (logged).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

from hpuopt.fx_utils import output_node
from hpuopt.runtime.base import clone_exact

log = logging.getLogger(__name__)


@functools.cache
def out_overload(op: Any) -> tuple[Any, tuple[str, ...]] | None:
    """The ``out=`` overload of the functional ATen overload ``op`` and the names of its out
    arguments (one per returned tensor), or ``None``."""
    if not isinstance(op, torch._ops.OpOverload):
        return None
    schema = op._schema
    if not schema.returns or any(str(r.type) != "Tensor" for r in schema.returns):
        return None
    if any(a.alias_info is not None for a in schema.arguments) or any(
        r.alias_info is not None for r in schema.returns
    ):
        return None  # a view or an in-place op
    wanted = [(a.name, str(a.type)) for a in schema.arguments]
    packet = op.overloadpacket
    for name in packet.overloads():
        candidate = getattr(packet, name)
        args = candidate._schema.arguments
        outs = tuple(a.name for a in args if a.is_out)
        if len(outs) != len(schema.returns):
            continue
        if [(a.name, str(a.type)) for a in args if not a.is_out] == wanted:
            return candidate, outs
    return None


def _is_view(node: torch.fx.Node) -> bool:
    """An ATen op whose result is a view of its first argument."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    returns = node.target._schema.returns
    info = returns[0].alias_info if len(returns) == 1 else None
    return info is not None and not info.is_write and bool(node.args)


def _written_inputs(gm: torch.fx.GraphModule) -> set[int] | None:
    """The placeholders an op of ``gm`` writes (through views of them too); ``None`` when an op
    writes something other than a placeholder: such a graph is left to the copying replay."""
    index = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    written: set[int] = set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        schema = node.target._schema
        for i, arg in enumerate(schema.arguments):
            if arg.alias_info is None or not arg.alias_info.is_write:
                continue
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            while isinstance(value, torch.fx.Node) and _is_view(value):
                value = value.args[0]
            if not (isinstance(value, torch.fx.Node) and value.op == "placeholder"):
                return None
            written.add(index[value])
    return written


def _source(node: Any) -> tuple[torch.fx.Node, int] | None:
    """The op whose result ``node`` views, and which of its results: ``(op node, k)``."""
    while isinstance(node, torch.fx.Node) and _is_view(node):
        node = node.args[0]
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return None
    if node.target is _getitem and isinstance(node.args[0], torch.fx.Node):
        producer, k = node.args[0], node.args[1]
        if isinstance(k, int) and out_overload(producer.target) is not None:
            return producer, k
        return None
    if out_overload(node.target) is not None:
        return node, 0
    return None


_getitem = __import__("operator").getitem


@dataclasses.dataclass
class Writes:
    """A piece's graph rewritten to write outputs in place (see the module docstring)."""

    forward: Callable[..., Any]
    """The rewritten graph's forward: the piece's inputs, then the list of buffers."""
    buffers: list[torch.Tensor]
    """One per result of every rewritten op (a multi-output op's unused results too)."""
    outputs: dict[int, torch.Tensor]
    """Output position -> the static output: its buffer, or the view of it the output is."""
    single: bool
    """The graph returns one value, not a tuple."""
    module: torch.fx.GraphModule
    """The rewritten graph (:attr:`forward` is its forward)."""


def plan_writes(gm: torch.fx.GraphModule, probe_inputs: Sequence[Any],
                run: Callable[[Callable[[], Any]], Any],
                skip: set[int]) -> tuple[list[Any], Writes | None]:
    """Runs ``gm`` on ``probe_inputs`` once (through ``run(thunk)``, the capture's probe) and
    returns its outputs, with the rewrite that writes them in place (``None`` when no output can
    be, or the rewrite run on the same inputs disagrees with the probe). Outputs at ``skip``
    (views of inputs) are left alone."""
    result = output_node(gm).args[0]
    single = not isinstance(result, (tuple, list))
    outs = [result] if single else list(result)
    sources = {i: _source(o) for i, o in enumerate(outs) if i not in skip}
    sources = {i: s for i, s in sources.items() if s is not None}
    wanted = {node for node, _ in sources.values()}
    written = _written_inputs(gm)
    if not wanted or written is None:
        return _listed(run(lambda: gm(*probe_inputs)), single), None
    values: dict[torch.fx.Node, Any] = {}
    before = [clone_exact(t) if i in written else t for i, t in enumerate(probe_inputs)]
    rng = torch.get_rng_state()
    probe = _listed(run(lambda: _Recorder(gm, wanted, values).run(*probe_inputs)), single)
    inputs = {t.untyped_storage().data_ptr() for t in probe_inputs
              if isinstance(t, torch.Tensor) and t.layout == torch.strided}
    results = {node: _results(value) for node, value in values.items()
               if _dense_results(value, inputs)}
    buffers = _arena(results)
    placed: dict[int, torch.Tensor] = {}
    for i, (node, k) in sources.items():
        if node in buffers:
            view = _as_view(probe[i], _results(values[node])[k], buffers[node][k])
            if view is not None:
                placed[i] = view
    used = {sources[i][0] for i in placed}
    if not used:
        return probe, None
    writer, flat = _rewrite(gm, [n for n in gm.graph.nodes if n in used], buffers)
    if not _agrees(writer, flat, before, rng, placed, probe, single):
        return probe, None
    log.debug("%d of %d outputs written in place", len(placed), len(outs))
    return probe, Writes(writer.forward, flat, placed, single, writer)


def _rewrite(gm: torch.fx.GraphModule, used: list[torch.fx.Node],
             buffers: dict[torch.fx.Node, list[torch.Tensor]]
             ) -> tuple[torch.fx.GraphModule, list[torch.Tensor]]:
    """``gm`` with the ``used`` ops calling their ``out=`` overloads on their buffers, taken
    from a list passed as one more placeholder; and that list."""
    flat: list[torch.Tensor] = []
    graph = copy.deepcopy(gm.graph)
    old_to_new = dict(zip(gm.graph.nodes, graph.nodes))
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    where = (graph.inserting_after(placeholders[-1]) if placeholders
             else graph.inserting_before(next(iter(graph.nodes))))
    with where:
        holder = graph.placeholder("hpuopt_out_buffers")
    for node in used:
        new = old_to_new[node]
        op, names = out_overload(node.target)
        kwargs = dict(new.kwargs)
        with graph.inserting_before(new):
            for name, buf in zip(names, buffers[node]):
                kwargs[name] = graph.call_function(_getitem, (holder, len(flat)))
                flat.append(buf)
        new.target, new.kwargs = op, kwargs
    graph.lint()
    return torch.fx.GraphModule(gm, graph), flat


def _agrees(writer: torch.fx.GraphModule, flat: list[torch.Tensor], inputs: list[Any],
            rng: torch.Tensor, placed: dict[int, torch.Tensor], probe: list[Any],
            single: bool) -> bool:
    """Whether the rewrite, run once on the probe's inputs as they were before it (and the same
    random state), gives every written output the probe's value: an ``out=`` overload can
    compute something else than its functional one (``binary_cross_entropy.out`` on the CPU
    does not reduce like ``binary_cross_entropy``). The random state is left as the probe
    left it."""
    after = torch.get_rng_state()
    torch.set_rng_state(rng)
    try:
        _listed(writer.forward(*inputs, flat), single)
        for i, static in placed.items():  # what a replay hands out: the buffer or its view
            torch.testing.assert_close(static, probe[i], equal_nan=True)
    except Exception as exc:  # noqa: BLE001 - the graph copies its outputs instead; logged
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        log.info("the out= rewrite disagrees with the graph (%s: %s); this graph copies its "
                 "outputs", type(exc).__name__, first)
        return False
    finally:
        torch.set_rng_state(after)
    return True


def _listed(value: Any, single: bool) -> list[Any]:
    return [value] if single else list(value)


def _results(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _dense_results(value: Any, inputs: set[int]) -> bool:
    """Whether every result of an op is a dense tensor of its own (not memory of an input, not
    overlapping, not a subclass): a buffer with its layout can take it."""
    for r in _results(value):
        if not (isinstance(r, torch.Tensor) and type(r) is torch.Tensor
                and r.layout == torch.strided and r.device.type != "meta"
                and not r._is_zerotensor() and not r.is_conj() and not r.is_neg()):
            return False
        # contiguous only: some out= kernels (LAPACK's column-major results) fill a buffer
        # of another layout differently from what their functional overload returns
        if r.untyped_storage().data_ptr() in inputs or not r.is_contiguous():
            return False
    return True


_ALIGN = 64
"""Bytes each buffer of an arena starts on (a multiple of every element size)."""


def _arena(results: dict[torch.fx.Node, tuple[torch.Tensor, ...]]) -> dict[torch.fx.Node,
                                                                           list[torch.Tensor]]:
    """A buffer per result, laid out like it, all in one allocation per device: the graph's
    outputs then cross to autograd over one lent storage (one liveness test per replay)."""
    spans: dict[torch.device, int] = {}
    placed: list[tuple[torch.fx.Node, int, torch.Tensor, int]] = []
    # results alike (dtype, shape, strides) side by side, evenly spaced: lending hands out a
    # run of them in one call (:func:`~hpuopt.runtime.lending.plan_loans`)
    every = sorted(((node, k, r) for node, rs in results.items() for k, r in enumerate(rs)),
                   key=_alike)
    for node, k, r in every:
        start = spans.get(r.device, 0)
        placed.append((node, k, r, start))
        spans[r.device] = start + -(-_span_bytes(r) // _ALIGN) * _ALIGN
    storages = {dev: torch.UntypedStorage(max(n, 1), device=dev) for dev, n in spans.items()}
    out: dict[torch.fx.Node, list[Any]] = {node: [None] * len(rs) for node, rs in results.items()}
    for node, k, r, start in placed:
        buf = torch.empty(0, dtype=r.dtype, device=r.device)
        buf.set_(storages[r.device], start // r.element_size(), r.shape, r.stride())
        out[node][k] = buf
    return out


def _alike(item: tuple[torch.fx.Node, int, torch.Tensor]) -> tuple[str, str, tuple, tuple]:
    r = item[2]
    return (str(r.device), str(r.dtype), tuple(r.shape), tuple(r.stride()))


def _span_bytes(t: torch.Tensor) -> int:
    """Bytes from a tensor's first element to past its last, with its strides."""
    if t.numel() == 0:
        return 0
    return (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))) * t.element_size()


def _as_view(out: Any, result: torch.Tensor, buf: torch.Tensor) -> torch.Tensor | None:
    """``out`` (a view of ``result``, or ``result``) as the same view of ``buf``."""
    if not isinstance(out, torch.Tensor) or out.dtype != result.dtype:
        return None
    if out.is_conj() != result.is_conj() or out.is_neg() != result.is_neg():
        return None  # a lazy conjugate or negation of the result is not a view of its memory
    if out.untyped_storage().data_ptr() != result.untyped_storage().data_ptr():
        return None
    if out is result or (out.shape == result.shape and out.stride() == result.stride()
                         and out.storage_offset() == result.storage_offset()):
        return buf
    offset = buf.storage_offset() + out.storage_offset() - result.storage_offset()
    if offset < 0:
        return None
    return buf.as_strided(out.shape, out.stride(), offset)


class _Recorder(torch.fx.Interpreter):
    """Runs the graph (the probe) keeping the results of the ops ``wanted``."""

    def __init__(self, gm: torch.fx.GraphModule, wanted: set[torch.fx.Node],
                 values: dict[torch.fx.Node, Any]) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.wanted = wanted
        self.values = values

    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n)
        if n in self.wanted:
            self.values[n] = value
        return value
