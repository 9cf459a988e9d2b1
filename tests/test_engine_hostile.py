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

import pytest

import mlx5tlp
from mlx5tlp import engine, sim
from test_engine import spec

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


def test_gateway_vars_of_another_context_or_none_are_refused(device: str) -> None:
    # A VAR of another device would have the lanes answer this device's requests into that
    # device's page; of another context of this device, closing that context would free the
    # page under the running lanes. Both are refused by name, nothing left allocated.
    other = f"{device}_other"
    sim.create_device(other)
    try:
        with mlx5tlp.open_device(device, backend="sim") as ctx, \
                mlx5tlp.open_device(other, backend="sim") as ctx_other, \
                mlx5tlp.open_device(device, backend="sim") as ctx_same:
            for foreign in (ctx_other.alloc_var(tlp=True), ctx_same.alloc_var(tlp=True)):
                with pytest.raises(mlx5tlp.InvalidArgumentError,
                                   match=r"gateway_vars\[0\]: a VAR of another context"):
                    engine.Device(ctx, spec(), [], gateway_vars=[foreign])
                foreign.free()
            with pytest.raises(mlx5tlp.InvalidArgumentError, match="gateway_vars: no VAR"):
                engine.Device(ctx, spec(), [], gateway_vars=[])
        assert sim.device_stats(device)["tlp_vars"] == 0
    finally:
        sim.remove_device(other)


def test_hooks_raising_base_exceptions_or_returning_garbage_are_hook_errors(
        device: str) -> None:
    # SystemExit / KeyboardInterrupt raised in a hook escaped the hook handling: the register
    # read was answered SC with 0, nothing was counted, the traceback went to stderr as
    # "Exception ignored". A handler's return value that is not a list of answers (not
    # iterable) escaped the same way. Each is a failed access: Completer Abort
    # (PCIe Base §2.3.1), counted, kept in last_hook_error.
    from mlx5tlp import tlp
    from test_engine import BAR0, Bus

    def on_read(name: str) -> int:
        raise KeyboardInterrupt

    results: list[object] = [SystemExit(3), 42]

    def handler(requests: list[engine.Request]) -> object:
        r = results.pop(0)
        if isinstance(r, BaseException):
            raise r
        return r

    regs = engine.RegisterRegion(0, 0x1000, [engine.Register("r", 0, on_read=on_read)])
    cb = engine.CallbackRegion(0, 0x2000, 0x100, handler)
    with mlx5tlp.open_device(device, backend="sim") as ctx, sim.Host(device) as host, \
            engine.Device(ctx, spec(), [regs, cb]) as dev:
        bus = Bus(host)
        bus.enumerate()
        expected = [("r on_read", BAR0 + 0x1000, "KeyboardInterrupt"),
                    ("handler", BAR0 + 0x2000, "SystemExit"),
                    ("handler", BAR0 + 0x2000, "TypeError")]
        for n, (_, address, what) in enumerate(expected, start=1):
            tag = bus.next_tag()
            bus.send(tlp.Tlp.mem_read(address, 1, tag=tag))
            (c,) = bus.collect(1)
            assert (c.tag, c.status) == (tag, tlp.Status.CA), (n, c)
            assert dev.stats()["hook_errors"] == n
            assert dev.last_hook_error is not None and what in dev.last_hook_error
        assert dev.state == "running"
