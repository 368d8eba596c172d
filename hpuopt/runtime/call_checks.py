"""Per-call checks of a padding plan: values that depend on the caller's inputs, checked on the
real (unpadded) inputs before a call is padded.

The one kind so far is ``attends`` (``PaddingPlan.checks``): an additive attention mask made
with ``torch.finfo(dtype).min`` masks the pad keys only in rows that keep some key unmasked; a
fully masked row is uniform over all its keys and would change with the bucket. The mask is
computed from the piece's own nodes on the call's real inputs (only the nodes it needs: the
mask construction from the attention mask input), and every row of it must keep an entry above
``MASKING_BOUND / 2``. Unlike ``ValueChecks`` the verdict depends on the inputs' values, so it
is computed on every padded call.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from hpuopt.fx_utils import values_module
from hpuopt.passes.padding.fills import MASKING_BOUND
from hpuopt.passes.padding.rules.masked_softmax import ATTENDS
from hpuopt.records import PaddingPlan

log = logging.getLogger(__name__)

PER_CALL_KINDS = frozenset({ATTENDS})


class CallChecks:
    """The plan's per-call checks of piece ``gm`` (see above); ``failure`` says what failed."""

    def __init__(self, gm: torch.fx.GraphModule, plan: PaddingPlan) -> None:
        self.checks = [(name, bound) for name, kind, bound in plan.checks
                       if kind in PER_CALL_KINDS]
        self.module = values_module(
            gm, lambda by_name, copy: [copy(by_name[name]) for name, _ in self.checks])

    def failure(self, args: Sequence[Any]) -> str:
        """``""`` when every row of every checked mask keeps an unmasked entry; else why not."""
        try:
            with torch.no_grad():
                values = self.module(*args)
        except Exception as exc:  # noqa: BLE001 - a check that cannot run fails
            first = str(exc).splitlines()[0][:100] if str(exc) else ""
            return f"computing the checked mask raised {type(exc).__name__}: {first}"
        for (name, dim), mask in zip(self.checks, values):
            if mask.numel() and not bool((mask > MASKING_BOUND / 2).any(dim).all()):
                log.debug("padding: %s masks every key of a row; running exact", name)
                return (f"{name} masks every key of a real query row (with a finfo.min mask "
                        "that row is uniform over all keys, so padding would change it)")
        return ""
