"""The pass contract.

A pass is a frozen dataclass with a ``name`` and a ``stage``. Calling it with a
:class:`torch.fx.GraphModule`, the frozen :class:`hpuopt.config.Config` and (optionally) a
:class:`CompileContext` returns a :class:`PassResult`. A pass

- says whether it changed the graph and what it found, as data: ``PassResult.findings`` holds
  :class:`hpuopt.records.Finding` values (the pass, the node, applied or skipped, the reason);
- reads per-compile facts (graph kind, device, name) from the context it is handed, never from
  graph metadata keys;
- reads no environment variable, prints nothing and mutates no global state;
- can run alone in a unit test, on a graph built by hand or by ``make_fx``, with no device.

Subclasses implement ``run(gm, config, ctx)`` (or ``run(gm, config)`` when they need no
context). What every pass would otherwise repeat lives here, in :meth:`GraphPass.__call__`: a
pass disabled by the config returns the graph untouched, and a graph a pass modified is linted
and recompiled once, after the pass.

Stages: ``"pre_aot"`` passes see the whole torch-level graph Dynamo captured (optimizer and
clip-norm rewrites must see a whole step); ``"post_aot"`` passes see each ATen-level graph
(forward, backward or inference) that AOTAutograd produced, where ops are canonical and
``node.meta["val"]`` holds fake tensors with symbolic shapes.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import ClassVar, Literal

import torch.fx

from hpuopt.config import Config
from hpuopt.errors import PassError
from hpuopt.fx_utils import graph_device_type
from hpuopt.records import Finding

Stage = Literal["pre_aot", "post_aot"]
GraphKind = Literal["dynamo", "forward", "backward", "inference"]


@dataclasses.dataclass(frozen=True)
class CompileContext:
    """Facts about the graph being compiled, fixed for one pipeline run."""

    kind: GraphKind = "inference"
    """``"dynamo"`` for the torch-level graph, else the ATen graph's role."""
    device: str = "cpu"
    """The device type the graph runs on (``"cpu"``, ``"cuda"``, ``"hpu"``)."""
    name: str = "graph"
    """A name for logs and dumps (``"g0.forward"``)."""

    @classmethod
    def of(cls, gm: torch.fx.GraphModule, kind: GraphKind = "inference",
           name: str = "graph", config: Config | None = None) -> CompileContext:
        """The context of ``gm``: its device from metadata unless the config names a runtime."""
        runtime = config.runtime if config is not None else "auto"
        device = runtime if runtime != "auto" else graph_device_type(gm)
        return cls(kind=kind, device=device, name=name)


@dataclasses.dataclass(frozen=True)
class PassResult:
    """What one pass did: the (possibly new) graph module, whether it changed, what it found."""

    graph_module: torch.fx.GraphModule
    modified: bool
    findings: tuple[Finding, ...] = ()
    """Typed records: rewrites applied, candidates skipped with a reason, split reasons..."""


@dataclasses.dataclass(frozen=True)
class GraphPass:
    """Base class of every pass. Subclasses set ``name``/``stage`` and implement ``run``."""

    name: ClassVar[str]
    stage: ClassVar[Stage]

    def __call__(self, gm: torch.fx.GraphModule, config: Config,
                 ctx: CompileContext | None = None) -> PassResult:
        if not config.pass_enabled(self.name):
            return PassResult(gm, False, ())
        if _takes_context(type(self)):
            ctx = ctx if ctx is not None else CompileContext.of(gm, config=config)
            result = self.run(gm, config, ctx)  # type: ignore[call-arg]
        else:
            result = self.run(gm, config)
        if result.modified:
            out = result.graph_module
            try:
                out.graph.lint()
            except Exception as exc:  # lint raises plain RuntimeErrors; name the pass
                raise PassError(self.name, f"graph lint failed: {exc}") from exc
            out.recompile()
        return result

    def run(self, gm: torch.fx.GraphModule, config: Config) -> PassResult:  # pragma: no cover
        raise NotImplementedError


@functools.cache
def _takes_context(cls: type) -> bool:
    """Whether ``cls.run`` accepts the compile context as a third argument."""
    return len(inspect.signature(cls.run).parameters) >= 4  # self, gm, config, ctx
