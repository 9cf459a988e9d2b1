"""``Host.load`` against a function that stops taking requests: the run ends, and says so.

Posted writes have no completion (PCIe Base 2.4.1, 2.2.9), so nothing times them out: a
function that is killed or hung mid-run leaves the generator's sends back-pressured by a full
channel. A run must still end within about twice its ``timeout``, the stall counted as one
``timeout`` error and every read left out counted as a ``timeout`` too. Each run is in a child
process with a hard limit, so a hanging generator fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlx5tlp
from mlx5tlp import sim
from test_engine import Bus
from test_serve import Server

BAR = 0xE000_0000

_RUN = """
import json, sys, time
from mlx5tlp import sim
from mlx5tlp.sim import LoadOp, LoadRange
device, ops, kw = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
with sim.Host(device) as host:
    print("started", flush=True)
    t = time.monotonic()
    res = host.load([LoadRange(0xE0000000, bytes(65536))], [LoadOp(*o) for o in ops], **kw)
    print(json.dumps({"s": time.monotonic() - t, "sent": res.sent, "writes": res.writes,
                      "reads": res.reads, "errors": res.errors, "kinds": res.errors_by_kind,
                      "first": res.first_errors}), flush=True)
"""


def _start(device: str, ops: list[list[Any]], **kw: Any) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", _RUN, device, json.dumps(ops),
                             json.dumps(kw)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "started\n"
    return proc


def _result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=60)  # the run's bound is ~2 x timeout (0.5 s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("Host.load did not end: the function took no requests") from None
    assert proc.returncode == 0, err
    return dict(json.loads(out.splitlines()[-1]))


def test_writes_to_nobody_end_with_one_timeout(device: str) -> None:
    # Nobody takes the requests: the channels fill, then the sends are refused for `timeout`.
    # One channel: the stall is the one error (no channel has room for a flushing read).
    for kw in ({"count": 10**9}, {"count": None, "duration": 0.2}):
        res = _result(_start(device, [["write", 64]], timeout=0.5, channels=1, **kw))
        assert res["kinds"]["timeout"] == 1 and res["errors"] == 1, res
        assert 0 < res["writes"] == res["sent"] < 10**9
        assert "took no request for" in res["first"][0]
    # All channels: besides the stall, the flushing read behind the last write of each
    # channel that still had room (at most one per channel) times out.
    res = _result(_start(device, [["write", 64]], timeout=0.5, channels=sim.CHANNELS,
                         count=10**9))
    assert 1 <= res["kinds"]["timeout"] == res["errors"] <= 1 + sim.CHANNELS, res
    assert sim.device_stats(device)["tlp_vars"] == 0


def test_a_function_killed_mid_load_ends_the_run_with_timeouts(device: str,
                                                                tmp_path: Path) -> None:
    spec = tmp_path / "mem.json"
    spec.write_text(json.dumps({
        "identity": {"vendor_id": "0x15b3", "device_id": "0x1236"},
        "bars": [{"index": 0, "kind": "mem32", "size": 65536}],
        "regions": [{"kind": "memory", "bar": 0, "offset": 0, "size": 65536}]}))
    server = Server(spec, device)
    try:
        with sim.Host(device) as host:
            bus = Bus(host)
            bus.cfg_write(0x10, BAR)
            bus.cfg_write(0x04, 0x2)  # Memory Space Enable (PCIe Base 7.5.1.1.3)
        proc = _start(device, [["read", 64], ["write", 64], ["read", 4]], count=10**9,
                      timeout=0.5, window=16)
        time.sleep(0.3)  # requests are being answered
        server.proc.send_signal(signal.SIGKILL)
        server.proc.communicate(timeout=30)  # reaped, its pipes closed
        res = _result(proc)
    finally:
        server.kill()
    assert res["kinds"]["timeout"] >= 1, res
    assert res["errors"] == res["kinds"]["timeout"], res  # nothing but timeouts
    assert res["reads"] > 16 and res["writes"] > 0  # the function answered before it died
    with mlx5tlp.open_device(device, backend="sim"):
        pass  # the device is usable after the killed function's objects were reclaimed
