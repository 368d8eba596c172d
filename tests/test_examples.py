"""Every example runs in its ``--short`` mode and exits 0 (each asserts its results equal eager).

The examples are separate processes (a fresh Dynamo, as a user would run them), importing the
hpuopt of this checkout. They are all started at once when the first test needs them, so their
imports and compilations overlap; each test then waits for its own and reports its output on
failure. ``demo.py`` (``make demo``) runs too, its plot written to a temporary directory, and
its report is checked for the summary a new user reads first.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
NAMES = sorted(p.stem for p in EXAMPLES.glob("*.py") if not p.stem.startswith("_"))
TIMEOUT_S = 300


def test_the_documented_examples_exist():
    expected = {"mnist_training", "inference_pipelining", "dynamic_model", "denoising_loop", "custom_pass"}
    assert expected <= set(NAMES), sorted(expected - set(NAMES))


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT)  # this checkout's hpuopt, whatever else is installed
    for key in [k for k in env if k.startswith("HPUOPT_")]:
        del env[key]  # examples run with the defaults
    extra = {"demo": ["--plot", str(tmp_path_factory.mktemp("demo") / "demo.png")]}
    procs = {
        name: (
            subprocess.Popen(
                [sys.executable, str(EXAMPLES / f"{name}.py"), "--short", *extra.get(name, [])],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            ),
            time.perf_counter(),
        )
        for name in NAMES
    }
    yield procs
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("name", NAMES)
def test_example_short_mode(launched, name):
    proc, started = launched[name]
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"examples/{name}.py --short ran past {TIMEOUT_S}s:\n{output[-4000:]}")
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, (
        f"examples/{name}.py --short exited {proc.returncode} after {seconds:.1f}s:\n{output[-6000:]}"
    )
    assert output.strip(), f"examples/{name}.py --short printed nothing"
    if name == "demo":
        _check_demo(output)


def _check_demo(output: str) -> None:
    """The demo tells its story: the summary first, the costliest reason with its line, and
    timings that say what they mean."""
    report = output[output.index("hpuopt: "):]
    summary = report.split("\nDetails:")[0]
    assert "called 18 times" in summary and "held:" in summary and "replayed:" in summary
    assert "What cost the most (by calls affected):" in summary
    assert "not captured (18 calls)" in summary and "examples/demo.py:" in summary
    assert "not padded" in summary and "h.mean(dim=0)" in summary
    assert "mark_step" not in report.split("\ncounters")[0] or "hpu runtime" in report
    if "cpu runtime" in summary:
        assert "not a speed-up" in output and "no kernel launches to save" in output
    assert "plot: " in output
