"""The op table: every family's rows assembled into one lookup, overload packet → transfer rule.

An op claimed by two families (or an overload by two ``OVERLOADS`` maps) is an error at import
time, so adding a row can never silently replace another family's rule. Ops absent from the
table are handled by the engine: in-place variants take their functional op's rule, ops tagged
``torch.Tag.nondeterministic_seeded`` are random, ops tagged ``torch.Tag.pointwise`` get the
generic pointwise rule with pad fact ANY, and anything else is unsafe.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from hpuopt.passes.padding.binding import Row, _Rule
from hpuopt.passes.padding.rules import (
    alignment,
    contractions,
    conv_attention,
    factories,
    indexing,
    masked_softmax,
    norms,
    pointwise,
    positive,
    reductions,
    views,
)

aten = torch.ops.aten

FAMILIES: tuple[ModuleType, ...] = (
    pointwise, positive, views, indexing, contractions, reductions, masked_softmax, norms,
    conv_attention, factories, alignment,
)
"""The family modules, each with its ``ROWS`` and optionally ``OVERLOADS``."""

_TABLE: tuple[Row, ...] = tuple(row for family in FAMILIES for row in family.ROWS)
"""Every row of every family, in family order."""


def _build_rules() -> dict[Any, _Rule]:
    rules: dict[Any, _Rule] = {}
    claimed: dict[str, str] = {}
    for family in FAMILIES:
        for label, rule, names in family.ROWS:
            for name in names:
                owner = f"{family.__name__.rsplit('.', 1)[-1]}: {label}"
                if name in claimed:
                    raise RuntimeError(f"padding rules: aten.{name} is claimed by two families "
                                       f"({claimed[name]!r} and {owner!r})")
                claimed[name] = owner
                packet = getattr(aten, name, None) if hasattr(aten, name) else None
                if packet is None:
                    continue
                if packet in rules:
                    raise RuntimeError(f"padding rules: {packet} is claimed twice (last by "
                                       f"{owner!r})")
                rules[packet] = rule
    return rules


def _build_overload_rules() -> dict[Any, _Rule]:
    rules: dict[Any, _Rule] = {}
    for family in FAMILIES:
        for overload, rule in getattr(family, "OVERLOADS", {}).items():
            if overload in rules:
                raise RuntimeError(f"padding rules: {overload} has two overload rules")
            rules[overload] = rule
    return rules


RULES: dict[Any, _Rule] = _build_rules()
"""``torch.ops.aten.<op>`` overload packet → transfer rule (built from the families' rows)."""

_OVERLOAD_RULES: dict[Any, _Rule] = _build_overload_rules()
"""Single overloads whose rule differs from their packet's (``view.dtype``, ``max.other``...)."""


def _lookup(target: Any) -> _Rule | None:
    if target in _OVERLOAD_RULES:
        return _OVERLOAD_RULES[target]
    return RULES.get(getattr(target, "overloadpacket", None))
