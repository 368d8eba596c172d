"""``hpuopt.compile`` and ``hpuopt.explain``."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch._dynamo

from hpuopt.backend import hpugraph_backend
from hpuopt.config import Config
from hpuopt.diagnostics.explain import ExplainReport, Session, explain as _explain

# Dynamo flags that keep dynamic ops inside graphs, so hpuopt splits them itself instead of
# Dynamo breaking the graph (and falling back to Python) at each one.
DYNAMIC_OP_FLAGS = {"capture_dynamic_output_shape_ops": True, "capture_scalar_outputs": True}


class _DynamicOpFlags:
    """Sets :data:`DYNAMIC_OP_FLAGS` while Dynamo compiles a frame inside a call of a model
    from :func:`compile`, and restores them when that compilation ends.

    Dynamo reads these flags only while tracing, so rather than patching the config on every
    call (tens of microseconds), each call only marks a thread-local, and Dynamo's compile
    start/end callbacks patch and restore the config when a compilation really happens. Where
    this torch has no such callbacks, calls set and restore the flags directly.
    """

    def __init__(self) -> None:
        self._tls = threading.local()
        self._handler = getattr(torch._dynamo, "callback_handler", None)
        self.hooked = self._handler is not None and hasattr(
            self._handler, "register_start_callback"
        )

    def _ensure_registered(self) -> None:
        # torch._dynamo.reset() clears every callback, so check on each call.
        handler = self._handler
        if self._on_start not in handler.start_callbacks:
            handler.register_start_callback(self._on_start)
            handler.register_end_callback(self._on_end)

    def _on_start(self, *_: Any) -> None:
        if getattr(self._tls, "depth", 0) and getattr(self._tls, "saved", None) is None:
            cfg = torch._dynamo.config
            self._tls.saved = {k: getattr(cfg, k) for k in DYNAMIC_OP_FLAGS}
            for k, v in DYNAMIC_OP_FLAGS.items():
                setattr(cfg, k, v)

    def _on_end(self, *_: Any) -> None:
        saved = getattr(self._tls, "saved", None)
        if saved is not None:
            self._tls.saved = None
            for k, v in saved.items():
                setattr(torch._dynamo.config, k, v)

    def call(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        tls = self._tls
        if not self.hooked:
            with torch._dynamo.config.patch(DYNAMIC_OP_FLAGS):
                return fn(*args, **kwargs)
        self._ensure_registered()
        tls.depth = getattr(tls, "depth", 0) + 1
        try:
            return fn(*args, **kwargs)
        finally:
            tls.depth -= 1


_flags = _DynamicOpFlags()


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
        return _flags.call(self._compiled, args, kwargs)

    # Calls skip nn.Module.__call__ (its hook checks cost microseconds per call): hooks belong
    # on the wrapped module, where the compiled code sees them.
    __call__ = forward

    def explain(self) -> ExplainReport:
        return _explain(self.session)

    def clear(self) -> None:
        """Drops every captured graph of this model (they are captured again on demand)."""
        self.session.release_graphs()


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


def warmup(model: Callable[..., Any], examples: Iterable[Any]) -> int:
    """Calls ``model`` on each example, largest first, so every graph is captured before real
    traffic and smaller buckets capture after (and can reuse memory of) larger ones.

    ``examples`` holds one argument tuple per shape (or a single tensor). Runs under
    ``torch.no_grad()``. Returns how many graphs were captured.
    """
    from hpuopt.diagnostics.counters import counters

    calls = [ex if isinstance(ex, tuple) else (ex,) for ex in examples]

    def size(args: tuple) -> int:
        return sum(a.numel() for a in args if isinstance(a, torch.Tensor))

    before = counters.graphs_captured
    with torch.no_grad():
        for args in sorted(calls, key=size, reverse=True):
            model(*args)
    return counters.graphs_captured - before


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
