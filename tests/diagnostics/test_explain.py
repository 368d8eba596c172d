"""explain() shows every pass's reasons through the typed Finding base."""

from __future__ import annotations

import torch

import hpuopt
from hpuopt.records import Finding
from hpuopt.testing import RecordingBackend


def _per_position_values(x, other):
    y = x.clone()
    y[y < 0] = other[y < 0]  # not one value: masked_fill leaves it alone
    return y * 2


def test_every_pass_finding_is_typed():
    backend = RecordingBackend()
    compiled = torch.compile(_per_position_values, backend=backend)
    x, other = torch.randn(6), torch.randn(6)
    torch.testing.assert_close(compiled(x, other), _per_position_values(x, other))
    for snap in backend.snapshots:
        for name, result in snap.result.results.items():
            for f in result.findings:
                assert isinstance(f, Finding), (name, f)
                assert f.pass_name == name and isinstance(f.reason, str) and f.reason


def test_masked_fill_reasons_show(dynamic_op_flags):
    compiled = torch.compile(_per_position_values, backend="hpugraph")
    x, other = torch.randn(6), torch.randn(6)
    torch.testing.assert_close(compiled(x, other), _per_position_values(x, other))
    text = str(hpuopt.explain())
    assert "left alone by masked_fill: " in text
    assert "more than one element" in text
