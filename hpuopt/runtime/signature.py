"""The signature of a piece: which arguments are copied, read in place or keyed, and the keys.

What is in a key
----------------
A device graph replays fixed work on fixed buffers: every shape, stride and Python scalar it was
captured with is baked in. The signature only holds what can vary: Dynamo's guards already pin
the dtype, device and (for non-dynamic dimensions) the shape and strides of the graph's inputs,
and every value computed inside the graph is a pure function of those. What can vary is exactly
what ``node.meta["val"]`` shows as symbolic: SymInt arguments (dynamic sizes, data-dependent
sizes) and tensors whose sizes or strides hold symbols. :func:`arg_roles` decides this once per
piece from the placeholders' metadata; the per-call key is then a tuple over those arguments
only, and a fully static piece has the empty key — one dictionary lookup per call.

Copied or read in place
-----------------------
Activations are copied into static buffers each call. Parameters and buffers of the module are
*stable*: the graph reads them in place, and their address is checked every call. The first
call's arguments refine that split (:meth:`ArgRoles.adopt`), and the address policy may move
arguments between the two later (:meth:`ArgRoles.with_split`).

Key strategies
--------------
Each call picks how it is signed: :data:`EXACT_KEYS` keys by the real shapes; a
:class:`BucketKeys` (pieces with a padder, when every padded size has a bucket) keys by the
*bucket* of each padded size instead of the size. A call of a padded piece that cannot be padded
(a non-contiguous input, tied sizes in different buckets) is signed with :data:`EXACT_KEYS`,
explicitly, by :func:`call_keys`. Both strategies have one interface: ``key``, and the three
steps where a padded call differs — its static buffers at capture (``prepare``), its copy-in
(``load``) and its outputs (``outputs``) — routed to the entry or to the padder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import free_symbols

from hpuopt.fx_utils import graph_device, mutated_inputs, placeholders, returns_view
from hpuopt.records import PadSource
from hpuopt.runtime.padder import ABOVE_LARGEST, Padder, slice_outputs

if TYPE_CHECKING:
    from hpuopt.runtime.entry import Entry


@dataclasses.dataclass(frozen=True)
class ArgRoles:
    """How a piece treats its positional arguments, decided once from graph metadata."""

    tensor: tuple[int, ...]
    """Indices of tensor arguments."""
    copied: tuple[int, ...]
    """Tensor arguments copied into static buffers each call."""
    stable: tuple[int, ...]
    """Tensor arguments read in place (parameters, buffers); their address is checked."""
    keyed: tuple[int, ...]
    """Arguments whose shape, strides or value can vary: they form the cache key."""
    mutated: tuple[int, ...]
    """Arguments the piece writes to."""
    mutated_copied: tuple[int, ...] = ()
    """Mutated arguments that have a static copy: written back to the caller after a run."""
    unsupported: str | None = None
    """Why this piece cannot be captured at all (an argument a signature cannot describe)."""
    full_storage: tuple[int, ...] = ()
    """Arguments the piece reads through ``as_strided`` (possibly beyond the view's own
    elements): their whole storage is copied, and its size is part of the key."""
    host: tuple[int, ...] = ()
    """CPU tensor arguments of a piece that runs on an accelerator. A device kernel reads a CPU
    operand by value at launch, so a graph reading one in place would replay its capture-time
    value forever: these are always copied, into buffers on :attr:`device`, and never read in
    place."""
    device: str | None = None
    """The accelerator the piece runs on, from its metadata (``None`` for a CPU piece)."""

    def adopt(self, args: Sequence[Any]) -> ArgRoles:
        """These roles refined with the first call's arguments (``self`` when nothing changes).

        Arguments that are ``nn.Parameter`` objects become stable: a backward graph receives
        the parameters its forward saved, which AOTAutograd does not mark static there, and
        copying every weight into a static buffer each step is waste (their addresses are
        checked per call like any stable input). Arguments the metadata calls tensors that
        arrive as something else (AOTAutograd's effect tokens arrive as ``None``) join the key.
        """
        params = {
            i for i in self.copied
            if isinstance(args[i], torch.nn.Parameter) and i not in self.host
        }
        not_tensors = {i for i in self.tensor if not isinstance(args[i], torch.Tensor)}
        if not (params or not_tensors):
            return self
        dropped = params | not_tensors
        return dataclasses.replace(
            self,
            tensor=tuple(i for i in self.tensor if i not in not_tensors),
            copied=tuple(i for i in self.copied if i not in dropped),
            stable=tuple(sorted((set(self.stable) | params) - not_tensors)),
            mutated=tuple(i for i in self.mutated if i not in not_tensors),
            mutated_copied=tuple(i for i in self.mutated_copied if i not in dropped),
            keyed=tuple(sorted(set(self.keyed) | not_tensors)),
            full_storage=tuple(i for i in self.full_storage if i not in not_tensors),
        )

    def with_split(self, stable: Collection[int], copied: Collection[int]) -> ArgRoles:
        """These roles, reading ``stable`` in place and copying ``copied`` (their union must be
        the tensor arguments these roles cover now); the mutated copies follow."""
        host = set(self.host)
        copied = set(copied) | (host & set(stable))
        return dataclasses.replace(
            self,
            stable=tuple(sorted(set(stable) - host)),
            copied=tuple(sorted(copied)),
            mutated_copied=tuple(i for i in self.mutated if i in copied),
        )


def arg_roles(gm: torch.fx.GraphModule, stable: Sequence[bool]) -> ArgRoles:
    """The roles of ``gm``'s arguments, from its placeholders' metadata; ``stable[i]`` says
    whether argument ``i`` is a parameter or buffer (read in place)."""
    mutated = mutated_inputs(gm)
    device = graph_device(gm)
    tensor, copied, stable_idx, keyed, host = [], [], [], [], []
    unsupported = None
    for i, node in enumerate(placeholders(gm)):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            tensor.append(i)
            on_host = device is not None and val.device.type == "cpu"
            if on_host:
                host.append(i)
            (stable_idx if stable[i] and not on_host else copied).append(i)
            if _symbolic_tensor(val):
                keyed.append(i)
        elif isinstance(val, (list, tuple, dict)):
            unsupported = f"argument {node.name} is a container ({type(val).__name__})"
        elif val is None or isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            keyed.append(i)  # unknown or symbolic: let its runtime value into the key
    full = tuple(sorted(_as_strided_inputs(gm) & set(copied)))
    keyed.extend(i for i in full if i not in keyed)
    return ArgRoles(
        full_storage=full,
        tensor=tuple(tensor),
        copied=tuple(copied),
        stable=tuple(stable_idx),
        keyed=tuple(keyed),
        mutated=tuple(sorted(mutated)),
        mutated_copied=tuple(sorted(mutated & set(copied))),
        unsupported=unsupported,
        host=tuple(host),
        device=str(device) if device is not None else None,
    )


def _symbolic_tensor(val: torch.Tensor) -> bool:
    try:
        return bool(free_symbols(val))
    except (TypeError, AttributeError):  # metadata without a shape env
        return True


def _as_strided_inputs(gm: torch.fx.GraphModule) -> set[int]:
    """Placeholders that reach an ``as_strided`` through views."""
    base_of = {n: i for i, n in enumerate(placeholders(gm))}
    out: set[int] = set()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        packet = getattr(node.target, "overloadpacket", None)
        src = node.args[0] if node.args else None
        if not isinstance(src, torch.fx.Node) or src not in base_of:
            continue
        if packet in (torch.ops.aten.as_strided, torch.ops.aten.as_strided_):
            out.add(base_of[src])
        if returns_view(node):
            base_of[node] = base_of[src]
    return out


def key_part(a: Any) -> Any:
    """What argument ``a`` puts in an exact key: a tensor's shape and strides, else ``a``."""
    if isinstance(a, torch.Tensor):
        return (a.shape, a.stride())
    return a


def storage_key(t: torch.Tensor) -> tuple[int, int]:
    """What a full-storage argument adds to an exact key: its storage's size and its offset."""
    return (t.untyped_storage().nbytes(), t.storage_offset())


def describe_key(key: tuple) -> str:
    """A key as explain shows it: ``(4x8, pad 16x8, size 16)``, or ``(static)``."""
    parts = []
    for part in key:
        if isinstance(part, tuple) and len(part) == 2 and isinstance(part[0], torch.Size):
            parts.append("x".join(map(str, part[0])) or "scalar")
        elif isinstance(part, tuple) and len(part) == 2 and part[0] == "pad":
            parts.append("pad " + ("x".join(map(str, part[1])) or "scalar"))
        elif isinstance(part, tuple) and len(part) == 2 and part[0] == "size":
            parts.append(f"size {part[1]}")
        else:
            parts.append(repr(part))
    return "(" + ", ".join(parts) + ")" if parts else "(static)"


# -- key strategies ------------------------------------------------------------------------------

Sizes = dict[PadSource, tuple[int, int]]
"""One call's padded sizes: ``{source: (real, bucket)}``."""


class ExactKeys:
    """Signs a call by its arguments' real shapes; the entry copies and hands out as is."""

    def key(self, roles: ArgRoles, args: Sequence[Any]) -> tuple:
        key = tuple(key_part(args[i]) for i in roles.keyed) if roles.keyed else ()
        if roles.full_storage:
            key += tuple(storage_key(args[i]) for i in roles.full_storage)
        return key

    def prepare(self, static: list[Any], args: Sequence[Any]) -> None:
        """Static buffers of a capture: the exact-shape copies the entry made stand."""

    def load(self, entry: Entry, args: Sequence[Any]) -> None:
        entry.copy_in(args)

    def outputs(self, entry: Entry, args: Sequence[Any]) -> tuple[list[Any], Sequence[int]]:
        """The outputs to hand out and the indices of those to clone or lend."""
        return entry.exact_outputs(args)


EXACT_KEYS = ExactKeys()
"""The strategy of every call of a piece that pads nothing, and of a call that cannot be padded."""


class BucketKeys:
    """Signs a call by the bucket of each padded size; the padder prepares, loads and slices.

    Made per call: it carries that call's ``sizes``.
    """

    __slots__ = ("padder", "sizes")

    def __init__(self, padder: Padder, sizes: Sizes) -> None:
        self.padder = padder
        self.sizes = sizes

    def key(self, roles: ArgRoles, args: Sequence[Any]) -> tuple:
        padder, sizes = self.padder, self.sizes
        parts: list[Any] = []
        for i in roles.keyed:
            if i in padder.dims:
                shape = list(args[i].shape)
                for src in padder.dims[i]:
                    shape[src.dim] = sizes[src][1]
                parts.append(("pad", tuple(shape)))
            elif i in padder.size_inputs:
                parts.append(("size", sizes[padder.size_inputs[i]][1]))
            else:
                parts.append(key_part(args[i]))
        return tuple(parts)

    def prepare(self, static: list[Any], args: Sequence[Any]) -> None:
        """Static buffers of a capture: bucket-shaped ones for the padded inputs."""
        self.padder.prepare(static, args, self.sizes)

    def load(self, entry: Entry, args: Sequence[Any]) -> None:
        self.padder.load(entry.inputs, args, self.sizes, entry.roles.copied)

    def outputs(self, entry: Entry, args: Sequence[Any]) -> tuple[list[Any], Sequence[int]]:
        """Every output sliced back to its real extent (no input views are regenerated: all
        escaping outputs are cloned or lent); counts the call's real and padded elements."""
        self.padder.count(entry.inputs, args, entry.roles.copied)
        return slice_outputs(self.padder.plan, entry.outputs, args, entry.inputs), entry.escaping


KeyStrategy = ExactKeys | BucketKeys
"""Either strategy: ``key``, ``prepare``, ``load`` and ``outputs``, with the same signatures."""


def call_keys(padder: Padder | None, args: Sequence[Any]) -> KeyStrategy | None:
    """The key strategy of this call; ``None`` when a size is above the largest bucket and the
    config says such sizes run uncaptured."""
    if padder is None:
        return EXACT_KEYS
    sizes = padder.sizes(args)
    if sizes is None:  # this call cannot be padded (e.g. a non-contiguous input)
        return EXACT_KEYS
    if sizes is ABOVE_LARGEST:
        return None
    return BucketKeys(padder, cast(Sizes, sizes))
