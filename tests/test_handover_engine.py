"""Handover of a function served by the native engine (``engine.Device.serve``), no mocks.

The primary is a child process serving a function with a memory region, a register file and
a callback region whose handler defers its reads; the test process is the host (every
completion checked by the software device's host model) and the standby. What must survive a
planned handover: configuration space (BAR, Command: the successor still decodes the BAR), the
memory region's bytes, the register file's values, and every deferred read (answered exactly
once, by the predecessor, before it releases its pages: docs/handover.md).
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest

from handover_rig import (
    REQUESTER,
    EventProc,
    cfg_write,
    collect,
    engine_primary,
    private_control,
)
from mlx5tlp import engine, handover, sim, tlp
from mlx5tlp.function import Bar, FunctionSpec, Identity

FUNCTION = 0x0100
BAR_BASE = 0xE000_0000

# Defers every read; answers them `delay` s later from another thread.
LATER = """
def later(reqs):
    emit({{"event": "deferred", "n": len(reqs)}})
    def answer():
        time.sleep({delay})
        for r in reqs:
            if r.needs_answer:
                r.complete(b"P" * r.length)
    threading.Thread(target=answer, daemon=True).start()
"""

def spec() -> FunctionSpec:
    """The function both processes declare."""
    return FunctionSpec(identity=Identity(vendor_id=0x15B3, device_id=0x7F20, class_code=0x028000),
                        bars=[Bar(0, "mem32", 1 << 16)])


def regions(handler: Any) -> list[engine.Region]:
    """Memory at BAR 0 [0, 4 KiB), registers at 0x1000, a callback region at 0x2000 whose
    reads may stay deferred up to 5 s."""
    return [engine.MemoryRegion(0, 0, 0x1000, name="mem"),
            engine.RegisterRegion(0, 0x1000, [engine.Register("ctrl", 0, reset=1),
                                              engine.Register("status", 4, reset=0xF0,
                                                              access="rw1c")], name="regs"),
            engine.CallbackRegion(0, 0x2000, 0x1000, handler, deadline=5.0, name="cb")]


def successor_handler(reqs: list[engine.Request]) -> list[Optional[bytes]]:
    return [b"S" * r.length if r.needs_answer else None for r in reqs]


@pytest.fixture
def setup(tmp_path: Path, device: str) -> Iterator[tuple[str, bytes, dict[str, str]]]:
    with private_control(tmp_path) as ctl:
        yield ctl
    for c in _children:
        c.close()
    _children.clear()


_children: list[EventProc] = []


def start_primary(setup: tuple[str, bytes, dict[str, str]], device: str,
                  delay: float = 0.3) -> EventProc:
    path, key, env = setup
    argv = engine_primary("test_handover_engine", device=device, path=path, key=key,
                          names="regions, spec", setup=LATER.format(delay=delay),
                          regions="regions(later)")
    c = EventProc("primary", argv, env)
    _children.append(c)
    c.wait_event("serving")
    return c


def mem_read(off: int, n: int, tag: int) -> bytes:
    return tlp.Tlp.mem_read(BAR_BASE + off, n // 4, requester_id=REQUESTER, tag=tag).encode()


def mem_write(off: int, data: bytes, tag: int) -> bytes:
    return tlp.Tlp.mem_write(BAR_BASE + off, data, requester_id=REQUESTER, tag=tag).encode()


def enumerate_function(host: sim.Host) -> None:
    # BAR 0, then Memory Space Enable (PCIe Base 6.x §7.5.1.1.3; without it: UR).
    assert host.send_request(cfg_write(0x10, BAR_BASE, 1))
    assert host.send_request(cfg_write(0x04, 0x0006, 2))
    got = collect(host, 2)
    assert [c.status for c in got] == [tlp.Status.SC, tlp.Status.SC]


def read(host: sim.Host, off: int, n: int, tag: int) -> bytes:
    assert host.send_request(mem_read(off, n, tag))
    (cpl,) = collect(host, 1)
    assert cpl.status == tlp.Status.SC, cpl
    return bytes(cpl.data)


def test_engine_primary_hands_over_state_registers_and_deferred_reads(
        setup: tuple[str, bytes, dict[str, str]], device: str) -> None:
    path, key, _env = setup
    with sim.Host(device) as host:
        primary = start_primary(setup, device)
        enumerate_function(host)
        assert host.send_request(mem_write(0x40, b"\x11\x22\x33\x44", 3))  # memory region
        assert host.send_request(mem_write(0x1000, (0xABCD).to_bytes(4, "little"), 4))  # ctrl
        assert host.send_request(mem_write(0x1004, (0x30).to_bytes(4, "little"), 5))  # rw1c
        assert read(host, 0x40, 4, 6) == b"\x11\x22\x33\x44"
        sb = handover.Standby(path, key, spec=spec(), regions=regions(successor_handler))
        try:
            # Deferred reads in the primary's callback region, answered 300 ms later: the
            # handover must finish them before the primary gives its page away.
            for tag in range(10, 14):
                assert host.send_request(mem_read(0x2000 + 4 * tag, 8, tag))
            # Taken by the primary's lanes (perhaps over several batches), not answered yet.
            end = time.monotonic() + 30
            while sum(e.get("n", 0) for e in list(primary.events)
                      if e["event"] == "deferred") < 4:
                assert time.monotonic() < end, primary.events
                time.sleep(0.005)
            new = sb.promote()
        except BaseException:
            sb.close()
            raise
        try:
            got = collect(host, 4)
            assert sorted(c.tag for c in got) == [10, 11, 12, 13], got
            assert all(bytes(c.data) == b"P" * 8 for c in got), got
            ev = primary.wait_event("handed-over")
            assert ev["successor"] == os.getpid()
            # The successor: same BAR decode (shared config space), memory, registers.
            assert read(host, 0x40, 4, 20) == b"\x11\x22\x33\x44"
            assert read(host, 0x1000, 4, 21) == (0xABCD).to_bytes(4, "little")
            assert read(host, 0x1004, 4, 22) == (0xC0).to_bytes(4, "little")  # 0xF0 & ~0x30
            assert read(host, 0x2000, 8, 23) == b"S" * 8  # the successor's handler
            assert primary.wait_event("outcome")["outcome"] == "handed-over"
            assert primary.p.wait(30) == 0
            st = host.stats()
            assert (st["outstanding"], st["unexpected"], st["errors"]) == (0, 0, 0), st
            assert new.status()["generation"] == 2
        finally:
            new.stop()
            new.close()
            sb.close()
    ds = sim.device_stats(device)
    assert (ds["requests_claimed"], ds["requests_pending"]) == (0, 0), ds


def test_engine_successor_with_other_regions_is_refused(
        setup: tuple[str, bytes, dict[str, str]], device: str) -> None:
    path, key, _env = setup
    primary = start_primary(setup, device)
    other = regions(successor_handler)
    other[0] = engine.MemoryRegion(0, 0, 0x800, name="mem")  # half the primary's region
    with pytest.raises(handover.StateMismatchError) as exc:
        handover.Standby(path, key, spec=spec(), regions=other)
    assert exc.value.errno == errno.EINVAL and "regions[0]" in str(exc.value)
    assert "size" in str(exc.value)
    # Without the callback handler the standby cannot serve the primary's callback region:
    # it finds out when it joins (it builds its engine then, before it says ready), not when a
    # handover is asked for or the primary has died (the primary never pauses).
    with pytest.raises(handover.StateMismatchError) as exc2:
        handover.Standby(path, key, spec=spec())
    assert "callback region 'cb'" in str(exc2.value)
    st = handover.request(path, key, "status")
    assert (st["generation"], st["handovers"], st["rollbacks"]) == (1, 0, 0), st
    handover.request(path, key, "stop")
    assert primary.wait_event("outcome")["outcome"] == "stopped"
    assert primary.p.wait(30) == 0


def test_engine_takeover_after_sigkill_keeps_registers(
        setup: tuple[str, bytes, dict[str, str]], device: str) -> None:
    path, key, _env = setup
    with sim.Host(device) as host:
        primary = start_primary(setup, device)
        enumerate_function(host)
        assert host.send_request(mem_write(0x1000, (0x5A5A).to_bytes(4, "little"), 3))
        assert read(host, 0x1000, 4, 4) == (0x5A5A).to_bytes(4, "little")
        sb = handover.Standby(path, key, spec=spec(), regions=regions(successor_handler))
        primary.p.kill()
        primary.p.wait(30)
        new = sb.wait(timeout=30)
        assert new is not None
        try:
            # Register values live in a memfd: they survive the crash.
            assert read(host, 0x1000, 4, 5) == (0x5A5A).to_bytes(4, "little")
            assert read(host, 0x2000, 4, 6) == b"SSSS"
            assert new.status()["generation"] == 2
            st = host.stats()
            assert (st["outstanding"], st["unexpected"], st["errors"]) == (0, 0, 0), st
        finally:
            new.stop()
            new.close()
            sb.close()
    ds = sim.device_stats(device)
    assert (ds["requests_claimed"], ds["contexts"], ds["tlp_vars"]) == (0, 0, 0), ds


def test_drain_deferred_then_a_detached_engine_takes_the_pages(device: str) -> None:
    # In one process, the two halves of a planned handover on the engine: the predecessor
    # pauses and finishes its deferred read (drain_deferred is False while it is open); the
    # successor, built with attach=False, cannot open the pages while they are held (EBUSY)
    # and serves from the same state once they are released.
    import mlx5tlp
    from mlx5tlp.handover.state import SharedState

    held: list[engine.Request] = []
    with mlx5tlp.open_device(device, backend="sim") as ctx, sim.Host(device) as host:
        old = engine.Device(ctx, spec(), regions(held.extend), handover=True)
        try:
            enumerate_function(host)
            assert host.send_request(mem_read(0x2000, 4, 7))
            end = time.monotonic() + 10
            while not held:
                assert time.monotonic() < end
                time.sleep(0.001)
            assert old.pause(1.0)
            assert old.drain_deferred(0.05) is False  # still open
            held[0].complete(b"DONE")
            assert old.drain_deferred(1.0) is True
            (cpl,) = collect(host, 1)
            assert (cpl.tag, bytes(cpl.data)) == (7, b"DONE")
            state = old.shared
            assert isinstance(state, SharedState)
            new = engine.Device(ctx, spec(), regions(successor_handler), gateway_vars=old.vars,
                                attach=False)
            try:
                with pytest.raises(mlx5tlp.Error) as exc:
                    new.attach(state)
                assert exc.value.errno == errno.EBUSY
                old.release_gateways()
                new.attach(state)
                new.start()
                assert read(host, 0x2000, 4, 8) == b"SSSS"
                # The shared configuration space came along: same BAR, Memory Space Enable.
                assert new.config_read(0x10) & ~0xF == BAR_BASE
                assert new.completer_id == FUNCTION
            finally:
                new.close()
        finally:
            old.close()
