"""Signatures without a compiled model: the argument roles, exact keys, bucket keys, and which key
strategy a call gets (bucketed, exact when it cannot be padded, none above the largest bucket)."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from hpuopt import Config
from hpuopt.records import InputVerdict, PaddingPlan, PadSource, SizeInput
from hpuopt.runtime.padder import Padder
from hpuopt.runtime.signature import (
    EXACT_KEYS,
    ArgRoles,
    BucketKeys,
    arg_roles,
    call_keys,
    describe_key,
)

X0, Y0 = PadSource(0, 0), PadSource(1, 0)


def _roles(**fields) -> ArgRoles:
    base = {"tensor": (0, 1), "copied": (0, 1), "stable": (), "keyed": (0, 1), "mutated": ()}
    return ArgRoles(**{**base, **fields})


def _padder(*sources: PadSource, ties=(), size_inputs=(), **options) -> Padder:
    plan = PaddingPlan(
        inputs=tuple(InputVerdict(s, safe=True) for s in sources),
        ties=ties,
        size_inputs=size_inputs,
    )
    padder = Padder.for_plan(plan, Config.from_options(options, environ={}))
    assert padder is not None
    return padder


def test_arg_roles_keys_symbolic_arguments_and_finds_mutations():
    def f(x, w, n):
        x.add_(1.0)
        return x @ w * n

    gm = make_fx(f, tracing_mode="symbolic")(torch.randn(3, 4), torch.randn(4, 2), 5)
    roles = arg_roles(gm, stable=[False, True, False])
    assert (roles.tensor, roles.copied, roles.stable) == ((0, 1), (0,), (1,))
    assert roles.keyed == (0, 1, 2)  # symbolic shapes and a SymInt
    assert (roles.mutated, roles.mutated_copied) == ((0,), (0,))
    concrete = arg_roles(make_fx(f)(torch.randn(3, 4), torch.randn(4, 2), 5), [False] * 3)
    assert concrete.keyed == (2,)  # static shapes; a Python scalar without metadata is keyed
    static = arg_roles(make_fx(torch.mm)(torch.randn(3, 4), torch.randn(4, 2)), [False] * 2)
    assert static.keyed == () and static.copied == (0, 1)  # the empty key


def test_exact_key_holds_shape_strides_and_values_of_keyed_arguments_only():
    roles = _roles(tensor=(0, 2), copied=(0, 2), keyed=(0, 1))
    x = torch.randn(4, 6)
    key = EXACT_KEYS.key(roles, [x, 3, torch.randn(2)])
    assert key == EXACT_KEYS.key(roles, [torch.randn(4, 6), 3, torch.randn(9)])  # 2 not keyed
    assert key != EXACT_KEYS.key(roles, [torch.randn(5, 6), 3, torch.randn(2)])
    assert key != EXACT_KEYS.key(roles, [x.t().contiguous().t(), 3, torch.randn(2)])  # strides
    assert key != EXACT_KEYS.key(roles, [x, 4, torch.randn(2)])
    assert EXACT_KEYS.key(_roles(keyed=()), [x, x]) == ()
    assert describe_key(key) == "(4x6, 3)"


def test_exact_key_of_a_full_storage_argument_holds_its_storage():
    roles = _roles(tensor=(0,), copied=(0,), keyed=(0,), full_storage=(0,))
    small, big = torch.randn(8), torch.randn(16)
    a, b = small[2:6], big[2:6]  # the same view of storages of different sizes
    assert (a.shape, a.stride()) == (b.shape, b.stride())
    assert EXACT_KEYS.key(roles, [a]) != EXACT_KEYS.key(roles, [b])
    assert EXACT_KEYS.key(roles, [a]) != EXACT_KEYS.key(roles, [small[1:5]])  # the offset
    assert EXACT_KEYS.key(roles, [a]) == EXACT_KEYS.key(roles, [torch.randn(8)[2:6]])


def test_bucket_key_holds_buckets_not_sizes():
    padder = _padder(X0)
    roles = _roles(keyed=(0, 1))
    w = torch.randn(4, 4)

    def key(n):
        keys = call_keys(padder, [torch.randn(n, 4), w])
        assert isinstance(keys, BucketKeys)
        return keys.key(roles, [torch.randn(n, 4), w])

    assert key(3) == key(4) == (("pad", (4, 4)), ((4, 4), (4, 1)))
    assert key(5) == key(7) == key(8) != key(4)
    assert key(9)[0] == ("pad", (16, 4))
    assert describe_key(key(5)) == "(pad 8x4, 4x4)"


def test_size_input_is_keyed_by_its_bucket():
    padder = _padder(X0, size_inputs=(SizeInput(1, X0),))
    roles = _roles(tensor=(0,), copied=(0,), keyed=(0, 1))
    keys = call_keys(padder, [torch.randn(5, 2), 5])
    assert isinstance(keys, BucketKeys)
    assert keys.sizes == {X0: (5, 8)}
    assert keys.key(roles, [torch.randn(5, 2), 5]) == (("pad", (8, 2)), ("size", 8))


def test_tied_sizes_in_different_buckets_fall_back_to_exact_keys():
    padder = _padder(X0, Y0, ties=((X0, Y0),))
    tied = call_keys(padder, [torch.randn(5, 2), torch.randn(7, 2)])  # both bucket 8
    assert isinstance(tied, BucketKeys)
    assert tied.sizes == {X0: (5, 8), Y0: (7, 8)}
    assert call_keys(padder, [torch.randn(3, 2), torch.randn(5, 2)]) is EXACT_KEYS  # 4 vs 8
    untied = _padder(X0, Y0)
    assert isinstance(call_keys(untied, [torch.randn(3, 2), torch.randn(5, 2)]), BucketKeys)


def test_non_contiguous_input_is_keyed_by_its_bucket():
    padder = _padder(X0)
    x = torch.randn(4, 5).t()  # 5x4, not contiguous: its real part is copied into a dense bucket
    keys = call_keys(padder, [x, torch.randn(4, 4)])
    assert isinstance(keys, BucketKeys) and keys.sizes == {X0: (5, 8)}
    dense = call_keys(padder, [x.contiguous(), torch.randn(4, 4)])
    assert isinstance(dense, BucketKeys) and dense.sizes == keys.sizes
    assert call_keys(None, [x]) is EXACT_KEYS  # a piece that pads nothing


@pytest.mark.parametrize("above", ["exact", "uncaptured"])
def test_above_the_largest_bucket(above):
    padder = _padder(X0, bucket_sizes=[4, 8], above_largest=above)
    keys = call_keys(padder, [torch.randn(11, 2)])
    if above == "uncaptured":
        assert keys is None
    else:
        assert isinstance(keys, BucketKeys)
        assert keys.sizes == {X0: (11, 11)}  # captured at its own size
    assert isinstance(call_keys(padder, [torch.randn(8, 2)]), BucketKeys)


def test_adopt_reads_parameters_in_place_and_keys_non_tensors():
    roles = _roles(tensor=(0, 1, 2), copied=(0, 1, 2), keyed=(0,), mutated=(1, 2),
                 mutated_copied=(1, 2))
    param = torch.nn.Parameter(torch.randn(3))
    adopted = roles.adopt([torch.randn(2), param, None])
    assert adopted.stable == (1,) and adopted.copied == (0,)
    assert adopted.tensor == (0, 1) and adopted.keyed == (0, 2)
    assert adopted.mutated == (1,) and adopted.mutated_copied == ()
    assert roles.adopt([torch.randn(2), torch.randn(3), torch.randn(1)]) is roles


def test_with_split_derives_the_mutated_copies():
    roles = _roles(tensor=(0, 1, 2), copied=(0, 1), stable=(2,), mutated=(1, 2),
                 mutated_copied=(1,))
    moved = roles.with_split(stable=(1,), copied=(0, 2))
    assert (moved.stable, moved.copied, moved.mutated_copied) == ((1,), (0, 2), (2,))
