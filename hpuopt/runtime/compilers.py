"""Piece compilers: what turns a static piece's ATen graph into the callable a runtime captures.

Between the split and the capture, each static piece may be compiled. The runtime then captures
(or, on the CPU runtime, re-runs) the compiled callable on the piece's static buffers exactly as
it would capture the piece's ATen ops: warm-up, static inputs, outputs cloned when they escape.

The compilers (``Config.piece_compiler``)
------------------------------------------
``"eager"``
    The piece's ATen ops as they are (``GraphModule.forward``); nothing is compiled.
``"inductor"``
    TorchInductor (``torch._inductor.compile_fx.compile_fx``) on CPU and CUDA, as vLLM compiles
    each piece of its split graph before it captures it as a CUDA graph. A piece is an ATen
    graph AOTAutograd already produced; ``compile_fx`` traces it once more, as an inference
    graph (under ``no_grad``: the piece's backward, if any, is another piece), so input
    mutations the piece keeps (an in-place optimizer kernel) stay mutations of its inputs.
``"hpu_backend"``
    The Gaudi bridge's compiler, the Dynamo backend it registers in compile mode
    (``habana_frameworks/torch/dynamo/compile_backend/backends.py``, ``hpu_backend``), called
    like Dynamo calls it: ``hpu_backend(graph_module, example_inputs)``.
a callable
    ``(GraphModule, example_inputs) -> callable``, called the same way; the callable returns
    what the graph module returns.
``"auto"``
    The runtime's default (:attr:`~hpuopt.runtime.base.Runtime.default_piece_compiler`).

Per bucket, or once with symbolic shapes
----------------------------------------
A piece with symbolic inputs is captured once per key (an exact shape, or a bucket when its
padding is proved safe). With ``compile_dynamic`` (compilers that take symbolic example inputs:
Inductor) it is compiled *once*, on the fake tensors of its placeholders, with the symbolic
shapes of the ATen graph; every key whose sizes lie in the symbols' ranges shares that callable.
That is sound only if the compile adds no guard to the shape environment, which was final when
Dynamo built its guards: a compile that tries is discarded, and the piece is compiled per key.
A key outside the ranges (a bucket of 1 where Dynamo specialised sizes 0 and 1 away) is
compiled on its own.

Failure
-------
A compile that raises leaves that key to the piece's ATen ops (it is still captured), with the
reason recorded in :attr:`PieceCompilation.fallbacks` and warned once per piece.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import importlib
import logging
import operator
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import sympy
import torch
import torch.fx
from torch.utils._python_dispatch import _disable_current_modes

from hpuopt.config import Config
from hpuopt.diagnostics.counters import counters
from hpuopt.errors import ConfigError
from hpuopt.fx_utils import placeholders
from hpuopt.runtime.base import eager_forward

log = logging.getLogger(__name__)

CompileFn = Callable[[torch.fx.GraphModule, list[Any]], Callable[..., Any]]


@dataclasses.dataclass(frozen=True)
class PieceCompiler:
    """A named compile function. ``compiles`` is False for ``"eager"`` (nothing to compile);
    ``symbolic`` says whether it accepts fake tensors with symbolic shapes as example inputs;
    ``leaves(gm)``, when given, names why a piece is better left to its ATen ops."""

    name: str
    fn: CompileFn | None = None
    symbolic: bool = False
    leaves: Callable[[torch.fx.GraphModule], str | None] | None = None

    @property
    def compiles(self) -> bool:
        return self.fn is not None


EAGER = PieceCompiler("eager")


def _inductor(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
    import torch._inductor.config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    functional_fused_kernels(gm)
    # an inference graph (the piece's own backward is another piece); its inputs are static
    # buffers whose sizes and strides the key fixes, so the per-call size asserts are moot
    with torch.no_grad(), inductor_config.patch(size_asserts=False):
        return compile_fx(gm, example_inputs)


def _fused_kernels(gm: torch.fx.GraphModule) -> list[str]:
    return sorted({
        n.target.overloadpacket.__name__ for n in gm.graph.nodes
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
        and n.target.overloadpacket.__name__.startswith("_fused_")
        and n.target.overloadpacket.__name__.endswith("_")
    })


def _inductor_leaves(gm: torch.fx.GraphModule) -> str | None:
    """Why Inductor should not compile ``gm`` (``None``: it should). A piece around an in-place
    fused optimizer kernel is one kernel already: Inductor can only trace it in its functional
    form (new state lists, copied back), which costs more per step than the kernel alone
    (``benchmarks/piece_compilers.py``, the optimizer rows). A piece threading an effect token
    fails to compile (torch 2.13: ``with_effects`` on a token input)."""
    kernels = _fused_kernels(gm)
    if kernels:
        return f"holds the fused in-place kernel {', '.join(kernels)}: left as is"
    with_effects = getattr(torch.ops.higher_order, "with_effects", None)
    if with_effects is not None and any(n.target is with_effects for n in gm.graph.nodes):
        # an effect token threaded through by AOTAutograd (linalg's error checks): Inductor
        # fails on it when it traces the piece again
        return "threads an effect token (with_effects): left as is"
    return None


INDUCTOR = PieceCompiler("inductor", _inductor, symbolic=True, leaves=_inductor_leaves)


def functional_fused_kernels(gm: torch.fx.GraphModule) -> int:
    """Rewrites each in-place fused optimizer kernel (``_fused_adam_``, ``_fused_adamw_``,
    ``_fused_sgd_``...) of ``gm`` into its functional variant followed by ``_foreach_copy_``
    of the results into the lists it wrote; returns how many it rewrote.

    hpuopt's ``reinplace`` pass leaves these kernels in place, and AOTAutograd cannot trace
    them again (functionalising an in-place kernel over tensor lists fails its internal
    check), while the functional form traces and Inductor makes it in-place again. The
    rewrite is the inverse of what ``reinplace`` did: same kernel, same writes."""
    rewritten = 0
    for node in list(gm.graph.nodes):
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        name = target.overloadpacket.__name__
        if not (name.startswith("_fused_") and name.endswith("_")):
            continue
        packet = getattr(torch.ops.aten, name[:-1], None)
        functional = getattr(packet, target._overloadname, None) if packet is not None else None
        if functional is None:
            continue
        schema = target._schema
        mutable = [
            (i, a.name) for i, a in enumerate(schema.arguments)
            if a.alias_info is not None and a.alias_info.is_write
        ]
        if len(functional._schema.returns) != len(mutable):
            continue
        with gm.graph.inserting_before(node):
            outs = gm.graph.call_function(functional, node.args, node.kwargs)
            for k, (i, arg_name) in enumerate(mutable):
                dst = node.args[i] if i < len(node.args) else node.kwargs.get(arg_name)
                if not dst:  # an empty list (max_exp_avg_sqs without amsgrad)
                    continue
                src = gm.graph.call_function(operator.getitem, (outs, k))
                gm.graph.call_function(torch.ops.aten._foreach_copy_.default, (dst, src))
        if node.users:  # pragma: no cover - the in-place kernels return nothing
            continue
        gm.graph.erase_node(node)
        rewritten += 1
    if rewritten:
        gm.recompile()
    return rewritten

HPU_BACKEND_MODULE = "habana_frameworks.torch.dynamo.compile_backend.backends"
"""Where the bridge defines ``hpu_backend``; ``habana_frameworks.torch.core`` imports the package
in compile mode only (``habana_frameworks/torch/core/__init__.py``: ``if is_lazy(): ... else:
import habana_frameworks.torch.dynamo.compile_backend``)."""


def hpu_backend_compiler() -> PieceCompiler:
    """The bridge's ``hpu_backend``, or a :class:`ConfigError` saying why it is not there."""
    try:
        module = importlib.import_module(HPU_BACKEND_MODULE)
        backend = module.hpu_backend
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            "piece_compiler='hpu_backend' needs the Gaudi bridge's torch.compile backend "
            f"({HPU_BACKEND_MODULE}.hpu_backend), which the bridge provides in compile mode "
            "only (PT_HPU_LAZY_MODE=0)"
        ) from exc

    def compile_hpu(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        functional_fused_kernels(gm)  # hpu_backend traces the piece with AOTAutograd too
        with torch.no_grad():
            return backend(gm, example_inputs)

    return PieceCompiler("hpu_backend", compile_hpu)


def select_piece_compiler(config: Config, runtime: Any) -> PieceCompiler:
    """The compiler ``config.piece_compiler`` names, ``"auto"`` resolved by ``runtime``."""
    spec = config.piece_compiler
    if callable(spec):
        name = getattr(spec, "__name__", type(spec).__name__)
        return PieceCompiler(f"callable {name}", spec)
    if spec == "auto":
        spec = getattr(runtime, "default_piece_compiler", "eager")
    if spec == "eager":
        return EAGER
    if spec == "inductor":
        return INDUCTOR
    if spec == "hpu_backend":
        return hpu_backend_compiler()
    raise ConfigError(f"no piece compiler {spec!r}")  # pragma: no cover - Config checks it


def listed(fn: Callable[..., Any], single_output: bool) -> Callable[..., list[Any]]:
    """``fn`` returning a list of outputs, as a runtime captures it."""
    if single_output:
        return lambda *a: [fn(*a)]
    return lambda *a: list(fn(*a))


class PieceCompilation:
    """One piece's compiled callables: per key, or one shared by every key (module docstring).

    What explain may show: :attr:`compiler` (its name), :attr:`compiles`,
    :attr:`compile_seconds`, :attr:`dynamic` (``True``: a symbolic compile serves keys;
    ``False``: per key; ``None``: not tried), :attr:`dynamic_reason` (why not),
    :attr:`left_as_is` (why the compiler leaves the whole piece to its ATen ops) and
    :attr:`fallbacks` (keys left to the ATen ops because their compile failed, and why).
    """

    def __init__(self, name: str, gm: torch.fx.GraphModule, single_output: bool,
                 compiler: PieceCompiler, config: Config) -> None:
        self.name = name
        self.gm = gm
        self.single_output = single_output
        self.compiler = compiler.name
        self._compiler = compiler
        self.eager = listed(eager_forward(gm), single_output)
        self.eager.hpuopt_graph = gm  # type: ignore[attr-defined]  # a runtime may rewrite it
        self.compiles = 0
        self.compile_seconds = 0.0
        self.fallbacks: dict[tuple, str] = {}
        self.dynamic: bool | None = None
        self.dynamic_reason = ""
        self.left_as_is = compiler.leaves(gm) if compiler.leaves is not None else None
        """Why the compiler leaves this piece to its ATen ops (``None``: it compiles it)."""
        if self.left_as_is is not None:
            log.info("%s: not compiled: %s", name, self.left_as_is)
            compiler = EAGER
            self._compiler = compiler
        self._by_key: collections.OrderedDict[tuple, Callable[..., list[Any]]] = (
            collections.OrderedDict()
        )
        self._keep = max(2 * config.max_graphs, 8)  # compiled callables kept past eviction
        self._shared: Callable[..., list[Any]] | None = None
        self._symbols = _Symbols.of(gm) if config.compile_dynamic and compiler.symbolic else None
        if not compiler.compiles:
            self._symbols = None
            self.dynamic_reason = "nothing is compiled"
        elif self._symbols is None:
            self.dynamic_reason = (
                "compile_dynamic is off" if not config.compile_dynamic
                else f"{compiler.name} compiles concrete shapes only"
            )
        elif not self._symbols.free:
            self._symbols = None
            self.dynamic_reason = "static shapes"

    def forward_for(self, key: tuple, static: Sequence[Any]) -> Callable[..., list[Any]]:
        """The callable to capture for ``key`` on the static inputs ``static`` (compiled now
        on a miss)."""
        if not self._compiler.compiles:
            return self.eager
        # a compiled callable assumes the layouts it was compiled for (Inductor's size checks
        # are off: see _inductor), and a recapture may hand it other tensors of the same key
        held = (key, _layouts(static))
        fn = self._by_key.get(held)
        if fn is not None:
            self._by_key.move_to_end(held)
            return fn
        fn = self._shared_for(static) if self._symbols is not None else None
        if fn is None:
            fn = self._compile(key, list(static))
        self._by_key[held] = fn
        while len(self._by_key) > self._keep:
            self._by_key.popitem(last=False)
        return fn

    # -- the two ways ---------------------------------------------------------------------------

    def _shared_for(self, static: Sequence[Any]) -> Callable[..., list[Any]] | None:
        """The symbolic compile when ``static`` fits its shapes; ``None`` when this key must be
        compiled on its own (or the symbolic compile proved unsound)."""
        symbols = self._symbols
        assert symbols is not None
        why = symbols.misfit(static)
        if why is not None:
            log.debug("%s: compiled per key: %s", self.name, why)
            return None
        if self._shared is None and self.dynamic is None:
            self._shared = self._compile_symbolic(symbols)
        return self._shared

    def _compile_symbolic(self, symbols: _Symbols) -> Callable[..., list[Any]] | None:
        shape_env = symbols.shape_env
        before = _guard_state(shape_env)
        try:
            fn = self._timed(symbols.example_inputs)
        except Exception as exc:  # noqa: BLE001 - compiled per key instead
            self.dynamic, self.dynamic_reason = False, f"{type(exc).__name__}: {exc}"
            log.info("%s: no symbolic compile (%s); compiling per key", self.name, exc)
            return None
        after = _guard_state(shape_env)
        if after != before:  # the compile specialised a size Dynamo's guards do not check
            self.dynamic = False
            self.dynamic_reason = "the symbolic compile added guards on sizes"
            log.info("%s: %s; compiling per key", self.name, self.dynamic_reason)
            return None
        self.dynamic = True
        return fn

    def _compile(self, key: tuple, static: list[Any]) -> Callable[..., list[Any]]:
        try:
            return self._timed(static)
        except Exception as exc:  # noqa: BLE001 - this key runs the ATen ops, recorded
            reason = f"{self.compiler} failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
            self.fallbacks[key] = reason
            counters.compile_fallbacks += 1
            if len(self.fallbacks) == 1:
                warnings.warn(f"hpuopt: {self.name} runs its ATen ops uncompiled: {reason}",
                              stacklevel=4)
            log.info("%s: key %s runs uncompiled: %s", self.name, key, reason)
            return self.eager

    def _timed(self, example_inputs: list[Any]) -> Callable[..., list[Any]]:
        fn = self._compiler.fn
        assert fn is not None
        gm = _tuple_returning_copy(self.gm)  # compilers rewrite graphs; Dynamo's return tuples
        start = time.perf_counter()
        # The first call of an AOTAutograd graph runs under a checking dispatch mode of its
        # own, and this compile happens during that call: compile with no mode active.
        with _disable_current_modes():
            compiled = fn(gm, example_inputs)
        seconds = time.perf_counter() - start
        self.compiles += 1
        self.compile_seconds += seconds
        counters.piece_compiles += 1
        counters.compile_seconds += seconds
        log.info("%s: compiled with %s in %.2fs", self.name, self.compiler, seconds)
        return listed(compiled, single_output=False)


def _layouts(values: Sequence[Any]) -> tuple:
    """Shapes, strides and dtypes of the tensors among ``values`` (``None`` for the rest)."""
    return tuple((v.shape, v.stride(), v.dtype) if isinstance(v, torch.Tensor) else None
                 for v in values)


def _tuple_returning_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` (sharing its node metadata) whose output is a tuple, the form Dynamo
    hands a backend (AOTAutograd requires it)."""
    graph = copy.deepcopy(gm.graph)
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    result = out.args[0]
    if not isinstance(result, (tuple, list)):
        out.args = ((result,),)
    elif isinstance(result, list):
        out.args = (tuple(result),)
    return torch.fx.GraphModule(gm, graph)


@dataclasses.dataclass
class _Symbols:
    """The symbolic sizes of a piece's inputs, from its placeholders' fake values."""

    example_inputs: list[Any]
    shape_env: Any
    free: frozenset[Any]

    @classmethod
    def of(cls, gm: torch.fx.GraphModule) -> _Symbols | None:
        vals = [p.meta.get("val") for p in placeholders(gm)]
        shape_env = None
        free: set[Any] = set()
        for v in vals:
            if isinstance(v, torch.Tensor):
                mode = getattr(v, "fake_mode", None)
                env = getattr(mode, "shape_env", None)
                if env is None:
                    return None
                shape_env = shape_env or env
                for s in (*v.shape, *v.stride(), v.storage_offset()):
                    free |= _free(s)
            elif isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
                free |= _free(v)
            elif not isinstance(v, (int, float, bool)):
                return None  # an input the fake values do not describe
        if shape_env is None:
            return None
        return cls(vals, shape_env, frozenset(free))

    def misfit(self, static: Sequence[Any]) -> str | None:
        """Why the symbolic compile cannot take ``static`` (``None``: it can): a size no
        placeholder's symbol binds, a value outside its symbol's range, a shape the bound
        symbols do not reproduce, or a guard the values break."""
        binding: dict[Any, int] = {}
        pairs = []
        for val, real in zip(self.example_inputs, static):
            if isinstance(val, torch.Tensor):
                if not isinstance(real, torch.Tensor):
                    return "an argument is not a tensor"
                pairs += zip((*val.shape, *val.stride()), (*real.shape, *real.stride()))
            elif isinstance(val, torch.SymInt):
                pairs.append((val, real))
        for sym, real in pairs:
            expr = _expr(sym)
            if (expr is not None and expr.is_Symbol
                    and binding.setdefault(expr, int(real)) != int(real)):
                return f"{expr} would be both {binding[expr]} and {real}"
        if set(binding) != set(self.free):
            return "a symbolic size is not an input's size"
        for sym, real in pairs:
            expr = _expr(sym)
            if expr is None:
                if int(sym) != int(real):
                    return f"static size {sym} is {real}"
            elif int(expr.xreplace(binding)) != int(real):
                return f"{expr} is {real}"
        ranges = self.shape_env.var_to_range
        for sym, value in binding.items():
            vr = ranges.get(sym)
            if vr is not None and not (vr.lower <= value <= vr.upper):
                return f"{sym}={value} is outside {vr}"
        for guard in self.shape_env.guards:
            if guard.expr.xreplace(binding) == sympy.false:
                return f"the sizes break the guard {guard.expr}"
        return None


def _guard_state(shape_env: Any) -> tuple[int, int]:
    """The guards a shape environment holds and those it ignored because it was frozen."""
    ignored = getattr(shape_env, "counter", {}).get("ignored_backward_guard", 0)
    return len(shape_env.guards), ignored


def _expr(s: Any) -> Any:
    """The sympy expression of a symbolic size; ``None`` for a plain int."""
    node = getattr(s, "node", None)
    return getattr(node, "expr", None) if node is not None else None


def _free(s: Any) -> set[Any]:
    expr = _expr(s)
    return set(expr.free_symbols) if expr is not None else set()
