"""The signature of a piece: which arguments are copied, read in place or keyed, and the keys.

A device graph replays fixed work on fixed buffers: every shape, stride and Python scalar it was
captured with is baked in. The signature only holds what can vary: Dynamo's guards already pin
the dtype, device and (for non-dynamic dimensions) the shape and strides of the graph's inputs,
and every value computed inside the graph is a pure function of those. What can vary is exactly
what ``node.meta["val"]`` shows as symbolic: SymInt arguments (dynamic sizes, data-dependent
sizes) and tensors whose sizes or strides hold symbols. :func:`arg_plan` decides this once per
piece from the placeholders' metadata; the per-call key is then a tuple over those arguments
only, and a fully static piece has the empty key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import free_symbols

from hpuopt.fx_utils import mutated_inputs, placeholders, returns_view


@dataclasses.dataclass(frozen=True)
class ArgPlan:
    """How a piece treats its positional arguments, decided once from graph metadata."""

    tensor: tuple[int, ...]
    """Indices of tensor arguments."""
    copied: tuple[int, ...]
    """Tensor arguments copied into static buffers each call."""
    stable: tuple[int, ...]
    """Tensor arguments read in place (parameters, buffers); their address is checked."""
    keyed: tuple[int, ...]
    """Arguments whose shape, strides or value can vary: they form the cache key."""
    mutated: tuple[int, ...]
    """Arguments the piece writes to."""
    mutated_copied: tuple[int, ...] = ()
    """Mutated arguments that have a static copy: written back to the caller after a run."""
    unsupported: str | None = None
    """Why this piece cannot be captured at all (an argument a signature cannot describe)."""
    full_storage: tuple[int, ...] = ()
    """Arguments the piece reads through ``as_strided`` (possibly beyond the view's own
    elements): their whole storage is copied, and its size is part of the key."""


def arg_plan(gm: torch.fx.GraphModule, stable: Sequence[bool]) -> ArgPlan:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    mutated = mutated_inputs(gm)
    tensor, copied, stable_idx, keyed = [], [], [], []
    unsupported = None
    for i, node in enumerate(placeholders):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            tensor.append(i)
            (stable_idx if stable[i] else copied).append(i)
            if _symbolic_tensor(val):
                keyed.append(i)
        elif isinstance(val, (list, tuple, dict)):
            unsupported = f"argument {node.name} is a container ({type(val).__name__})"
        elif val is None or isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            keyed.append(i)  # unknown or symbolic: let its runtime value into the key
    full = tuple(sorted(_as_strided_inputs(gm) & set(copied)))
    keyed.extend(i for i in full if i not in keyed)
    return ArgPlan(
        full_storage=full,
        tensor=tuple(tensor),
        copied=tuple(copied),
        stable=tuple(stable_idx),
        keyed=tuple(keyed),
        mutated=tuple(sorted(mutated)),
        mutated_copied=tuple(sorted(mutated & set(copied))),
        unsupported=unsupported,
    )


def _symbolic_tensor(val: torch.Tensor) -> bool:
    try:
        return bool(free_symbols(val))
    except (TypeError, AttributeError):  # metadata without a shape env
        return True


def _as_strided_inputs(gm: torch.fx.GraphModule) -> set[int]:
    """Placeholders that reach an ``as_strided`` through views."""
    base_of = {n: i for i, n in enumerate(placeholders(gm))}
    out: set[int] = set()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        packet = getattr(node.target, "overloadpacket", None)
        src = node.args[0] if node.args else None
        if not isinstance(src, torch.fx.Node) or src not in base_of:
            continue
        if packet in (torch.ops.aten.as_strided, torch.ops.aten.as_strided_):
            out.add(base_of[src])
        if returns_view(node):
            base_of[node] = base_of[src]
    return out


def key_part(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return (a.shape, a.stride())
    return a


def storage_key(t: torch.Tensor) -> tuple[int, int]:
    return (t.untyped_storage().nbytes(), t.storage_offset())


def describe_key(key: tuple) -> str:
    parts = []
    for part in key:
        if isinstance(part, tuple) and len(part) == 2 and isinstance(part[0], torch.Size):
            parts.append("x".join(map(str, part[0])) or "scalar")
        elif isinstance(part, tuple) and len(part) == 2 and part[0] == "pad":
            parts.append("pad " + ("x".join(map(str, part[1])) or "scalar"))
        elif isinstance(part, tuple) and len(part) == 2 and part[0] == "size":
            parts.append(f"size {part[1]}")
        else:
            parts.append(repr(part))
    return "(" + ", ".join(parts) + ")" if parts else "(static)"
