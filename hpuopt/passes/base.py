"""The pass contract.

A pass is a frozen dataclass with a ``name`` and a ``stage``; calling it with a
:class:`torch.fx.GraphModule` and the frozen :class:`hpuopt.config.Config` returns a
:class:`PassResult`. A pass

- says whether it changed the graph and what it found, as data (``PassResult.findings``);
- reads no environment variable, prints nothing and mutates no global state;
- can run alone in a unit test, on a graph built by hand or by ``make_fx``, with no device.

Stages: ``"pre_aot"`` passes see the whole torch-level graph Dynamo captured (optimizer and
clip-norm rewrites must see a whole step); ``"post_aot"`` passes see each ATen-level graph
(forward, backward or inference) that AOTAutograd produced, where ops are canonical and
``node.meta["val"]`` holds fake tensors with symbolic shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import torch.fx

from hpuopt.config import Config

Stage = Literal["pre_aot", "post_aot"]


@dataclasses.dataclass(frozen=True)
class PassResult:
    """What one pass did: the (possibly new) graph module, whether it changed, what it found."""

    graph_module: torch.fx.GraphModule
    modified: bool
    findings: tuple[Any, ...] = ()
    """Pass-specific records (split reasons, rewrite matches, skipped candidates, ...)."""


@dataclasses.dataclass(frozen=True)
class GraphPass:
    """Base class of every pass. Subclasses set ``name``/``stage`` and implement ``run``."""

    name: ClassVar[str]
    stage: ClassVar[Stage]

    def __call__(self, gm: torch.fx.GraphModule, config: Config) -> PassResult:
        return self.run(gm, config)

    def run(self, gm: torch.fx.GraphModule, config: Config) -> PassResult:  # pragma: no cover
        raise NotImplementedError
