"""Opting single submodules into device graphs, the way Gaudi users do it.

Gaudi code wraps a module with ``wrap_in_hpu_graph(module)`` or
``ModuleCacher(max_graphs=N)(model=module, inplace=True)``; hpuopt offers the same calls, backed
by the ``hpugraph`` backend: the module's forward is compiled with Dynamo's dynamic-op flags on,
dynamic ops are split out instead of breaking the wrapper, every static piece is captured per
input signature (up to ``max_graphs`` per piece), and training works because the backward is
captured too.

What wrapping changes: the *instance's* ``forward`` attribute becomes a :class:`GraphedForward`
(``module.forward`` shows it; the class is untouched, hooks still run through
``module.__call__``, and the ``state_dict`` keys do not change). The wrapper keeps the wrapped
forward's signature, name and docstring, so code that inspects ``forward`` sees what it saw
before. :func:`unwrap` removes it.

Per call, ``bypass_hpu_graphs=True`` runs the original forward uncaptured (the keyword is
consumed, never passed on). Each wrapped forward keeps its own records: ``stats()``,
``explain()`` and ``clear()``.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
from collections.abc import Iterable
from typing import Any

import torch

from hpuopt.api import _flags
from hpuopt.backend import hpugraph_backend
from hpuopt.config import Config
from hpuopt.diagnostics.explain import ExplainReport, Session, explain
from hpuopt.errors import InputError

log = logging.getLogger(__name__)

BYPASS_KEYWORD = "bypass_hpu_graphs"


class GraphedForward:
    """The forward of a wrapped module: compiled through hpugraph, with its own records."""

    def __init__(self, module: torch.nn.Module, config: Config) -> None:
        self.original = module.forward  # the bound forward of the class
        # Libraries read a forward's parameters (transformers' generate() builds position ids
        # only when forward takes them): the wrapper shows the wrapped forward's signature,
        # name and docstring, and ``__wrapped__`` leads to it.
        functools.update_wrapper(self, self.original, updated=())
        self.__signature__ = inspect.signature(self.original)
        self.config = config
        self.session = Session()
        backend = functools.partial(hpugraph_backend, config=config, session=self.session)
        self._compiled = torch.compile(self.original, backend=backend)
        self._module_name = type(module).__name__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.pop(BYPASS_KEYWORD, False):
            return self.original(*args, **kwargs)
        return _flags.call(self._compiled, args, kwargs)

    def bypass(self, *args: Any, **kwargs: Any) -> Any:
        """One call of the original forward, uncaptured."""
        return self.original(*args, **kwargs)

    def explain(self) -> ExplainReport:
        return explain(self.session)

    def stats(self) -> dict[str, int]:
        """Graphs held, replays, hits, misses, evictions and bytes held by this module."""
        pieces = [p for p in self.explain().pieces if p.captured]
        return {
            "graphs": sum(len(p.graphs) for p in pieces),
            "replays": sum(p.replays for p in pieces),
            "hits": sum(p.hits for p in pieces),
            "misses": sum(p.misses for p in pieces),
            "evictions": sum(p.evictions for p in pieces),
            "held_bytes": sum(p.held_bytes for p in pieces),
            "uncaptured_pieces": sum(not p.captured for p in self.explain().pieces),
        }

    def clear(self) -> None:
        """Drops every captured graph of this module; they are captured again on demand."""
        self.session.release_graphs()

    def __repr__(self) -> str:
        return f"GraphedForward({self._module_name}, max_graphs={self.config.max_graphs})"


def wrap_in_hpu_graph(module: torch.nn.Module, **options: Any) -> torch.nn.Module:
    """Captures ``module``'s forward as device graphs, in place; returns the module.

    ``options`` are hpugraph options (``max_graphs=8``, ``strict=True``...). Wrapping a module
    that is already wrapped is an error; :func:`unwrap` first.
    """
    if not isinstance(module, torch.nn.Module):
        raise InputError(f"wrap_in_hpu_graph takes an nn.Module, got {type(module).__name__}")
    if is_wrapped(module):
        raise InputError(f"{type(module).__name__} is already wrapped; call hpuopt.unwrap first")
    config = Config.from_options(options)
    module.forward = GraphedForward(module, config)  # an instance attribute: see the docstring
    log.info("wrapped %s in device graphs", type(module).__name__)
    return module


class ModuleCacher:
    """``ModuleCacher(max_graphs=N)(model=module, inplace=True)``, the Gaudi idiom.

    ``inplace=True`` wraps ``model`` itself; ``inplace=False`` wraps a deep copy and returns it,
    leaving ``model`` as it was.
    """

    def __init__(self, max_graphs: int = 10, **options: Any) -> None:
        self.options = {"max_graphs": max_graphs, **options}
        Config.from_options(self.options)  # fail now on a bad option

    def __call__(self, model: torch.nn.Module, inplace: bool = True) -> torch.nn.Module:
        target = model if inplace else copy.deepcopy(model)
        return wrap_in_hpu_graph(target, **self.options)


def wrap_submodules(
    model: torch.nn.Module,
    names: Iterable[str] = (),
    types: type | tuple[type, ...] = (),
    **options: Any,
) -> list[str]:
    """Wraps the submodules of ``model`` named in ``names`` (dotted, e.g. ``"vae.decoder"``)
    and every submodule that is an instance of ``types``; returns the wrapped names.

    An unknown name is an error that lists the submodules there are.
    """
    wanted: dict[str, torch.nn.Module] = {}
    for name in names:
        try:
            wanted[name] = model.get_submodule(name)
        except AttributeError:
            known = ", ".join(n for n, _ in model.named_modules() if n) or "(none)"
            raise InputError(f"model has no submodule {name!r}; it has: {known}") from None
    if types:
        for name, sub in model.named_modules():
            if isinstance(sub, types) and name not in wanted:
                if not any(name.startswith(w + ".") for w in wanted):  # inside a wrapped one
                    wanted[name] = sub
    for sub in wanted.values():
        wrap_in_hpu_graph(sub, **options)
    return list(wanted)


def is_wrapped(module: torch.nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), GraphedForward)


def unwrap(module: torch.nn.Module) -> list[str]:
    """Removes the wrapping from ``module`` and every submodule; returns the names unwrapped."""
    done = []
    for name, sub in module.named_modules():
        if is_wrapped(sub):
            del sub.__dict__["forward"]
            done.append(name)
    return done
