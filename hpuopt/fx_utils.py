"""Small FX helpers every layer shares: a node's value, source line and op name, a graph's
device, leaves, the output node, and the alias walk that finds which inputs a graph writes.

Neutral ground: passes, the runtime and diagnostics all import this module, and it imports none
of them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

MISSING = object()
"""What :func:`node_value` returns for a node without shape metadata."""

_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')


def node_value(node: torch.fx.Node) -> Any:
    """The fake value recorded on ``node`` (``val``, ``example_value`` or a ``tensor_meta``
    with a shape), or :data:`MISSING`."""
    meta = node.meta
    for key in ("val", "example_value"):
        if key in meta:
            return meta[key]
    tm = meta.get("tensor_meta")
    return tm if tm is not None and hasattr(tm, "shape") else MISSING


def leaf_value(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Any:
    """The tensor a leaf stands for: a ``get_attr`` target's tensor, else the recorded value."""
    if node.op == "get_attr":
        return getattr(gm, str(node.target), None)
    value = node_value(node)
    return None if value is MISSING else value


def is_leaf(arg: Any) -> bool:
    """A graph input or attribute: a node whose value comes from outside the graph's ops."""
    return isinstance(arg, torch.fx.Node) and arg.op in ("placeholder", "get_attr")


def source_line(node: torch.fx.Node) -> str | None:
    """The innermost user frame of ``node.meta['stack_trace']``, as ``file:line in fn: code``."""
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    frames = _FRAME.findall(trace)
    if not frames:
        return trace.strip().splitlines()[-1].strip()
    path, line, func, code = frames[-1]
    return f"{path}:{line} in {func}: {code.strip()}"


def op_name(target: Any) -> str:
    """``aten.add.Tensor`` for an ATen overload, the qualified name of any other callable."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", str(target))


def packet_name(node: torch.fx.Node) -> str:
    """The overload packet's name of an ATen call (``"_fused_adam"``), else ``""``."""
    return getattr(getattr(node.target, "overloadpacket", None), "__name__", "")


def output_node(gm: torch.fx.GraphModule) -> torch.fx.Node:
    """The graph's output node (``Graph.output_node`` is missing on older torch). The node list's
    ``reversed`` is an iterable, not an iterator, on some torch releases (2.11)."""
    return next(iter(reversed(gm.graph.nodes)))


def placeholders(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return list(gm.graph.find_nodes(op="placeholder"))


def graph_device(gm: torch.fx.GraphModule) -> torch.device | None:
    """The accelerator ``gm`` runs on, from its metadata (nested graph modules included), or
    ``None`` for a graph whose tensors are all on the CPU."""
    for node in gm.graph.nodes:
        val = node_value(node)  # ATen graphs carry "val", Dynamo's own "example_value"
        if isinstance(val, torch.Tensor) and val.device.type not in ("cpu", "meta"):
            return val.device
        if node.op == "call_module":
            sub = gm._modules.get(node.target)
            if isinstance(sub, torch.fx.GraphModule):
                inner = graph_device(sub)
                if inner is not None:
                    return inner
    return None


def graph_device_type(gm: torch.fx.GraphModule) -> str:
    """``graph_device(gm).type``, or ``"cpu"``."""
    device = graph_device(gm)
    return device.type if device is not None else "cpu"


def returns_view(node: torch.fx.Node) -> bool:
    """A functional op whose result aliases its first argument (a view)."""
    schema = getattr(node.target, "_schema", None)
    return (
        schema is not None
        and not schema.is_mutable
        and bool(schema.returns)
        and schema.returns[0].alias_info is not None
    )


def mutated_inputs(gm: torch.fx.GraphModule) -> set[int]:
    """Indices of placeholders that some op of ``gm`` writes to (directly or through a view)."""
    base_of: dict[torch.fx.Node, int] = {n: i for i, n in enumerate(placeholders(gm))}
    out: set[int] = set()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        schema = getattr(node.target, "_schema", None)
        if schema is None:
            continue
        for arg_schema, arg in zip(schema.arguments, node.args):
            if arg_schema.alias_info is None or not arg_schema.alias_info.is_write:
                continue
            for a in arg if isinstance(arg, (list, tuple)) else (arg,):  # Tensor(a!)[] too
                if isinstance(a, torch.fx.Node) and a in base_of:
                    out.add(base_of[a])
        if not schema.is_mutable:
            # views keep pointing at their base, so writes through them count
            for arg_schema, arg in zip(schema.arguments, node.args):
                if arg_schema.alias_info is not None and arg in base_of:
                    base_of[node] = base_of[arg]
    return out


def values_module(gm: torch.fx.GraphModule,
                  pick: Callable[[dict[str, torch.fx.Node], Callable[[Any], Any]], Sequence[Any]]
                  ) -> torch.fx.GraphModule:
    """A module computing some of ``gm``'s values from ``gm``'s own placeholders, with only the
    nodes they need. ``pick(by_name, copy)`` returns the outputs: ``by_name`` maps ``gm``'s node
    names to its nodes, ``copy`` maps one of them (or a non-node, unchanged) into the new graph.
    """
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            break
        env[node] = graph.node_copy(node, lambda n: env[n])
    by_name = {n.name: n for n in gm.graph.nodes}
    graph.output(tuple(pick(by_name, lambda v: env[v] if isinstance(v, torch.fx.Node) else v)))
    graph.eliminate_dead_code()
    return torch.fx.GraphModule(gm, graph)
