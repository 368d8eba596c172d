"""State a piece updates in place survives every new capture, on every runtime.

On a runtime whose capture also runs the work (HPU Graphs execute while they record), the first
call of every new signature is answered by the capture itself. Its update of a mutated input
lives in the static buffer until it is written back; it must not be overwritten by the caller's
old values on the way. Checked against eager over new shapes (dynamic and static) and repeats.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import hpuopt
from hpuopt.testing import habana_standin


@contextlib.contextmanager
def _runtime(name):
    if name == "hpu":
        with habana_standin.installed(lazy=True):
            yield
    else:
        yield


def _accumulate(state, x):
    state.add_(x.sum(0))  # in-place state, read by the caller afterwards
    return x * state


@pytest.mark.parametrize("runtime", ["cpu", "hpu"])
@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize("padding", [True, False], ids=["padded", "exact"])
def test_in_place_state_follows_eager_across_new_captures(runtime, dynamic, padding):
    gen = torch.Generator().manual_seed(1)
    with _runtime(runtime):
        compiled = torch.compile(
            _accumulate, backend="hpugraph", dynamic=dynamic,
            options={"runtime": runtime, "padding": padding},
        )
        state, ref_state = torch.zeros(6) + 0.5, torch.zeros(6) + 0.5
        for batch in (3, 5, 3, 8, 2, 5, 7, 3):
            x = torch.randn(batch, 6, generator=gen)
            out = compiled(state, x)
            ref = _accumulate(ref_state, x)
            torch.testing.assert_close(state, ref_state)
            torch.testing.assert_close(out, ref)
    assert hpuopt.counters.graphs_captured >= 2


@pytest.mark.parametrize("runtime", ["cpu", "hpu"])
def test_a_counter_steps_once_per_call_through_recaptures(runtime):
    def step(counter, x):
        counter.add_(1)
        return x + counter

    with _runtime(runtime):
        compiled = torch.compile(step, backend="hpugraph", dynamic=True,
                                 options={"runtime": runtime})
        counter = torch.zeros(())
        for calls, batch in enumerate((2, 3, 4, 9, 17, 3), start=1):
            x = torch.randn(batch)
            torch.testing.assert_close(compiled(counter, x), x + calls)
            assert counter.item() == calls
