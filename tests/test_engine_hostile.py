"""Hostile uses of ``mlx5tlp.engine.Device``: lifecycle calls from its own hooks, VARs.

A lane runs the hooks and handlers; a hook that closes, stops or pauses its own device would
make the lane wait for (join) itself — std::terminate ("Resource deadlock avoided") took the
whole process down. It is refused with EDEADLK: the hook's access fails like any raising
hook's (Completer Abort or a dropped posted write, counted) and serving goes on. Each run is
a child process, so a crash fails the test instead of ending the session.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_SCRIPT = r"""
import sys, time
sys.path.insert(0, sys.argv[2])
import mlx5tlp
from mlx5tlp import engine, sim, tlp
from test_engine import BAR0, Bus, spec
device, call = sys.argv[1], sys.argv[3]
holder = {}
def on_write(name, value):
    getattr(holder["dev"], call)()
def handler(requests):
    getattr(holder["dev"], call)()
regs = engine.RegisterRegion(0, 0x1000, [engine.Register("r", 0, on_write=on_write)])
cb = engine.CallbackRegion(0, 0x2000, 0x100, handler)
with mlx5tlp.open_device(device, backend="sim") as ctx, sim.Host(device) as host:
    dev = holder["dev"] = engine.Device(ctx, spec(), [regs, cb])
    bus = Bus(host)
    bus.enumerate()
    bus.send(tlp.Tlp.mem_write(BAR0 + 0x1000, b"\x01\x00\x00\x00"))  # the hook: refused
    bus.send(tlp.Tlp.mem_read(BAR0 + 0x2000, 1, tag=7))              # the handler: refused
    (c,) = bus.collect(1)
    assert (c.tag, c.status) == (7, tlp.Status.CA), c
    bus.send(tlp.Tlp.mem_read(BAR0 + 0x1000, 1, tag=8))  # still serving
    (c,) = bus.collect(1)
    assert (c.tag, c.status, bytes(c.data)) == (8, tlp.Status.SC, b"\x01\x00\x00\x00"), c
    assert dev.state == "running" and dev.stats()["hook_errors"] == 2
    assert "called from a hook or handler of this device" in dev.last_hook_error
    dev.close()  # from this thread: fine
    dev.close()
print("ok")
"""


def _run(device: str, call: str) -> None:
    tests = str(Path(__file__).parent)
    run = subprocess.run([sys.executable, "-c", _SCRIPT, device, tests, call],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", (run.returncode, run.stderr)


def test_close_from_its_own_hook_is_refused_not_a_crash(device: str) -> None:
    _run(device, "close")


def test_stop_and_pause_from_its_own_hook_are_refused(device: str) -> None:
    _run(device, "stop")
    _run(device, "pause")
