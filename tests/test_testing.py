"""hpuopt.testing: the recording backend runs a user's own pass and records the graphs."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from hpuopt.passes.base import GraphPass, PassResult
from hpuopt.passes.split import SplitPass
from hpuopt.testing import RecordingBackend, assert_ops, count_ops

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class SinToCos(GraphPass):
    """A toy pass: every aten.sin becomes aten.cos."""

    name: ClassVar[str] = "sin_to_cos"
    stage: ClassVar[str] = "post_aot"

    def run(self, gm, config):
        hits = 0
        for node in gm.graph.nodes:
            if node.target is aten.sin.default:
                node.target = aten.cos.default
                hits += 1
        gm.recompile()
        return PassResult(gm, hits > 0, (hits,))


def test_recording_backend_runs_user_passes_and_snapshots():
    backend = RecordingBackend(post_aot=[SinToCos(), SplitPass()])
    f = torch.compile(lambda x: x.sin() + x.sin().sin(), backend=backend)
    x = torch.randn(5)
    torch.testing.assert_close(f(x), x.cos() + x.cos().cos())
    (snap,) = backend.graphs("post_aot", kind="inference")
    assert count_ops(snap.before, aten.sin) == 3
    assert_ops(snap.after, {aten.sin: 0, aten.cos: 3})
    assert snap.result.results["sin_to_cos"].findings == (3,)
    assert backend.explain().pieces[0].replays == 1
