"""The padding analysis's driver: proposals, the walks until the remaining sources are jointly
safe, and the plan ``bucket_plan`` attaches (:func:`plan_padding`). The walk itself is
:mod:`hpuopt.passes.padding.engine`'s."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import sympy
import torch
import torch.fx

from hpuopt.fx_utils import node_value, placeholders
from hpuopt.passes.padding.engine import _Analysis
from hpuopt.records import InputVerdict, PaddingPlan, PadSource, UnsafeReason

log = logging.getLogger(__name__)


def analyze_padding(gm: torch.fx.GraphModule, pad_dims: Mapping[int, int | Sequence[int]], *,
                    allow_zero_pad: bool = True) -> PaddingPlan:
    """Decides, for each proposed ``(placeholder index, dim)``, whether it can be padded.

    ``allow_zero_pad=False``: the runtime cannot guarantee zero pad contents, so ops that are only
    exact with zero padding (sum or contraction over the padded dim, lookups with padded indices)
    are unsafe too; every safe verdict then holds for arbitrary pad contents.

    Sources implicated in an unsafe node are dropped and the rest re-analysed, so the sources the
    plan marks safe are safe *together*; outputs, ties and size inputs refer to that final set.
    """
    proposed = _proposal(pad_dims)
    rejected, live = _reject_missing_inputs(gm, proposed)
    masks: frozenset[int] = frozenset()
    while True:
        analysis = _Analysis(gm, live, allow_zero_pad, masks)
        analysis.run()
        if not analysis.failures:
            break
        if analysis.wants_mask_fill - masks:  # walk again with those masks' pad at -inf
            masks = masks | frozenset(analysis.wants_mask_fill)
            continue
        dropped = _drop_failed(analysis, live, rejected)
        log.debug("padding: %s unsafe, analysing again without them", sorted(dropped))
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
        equal_sizes=tuple(analysis.equal_sizes) if live else (),
        positive_inputs=tuple(analysis.positive_inputs) if live else (),
        mask_inputs=tuple(sorted(i for i in masks if any(s.input == i for s in live))),
        checks=tuple(analysis.checks) if live else (),
    )


def _proposal(pad_dims: Mapping[int, int | Sequence[int]]) -> list[PadSource]:
    proposed: list[PadSource] = []
    for idx, dims in sorted(pad_dims.items()):
        for d in ([dims] if isinstance(dims, int) else list(dims)):
            proposed.append(PadSource(int(idx), int(d)))
    return proposed


def _reject_missing_inputs(gm: torch.fx.GraphModule, proposed: list[PadSource],
                           ) -> tuple[dict[PadSource, list[UnsafeReason]], list[PadSource]]:
    """Sources naming no placeholder are rejected up front; the rest are live."""
    n_inputs = len(placeholders(gm))
    rejected: dict[PadSource, list[UnsafeReason]] = {}
    live = []
    for s in proposed:
        if not 0 <= s.input < n_inputs:
            rejected[s] = [UnsafeReason("<input>", "placeholder",
                                        f"no placeholder {s.input} (graph has {n_inputs})",
                                        None, (s,))]
        else:
            live.append(s)
    return rejected, live


def _drop_failed(analysis: _Analysis, live: list[PadSource],
                 rejected: dict[PadSource, list[UnsafeReason]]) -> set[PadSource]:
    """Records each failure against the live sources it implicates; returns those sources."""
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
    return dropped


def default_pad_dims(gm: torch.fx.GraphModule, first_only: bool = False,
                     ) -> dict[int, list[int]]:
    """Every symbolic dim of every non-parameter tensor input (``first_only``: dim 0 alone)."""
    proposal: dict[int, list[int]] = {}
    for index, node in enumerate(placeholders(gm)):
        val = node_value(node)
        if not isinstance(val, torch.Tensor) or isinstance(val, torch.nn.Parameter):
            continue
        dims = [d for d, n in enumerate(val.shape[:1] if first_only else val.shape)
                if isinstance(n, torch.SymInt) and not isinstance(n.node.expr, sympy.Integer)]
        if dims:
            proposal[index] = dims
    return proposal


def plan_padding(gm: torch.fx.GraphModule, allow_zero_pad: bool = True) -> PaddingPlan | None:
    """The plan ``bucket_plan`` attaches: every varying dim proposed (batch, sequence, counts).

    Dropping the sources an unsafe node implicates can drop a batch dim together with the
    sequence dim that made the node unsafe; when proposing dim 0 alone pads more, that plan is
    kept, with the other dims' verdicts from the full proposal so ``explain`` still says why
    they run at exact sizes. ``None`` when no input has a varying dim.
    """
    proposal = default_pad_dims(gm)
    if not proposal:
        return None
    full = analyze_padding(gm, proposal, allow_zero_pad=allow_zero_pad)
    if all(v.safe for v in full.inputs if v.source.dim == 0):
        return full
    first = analyze_padding(gm, default_pad_dims(gm, first_only=True),
                            allow_zero_pad=allow_zero_pad)
    if len(first.padded) <= len(full.padded):
        return full
    extra = tuple(v for v in full.inputs if v.source.dim != 0)
    return dataclasses.replace(first, inputs=first.inputs + extra)
