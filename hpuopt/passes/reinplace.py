"""Turn functionalised multi-tensor updates back into in-place kernel calls.

What it finds
    AOTAutograd functionalises every in-place op. An optimizer step traced in place
    (``_fused_adam_``, ``_foreach_add_``, the clip's ``_foreach_mul_``) comes out as the functional
    op, its results unpacked element by element, sometimes passed through a functional
    ``_foreach_copy``, and finally written back with one ``copy_`` per tensor::

        %fa = aten._fused_adam([%p0, %p1], [%g0, %g1], [%m0, %m1], [%v0, %v1], [], [%s0, %s1], ...)
        %getitem = %fa[0]; %getitem_3 = %getitem[0]; %getitem_4 = %getitem[1]; ...
        %fc = aten._foreach_copy([%p0, %p1], [%getitem_3, %getitem_4]); ...
        %copy_ = aten.copy_(%p0, %fc_0); %copy__1 = aten.copy_(%p1, %fc_1); ...

    For N parameters that is a handful of kernels plus ~10·N nodes of unpacking and copying,
    which a capture on the CPU runtime and every uncaptured run execute one by one.

What it changes
    When every element of every list the in-place overload writes ends up copied back into the
    very input it came from, the op becomes its in-place overload on the inputs
    (``aten._fused_adam_(...)``), the copies, ``_foreach_copy`` nodes and unpacking disappear,
    and any other reader of an element reads the (now updated) input instead.

What it guarantees
    Legality is checked, never assumed: nothing after the op may read a written input's old
    value (every other user of that input comes before the op), each written element is copied
    back to exactly its own input, and the fused Adam kernels are only rewritten without
    ``grad_scale``/``found_inf`` (then they leave ``grads`` untouched, although their schema
    marks them writable). Anything else is left as it is, with the reason recorded.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, ClassVar

import torch
import torch.fx

from hpuopt.config import Config
from hpuopt.passes.base import GraphPass, PassResult
from hpuopt.records import Finding

aten = torch.ops.aten

# functional fused kernels: which list arguments the in-place overload writes
_FUSED_WRITES = {"_fused_adam": (0, 2, 3, 4), "_fused_adamw": (0, 2, 3, 4), "_fused_sgd": (0, 2)}


@dataclasses.dataclass(frozen=True)
class Reinplaced(Finding):
    pass_name: ClassVar[str] = "reinplace"
    node: str
    op: str
    tensors: int
    """How many tensors the in-place call now updates directly."""
    removed: int
    """Nodes of unpacking and copying removed."""

    @property
    def reason(self) -> str:
        return f"{self.op} updates {self.tensors} tensor(s) in place"


@dataclasses.dataclass(frozen=True)
class ReinplaceSkipped(Finding):
    pass_name: ClassVar[str] = "reinplace"
    applied: ClassVar[bool] = False
    node: str
    op: str
    reason: str


@dataclasses.dataclass(frozen=True)
class ReinplacePass(GraphPass):
    name: ClassVar[str] = "reinplace"
    stage: ClassVar[str] = "post_aot"

    def run(self, gm: torch.fx.GraphModule, config: Config) -> PassResult:
        findings: list[Any] = []
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        for node in list(gm.graph.nodes):
            spec = _inplace_spec(node)
            if spec is None:
                continue
            inplace, written = spec
            outcome = _rewrite(gm, node, inplace, written, order)
            findings.append(outcome)
        changed = any(isinstance(f, Reinplaced) for f in findings)
        return PassResult(gm, changed, tuple(findings))


def _inplace_spec(node: torch.fx.Node) -> tuple[Any, tuple[int, ...]] | None:
    """``(in-place overload, written list positions)`` for a functional multi-tensor op."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return None
    name = target.overloadpacket.__name__
    if name in _FUSED_WRITES:
        written = _FUSED_WRITES[name]
    elif name.startswith("_foreach_") and not name.endswith("_") and name != "_foreach_copy":
        written = (0,)
    else:
        return None
    packet = getattr(aten, name + "_", None)
    if packet is None or target._overloadname not in packet.overloads():
        return None
    return getattr(packet, target._overloadname), written


class _Skip(Exception):
    """The candidate stays functional; the message says why."""


def _rewrite(
    gm: torch.fx.GraphModule,
    node: torch.fx.Node,
    inplace: Any,
    written: tuple[int, ...],
    order: dict[torch.fx.Node, int],
) -> Reinplaced | ReinplaceSkipped:
    try:
        if node.kwargs.get("grad_scale") is not None or node.kwargs.get("found_inf") is not None:
            raise _Skip("grad_scale/found_inf: the in-place kernel would also write grads")
        elements = _unpacked_elements(node, written)
        copies, readers = _copies_and_readers(node, elements, written)
        _check_no_late_reader(node, written, copies, order)
    except _Skip as skip:
        return ReinplaceSkipped(node.name, str(node.target), str(skip))
    return _apply(gm, node, inplace, written, elements, copies, readers)


def _unpacked_elements(
    node: torch.fx.Node, written: tuple[int, ...]
) -> dict[tuple[int, int], torch.fx.Node]:
    """(list position, index) -> the getitem holding the op's result for that element."""
    fused = len(written) > 1 or node.target.overloadpacket.__name__ in _FUSED_WRITES
    elements: dict[tuple[int, int], torch.fx.Node] = {}
    for user in node.users:
        if not _is_getitem(user):
            raise _Skip(f"its result is used whole by {user.name}")
        if fused:
            j = user.args[1]
            for inner in user.users:
                if not _is_getitem(inner):
                    raise _Skip(f"list {j} of its result is used whole by {inner.name}")
                elements[(j, inner.args[1])] = inner
        else:
            elements[(0, user.args[1])] = user
    return elements


def _copies_and_readers(
    node: torch.fx.Node,
    elements: dict[tuple[int, int], torch.fx.Node],
    written: tuple[int, ...],
) -> tuple[set[torch.fx.Node], list[tuple[torch.fx.Node, torch.fx.Node]]]:
    """The nodes that copy results back into the written inputs (they go, with what unpacks
    them), and the other readers of results as (element, the input it updates)."""
    where = {elem: key for key, elem in elements.items()}  # element node -> (list, index)
    copies: set[torch.fx.Node] = set()
    checked_fc: dict[torch.fx.Node, bool] = {}
    readers: list[tuple[torch.fx.Node, torch.fx.Node]] = []
    copied_back: set[tuple[int, int]] = set()
    for (j, i), elem in elements.items():
        if j not in written:
            if elem.users:
                raise _Skip(f"result list {j} (not written in place) is used")
            continue
        dst = node.args[j][i]
        for use in list(elem.users):
            if use.target is aten.copy_.default and use.args[0] is dst and use.args[1] is elem:
                copies.add(use)
                copied_back.add((j, i))
            elif use.target is aten._foreach_copy.default:
                if use not in checked_fc:
                    checked_fc[use] = _copies_back(use, node, where)
                    if checked_fc[use]:
                        copies.add(use)
                        copies.update(use.users)
                        copies.update(u for g in use.users for u in g.users)
                if not checked_fc[use]:
                    raise _Skip(f"{use.name} copies its results somewhere else")
                copied_back.add((j, i))
            else:
                readers.append((elem, dst))
    for j in written:
        for i, dst in enumerate(node.args[j]):
            if (j, i) not in copied_back:
                raise _Skip(f"{dst} (list {j}) is written in place but never copied back")
    return copies, readers


def _check_no_late_reader(node: torch.fx.Node, written: tuple[int, ...],
                          copies: set[torch.fx.Node], order: dict[torch.fx.Node, int]) -> None:
    """Nothing after the op may read the old value of an input it would now update in place."""
    for j in written:
        for dst in node.args[j]:
            for other in dst.users:
                if other is node or other in copies or order.get(other, 0) < order[node]:
                    continue
                raise _Skip(f"{other.name} reads the old value of {dst.name} after the update")


def _apply(
    gm: torch.fx.GraphModule,
    node: torch.fx.Node,
    inplace: Any,
    written: tuple[int, ...],
    elements: dict[tuple[int, int], torch.fx.Node],
    copies: set[torch.fx.Node],
    readers: list[tuple[torch.fx.Node, torch.fx.Node]],
) -> Reinplaced:
    """Readers take the updated input; copies, unpacking and the functional op go."""
    # one rewrite per reading node: a multi-tensor op reads thousands of elements, and
    # replacing them one at a time would rescan its argument list for each
    redirect: dict[torch.fx.Node, dict[torch.fx.Node, torch.fx.Node]] = {}
    for elem, dst in readers:
        for use in elem.users:
            if use not in copies:
                redirect.setdefault(use, {})[elem] = dst
    for use, mapping in redirect.items():
        use.args = torch.fx.map_arg(use.args, lambda a: mapping.get(a, a))
        use.kwargs = torch.fx.map_arg(use.kwargs, lambda a: mapping.get(a, a))
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(inplace, node.args, node.kwargs)
    new.meta.update({k: v for k, v in node.meta.items() if k != "val"})
    unpacking = {*elements.values(), *node.users}  # getitems of the op's result, nothing else
    removed = _erase_dead(gm, {*copies, *unpacking})
    if node.users:  # pragma: no cover - every use was accounted for above
        raise AssertionError(f"{node.name} still has users after reinplacing")
    tensors = sum(len(node.args[j]) for j in written)
    gm.graph.erase_node(node)
    return Reinplaced(new.name, str(inplace), tensors, removed)


def _erase_dead(gm: torch.fx.GraphModule, candidates: set[torch.fx.Node]) -> int:
    """Erases the candidates nobody uses any more, repeating until none is left to erase."""
    removed, progress = 0, True
    while progress:
        progress = False
        for dead in list(candidates):
            if not dead.users:
                gm.graph.erase_node(dead)
                candidates.discard(dead)
                removed += 1
                progress = True
    return removed


def _copies_back(
    fc: torch.fx.Node,
    node: torch.fx.Node,
    where: dict[torch.fx.Node, tuple[int, int]],
) -> bool:
    """``_foreach_copy(dsts, srcs)`` copying elements of ``node``'s result each to its own
    input, with results that only feed ``copy_`` back into their own destinations."""
    dsts, srcs = fc.args[0], fc.args[1]
    for dst, src in zip(dsts, srcs):
        key = where.get(src)
        if key is None or node.args[key[0]][key[1]] is not dst:
            return False
    for g in fc.users:
        if not _is_getitem(g):
            return False
        k = g.args[1]
        for use in g.users:
            if not (use.target is aten.copy_.default and use.args[0] is dsts[k] and use.args[1] is g):
                return False
    return True


def _is_getitem(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem
