"""Fused Adam / AdamW: one multi-tensor kernel call instead of O(parameters) graph nodes.

What it finds
-------------
The body of ``torch.optim.Adam.step`` / ``torch.optim.AdamW.step`` as Dynamo traces it. ``step()``
graph-breaks before and after the update (``_use_grad_for_differentiable``), so the update is a
graph of its own; inside it Dynamo always takes the *capturable* code path. Two forms exist:

- ``foreach=False`` (the CPU default) unrolls one block per parameter, ~24 nodes each::

      step_t += 1
      exp_avg.lerp_(grad, 0.1)
      mul_ = exp_avg_sq.mul_(0.999); ...; mul_.copy_(prims.fma(grad * grad, 0.001, mul_))
      step_size_neg = (0.01 / (1 - 0.9 ** step_t)).neg()
      ...
      param.addcdiv_(exp_avg, denom)                       <- the anchor

- ``foreach=True`` holds one ``torch._foreach_*`` chain per device/dtype group of a param group,
  plus O(parameters) ``getitem``/``full_like`` nodes, ending in
  ``torch._foreach_addcdiv_(params, exp_avgs, denoms)`` (the anchor).

How it matches
--------------
Nothing here lists Adam's ops. The reference is torch's own functional ``torch.optim.adam.adam``,
traced by Dynamo (``capturable=True``, like Dynamo's optimizer tracing) on one tiny parameter:

1. *Sniff* the boolean options around an anchor (weight decay applied how, ``amsgrad``,
   ``maximize``; each a one-line documented check) to choose a reference.
2. *Probe*: trace the reference with distinctive probe values (``lr=0.0123``, ...; a second set
   where Dynamo's polyfills branch on a value) and match it
   structurally against the candidate, literals ignored. Probe literals that equal a probe value
   mark where that hyperparameter sits; the candidate's literal there is its real value.
3. *Verify*: trace the reference again with the values read and require an exact match, literals
   included. Per parameter for the unrolled form; for the foreach form, each element's projection
   of the candidate (list positions ``j``, ``getitem(.., j)`` and what hangs off them) must equal
   the one-element reference.

Any difference leaves the graph unchanged and records a :class:`FusedAdamSkipped` with the reason
and the node (a modified update rule, Tensor betas, complex parameters, no fused kernel for the
device, an intermediate used outside the update, ...). References are memoised per option set.

What it changes
---------------
Each run of consecutive matched blocks sharing hyperparameters, device and dtype becomes::

    _foreach_add_ = torch._foreach_add_([step_0, ..., step_n], 1)
    _fused_adam_ = torch._fused_adam_([p_0, ...], [g_0, ...], [m_0, ...], [v_0, ...], [],
                                      [step_0, ...], lr=0.01, beta1=0.9, beta2=0.999,
                                      weight_decay=0.0, eps=1e-08, amsgrad=False, maximize=False)

(``torch._fused_adamw_`` for decoupled weight decay; ``lr`` stays a graph input when it is a
Tensor.) The kernel is chosen per device by :func:`fused_adam_kernel`. With ``functional=True``
(for graphs that then go through AOTAutograd) the out-of-place ``aten._fused_adam(w)`` is emitted
and its results are copied back with ``torch._foreach_copy_``.

What it guarantees
------------------
The same state tensors (param, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ``step``) are
updated in place with the same algorithm ``torch.optim.Adam(fused=True)`` runs, so the optimizer's
``state_dict`` stays loadable by plain ``torch.optim`` and back. Results equal the traced update up
to kernel rounding (a few ulps). The pass never changes a graph it did not fully verify.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.fx

from hpuopt.config import Config
from hpuopt.passes.adam_matching import (
    PER_PARAM_ROLES,
    AdamHyperparams,
    Block,
    Form,
    Skip,
    anchor_form,
    match_block,
)
from hpuopt.records import Finding
from hpuopt.passes.base import GraphPass, PassResult, Stage

log = logging.getLogger(__name__)

# -- findings ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FusedAdamRewrite(Finding):
    """One fused call emitted: how many parameters it updates and which nodes it replaced."""

    pass_name: ClassVar[str] = "fused_adam"

    node: str  # the new fused node
    form: Form
    num_params: int
    hyperparams: AdamHyperparams
    replaced_nodes: int

    @property
    def reason(self) -> str:
        return f"{self.replaced_nodes} nodes over {self.num_params} parameter(s) became one fused call"


@dataclasses.dataclass(frozen=True)
class FusedAdamSkipped(Finding):
    """An update candidate (anchored at ``node``) left unchanged, and why."""

    pass_name: ClassVar[str] = "fused_adam"
    applied: ClassVar[bool] = False

    reason: str
    node: str


# -- the per-device kernel hook ---------------------------------------------------------------


def fused_adam_kernel(device: torch.device, decoupled_weight_decay: bool) -> Callable[..., Any] | None:
    """The fused multi-tensor Adam(W) op for ``device``, or ``None`` when there is none.

    CPU, CUDA (and the other devices ``torch.optim`` lists as fused-capable) use
    ``torch._fused_adam_`` / ``torch._fused_adamw_``:
    ``(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr, beta1, beta2,
    weight_decay, eps, amsgrad, maximize, grad_scale=None, found_inf=None) -> ()``; ``lr`` may be
    a float or a Tensor (the ``tensor_lr`` overload); the op does *not* increment ``state_steps``.

    HPU hook: on Gaudi, Habana's fused AdamW (``habana_frameworks.torch.hpex.optimizers.FusedAdamW``,
    whose kernel is exposed as a ``torch.ops.hpu`` op) should be returned here, wrapped to the
    signature above. Nothing imports ``habana_frameworks`` outside ``hpuopt/runtime``; until that
    wrapper exists HPU gets ``None`` and the pass records why it skipped.
    """
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    if device.type == "hpu":
        return None
    if device.type not in _get_fused_kernels_supported_devices():
        return None
    return torch._fused_adamw_ if decoupled_weight_decay else torch._fused_adam_


# -- the pass -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FusedAdamPass(GraphPass):
    """Rewrites traced ``torch.optim.Adam``/``AdamW`` updates into one fused multi-tensor call."""

    name: ClassVar[str] = "fused_adam"
    stage: ClassVar[Stage] = "pre_aot"

    functional: bool = False
    """Emit the out-of-place ``aten._fused_adam(w)`` plus ``_foreach_copy_`` of its results into
    the state instead of the in-place op. Needed when the graph then goes through AOTAutograd: in
    torch 2.11-2.13 functionalization of ``_fused_adam(w)_`` fails an internal assert ("mutating a
    non-functional tensor with a functional tensor"), while the out-of-place op functionalizes
    (and Inductor re-inplaces the copies). Without AOTAutograd keep the in-place op: no extra
    buffers or copies."""

    def run(self, gm: torch.fx.GraphModule, config: Config) -> PassResult:
        calls = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
        position = {n: i for i, n in enumerate(calls)}
        findings: list[Any] = []
        blocks: list[Block] = []
        previous_end = -1
        for anchor in calls:
            form = anchor_form(anchor)
            if form is None:
                continue
            region = calls[previous_end + 1 : position[anchor] + 1]
            previous_end = position[anchor]
            try:
                blocks.append(match_block(gm, anchor, form, region))
            except Skip as skip:
                findings.append(FusedAdamSkipped(reason=str(skip), node=anchor.name))
                log.debug("fused_adam: skipped %s: %s", anchor.name, skip)

        modified = False
        for run in _runs(blocks, position):
            try:
                findings.append(_rewrite(gm, run, self.functional))
                modified = True
            except Skip as skip:
                findings.append(FusedAdamSkipped(reason=str(skip), node=run[-1].anchor.name))
        if modified:
            for node in list(gm.graph.nodes):
                if node.op == "get_attr" and not node.users:
                    gm.graph.erase_node(node)
        return PassResult(gm, modified, tuple(findings))


# -- rewriting ---------------------------------------------------------------------------------


def _runs(blocks: list[Block], position: dict[torch.fx.Node, int]) -> list[list[Block]]:
    """Consecutive blocks (no foreign node between them) that one fused call can update."""
    runs: list[list[Block]] = []
    for block in blocks:
        if runs:
            last = runs[-1][-1]
            same = (last.hyperparams, last.lr, last.device, last.dtype) == (
                block.hyperparams, block.lr, block.device, block.dtype)  # fmt: skip
            if same and position[block.nodes[0]] == position[last.nodes[-1]] + 1:
                runs[-1].append(block)
                continue
        runs.append([block])
    return runs


# The out-of-place variant of each in-place kernel, and which of its results go back where.
_OUT_OF_PLACE = {
    torch._fused_adam_: torch.ops.aten._fused_adam,
    torch._fused_adamw_: torch.ops.aten._fused_adamw,
}
_RESULTS = {0: "params", 2: "exp_avgs", 3: "exp_avg_sqs", 4: "max_exp_avg_sqs"}


def _rewrite(gm: torch.fx.GraphModule, run: list[Block], functional: bool) -> FusedAdamRewrite:
    first, last = run[0], run[-1]
    hyper = first.hyperparams
    kernel = fused_adam_kernel(first.device, hyper.decoupled_weight_decay)
    if kernel is None:
        raise Skip(f"no fused Adam kernel for device {first.device}")
    if functional:
        if kernel not in _OUT_OF_PLACE:
            raise Skip(f"no out-of-place variant of {kernel}")
        packet = _OUT_OF_PLACE[kernel]
        kernel = packet.default if hyper.lr is not None else packet.tensor_lr
    lists = {role: [leaf for block in run for leaf in block.tensors[role]] for role in PER_PARAM_ROLES}
    graph = gm.graph
    with graph.inserting_before(last.anchor):
        graph.call_function(torch._foreach_add_, (lists["state_steps"], 1))
        fused = graph.call_function(
            kernel,
            tuple(lists[role] for role in PER_PARAM_ROLES),
            {
                "lr": first.lr if hyper.lr is None else hyper.lr,
                "beta1": hyper.beta1,
                "beta2": hyper.beta2,
                "weight_decay": hyper.weight_decay,
                "eps": hyper.eps,
                "amsgrad": hyper.amsgrad,
                "maximize": hyper.maximize,
            },
        )
        if functional:
            for index, role in _RESULTS.items():
                if lists[role]:
                    result = graph.call_function(operator.getitem, (fused, index))
                    graph.call_function(torch._foreach_copy_, (lists[role], result))
    replaced = [node for block in run for node in block.nodes]
    for node in reversed(replaced):
        graph.erase_node(node)
    log.debug("fused_adam: %d nodes over %d params -> %s", len(replaced), len(lists["params"]), fused.name)
    return FusedAdamRewrite(
        node=fused.name,
        form=first.form,
        num_params=len(lists["params"]),
        hyperparams=hyper,
        replaced_nodes=len(replaced),
    )
