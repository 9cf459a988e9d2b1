"""The demo end to end (short runs): verified, fault injection, Ctrl-C, no leaked objects."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from mlx5tlp import sim


def _demo(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mlx5tlp", "demo", *args],
        capture_output=True, text=True, timeout=timeout, env=os.environ.copy(),
    )


def _no_objects(device: str) -> None:
    st = sim.device_stats(device)
    assert (st["contexts"], st["tlp_vars"], st["umems"], st["devx_objs"]) == (0, 0, 0, 0)
    assert st["gw_pages_free"] == 8


@pytest.mark.slow
def test_demo_verifies_every_completion(device: str) -> None:
    out = _demo("--device", device, "--requests", "600", "--workers", "2", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    rep = json.loads(out.stdout)
    for key in ("requests", "completions_verified", "errors", "throughput_rps",
                "latency_p50_us", "latency_p99_us"):
        assert key in rep
    assert rep["requests"] == rep["requests_verified"] == 600
    assert rep["errors"] == 0 and rep["error_messages"] == []
    assert rep["completions_verified"] >= 600
    assert rep["model"]["completions"] == rep["completions_verified"]  # the device model agrees
    assert rep["model"]["errors"] == 0 and rep["model"]["outstanding"] == 0
    assert rep["model"]["status_ur"] > 0  # the unsupported requests were answered with UR
    assert rep["leaked_objects"] == 0
    assert sum(w["served"] for w in rep["workers_report"]) == 600
    _no_objects(device)


@pytest.mark.slow
def test_demo_text_output_and_bad_option(device: str) -> None:
    out = _demo("--device", device, "--requests", "200", "--workers", "1")
    assert out.returncode == 0, out.stderr
    assert f"mlx5tlp demo on {device}: OK" in out.stdout
    assert "errors 0" in out.stdout
    bad = _demo("--device", device, "--workers", "9")
    assert bad.returncode == 2 and "workers must be 1..8" in bad.stderr


@pytest.mark.slow
def test_demo_killed_worker_reports_and_cleans_up(device: str) -> None:
    out = _demo("--device", device, "--requests", "5000", "--kill-worker-after", "100", "--json")
    assert out.returncode == 1
    rep = json.loads(out.stdout)
    assert rep["errors"] > 0
    assert "died (exit code -9)" in rep["error_messages"][0]
    assert rep["leaked_objects"] == 0
    _no_objects(device)


@pytest.mark.slow
def test_demo_ctrl_c_ends_with_a_report(device: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx5tlp", "demo", "--device", device, "--requests", "100000000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A Ctrl-C reaches a foreground program with SIGINT at its default disposition.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "workers ready" in line, line
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stdout + stderr
    assert f"mlx5tlp demo on {device}: INTERRUPTED" in stdout
    assert "leaked device objects: 0" in stdout
    _no_objects(device)
