"""A recording stand-in for the ``habana_frameworks.torch`` API, for tests without a Gaudi.

This is not Habana's software: it is a small imitation of the part of its Python API that
:mod:`hpuopt.runtime.hpu` speaks, so the HPU runtime runs in CI. It keeps the documented
semantics and checks the documented call order:

* ``hpu.HPUGraph``: ``capture_begin()`` then ``capture_end()`` then any number of ``replay()``;
  capturing twice, ending a capture that did not begin, or replaying before the capture ended
  raises. Work done between begin and end is *executed* (as on a Gaudi) and *recorded* op by op
  under a dispatch mode; ``replay()`` re-runs the recorded ops on the same tensors and writes
  each result into the tensor the capture produced, so replay reads the static inputs and
  rewrites the same outputs — and a replay that reads a tensor the caller replaced is visibly
  stale.
* Reading a value back to the host (``.item()``, ``nonzero``...) during capture raises, as a
  graph cannot hold it; so does ``mark_step()``.
* ``hpu.graph(g, stream=None)`` synchronises, makes the stream current and brackets the block
  with ``capture_begin``/``capture_end``.
* ``core.mark_step()``, ``hpu.synchronize()``, ``hpu.Stream``, ``hpu.stream``,
  ``hpu.current_stream``, ``hpu.memory_allocated`` exist and are recorded in ``calls``.

Install it with :func:`installed` (a context manager that puts the modules in ``sys.modules``
and removes them afterwards).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from hpuopt.ops import host_sync_reason


class StandinError(RuntimeError):
    """The stand-in's API was used in an order the real API forbids."""


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[Any, tuple, dict, list[torch.Tensor]]] = []

    supports_higher_order_operators = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        hop = isinstance(func, torch._ops.HigherOrderOperator)
        reason = None if hop else host_sync_reason(func, args)
        if reason is not None:
            raise StandinError(f"not capturable in an HPU Graph: {reason}")
        out = func(*args, **kwargs)
        flat, _ = tree_flatten(out)
        self.ops.append((func, args, kwargs, [t for t in flat if isinstance(t, torch.Tensor)]))
        return out


class _HPUGraph:
    """``hpu.HPUGraph``: capture_begin, capture_end, then replays (see the module docstring)."""

    def __init__(self, standin: HabanaStandin) -> None:
        self.standin = standin
        self.state = "new"
        self._recorder: _Recorder | None = None
        self.replays = 0

    def capture_begin(self) -> None:
        self.standin.calls.append("capture_begin")
        if self.state != "new":
            raise StandinError(f"capture_begin on a graph in state {self.state!r}")
        if self.standin.capturing is not None:
            raise StandinError("only one capture may be under way at a time")
        self.state = "capturing"
        self.standin.capturing = self
        self._recorder = _Recorder()
        self._recorder.__enter__()

    def capture_end(self) -> None:
        self.standin.calls.append("capture_end")
        if self.state != "capturing":
            raise StandinError(f"capture_end on a graph in state {self.state!r}")
        assert self._recorder is not None
        self._recorder.__exit__(None, None, None)
        self.state = "captured"
        self.standin.capturing = None

    def abort(self) -> None:
        if self.state == "capturing" and self._recorder is not None:
            self._recorder.__exit__(None, None, None)
            self.standin.capturing = None
        self.state = "failed"

    def replay(self, asynchronous: bool = False) -> None:
        self.standin.calls.append("replay")
        if self.state != "captured":
            raise StandinError(f"replay on a graph in state {self.state!r}")
        assert self._recorder is not None
        for func, args, kwargs, outs in self._recorder.ops:
            fresh, _ = tree_flatten(func(*args, **kwargs))
            fresh = [t for t in fresh if isinstance(t, torch.Tensor)]
            for old, new in zip(outs, fresh):
                if old.data_ptr() != new.data_ptr() or old.stride() != new.stride():
                    old.copy_(new)
        self.replays += 1


class _GraphContext:
    """``hpu.graph(g, stream=None)``: synchronise, then bracket the block with the capture."""

    def __init__(self, standin: HabanaStandin, hpu_graph: _HPUGraph, stream: Any = None) -> None:
        self.standin = standin
        self.hpu_graph = hpu_graph
        self.stream = stream

    def __enter__(self) -> None:
        self.standin.synchronize()
        self.hpu_graph.capture_begin()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.hpu_graph.abort()
            return
        self.hpu_graph.capture_end()


class _Stream:
    def __init__(self, standin: HabanaStandin) -> None:
        self.standin = standin

    def synchronize(self) -> None:
        self.standin.calls.append("stream.synchronize")


class HabanaStandin:
    """Holds the fake modules and the record of calls made to them."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.capturing: _HPUGraph | None = None
        self.HPUGraph = functools.partial(_HPUGraph, self)
        self.modules = self._modules()

    def synchronize(self) -> None:
        self.calls.append("synchronize")

    def mark_step(self) -> None:
        self.calls.append("mark_step")
        if self.capturing is not None:
            raise StandinError("mark_step during a capture")

    def _modules(self) -> dict[str, types.ModuleType]:
        torch_mod = types.ModuleType("habana_frameworks.torch")
        hpu = types.ModuleType("habana_frameworks.torch.hpu")
        core = types.ModuleType("habana_frameworks.torch.core")
        hpu.HPUGraph = self.HPUGraph
        hpu.graph = functools.partial(_GraphContext, self)
        hpu.Stream = functools.partial(_Stream, self)
        hpu.stream = _no_stream_switch
        hpu.current_stream = hpu.Stream
        hpu.synchronize = self.synchronize
        hpu.memory_allocated = lambda: 0
        core.mark_step = self.mark_step
        torch_mod.hpu = hpu
        torch_mod.core = core
        root = types.ModuleType("habana_frameworks")
        root.torch = torch_mod
        return {
            "habana_frameworks": root,
            "habana_frameworks.torch": torch_mod,
            "habana_frameworks.torch.hpu": hpu,
            "habana_frameworks.torch.core": core,
        }


@contextlib.contextmanager
def _no_stream_switch(s: _Stream) -> Iterator[None]:
    yield


@contextlib.contextmanager
def installed() -> Iterator[HabanaStandin]:
    """Puts the stand-in in ``sys.modules`` for the block; resets hpuopt's shared HPU runtime."""
    from hpuopt.runtime.hpu import HpuRuntime

    standin = HabanaStandin()
    saved = {name: sys.modules.get(name) for name in standin.modules}
    sys.modules.update(standin.modules)
    HpuRuntime._shared = None
    try:
        yield standin
    finally:
        HpuRuntime._shared = None
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod
