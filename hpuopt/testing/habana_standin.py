"""A recording stand-in for the part of ``habana_frameworks.torch`` hpuopt speaks, for tests
without a Gaudi.

This is not Habana's software. It imitates what the Gaudi PyTorch bridge's Python code and
Intel's documentation say, nothing more, and records every call in :attr:`HabanaStandin.calls`.
Each behaviour it enforces names its source; the bridge files are those of
``HabanaAI/gaudi-pytorch-bridge`` under ``python_packages/habana_frameworks/torch/``.

The two execution modes
-----------------------
The mode is read from ``PT_HPU_LAZY_MODE`` as the bridge reads it
(``utils/internal.py``, ``is_lazy``: anything but ``"0"`` is lazy; unset means ``"0"`` in recent
bridges); :func:`installed` sets the variable for its block.

* **Lazy mode.** ``hpu.HPUGraph`` (``hpu/graphs.py``, class ``HPUGraph``) with
  ``capture_begin(dry_run=False)``, ``capture_end()``, ``replay(asynchronous=False)``,
  ``replayV3(tlistI, asynchronous=False)``, ``mark_user_inputs``, ``mark_user_outputs``,
  ``get_user_input_match_indices`` and ``reset``; ``hpu.graph(hpu_graph, stream=None,
  dry_run=False)`` (class ``graph``: ``__enter__`` synchronises and begins the capture on the
  stream, ``__exit__`` ends it whatever happened); ``hpu.default_stream()``, ``hpu.Stream``,
  ``hpu.stream(s)``, ``hpu.synchronize()``; ``core.mark_step()``. The compile backend is absent:
  ``core/__init__.py`` imports ``dynamo.compile_backend`` only when ``not is_lazy()``.
* **Compile mode.** ``habana_frameworks.torch.dynamo.compile_backend.backends.hpu_backend``
  (``dynamo/compile_backend/backends.py``): a recording backend that lowers the graph with
  AOTAutograd as the real one does (``aot_autograd(fw_compiler=..., inference_compiler=...,
  keep_inference_input_mutations=...)``), with compilers that run the graph as is, and checks
  that it is handed only what hpuopt promises in this mode: static pieces, with fixed shapes (a
  bucket's or an exact shape's), no data-dependent op. ``core.mark_step()`` has no effect
  (``core/step_closure.py``: ``mark_step`` is ``@lazy_only``) but is recorded, so a test can see
  that nobody called it. Capturing an HPU Graph raises: "Running HPU Graphs is supported with
  Lazy mode. Eager mode is currently not supported" (docs.habana.ai, *HPU Graphs for
  Training*).

What an HPU Graph does here
---------------------------
Work between ``capture_begin`` and ``capture_end`` is executed (as on a Gaudi) and recorded op by
op under a dispatch mode; ``replay()`` re-runs the recorded ops on the same tensors and writes
each result into the tensor the capture produced, so a replay reads the static inputs and
rewrites the same outputs, and one that reads a tensor the caller replaced is visibly stale.
``replayV3(tlist)`` reads the tensors of ``tlist`` in place of the inputs ``mark_user_inputs``
marked (``hpu/graphs.py``, ``wrapped_hpugraph_forward``: a graph captured with
``disable_tensor_cache`` is replayed with the call's input tensors).

Enforced, with sources:

* ``replay`` only after ``capture_end`` (``HPUGraph.capture_end``: "After ``capture_end``,
  ``replay`` may be called on this instance"), and not after ``reset`` ("Destroys and free up
  memory of captured HPU graph").
* One capture under way at a time (``graph.__init__``: "graphs already have the general
  (explicitly documented) restriction that only one capture may be underway at a time in the
  process").
* No read back to the host and no data-dependent shape during a capture: "HPU Graphs should be
  used for static ops. Data-dependent dynamic flow is not supported" (docs.habana.ai, *HPU
  Graphs for Training*, Theory of Operations).
* ``dry_run``: "If True, avoid actual launch of recipe" (``make_graphed_callables``): the
  capture records the ops, then undoes every write they made and leaves their outputs holding
  garbage (NaN), as work never launched would; ``wrapped_hpugraph_forward`` replays once right
  after such a capture.

Install it with :func:`installed` (a context manager that puts the modules in ``sys.modules``,
sets ``PT_HPU_LAZY_MODE`` and undoes both afterwards).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from hpuopt.ops import host_sync_reason

LAZY_VARIABLE = "PT_HPU_LAZY_MODE"


class StandinError(RuntimeError):
    """The stand-in's API was used in a way the bridge's code or documentation rules out."""


def _garbage(t: torch.Tensor) -> None:
    """What a never-launched op's output holds: nothing meaningful."""
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))


class _Recorder(TorchDispatchMode):
    """Records the ops of a capture; refuses what an HPU Graph cannot hold; under ``dry_run``
    keeps a copy of every tensor an op writes, so the capture can be undone."""

    supports_higher_order_operators = True

    def __init__(self, dry_run: bool) -> None:
        super().__init__()
        self.dry_run = dry_run
        self.ops: list[tuple[Any, tuple, dict, list[torch.Tensor]]] = []
        self.undo: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        hop = isinstance(func, torch._ops.HigherOrderOperator)
        reason = None if hop else host_sync_reason(func, args, kwargs)
        if reason is not None:
            raise StandinError(
                f"not capturable in an HPU Graph: {reason} (docs.habana.ai, HPU Graphs for "
                "Training: data-dependent dynamic flow is not supported)"
            )
        if self.dry_run and not hop:
            for t in _written(func, args, kwargs):
                self.undo.append((t, t.detach().clone()))
        out = func(*args, **kwargs)
        flat, _ = tree_flatten(out)
        self.ops.append((func, args, kwargs, [t for t in flat if isinstance(t, torch.Tensor)]))
        return out


def _written(func: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensor arguments ``func``'s schema says it writes."""
    schema = getattr(func, "_schema", None)
    if schema is None:
        return []
    out = []
    for i, arg in enumerate(schema.arguments):
        info = arg.alias_info
        if info is None or not info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        flat, _ = tree_flatten(value)
        out += [t for t in flat if isinstance(t, torch.Tensor)]
    return out


class _HPUGraph:
    """``hpu.HPUGraph`` (see the module docstring)."""

    def __init__(self, standin: HabanaStandin) -> None:
        self.standin = standin
        self.state = "new"
        self.dry_run = False
        self._recorder: _Recorder | None = None
        self.user_inputs: list[torch.Tensor] = []
        self.user_outputs: list[torch.Tensor] = []
        self.replays = 0

    def capture_begin(self, dry_run: bool = False) -> None:
        self.standin.calls.append("capture_begin")
        self.standin.captures.append({"dry_run": dry_run, "stream": self.standin.current.name})
        if not self.standin.lazy:
            raise StandinError(
                "HPU Graphs need lazy mode (docs.habana.ai, HPU Graphs for Training: \"Running "
                "HPU Graphs is supported with Lazy mode. Eager mode is currently not supported\")"
            )
        if self.standin.capturing is not None:
            raise StandinError("only one capture may be under way at a time (graphs.py, graph)")
        self.state = "capturing"
        self.dry_run = dry_run
        self.standin.capturing = self
        self._recorder = _Recorder(dry_run)
        self._recorder.__enter__()

    def capture_end(self) -> None:
        self.standin.calls.append("capture_end")
        if self.state != "capturing":
            return  # nothing under way (graph.__exit__ ends a capture whatever happened)
        assert self._recorder is not None
        self._recorder.__exit__(None, None, None)
        self.state = "captured"
        self.standin.capturing = None
        if self.dry_run:  # nothing was launched: undo the writes, outputs hold garbage
            written = {id(t) for t, _ in self._recorder.undo}
            for t, before in reversed(self._recorder.undo):
                t.copy_(before)
            for _, _, _, outs in self._recorder.ops:
                for o in outs:
                    if id(o) not in written and o._base is None:
                        _garbage(o)

    def mark_user_inputs(self, static_tlist: Any) -> None:
        self.standin.calls.append("mark_user_inputs")
        self.user_inputs = [t for t in static_tlist if isinstance(t, torch.Tensor)]

    def mark_user_outputs(self, static_tlist: Any) -> None:
        self.standin.calls.append("mark_user_outputs")
        self.user_outputs = list(static_tlist)

    def get_user_input_match_indices(self) -> list[int]:
        """The marked inputs ``replayV3`` takes from its list: here, every marked input the
        recorded ops read (the bridge decides this in C++)."""
        read = {id(a) for _, args, kwargs, _ in self._ops() for a in tree_flatten((args, kwargs))[0]}
        return [i for i, t in enumerate(self.user_inputs) if id(t) in read]

    def replay(self, asynchronous: bool = False) -> None:
        self.standin.calls.append("replay")
        self._replay({})

    def replayV3(self, tlistI: Any, asynchronous: bool = False) -> None:
        self.standin.calls.append("replayV3")
        matched = self.get_user_input_match_indices()
        tlist = list(tlistI)
        self._replay({id(self.user_inputs[i]): tlist[i] for i in matched})

    def reset(self) -> None:
        self.standin.calls.append("reset")
        self.state = "reset"
        self._recorder = None

    def _ops(self) -> list[tuple[Any, tuple, dict, list[torch.Tensor]]]:
        return self._recorder.ops if self._recorder is not None else []

    def _replay(self, rebind: dict[int, torch.Tensor]) -> None:
        if self.state != "captured":
            raise StandinError(
                f"replay on a graph in state {self.state!r} (graphs.py, HPUGraph.capture_end: "
                "replay may be called after capture_end)"
            )
        if rebind:  # replayV3: the listed tensors in place of the marked inputs
            env = dict(rebind)

            def sub(a: Any) -> Any:
                return env.get(id(a), a) if isinstance(a, torch.Tensor) else a

            for func, args, kwargs, outs in self._ops():
                fresh, _ = tree_flatten(func(*tree_map(sub, args), **tree_map(sub, kwargs)))
                fresh = [t for t in fresh if isinstance(t, torch.Tensor)]
                for old, new in zip(outs, fresh):
                    env[id(old)] = new
            for old in self.user_outputs:  # the marked outputs are the graph's results
                new = env.get(id(old))
                if new is not None and new is not old:
                    old.copy_(new)
        else:
            for func, args, kwargs, outs in self._ops():
                fresh, _ = tree_flatten(func(*args, **kwargs))
                fresh = [t for t in fresh if isinstance(t, torch.Tensor)]
                for old, new in zip(outs, fresh):
                    if old.data_ptr() != new.data_ptr() or old.stride() != new.stride():
                        old.copy_(new)
        self.replays += 1


class _GraphContext:
    """``hpu.graph(hpu_graph, stream=None, dry_run=False)``: synchronise, make the stream
    current, begin the capture; on exit end it, whatever happened (graphs.py, class graph)."""

    def __init__(self, standin: HabanaStandin, hpu_graph: _HPUGraph, stream: Any = None,
                 dry_run: bool = False) -> None:
        self.standin = standin
        self.hpu_graph = hpu_graph
        self.stream = stream if stream is not None else standin.side_stream
        self.dry_run = dry_run

    def __enter__(self) -> None:
        self.standin.synchronize()
        self.standin.enter_stream(self.stream)
        self.hpu_graph.capture_begin(self.dry_run)

    def __exit__(self, exc_type, exc, tb) -> None:
        self.hpu_graph.capture_end()
        self.standin.exit_stream()


class _Stream:
    def __init__(self, standin: HabanaStandin, name: str = "side") -> None:
        self.standin = standin
        self.name = name
        self.is_capture = False

    def synchronize(self) -> None:
        self.standin.calls.append("stream.synchronize")


@dataclasses.dataclass
class CompileRecord:
    """One call of the compile-mode ``hpu_backend``: the graph's ops and its inputs' shapes
    (``None`` for a non-tensor input)."""

    ops: list[str]
    shapes: list[tuple[int, ...] | None]


class HabanaStandin:
    """Holds the fake modules and the record of calls made to them."""

    def __init__(self, lazy: bool) -> None:
        self.lazy = lazy
        self.calls: list[str] = []
        self.compiles: list[CompileRecord] = []
        self.capturing: _HPUGraph | None = None
        self.default = _Stream(self, "default")
        self.side_stream = _Stream(self, "side")
        self.current = self.default
        self._stream_stack: list[_Stream] = []
        self.captures: list[dict[str, Any]] = []
        """Per ``capture_begin``: its ``dry_run`` and the name of the stream then current."""
        self.HPUGraph = functools.partial(_HPUGraph, self)
        self.modules = self._modules()

    def synchronize(self) -> None:
        self.calls.append("synchronize")

    def mark_step(self, device_str: str = "", sync: bool = False) -> None:
        self.calls.append("mark_step")  # in compile mode the bridge's does nothing (lazy_only)

    def enter_stream(self, s: _Stream) -> None:
        self._stream_stack.append(self.current)
        self.current = s

    def exit_stream(self) -> None:
        self.current = self._stream_stack.pop()

    @contextlib.contextmanager
    def stream(self, s: _Stream) -> Iterator[None]:
        self.enter_stream(s)
        try:
            yield
        finally:
            self.exit_stream()

    def hpu_backend(self, graph_module: torch.fx.GraphModule, example_inputs: list[Any],
                    **kwargs: Any) -> Any:
        """The compile-mode backend: records, checks what hpuopt hands it, lowers with
        AOTAutograd and runs the graph as is."""
        from torch._dynamo.backends.common import aot_autograd
        from torch._functorch.aot_autograd import make_boxed_func

        self.calls.append("hpu_backend")
        if self.lazy:  # pragma: no cover - the module is absent in lazy mode
            raise StandinError("hpu_backend is registered in compile mode only")
        _check_static(graph_module, example_inputs)
        self.compiles.append(CompileRecord(
            ops=[str(n.target) for n in graph_module.graph.nodes if n.op == "call_function"],
            shapes=[tuple(t.shape) if isinstance(t, torch.Tensor) else None
                    for t in example_inputs],
        ))

        def run_as_is(gm: torch.fx.GraphModule, _inputs: Any) -> Any:
            return make_boxed_func(gm.forward)

        return aot_autograd(fw_compiler=run_as_is, inference_compiler=run_as_is,
                            keep_inference_input_mutations=True)(graph_module, example_inputs)

    def _modules(self) -> dict[str, types.ModuleType]:
        def module(name: str, **attrs: Any) -> types.ModuleType:
            mod = types.ModuleType(name)
            for k, v in attrs.items():
                setattr(mod, k, v)
            return mod

        hpu = module(
            "habana_frameworks.torch.hpu",
            HPUGraph=self.HPUGraph,
            graph=functools.partial(_GraphContext, self),
            Stream=functools.partial(_Stream, self),
            stream=self.stream,
            default_stream=lambda: self.default,
            current_stream=lambda: self.current,
            synchronize=self.synchronize,
            memory_allocated=lambda: 0,
        )
        core = module("habana_frameworks.torch.core", mark_step=self.mark_step)
        internal = module("habana_frameworks.torch.utils.internal", is_lazy=lambda: self.lazy)
        utils = module("habana_frameworks.torch.utils", internal=internal)
        torch_mod = module("habana_frameworks.torch", hpu=hpu, core=core, utils=utils)
        mods = {
            "habana_frameworks": module("habana_frameworks", torch=torch_mod),
            "habana_frameworks.torch": torch_mod,
            "habana_frameworks.torch.hpu": hpu,
            "habana_frameworks.torch.core": core,
            "habana_frameworks.torch.utils": utils,
            "habana_frameworks.torch.utils.internal": internal,
        }
        if not self.lazy:  # core/__init__.py imports the compile backend in compile mode only
            backends = module("habana_frameworks.torch.dynamo.compile_backend.backends",
                              hpu_backend=self.hpu_backend)
            compile_backend = module("habana_frameworks.torch.dynamo.compile_backend",
                                     backends=backends)
            dynamo = module("habana_frameworks.torch.dynamo", compile_backend=compile_backend)
            torch_mod.dynamo = dynamo
            mods.update({
                "habana_frameworks.torch.dynamo": dynamo,
                "habana_frameworks.torch.dynamo.compile_backend": compile_backend,
                "habana_frameworks.torch.dynamo.compile_backend.backends": backends,
            })
        return mods


def _check_static(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> None:
    """What hpuopt promises ``hpu_backend`` in compile mode: concrete shapes, and no op whose
    output shape or value depends on data (torch's own op tags say which)."""
    for i, t in enumerate(example_inputs):
        if isinstance(t, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            raise StandinError(f"hpu_backend got a symbolic input {i}: {t}")
        if isinstance(t, torch.Tensor) and any(
            not isinstance(s, int) for s in (*t.shape, *t.stride())
        ):
            raise StandinError(f"hpu_backend got input {i} with symbolic shape {t.shape}")
    data_dependent = {torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        tags = set(getattr(node.target, "tags", ()))
        if tags & data_dependent:
            raise StandinError(f"hpu_backend got a data-dependent op {node.target} ({node.name})")


@contextlib.contextmanager
def installed(lazy: bool = False) -> Iterator[HabanaStandin]:
    """Puts the stand-in in ``sys.modules`` for the block, with ``PT_HPU_LAZY_MODE`` set to the
    mode (``1`` lazy, ``0`` compile); forgets hpuopt's shared HPU runtimes on the way in and
    out."""
    from hpuopt.runtime.hpu import HpuRuntime

    standin = HabanaStandin(lazy)
    saved = {name: sys.modules.get(name) for name in standin.modules}
    saved_env = os.environ.get(LAZY_VARIABLE)
    sys.modules.update(standin.modules)
    os.environ[LAZY_VARIABLE] = "1" if lazy else "0"
    HpuRuntime.forget()
    try:
        yield standin
    finally:
        HpuRuntime.forget()
        if saved_env is None:
            os.environ.pop(LAZY_VARIABLE, None)
        else:
            os.environ[LAZY_VARIABLE] = saved_env
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod
