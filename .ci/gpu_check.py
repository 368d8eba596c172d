"""One command for a GPU machine: every CUDA test and the GPU benchmarks, inside a time budget.

``make gpu-check`` runs this with the machine's own ``python3`` (its torch, no environment to
build, no network): the ``cuda``-marked tests, then W1/W2/W3 and the optimizer benchmark with
budgets that fit, each step under its own timeout so one hang cannot eat the others' time.
Every benchmark writes ``benchmarks/results/<name>-cuda.json``; this script adds
``benchmarks/results/gpu-check-cuda.json`` with each step's exit status, time and output tail.

``--dry-run`` (``make gpu-check DRY_RUN=1``) prints the plan and exits 0 without importing
torch, so CI can check the plan on a machine without CUDA.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BUDGET_S = 480  # the whole check: 8 minutes on an H200


def plan(python: str) -> list[dict]:
    """The steps, in order, each with a command and a timeout in seconds (sum <= BUDGET_S)."""
    pytest = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if importlib.util.find_spec("pytest_timeout") is not None:  # one test cannot hang the rest
        pytest.append("--timeout=120")
    return [
        {"name": "cuda-tests", "timeout": 200,
         "cmd": [*pytest, "-m", "cuda", "-rsfE", "--tb=short", "tests"]},
        {"name": "workloads", "timeout": 90,
         "cmd": [python, "benchmarks/workloads.py", "--device", "cuda", "--skip-inductor",
                 "--repeats", "7", "--number", "20", "--steps", "100", "--w2-repeats", "3",
                 "--name", "workloads"]},
        {"name": "optimizer", "timeout": 70,
         "cmd": [python, "benchmarks/optimizer.py", "--device", "cuda", "--params", "100",
                 "--skip-inductor", "--no-breakdown", "--repeats", "5",
                 "--hpugraph-budget", "60", "--name", "optimizer-100"]},
        {"name": "buckets", "timeout": 110,
         "cmd": [python, "benchmarks/buckets.py", "--device", "cuda", "--quick",
                 "--workloads", "bert", "llama", "generate-static", "--name", "buckets",
                 "--out-dir", str(RESULTS)]},
    ]


def run_step(step: dict, env: dict, out_dir: str | None = None) -> dict:
    start = time.perf_counter()
    try:
        done = subprocess.run(step["cmd"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=step["timeout"])
        rc, out = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        rc = 124
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) \
            else (exc.stdout or "")
        out += f"\n[gpu-check] {step['name']} ran past {step['timeout']} s"
    seconds = time.perf_counter() - start
    if out_dir:  # the whole log comes back with the results; the JSON keeps the tail
        Path(out_dir, f"{step['name']}.log").write_text(out)
    sys.stdout.write(out[-6000:] + "\n")
    sys.stdout.write(f"[gpu-check] {step['name']}: rc={rc} in {seconds:.0f} s\n")
    sys.stdout.flush()
    return {"name": step["name"], "cmd": step["cmd"], "rc": rc, "seconds": round(seconds, 1),
            "timeout": step["timeout"], "tail": out[-4000:]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit 0")
    p.add_argument("--python", default=sys.executable, help="the interpreter with the GPU torch")
    p.add_argument("--out", default=os.environ.get("OUT"),
                   help="also copy the results JSON here (a device run's $OUT)")
    args = p.parse_args(argv)
    steps = plan(args.python)
    total = sum(s["timeout"] for s in steps)
    assert total <= BUDGET_S, f"the plan's timeouts ({total} s) exceed the budget ({BUDGET_S} s)"
    if args.dry_run:
        print(f"gpu-check plan ({total} s at most, budget {BUDGET_S} s):")
        for s in steps:
            print(f"  {s['name']:<11} <= {s['timeout']:>3} s  {' '.join(s['cmd'])}")
        return 0
    import torch  # only now: the dry run must work without torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device visible; nothing to check", file=sys.stderr)
        return 2
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               PYTHONUNBUFFERED="1")
    results = [run_step(s, env, args.out) for s in steps]
    summary = {
        "machine": {"node": platform.node(), "python": platform.python_version(),
                    "torch": torch.__version__, "cuda": torch.version.cuda,
                    "device": torch.cuda.get_device_name(0)},
        "steps": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "gpu-check-cuda.json"
    path.write_text(json.dumps(summary, indent=1))
    if args.out:
        for f in sorted(RESULTS.glob("*-cuda.json"))[:8 - len(steps)]:
            shutil.copy(f, args.out)
    failed = [r["name"] for r in results if r["rc"] != 0]
    print(f"gpu-check: {len(results) - len(failed)}/{len(results)} steps passed"
          + (f"; failed: {', '.join(failed)}" if failed else "") + f"; summary in {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
