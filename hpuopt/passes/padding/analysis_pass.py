"""``PaddingAnalysisPass``: the padding analysis as a stand-alone pass, for tests and tools.

It is not part of the pipeline: there ``bucket_plan`` (``hpuopt.passes.bucket_plan``) runs the
analysis per static piece.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch.fx

from hpuopt.config import Config
from hpuopt.passes.base import GraphPass, PassResult, Stage
from hpuopt.passes.padding.driver import analyze_padding, plan_padding


@dataclasses.dataclass(frozen=True)
class PaddingAnalysisPass(GraphPass):
    """Finds which input dims a piece may pad to a bucket; never changes the graph.

    ``pad_dims``: an explicit proposal ``{placeholder index: dim or dims}``; ``None`` proposes
    :func:`plan_padding`'s proposal (every symbolic dim of every input, dim 0 alone where that
    pads more).
    """

    name: ClassVar[str] = "padding_analysis"
    stage: ClassVar[Stage] = "post_aot"

    pad_dims: tuple[tuple[int, tuple[int, ...]], ...] | Mapping[int, int | Sequence[int]] | None = None
    allow_zero_pad: bool = True

    def __post_init__(self) -> None:
        if self.pad_dims is not None and isinstance(self.pad_dims, Mapping):
            norm = tuple(sorted(
                (int(k), (v,) if isinstance(v, int) else tuple(v))
                for k, v in self.pad_dims.items()
            ))
            object.__setattr__(self, "pad_dims", norm)

    def run(self, gm: torch.fx.GraphModule, config: Config) -> PassResult:
        if self.pad_dims is None:
            plan = plan_padding(gm, self.allow_zero_pad) or analyze_padding(gm, {})
        else:
            plan = analyze_padding(gm, dict(self.pad_dims), allow_zero_pad=self.allow_zero_pad)
        return PassResult(gm, modified=False, findings=(plan,))
