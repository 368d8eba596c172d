"""Op binding: one FX call of an ATen overload, its arguments bound to the schema's names.

A transfer rule receives an :class:`_Op` and reads its arguments by schema name: the raw value
(``raw``), the abstract state (``state``, ``tensor``), the traced shape (``shape``), constant dim
arguments (``dim_arg``, ``dims_arg``). :class:`_Rule` pairs a rule with the arguments where a
padded size is a shape the rule checks itself, rather than a value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch.fx

from hpuopt.fx_utils import node_value
from hpuopt.passes.padding.domain import _UNPADDED, _Tensor, _Unsafe

if TYPE_CHECKING:
    from hpuopt.passes.padding.engine import _Analysis


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


class _Renamed(_Op):
    """A view of an ``_Op`` with some arguments renamed (to reuse ``_mm`` inside ``addmm``)."""

    def __init__(self, op: _Op, names: Mapping[str, str]) -> None:  # noqa: D107
        self.__dict__.update(op.__dict__)
        self.values = {**op.values, **{new: op.values[old] for new, old in names.items()}}


def _multi(op: _Op) -> int:
    """Number of results of the node (1 for a plain tensor), from its meta value."""
    val = node_value(op.node)
    return len(val) if isinstance(val, (list, tuple)) else 1


def _mutated_args(op: _Op) -> list[str]:
    return [a.name for a in op.schema.arguments
            if a.alias_info is not None and a.alias_info.is_write]


# ------------------------------------------------------------------------------------------------
# Rules
# ------------------------------------------------------------------------------------------------

RuleFn = Callable[[_Op], Any]


@dataclasses.dataclass(frozen=True)
class _Rule:
    fn: RuleFn
    size_args: frozenset[str] = frozenset()
    """Arguments where a padded size is a *shape* the rule checks itself (not a value use)."""


Row = tuple[str, _Rule, tuple[str, ...]]
"""One row of a family's table: ``(family label, rule, aten op names)``."""

_SHAPE = frozenset({"size", "shape", "sizes"})
"""The size arguments of views and factories."""
