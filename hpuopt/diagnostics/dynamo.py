"""What Dynamo did before hpuopt saw anything: graph breaks, and models it compiled nothing of.

hpuopt only sees the graphs Dynamo hands it. When Dynamo breaks a graph (``print``, an
unsupported call) or compiles nothing at all (``nn.LSTM`` without
``torch._dynamo.config.allow_rnn``), the cause is in Dynamo's records:
``torch._dynamo.utils.graph_break_reasons`` (reason and user stack of each break, what
``torch._dynamo.explain`` reads) and, where that is missing, the reason texts counted in
``torch._dynamo.utils.counters["graph_break"]``. Both are process-wide, so a :class:`Mark` taken
when a session starts tells the breaks since then apart from older ones.

Nothing here may raise: ``explain()`` must work on every torch it supports, and these are
Dynamo internals that move between releases.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from hpuopt.diagnostics.wording import link, short_source

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GraphBreak:
    """One graph break Dynamo recorded: its reason (first line), explanation, hints and the
    user's source line (``file:line in fn: code``) when Dynamo kept the stack."""

    reason: str
    explanation: str = ""
    hints: tuple[str, ...] = ()
    source: str | None = None
    count: int = 1


@dataclasses.dataclass(frozen=True)
class DynamoNote:
    """Something Dynamo did that the user should know, with what to do about it."""

    kind: str
    """``"graph_break"``, ``"rnn"``, ``"nothing_compiled"`` or ``"recompiled"``."""
    what: str
    source: str | None = None
    fix: str = ""
    link: str = ""


class Mark:
    """Where Dynamo's process-wide break records stood when a session started."""

    def __init__(self) -> None:
        self.last_reason: Any = None
        self.counts: dict[str, int] = {}
        self.reset()

    def reset(self) -> None:
        try:
            reasons = _reason_list()
            self.last_reason = reasons[-1] if reasons else None
            self.counts = dict(_break_counter())
        except Exception:  # noqa: BLE001 - see the module docstring
            log.debug("could not mark Dynamo's graph breaks", exc_info=True)

    def breaks_since(self) -> tuple[GraphBreak, ...]:
        """The graph breaks Dynamo recorded since the mark, each once, most frequent first."""
        try:
            reasons = _reason_list()
            if reasons is not None:
                return _from_reasons(self._after_mark(reasons))
            counted = {
                text: n - self.counts.get(text, 0) if n >= self.counts.get(text, 0) else n
                for text, n in _break_counter().items()
            }
            return tuple(
                dataclasses.replace(_parse(text), count=n) for text, n in counted.items() if n > 0
            )
        except Exception:  # noqa: BLE001 - see the module docstring
            log.debug("could not read Dynamo's graph breaks", exc_info=True)
            return ()

    def _after_mark(self, reasons: list[Any]) -> list[Any]:
        if self.last_reason is None:
            return list(reasons)
        for i in range(len(reasons) - 1, -1, -1):
            if reasons[i] is self.last_reason:
                return list(reasons[i + 1:])
        return list(reasons)  # cleared since (torch._dynamo.reset()): all are new


def _reason_list() -> list[Any] | None:
    from torch._dynamo import utils

    reasons = getattr(utils, "graph_break_reasons", None)
    return reasons if isinstance(reasons, list) else None


def _break_counter() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return dict(counters.get("graph_break", {}))


def _from_reasons(reasons: list[Any]) -> tuple[GraphBreak, ...]:
    found: dict[tuple[str, str | None], GraphBreak] = {}
    for r in reasons:
        if not getattr(r, "graph_break", True):
            continue
        brk = _parse(str(getattr(r, "reason", r)), _user_frame(getattr(r, "user_stack", ())))
        key = (brk.reason, brk.source)
        if key in found:
            brk = dataclasses.replace(found[key], count=found[key].count + 1)
        found[key] = brk
    return tuple(sorted(found.values(), key=lambda b: -b.count))


def _user_frame(stack: Any) -> str | None:
    """The innermost frame outside torch, as ``file:line in fn: code``."""
    frames = [f for f in (stack or ()) if "/torch/" not in str(getattr(f, "filename", ""))]
    if not frames:
        return None
    f = frames[-1]
    code = (getattr(f, "line", "") or "").strip()
    return short_source(f"{f.filename}:{f.lineno} in {f.name}: {code}")


def _parse(text: str, source: str | None = None) -> GraphBreak:
    """Dynamo's break message: a first line, then ``Explanation:`` and ``Hint:`` lines."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    first = lines[0] if lines else text.strip()
    explanation = next(
        (ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Explanation:")), ""
    )
    hints = tuple(
        ln.split(":", 1)[1].strip()
        for ln in lines
        if ln.startswith("Hint:") and "report an issue" not in ln.lower()
    )
    return GraphBreak(first, explanation, hints, source)


# -- notes ------------------------------------------------------------------------------------

_DATA_DEPENDENT_WORDS = (
    "capture_scalar_outputs", "capture_dynamic_output_shape_ops", "data dependent",
    "data-dependent", "dynamic shape operator", "item()",
)


def notes(breaks: tuple[GraphBreak, ...], compiled_graphs: int) -> tuple[DynamoNote, ...]:
    """The user-facing notes for these breaks, and for a model Dynamo compiled nothing of."""
    out = [_note(b) for b in breaks]
    if compiled_graphs == 0:
        if out:
            first = DynamoNote(
                "nothing_compiled",
                "Dynamo handed hpuopt no graph: the model ran uncompiled, for the reason below",
            )
        else:
            first = DynamoNote(
                "nothing_compiled",
                "Dynamo handed hpuopt no graph: the model has not been called yet, or Dynamo "
                "ran it without compiling anything",
                fix="call the model first; if you did, run with TORCH_LOGS=graph_breaks,recompiles "
                "to see why Dynamo skipped it",
                link=link("dynamo"),
            )
        out.insert(0, first)
    return tuple(out)


def _note(b: GraphBreak) -> DynamoNote:
    text = f"{b.reason} {b.explanation} {' '.join(b.hints)}"
    times = f" ({b.count} times)" if b.count > 1 else ""
    if "RNN" in text and "LSTM" in text:
        allowed = _allow_rnn()
        return DynamoNote(
            "rnn",
            f"Dynamo does not trace nn.LSTM / nn.GRU / nn.RNN (torch._dynamo.config.allow_rnn "
            f"is {allowed}), so that module ran uncompiled{times}",
            b.source,
            fix="set torch._dynamo.config.allow_rnn = True before the first call (Dynamo "
            "remembers the code it skipped: after a call, also run torch._dynamo.reset())",
            link=link("dynamo"),
        )
    if "data-dependent expression" in text or "data dependent expression" in text:
        return DynamoNote(
            "graph_break",
            "graph break: Python code decides on a value read from the data (`if t.item() > 0:`, "
            f"`int(t > 0)`), which Dynamo cannot trace past{times}",
            b.source,
            fix="keep the decision in tensor ops (`torch.where(cond, a, b)`, arithmetic on the "
            "tensor), or make it outside the compiled model",
            link=link("dynamo"),
        )
    if any(w in text for w in _DATA_DEPENDENT_WORDS):
        return DynamoNote(
            "graph_break",
            f"graph break at a data-dependent op{times}: {b.explanation or b.reason}",
            b.source,
            fix="use hpuopt.compile(model): it keeps such ops in the graph and hpuopt splits "
            "them out itself",
            link=link("dynamo"),
        )
    what = b.explanation or b.reason
    return DynamoNote(
        "graph_break",
        f"graph break{times}: {what}",
        b.source,
        fix=(b.hints[0].rstrip(".") if b.hints else "move that code out of the compiled function")
        + "; the code on each side is compiled as its own graph, that line runs in Python",
        link=link("dynamo"),
    )


# -- recompiles -------------------------------------------------------------------------------


def recompile_notes(
    graphs: Sequence[Any], breaks: Sequence[DynamoNote]
) -> tuple[DynamoNote, ...]:
    """Why a model holds several Dynamo graphs, when graph breaks do not explain it: read from
    which graphs let an input size vary (``GraphReport.dynamic_inputs``)."""
    if len(graphs) < 2 or any(n.kind == "graph_break" for n in breaks):
        return ()
    fixed = [g for g in graphs if not g.dynamic_inputs]
    varying = [g for g in graphs if g.dynamic_inputs]
    if fixed and varying and fixed[0].index < varying[0].index:
        sizes = ", ".join(varying[0].dynamic_inputs)
        return (DynamoNote(
            "recompiled",
            f"graph {fixed[0].index} was compiled for the exact sizes of the first call; when "
            f"{sizes} changed, Dynamo compiled graph {varying[0].index} with it varying",
            fix="torch._dynamo.mark_dynamic(x, 0) before the first call, or "
            "hpuopt.compile(model, dynamic=True), makes the first graph serve every size",
            link=link("recompiles"),
        ),)
    if varying and fixed and fixed[-1].index > varying[0].index:
        return (DynamoNote(
            "recompiled",
            f"graph {fixed[-1].index} has fixed sizes although graph {varying[0].index} lets "
            f"{', '.join(varying[0].dynamic_inputs)} vary: Dynamo compiles a size of 0 or 1 as a "
            "graph of its own, and a new graph whenever another guard fails",
            fix="expected for batch 1; otherwise run with TORCH_LOGS=recompiles to see which "
            "guard failed",
            link=link("recompiles"),
        ),)
    return (DynamoNote(
        "recompiled",
        f"Dynamo compiled {len(graphs)} graphs: a new one each time a guard failed (a new "
        "shape, Python value, branch, dtype or train/eval mode)",
        fix="run with TORCH_LOGS=recompiles to see which guard failed",
        link=link("recompiles"),
    ),)


def _allow_rnn() -> bool | None:
    try:
        import torch._dynamo

        return bool(torch._dynamo.config.allow_rnn)
    except Exception:  # noqa: BLE001
        return None
