"""Optimizer steps that compile into one graph.

``torch.optim`` wraps every ``step()`` in a decorator that calls ``torch._dynamo.graph_break()``
before and after the update, so that AOTAutograd sees the update as an inference graph (an
allocation concern of Inductor's). Under ``backend="hpugraph"`` those two breaks cost more than
the update itself once the update is one fused kernel: three Dynamo frames instead of one, each
with its own guards over every parameter, gradient and state tensor, and a separate graph (with
its own runtime wrapper and replay) for whatever precedes the step, such as gradient clipping.

:func:`step` runs exactly what ``optimizer.step()`` runs — the same update code, the same grad
mode (``defaults["differentiable"]``), the step pre- and post-hooks in the same order — without
the two graph breaks, so ``clip_grad_norm_`` and the update land in one graph that the fused
rewrites turn into a handful of kernels::

    @torch.compile(backend="hpugraph")
    def train_step():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        hpuopt.optim.step(opt)

Outside ``torch.compile`` it is an ordinary eager step. An optimizer whose ``step`` does not use
torch's decorator (a third-party optimizer) is simply stepped with ``optimizer.step()``.

Under ``torch.compile``, an Adam or AdamW CPU parameter group that leaves ``foreach`` unset
(``None``: torch picks, and on CPU it picks one block of ops per parameter; on CUDA it already
picks foreach) is traced in its ``foreach`` form: one chain of multi-tensor ops per group
instead of one block per parameter, which Dynamo traces in about half the time (3.6 s against
1.8 s at 100 parameters, ``benchmarks/optimizer.py``). The fused rewrite turns either form
into the same fused kernel; where it does not fire, the foreach form runs, which torch documents
as the same algorithm. The group's ``foreach`` is back to ``None`` when the step returns, so the
optimizer's ``state_dict`` is unchanged. A group that sets ``foreach`` or ``fused``, or a
``differentiable`` or ``capturable`` optimizer, is traced as written.

With an LR scheduler, give the optimizer a tensor learning rate (``Adam(params,
lr=torch.tensor(1e-3))``): a float ``lr`` is a constant of the compiled graph, so every new value
the scheduler sets recompiles it (Dynamo gives up after its recompile limit and runs the step
uncompiled); a tensor ``lr`` is an input of the graph. Eagerly, :func:`step` records that the
optimizer stepped the way the scheduler's wrapper around ``optimizer.step`` does; under
``torch.compile`` Dynamo drops that write, and the scheduler's first ``step()`` warns that it
seems to come before the optimizer's. That one warning is spurious.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import chain
from typing import Any

import torch
import torch.optim.optimizer as _torch_optimizer

__all__ = ["step"]


_DECORATOR_CODE = _torch_optimizer._use_grad_for_differentiable(lambda self: None).__code__
"""The code object of the wrapper ``torch.optim`` puts around ``step`` (taken at import, so
Dynamo never traces its making)."""


def undecorated_step(cls: type) -> Callable[..., Any] | None:
    """The update function under ``cls.step``'s graph-breaking decorator, or ``None`` when
    ``cls.step`` is not decorated that way."""
    fn: Any = getattr(cls, "step", None)
    code = _DECORATOR_CODE
    seen = 0
    while fn is not None and seen < 8:  # profile hook -> grad-mode wrapper -> update
        if getattr(fn, "__code__", None) is code:
            return getattr(fn, "__wrapped__", None)
        fn = getattr(fn, "__wrapped__", None)
        seen += 1
    return None


_FOREACH_WHEN_COMPILING = (torch.optim.Adam, torch.optim.AdamW)
"""Optimizers whose CPU groups with ``foreach=None`` are traced in their foreach form (module
docstring): those the fused rewrite recognises in both forms."""


def _groups_traced_as_foreach(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The groups to trace in their foreach form: under ``torch.compile`` only, CPU groups that
    leave ``foreach`` to torch (elsewhere torch already picks the foreach form)."""
    if not torch.compiler.is_compiling() or not isinstance(optimizer, _FOREACH_WHEN_COMPILING):
        return []
    if optimizer.defaults.get("differentiable", False) or optimizer.defaults.get("capturable"):
        return []
    return [
        g for g in optimizer.param_groups
        if g.get("foreach", False) is None
        and not g.get("fused")
        and all(p.device.type == "cpu" for p in g["params"])
    ]


def step(optimizer: torch.optim.Optimizer, closure: Callable[[], Any] | None = None) -> Any:
    """``optimizer.step(closure)`` without ``torch.optim``'s graph breaks (module docstring)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"hpuopt.optim.step takes a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    # What an LR scheduler's wrapper around ``optimizer.step`` records before it steps (the
    # scheduler warns when its own step() seems to come first); this call goes around that
    # wrapper. Set whether or not a scheduler is attached: only schedulers read it. (Under
    # torch.compile, Dynamo drops attribute writes to an optimizer whose update it traces, so a
    # scheduler still warns once there; the module docstring says so. Dynamo on torch 2.11
    # refuses the write outright, so it is made only outside a trace.)
    if not torch.compiler.is_compiling():
        optimizer._opt_called = True
    update = undecorated_step(type(optimizer))
    if update is None:
        return optimizer.step() if closure is None else optimizer.step(closure)
    args: tuple[Any, ...] = (optimizer,) if closure is None else (optimizer, closure)
    kwargs: dict[str, Any] = {}
    for pre_hook in chain(
        _torch_optimizer._global_optimizer_pre_hooks.values(),
        optimizer._optimizer_step_pre_hooks.values(),
    ):
        result = pre_hook(optimizer, args, kwargs)
        if result is not None:
            if not (isinstance(result, tuple) and len(result) == 2):
                raise RuntimeError(
                    f"optimizer step pre-hook {pre_hook} must return None or (args, kwargs), "
                    f"got {result!r}"
                )
            args, kwargs = result
    prev = torch.is_grad_enabled()
    unset = _groups_traced_as_foreach(optimizer)
    torch.set_grad_enabled(optimizer.defaults.get("differentiable", False))
    try:
        for group in unset:
            group["foreach"] = True
        out = update(*args, **kwargs)
    finally:
        for group in unset:
            group["foreach"] = None
            # Dynamo traces every optimizer as capturable=True without changing the group, but
            # a group written to inside the trace is written back whole afterwards, with that
            # traced-only value in it. A CPU group is never capturable (torch refuses to step
            # it eagerly), so False is what the group held.
            group["capturable"] = False
        torch.set_grad_enabled(prev)
    optimizer._optimizer_step_code()
    for post_hook in chain(
        optimizer._optimizer_step_post_hooks.values(),
        _torch_optimizer._global_optimizer_post_hooks.values(),
    ):
        post_hook(optimizer, args, kwargs)
    return out
