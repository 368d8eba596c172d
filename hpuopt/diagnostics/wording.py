"""How ``explain()`` says things in the user's terms: ops, source lines, graph keys, and what to do.

Everything here is a pure function of strings and records, so the text can be tested without
compiling anything. The links point into ``docs/troubleshooting.md``; :data:`TOPICS` lists every
section a report can link to (a test checks each one exists).
"""

from __future__ import annotations

import os
import re

from hpuopt.records import SplitReason

TROUBLESHOOTING = "docs/troubleshooting.md"

TOPICS = {
    "dynamo": "nothing-was-compiled-or-dynamo-broke-the-graph",
    "recompiles": "dynamo-recompiles",
    "too_many_graphs": "too-many-graphs",
    "first_call": "the-first-call-is-slow",
    "slower": "it-is-slower-than-eager",
    "not_captured": "a-piece-is-not-captured",
    "fallback": "a-captured-piece-runs-uncaptured-fallbacks",
    "not_padded": "a-piece-is-not-padded-one-graph-per-size",
    "memory": "memory-grows",
    "results": "results-differ-from-eager",
    "stale": "outputs-change-after-the-next-call",
}
"""Topic -> the anchor of its section in ``docs/troubleshooting.md``."""


def link(topic: str) -> str:
    return f"{TROUBLESHOOTING}#{TOPICS[topic]}"


# -- source lines -----------------------------------------------------------------------------


def short_source(source: str | None) -> str | None:
    """``file:line in fn: code`` with the path relative to the working directory when it is
    below it, and the run of spaces before a trailing comment squeezed."""
    if not source:
        return source
    path, sep, rest = source.partition(":")
    if sep and os.path.isabs(path):
        try:
            rel = os.path.relpath(path)
        except ValueError:  # another drive (Windows)
            rel = path
        if not rel.startswith(".."):
            path = rel
    text = f"{path}{sep}{rest}"
    return re.sub(r"\s{3,}#", "  #", text).strip()


# -- ops --------------------------------------------------------------------------------------


def short_op(op: str) -> str:
    return op.replace("aten.", "").replace(".default", "")


def _packet(op: str) -> str:
    """``aten.index.Tensor`` -> ``index``; a custom op keeps its namespace."""
    name = op.removeprefix("aten.")
    return name.split(".")[0]


_DATA_DEPENDENT = {
    "nonzero": "`nonzero()` (or `torch.where(cond)` with one argument): one row per non-zero "
    "element, a count only the data knows",
    "nonzero_static": "`nonzero_static()` waits for the device to finish",
    "masked_select": "`masked_select`: as many elements as the mask selects",
    "_unique": "`unique()`: the number of distinct values depends on the data",
    "_unique2": "`unique()`: the number of distinct values depends on the data",
    "unique_dim": "`unique(dim=...)`: the number of distinct rows depends on the data",
    "unique_consecutive": "`unique_consecutive()`: the output size depends on the data",
    "bincount": "`bincount()`: its length is the largest value plus one",
    "histc": "`histc()` without a range (`min == max`, the default) reads its range from the "
    "data",
    "repeat_interleave": "`repeat_interleave` with tensor repeats: the output size is their sum",
}

_HOST_READ = {
    "_local_scalar_dense": "`.item()` (or `.tolist()`, `int(t)`, `float(t)`) reads a value back "
    "to the host",
    "item": "`.item()` reads a value back to the host",
    "is_nonzero": "`if tensor:` / `bool(tensor)` reads a value back to the host",
    "equal": "`torch.equal` reads its answer back to the host",
    "_linalg_check_errors": "a `torch.linalg` error check (`inv`, `cholesky`, `solve`...) reads "
    "an error code back to the host",
    "cond": "`torch.cond` on a tensor predicate reads it on the host to pick a branch",
    "while_loop": "`while_loop` decides each iteration on the host",
}


def describe_split(r: SplitReason) -> str:
    """What the node that kept a piece out of device graphs does, in the user's terms."""
    packet = _packet(r.op)
    if r.reason == "host_read":
        return _HOST_READ.get(packet, f"`{short_op(r.op)}` {r.detail}")
    if r.reason == "data_dependent_shape":
        if packet in ("index", "index_put", "_index_put_impl") or "boolean mask" in r.detail:
            return "boolean-mask indexing (`x[mask]`): its number of rows depends on the data"
        if packet in _DATA_DEPENDENT:
            return _DATA_DEPENDENT[packet]
        return f"`{short_op(r.op)}`: the size of its output depends on the data"
    if r.reason == "known_uncapturable":
        if "dynamic_ops" in r.detail:
            return f"`{short_op(r.op)}` is listed in the dynamic_ops option"
        return _DATA_DEPENDENT.get(packet, f"`{short_op(r.op)}`: {r.detail}")
    if r.reason == "device_copy":
        return f"`{short_op(r.op)}` copies between devices (`.to(...)`, `.cpu()`)"
    if r.reason == "host_tensor":
        return f"`{short_op(r.op)}` makes a CPU tensor inside a model that runs on a device"
    if r.reason == "collective":
        return f"`{short_op(r.op)}` is a collective: it runs once per call, with the other ranks"
    if r.reason == "host_scalar":
        return "shape arithmetic on the host"
    return f"`{short_op(r.op)}`: {r.detail}"


def split_fix(r: SplitReason) -> str:
    """What the user can do about a split of this kind."""
    packet = _packet(r.op)
    if r.reason == "data_dependent_shape" or packet in _DATA_DEPENDENT:
        return (
            "the pieces around it are still captured; to capture it too, keep the shape fixed "
            "(`torch.where(mask, x, 0)` instead of `x[mask]`, a fixed-size `topk`)"
        )
    if packet == "_linalg_check_errors":
        return ("use the `_ex` form (`torch.linalg.inv_ex`, `cholesky_ex`, `solve_ex`): it returns "
                "the error code as a tensor instead of checking it on the host")
    if packet == "cond":
        return "compute both branches and pick with `torch.where(pred, a, b)`, if both are cheap"
    if r.reason == "host_read":
        return "keep the value on the device (use it as a tensor), or read it outside the model"
    if r.reason == "device_copy":
        return "move the copy to the caller, before or after the model"
    if r.reason == "host_tensor":
        return "create the tensor on the model's device (`device=x.device`)"
    if r.reason == "collective":
        return "none needed: collectives run between graphs by design (docs/distributed.md)"
    if r.reason == "known_uncapturable" and "dynamic_ops" in r.detail:
        return "remove it from dynamic_ops if a device graph can hold it"
    return "accept the split (the pieces around it are still captured), or replace the op"


# -- fallbacks --------------------------------------------------------------------------------


def describe_fallback(reason: str) -> tuple[str, str]:
    """``(what happened, what to do)`` for the reason a static piece ran uncaptured."""
    low = reason.lower()
    if "capture=false" in low:
        return (
            "capture is turned off (capture=False)",
            "drop capture=False once you are done bisecting",
        )
    if "above the largest bucket" in low:
        return (
            "an input size above the largest bucket runs uncaptured (above_largest=\"uncaptured\")",
            ("raise max_bucket or add a larger entry to bucket_sizes, "
             "or set above_largest=\"exact\""),
        )
    if "out of memory" in low:
        return (
            "capture ran out of memory",
            "bound the graphs with max_graphs / max_graph_bytes, or free memory before capture",
        )
    if "replay failed" in low:
        return (f"a replay raised ({reason.removeprefix('replay failed: ')})",
                "run with strict=True to see the error where it happens")
    op = re.search(r"\b(aten\.\w+|\w+::\w+)", reason)
    name = f'"{op.group(1)}"' if op else '"mylib::my_op"'
    what = reason.replace("cannot run inside a device graph: ", "")
    return (
        f"capture failed: {what}",
        (f"rewrite without the host dependency, or split the op out with dynamic_ops=[{name}] "
         "(the split pass must be on) so the rest of the piece is captured"),
    )


# -- padding ----------------------------------------------------------------------------------


_PLACE = re.compile(r"\s*\(input \d+ dim \d+\)")


def describe_unsafe(op: str, why: str, dim: str | None) -> str:
    """Why a piece is captured per exact size: the op and the reason, the piece's internal
    ``(input i dim d)`` replaced by the user's name for that size."""
    text = _PLACE.sub(f" ({dim})" if dim else "", why)
    return f"{text} (`{short_op(op)}`)"


NOT_PADDED_FIX = (
    "each new size captures one more graph; if there are many, pass fewer distinct sizes "
    "(pad or bucket them yourself), move that op out of the hot piece, or bound them with "
    "max_graphs"
)

GROWING_CACHE_FIX = (
    "this is a key/value cache that grows by each step's tokens (transformers' dynamic cache), "
    "so every decode step is a new shape; generate(..., cache_implementation=\"static\") keeps "
    "one shape per batch (docs/user_guide.md#hugging-face-models)"
)


def not_padded_fix(source_line: str | None) -> str:
    """What to do about a piece captured per exact size; a growing KV cache gets its own."""
    text = source_line or ""
    if "cache_utils.py" in text or "past_key_value" in text:
        return GROWING_CACHE_FIX
    return NOT_PADDED_FIX


# -- graph keys -------------------------------------------------------------------------------


def describe_keys(keys: tuple[str, ...], limit: int = 6) -> str:
    """The cached signatures of a piece in words: ``1 graph (fixed shapes)``,
    ``5 graphs (exact 2x64, 4x64, ...)``, ``6 graphs (buckets 1x64, 2x64, ...)``."""
    if not keys:
        return "no graph held"
    n = len(keys)
    head = f"{n} graph{'s' if n != 1 else ''}"
    if keys == ("(static)",):
        return f"{head} (fixed shapes)"
    groups: dict[str, list[str]] = {}
    for key in keys:
        label, shape = _key_words(key)
        groups.setdefault(label, []).append(shape)
    parts = []
    for label, shapes in groups.items():
        shown = ", ".join(shapes[:limit])
        if len(shapes) > limit:
            shown += f", ... {len(shapes) - limit} more"
        parts.append(f"{label} {shown}".strip())
    return f"{head} ({'; '.join(parts)})"


def _key_words(key: str) -> tuple[str, str]:
    uncaptured = key.endswith(" (uncaptured)")
    body = key.removesuffix(" (uncaptured)").strip("()")
    if body == "static":
        label, shape = "fixed shapes", ""
    elif body.startswith("pad "):
        shapes = body.split(", ")
        label = "buckets"
        shape = ", ".join(s.removeprefix("pad ") for s in shapes)
        if re.match(r"0(x|$)", shape):
            shape += " (no rows)"
    else:
        label, shape = "exact", body
    if uncaptured:
        label = f"uncaptured {label}".strip()
    return label, shape


def plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else (many or word + 's')}"


def nbytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover
