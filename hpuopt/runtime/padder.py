"""The padded path of a piece: bucketed sizes, bucket-shaped static buffers, loads, slicing.

A piece whose padding plan (``hpuopt.passes.bucket_plan``) proves some dynamic dimensions safe to
pad gets a :class:`Padder`: the signature holds the *bucket* of each padded size instead of the
size (:class:`hpuopt.runtime.signature.BucketKeys`), static buffers have the bucket's shape, each
call copies the real rows into the front of the buffer (zeroing the rest when the plan needs
zero padding), and :func:`slice_outputs` cuts every output back to its real extent. New static
buffers start full of NaN in the pad region, so an analysis that wrongly called an op safe shows
up as NaN in tests rather than as a plausible number.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from hpuopt.config import Config
from hpuopt.diagnostics.counters import counters
from hpuopt.fx_utils import values_module
from hpuopt.records import PaddingPlan, PadSource
from hpuopt.runtime.base import copy_into
from hpuopt.runtime.bucket_policy import BucketPolicy
from hpuopt.runtime.call_checks import PER_CALL_KINDS, CallChecks

ABOVE_LARGEST = object()
"""Returned by :meth:`Padder.sizes` when a size exceeds every bucket and must run uncaptured."""


class Padder:
    """The padded path of one piece: bucketed sizes, static buffers, loads (see above)."""

    @classmethod
    def for_plan(cls, plan: PaddingPlan | None, config: Config,
                 gm: torch.fx.GraphModule | None = None) -> Padder | None:
        """The padder of a piece with padding plan ``plan``; ``None`` when it pads nothing, or
        when the plan needs values checked and ``gm`` (the piece) is not given."""
        if plan is None or not plan.padded:
            return None
        checker = per_call = None
        if plan.checks:
            if gm is None:
                return None
            if any(kind not in PER_CALL_KINDS for _, kind, _ in plan.checks):
                checker = ValueChecks(gm, plan)
            if any(kind in PER_CALL_KINDS for _, kind, _ in plan.checks):
                per_call = CallChecks(gm, plan)
        policies = {s: BucketPolicy(config, s.dim) for s in plan.padded}
        padder = cls(plan, BucketPolicy(config), checker, policies)
        padder.per_call = per_call
        return padder

    def __init__(self, plan: PaddingPlan, policy: BucketPolicy,
                 checker: ValueChecks | None = None,
                 policies: dict[PadSource, BucketPolicy] | None = None) -> None:
        self.plan = plan
        self.policy = policy
        self.policies = policies or {}
        self.sources: tuple[PadSource, ...] = plan.padded
        self.dims: dict[int, list[PadSource]] = {}
        for src in self.sources:
            self.dims.setdefault(src.input, []).append(src)
        self.size_inputs = {si.input: si.source for si in plan.size_inputs}
        self.zero = plan.required_pad_value == 0.0
        self.masks = frozenset(plan.mask_inputs)
        self.checker = checker
        self.per_call: CallChecks | None = None  # checks of the real inputs' values, per call
        self.exact_calls: dict[str, int] = {}
        """Calls this padder could not pad, by why: ``explain`` says so beside what it pads."""

    def _exact(self, why: str) -> None:
        self.exact_calls[why] = self.exact_calls.get(why, 0) + 1

    def sizes(self, args: Sequence[Any]) -> dict[PadSource, tuple[int, int]] | object | None:
        """``{source: (real, bucket)}``; ``None`` when this call cannot be padded; or
        :data:`ABOVE_LARGEST`."""
        out: dict[PadSource, tuple[int, int]] = {}
        for src in self.sources:
            # any layout pads: the bucket's buffer is dense, and only the ops' values, not
            # their input strides, were proved (an op reading strides has no rule: refused)
            n = args[src.input].shape[src.dim]
            b = self.policies.get(src, self.policy).bucket(n)
            if b is None:
                return ABOVE_LARGEST
            out[src] = (n, b)
        for a, b in self.plan.ties:
            if a in out and b in out and out[a][1] != out[b][1]:
                self._exact(f"{a} and {b} fall in different buckets")
                return None
        for a, b in self.plan.equal_sizes:
            if a in out and b in out and out[a][0] != out[b][0]:
                self._exact(f"{a} and {b} differ in size (the plan needs them equal)")
                return None
        for i in self.plan.positive_inputs:
            if not _positive_host_value(args[i]):
                self._exact(f"input {i} is not a positive host scalar (the plan needs it > 0)")
                return None
        if self.checker is not None:
            failed = self.checker.failure(args, {s: b for s, (_, b) in out.items()}, self.dims,
                                          self.size_inputs)
            if failed:
                self._exact(failed)
                return None
        if self.per_call is not None and (failed := self.per_call.failure(args)):
            self._exact(failed)
            return None
        return out

    def prepare(
        self, static: list[Any], args: Sequence[Any], sizes: dict[PadSource, tuple[int, int]]
    ) -> None:
        """Replaces the padded inputs' static buffers by bucket-shaped ones, sets size inputs."""
        for i, srcs in self.dims.items():
            arg = args[i]
            shape = list(arg.shape)
            for src in srcs:
                shape[src.dim] = sizes[src][1]
            buf = torch.empty(shape, dtype=arg.dtype, device=arg.device)
            if i in self.masks:
                buf.fill_(float("-inf"))
            elif self.zero:
                buf.zero_()
            elif buf.is_floating_point():
                buf.fill_(float("nan"))
            static[i] = buf
            self.real_part(buf, i, sizes).copy_(arg)
        for i, src in self.size_inputs.items():
            static[i] = sizes[src][1]

    def load(
        self,
        inputs: list[Any],
        args: Sequence[Any],
        sizes: dict[PadSource, tuple[int, int]],
        copied: Sequence[int],
    ) -> None:
        """Copies this call's ``copied`` arguments into the static ``inputs``: the real rows to
        the front of each padded buffer (the rest zeroed when the plan needs zero padding, and
        -inf in an additive mask's)."""
        for i in copied:
            if i in self.dims:
                buf = inputs[i]
                if i in self.masks:  # an additive mask: its pad keys stay masked
                    buf.fill_(float("-inf"))
                elif self.zero:
                    buf.zero_()
                self.real_part(buf, i, sizes).copy_(args[i], non_blocking=True)
            else:
                copy_into(inputs[i], args[i], non_blocking=True)

    def count(self, inputs: Sequence[Any], args: Sequence[Any], copied: Sequence[int]) -> None:
        """Adds one padded call's real and padded elements to the counters (pad waste)."""
        real_elems = pad_elems = 0
        for i in copied:
            if i in self.dims:
                n = args[i].numel()
                real_elems += n
                pad_elems += inputs[i].numel() - n
        counters.real_elements += real_elems
        counters.padded_elements += pad_elems

    def describe(self) -> str:
        """What this padder pads, for explain (and which calls it could not pad, and why)."""
        dims = ", ".join(str(s) for s in self.sources)
        zero = " with zero padding" if self.zero else ""
        where = self.policy.describe()
        special = [f"{s}: {p.describe()}" for s, p in self.policies.items()
                   if p.describe() != where]
        if special:
            where = "; ".join(special) + f"; others {where}"
        text = f"pads {dims} to {where}{zero}"
        if self.exact_calls:
            text += "; ran exact: " + ", ".join(
                f"{n} call{'s' if n > 1 else ''} ({why})" for why, n in self.exact_calls.items())
        return text

    def real_part(self, buf: torch.Tensor, i: int,
                  sizes: dict[PadSource, tuple[int, int]]) -> torch.Tensor:
        """The real (unpadded) part of input ``i``'s bucket-shaped ``buf``, as a view."""
        view = buf
        for src in self.dims[i]:
            view = view.narrow(src.dim, 0, sizes[src][0])
        return view


class ValueChecks:
    """The values a plan needs checked (``PaddingPlan.checks``), computed from the piece's own
    nodes at the bucket's sizes on the real parameters and buffers: indices read from a buffer
    in range, a buffer cut to the padded length long enough. Checked once per bucket and
    version of the buffers read (a device read, so not on every call)."""

    def __init__(self, gm: torch.fx.GraphModule, plan: PaddingPlan) -> None:
        self.kinds = [(kind, bound, name) for name, kind, bound in plan.checks
                      if kind not in PER_CALL_KINDS]

        def pick(by_name: dict[str, torch.fx.Node], copy: Any) -> list[Any]:
            outs = []
            for kind, _, name in self.kinds:  # the checked value, and an extent's extra operand
                node = by_name[name]
                extra = node.args[3] if kind == "extent" and len(node.args) > 3 else None
                outs += [copy(node), copy(extra)]
            return outs

        self.module = values_module(gm, pick)
        self.reads = [i for i, n in enumerate(self.module.graph.find_nodes(op="placeholder"))
                      if n.users]
        self.verdicts: dict[tuple[Any, ...], str] = {}

    def failure(self, args: Sequence[Any], buckets: dict[PadSource, int],
                dims: dict[int, list[PadSource]], size_inputs: dict[int, PadSource]) -> str:
        """``""`` when every check holds at these buckets; else what failed."""
        key = (tuple(sorted(buckets.items())), tuple(
            (id(args[i]), getattr(args[i], "_version", 0)) for i in self.reads
            if i not in dims and i not in size_inputs))
        if key not in self.verdicts:
            self.verdicts[key] = self._evaluate(args, buckets, dims, size_inputs)
        return self.verdicts[key]

    def _evaluate(self, args: Sequence[Any], buckets: dict[PadSource, int],
                  dims: dict[int, list[PadSource]], size_inputs: dict[int, PadSource]) -> str:
        inputs = list(args)
        for i, srcs in dims.items():  # the checked values do not read padded inputs' contents
            shape = list(args[i].shape)
            for src in srcs:
                shape[src.dim] = buckets[src]
            inputs[i] = torch.zeros(shape, dtype=args[i].dtype, device=args[i].device)
        for i, src in size_inputs.items():
            inputs[i] = buckets[src]
        try:
            with torch.no_grad():
                values = self.module(*inputs)
        except Exception as exc:  # noqa: BLE001 - a check that cannot run fails
            first = str(exc).splitlines()[0][:100] if str(exc) else ""
            return f"computing the checked values at the bucket raised {type(exc).__name__}: {first}"
        for k, (kind, bound, name) in enumerate(self.kinds):
            v, extra = values[2 * k], values[2 * k + 1]
            if kind == "range" and v.numel() and not (int(v.min()) >= 0 and int(v.max()) < bound):
                return f"{name} holds indices outside [0, {bound}) at the bucket"
            if kind == "extent" and isinstance(extra, int) and v.shape[bound] != extra:
                return f"{name} is shorter than the bucket ({v.shape[bound]} < {extra})"
        return ""


def _positive_host_value(value: Any) -> bool:
    """``value > 0`` for a number or a host (CPU) 0-dim tensor; a device tensor would need a
    synchronisation to read, so it does not count."""
    if isinstance(value, torch.Tensor):
        return value.device.type == "cpu" and value.numel() == 1 and value.item() > 0
    return isinstance(value, (int, float)) and value > 0


def describe_padding(padder: Padder | None, plan: PaddingPlan | None) -> str:
    """What a piece pads, or why it runs at exact shapes (``""`` when nothing was proposed)."""
    if padder is not None:
        exact = [v for v in plan.inputs if not v.safe] if plan is not None else []
        if not exact:
            return padder.describe()
        why = "; ".join(str(r) for r in dict.fromkeys(r for v in exact for r in v.reasons[:1]))
        dims = ", ".join(str(v.source) for v in exact)
        return f"{padder.describe()}; exact sizes for {dims}: {why}"
    if plan is not None and plan.reasons:
        return "exact shapes: " + "; ".join(str(r) for r in plan.reasons[:3])
    return ""


def slice_outputs(plan: PaddingPlan, outputs: Sequence[Any], real_inputs: Sequence[Any],
                  padded_inputs: Sequence[Any]) -> list[Any]:
    """Cuts every padded output dim of ``plan`` back to its real extent (``narrow``, no copy).

    A cut along an inner dim leaves a view whose rows keep the bucket's stride, which the
    unpadded run never returns (eager's output is dense, so ``view(-1, n)`` works on it): such an
    output becomes a dense copy, marked ``_hpuopt_fresh`` so it is not cloned again."""
    result = list(outputs)
    cut: set[int] = set()
    for od in plan.outputs:
        n = _extent_of(real_inputs[od.source.input], od.source.dim)
        big = _extent_of(padded_inputs[od.source.input], od.source.dim)
        out = result[od.output]
        real = od.real_extent(int(out.shape[od.dim]), n, big, real_inputs)
        result[od.output] = out.narrow(od.dim, 0, real)
        cut.add(od.output)
    for k in cut:
        view = result[k]
        if not view.is_contiguous() and outputs[k].is_contiguous():
            dense = view.contiguous()
            dense._hpuopt_fresh = True  # type: ignore[attr-defined]
            result[k] = dense
    return result


def _extent_of(value: Any, dim: int) -> int:
    return int(value.shape[dim]) if isinstance(value, torch.Tensor) else int(value)
