"""The address policy alone: promotion of copied inputs that never move, demotion of stable inputs
that keep moving, fed addresses and moves by hand (no compiled model)."""

from __future__ import annotations

import torch

from hpuopt.runtime.address_policy import (
    _MOVES_BEFORE_COPY,
    _SAME_BEFORE_STABLE,
    AddressPolicy,
    Split,
    addresses,
)
from hpuopt.runtime.signature import ArgRoles

# 0, 1: copied activations; 2: keyed (dynamic shape); 3: a parameter; 4: a size
ROLES = ArgRoles(
    tensor=(0, 1, 2, 3), copied=(0, 1, 2), stable=(3,), keyed=(2, 4), mutated=(1,),
    mutated_copied=(1,),
)


def _watch(policy: AddressPolicy, roles: ArgRoles, calls: list[dict[int, int]], **kw):
    """Feeds one ``{index: address}`` per call; returns what each call answered."""
    out = []
    for seen in calls:
        watched = policy.watched(roles)
        out.append(policy.observe(roles, {i: a for i, a in seen.items() if i in watched}, **kw))
    return out


def test_inputs_at_the_same_address_are_promoted_after_the_window():
    policy = AddressPolicy()
    assert list(policy.watched(ROLES)) == [0, 1]  # keyed and stable ones are not candidates
    same = {0: 1000, 1: 2000, 2: 3000}
    answers = _watch(policy, ROLES, [same] * (_SAME_BEFORE_STABLE + 1))
    assert answers[:-1] == [None] * _SAME_BEFORE_STABLE
    assert answers[-1] == Split(stable=(0, 1, 3), copied=(2,), changed=(0, 1))
    assert not policy.watching
    assert policy.observe(ROLES, same) is None  # the window is closed for good
    promoted = ROLES.with_split(answers[-1].stable, answers[-1].copied)
    assert promoted.mutated_copied == ()  # the mutated input is now written in place


def test_an_input_that_moves_in_the_window_stays_copied():
    policy = AddressPolicy()
    calls = [{0: 1000, 1: 2000}, {0: 1000, 1: 2064}] + [{0: 1000, 1: 2000}] * 3
    answers = _watch(policy, ROLES, calls)
    assert answers[_SAME_BEFORE_STABLE] == Split(stable=(0, 3), copied=(1, 2), changed=(0,))
    assert [a for a in answers if a is not None] == [answers[_SAME_BEFORE_STABLE]]


def test_nothing_is_promoted_when_every_candidate_moves():
    policy = AddressPolicy()
    answers = _watch(policy, ROLES, [{0: 10 * k, 1: 10 * k + 5} for k in range(1, 6)])
    assert answers == [None] * 5
    assert not policy.watching  # stopped watching once nothing was left


def test_no_candidates_ends_the_watch_on_the_first_call():
    policy = AddressPolicy()
    assert policy.observe(ROLES, {}) is None
    assert not policy.watching
    assert policy.watched(ROLES) == ()


def test_a_piece_with_an_uncaptured_signature_is_not_promoted():
    policy = AddressPolicy()
    same = {0: 1000, 1: 2000}
    answers = _watch(policy, ROLES, [same] * (_SAME_BEFORE_STABLE + 1), can_promote=False)
    assert answers == [None] * (_SAME_BEFORE_STABLE + 1)
    assert not policy.watching


def test_a_stable_input_is_copied_after_it_moved_repeatedly():
    policy = AddressPolicy()
    for _ in range(_MOVES_BEFORE_COPY - 1):
        assert policy.moved(ROLES, [3]) is None  # captured again, still read in place
    assert policy.moved(ROLES, [3]) == Split(stable=(), copied=(0, 1, 2, 3), changed=(3,))


def test_moves_are_counted_per_input():
    policy = AddressPolicy()
    roles = ROLES.with_split(stable=(0, 3), copied=(1, 2))
    assert policy.moved(roles, [0]) is None
    assert policy.moved(roles, [3]) is None
    split = policy.moved(roles, [0, 3])
    assert split == Split(stable=(), copied=(0, 1, 2, 3), changed=(0, 3))


def test_a_promoted_input_that_moves_is_copied_again_for_good():
    policy = AddressPolicy()
    same = {0: 1000, 1: 2000}
    split = _watch(policy, ROLES, [same] * (_SAME_BEFORE_STABLE + 1))[-1]
    roles = ROLES.with_split(split.stable, split.copied)
    assert roles.stable == (0, 1, 3)
    demoted = policy.moved(roles, [0])  # a promoted input moves once: copied right away
    assert demoted == Split(stable=(1, 3), copied=(0, 2), changed=(0,))
    roles = roles.with_split(demoted.stable, demoted.copied)
    for _ in range(5):  # back at one address: never watched, never promoted again
        assert policy.observe(roles, {0: 1000}) is None
    assert policy.watched(roles) == ()
    assert policy.moved(roles, [3]) is None  # the parameter still needs its own two moves


def test_addresses_reads_tensors_on_the_runtime_device_only():
    x, w = torch.randn(3, 4), torch.randn(4)
    args = [x, 7, w, None]
    assert addresses(args, [0, 1, 2, 3], "cpu") == {0: x.data_ptr(), 2: w.data_ptr()}
    assert addresses(args, [0, 2], "cuda") == {}  # CPU tensors on a CUDA piece: not watched
    assert addresses(args, [2], "cpu") == {2: w.data_ptr()}
