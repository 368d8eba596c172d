"""The benchmarks: the harness on tiny rows, and each script end to end in its quickest mode,
writing into a temporary folder (never over the committed results)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch
import torch._dynamo

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import harness


@pytest.fixture(autouse=True)
def _restore_process_state():
    """The scripts set the thread count and raise Dynamo's recompile limits for the process."""
    cfg = torch._dynamo.config
    limits = {k: getattr(cfg, k) for k in ("recompile_limit", "cache_size_limit",
                                           "accumulated_recompile_limit") if hasattr(cfg, k)}
    threads = torch.get_num_threads()
    with cfg.patch(limits):
        yield
    torch.set_num_threads(threads)


def _load(out: Path, name: str) -> dict:
    (path,) = out.glob(f"{name}-cpu.json")
    return json.loads(path.read_text())


def _check_header(result: dict, benchmark: str) -> None:
    assert result["benchmark"] == benchmark
    machine = result["machine"]
    assert machine["torch"] == torch.__version__
    assert machine["device"] == "cpu"
    assert machine["torch_threads"] == 1 and machine["cpu_model"] and machine["python"]
    assert "host" not in json.dumps(machine).lower()
    assert result["elapsed_s"] > 0


def _check_rows(rows: list[dict], repeats: int) -> None:
    for row in rows:
        if row.get("status", "ok") != "ok":
            continue
        assert len(row["wall_per_call_s"]) == len(row["cpu_per_call_s"]) == repeats
        assert row["wall_median_s"] > 0 and row["cpu_median_s"] >= 0
        assert row["wall_q1_s"] <= row["wall_median_s"] <= row["wall_q3_s"]
        assert row["warmup_calls"] >= 0 and row["warmup_s"] >= 0  # warm-up reported apart


def _check_layers(layers: dict[str, float], total: float) -> None:
    """Layers that telescope: they add up to the total they take apart."""
    assert layers and math.isclose(sum(layers.values()), total, rel_tol=1e-9, abs_tol=1e-12)


# -- the harness -----------------------------------------------------------------------------


def test_time_rows_reports_first_call_and_warmup_apart(tmp_path):
    calls = {"a": 0, "b": 0}

    def count(name):
        def fn():
            calls[name] += 1
        return fn

    def broken():
        raise RuntimeError("cannot build")

    rows = [harness.Row("a", count("a")), harness.Row("b", count("b")),
            harness.Row("c", build=broken), harness.Row("d", status="n/a (no CUDA)")]
    timings = harness.time_rows(rows, warmup=2, repeats=3, number=4)
    assert set(timings) == {"a", "b"}
    assert calls == {"a": 1 + 2 + 3 * 4, "b": 1 + 2 + 3 * 4}
    assert rows[2].status.startswith("failed: RuntimeError") and rows[3].status == "n/a (no CUDA)"
    assert timings["a"].first_call_s > 0 and timings["a"].warmup_calls == 2
    table = harness.format_table(timings, "a", "t", rows=rows, speedup=True)
    assert "n/a (no CUDA)" in table and "failed" in table
    payload = {"machine": harness.machine_info(), "rows": harness.rows_json(timings, "a", rows)}
    path = harness.write_results("tiny", "cpu", payload, tmp_path)
    data = json.loads(path.read_text())
    assert data["machine"]["torch"] == torch.__version__
    _check_rows(data["rows"], repeats=3)
    assert [r["status"] for r in data["rows"]][2:] == [rows[2].status, "n/a (no CUDA)"]
    assert data["rows"][1]["cpu_ratio_vs_a"] > 0


def test_goals_and_layers():
    met = harness.Goal("x <= 2", 1.5, "<=", 2.0, row="r")
    missed = harness.Goal("x >= 2", 1.5, ">=", 2.0)
    unmeasured = harness.Goal("x < 2", None, "<", 2.0, note="inductor timeout")
    assert [g.verdict for g in (met, missed, unmeasured)] == ["met", "NOT met", "not measured"]
    assert met.to_json()["row"] == "r" and unmeasured.to_json()["met"] is None
    assert "inductor timeout" in unmeasured.line()
    text = harness.format_layers([("a", 1e-6), ("b", 3e-6)], 4e-6, title="layers",
                                 sum_label="sum")
    assert text.splitlines()[-1].split()[-2:] == ["4.00", "100.0%"]


def test_probes_and_first_call_on_a_tiny_model():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())
    x = torch.randn(2, 8)
    spy = harness.SpyBackend()
    compiled = torch.compile(model, backend=spy)
    with torch.no_grad(), harness.FirstCall(spy.session) as fc:
        start = time.perf_counter()
        compiled(x)
        total = time.perf_counter() - start
    _check_layers(dict(fc.layers(total)), total)
    assert fc.records and fc.timers()["backend"] > 0 and fc.dynamo
    with torch.no_grad():
        compiled(x)
        probes = harness.probe_graphs(spy)
        levels = harness.level_calls(probes)
        timings = harness.time_rows(levels, warmup=1, repeats=2, number=2, first_call=False)
    assert list(timings) == list(harness.LEVELS)
    med = {k: t.cpu_median_s for k, t in timings.items()}
    stack = harness.stack_layers(med)
    assert math.isclose(sum(s for _, s in stack), med[harness.LEVELS[0]] - med[harness.LEVELS[-1]],
                        abs_tol=1e-12)
    (piece,) = harness.describe_pieces(probes, spy.session)
    assert piece["inputs"] == len(probes[0].pieces[0].args) and piece["ops"] >= 2


# -- the scripts, end to end ------------------------------------------------------------------


def test_overhead_quick(tmp_path):
    import overhead

    assert overhead.main(["--quick", "--blocks", "1", "--hidden", "8", "--no-train",
                          "--repeats", "2", "--out-dir", str(tmp_path)]) == 0
    result = _load(tmp_path, "overhead")
    _check_header(result, "overhead")
    _check_rows(result["inference"], repeats=2)
    assert [r["name"] for r in result["inference"]] == [
        "eager", "aot_eager", "hpugraph", "hpuopt.compile", "hpugraph capture=off"]
    assert {v["row"] for v in result["goal"]["verdicts"]} == {"hpugraph", "hpuopt.compile"}
    bd = result["breakdown"]
    _check_rows(bd["rows"], repeats=2)
    total = next(r for r in bd["rows"] if r["name"] == "hpuopt.compile(m)(x)")["cpu_median_s"]
    _check_layers(bd["layers_cpu_s"], total)
    assert bd["pieces"] and "training" not in result


def test_workloads_quick(tmp_path):
    import workloads

    assert workloads.main([
        "--quick", "--device", "cpu", "--skip-inductor", "--hidden", "8", "--blocks", "1",
        "--w1-batches", "2", "--w2-blocks", "1", "--steps", "3", "--max-batch", "4",
        "--w3-blocks", "1", "--w3-batch", "4", "--w3-sets", "2", "--repeats", "2",
        "--w2-repeats", "2", "--out-dir", str(tmp_path)]) == 0
    result = _load(tmp_path, "workloads")
    _check_header(result, "workloads")
    tables = [result["W1"]["batches"]["2"], result["W2"], result["W3"]]
    for table, repeats in zip(tables, (2, 2, 2)):
        _check_rows(table["rows"], repeats)
        by_name = {r["name"]: r for r in table["rows"]}
        assert by_name["inductor"]["status"].startswith("skipped")
        assert by_name["hpugraph"]["info"]["graphs"] >= 1
        assert by_name["hpugraph"]["info"]["max_abs_diff"] < 1e-3
    assert result["W2"]["buckets"] and result["W3"]["selected_rows_per_set"]


@pytest.mark.parametrize("isolate", [True, False], ids=["isolated", "torch-2.11-like"])
def test_optimizer_quick(tmp_path, monkeypatch, isolate):
    import optimizer

    if not isolate:  # what the script does on a torch without isolate_recompiles
        monkeypatch.setattr(optimizer, "ISOLATE", {})
    elif not optimizer.ISOLATE:
        pytest.skip("this torch has no isolate_recompiles")
    assert optimizer.main(["--quick", "--params", "3", "--skip-inductor", "--guard-filters",
                           "all", "--repeats", "2", "--out-dir", str(tmp_path)]) == 0
    result = _load(tmp_path, "optimizer")
    _check_header(result, "optimizer")
    (run,) = result["runs"]
    _check_rows(run["rows"], repeats=2)
    assert (run["status"]["hpugraph gf=all"] == "ok") == isolate
    assert all(c["ok"] for c in (*run["check_early"].values(), *run["check_late"].values()))
    assert {g["row"] for g in run["goals"]} == set(optimizer.GOAL_ROWS)
    for name, fc in run["first_call_breakdown"].items():
        _check_layers(fc["layers_s"], run["first_call_s"][name])
    bd = run["breakdown"]
    total = next(r for r in bd["rows"] if r["name"] == "hpugraph step")["cpu_median_s"]
    _check_layers(bd["layers_cpu_s"], total)


def test_gpu_check_plan_fits_its_budget_and_its_benchmark_flags_exist(monkeypatch):
    import importlib.util
    import subprocess

    root = BENCH.parent
    spec = importlib.util.spec_from_file_location("gpu_check", root / ".ci" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    steps = gpu_check.plan(sys.executable)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # parse as on a GPU machine
    assert sum(s["timeout"] for s in steps) <= gpu_check.BUDGET_S <= 8 * 60
    assert [s["name"] for s in steps][0] == "cuda-tests"
    for step in steps:
        cmd = step["cmd"]
        if len(cmd) > 1 and cmd[1].startswith("benchmarks/"):
            script = __import__(Path(cmd[1]).stem)
            args = script.parse_args(cmd[2:])  # argparse exits on an unknown flag
            assert args.device == "cuda"
    done = subprocess.run([sys.executable, str(root / ".ci" / "gpu_check.py"), "--dry-run"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "cuda-tests" in done.stdout


def _check_piece_compilers(result: dict, scenarios: list[str]) -> None:
    _check_header(result, "piece_compilers")
    sections = [result["mlp"][h] for h in result["mlp"]] if "mlp" in scenarios else []
    sections += [result[s] for s in scenarios if s not in ("mlp", "optimizer")]
    for sec in sections:
        _check_rows(sec["rows"], repeats=2)
        by_name = {r["name"]: r for r in sec["rows"]}
        ind = next(r for n, r in by_name.items() if n.endswith("inductor")
                   or n.endswith("per-bucket"))
        assert ind["status"] == "ok" and ind["info"]["piece_compiles"] >= 1
        assert ind["info"]["first_call_s"] > 0
        direct = next(r for n, r in by_name.items() if n.endswith("inductor direct"))
        assert direct["status"] == "ok" and direct["info"]["piece_compiles"] >= 1
        assert {g["verdict"] for g in sec["goals"]} <= {"met", "NOT met", "not measured"}
        for row in sec["rows"]:
            if "max_abs_diff" in row["info"]:
                assert row["info"]["max_abs_diff"] < 1e-3, row["name"]
    if "varbatch" in scenarios:
        comp = result["varbatch"]["compilations"]
        assert comp["hpugraph inductor symbolic"] <= comp["hpugraph inductor per-bucket"]
    if "optimizer" in scenarios:
        _check_rows(result["optimizer"]["rows"], repeats=2)
        rows = {r["name"]: r for r in result["optimizer"]["rows"]}
        assert rows["hpugraph inductor"]["info"]["max_abs_diff_vs_eager"] < 1e-4
        assert rows["hpugraph inductor"]["info"]["piece_compiles"] == 0  # left as is


def test_piece_compilers_quick(tmp_path):
    import piece_compilers

    assert piece_compilers.main(["--quick", "--scenarios", "mlp", "--out-dir",
                                 str(tmp_path)]) == 0
    _check_piece_compilers(_load(tmp_path, "piece_compilers"), ["mlp"])


@pytest.mark.slow
def test_piece_compilers_quick_every_scenario(tmp_path):
    import piece_compilers

    scenarios = list(piece_compilers.SCENARIOS)
    assert piece_compilers.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    _check_piece_compilers(_load(tmp_path, "piece_compilers"), scenarios)


def test_buckets_quick(tmp_path):
    pytest.importorskip("transformers")
    import buckets

    assert buckets.main(["--quick", "--workloads", "bert", "--calls", "3", "--max-seq", "6",
                         "--repeats", "2", "--out-dir", str(tmp_path)]) == 0
    result = _load(tmp_path, "buckets")
    _check_header(result, "buckets")
    bert = result["bert"]
    _check_rows(bert["rows"], repeats=2)
    assert bert["calls"] == bert["forward_calls"] == len(bert["shapes_seen"]) == 3
    assert 1 <= bert["bucket_combinations"] <= bert["distinct_shapes"] <= 3
    rows = {r["name"]: r for r in bert["rows"]}
    assert list(rows) == list(buckets.ROWS)
    for name in ("hpugraph exact", "hpugraph"):
        info = rows[name]["info"]
        assert rows[name]["status"] == "ok" and info["check"]["max_abs_diff"] < 1e-4
        assert info["graphs_max"] >= 1 and info["graphs_total"] >= info["graphs_max"]
        assert info["first_pass_s"] > 0 and "pad_waste_padded_over_real" in info["check"]
        for piece in info["pieces"]:  # every exact-shape verdict comes with its reasons
            assert {"graphs", "graph_kinds", "padded", "not_padded", "silent_exact"} <= set(piece)
    assert rows["hpugraph exact"]["info"]["check"]["padded_elements"] == 0
    assert {g["verdict"] for g in bert["goals"]} <= {"met", "NOT met", "not measured"}
    assert bert["cpu_ratio_hpugraph_vs_exact"] > 0
    assert [s["workload"] for s in result["summary"]] == ["bert"]
