"""Split an ATen graph at the ops a device graph cannot hold.

What it finds
    Every node is classified from its metadata, not from op names alone:

    ============================  ===========================================================
    reason                        how it is recognised
    ============================  ===========================================================
    ``data_dependent_shape``      the node introduces unbacked symbols
                                  (``node.meta["unbacked_bindings"]``): ``nonzero``,
                                  ``masked_select``, ``unique``, boolean indexing...
    ``host_read``                 the value is read back to the host: ``_local_scalar_dense``
                                  (``.item()``, ``tolist``), ``is_nonzero``, ``equal``
    ``device_copy``               its tensor output lives on another device than its tensor
                                  inputs (``_to_copy``, ``copy_`` across devices)
    ``host_scalar``               scalar work on the host driven by data: a node whose inputs
                                  carry unbacked symbols and whose output is not a tensor
                                  (size reads, ``_assert_scalar``), or a node that consumes a
                                  data-dependent float/bool (its value would be baked into a
                                  capture)
    ``host_tensor``               a CPU tensor op inside a graph that runs on an accelerator
    ``collective``                a collective (``_c10d_functional``, ``c10d``): it must run
                                  exactly once per call, in step with the other ranks, so the
                                  warm-up and capture runs of a piece may not repeat it
    ``known_uncapturable``        in :data:`hpuopt.ops.UNCAPTURABLE_OPS` (judged by its arguments
                                  where they decide: ``histc`` with ``min < max`` is captured) or
                                  the user's ``dynamic_ops``
    ============================  ===========================================================

What it changes
    The graph becomes a stitching graph of ``call_module`` nodes, one per piece (``submod_<k>``)
    built with ``torch.fx.passes.split_module.split_module(keep_original_order=True)``. Each
    ``call_module`` node carries ``node.meta["hpuopt.piece"]``, a :class:`PieceInfo` that says
    whether the piece is static (to be captured) or dynamic (runs as is) and why::

        before                                   after
        %addmm = aten.addmm(%b, %x, %t)          %submod_0 = call_module[submod_0](%b, %x, %w)
        %gt = aten.gt(%addmm, 0)                 %getitem = getitem(%submod_0, 0)  ...
        %nonzero = aten.nonzero(%gt)             %submod_1 = call_module[submod_1](%gt)   # dynamic
        %index = aten.index(%addmm, [...])       %submod_2 = call_module[submod_2](...)   # static
        %relu = aten.relu(%index)

What it guarantees
    * Partitions are convex: each node's partition id is at least that of its inputs, static
      pieces take even ids and dynamic pieces odd ones, so every edge goes forward and the
      partition graph is acyclic.
    * Side effects keep their order: an impure node is a barrier; nothing before it moves after
      it and nothing after it moves before it.
    * Symbolic sizes that cross a boundary are passed as SymInt arguments by ``split_module``.
    * Every split is recorded as a :class:`SplitReason` (node, op, reason, user source line).
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
from torch.fx.passes.split_module import split_module

from hpuopt import ops
from hpuopt.config import Config
from hpuopt.fx_utils import graph_device, op_name, source_line
from hpuopt.passes.base import GraphPass, PassResult
from hpuopt.records import PieceInfo, SplitCategory, SplitReason

log = logging.getLogger(__name__)

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class SplitPass(GraphPass):
    """Splits a graph into static pieces (captured) and dynamic pieces (run as is)."""

    name: ClassVar[str] = "split"
    stage: ClassVar[str] = "post_aot"

    def run(self, gm: torch.fx.GraphModule, config: Config) -> PassResult:
        extra = _parse_op_names(config.dynamic_ops)
        reasons = classify(gm, extra_dynamic=extra)
        assignment = assign_partitions(gm, reasons)
        rematerialize_input_views(gm, assignment)
        split_gm, pieces = build_pieces(gm, assignment, reasons)
        modified = len(pieces) > 1 or any(not p.static for p in pieces)
        return PassResult(split_gm, modified, tuple(pieces))


# -- classification ---------------------------------------------------------------------------


def classify(
    gm: torch.fx.GraphModule, extra_dynamic: Iterable[Any] = ()
) -> dict[torch.fx.Node, SplitReason]:
    """Returns the dynamic nodes of ``gm``, each with its reason. Every other node is static."""
    extra = set(extra_dynamic)
    main_device = graph_device(gm)
    out: dict[torch.fx.Node, SplitReason] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        found = _classify_node(node, extra, main_device)
        if found is not None:
            reason, detail = found
            out[node] = SplitReason(
                node=node.name,
                op=op_name(node.target),
                reason=reason,
                detail=detail,
                source=source_line(node),
            )
    return out


def _classify_node(
    node: torch.fx.Node, extra: set[Any], main_device: torch.device | None
) -> tuple[SplitCategory, str] | None:
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    if target in extra or (packet is not None and packet in extra):
        return "known_uncapturable", "listed in the config's dynamic_ops"
    if packet in ops.HOST_READ_OPS:
        return "host_read", "reads a device value back to the host"
    hidden = ops.hidden_host_read(target) if main_device is not None else None
    if hidden is not None:
        return "host_read", hidden
    if getattr(target, "namespace", None) in ops.COLLECTIVE_NAMESPACES:
        return "collective", "a collective runs once per call, in step with the other ranks"
    if node.meta.get("unbacked_bindings"):
        syms = ", ".join(sorted(str(s) for s in node.meta["unbacked_bindings"]))
        return "data_dependent_shape", f"output size or value depends on data ({syms})"
    if ops.uncapturable(packet, node.args, node.kwargs):
        return "known_uncapturable", "op cannot be held by a device graph"
    if packet in ops.MASK_INDEX_OPS and _has_bool_index(node):
        return "data_dependent_shape", "indexing with a boolean mask finds its rows on the host"
    val = node.meta.get("val")
    in_vals = [n.meta.get("val") for n in node.all_input_nodes]
    arg_vals = [a.meta.get("val") if isinstance(a, torch.fx.Node) else a for a in node.args]
    unsafe = ops.capture_unsafe_reason(target, arg_vals, val)
    if unsafe is not None:
        return unsafe  # type: ignore[return-value]
    if _crosses_devices(val, in_vals):
        return "device_copy", "moves data between devices"
    if not _holds_tensor(val) and any(_unbacked(v) for v in in_vals):
        return "host_scalar", "scalar work on data-dependent values runs on the host"
    if any(isinstance(v, (torch.SymFloat, torch.SymBool)) and _unbacked(v) for v in in_vals):
        return "host_scalar", "consumes a data-dependent scalar read from the device"
    if main_device is not None and _holds_cpu_tensor(val):
        # Of any rank: a device kernel reads a CPU scalar operand by value at launch, so
        # inside a captured graph a CPU result would be frozen at its capture-time value.
        return "host_tensor", f"CPU tensor op in a graph that runs on {main_device}"
    return None


def _has_bool_index(node: torch.fx.Node) -> bool:
    indices = node.args[1] if len(node.args) > 1 else ()

    def dtype_of(idx: object) -> object:
        val = idx.meta.get("val") if isinstance(idx, torch.fx.Node) else None
        return val.dtype if isinstance(val, torch.Tensor) else None

    return ops.is_bool_index(indices, dtype_of)


def _crosses_devices(val: Any, in_vals: list[Any]) -> bool:
    if not isinstance(val, torch.Tensor):
        return False
    devices = {v.device for v in in_vals if isinstance(v, torch.Tensor) and v.dim() > 0}
    return bool(devices) and val.device not in devices


def _holds_cpu_tensor(val: Any) -> bool:
    if isinstance(val, torch.Tensor):
        return val.device.type == "cpu"
    if isinstance(val, (list, tuple)):
        return any(_holds_cpu_tensor(v) for v in val)
    return False


def _holds_tensor(val: Any) -> bool:
    if isinstance(val, torch.Tensor):
        return True
    if isinstance(val, (list, tuple)):
        return any(_holds_tensor(v) for v in val)
    return False


def _unbacked(val: Any) -> bool:
    try:
        return bool(free_unbacked_symbols(val))
    except (TypeError, AttributeError):
        return False


# -- partitioning -----------------------------------------------------------------------------


def assign_partitions(
    gm: torch.fx.GraphModule, dynamic: dict[torch.fx.Node, SplitReason]
) -> dict[torch.fx.Node, int]:
    """Gives every compute node a partition id; static ids are even, dynamic ids odd.

    A node's id is the smallest id of its kind not below any of its inputs' ids and not below
    the last barrier (impure node) before it; an impure node's id is also at least that of
    every node before it. Ids therefore never decrease along an edge (convexity) and impure
    nodes stay ordered with everything around them.
    """
    part: dict[torch.fx.Node, int] = {}
    floor = 0  # raised by each impure node: later nodes may not move before it
    running_max = 0  # the largest id so far, for barriers
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if node.target is operator.getitem and node.args[0] in part:
            # unpacking a multi-output node stays with it: a tuple never crosses a boundary
            part[node] = part[node.args[0]]
            continue
        lo = max([floor] + [part[i] for i in node.all_input_nodes if i in part])
        impure = has_side_effect(node)
        if impure:
            lo = max(lo, running_max)
        want_odd = node in dynamic
        if (lo % 2 == 1) != want_odd:
            lo += 1
        part[node] = lo
        running_max = max(running_max, lo)
        if impure:
            floor = lo
    return part


# Metadata-only ops: recomputing them costs nothing and moves no data.
_VIEW_OPS = frozenset(
    {
        aten.t,
        aten.view,
        aten._unsafe_view,
        aten.permute,
        aten.transpose,
        aten.expand,
        aten.unsqueeze,
        aten.squeeze,
        aten.alias,
        aten.slice,
        aten.select,
    }
)


def _input_view(node: torch.fx.Node) -> bool:
    """A chain of view ops over graph inputs only (``aten.t(weight)`` and the like)."""
    if node.op == "placeholder":
        return True
    if node.op != "call_function" or getattr(node.target, "overloadpacket", None) not in _VIEW_OPS:
        return False
    return all(_input_view(i) for i in node.all_input_nodes)


def rematerialize_input_views(
    gm: torch.fx.GraphModule, assignment: dict[torch.fx.Node, int]
) -> int:
    """Gives every piece its own copy of the views of graph inputs it uses.

    A view of a parameter computed in one piece and used in a later one would cross the
    boundary as an ordinary activation: copied into a static buffer on every call (a weight's
    worth of memory traffic) and held again by every captured graph. Recomputing the view where
    it is used costs nothing and keeps the parameter itself the piece's (stable) input.
    Returns how many uses were rewired.
    """
    rewired = 0
    for node in list(gm.graph.nodes):
        if node not in assignment or node.op == "placeholder" or not _input_view(node):
            continue
        copies: dict[int, torch.fx.Node] = {}
        for user in list(node.users):
            pid = assignment.get(user)
            if pid is None or pid == assignment[node]:
                continue
            if pid not in copies:
                copies[pid] = _copy_chain(gm, node, user, pid, assignment)
            user.replace_input_with(node, copies[pid])
            rewired += 1
        if not node.users:
            gm.graph.erase_node(node)
            del assignment[node]
    if rewired:
        gm.recompile()
    return rewired


def _copy_chain(
    gm: torch.fx.GraphModule,
    node: torch.fx.Node,
    before: torch.fx.Node,
    pid: int,
    assignment: dict[torch.fx.Node, int],
) -> torch.fx.Node:
    if node.op == "placeholder":
        return node
    args = {i: _copy_chain(gm, i, before, pid, assignment) for i in node.all_input_nodes}
    with gm.graph.inserting_before(before):
        new = gm.graph.node_copy(node, lambda n: args[n])
    assignment[new] = pid
    return new


def build_pieces(
    gm: torch.fx.GraphModule,
    assignment: dict[torch.fx.Node, int],
    dynamic: dict[torch.fx.Node, SplitReason],
) -> tuple[torch.fx.GraphModule, list[PieceInfo]]:
    """Splits ``gm`` by ``assignment`` and tags each ``call_module`` node with its PieceInfo."""
    ids = sorted(set(assignment.values()))
    dense = {pid: k for k, pid in enumerate(ids)}
    members: dict[int, list[torch.fx.Node]] = {k: [] for k in dense.values()}
    for node, pid in assignment.items():
        members[dense[pid]].append(node)

    def callback(node: torch.fx.Node) -> int:
        if node not in assignment:  # get_attr and friends: keep with their first user
            users = [u for u in node.users if u in assignment]
            return dense[assignment[users[0]]] if users else 0
        return dense[assignment[node]]

    if len(members) == 1:
        split_gm = _one_piece(gm)
    else:
        split_gm = split_module(gm, gm, callback, keep_original_order=True)
    split_gm.meta.update(gm.meta)
    pieces: list[PieceInfo] = []
    for node in split_gm.graph.nodes:
        if node.op != "call_module":
            continue
        k = int(node.target.rsplit("_", 1)[1])
        nodes = members.get(k, [])
        static = not any(n in dynamic for n in nodes)
        if any(n.is_impure() for n in nodes):
            # the stitching graph's dead-code elimination asks the module (Node.is_impure):
            # writes and host asserts must run even when nothing reads the piece's outputs
            split_gm._modules[node.target]._is_impure = True
        info = PieceInfo(
            name=node.target,
            static=static,
            nodes=tuple(n.name for n in nodes),
            ops=tuple(op_name(n.target) for n in nodes),
            reasons=tuple(dynamic[n] for n in nodes if n in dynamic),
        )
        node.meta["hpuopt.piece"] = info
        pieces.append(info)
    log.debug(
        "split into %d pieces (%d static)", len(pieces), sum(p.static for p in pieces)
    )
    return split_gm, pieces


def _one_piece(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """What ``split_module`` makes of a graph that is all one piece, without its cost.

    ``split_module(keep_original_order=True)`` looks each piece input up in a list of every
    placeholder: quadratic in the inputs, 1.5 s for an optimizer step over 1000 parameters
    (5000 inputs). A graph with nothing to split (a static model, an optimizer step) is the common
    case, and its split is simple: the body moves into ``submod_0``, which takes the placeholders
    the body reads (in order) and returns the body values the output uses (one value bare, none
    as ``()``, several as a tuple unpacked with ``getitem``), as ``split_module`` does.
    """
    graph = gm.graph
    placeholders = list(graph.find_nodes(op="placeholder"))
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    body = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    in_body = set(body)
    inputs = [p for p in placeholders if any(u in in_body for u in p.users)]
    found: dict[torch.fx.Node, None] = {}  # ordered, each value once
    torch.fx.map_arg(output.args[0], lambda a: found.setdefault(a) if a in in_body else None)
    results = list(found)

    sub = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for p in inputs:
        env[p] = sub.placeholder(p.name, type_expr=p.type)
        env[p].meta = dict(p.meta)
    for n in body:
        env[n] = sub.node_copy(n, env.__getitem__)
    sub.output(env[results[0]] if len(results) == 1 else tuple(env[r] for r in results))

    stitch = torch.fx.Graph()
    outer: dict[torch.fx.Node, torch.fx.Node] = {}
    for p in placeholders:
        outer[p] = stitch.placeholder(p.name, type_expr=p.type)
        outer[p].meta = dict(p.meta)
    call = stitch.call_module("submod_0", tuple(outer[p] for p in inputs))
    if len(results) == 1:
        outer[results[0]] = call
    else:
        for k, r in enumerate(results):
            outer[r] = stitch.call_function(operator.getitem, (call, k))
    stitch.output(torch.fx.map_arg(output.args[0], outer.__getitem__))
    piece = torch.fx.GraphModule(gm, sub, class_name="submod_0")
    split_gm = torch.fx.GraphModule({"submod_0": piece}, stitch)
    split_gm.meta["partition_names"] = {"submod_0"}
    return split_gm


# -- helpers ----------------------------------------------------------------------------------


def has_side_effect(node: torch.fx.Node) -> bool:
    """Whether ``node`` writes memory or acts on the world (a mutation, a mark_step, a print)."""
    if not node.is_impure():
        return False
    return getattr(node.target, "overloadpacket", None) not in ops.CHECK_OPS


def _parse_op_names(names: Iterable[str]) -> set[Any]:
    """Turns ``"aten.nonzero"``, ``"aten.add.Tensor"`` or ``"ns::op"`` into op objects."""
    out: set[Any] = set()
    for name in names:
        ns, _, rest = name.replace("::", ".", 1).partition(".")
        parts = rest.split(".")
        try:
            obj: Any = getattr(torch.ops, ns)
            for part in parts:
                obj = getattr(obj, part)
        except (AttributeError, RuntimeError):
            from hpuopt.errors import ConfigError

            raise ConfigError(f"dynamic_ops names an unknown op {name!r}") from None
        out.add(obj)
    return out
