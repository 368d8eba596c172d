"""The padding analysis's engine: one forward walk over a graph.

The question is whether a static piece may run on inputs whose proposed dims were padded up to a
bucket, with arbitrary pad contents, and give outputs whose real region equals the unpadded
run's. The walk answers it by abstract interpretation: each placeholder gets a state from the
domain (``domain.py``: which dims are padded, what the pad holds), each node's transfer rule
(``rules/``, looked up in ``table.py``) computes the state of its result from its operands', and
the output node records which output dims carry a padded extent. A rule that cannot prove its op
safe raises ``_Unsafe``; the walk records the reason with the node and its source line and
poisons the result, so later consumers are skipped and one cause is reported once.

Around the rules the engine keeps what no single op sees: sizes read as values (a padded
``sym_size`` flowing into a non-shape argument), in-place writes into graph inputs, and a safety
net that compares every result's traced shape with its state, so a rule that lost track of a
padded dim is reported instead of trusted. The driver (``driver.py``: :func:`analyze_padding`)
drops the sources an unsafe node implicates and walks again, until the remaining sources are
jointly safe.

``docs/padding.md`` states the question exactly, describes the domain and every rule family, and
lists the guarantees.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Sequence
from typing import Any

import sympy
import torch
import torch.fx

from hpuopt.fx_utils import MISSING, node_value, op_name, packet_name, source_line
from hpuopt.passes.padding import fills, index_facts, permutation
from hpuopt.passes.padding.binding import _mutated_args, _Op, _Rule
from hpuopt.passes.padding.domain import (
    _POISON,
    _UNPADDED,
    ANY,
    ZERO,
    _Dim,
    _dim_pairs,
    _same,
    _state_sources,
    _Sym,
    _Tensor,
    _Unsafe,
)
from hpuopt.passes.padding.fills import NEG_INF
from hpuopt.passes.padding.rules.factories import _random
from hpuopt.passes.padding.rules.pointwise import _copy, _pointwise
from hpuopt.passes.padding.table import RULES, _lookup
from hpuopt.records import OutputDim, PadSource, SizeInput, UnsafeReason

log = logging.getLogger(__name__)

aten = torch.ops.aten

_SYM_SIZE_OPS = {aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int,
                 aten.sym_storage_offset.default}


class _Analysis:
    """One forward walk over the graph for a fixed set of sources."""

    def __init__(self, gm: torch.fx.GraphModule, sources: Sequence[PadSource],
                 allow_zero_pad: bool = True, masks: frozenset[int] = frozenset()) -> None:
        self.gm = gm
        self.allow_zero_pad = allow_zero_pad
        self.masks = masks  # inputs whose pad the runtime fills with -inf (additive masks)
        self.wants_mask_fill: set[int] = set()
        self.pad_facts_stale = False
        self.sources = tuple(sources)
        self.states: dict[torch.fx.Node, Any] = {}
        self.aliases: dict[torch.fx.Node, frozenset[int]] = {}
        self.failures: list[tuple[UnsafeReason, frozenset[PadSource]]] = []
        self.zero_required = False
        self.ties: dict[tuple[PadSource, PadSource], None] = {}
        self.equal_sizes: dict[tuple[PadSource, PadSource], None] = {}
        self.positive_inputs: dict[int, None] = {}
        self.checks: dict[tuple[str, str, int], None] = {}
        self.outputs: list[OutputDim] = []
        self.size_inputs: list[SizeInput] = []
        self.placeholder_index: dict[torch.fx.Node, int] = {}
        self.symbol_dims: dict[sympy.Symbol, tuple[int, int]] = {}
        self.source_symbols: set[sympy.Symbol] = set()

    # -- helpers used by rules ---------------------------------------------------------------

    def state_of(self, value: Any) -> Any:
        if isinstance(value, torch.fx.Node):
            return self.states.get(value, _UNPADDED)
        if isinstance(value, (list, tuple)):
            return tuple(self.state_of(v) for v in value)
        return None

    def shape_of(self, value: Any, index: int | None = None) -> tuple[Any, ...]:
        if not isinstance(value, torch.fx.Node):
            return ()
        val = node_value(value)
        if index is not None and isinstance(val, (list, tuple)):
            val = val[index]
        elif isinstance(val, (list, tuple)) and val and hasattr(val[0], "shape"):
            val = val[0]
        if val is MISSING or not hasattr(val, "shape"):
            if isinstance(val, (int, float, bool, torch.SymInt, torch.SymFloat)):
                return ()
            raise _Unsafe(f"no shape metadata (meta['val']) on node {value.name!r}")
        return tuple(val.shape)

    def tie(self, a: PadSource, b: PadSource) -> None:
        if a != b:
            self.ties[(min(a, b), max(a, b))] = None

    def param_content(self, node: Any) -> bool:
        """Whether ``node``'s values come from parameters, buffers and sizes alone (no input
        that this analysis pads): such values can be checked once per bucket."""
        padded_inputs = {s.input for s in self.sources}
        stack, seen = [node], set()
        while stack:
            n = stack.pop()
            if not isinstance(n, torch.fx.Node) or n in seen:
                continue
            seen.add(n)
            if n.op == "placeholder" and self.placeholder_index.get(n) in padded_inputs:
                return False
            stack.extend(n.all_input_nodes)
        return True

    def require_check(self, node: torch.fx.Node, kind: str, bound: int) -> None:
        """Records a value the runtime checks per bucket (``PaddingPlan.checks``)."""
        self.checks[(node.name, kind, int(bound))] = None

    def want_mask_fill(self, node: Any) -> bool:
        """An attention bias whose pad keys hold 0 rather than -inf: when it comes straight
        (through views, expands and casts) from a floating input, ask for that input's pad to
        be filled with -inf on the next walk. Returns whether one was found."""
        while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.args \
                and packet_name(node) in _MASK_PATH:
            node = node.args[0]
        index = self.placeholder_index.get(node) if isinstance(node, torch.fx.Node) else None
        val = node_value(node) if index is not None else None
        if index is None or index in self.masks or not isinstance(val, torch.Tensor) or \
                not val.dtype.is_floating_point:
            return False
        self.wants_mask_fill.add(index)
        return True

    def require_positive(self, node: torch.fx.Node) -> None:
        """Records that placeholder ``node`` (a 0-dim tensor) must be positive at run time."""
        self.positive_inputs[self.placeholder_index[node]] = None

    def require_equal(self, a: _Dim, b: _Dim) -> None:
        """Ties two dims and records that their real sizes must be equal at run time."""
        self.tie_dims(a, b)
        for x, y in _dim_pairs(a, b):
            if x != y:
                self.equal_sizes[(min(x, y), max(x, y))] = None

    def tie_dims(self, a: _Dim, b: _Dim) -> None:
        """Ties the sources of two dims of the same layout (part by part for merged dims)."""
        for x, y in _dim_pairs(a, b):
            self.tie(x, y)

    def require_zero(self, what: str) -> None:
        """Records that ``what`` is exact only with zero padding; raises if that is not allowed."""
        if not self.allow_zero_pad:
            raise _Unsafe(f"{what} reads the pad region: exact only with pad value 0, which the "
                          "caller does not allow (allow_zero_pad=False)")
        if self.pad_facts_stale:
            raise _Unsafe(f"{what} reads the pad region: exact only with pad value 0, and an "
                          "earlier in-place mutation makes the pad contents unknown")
        self.zero_required = True

    # -- the walk ------------------------------------------------------------------------------

    def run(self) -> None:
        wanted: dict[int, list[int]] = {}
        for s in self.sources:
            wanted.setdefault(s.input, []).append(s.dim)
        index = 0
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.placeholder_index[node] = index
                self._placeholder(node, index, wanted.get(index, []))
                index += 1
        self._sym_placeholders()
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                continue
            try:
                if node.op == "output":
                    self._output(node)
                else:
                    self.states[node] = self._visit(node)
            except _Unsafe as exc:
                involved = self._involved(node)
                sources = exc.sources if exc.sources else involved
                self._fail(node, exc.why, sources or frozenset(self.sources))
                self.states[node] = _POISON

    def _fail(self, node: torch.fx.Node, why: str, sources: frozenset[PadSource]) -> None:
        reason = UnsafeReason(node=node.name, op=_op_name(node), why=why,
                              source_line=source_line(node), sources=tuple(sorted(sources)))
        self.failures.append((reason, sources))

    def _involved(self, node: torch.fx.Node) -> frozenset[PadSource]:
        out: set[PadSource] = set()
        for arg in node.all_input_nodes:
            out.update(_state_sources(self.states.get(arg)))
        return frozenset(out)

    # -- inputs --------------------------------------------------------------------------------

    def _placeholder(self, node: torch.fx.Node, index: int, dims: list[int]) -> None:
        val = node_value(node)
        if isinstance(val, torch.Tensor):
            for d, size in enumerate(val.shape):
                if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                    self.symbol_dims.setdefault(size.node.expr, (index, d))
        if not dims:
            self.states[node] = _Sym() if isinstance(val, (int, torch.SymInt)) else _UNPADDED
            self.aliases[node] = frozenset({index})
            return
        if not isinstance(val, torch.Tensor):
            why = ("no shape metadata (meta['val']) on the input" if val is MISSING
                   else "proposed input is not a tensor")
            self._fail(node, why, frozenset(PadSource(index, d) for d in dims))
            self.states[node] = _POISON
            return
        rank = val.dim()
        state: list[_Dim | None] = [None] * rank
        for d in dims:
            src = PadSource(index, d)
            if not 0 <= d < rank:
                self._fail(node, f"dim {d} out of range for a rank-{rank} input", frozenset({src}))
                self.states[node] = _POISON
                return
            if _same(val.shape[d], 1) or _same(val.shape[d], 0):
                self._fail(node, f"dim {d} has extent {val.shape[d]} in the trace: padding it "
                           "would change broadcasting", frozenset({src}))
                self.states[node] = _POISON
                return
            state[d] = _Dim(src)
            size = val.shape[d]
            if isinstance(size, torch.SymInt):
                self.source_symbols.update(size.node.expr.free_symbols)
        if index in self.masks:  # an additive mask: its pad holds -inf, the masking value
            self.states[node] = _Tensor(tuple(state), ANY, fills=tuple(
                (d, NEG_INF) for d, s in enumerate(state) if s is not None))
        else:
            zero_fills = tuple((d, 0) for d, s in enumerate(state) if s is not None)
            self.states[node] = _Tensor(tuple(state), ZERO, fills=zero_fills)
        self.aliases[node] = frozenset({index})

    def _sym_placeholders(self) -> None:
        """``SymInt`` placeholders equal to a padded extent become exact padded sizes."""
        extents: dict[Any, PadSource] = {}
        for node, idx in self.placeholder_index.items():
            st = self.states.get(node)
            if isinstance(st, _Tensor) and st.padded:
                val = node_value(node)
                for d, dim in enumerate(st.dims or ()):
                    if dim is not None and isinstance(val.shape[d], torch.SymInt):
                        extents.setdefault(val.shape[d].node.expr, dim.source)
        for node, idx in self.placeholder_index.items():
            val = node_value(node)
            if isinstance(val, torch.SymInt) and val.node.expr in extents:
                src = extents[val.node.expr]
                self.states[node] = _Sym(frozenset({src}), _Dim(src))
                self.size_inputs.append(SizeInput(idx, src))

    # -- nodes ---------------------------------------------------------------------------------

    def _visit(self, node: torch.fx.Node) -> Any:
        args = [self.states.get(a, _UNPADDED) for a in node.all_input_nodes]
        if any(a is _POISON for a in args):
            return _POISON
        if node.op == "get_attr":
            return _UNPADDED
        involved = self._involved(node)
        target = node.target
        if node.op != "call_function":
            if involved:
                raise _Unsafe(f"unknown {node.op} on a padded value")
            return _UNPADDED
        if target is operator.getitem:
            return self._getitem(node)
        if not isinstance(target, torch._ops.OpOverload):
            return self._python_call(node, args)
        return self._aten_call(node, involved)

    def _getitem(self, node: torch.fx.Node) -> Any:
        base = self.states.get(node.args[0], _UNPADDED)
        self.aliases[node] = self.aliases.get(node.args[0], frozenset())
        if isinstance(base, tuple):
            return base[node.args[1]]
        return base if not isinstance(base, _Tensor) else _UNPADDED

    def _python_call(self, node: torch.fx.Node, args: list[Any]) -> Any:
        """Python arithmetic on sizes (``operator.mul``, ``sym_max``...): propagate dependence."""
        if any(isinstance(a, _Tensor) and (a.padded or a.perm is not None) for a in args):
            raise _Unsafe("unknown op on a padded tensor")
        deps = frozenset(s for a in args for s in _state_sources(a))
        return _Sym(deps) if deps else (_Sym() if _is_sym(node) else _UNPADDED)

    def _aten_call(self, node: torch.fx.Node, involved: frozenset[PadSource]) -> Any:
        target = node.target
        self._track_alias(node)
        if target in _SYM_SIZE_OPS:
            return self._sym_size(node)
        if not involved:
            if index_facts.carries(node, self.states):
                return index_facts.propagate(node, self.states, self._unpadded_result(node))
            return self._unpadded_result(node)
        op = _Op(self, node)
        result = permutation.transfer(op, self._own_rule)  # sorts and what they permute
        self._check_mutation(op)
        if result is None:
            result = index_facts.propagate(node, self.states, self._own_rule(op))
            result = fills.propagate(node, self.states, result)
        self._check_extents(node, result)
        self._write_back(op, result)
        return result

    def _own_rule(self, op: _Op) -> Any:
        """The op's rule after the checks every op gets (merged dims, sizes read as values)."""
        self._check_merged(op)
        rule = _table_rule(op.target)
        self._check_value_uses(op, rule.size_args if rule else frozenset())
        return (rule if rule is not None else _tagged_rule(op.target)).fn(op)

    def _write_back(self, op: _Op, result: Any) -> None:
        """An in-place op's result becomes the state of the tensor it wrote to."""
        for name in _mutated_args(op):
            if isinstance(op.raw(name), torch.fx.Node) and isinstance(result, _Tensor) \
                    and result.padded:
                # Views of the mutated tensor keep their dims (mutation never reshapes) but may
                # now hold stale pad-content facts: stop trusting those facts from here on.
                self.states[op.raw(name)] = result
                self.pad_facts_stale = True

    def _unpadded_result(self, node: torch.fx.Node) -> Any:
        val = node_value(node)
        if isinstance(val, (list, tuple)):
            return tuple(_Sym() if isinstance(v, torch.SymInt) else _UNPADDED for v in val)
        return _Sym() if isinstance(val, (int, torch.SymInt)) else _UNPADDED

    def _sym_size(self, node: torch.fx.Node) -> _Sym:
        base = self.states.get(node.args[0], _UNPADDED)
        if not isinstance(base, _Tensor) or not base.padded:
            return _Sym()
        if node.target is aten.sym_size.int:
            rank = len(self.shape_of(node.args[0]))
            d = base.dim(node.args[1] % rank)
            if d is None:
                return _Sym()
            if permutation.positions_only(base):  # arange over a product of padded sizes
                return _Sym(frozenset(_state_sources(base)))
            return _Sym(frozenset({d.source}), d)
        return _Sym(frozenset(_state_sources(base)))

    def _track_alias(self, node: torch.fx.Node) -> None:
        schema = node.target._schema  # type: ignore[union-attr]
        if not any(r.alias_info is not None for r in schema.returns):
            return
        bases: set[int] = set()
        for i, arg in enumerate(schema.arguments):
            if arg.alias_info is None:
                continue
            v = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            if isinstance(v, torch.fx.Node):
                bases |= self.aliases.get(v, frozenset())
        self.aliases[node] = frozenset(bases)

    # -- checks no single rule can make ------------------------------------------------------

    def _check_merged(self, op: _Op) -> None:
        """A merged padded dim (``[B, S] -> [B*S]``) holds real positions that are not a prefix:
        only ops that treat its positions alike (position-wise maths, contractions, reductions,
        norms, views) may see it. Scans, slices, selects, gathers, concatenation, masks by
        position and the like are unsafe."""
        if op.target in _MERGED_OK_OVERLOADS or \
                op.target.overloadpacket.__name__ in _MERGED_OK:  # type: ignore[union-attr]
            return
        along = _positional_dims(op)
        merged: set[PadSource] = set()
        for name, value in op.values.items():
            if name in _GATHER_INDICES.get(op.target.overloadpacket.__name__, ()):  # type: ignore[union-attr]
                continue  # a gather's output positions are its indices' (the rule checks them)
            for node in (value if isinstance(value, (list, tuple)) else (value,)):
                st = self.state_of(node) if isinstance(node, torch.fx.Node) else None
                if not isinstance(st, _Tensor) or st.dims is None:
                    continue
                rank = len(st.dims)
                for i, d in enumerate(st.dims):
                    if d is not None and d.parts is not None and (
                            along is None or along[1] != rank or i in along[0]):
                        merged.update(d.sources)
        if merged:
            raise _Unsafe(f"{op.schema.name.split('::')[-1]} on a merged padded dim: its real "
                          "positions are not a prefix, and this op reads positions along it",
                          merged)

    def _check_mutation(self, op: _Op) -> None:
        for name in _mutated_args(op):
            v = op.raw(name)
            st = self.state_of(v)
            if not isinstance(v, torch.fx.Node) or not isinstance(st, _Tensor) or not st.padded:
                continue
            if self.aliases.get(v):
                raise _Unsafe(f"in-place mutation ({op.schema.name}) of a padded graph input: the "
                              "pad region would be written back into the caller's buffer",
                              _state_sources(st))

    def _check_value_uses(self, op: _Op, size_args: frozenset[str]) -> None:
        for arg in op.schema.arguments:
            if arg.name in size_args:
                continue
            st = op.state(arg.name)
            deps = frozenset(
                s for x in (st if isinstance(st, tuple) else (st,))
                if isinstance(x, _Sym) for s in x.deps
            )
            if deps:
                raise _Unsafe(f"reads the padded size as a value (argument {arg.name!r}): the "
                              "padded run would see the bucket size", deps)

    def _check_extents(self, node: torch.fx.Node, result: Any) -> None:
        """Safety net (symbolic graphs): a dim not tracked as padded must not depend on a padded
        extent's symbol; if it does, some rule lost track of the padded dim."""
        if not self.source_symbols:
            return
        val = node_value(node)
        pairs = zip(val, result) if isinstance(val, (list, tuple)) and isinstance(result, tuple) \
            else [(val, result)]
        for k, (v, st) in enumerate(pairs):
            if not isinstance(v, torch.Tensor) or not isinstance(st, _Tensor) or \
                    isinstance(result, tuple) and not _item_read(node, k):
                continue  # a result nothing reads carries nothing
            for i, size in enumerate(v.shape):
                if st.dim(i) is None and isinstance(size, torch.SymInt) and \
                        size.node.expr.free_symbols & self.source_symbols:
                    raise _Unsafe(f"dim {i} of the result has extent {size} which depends on the "
                                  "padded size, but does not carry the padded positions")

    # -- outputs -------------------------------------------------------------------------------

    def _output(self, node: torch.fx.Node) -> None:
        flat, _ = torch.utils._pytree.tree_flatten(node.args[0])
        for k, value in enumerate(flat):
            st = self.state_of(value)
            if st is _POISON:
                continue
            if isinstance(st, _Sym) and st.deps:
                raise _Unsafe(f"output {k} is a size that depends on the padded extent", st.deps)
            if isinstance(st, _Tensor) and st.perm is not None:
                raise _Unsafe(permutation.output_why(k, st), set(_state_sources(st)))
            if not isinstance(st, _Tensor) or not st.padded:
                continue
            for d, dim in enumerate(st.dims or ()):
                if dim is None:
                    continue
                if dim.parts is not None:
                    raise _Unsafe(f"output {k} dim {d} merges padded dims: pad positions "
                                  "interleave with real ones, so no slice cuts it back",
                                  set(dim.sources))
                scale, scale_dims = self._express(dim.factor, dim.source)
                self.outputs.append(OutputDim(k, d, dim.source, scale, scale_dims, dim.shifted))

    def _express(self, factor: Any, source: PadSource) -> tuple[int, tuple[tuple[int, int], ...]]:
        if isinstance(factor, int):
            return factor, ()
        expr = sympy.expand(factor.node.expr)
        scale, dims = 1, []
        for term in sympy.Mul.make_args(expr):
            base, exp = term.as_base_exp()
            if term.is_Integer:
                scale *= int(term)
            elif isinstance(base, sympy.Symbol) and exp.is_Integer and base in self.symbol_dims \
                    and base not in self.source_symbols:
                dims += [self.symbol_dims[base]] * int(exp)
            else:
                raise _Unsafe(f"cannot express the output extent factor {factor} in input sizes",
                              {source})
        return scale, tuple(dims)


def _merged_ok() -> frozenset[str]:
    """Ops that treat every position of a dim alike (see ``_Analysis._check_merged``)."""
    from hpuopt.passes.padding.rules import contractions, pointwise, positive

    packets = {packet for family in (pointwise, positive, contractions)
               for _, _, ops in family.ROWS for packet in ops} - {"tril", "triu"}
    return frozenset(packets | {
        "sum", "nansum", "any", "all", "amax", "amin", "prod", "mean", "var", "std", "var_mean",
        "std_mean", "linalg_vector_norm", "norm", "logsumexp", "softmax", "_softmax",
        "_log_softmax", "log_softmax", "native_layer_norm", "_fused_rms_norm", "view",
        "_unsafe_view", "reshape", "unsqueeze", "squeeze", "permute", "transpose", "t",
        "expand", "clone", "_to_copy", "alias", "detach", "contiguous", "lift_fresh_copy",
        "_assert_tensor_metadata", "_reshape_alias", "view_copy", "unsqueeze_copy",
        "squeeze_copy", "permute_copy", "expand_copy", "transpose_copy", "empty_like",
        "zeros_like", "ones_like", "full_like",
    })


_MERGED_OK = _merged_ok()
_MASK_PATH = frozenset({"view", "_unsafe_view", "reshape", "unsqueeze", "expand", "_to_copy",
                        "slice", "alias", "clone", "contiguous", "permute", "transpose"})
_ALONG_DIM = frozenset({
    "topk", "sort", "argsort", "msort", "kthvalue", "median", "nanmedian", "mode", "cumsum",
    "cumprod", "logcumsumexp", "cummax", "cummin", "argmax", "argmin", "max", "min",
    "index_select", "select", "slice", "narrow", "cat", "split", "split_with_sizes", "unbind",
    "chunk", "flip", "roll",
})


def _positional_dims(op: _Op) -> tuple[frozenset[int], int] | None:
    """The dims an op reads positions along, with the rank they refer to, for ops that act
    along given dims only (a sort over the last dim treats the rows alike); ``None`` when the
    op may read positions anywhere."""
    packet = op.target.overloadpacket.__name__  # type: ignore[union-attr]
    first = next((v for v in op.values.values() if isinstance(v, torch.fx.Node)), None)
    if first is None and isinstance(op.raw("tensors"), (list, tuple)) and op.raw("tensors"):
        first = op.raw("tensors")[0]
    rank = len(op.an.shape_of(first)) if isinstance(first, torch.fx.Node) else 0
    if not rank:
        return None
    if packet in ("tril", "triu"):
        return frozenset({rank - 2, rank - 1}), rank
    if packet not in _ALONG_DIM:
        return None
    dims = op.raw("dims") if packet in ("flip", "roll") else op.raw("dim")
    dims = [dims] if isinstance(dims, int) else dims
    if not isinstance(dims, (list, tuple)) or not dims or \
            not all(isinstance(d, int) for d in dims):
        return None
    return frozenset(d % rank for d in dims), rank
_MERGED_OK_OVERLOADS = frozenset({aten.max.other, aten.min.other})
_GATHER_INDICES = {"index": ("indices",), "index_select": ("index",), "embedding": ("indices",)}


def _table_rule(target: Any) -> _Rule | None:
    """The table's rule for ``target``; an in-place variant (``add_``, ``relu_``, ``copy_``)
    without a row of its own takes its functional op's rule."""
    rule = _lookup(target)
    if rule is None and target.overloadpacket.__name__.endswith("_"):
        functional = getattr(aten, target.overloadpacket.__name__[:-1], None)
        rule = RULES.get(functional) if functional is not None else None
        if target is aten.copy_.default:
            rule = _Rule(_copy)
    return rule


def _tagged_rule(target: Any) -> _Rule:
    """The rule for an op the table does not know, from its tags; unsafe when it has none."""
    if torch.Tag.nondeterministic_seeded in target.tags:
        return _Rule(_random)
    if torch.Tag.pointwise in target.tags:
        return _Rule(_pointwise())
    raise _Unsafe("unknown op: no padding rule (conservatively unsafe)")


def _item_read(node: torch.fx.Node, k: int) -> bool:
    """Whether result ``k`` of a multi-result node reaches any op (through ``getitem``)."""
    return any(u.target is not operator.getitem or (u.args[1] == k and len(u.users) > 0)
               for u in node.users)


def _is_sym(node: torch.fx.Node) -> bool:
    return isinstance(node_value(node), (torch.SymInt, int))


def _op_name(node: torch.fx.Node) -> str:
    """``aten.<packet>.<overload>`` for an ATen overload, else the target's ``__name__``."""
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return op_name(t)
    return getattr(t, "__name__", str(t))
