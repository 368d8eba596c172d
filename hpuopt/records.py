"""Records that cross layers: produced by passes, read by the runtime and by diagnostics.

Everything here is a frozen value with no behaviour beyond formatting and small derived
properties. Passes (``hpuopt/passes/``) create these; the runtime (``hpuopt/runtime/``) and
diagnostics (``hpuopt/diagnostics/``) read them and never import a pass module. The import
graph reads ``passes -> records <- runtime <- diagnostics``.

Findings
    Every pass reports what it found as :class:`Finding` values: one base with the pass that
    made it, the node it is about, whether the pass applied a change there or left the
    candidate alone, and the reason. ``explain()`` dispatches on that base, so every pass's
    reasons show the same way.

Pieces
    :class:`PieceInfo` describes one piece of a split graph; a dynamic piece carries a
    :class:`SplitReason` per node that keeps it out of device graphs.

Padding plans
    :class:`PaddingPlan` is the padding analysis's verdict for one static piece: which
    ``(input, dim)`` pairs (:class:`PadSource`) may be padded up to a bucket, which output dims
    carry a padded extent (:class:`OutputDim`), which ``SymInt`` inputs equal a padded extent
    (:class:`SizeInput`), and why the other proposals are unsafe (:class:`UnsafeReason`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

# ------------------------------------------------------------------------------------------------
# Findings
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Finding:
    """Base of every pass finding.

    Subclasses are frozen dataclasses that set the class variables ``pass_name`` and
    ``applied`` (the pass changed the graph here, or left a candidate alone) and provide the
    attributes ``node`` (the node's name, or ``None`` for a graph-wide finding) and ``reason``
    (what was done or why not, in words), as fields or properties.
    """

    pass_name: ClassVar[str] = ""
    applied: ClassVar[bool] = True

    if TYPE_CHECKING:  # provided by every subclass (a field or a property)

        @property
        def node(self) -> str | None: ...

        @property
        def reason(self) -> str: ...

    def describe(self) -> str:
        """One line for people: ``pass: node: reason``."""
        where = f"{self.node}: " if self.node else ""
        return f"{self.pass_name}: {where}{self.reason}"


def skipped(findings: Sequence[Any]) -> list[Finding]:
    """The findings of a sequence that record a candidate a pass left alone."""
    return [f for f in findings if isinstance(f, Finding) and not f.applied]


# ------------------------------------------------------------------------------------------------
# Pieces of a split graph
# ------------------------------------------------------------------------------------------------

SplitCategory = Literal[
    "collective",
    "data_dependent_shape",
    "host_read",
    "device_copy",
    "host_scalar",
    "host_tensor",
    "known_uncapturable",
]


@dataclasses.dataclass(frozen=True)
class SplitReason(Finding):
    """Why one node was kept out of device graphs."""

    pass_name: ClassVar[str] = "split"
    applied: ClassVar[bool] = True

    node: str
    op: str
    reason: SplitCategory
    """The category; ``detail`` says it in words."""
    detail: str
    source: str | None = None
    """The last frame of the user's source (``file:line in fn: code``), when known."""

    def describe(self) -> str:
        return f"split: {self}"

    def __str__(self) -> str:
        where = f"  at {self.source}" if self.source else ""
        return f"{self.node} ({self.op}): {self.reason}: {self.detail}{where}"


@dataclasses.dataclass(frozen=True)
class PieceInfo(Finding):
    """One piece of a split graph: static (captured per signature) or dynamic (runs as is)."""

    pass_name: ClassVar[str] = "split"

    name: str
    static: bool
    nodes: tuple[str, ...]
    ops: tuple[str, ...]
    reasons: tuple[SplitReason, ...] = ()
    """For a dynamic piece, why each of its nodes cannot be captured."""

    @property
    def node(self) -> str:
        return self.name

    @property
    def reason(self) -> str:
        if self.static:
            return f"static piece of {len(self.nodes)} node(s)"
        return f"dynamic piece: {self.reasons[0].detail}" if self.reasons else "dynamic piece"


# ------------------------------------------------------------------------------------------------
# Padding plans
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, order=True)
class PadSource:
    """A proposed padded dimension: placeholder ``input`` (index among placeholders), dim ``dim``."""

    input: int
    dim: int

    def __str__(self) -> str:
        return f"input {self.input} dim {self.dim}"


@dataclasses.dataclass(frozen=True)
class UnsafeReason(Finding):
    """Why padding is unsafe: the node, its op, the reason and the user's source line."""

    pass_name: ClassVar[str] = "bucket_plan"
    applied: ClassVar[bool] = False

    node: str
    op: str
    why: str
    source_line: str | None = None
    sources: tuple[PadSource, ...] = ()

    @property
    def reason(self) -> str:
        return self.why

    def __str__(self) -> str:
        where = f" (at {self.source_line})" if self.source_line else ""
        return f"{self.node} [{self.op}]: {self.why}{where}"


@dataclasses.dataclass(frozen=True)
class InputVerdict:
    """The verdict for one proposed ``(input, dim)``.

    ``required_pad_value`` is ``None`` when any pad contents are fine, ``0.0`` when the plan is
    only exact with zero padding. ``reasons`` is empty exactly when ``safe``.
    """

    source: PadSource
    safe: bool
    required_pad_value: float | None = None
    reasons: tuple[UnsafeReason, ...] = ()


@dataclasses.dataclass(frozen=True)
class OutputDim:
    """Output ``output`` dim ``dim`` carries the padded extent of ``source``.

    Its real extent is ``padded_extent − (N − n) · factor`` where ``N``/``n`` are the padded and
    real sizes of the source and ``factor = scale · Π inputs[i].shape[d] for (i, d) in
    scale_dims`` (dims merged under the source by a reshape; they are never padded themselves).
    ``shifted``: the real region starts after a fixed block (``cat([cache, x])``), so the extent
    is ``k + n·factor``.
    """

    output: int
    dim: int
    source: PadSource
    scale: int = 1
    scale_dims: tuple[tuple[int, int], ...] = ()
    shifted: bool = False

    def factor(self, inputs: Sequence[Any]) -> int:
        value = self.scale
        for i, d in self.scale_dims:
            value *= int(inputs[i].shape[d])
        return value

    def real_extent(self, padded_extent: int, real_size: int, padded_size: int,
                    inputs: Sequence[Any]) -> int:
        return padded_extent - (padded_size - real_size) * self.factor(inputs)

    def __str__(self) -> str:
        terms = [str(self.source)]
        if self.scale != 1:
            terms.append(str(self.scale))
        terms += [f"input {i} dim {d}" for i, d in self.scale_dims]
        text = f"output {self.output} dim {self.dim} = " + " × ".join(terms)
        return text + (" + fixed prefix" if self.shifted else "")


@dataclasses.dataclass(frozen=True)
class SizeInput:
    """A ``SymInt`` placeholder equal to a padded extent: the runtime must pass the padded size."""

    input: int
    source: PadSource


@dataclasses.dataclass(frozen=True)
class PaddingPlan:
    """The padding analysis's verdict for one piece: per proposed dim, sliced output dims, ties."""

    inputs: tuple[InputVerdict, ...]
    outputs: tuple[OutputDim, ...] = ()
    size_inputs: tuple[SizeInput, ...] = ()
    ties: tuple[tuple[PadSource, PadSource], ...] = ()
    """Pairs of sources that meet on one dim: they must be padded to the same bucket."""
    equal_sizes: tuple[tuple[PadSource, PadSource], ...] = ()
    """Pairs of sources whose real sizes must be equal for the plan to hold (a mask gathered at
    the positions of another input's ``arange``): a call where they differ runs exact."""
    checks: tuple[tuple[str, str, int], ...] = ()
    """Values the plan needs checked on the real inputs at each new bucket, as
    ``(node, kind, bound)``: ``"range"``, the node's values lie in ``[0, bound)`` (indices read
    from a buffer, such as BERT's position ids); ``"extent"``, the node's dim ``bound`` has the
    bucket's extent (a buffer sliced to the padded length is long enough). Only nodes computed
    from parameters, buffers and sizes are checked, once per bucket; a bucket that fails runs
    exact. ``"attends"``: every row of the node (a ``finfo.min`` attention mask) along dim
    ``bound`` keeps an unmasked entry, checked on every call's real inputs; a call that fails
    runs exact."""
    mask_inputs: tuple[int, ...] = ()
    """Additive attention masks among the padded inputs: the runtime fills their pad with
    ``-inf`` (the masking value) instead of zero or NaN."""
    positive_inputs: tuple[int, ...] = ()
    """0-dim inputs the plan needs positive (an RMS norm's ``eps`` passed as a tensor): a call
    where one is not runs exact."""

    @property
    def safe(self) -> bool:
        """Every proposed dim can be padded (vacuously true for an empty proposal)."""
        return all(v.safe for v in self.inputs)

    @property
    def padded(self) -> tuple[PadSource, ...]:
        """The sources this plan pads (the jointly safe ones)."""
        return tuple(v.source for v in self.inputs if v.safe)

    @property
    def reasons(self) -> tuple[UnsafeReason, ...]:
        seen: dict[UnsafeReason, None] = {}
        for v in self.inputs:
            seen.update(dict.fromkeys(v.reasons))
        return tuple(seen)

    @property
    def required_pad_value(self) -> float | None:
        values = {v.required_pad_value for v in self.inputs if v.safe} - {None}
        return values.pop() if values else None

    def verdict(self, input: int, dim: int) -> InputVerdict:
        for v in self.inputs:
            if v.source == PadSource(input, dim):
                return v
        raise KeyError(f"input {input} dim {dim} was not proposed for padding")


@dataclasses.dataclass(frozen=True)
class PiecePadding(Finding):
    """The padding plan ``bucket_plan`` attached to one static piece."""

    pass_name: ClassVar[str] = "bucket_plan"
    applied: ClassVar[bool] = True

    piece: str
    plan: PaddingPlan

    @property
    def node(self) -> str:
        return self.piece

    @property
    def reason(self) -> str:
        if self.plan.padded:
            return "pads " + ", ".join(map(str, self.plan.padded))
        return "exact shapes"
