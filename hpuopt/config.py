"""The one typed, frozen configuration of hpuopt.

A :class:`Config` is built once per compilation by :meth:`Config.from_options`, from the
``options={...}`` given to ``torch.compile`` (or the keyword arguments of :func:`hpuopt.compile`)
layered over ``HPUOPT_*`` environment variables. This module is the only place that reads the
environment; passes and runtimes receive the frozen object and never look anywhere else.

Every field is documented below; ``docs/user_guide.md`` lists them and a test checks the two agree.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal

from hpuopt.errors import ConfigError

ENV_PREFIX = "HPUOPT_"
DIM_NAMES = {"batch": 0, "seq": 1}
"""Names ``dim_buckets`` accepts for input dims, beside positions."""

RuntimeName = Literal["auto", "cpu", "cuda", "hpu", "direct"]

PIECE_COMPILERS = ("auto", "eager", "inductor", "hpu_backend")
"""The compilers ``piece_compiler`` names; a callable is the fifth kind."""

PieceCompilerSpec = str | Callable[..., Any]

HPU_MODES = ("auto", "compile", "lazy")

BRIDGE_MODE_VARIABLE = "PT_HPU_LAZY_MODE"
"""The Gaudi bridge's execution mode: ``1`` lazy, ``0`` eager with ``torch.compile`` (the
default of recent bridges: ``habana_frameworks/torch/utils/internal.py``, ``is_lazy``)."""

BRIDGE_TENSOR_CACHE_VARIABLE = "PT_HPUGRAPH_DISABLE_TENSOR_CACHE"
"""Overrides ``disable_tensor_cache`` of the bridge's own HPU Graph wrappers when set
(``habana_frameworks/torch/hpu/graphs.py``, ``wrapped_hpugraph_forward``)."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Options of the ``hpugraph`` backend.

    Attributes:
        runtime: Which runtime captures the static pieces: ``"auto"`` picks it from the device of
            the graph's tensors (``cuda`` → CUDA Graphs, ``hpu`` → HPU Graphs, otherwise the CPU
            runtime, which emulates device-graph semantics). ``"direct"`` captures nothing on
            any device: each static piece, compiled per key by ``piece_compiler`` (Inductor
            under ``"auto"``), is called on the caller's tensors (:mod:`hpuopt.runtime.direct`);
            the split, keys and padding stay. On the CPU it is the fast choice.
        capture: Capture static pieces at all. ``False`` runs every piece as is (useful to
            bisect a wrong result to capture versus splitting).
        max_graphs: Captured graphs kept per piece (least recently used are evicted).
        max_graph_bytes: Bytes of captured graphs (their static buffers and, on devices that
            report it, their pool allocations) kept per piece; least recently used graphs are
            evicted past it, so their memory goes back. 0 means no bound.
        warmup_runs: Eager runs of a piece before it is captured (lazy initialisation, autotuning
            and allocator warm-up happen outside the graph).
        padding: Pad dynamic dimensions up to a bucket where the padding analysis proves the
            real part of every output unchanged; elsewhere pieces are captured per exact shape.
        bucket_sizes: The buckets to pad to, ascending; empty means powers of two up to
            ``max_bucket``.
        max_bucket: The largest power-of-two bucket when ``bucket_sizes`` is empty.
        dim_buckets: Buckets for one input dim, overriding the two above there: entries
            ``"<dim>:<sizes>"`` where ``<dim>`` is a dim position (``0``, ``1``...) or ``batch``
            (dim 0) or ``seq`` (dim 1), and ``<sizes>`` is an ascending list ``16,32,64`` or
            ``max=<n>`` (powers of two up to n). As an option, a mapping also works:
            ``{"seq": [16, 32, 64], "batch": {"max": 8}}``; as ``HPUOPT_DIM_BUCKETS``, entries
            separated by ``;``.
        above_largest: A size above the largest bucket is captured at its exact shape
            (``"exact"``) or runs uncaptured (``"uncaptured"``).
        max_pad_waste: Pad a dim only while its padded share stays at or below this fraction
            (0.5: never more than double the real size). Over an input padded along ``k`` dims
            the pad is then at most ``1 - (1 - max_pad_waste) ** k`` of its elements.
        strict: Raise :class:`hpuopt.errors.FallbackError` instead of running a piece uncaptured.
        clone_outputs: Clone captured outputs that escape to the caller so a later replay cannot
            change them. ``False`` returns the graph's own memory (faster; a later replay
            overwrites it): an output still referenced when that happens is counted
            (``counters.stale_outputs``) and warned about once, and on CUDA a later read of it
            raises an error naming the piece.
        check_capture: While capturing on the CPU runtime, reject ops a device graph cannot hold
            (host reads, data-dependent shapes), so such bugs show up without a device.
        dynamic_ops: Extra op names to treat as dynamic (split out, never captured), e.g.
            ``"aten.nonzero"`` or ``"mylib::my_op"``; an overload (``"aten.add.Tensor"``) or a
            packet (``"aten.add"``) both work.
        disable_passes: Names of passes to skip (see :func:`hpuopt.pipeline.registry`).
        pipelining_fwd_bwd: Gaudi lazy mode: also mark a step at the end of the forward graph,
            so the device starts the forward while the host builds the backward.
        debug: Lint the graph and check hpuopt's invariants after every pass.
        dump_dir: Directory to write each graph's code before and after every pass; ``None``
            writes nothing.
        piece_compiler: What compiles each static piece before the runtime captures it:
            ``"eager"`` (the piece's ATen ops as they are), ``"inductor"`` (TorchInductor; CPU
            and CUDA), ``"hpu_backend"`` (the Gaudi bridge's compiler), a callable
            ``(GraphModule, example_inputs) -> callable``, or ``"auto"``: the runtime's default
            (``docs/piece_compilers.md`` gives each and the measurements behind it).
        compile_dynamic: Compile a piece with symbolic shapes once, where that is sound, and use
            it for every bucket; otherwise (and for sizes outside the symbols' ranges) each
            bucket or exact shape is compiled on its own.
        past_max_graphs: What a new signature of a piece that already holds ``max_graphs``
            graphs gets: ``"evict"`` the least recently used graph, or ``"uncaptured"``: it
            runs as is, like the Gaudi bridge's ``max_graphs``.
        hpu_mode: The Gaudi bridge's execution mode the HPU runtime follows: ``"compile"``
            (eager mode with ``torch.compile``), ``"lazy"`` (HPU Graphs and ``mark_step``), or
            ``"auto"``: read from ``PT_HPU_LAZY_MODE`` when the config is built (``0``: compile,
            ``1``: lazy; unset: it stays ``"auto"``, which means compile, the default of recent
            bridges). Another value of the variable is kept as ``"PT_HPU_LAZY_MODE=<value>"``,
            which the HPU runtime refuses with an error.
        hpu_disable_tensor_cache: Lazy mode: capture HPU Graphs with the bridge's
            ``disable_tensor_cache`` (inputs marked as user inputs, replays through
            ``replayV3``; implies ``hpu_dry_run``). ``PT_HPUGRAPH_DISABLE_TENSOR_CACHE``
            overrides it when set, as it does for the bridge's own wrappers.
        hpu_dry_run: Lazy mode: capture HPU Graphs with the bridge's ``dry_run`` (the capture
            does not launch the work; the first replay does).
    """

    runtime: RuntimeName = "auto"
    capture: bool = True
    max_graphs: int = 64
    max_graph_bytes: int = 0
    warmup_runs: int = 1
    padding: bool = True
    bucket_sizes: tuple[int, ...] = ()
    max_bucket: int = 4096
    dim_buckets: tuple[str, ...] = ()
    above_largest: Literal["exact", "uncaptured"] = "exact"
    max_pad_waste: float = 0.5
    strict: bool = False
    clone_outputs: bool = True
    check_capture: bool = True
    dynamic_ops: tuple[str, ...] = ()
    disable_passes: tuple[str, ...] = ()
    pipelining_fwd_bwd: bool = False
    debug: bool = False
    dump_dir: str | None = None
    piece_compiler: PieceCompilerSpec = "auto"
    compile_dynamic: bool = True
    past_max_graphs: Literal["evict", "uncaptured"] = "evict"
    hpu_mode: str = "auto"
    hpu_disable_tensor_cache: bool = False
    hpu_dry_run: bool = False

    def __post_init__(self) -> None:
        if self.runtime not in typing.get_args(RuntimeName):
            raise ConfigError(
                f"runtime={self.runtime!r} is not one of {list(typing.get_args(RuntimeName))}"
            )
        if self.max_graphs < 1:
            raise ConfigError(f"max_graphs must be at least 1, got {self.max_graphs}")
        if self.max_graph_bytes < 0:
            raise ConfigError(f"max_graph_bytes must be at least 0, got {self.max_graph_bytes}")
        if self.warmup_runs < 0:
            raise ConfigError(f"warmup_runs must be at least 0, got {self.warmup_runs}")
        if list(self.bucket_sizes) != sorted(set(self.bucket_sizes)) or any(
            b < 1 for b in self.bucket_sizes
        ):
            raise ConfigError(
                f"bucket_sizes must be positive and strictly ascending, got {self.bucket_sizes}"
            )
        if self.max_bucket < 1:
            raise ConfigError(f"max_bucket must be at least 1, got {self.max_bucket}")
        self.dim_bucket_rules()  # raises on a malformed entry
        if self.above_largest not in ("exact", "uncaptured"):
            raise ConfigError(
                f"above_largest={self.above_largest!r} is not one of ['exact', 'uncaptured']"
            )
        if not 0.0 <= self.max_pad_waste < 1.0:
            raise ConfigError(f"max_pad_waste must be in [0, 1), got {self.max_pad_waste}")
        if not callable(self.piece_compiler) and self.piece_compiler not in PIECE_COMPILERS:
            raise ConfigError(
                f"piece_compiler={self.piece_compiler!r} is not one of {list(PIECE_COMPILERS)} "
                "or a callable (GraphModule, example_inputs) -> callable"
            )
        if self.past_max_graphs not in ("evict", "uncaptured"):
            raise ConfigError(
                f"past_max_graphs={self.past_max_graphs!r} is not one of ['evict', 'uncaptured']"
            )
        if self.hpu_mode not in HPU_MODES and not self.hpu_mode.startswith(
            BRIDGE_MODE_VARIABLE + "="
        ):
            raise ConfigError(f"hpu_mode={self.hpu_mode!r} is not one of {list(HPU_MODES)}")

    @property
    def hpu_execution_mode(self) -> str:
        """``"compile"`` or ``"lazy"``, or what the bridge's variable held when it named neither
        (``"PT_HPU_LAZY_MODE=<value>"``). ``"auto"`` (the variable was unset) follows the
        default of recent bridges: compile."""
        return "compile" if self.hpu_mode == "auto" else self.hpu_mode
    # -- construction ---------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_options(
        cls,
        options: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Config:
        """Builds the config: defaults, then ``HPUOPT_*`` variables, then ``options``.

        An unknown option or variable is a :class:`ConfigError` that lists the valid names.
        """
        environ = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        valid = cls.field_names()
        values: dict[str, Any] = {}
        for key, raw in environ.items():
            if not key.startswith(ENV_PREFIX):
                continue
            name = key[len(ENV_PREFIX) :].lower()
            if name not in valid:
                raise ConfigError(
                    f"unknown environment variable {key}; valid ones are "
                    + ", ".join(ENV_PREFIX + n.upper() for n in valid)
                )
            values[name] = _parse_env(key, raw, hints[name])
        for name, value in (options or {}).items():
            if name not in valid:
                raise ConfigError(
                    f"unknown hpugraph option {name!r}; valid options are {', '.join(valid)}"
                )
            values[name] = _coerce(name, value, hints[name])
        raw_mode = environ.get(BRIDGE_MODE_VARIABLE)
        if values.get("hpu_mode", "auto") == "auto" and raw_mode is not None:
            values["hpu_mode"] = bridge_mode(raw_mode)
        tensor_cache = environ.get(BRIDGE_TENSOR_CACHE_VARIABLE)
        if tensor_cache is not None:  # the bridge lets its variable override the argument
            values["hpu_disable_tensor_cache"] = tensor_cache == "1"
        return cls(**values)

    def dim_bucket_rules(self) -> dict[int, tuple[tuple[int, ...], int]]:
        """``dim_buckets`` parsed: dim -> (ascending sizes or ``()``, largest power of two)."""
        rules: dict[int, tuple[tuple[int, ...], int]] = {}
        for entry in self.dim_buckets:
            key, sep, spec = entry.partition(":")
            key, spec = key.strip().lower(), spec.strip()
            dim = DIM_NAMES.get(key, int(key) if key.isdigit() else None)
            if not sep or dim is None or not spec:
                raise ConfigError(
                    f"dim_buckets entry {entry!r} is not '<dim>:<sizes>' with <dim> a position "
                    f"or one of {sorted(DIM_NAMES)} and <sizes> '16,32,64' or 'max=<n>'"
                )
            if spec.startswith("max="):
                try:
                    top = int(spec[4:])
                except ValueError:
                    top = 0
                if top < 1:
                    raise ConfigError(f"dim_buckets entry {entry!r}: max must be an int >= 1")
                rules[dim] = ((), top)
                continue
            try:
                sizes = tuple(int(x) for x in spec.split(","))
            except ValueError:
                raise ConfigError(f"dim_buckets entry {entry!r}: sizes must be integers") from None
            if list(sizes) != sorted(set(sizes)) or sizes[0] < 1:
                raise ConfigError(
                    f"dim_buckets entry {entry!r}: sizes must be positive and strictly ascending")
            rules[dim] = (sizes, sizes[-1])
        return rules

    def replace(self, **changes: Any) -> Config:
        return Config.from_options({**dataclasses.asdict(self), **changes}, environ={})

    def pass_enabled(self, name: str) -> bool:
        return name not in self.disable_passes


def bridge_mode(raw: str | None) -> str:
    """The ``hpu_mode`` the bridge's ``PT_HPU_LAZY_MODE`` names: unset or ``0``: compile (the
    default of recent bridges), ``1``: lazy; anything else is kept for the runtime's error."""
    text = "0" if raw is None else raw.strip()
    if text in ("", "0"):
        return "compile"
    if text == "1":
        return "lazy"
    return f"{BRIDGE_MODE_VARIABLE}={text}"


def _dim_bucket_entries(value: Any) -> Any:
    """``{"seq": [16, 32], "batch": {"max": 8}}`` as ``dim_buckets`` entries; else ``value``."""
    if not isinstance(value, Mapping):
        return value
    entries = []
    for dim, spec in value.items():
        if isinstance(spec, Mapping) and set(spec) == {"max"}:
            entries.append(f"{dim}:max={spec['max']}")
        elif isinstance(spec, (list, tuple)):
            entries.append(f"{dim}:" + ",".join(str(x) for x in spec))
        else:
            raise ConfigError(f"dim_buckets[{dim!r}] must be a list of sizes or {{'max': n}}, "
                              f"got {spec!r}")
    return entries


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Checks an ``options=`` value against the field's type; accepts a list for a tuple."""
    if hint is PieceCompilerSpec and callable(value):
        return value
    if name == "dim_buckets":
        value = _dim_bucket_entries(value)
    origin = typing.get_origin(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"option {name!r} must be a bool, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"option {name!r} must be an int, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"option {name!r} must be a number, got {value!r}")
        return float(value)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        kind = "strings" if item is str else "integers"
        if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)):
            raise ConfigError(f"option {name!r} must be a list of {kind}, got {value!r}")
        items = tuple(value)
        if not all(isinstance(v, item) and not isinstance(v, bool) for v in items):
            raise ConfigError(f"option {name!r} must hold {kind} only, got {value!r}")
        return items
    # str, Optional[str] and Literal fields
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"option {name!r} must be a string, got {value!r}")
    return value


def _parse_env(key: str, raw: str, hint: Any) -> Any:
    text = raw.strip()
    if hint is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{key}={raw!r} is not a boolean (use 1/0, true/false)")
    if hint in (int, float):
        try:
            return hint(text)
        except ValueError:
            raise ConfigError(f"{key}={raw!r} is not a{'n integer' if hint is int else ' number'}") from None
    if key == ENV_PREFIX + "DIM_BUCKETS":
        return tuple(part.strip() for part in text.split(";") if part.strip())
    if typing.get_origin(hint) is tuple:
        parts = [part.strip() for part in text.split(",") if part.strip()]
        if typing.get_args(hint)[0] is int:
            try:
                return tuple(int(p) for p in parts)
            except ValueError:
                raise ConfigError(f"{key}={raw!r} is not a comma-separated list of integers") from None
        return tuple(parts)
    return text or None
