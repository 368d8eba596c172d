"""Names for symbolic sizes, in the user's terms.

Inside a graph a size that varies is a symbol: ``s77`` for a dimension of an input that Dynamo
made dynamic, ``u0`` for a size only the data knows (the rows a boolean mask keeps). People know
them as "dim 0 of ``x``" and "the rows kept at line 51". :class:`SizeNames` answers that for one
ATen graph, from the stitching module hpuopt kept for it (its pieces' placeholders carry the
fake tensors Dynamo traced with) and the shape environment those belong to. Every lookup falls
back to ``None``: naming is for people and must never break ``explain()``.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from hpuopt.diagnostics.wording import short_source

log = logging.getLogger(__name__)


def source_name(source: Any) -> str:
    """A Dynamo source in the user's words: ``L['x'].size()[0]`` -> ``x dim 0``,
    ``L['self']._modules['enc'].weight`` -> ``self.enc.weight``."""
    name = source.name() if callable(getattr(source, "name", None)) else str(source.name)
    name = re.sub(r"\b[LG]\['([^']+)'\]", r"\1", name)
    name = re.sub(r"\._(?:modules|parameters|buffers)\['([^']+)'\]", r".\1", name)
    name = re.sub(r"\b___stack\d+\b", "a value from before a graph break", name)
    name = re.sub(r"\.size\(\)\[(\d+)\]$", r" dim \1", name)
    name = re.sub(r"\.stride\(\)\[(\d+)\]$", r" stride \1", name)
    return name


def _symbols(value: Any) -> list[Any]:
    """The sympy symbols a SymInt (or a shape entry) holds, or [] for a plain int."""
    node = getattr(value, "node", None)
    expr = getattr(node, "expr", None)
    return sorted(getattr(expr, "free_symbols", ()), key=str) if expr is not None else []


def _shape_env(value: Any) -> Any:
    return getattr(getattr(value, "node", None), "shape_env", None)


def name_symbol(value: Any) -> str | None:
    """The user's name of a backed symbolic size (``x dim 0``), or None."""
    env = _shape_env(value)
    names = []
    for sym in _symbols(value):
        sources = getattr(env, "var_to_sources", {}).get(sym) if env is not None else None
        if sources:
            names.append(source_name(sources[0]))
    if not names:
        return None
    expr = getattr(getattr(value, "node", None), "expr", None)
    if len(names) == 1 and getattr(expr, "is_Symbol", False):
        return names[0]
    return "a size computed from " + " and ".join(dict.fromkeys(names))


class SizeNames:
    """Names the symbolic sizes of one ATen graph's pieces."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def piece_input_dim(self, piece: str, index: int, dim: int) -> str | None:
        """The user's name for dim ``dim`` of input ``index`` of ``piece``."""
        try:
            sub = self.module._modules[piece]
            ph = list(sub.graph.find_nodes(op="placeholder"))[index]
            val = ph.meta.get("val")
            size = val.shape[dim]
            if _symbols(size) and all(str(s).startswith("u") for s in _symbols(size)):
                from hpuopt.fx_utils import source_line

                where = (short_source(source_line(ph)) or "").split(" in ", 1)[0]
                return f"the data-dependent size from {where}" if where else "a data-dependent size"
            return name_symbol(size)
        except Exception:  # noqa: BLE001 - naming is best effort
            log.debug("no name for %s input %d dim %d", piece, index, dim, exc_info=True)
            return None

    def dynamic_inputs(self) -> tuple[str, ...]:
        """The graph's input sizes that vary between calls (``x dim 0``), from its placeholders."""
        out: dict[str, None] = {}
        try:
            for ph in self.module.graph.find_nodes(op="placeholder"):
                val = ph.meta.get("val")
                sizes = [val] if not hasattr(val, "shape") else list(val.shape)
                for size in sizes:
                    syms = _symbols(size)
                    if syms and not any(str(s).startswith("u") for s in syms):
                        for sym_name in self._names(size):
                            out[sym_name] = None
        except Exception:  # noqa: BLE001 - naming is best effort
            log.debug("no dynamic inputs", exc_info=True)
        return tuple(out)

    @staticmethod
    def _names(size: Any) -> list[str]:
        env = _shape_env(size)
        names = []
        for sym in _symbols(size):
            sources = getattr(env, "var_to_sources", {}).get(sym) if env is not None else None
            names.append(source_name(sources[0]) if sources else str(sym))
        return names
