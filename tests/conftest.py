"""Shared fixtures. Every test starts from a clean Dynamo cache and clean hpuopt records, and
restores any global flag it flips."""

from __future__ import annotations

import os

import pytest
import torch
import torch._dynamo

import hpuopt


def pytest_collection_modifyitems(config, items):
    run_slow = os.environ.get("RUN_SLOW_TESTS") == "1"
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: set RUN_SLOW_TESTS=1 (make test-all)"))
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(autouse=True)
def _fresh_state():
    torch._dynamo.reset()
    hpuopt.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


@pytest.fixture
def dynamic_op_flags():
    """Dynamo keeps dynamic ops (nonzero, .item()) inside graphs for the test's duration."""
    with torch._dynamo.config.patch(
        capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True
    ):
        yield


@pytest.fixture(params=[False, True], ids=["flags-off", "flags-on"])
def both_flag_settings(request):
    """Runs a test with Dynamo breaking at dynamic ops, and with them kept in the graph."""
    with torch._dynamo.config.patch(
        capture_dynamic_output_shape_ops=request.param, capture_scalar_outputs=request.param
    ):
        yield request.param
