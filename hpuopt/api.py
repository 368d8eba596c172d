"""``hpuopt.compile`` and ``hpuopt.explain``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from hpuopt.backend import hpugraph_backend
from hpuopt.config import Config
from hpuopt.diagnostics.explain import ExplainReport, Session, explain as _explain

# Dynamo flags that keep dynamic ops inside graphs, so hpuopt splits them itself instead of
# Dynamo breaking the graph (and falling back to Python) at each one.
DYNAMIC_OP_FLAGS = {"capture_dynamic_output_shape_ops": True, "capture_scalar_outputs": True}


class CompiledModel(torch.nn.Module):
    """What :func:`compile` returns for a module: calls go through the compiled model with the
    dynamic-op flags set for the call only. The original module is ``_orig_mod``, as with
    ``torch.compile``; ``explain()`` and ``session`` describe this model alone."""

    def __init__(self, original: Any, compiled: Callable[..., Any], session: Session) -> None:
        super().__init__()
        if isinstance(original, torch.nn.Module):
            self._orig_mod = original
        else:
            self.__dict__["_orig_fn"] = original
        self.__dict__["_compiled"] = compiled
        self.__dict__["session"] = session

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch._dynamo.config.patch(DYNAMIC_OP_FLAGS):
            return self._compiled(*args, **kwargs)

    def explain(self) -> ExplainReport:
        return _explain(self.session)

    def clear(self) -> None:
        """Drops every captured graph of this model (they are captured again on demand)."""
        self.session.clear()


def compile(  # noqa: A001 - mirrors torch.compile
    model: Any,
    *,
    dynamic: bool | None = None,
    fullgraph: bool = False,
    **options: Any,
) -> CompiledModel:
    """``torch.compile(model, backend="hpugraph", options=options)`` with dynamic ops kept in
    the graph (``capture_dynamic_output_shape_ops``, ``capture_scalar_outputs`` set for this
    model's calls only, restored after each).

    Options are checked now: an unknown one raises :class:`hpuopt.errors.ConfigError`.
    """
    config = Config.from_options(options)
    session = Session()
    backend = functools.partial(hpugraph_backend, config=config, session=session)
    compiled = torch.compile(model, backend=backend, dynamic=dynamic, fullgraph=fullgraph)
    return CompiledModel(model, compiled, session)


def explain(model: Any = None) -> ExplainReport:
    """What hpuopt did: for a model from :func:`compile`, its own graphs; otherwise every graph
    compiled through ``backend="hpugraph"`` in this process (see :func:`reset`)."""
    session = getattr(model, "session", None) if model is not None else None
    if model is not None and not isinstance(session, Session):
        raise TypeError(
            "explain() takes a model returned by hpuopt.compile, or nothing for the whole "
            f"process; got {type(model).__name__}"
        )
    return _explain(session)


def reset() -> None:
    """Forgets the process-wide records and counters (``torch._dynamo.reset()`` is separate)."""
    from hpuopt.diagnostics.counters import counters
    from hpuopt.diagnostics.explain import default_session

    default_session.clear()
    counters.reset()
