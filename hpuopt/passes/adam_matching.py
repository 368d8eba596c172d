"""Matching a traced optimizer update against torch's own Adam, for the ``fused_adam`` pass.

A candidate region ending at an anchor (``param.addcdiv_`` or ``_foreach_addcdiv_``) is matched in
three steps (the pass's docstring says why): sniff the boolean options, probe with a reference
traced from ``torch.optim.adam.adam`` on distinctive hyperparameter values to read the candidate's
values, then verify against a reference traced with those values, literals included. The result is
a :class:`Block` (the nodes, the per-parameter tensors, the hyperparameters) or a :class:`Skip`
raised with the reason.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import operator
import types
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.fx
from torch.optim.adam import adam as _functional_adam

from hpuopt.fx_utils import is_leaf, leaf_value

Form = Literal["single", "foreach"]

ROLES = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps", "lr")
PER_PARAM_ROLES = ROLES[:-1]


@dataclasses.dataclass(frozen=True)
class AdamHyperparams:
    """The hyperparameters of one matched update, as read from the graph and verified."""

    lr: float | None  # None: a Tensor lr, passed to the kernel as the graph's own input
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    amsgrad: bool
    maximize: bool
    decoupled_weight_decay: bool


class Skip(Exception):
    """A candidate cannot be rewritten; the message says why (it becomes the finding's reason)."""


# -- candidates -----------------------------------------------------------------------------


def anchor_form(node: torch.fx.Node) -> Form | None:
    """``param.addcdiv_(...)`` on a graph input, or ``_foreach_addcdiv_`` on a list of them."""
    if node.op == "call_method" and node.target == "addcdiv_" and is_leaf(node.args[0]):
        return "single"
    if (
        node.op == "call_function"
        and node.target is torch._foreach_addcdiv_
        and isinstance(node.args[0], (list, tuple))
        and all(is_leaf(a) for a in node.args[0])
    ):
        return "foreach"
    return None


def _leaf_value(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor | None:
    value = leaf_value(gm, node)
    return value if isinstance(value, torch.Tensor) else None


@dataclasses.dataclass(frozen=True)
class _Options:
    """What selects a reference graph (everything but the float hyperparameter values)."""

    form: Form
    decoupled_weight_decay: bool
    has_weight_decay: bool
    amsgrad: bool
    maximize: bool
    tensor_lr: bool
    dtype: torch.dtype
    step_dtype: torch.dtype
    device: str


def _sniff(gm: torch.fx.GraphModule, anchor: torch.fx.Node, form: Form, region: list[torch.fx.Node]):
    """Reads the boolean options from the candidate region; each check is a guess, verified later.

    - weight decay, coupled: ``grad.add(param, alpha=wd)`` (``_foreach_add[_](grads, params, alpha=)``);
    - weight decay, decoupled: ``param.mul_(1 - lr * wd)`` (``_foreach_mul_(params, ...)``);
    - ``amsgrad``: a ``maximum`` op; ``maximize``: a ``neg`` of a graph input (the gradient).
    """
    params = anchor.args[0]
    param_set = set(params) if isinstance(params, (list, tuple)) else {params}

    def first_arg_is_param(node: torch.fx.Node) -> bool:
        first = node.args[0] if node.args else None
        if isinstance(first, (list, tuple)):
            return bool(first) and all(a in param_set for a in first)
        return first in param_set

    def names(node: torch.fx.Node) -> str:
        return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")

    decoupled = any(names(n) in ("mul_", "_foreach_mul_") and first_arg_is_param(n) for n in region)
    def reads_param(arg: Any) -> bool:
        if isinstance(arg, (list, tuple)):
            return bool(arg) and isinstance(arg[0], torch.fx.Node) and arg[0] in param_set
        return isinstance(arg, torch.fx.Node) and arg in param_set

    coupled = any(
        names(n) in ("add", "add_", "_foreach_add", "_foreach_add_") and "alpha" in n.kwargs and not first_arg_is_param(n)
        and any(reads_param(a) for a in n.args)
        for n in region
    )  # fmt: skip
    amsgrad = any("maximum" in names(n) for n in region)
    maximize = any(
        names(n) in ("neg", "_foreach_neg")
        and (
            is_leaf(n.args[0])
            or (isinstance(n.args[0], (list, tuple)) and all(is_leaf(a) for a in n.args[0]))
        )
        for n in region
    )
    param0 = params[0] if isinstance(params, (list, tuple)) else params
    value = _leaf_value(gm, param0)
    if value is None:
        raise Skip("parameter has no example value to build a reference from")
    if not value.is_floating_point():
        raise Skip(f"parameter dtype {value.dtype} is not a floating point type (complex is not fused)")
    step_dtype = torch.float32
    for node in region:
        if node.target is operator.iadd and is_leaf(node.args[0]):
            step_value = _leaf_value(gm, node.args[0])
            step_dtype = step_value.dtype if step_value is not None else step_dtype
        if node.target is torch._foreach_add_ and is_leaf(node.args[0][0]):
            step_value = _leaf_value(gm, node.args[0][0])
            step_dtype = step_value.dtype if step_value is not None else step_dtype
    return _Options(
        form=form,
        decoupled_weight_decay=decoupled,
        has_weight_decay=decoupled or coupled,
        amsgrad=amsgrad,
        maximize=maximize,
        tensor_lr=False,
        dtype=value.dtype,
        step_dtype=step_dtype,
        device=value.device.type,
    )


# -- the reference graph --------------------------------------------------------------------

# Distinctive values: a probe literal equal to one of these marks where that value sits. Dynamo's
# polyfills can branch on a value (``lerp_`` with weight ``1 - beta1`` takes another decomposition
# from 0.5 on), so a second probe sits on the other side of that branch.
_PROBES = (
    {"lr": 0.0123, "beta1": 0.8765, "beta2": 0.98765, "eps": 1.234e-7, "weight_decay": 0.0345},
    {"lr": 0.0123, "beta1": 0.4321, "beta2": 0.98765, "eps": 1.234e-7, "weight_decay": 0.0345},
)


@dataclasses.dataclass(frozen=True)
class _Reference:
    """Dynamo's graph of torch's functional Adam over one parameter."""

    gm: torch.fx.GraphModule
    calls: tuple[torch.fx.Node, ...]
    roles: dict[torch.fx.Node, str]  # leaf -> role in ROLES
    element: dict[torch.fx.Node, int | None]  # call -> 0 if per-element, None if shared

    @property
    def shared_count(self) -> int:
        return sum(1 for n in self.calls if self.element[n] is None)

    @property
    def element_count(self) -> int:
        return len(self.calls) - self.shared_count


def _reference_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, hp):
    _functional_adam(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
        foreach=hp["foreach"], capturable=True, differentiable=False, fused=False,
        **hp["extra"], amsgrad=hp["amsgrad"], beta1=hp["beta1"], beta2=hp["beta2"], lr=lr,
        weight_decay=hp["weight_decay"], eps=hp["eps"], maximize=hp["maximize"],
    )  # fmt: skip


@functools.lru_cache(maxsize=64)
def _trace_reference(options: _Options, values: tuple[tuple[str, float], ...]) -> _Reference:
    """Traces the functional Adam for ``options`` and hyperparameter ``values`` (memoised: pure)."""
    hp = dict(values)
    extra: dict[str, Any] = {}
    if "decoupled_weight_decay" in inspect.signature(_functional_adam).parameters:
        extra["decoupled_weight_decay"] = options.decoupled_weight_decay
    elif options.decoupled_weight_decay:
        raise Skip("this torch has no decoupled_weight_decay in torch.optim.adam.adam")
    kw = dict(hp, foreach=options.form == "foreach", amsgrad=options.amsgrad,
              maximize=options.maximize, extra=extra)  # fmt: skip
    device = torch.device(options.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tensors = {
            "params": [torch.randn(2, dtype=options.dtype, device=device)],
            "grads": [torch.randn(2, dtype=options.dtype, device=device)],
            "exp_avgs": [torch.zeros(2, dtype=options.dtype, device=device)],
            "exp_avg_sqs": [torch.zeros(2, dtype=options.dtype, device=device)],
            "max_exp_avg_sqs": [torch.zeros(2, dtype=options.dtype, device=device)]
            if options.amsgrad else [],
            "state_steps": [torch.zeros((), dtype=options.step_dtype, device=device)],
        }  # fmt: skip
    lr: Any = torch.tensor(hp["lr"], device=device) if options.tensor_lr else hp["lr"]
    captured: list[tuple[torch.fx.GraphModule, list[Any]]] = []

    def capture(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        captured.append((gm, example_inputs))
        return gm.forward

    # A fresh code object per trace: Dynamo caches compiled code on the code object, and reusing
    # one would recompile (and eventually hit the recompile limit) for every new option set.
    code = _reference_step.__code__.replace()
    fresh = types.FunctionType(code, _reference_step.__globals__, "_reference_step")
    try:
        torch.compile(fresh, backend=capture, fullgraph=True, dynamic=False)(
            *(tensors[r] for r in PER_PARAM_ROLES), lr, kw
        )
    except Exception as error:  # noqa: BLE001 - Dynamo raises many types; reported as a reason
        raise Skip(f"tracing the reference Adam failed: {type(error).__name__}: {error}") from None
    if len(captured) != 1:
        raise Skip(f"the reference Adam traced into {len(captured)} graphs, expected 1")
    gm, example_inputs = captured[0]
    by_id = {id(t): role for role in PER_PARAM_ROLES for t in tensors[role]}
    if isinstance(lr, torch.Tensor):
        by_id[id(lr)] = "lr"
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    roles = {}
    for node, value in zip(placeholders, example_inputs):
        if id(value) not in by_id:
            raise Skip(f"reference input {node.name} is none of the optimizer's tensors")
        roles[node] = by_id[id(value)]
    calls = tuple(n for n in gm.graph.nodes if n.op in ("call_function", "call_method"))
    return _Reference(gm, calls, roles, _elements(calls, set(roles)))


def _elements(calls: Sequence[torch.fx.Node], leaves: set[torch.fx.Node]) -> dict[torch.fx.Node, int | None]:
    """For each call node, the list element it belongs to, or ``None`` if shared by all elements.

    ``getitem(foreach_result, i)`` and a graph input at position ``i`` of a foreach op's list
    belong to element ``i``; a non-foreach node whose node arguments belong to one element belongs
    to it too (e.g. ``full_like(d_i, ...)``, ``exp_avg_i.copy_(grad_i)``). Foreach ops, which take
    whole lists, are shared.
    """
    element: dict[torch.fx.Node, int | None] = {}
    for node in calls:
        if _is_foreach(node):
            for arg in node.args:
                if isinstance(arg, (list, tuple)):
                    element.update((a, i) for i, a in enumerate(arg) if a in leaves)
    for node in calls:
        if node.op == "call_function" and node.target is operator.getitem:
            source, index = node.args
            element[node] = index if isinstance(source, torch.fx.Node) and _is_foreach(source) else None
            continue
        if _is_foreach(node):
            element[node] = None
            continue
        found = {element.get(a) for a in node.all_input_nodes}
        found.discard(None)
        element[node] = found.pop() if len(found) == 1 else None
    return {node: element[node] for node in calls}


def _is_foreach(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "__name__", "").startswith("_foreach_")


# -- structural comparison ------------------------------------------------------------------


class _Mismatch(Exception):
    def __init__(self, node: torch.fx.Node, what: str) -> None:
        super().__init__(f"at {node.name} ({node.format_node()}): {what}")


@dataclasses.dataclass
class _Comparison:
    """One comparison of reference calls with candidate calls (element ``j`` of a foreach list)."""

    ref: _Reference
    element: int | None
    length: int  # list length expected in the candidate (1 for the single form)
    exact: bool
    pairs: list[tuple[Any, Any]] = dataclasses.field(default_factory=list)
    mapping: dict[torch.fx.Node, torch.fx.Node] = dataclasses.field(default_factory=dict)
    bound: dict[str, torch.fx.Node] = dataclasses.field(default_factory=dict)

    def run(self, candidates: Sequence[torch.fx.Node]) -> None:
        if len(candidates) != len(self.ref.calls):
            raise _Mismatch(candidates[-1], f"{len(candidates)} nodes where the reference has "
                            f"{len(self.ref.calls)}")  # fmt: skip
        for want, got in zip(self.ref.calls, candidates):
            if want.op != got.op or want.target != got.target:
                raise _Mismatch(got, f"expected {want.format_node()}")
            if len(want.args) != len(got.args):
                raise _Mismatch(got, f"expected {want.format_node()}")
            args = list(zip(want.args, got.args))  # the argument tuple itself is no list argument
            if want.target is operator.getitem and self.ref.element[want] == 0 and self.element is not None:
                if got.args[1] != self.element:  # element 0 of the reference is element j here
                    raise _Mismatch(got, f"reads element {got.args[1]}, expected {self.element}")
                args = args[:1]
            for w, g in args:
                self.arg(got, w, g)
            if set(want.kwargs) != set(got.kwargs):
                raise _Mismatch(got, f"keyword arguments differ from {want.format_node()}")
            for key in want.kwargs:
                self.arg(got, want.kwargs[key], got.kwargs[key])
            self.mapping[want] = got

    def arg(self, at: torch.fx.Node, want: Any, got: Any) -> None:
        if isinstance(want, torch.fx.Node):
            if want in self.ref.roles:
                self.leaf(at, self.ref.roles[want], got)
            elif self.mapping.get(want) is not got:
                raise _Mismatch(at, f"argument {got} is not the reference's {want.name}")
        elif isinstance(want, (list, tuple)):
            if not isinstance(got, (list, tuple)):
                raise _Mismatch(at, f"expected a list, got {got!r}")
            if self.element is not None and len(want) == 1:
                if len(got) != self.length:
                    raise _Mismatch(at, f"list of {len(got)} where {self.length} are updated")
                self.arg(at, want[0], got[self.element])
            elif len(want) != len(got):
                raise _Mismatch(at, f"list of {len(got)}, reference has {len(want)}")
            else:
                for w, g in zip(want, got):
                    self.arg(at, w, g)
        elif isinstance(want, (bool, int, float)) and not isinstance(want, bool) and type(got) is type(want):
            if self.exact and want != got:
                raise _Mismatch(at, f"literal {got!r}, reference has {want!r}")
            self.pairs.append((want, got))
        elif type(want) is not type(got) or want != got:
            raise _Mismatch(at, f"argument {got!r}, reference has {want!r}")

    def leaf(self, at: torch.fx.Node, role: str, got: Any) -> None:
        if not is_leaf(got):
            raise _Mismatch(at, f"{role} is {got!r}, not a graph input")
        if role in self.bound and self.bound[role] is not got:
            raise _Mismatch(at, f"two different tensors play {role}")
        if got in self.bound.values() and self.bound.get(role) is not got:
            raise _Mismatch(at, f"{got.name} plays two roles")
        self.bound[role] = got


def _read_hyperparams(options: _Options, probe: dict[str, float], pairs: list[tuple[Any, Any]]) -> dict[str, float]:
    """The candidate's values where the probe's literals equal a probe value."""
    values: dict[str, float] = {}
    wanted = ["beta1", "beta2", "eps"] + ([] if options.tensor_lr else ["lr"])
    coupled_wd = options.has_weight_decay and not (options.decoupled_weight_decay and not options.tensor_lr)
    if coupled_wd:
        wanted.append("weight_decay")
    for name in wanted:
        seen = {got for want, got in pairs if want == probe[name]}
        if len(seen) != 1:
            raise Skip(f"cannot read {name} from the graph (found {sorted(seen)!r})")
        values[name] = float(seen.pop())
    if not options.has_weight_decay:
        values["weight_decay"] = 0.0
    elif not coupled_wd:
        # AdamW with a float lr folds weight decay into one literal, 1 - lr * wd.
        folded = 1 - probe["lr"] * probe["weight_decay"]
        seen = {got for want, got in pairs if want == folded}
        if len(seen) != 1:
            raise Skip("cannot read AdamW's folded 1 - lr * weight_decay from the graph")
        target = float(seen.pop())
        guess = (1 - target) / values["lr"]
        for _ in range(8):  # the division can be an ulp off; step to the value torch folds exactly
            if 1 - values["lr"] * guess == target:
                break
            guess = math.nextafter(guess, math.inf if 1 - values["lr"] * guess > target else -math.inf)
        values["weight_decay"] = guess
    if options.tensor_lr:
        values["lr"] = probe["lr"]
    return values


# -- matching one candidate -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Block:
    anchor: torch.fx.Node
    form: Form
    nodes: tuple[torch.fx.Node, ...]
    tensors: dict[str, list[torch.fx.Node]]  # role -> per-parameter leaves
    lr: torch.fx.Node | None
    hyperparams: AdamHyperparams
    device: torch.device
    dtype: torch.dtype


def match_block(gm: torch.fx.GraphModule, anchor: torch.fx.Node, form: Form,
                 region: list[torch.fx.Node]) -> Block:
    """The verified update ending at ``anchor``; raises :class:`Skip` with the reason."""
    sniffed = _sniff(gm, anchor, form, region)
    errors = []
    candidates = [(o, p) for o in (sniffed, dataclasses.replace(sniffed, tensor_lr=True)) for p in _PROBES]
    for options, probe_values in candidates:
        if not options.has_weight_decay:
            probe_values = dict(probe_values, weight_decay=0.0)
        probe = _trace_reference(options, tuple(sorted(probe_values.items())))
        try:
            nodes, comparisons = _compare_all(probe, form, anchor, region, exact=False)
        except _Mismatch as mismatch:
            errors.append(f"{'tensor' if options.tensor_lr else 'float'} lr, beta1 {probe_values['beta1']}: "
                          f"{mismatch}")  # fmt: skip
            continue
        pairs = [p for c in comparisons for p in c.pairs]
        values = _read_hyperparams(options, probe_values, pairs)
        reference = _trace_reference(options, tuple(sorted(values.items())))
        try:
            nodes, comparisons = _compare_all(reference, form, anchor, region, exact=True)
        except _Mismatch as mismatch:
            raise Skip(f"differs from torch.optim's Adam with {values}: {mismatch}") from None
        return _finish_block(gm, anchor, form, nodes, comparisons, options, values)
    raise Skip("does not match torch.optim's Adam update: " + "; ".join(errors))


def _compare_all(ref: _Reference, form: Form, anchor: torch.fx.Node, region: list[torch.fx.Node], exact: bool):
    if form == "single":
        nodes = region[-len(ref.calls) :]
        comparison = _Comparison(ref, element=None, length=1, exact=exact)
        comparison.run(nodes)
        return tuple(nodes), [comparison]
    n = len(anchor.args[0])
    size = ref.shared_count + n * ref.element_count
    if size > len(region):
        raise _Mismatch(anchor, f"{len(region)} nodes before the update, {size} expected")
    nodes = region[-size:]
    element = _elements(nodes, {a for node in nodes for a in node.all_input_nodes if is_leaf(a)})
    comparisons = []
    for j in range(n):
        comparison = _Comparison(ref, element=j, length=n, exact=exact)
        comparison.run([node for node in nodes if element[node] in (None, j)])
        comparisons.append(comparison)
    covered = {node for c in comparisons for node in c.mapping.values()}
    if len(covered) != len(nodes):
        raise _Mismatch(anchor, f"{len(nodes) - len(covered)} nodes belong to no element's update")
    return tuple(nodes), comparisons


def _finish_block(gm, anchor, form, nodes, comparisons, options: _Options, values) -> Block:
    tensors: dict[str, list[torch.fx.Node]] = {role: [] for role in PER_PARAM_ROLES}
    lrs = set()
    for comparison in comparisons:
        for role in PER_PARAM_ROLES:
            if role in comparison.bound:
                tensors[role].append(comparison.bound[role])
        if "lr" in comparison.bound:
            lrs.add(comparison.bound["lr"])
    if len(lrs) > 1:
        raise Skip("the elements of the update read different lr tensors")
    inside = set(nodes)
    for node in nodes:
        outside = [u for u in node.users if u not in inside]
        if outside:
            raise Skip(f"{node.name} is used outside the optimizer update (by {outside[0].name})")
    value = _leaf_value(gm, tensors["params"][0])
    hyper = AdamHyperparams(
        lr=None if options.tensor_lr else values["lr"],
        beta1=values["beta1"], beta2=values["beta2"], eps=values["eps"],
        weight_decay=values["weight_decay"], amsgrad=options.amsgrad, maximize=options.maximize,
        decoupled_weight_decay=options.decoupled_weight_decay,
    )  # fmt: skip
    return Block(anchor, form, nodes, tensors, lrs.pop() if lrs else None, hyper, value.device, value.dtype)
