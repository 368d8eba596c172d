"""The CPU runtime's replay as straight-line Python calling each op's C++ entry point.

Why
---
On a device a replay is one launch; the CPU runtime emulates it by running the piece's ATen
graph again, so the host cost of that run is the emulator's own. ``GraphModule.forward`` pays,
per op, an attribute chain (``torch.ops.aten.mm.default``) and the ``OpOverload.__call__``
frame that repacks the arguments for the dispatcher: in a graph of small ops that is a sixth of
the replay. :func:`replay_program` turns the graph into a function that calls, per op, the
fastest entry point that is *proven* to reach the same overload.

How
---
For an ATen overload the candidates are the generated Python bindings of its name
(``torch._C._VariableFunctions.mm``, ``torch._C._nn.gelu_backward``, the ``Tensor`` method
``view``...), which parse the arguments in C++. A binding covers every overload of its name and
picks one from the arguments' types, so it is tried on the capture's own arguments under a
dispatch mode that records what it dispatched: it is kept only if it dispatched exactly the
node's overload, once, with the arguments the overload's own entry point passes (a binding may
fill in a default of its own: ``torch._C._nn.mse_loss(a, b)`` does not reduce, the overload
does). Between replays the arguments keep their types (the graph's constants are
the graph's, its tensors stay tensors), so the choice holds for every replay. An op that failed
the test, and every op that writes an argument other than its ``out=`` buffers (trying a binding
would apply the write twice), is called through the overload's own entry point
(``OpOverload._op``), which is the overload by construction.

The function releases each intermediate after its last use, as ``GraphModule`` code does, and
returns the graph's output structure. Graphs with modules, methods or a custom code generator
are left to ``GraphModule.forward`` (:func:`replay_program` returns ``None``).
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch.utils._python_dispatch import TorchDispatchMode

log = logging.getLogger(__name__)

_BINDING_SPACES: tuple[Any, ...] = tuple(
    space for space in (
        getattr(torch._C, "_VariableFunctions", None), getattr(torch._C, "_nn", None),
        getattr(torch._C, "_linalg", None), getattr(torch._C, "_special", None),
        getattr(torch._C, "_fft", None), torch._C.TensorBase,
    ) if space is not None
)
"""Where the generated bindings live: torch functions, ``torch.nn.functional``'s C++ half,
linalg, special, fft and the tensor methods."""

_BUILTIN_KINDS = (type(len), type(torch._C.TensorBase.view))
"""Bindings implemented in C++ (a builtin function, a method descriptor): no Python frame."""


class _Dispatched(TorchDispatchMode):
    """Records the overloads a call dispatched and their arguments (and runs them)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, tuple, dict]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def _same(x: Any, y: Any) -> bool:
    """The same argument: the same tensor object, or equal values of the same type."""
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return x is y
    if isinstance(x, torch._ops.OpOverload) or isinstance(y, torch._ops.OpOverload):
        return x is y
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(_same(a, b) for a, b in zip(x, y))
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    if type(x) is not type(y):
        return False
    if isinstance(x, float) and math.isnan(x):
        return math.isnan(y)
    return bool(x == y)


def mutates_arguments(gm: torch.fx.GraphModule) -> bool:
    """Whether an op of ``gm`` writes an argument other than its ``out=`` buffers."""
    return any(isinstance(n.target, torch._ops.OpOverload) and not _writes_only_out(n.target)
               for n in gm.graph.nodes if n.op == "call_function")


def _writes_only_out(op: torch._ops.OpOverload) -> bool:
    """The overload writes no argument, or only its keyword-only ``out=`` buffers."""
    for arg in op._schema.arguments:
        info = arg.alias_info
        if info is not None and info.is_write and not arg.kwarg_only:
            return False
    return True


def _candidates(op: torch._ops.OpOverload) -> list[Callable[..., Any]]:
    namespace, _, name = op._schema.name.partition("::")
    if namespace != "aten":
        return []
    found = (getattr(space, name, None) for space in _BINDING_SPACES)
    return [f for f in found if isinstance(f, _BUILTIN_KINDS)]


def _bind(op: torch._ops.OpOverload, args: tuple, kwargs: dict) -> tuple[Callable, Any]:
    """The entry point chosen for ``op`` on these arguments and the op's result on them.

    A binding qualifies when it dispatched exactly what the overload's own entry point
    dispatches: that overload, once, with the same arguments (a binding may fill in a default
    that differs from the schema's). A binding is tried with scratch tensors in place of the
    ``out=`` buffers (a wrong overload could resize them), standing for them in the comparison;
    the overload's own run, on the real buffers, gives the result."""
    entry = op._op
    if not _writes_only_out(op):  # trying a binding would apply the write twice
        return entry, entry(*args, **kwargs)
    scratch = {k: torch.empty_like(v) for k, v in kwargs.items()
               if isinstance(v, torch.Tensor) and _is_out(op, k)}
    trial_kwargs = {**kwargs, **scratch}
    stands_for = {id(t): kwargs[k] for k, t in scratch.items()}
    tried = []
    for binding in _candidates(op):
        mode = _Dispatched()
        try:
            with mode:
                binding(*args, **trial_kwargs)
        except Exception:  # noqa: BLE001, S112 - a binding that does not take these arguments
            continue
        calls = [(func, a, {k: stands_for.get(id(v), v) for k, v in kw.items()})
                 for func, a, kw in mode.calls]
        tried.append((binding, calls))
    reference = _Dispatched()
    with reference:
        value = entry(*args, **kwargs)
    expected = reference.calls
    for binding, calls in tried:
        if len(calls) == len(expected) == 1 and calls[0][0] is op and _same(calls, expected):
            return binding, value
    return entry, value


def _is_out(op: torch._ops.OpOverload, name: str) -> bool:
    """Whether ``name`` is a keyword-only argument ``op`` writes (an ``out=`` buffer)."""
    return any(a.name == name and a.kwarg_only and a.alias_info is not None
               and a.alias_info.is_write for a in op._schema.arguments)


class _Chooser(torch.fx.Interpreter):
    """One run of the graph that picks each op's entry point on the arguments it sees."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.chosen: dict[torch.fx.Node, Callable[..., Any]] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            entry, value = _bind(n.target, args, kwargs)
            self.chosen[n] = entry
            return value
        return super().run_node(n)


def _supported(gm: torch.fx.GraphModule) -> bool:
    if type(gm.graph._codegen) is not torch.fx.graph.CodeGen:
        return False  # a pytree or other custom calling convention
    return all(n.op in ("placeholder", "get_attr", "call_function", "output")
               for n in gm.graph.nodes)


class _Source:
    """The generated function's text and the objects it refers to by name."""

    def __init__(self) -> None:
        self.globals: dict[str, Any] = {}
        self.names: dict[torch.fx.Node, str] = {}

    def constant(self, value: Any) -> str:
        name = f"_k{len(self.globals)}"
        self.globals[name] = value
        return name

    def ref(self, a: Any) -> str:
        if isinstance(a, torch.fx.Node):
            return self.names[a]
        if isinstance(a, (list, tuple)):
            inner = ", ".join(self.ref(x) for x in a)
            if isinstance(a, list):
                return f"[{inner}]"
            return f"({inner},)" if len(a) == 1 else f"({inner})"
        if isinstance(a, dict):
            return "{" + ", ".join(f"{self.ref(k)}: {self.ref(v)}" for k, v in a.items()) + "}"
        if a is None or type(a) in (bool, int, str):
            return repr(a)
        if type(a) is float and math.isfinite(a):
            return repr(a)
        return self.constant(a)  # dtypes, devices, non-finite floats, slices, tensors...


def _generate(gm: torch.fx.GraphModule, chosen: dict[torch.fx.Node, Callable[..., Any]]
              ) -> Callable[..., Any]:
    src = _Source()
    nodes = list(gm.graph.nodes)
    last_use: dict[torch.fx.Node, torch.fx.Node] = {}
    for n in nodes:
        for a in n.all_input_nodes:
            last_use[a] = n
    params: list[str] = []
    body: list[str] = []
    for i, n in enumerate(nodes):
        name = src.names[n] = f"v{i}"
        if n.op == "placeholder":
            params.append(name)
            continue
        if n.op == "output":
            body.append(f"return {src.ref(n.args[0])}")
            continue
        if n.op == "get_attr":  # bound at build: a device graph reads the address it recorded
            body.append(f"{name} = {src.constant(_fetch_attr(gm, str(n.target)))}")
        elif n.target is operator.getitem:
            body.append(f"{name} = {src.ref(n.args[0])}[{src.ref(n.args[1])}]")
        else:
            fn = src.constant(chosen.get(n, n.target))
            args = [src.ref(a) for a in n.args]
            args += [f"{k}={src.ref(v)}" for k, v in n.kwargs.items()]
            body.append(f"{name} = {fn}({', '.join(args)})")
        dead = [src.names[a] for a in n.all_input_nodes
                if last_use.get(a) is n and a.op != "placeholder"]
        if dead:
            body.append(" = ".join(dead) + " = None")
    text = f"def replay({', '.join(params)}):\n" + "\n".join(f"    {line}" for line in body)
    code = compile(text, "<hpuopt replay program>", "exec")
    scope = dict(src.globals)
    exec(code, scope)  # noqa: S102 - text generated above from the graph, names only
    return scope["replay"]


def _fetch_attr(gm: torch.fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def replay_program(gm: torch.fx.GraphModule, inputs: Sequence[Any]
                   ) -> Callable[..., Any] | None:
    """``gm`` as a function of its placeholders that calls each op's proven-fastest entry point
    (module docstring), picked on one run over ``inputs`` (the run's side effects are the
    graph's own: the caller restores what the graph mutates). ``None`` when the graph is not
    one this applies to, or the run raised (logged)."""
    if not _supported(gm):
        return None
    chooser = _Chooser(gm)
    try:
        chooser.run(*inputs)
    except Exception:  # the graph's own forward still answers; the warning shows why
        # the capture's probe ran this graph on these inputs: a raise here is unexpected
        log.warning("the replay program's run raised; the graph replays through its forward",
                    exc_info=True)
        return None
    program = _generate(gm, chooser.chosen)
    bound = sum(1 for n, entry in chooser.chosen.items() if entry is not n.target._op)
    log.debug("replay program: %d ops, %d through their bindings", len(chooser.chosen), bound)
    return program
