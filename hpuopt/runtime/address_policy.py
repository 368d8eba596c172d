"""Which tensor arguments a piece reads in place and which it copies, from where they live.

Replay reads static buffers. Activations are copied into them (``copy_``, one per tensor
input). Parameters and buffers of the module are *stable*: their storage lives as long as the
module and its address does not change between calls, so the graph reads them in place with no
copy — but an address change (``p.data = ...``, ``load_state_dict`` that reallocates,
``model.to``) is checked on every call with ``data_ptr()`` and answered by capturing again: a
stale graph would read freed or old memory.

Metadata does not tell the whole story, so :class:`AddressPolicy` moves arguments both ways:

* **promotion**: other tensors can be just as stable without the metadata saying so — the
  gradients an optimizer step reads (torch does not mark them static), a KV cache or a state
  tensor the caller passes every call. Copying those each call is the largest cost of a replay
  whose kernels are small. So the first call records the address of every copied input that
  could be read in place, each of the next :data:`_SAME_BEFORE_STABLE` calls drops those that
  moved, and what is left becomes stable: captured again once, then address-checked per call
  like a parameter. Reading an input in place is what eager does, so this changes speed, never
  results.
* **demotion**: a stable input that changed address :data:`_MOVES_BEFORE_COPY` times (Dynamo
  marks some inputs static that move every step: gradients that ``zero_grad()`` reallocates),
  or a promoted one that moved once, is copied each call from then on; capturing again on
  every call would be far slower than one copy each. Watching ends with the promotion window,
  so a demoted input stays copied for good.

The policy only sees indices and addresses and answers with the new split (or ``None``); the
runner applies it (every captured graph baked in the old split, so all are dropped).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch

from hpuopt.runtime.signature import ArgRoles

_MOVES_BEFORE_COPY = 2
"""A stable input that changed address this many times is copied each call instead."""

_SAME_BEFORE_STABLE = 2
"""A copied input whose address stayed the same over this many calls after the first is read in
place from then on."""


class Split(NamedTuple):
    """A new division of the tensor arguments between read in place and copied."""

    stable: tuple[int, ...]
    copied: tuple[int, ...]
    changed: tuple[int, ...]
    """The arguments that moved from one side to the other."""


class AddressPolicy:
    """Promotion and demotion of one piece's tensor arguments (see the module docstring)."""

    def __init__(self) -> None:
        self._moves: dict[int, int] = {}  # stable argument -> times its address changed
        self._promoted: set[int] = set()
        self._watch: dict[int, int] | None = {}  # promotion candidates -> address; None: done
        self._calls = 0

    @property
    def watching(self) -> bool:
        """Whether calls are still observed for promotion."""
        return self._watch is not None

    def watched(self, roles: ArgRoles) -> Sequence[int]:
        """The arguments whose address the next :meth:`observe` needs: on the first call every
        copied one that could be read in place (not keyed, not read as a whole storage, never
        moved), later the candidates left. The caller leaves out those that are not tensors on
        the runtime's device."""
        if self._watch is None:
            return ()
        if self._calls == 0:
            skip = {*roles.keyed, *roles.full_storage, *self._moves}
            return [i for i in roles.copied if i not in skip]
        return list(self._watch)

    def observe(
        self, roles: ArgRoles, addresses: Mapping[int, int], can_promote: bool = True
    ) -> Split | None:
        """One call's ``{argument: address}``; the split that reads the arguments which never
        moved in place, once the window closes, else ``None``. ``can_promote`` False (a
        signature of the piece runs uncaptured) closes the window without promoting."""
        watch = self._watch
        if watch is None:
            return None
        self._calls += 1
        split = None
        if self._calls == 1:
            watch.update(addresses)
        else:
            for i in [i for i, ptr in watch.items() if addresses.get(i) != ptr]:
                del watch[i]
            if watch and self._calls > _SAME_BEFORE_STABLE:
                promote = [i for i in watch if i in roles.copied]
                watch.clear()
                if promote and can_promote:
                    self._promoted |= set(promote)
                    split = _split(roles, set(roles.stable) | set(promote))
        if not watch:
            self._watch = None
        return split

    def moved(self, roles: ArgRoles, moved: Sequence[int]) -> Split | None:
        """The stable arguments ``moved`` changed address (a capture again follows); the split
        that copies those that keep moving from now on, else ``None``."""
        for i in moved:
            self._moves[i] = self._moves.get(i, 0) + 1
        demote = [i for i in moved if i in self._promoted or self._moves[i] >= _MOVES_BEFORE_COPY]
        if not demote:
            return None
        self._promoted -= set(demote)
        return _split(roles, set(roles.stable) - set(demote))


def addresses(args: Sequence[Any], indices: Sequence[int], device: str) -> dict[int, int]:
    """``{i: address}`` of the ``indices`` whose argument is a tensor on ``device`` (any device
    on the CPU runtime, which emulates one): what :meth:`AddressPolicy.observe` takes."""
    return {
        i: args[i].data_ptr()
        for i in indices
        if isinstance(args[i], torch.Tensor) and (device == "cpu" or args[i].device.type == device)
    }


def _split(roles: ArgRoles, stable: set[int]) -> Split:
    tensors = set(roles.stable) | set(roles.copied)
    changed = stable.symmetric_difference(roles.stable)
    return Split(tuple(sorted(stable)), tuple(sorted(tensors - stable)), tuple(sorted(changed)))
