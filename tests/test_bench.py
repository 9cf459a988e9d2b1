"""``mlx5tlp bench``: the report's shape only (timing assertions do not belong in tests)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx5tlp import bench

# The C++ programs' keys may be null, but only with a reason (program not built/installed).
CPP_KEYS = ("lockfree_vs_mutex_2p", "direct_vs_raw_store", "ring_contended_records_per_s",
            "idle_gateways_cpu_percent", "latency_p50_us", "latency_p99_us")
PY_KEYS = ("bulk_vs_naive_python", "post_call_us", "export_import_us")
WORKLOADS = ("4", "64", "256", "4096", "mixed")


def _bench(**env: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "mlx5tlp", "bench", "--quick", "--json"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert isinstance(rep, dict)
    return rep


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_shape(rep: dict[str, object]) -> None:
    assert set(bench.HEADLINE_KEYS) == set(PY_KEYS) | set(CPP_KEYS)
    reasons = rep["reasons"]
    assert isinstance(reasons, dict)
    for key in PY_KEYS:
        assert _is_number(rep[key]), (key, rep[key], reasons.get(key))
    for key in ("bulk_records_per_s", "naive_records_per_s"):
        assert _is_number(rep[key]), key
    for key in CPP_KEYS:
        value = rep[key]
        if value is None:
            assert isinstance(reasons.get(key), str) and reasons[key], key
        else:
            assert _is_number(value), (key, value)
            assert key not in reasons
    # The function benchmark: numbers, or every key null with the reason.
    for key in bench.FUNCTION_KEYS:
        value = rep[key]
        if value is None:
            assert isinstance(reasons.get(key), str) and reasons[key], key
        else:
            assert _is_number(value) and float(value) > 0, (key, value)  # type: ignore[arg-type]
    if rep["function_rps"] is not None:
        by = rep["function_by_workload"]
        assert isinstance(by, dict) and set(by) == set(WORKLOADS)
        for row in by.values():
            assert all(_is_number(row[k]) for k in ("rps", "cpu_us_per_request",
                                                    "latency_p99_us", "load_average_1min"))
        assert _is_number(rep["python_rps"])
        assert math.isclose(rep["function_vs_python"],  # type: ignore[arg-type]
                            rep["function_rps"] / rep["python_rps"])  # type: ignore[operator]
    machine = rep["machine"]
    assert isinstance(machine, dict)
    assert {"arch", "cpus", "python", "compiler", "commit"} <= set(machine)
    assert isinstance(machine["arch"], str) and isinstance(machine["python"], str)
    assert isinstance(rep["method"], dict) and rep["method"]["quick"] is True
    targets = rep["targets"]
    assert isinstance(targets, dict) and set(targets) == set(bench.TARGETS)
    load = rep["load_average"]
    assert isinstance(load, dict) and len(load["start"]) == len(load["end"]) == 3
    for t in targets.values():
        assert t["load_average_1min"] is None or _is_number(t["load_average_1min"])


@pytest.mark.slow
def test_bench_quick_json() -> None:
    _check_shape(_bench())


@pytest.mark.slow
def test_bench_without_programs_reports_reasons(tmp_path: Path) -> None:
    rep = _bench(MLX5TLP_BENCH_BIN=str(tmp_path))  # an empty directory: no C++ programs
    _check_shape(rep)
    for key in CPP_KEYS:
        assert rep[key] is None
        assert "not found" in rep["reasons"][key]  # type: ignore[index]


def test_find_program_honours_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLX5TLP_BENCH_BIN", str(tmp_path))
    path, why = bench.find_program("bench_ring")
    assert path is None and "MLX5TLP_BENCH_BIN" in why
    prog = tmp_path / "bench_ring"
    prog.write_text("#!/bin/sh\n")
    prog.chmod(0o755)
    path, _ = bench.find_program("bench_ring")
    assert path == prog


def _fake_report(quick: bool, **values: float | None) -> dict[str, object]:
    rep: dict[str, object] = {key: values.get(key, 1.0) for key in bench.TARGETS}
    rep["reasons"] = {k: "bench_ring not found" for k, v in values.items() if v is None}
    rep["method"] = {"quick": quick}
    rep["targets"] = bench._check_targets(rep, {k: 0.5 for k in bench.TARGETS})
    return rep


def test_exit_status_names_missed_targets(capsys: pytest.CaptureFixture[str]) -> None:
    met = {"function_rps": 2e6, "function_vs_python": 40.0, "callback_rps": 3e5}
    ok = _fake_report(False, bulk_vs_naive_python=25.0, lockfree_vs_mutex_2p=3.0,
                      post_call_us=0.5, ring_contended_records_per_s=3e7,
                      idle_gateways_cpu_percent=0.1, **met)
    assert bench.exit_status(ok) == 0
    bad = _fake_report(False, bulk_vs_naive_python=5.3, lockfree_vs_mutex_2p=None,
                       post_call_us=0.5, ring_contended_records_per_s=3e7,
                       idle_gateways_cpu_percent=0.1, **met)
    assert bench.exit_status(bad) == 1
    err = capsys.readouterr().err
    assert "bulk_vs_naive_python: 5.3 (target >= 20" in err
    assert "lockfree_vs_mutex_2p: bench_ring not found" in err
    assert "post_call_us" not in err
    slow = _fake_report(False, bulk_vs_naive_python=25.0, lockfree_vs_mutex_2p=3.0,
                        post_call_us=0.5, ring_contended_records_per_s=3e7,
                        idle_gateways_cpu_percent=0.1, **{**met, "function_rps": 7e5})
    assert bench.exit_status(slow) == 1
    assert "function_rps: 7e+05 (target >= 1e+06" in capsys.readouterr().err
    # --quick is a smoke run: it reports, it does not fail.
    assert bench.exit_status(_fake_report(True, bulk_vs_naive_python=5.3)) == 0
