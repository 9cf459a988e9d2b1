"""`mlx5tlp handover-demo` short runs: planned handovers and SIGKILLed primaries under load.

Every completion is checked by the host model and the demo's checker; the counts must be zero
and nothing may be left on the device afterwards (docs/handover.md, "Proof under load").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def run_demo(*args: str, command: str = "handover-demo") -> dict[str, object]:
    out = subprocess.run([sys.executable, "-m", "mlx5tlp", command, "--json",
                          "--timeout", "120", *args], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, SKBUILD_EDITABLE_VERBOSE="0"))
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    assert lines, out.stdout + out.stderr
    rep: dict[str, object] = json.loads(lines[-1])
    assert out.returncode == 0, rep
    return rep


def check_zero(rep: dict[str, object]) -> None:
    assert (rep["lost"], rep["duplicated"], rep["unexpected"]) == (0, 0, 0), rep
    assert rep["verified"] == rep["requests"]
    assert rep["leaked"] == {"contexts": 0, "tlp_vars": 0, "requests_claimed": 0,
                             "requests_pending": 0}, rep


@pytest.mark.slow
def test_planned_handovers_under_load() -> None:
    rep = run_demo("--requests", "2000", "--handover-every", "200")
    check_zero(rep)
    # Due at 200, 400, ..., 1800: requests are held at each due point until its handover
    # starts, so every interval gets one (a rollback under load counts as an attempt).
    assert rep["handovers"] + rep["handovers_rolled_back"] >= 8, rep
    assert rep["handovers"] >= 5 and rep["takeovers"] == 0, rep
    assert rep["handover_pause_p99_us"] is not None


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="SCHED_FIFO needs root here (CI runs as root); "
                    "tests/test_realtime.py covers the refusal")
def test_planned_handovers_under_realtime_priority() -> None:
    rep = run_demo("--requests", "1200", "--handover-every", "200", "--realtime", "5")
    check_zero(rep)
    assert rep["realtime"] == 5 and rep["handovers"] >= 3, rep


@pytest.mark.slow
def test_killed_primaries_under_load() -> None:
    rep = run_demo("--requests", "2000", "--kill-primary-every", "500", "--seed", "7")
    check_zero(rep)
    assert rep["takeovers"] >= 3 and rep["takeover_gap_p99_us"] is not None


@pytest.mark.slow
def test_handovers_and_kills_mixed() -> None:
    rep = run_demo("--requests", "3000", "--handover-every", "300", "--kill-primary-every", "700")
    check_zero(rep)
    assert rep["handovers"] >= 4 and rep["takeovers"] >= 2, rep


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["native", "python"])
def test_mlx5tlp_demo_takes_the_handover_flags(engine: str) -> None:
    # The form: `mlx5tlp demo --handover-every N --kill-primary-every N`, the window of
    # the demo (64: the request channel fills, and what it refuses is sent again later).
    rep = run_demo("--requests", "2500", "--handover-every", "250", "--kill-primary-every",
                   "800", "--engine", engine, command="demo")
    check_zero(rep)
    assert rep["engine"] == engine
    assert rep["handovers"] >= 4 and rep["takeovers"] >= 2, rep
    for k in ("handover_pause_p50_us", "handover_pause_p99_us", "takeover_gap_p99_us"):
        assert isinstance(rep[k], float), (k, rep)
    steps = rep["handover_steps_us"]
    assert isinstance(steps, dict) and "new.first_answer" in steps, steps


def test_mlx5tlp_demo_refuses_worker_options_with_handovers() -> None:
    out = subprocess.run([sys.executable, "-m", "mlx5tlp", "demo", "--handover-every", "10",
                          "--kill-worker-after", "5"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2
    assert "--kill-worker-after does not apply" in out.stderr
