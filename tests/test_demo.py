"""The demo end to end (short runs): verified, fault injection, Ctrl-C, no leaked objects."""

from __future__ import annotations

import itertools
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from mlx5tlp import sim
from mlx5tlp.demo import OptionError, Options, completion_payload, run, shares


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
    # The engine's workers also served the host's set-up writes (BAR 0, MPS, RCB, Command).
    assert rep["engine"] == "native" and rep["setup_requests"] == 2 * 4
    assert sum(w["served"] for w in rep["workers_report"]) == 600 + rep["setup_requests"]
    _no_objects(device)


@pytest.mark.slow
def test_demo_text_output_and_bad_option(device: str) -> None:
    out = _demo("--device", device, "--requests", "200", "--workers", "1")
    assert out.returncode == 0, out.stderr
    assert f"mlx5tlp demo on {device}: OK" in out.stdout
    assert "errors 0" in out.stdout
    bad = _demo("--device", device, "--workers", "9")
    assert bad.returncode == 2 and "argument --workers: must be an integer in 1..8" in bad.stderr


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


# -- options mean what they say ---------------------------------------------------------------
@pytest.mark.parametrize("args, rule", [
    (["--workers", "0"], "argument --workers: must be an integer in 1..8, not 0"),
    (["--workers", "9"], "argument --workers: must be an integer in 1..8, not 9"),
    (["--window", "0"], "argument --window: must be an integer in 1..1024, not 0"),
    (["--timeout", "0"],
     "argument --timeout: must be a number of seconds > 0 and <= 1e+09, not 0"),
    (["--timeout", "-1"],
     "argument --timeout: must be a number of seconds > 0 and <= 1e+09, not -1"),
    (["--timeout", "nan"],
     "argument --timeout: must be a number of seconds > 0 and <= 1e+09, not nan"),
    (["--timeout", "1e10"], "argument --timeout: must be a number of seconds > 0 and <= 1e+09, "
     "not 1e10"),
    (["--kill-worker-after", "0"], "argument --kill-worker-after: must be an integer >= 1, not 0"),
    (["--kill-worker-after", "-5"],
     "argument --kill-worker-after: must be an integer >= 1, not -5"),
    (["--requests", "5", "--kill-worker-after", "6"],
     "argument --kill-worker-after: must be 1..--requests (5), not 6"),
    (["--max-payload", "256.0"],
     "argument --max-payload: must be a power of two in 128..4096, not '256.0'"),
    (["--max-payload", "384"], "argument --max-payload: must be a power of two in 128..4096, "
                               "not 384"),
    (["--max-payload", "64"], "argument --max-payload: must be a power of two in 128..4096, "
                              "not 64"),
    (["--read-size", "0"], "argument --read-size: must be an integer in 1..4096, not 0"),
    (["--requests", "0"], "argument --requests: must be an integer >= 1, not 0"),
])
def test_bad_options_are_refused_up_front(args: list[str], rule: str) -> None:
    out = _demo(*args, timeout=60)
    assert out.returncode == 2
    assert out.stderr == f"mlx5tlp demo: error: {rule} (see mlx5tlp demo --help)\n"
    assert out.stdout == ""


def test_python_api_applies_the_same_rules() -> None:
    for bad, what in ((Options(workers=0), "--workers"), (Options(window=0), "--window"),
                      (Options(timeout=0), "--timeout"), (Options(max_payload=384),
                                                            "--max-payload"),
                      (Options(kill_worker_after=0), "--kill-worker-after")):
        with pytest.raises(OptionError, match=what):
            run(bad)


def test_unknown_device_lists_the_devices(device: str) -> None:
    out = _demo("--device", "nope", "--requests", "10", timeout=60)
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1
    assert out.stderr.startswith("mlx5tlp demo: no software device named 'nope'")
    assert device in out.stderr and "mlx5_sim0" in out.stderr


def test_shares_cover_the_bar_for_any_worker_count() -> None:
    for workers in range(1, 9):
        parts = shares(64 * 1024, workers)
        assert len(parts) == workers and parts[0][0] == 0 and parts[-1][1] == 64 * 1024
        assert all(a[1] == b[0] for a, b in itertools.pairwise(parts))
        assert all(lo % 4 == 0 and hi - lo >= 4092 for lo, hi in parts)


def test_completion_payload_fits_the_record() -> None:
    assert completion_payload(128, 64, 248) == 128
    assert completion_payload(256, 64, 248) == 128  # 12 + 256 > 248: split at RCB multiples
    assert completion_payload(4096, 128, 1016) == 512
    assert completion_payload(512, 64, 1016) == 512
    with pytest.raises(OptionError, match="holds at most 120 bytes"):
        completion_payload(128, 64, 120)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [3, 7])
def test_any_worker_count_works(workers: int, device: str) -> None:
    out = _demo("--device", device, "--requests", "300", "--workers", str(workers), "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    rep = json.loads(out.stdout)
    assert rep["requests_verified"] == 300 and rep["errors"] == 0
    assert len(rep["workers_report"]) == workers
    assert all(w["served"] > 0 for w in rep["workers_report"])
    _no_objects(device)


@pytest.mark.slow
def test_max_payload_larger_than_a_record_is_split_to_fit(device: str) -> None:
    # The default device's slots hold 248-byte records: a 256-byte payload cannot fit.
    out = _demo("--device", device, "--requests", "300", "--max-payload", "256",
                "--read-size", "1024", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    rep = json.loads(out.stdout)
    assert rep["errors"] == 0 and rep["requests_verified"] == 300
    assert (rep["max_payload"], rep["completion_payload"]) == (256, 128)
    assert rep["model"]["errors"] == 0 and rep["model"]["bad_records"] == 0
    assert "Traceback" not in out.stderr
    text = _demo("--device", device, "--requests", "50", "--max-payload", "256")
    assert "completions split to 128-byte payloads (Max_Payload_Size 256)" in text.stdout


@pytest.fixture
def small_slot_device() -> Iterator[str]:
    name = f"small{os.getpid()}"
    sim.create_device(name, slot_size=128)
    yield name
    sim.remove_device(name)


def test_max_payload_that_cannot_fit_is_one_line_and_leaves_nothing(
        small_slot_device: str) -> None:
    out = _demo("--device", small_slot_device, "--requests", "10", timeout=60)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("mlx5tlp demo: --max-payload 128: a gateway record of this "
                                 "device holds at most 120 bytes")
    st = sim.device_stats(small_slot_device)
    assert (st["contexts"], st["tlp_vars"], st["umems"], st["devx_objs"]) == (0, 0, 0, 0)


def test_more_workers_than_gateway_pages_is_refused(sim_dir: str) -> None:
    name = f"two{os.getpid()}"
    sim.create_device(name, gw_pages=2)
    try:
        out = _demo("--device", name, "--workers", "3", timeout=60)
        assert out.returncode == 2
        assert out.stderr == (f"mlx5tlp demo: --workers 3: {name} has 2 TLP gateway pages, "
                              "one per worker is needed\n")
    finally:
        sim.remove_device(name)


@pytest.mark.slow
def test_a_run_whose_worker_died_does_not_poison_the_next(device: str) -> None:
    killed = _demo("--device", device, "--requests", "3000", "--kill-worker-after", "100",
                   "--json")
    assert killed.returncode == 1
    rep = json.loads(killed.stdout)
    assert "died (exit code -9)" in rep["error_messages"][0]
    _no_objects(device)
    assert sim.device_stats(device)["requests_pending"] == 0
    again = _demo("--device", device, "--requests", "500", "--json")
    assert again.returncode == 0, again.stdout + again.stderr
    rep = json.loads(again.stdout)
    assert rep["errors"] == 0 and rep["error_messages"] == []
    assert rep["model"]["unexpected"] == 0 and rep["requests_verified"] == 500


@pytest.mark.slow
def test_progress_bar_draws_its_final_frame(device: str) -> None:
    # stderr on a terminal: the bar. Its last frame must show the final count.
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlx5tlp", "demo", "--device", device, "--requests", "700"],
            stdout=subprocess.PIPE, stderr=follower, text=True)
        os.close(follower)
        follower = -1
        screen = b""
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # EIO: the other side closed
                    break
                if not chunk:
                    break
                screen += chunk
            elif proc.poll() is not None:
                break
        stdout, _ = proc.communicate(timeout=60)
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    assert proc.returncode == 0, stdout
    frames = screen.decode().replace("\r\n", "\n").split("\r")
    last = frames[-1].strip()
    assert last.startswith("[#########################] 100% 700/700 "), frames[-3:]
    assert last.endswith("errors 0")


# -- the two engines -------------------------------------------------------------------------
@pytest.mark.slow
def test_python_baseline_engine_still_verifies(device: str) -> None:
    out = _demo("--device", device, "--requests", "400", "--engine", "python", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    rep = json.loads(out.stdout)
    assert rep["engine"] == "python" and rep["setup_requests"] == 0
    assert rep["requests_verified"] == 400 and rep["errors"] == 0
    assert rep["model"]["completions"] == rep["completions_verified"]
    assert sum(w["served"] for w in rep["workers_report"]) == 400
    assert all("engine" not in w for w in rep["workers_report"])  # Python per TLP
    assert rep["engine_latency_p50_us"] is None  # no native histogram to report
    _no_objects(device)


@pytest.mark.slow
def test_native_engine_serves_from_its_function_model(device: str) -> None:
    # --max-payload 512 on a 1 KiB-slot device and --rcb 128: the host programs Device
    # Control MPS (§7.5.3.4) and Link Control RCB (§7.5.3.7); the workers' engines count
    # what they answered, and configuration reads are checked against the host's own copy.
    name = f"big{os.getpid()}"
    sim.create_device(name, slot_size=1024)
    try:
        out = _demo("--device", name, "--requests", "600", "--max-payload", "512",
                    "--rcb", "128", "--read-size", "2048", "--json")
        assert out.returncode == 0, out.stdout + out.stderr
        rep = json.loads(out.stdout)
        assert rep["errors"] == 0 and rep["requests_verified"] == 600
        assert rep["completion_payload"] == 512
        engines = [w["engine"] for w in rep["workers_report"]]
        assert sum(e["requests"]["CfgRd0"] for e in engines) > 0
        assert sum(e["ur"] for e in engines) == rep["model"]["status_ur"]  # the IORds
        assert sum(e["completions"] for e in engines) == rep["model"]["completions"]
        assert rep["latency_p50_us"] is not None and rep["throughput_rps"] > 0
        # The engines' own take -> page latency (log2 buckets) is below the host's round trip.
        p50, p99 = rep["engine_latency_p50_us"], rep["engine_latency_p99_us"]
        assert p50 is not None and p99 is not None and 0 < p50 <= p99
        assert p50 <= 2 * rep["latency_p50_us"]
        assert sum(sum(e["latency_ns_log2"]) for e in engines) == sum(
            sum(e["requests"].values()) for e in engines)
    finally:
        sim.remove_device(name)


def test_unknown_engine_is_refused() -> None:
    out = _demo("--engine", "rust", timeout=60)
    assert out.returncode == 2 and "argument --engine: invalid choice: 'rust'" in out.stderr
    with pytest.raises(OptionError, match="--engine"):
        run(Options(engine="rust"))
