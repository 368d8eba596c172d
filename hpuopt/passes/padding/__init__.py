"""Padding-safety analysis: may a static piece run on inputs padded up to a shape bucket?

The one public way to run it: :func:`analyze_padding` (judge a proposal ``{input: dim(s)}``),
:func:`default_pad_dims` (every symbolic dim of every input), :func:`plan_padding` (the plan
``bucket_plan`` attaches: that proposal judged, falling back to dim 0 alone where that pads more)
and :class:`PaddingAnalysisPass` (the same as a stand-alone pass). The records of a verdict live
in :mod:`hpuopt.records` and are re-exported here.

    >>> plan = analyze_padding(gm, {0: 0})            # propose: input 0, dim 0
    >>> plan.safe, [str(d) for d in plan.outputs]
    (True, ['output 0 dim 0 = input 0 dim 0'])

What the analysis proves, its domain, the rules per op family and its guarantees:
``docs/padding.md``. The modules: ``domain`` (abstract states), ``binding`` (an op's arguments
by schema name), ``rules/`` (transfer rules and table rows per op family), ``table`` (the rows
assembled), ``engine`` (the walk), ``driver`` (proposals, repeated walks, the plan),
``index_facts`` and ``fills`` (facts carried beside the rules), ``permutation`` and
``permuted_rows`` (a padded dim sorted, computed on in sort order and put back), ``analysis_pass``
(the pass).
"""

from hpuopt.passes.padding.analysis_pass import PaddingAnalysisPass
from hpuopt.passes.padding.driver import analyze_padding, default_pad_dims, plan_padding
from hpuopt.records import (
    InputVerdict,
    OutputDim,
    PaddingPlan,
    PadSource,
    SizeInput,
    UnsafeReason,
)

__all__ = [
    "InputVerdict",
    "OutputDim",
    "PadSource",
    "PaddingAnalysisPass",
    "PaddingPlan",
    "SizeInput",
    "UnsafeReason",
    "analyze_padding",
    "default_pad_dims",
    "plan_padding",
]
