"""The native engine serving a declared function on the software device, checked by sim.Host.

Every completion is checked twice: by the host model (requester id + tag, byte counts
counting down, lower addresses, no data on UR/CA: docs/sim.md) and here against the region's
bytes. Rules cited: PCIe Base Specification 6.x — §2.2.9 (completion fields), §2.3.1.1 (read
data return, RCB splitting), §7.5.1.1.3 (Memory Space Enable: UR when clear), §2.2.6.2
(Bus/Device Number capture from CfgWr0).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Optional

import pytest

import mlx5tlp
from mlx5tlp import engine, sim, tlp
from mlx5tlp import function as fn

BAR0 = 0xF000_0000
BAR2 = 0xE000_0000


def spec() -> fn.FunctionSpec:
    return fn.FunctionSpec(
        identity=fn.Identity(vendor_id=0x15B3, device_id=0x1234, class_code=0x020000),
        bars=[fn.Bar(0, "mem32", 1 << 16), fn.Bar(2, "mem32", 1 << 14)],
        msix=fn.Msix(vectors=4, table_bar=2, table_offset=0x2000, pba_bar=2, pba_offset=0x3000),
    )


class Bus:
    """The host side: sends requests, collects and checks completions."""

    def __init__(self, host: sim.Host) -> None:
        self.host = host
        self.tag = 0

    def send(self, t: tlp.Tlp, channel: int = 0) -> None:
        deadline = time.monotonic() + 5
        while not self.host.send_request(t.encode(), channel):
            assert time.monotonic() < deadline, "channel stayed full"
            time.sleep(0.001)

    def next_tag(self) -> int:
        self.tag = (self.tag + 1) % 256
        return self.tag

    def collect(self, n: int, timeout: float = 10.0) -> list[tlp.Tlp]:
        out: list[tlp.Tlp] = []
        deadline = time.monotonic() + timeout
        while len(out) < n and time.monotonic() < deadline:
            out += [tlp.decode(r) for r in self.host.completions(0.05)]
        assert len(out) >= n, f"{len(out)} of {n} completions arrived"
        return out

    def cfg_write(self, off: int, value: int, dest: int = 0x0100) -> tlp.Tlp:
        self.send(tlp.Tlp.cfg_write(dest, off, value.to_bytes(4, "little"), tag=self.next_tag()))
        (c,) = self.collect(1)
        return c

    def cfg_read(self, off: int, dest: int = 0x0100) -> int:
        self.send(tlp.Tlp.cfg_read(dest, off, tag=self.next_tag()))
        (c,) = self.collect(1)
        assert c.status == tlp.Status.SC and c.lower_address == 0 and c.byte_count == 4
        return int.from_bytes(c.data, "little")

    def enumerate(self) -> None:
        self.cfg_write(0x10, BAR0)
        self.cfg_write(0x18, BAR2)
        self.cfg_write(0x04, 0x6)  # Memory Space Enable + Bus Master Enable

    def read(self, address: int, nbytes: int, channel: int = 0) -> tuple[int, list[tlp.Tlp]]:
        tag = self.next_tag()
        self.send(tlp.Tlp.mem_read(address, max(1, nbytes // 4), tag=tag), channel)
        return tag, []


@pytest.fixture
def host(device: str) -> Any:
    with sim.Host(device) as h:
        yield h


def _served(ctx: mlx5tlp.Context, regions: list[Any], **kw: Any) -> engine.Device:
    return engine.Device(ctx, spec(), regions, **kw)


def _read_all(bus: Bus, address: int, nbytes: int) -> tuple[bytes, list[tlp.Tlp]]:
    tag = bus.next_tag()
    bus.send(tlp.Tlp.mem_read(address, nbytes // 4, tag=tag))
    cpls: list[tlp.Tlp] = []
    got = 0
    deadline = time.monotonic() + 10
    while got < nbytes and time.monotonic() < deadline:
        for c in bus.collect(1):
            assert c.tag == tag and c.status == tlp.Status.SC
            cpls.append(c)
            got += len(c.data)
    return b"".join(c.data for c in cpls), cpls


@pytest.mark.parametrize("nbytes", [4, 64, 256, 4096])
def test_memory_reads_split_per_mps_and_rcb(ctx: mlx5tlp.Context, host: sim.Host,
                                           nbytes: int) -> None:
    mem = engine.MemoryRegion(0, 0x1000, 0x2000)
    pattern = bytes((i * 7 + 3) & 0xFF for i in range(0x2000))
    mem.write(0, pattern)
    with _served(ctx, [mem], trace=64) as dev:
        bus = Bus(host)
        bus.enumerate()
        start = 0x40 if nbytes < 4096 else 0  # a request must not cross 4 KiB (§2.2.7)
        data, cpls = _read_all(bus, BAR0 + 0x1000 + start, nbytes)
        assert data == pattern[start:start + nbytes]
        # §2.3.1.1: byte counts count down; each payload <= Max_Payload_Size (128 B default
        # MPS from Device Control), every completion but the last ends on an RCB boundary.
        remaining = nbytes
        addr = start
        for c in cpls:
            assert c.byte_count == remaining
            assert c.lower_address == addr & 0x7F
            assert len(c.data) <= 128  # Device Control MPS resets to 128 bytes (§7.5.3.4)
            remaining -= len(c.data)
            addr += len(c.data)
        for c in cpls[:-1]:
            assert (start + nbytes - c.byte_count + len(c.data)) % 64 == 0  # RCB 64
        st = host.stats()
        assert st["errors"] == 0, st["last_error"]
        assert st["outstanding"] == 0
        es = dev.stats()
        assert es["requests"]["MRd"] == 1
        assert es["regions"][0]["read_bytes"] == nbytes
        assert es["completions"] >= len(cpls)
        assert sum(es["latency_ns_log2"]) == 4  # three config writes + the read
        assert dev.answered == 4  # the same count, without building the stats


def test_posted_write_then_read_back(ctx: mlx5tlp.Context, host: sim.Host) -> None:
    mem = engine.MemoryRegion(0, 0, 0x1000)
    with _served(ctx, [mem]) as dev:
        bus = Bus(host)
        bus.enumerate()
        bus.send(tlp.Tlp.mem_write(BAR0 + 0x100, bytes(range(0x11, 0x99, 0x11)), first_be=0xE,
                                   last_be=0x7))
        data, _ = _read_all(bus, BAR0 + 0x100, 8)
        # Byte enables: byte 0 and byte 7 were not written (§2.2.5).
        assert data == b"\x00\x22\x33\x44\x55\x66\x77\x00"
        assert mem.read(0x100, 8) == data
        assert dev.stats()["requests"]["MWr"] == 1
        assert host.stats()["errors"] == 0


def test_unsupported_request_for_unclaimed_and_disabled(ctx: mlx5tlp.Context,
                                                        host: sim.Host) -> None:
    mem = engine.MemoryRegion(0, 0, 0x1000)
    with _served(ctx, [mem]) as dev:
        bus = Bus(host)
        # Memory Space Enable clear: UR (§7.5.1.1.3).
        bus.cfg_write(0x10, BAR0)
        bus.send(tlp.Tlp.mem_read(BAR0, 1, tag=bus.next_tag()))
        (c,) = bus.collect(1)
        assert c.status == tlp.Status.UR and not c.data
        bus.cfg_write(0x04, 0x2)
        # Inside the BAR but no region: UR.
        bus.send(tlp.Tlp.mem_read(BAR0 + 0x8000, 1, tag=bus.next_tag()))
        (c,) = bus.collect(1)
        assert c.status == tlp.Status.UR
        # Not this function's address at all: UR.
        bus.send(tlp.Tlp.mem_read(0x1000, 1, tag=bus.next_tag()))
        (c,) = bus.collect(1)
        assert c.status == tlp.Status.UR
        # Type 1 configuration request: UR for an Endpoint.
        bus.send(tlp.Tlp.cfg_read(0x0100, 0, type=1, tag=bus.next_tag()))
        (c,) = bus.collect(1)
        assert c.status == tlp.Status.UR
        # MRdLk: UR (only Legacy Endpoints support locked requests).
        bus.send(tlp.Tlp.mem_read(BAR0, 1, tag=bus.next_tag(), locked=True))
        (c,) = bus.collect(1)
        assert c.status == tlp.Status.UR
        assert dev.stats()["ur"] == 4 + 1
        assert host.stats()["errors"] == 0


def test_config_reads_through_tlps_and_completer_id(ctx: mlx5tlp.Context, host: sim.Host) -> None:
    with _served(ctx, []) as dev:
        bus = Bus(host)
        assert bus.cfg_read(0) == 0x1234_15B3
        bus.cfg_write(0x10, 0xFFFF_FFFF, dest=0x0308)
        # BAR sizing: all-ones reads back the size mask (64 KiB, mem32).
        assert bus.cfg_read(0x10) == 0xFFFF_0000
        # §2.2.6.2: the Bus/Device Numbers of the CfgWr0 become the Completer ID.
        assert dev.completer_id == 0x0308
        bus.send(tlp.Tlp.cfg_read(0x0308, 0, tag=bus.next_tag()))
        (c,) = bus.collect(1)
        assert c.completer_id == 0x0308
        assert dev.config_bytes()[:4] == bytes.fromhex("b3153412")


def test_register_region_semantics(ctx: mlx5tlp.Context, host: sim.Host) -> None:
    seen: list[tuple[str, int]] = []
    regs = engine.RegisterRegion(0, 0x2000, [
        engine.Register("id", 0x0, reset=0xC0DE, access="ro"),
        engine.Register("ctrl", 0x4, reset=0x1, access="rw",
                        on_write=lambda n, v: seen.append((n, v))),
        engine.Register("status", 0x8, reset=0xFF, access="rw1c"),
        engine.Register("key", 0xC, access="wo"),
        engine.Register("count", 0x10, access="ro", on_read=lambda n: 42),
    ])
    with _served(ctx, [regs]):
        bus = Bus(host)
        bus.enumerate()
        for off, val in ((0x0, 1), (0x4, 0xABCD), (0x8, 0x0F), (0xC, 0x5A5A)):
            bus.send(tlp.Tlp.mem_write(BAR0 + 0x2000 + off, val.to_bytes(4, "little")))
        data, _ = _read_all(bus, BAR0 + 0x2000, 0x14)
        words = [int.from_bytes(data[i:i + 4], "little") for i in range(0, 0x14, 4)]
        assert words == [0xC0DE, 0xABCD, 0xF0, 0, 42]
        assert regs["key"] == 0x5A5A and regs["status"] == 0xF0
        assert seen == [("ctrl", 0xABCD)]
        assert host.stats()["errors"] == 0


def test_callback_region_batched_and_deferred(ctx: mlx5tlp.Context, host: sim.Host) -> None:
    calls: list[int] = []
    kept: list[engine.Request] = []

    def handler(reqs: list[engine.Request]) -> Optional[list[Optional[bytes]]]:
        calls.append(len(reqs))
        out: list[Optional[bytes]] = []
        for r in reqs:
            if r.offset >= 0x100:
                kept.append(r)  # deferred: answered later from another thread
                out.append(None)
            else:
                out.append(bytes([r.offset & 0xFF]) * r.length)
        return out

    cb = engine.CallbackRegion(0, 0x4000, 0x1000, handler)
    with _served(ctx, [cb], batch=32) as dev:
        bus = Bus(host)
        bus.enumerate()
        tags = []
        for i in range(16):
            t = bus.next_tag()
            tags.append(t)
            bus.send(tlp.Tlp.mem_read(BAR0 + 0x4000 + i * 4, 1, tag=t))
        cpls = bus.collect(16)
        assert sorted(c.tag for c in cpls) == sorted(tags)
        for c in cpls:
            i = tags.index(c.tag)
            assert c.data == bytes([i * 4]) * 4
        assert sum(calls) == 16 and len(calls) <= 16
        # Deferred: answered from another thread.
        t = bus.next_tag()
        bus.send(tlp.Tlp.mem_read(BAR0 + 0x4100, 2, tag=t))
        deadline = time.monotonic() + 5
        while not kept and time.monotonic() < deadline:
            time.sleep(0.001)
        assert kept
        assert host.completions(0.02) == []
        th = threading.Thread(target=kept[0].complete, args=(b"\xAA" * 8,))
        th.start()
        th.join()
        (c,) = bus.collect(1)
        assert c.tag == t and c.data == b"\xAA" * 8
        with pytest.raises(mlx5tlp.InvalidHandleError):
            kept[0].complete(b"\x00" * 8)
        st = dev.stats()
        assert st["deferred"] == 1 and st["deferred_completed"] == 1
        assert st["handler_batches"] >= 2
        assert host.stats()["errors"] == 0


def test_deferred_deadline_expires_with_completer_abort(ctx: mlx5tlp.Context,
                                                        host: sim.Host) -> None:
    kept: list[engine.Request] = []
    cb = engine.CallbackRegion(0, 0x4000, 0x1000, kept.extend, deadline=0.05)
    with _served(ctx, [cb]) as dev:
        bus = Bus(host)
        bus.enumerate()
        t = bus.next_tag()
        start = time.monotonic()
        bus.send(tlp.Tlp.mem_read(BAR0 + 0x4000, 1, tag=t))
        (c,) = bus.collect(1)
        assert c.tag == t and c.status == tlp.Status.CA and not c.data
        assert time.monotonic() - start >= 0.04
        assert dev.stats()["deferred_expired"] == 1
        with pytest.raises(mlx5tlp.InvalidHandleError):
            kept[0].complete(b"\x00" * 4)
        assert host.stats()["errors"] == 0


def test_trace_dump_reads_back(ctx: mlx5tlp.Context, host: sim.Host, tmp_path: Any) -> None:
    mem = engine.MemoryRegion(0, 0, 0x1000)
    with _served(ctx, [mem], trace=16) as dev:
        bus = Bus(host)
        bus.enumerate()
        for _ in range(20):
            _read_all(bus, BAR0, 64)
        n = dev.trace_dump(tmp_path / "t.bin")
    assert n == 16  # the ring keeps the last 16 of 23 requests
    entries = engine.read_trace(tmp_path / "t.bin")
    assert len(entries) == 16
    assert all(e.kind == 0 and e.address == BAR0 and e.length_dw == 16 and e.completions == 1
               for e in entries[-10:])
    assert os.path.getsize(tmp_path / "t.bin") == 16 + 16 * 64
    (tmp_path / "bad").write_bytes(b"nope" * 8)
    with pytest.raises(mlx5tlp.Error):
        engine.read_trace(tmp_path / "bad")


def test_pause_resume_stop(ctx: mlx5tlp.Context, host: sim.Host) -> None:
    mem = engine.MemoryRegion(0, 0, 0x1000)
    with _served(ctx, [mem], pages=2) as dev:
        bus = Bus(host)
        bus.enumerate()
        assert dev.pause(5.0) and dev.state == "paused"
        bus.send(tlp.Tlp.mem_read(BAR0, 1, tag=bus.next_tag()))
        assert host.completions(0.05) == []
        dev.resume()
        assert len(bus.collect(1)) == 1
        dev.stop()
        assert dev.state == "stopped"
    assert host.stats()["errors"] == 0


def test_wait_first_answer_blocks_until_a_lane_answers(ctx: mlx5tlp.Context,
                                                       host: sim.Host) -> None:
    mem = engine.MemoryRegion(0, 0, 0x1000)
    with _served(ctx, [mem], pages=2) as dev:
        bus = Bus(host)
        bus.enumerate()
        assert dev.pause(5.0)
        dev.resume()  # the first answer since the resume is still to come
        t0 = time.monotonic_ns()
        assert dev.wait_first_answer(0.05) == 0  # nothing sent: the deadline
        assert time.monotonic_ns() - t0 >= 40_000_000
        for bad in (-1.0, float("nan")):
            with pytest.raises(mlx5tlp.InvalidArgumentError):
                dev.wait_first_answer(bad)
        got: list[int] = []
        waiter = threading.Thread(target=lambda: got.append(dev.wait_first_answer(10.0)))
        waiter.start()
        time.sleep(0.02)
        assert waiter.is_alive()  # blocked, not polling its way out
        bus.send(tlp.Tlp.mem_read(BAR0, 1, tag=bus.next_tag()))
        waiter.join(10.0)
        assert not waiter.is_alive() and got == [dev.first_answer_ns] and got[0] > t0
        assert len(bus.collect(1)) == 1


def test_bad_regions_are_named(ctx: mlx5tlp.Context) -> None:
    with pytest.raises(mlx5tlp.InvalidArgumentError, match="runs past BAR 0"):
        engine.Device(ctx, spec(), [engine.MemoryRegion(0, 0xF000, 0x2000)])
    with pytest.raises(mlx5tlp.InvalidArgumentError, match="overlaps region"):
        engine.Device(ctx, spec(), [engine.MemoryRegion(0, 0, 0x100, name="a"),
                                    engine.MemoryRegion(0, 0x80, 0x100, name="b")])
    with pytest.raises(mlx5tlp.InvalidArgumentError, match="MSI-X"):
        engine.Device(ctx, spec(), [engine.MemoryRegion(2, 0x2000, 0x100)])
    with pytest.raises(mlx5tlp.InvalidArgumentError, match="not a BAR"):
        engine.Device(ctx, spec(), [engine.MemoryRegion(4, 0, 0x100)])
    with pytest.raises(mlx5tlp.InvalidArgumentError, match=r"registers\[1\].offset"):
        engine.RegisterRegion(0, 0, [engine.Register("a", 0), engine.Register("b", 2, width=2)])


def test_msix_message_reaches_the_host_model(ctx: mlx5tlp.Context, host: sim.Host) -> None:
    with _served(ctx, []) as dev:
        bus = Bus(host)
        bus.enumerate()
        msix = fn.Function(spec()).capability_offset("msix")
        bus.cfg_write(msix, 1 << 31)  # Message Control: MSI-X Enable (§7.7.2.2)
        # Table entry 0 (BAR 2 + 0x2000): address, upper address, data, vector control.
        for off, val in ((0, 0xFEE0_0000), (4, 0), (8, 0x1234), (12, 1)):
            bus.send(tlp.Tlp.mem_write(BAR2 + 0x2000 + off, val.to_bytes(4, "little")))
        _read_all(bus, BAR2 + 0x2000, 16)  # a read after the writes: they are done
        assert dev.raise_msix(0) == "pending"  # masked: the Pending bit is set (§6.1.4.5)
        assert dev.msix_pending(0)
        bus.send(tlp.Tlp.mem_write(BAR2 + 0x200C, (0).to_bytes(4, "little")))  # unmask
        deadline = time.monotonic() + 5
        got: list[bytes] = []
        while not got and time.monotonic() < deadline:
            got = [r for r in host.completions(0.05) if r[0] & 0xDF == 0x40]
        (m,) = got
        w = tlp.decode(m)
        assert w.kind == "MWr" and w.address == 0xFEE0_0000
        assert w.data == (0x1234).to_bytes(4, "little")
        assert not dev.msix_pending(0)
        assert dev.raise_msix(0) == "sent"
        st = host.stats()
        assert st["errors"] == 0 and st["interrupts"] >= 1


def test_requests_a_dead_claimer_left_are_answered_once(device: str, host: sim.Host) -> None:
    # A claimer process takes two requests and dies without answering: the engine started
    # afterwards recovers both (docs/sim.md, claimer sessions) and answers each exactly once.
    import mmap
    import subprocess
    import sys

    state = mmap.mmap(-1, fn.STATE_SIZE)  # the function state a successor adopts
    mem = engine.MemoryRegion(0, 0, 0x1000)
    mem.write(0, b"\x5a" * 8)
    with mlx5tlp.open_device(device, backend="sim") as ctx:
        with _served(ctx, [mem], state=state):
            bus = Bus(host)
            bus.enumerate()
        tags = [bus.next_tag(), bus.next_tag()]
        for t in tags:
            bus.send(tlp.Tlp.mem_read(BAR0, 2, tag=t))
        code = ("import os, signal, mlx5tlp\nfrom mlx5tlp import sim\n"
                f"c = mlx5tlp.open_device({device!r}, backend='sim')\n"
                "got = [sim.claim_request(c, 0) for _ in range(2)]\n"
                "assert all(g is not None for g in got), got\n"
                "os.kill(os.getpid(), signal.SIGKILL)\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == -9, out.stderr
        with _served(ctx, [mem], state=state, adopt=True) as dev:
            cpls = bus.collect(2)
            assert sorted(c.tag for c in cpls if c.data == b"\x5a" * 8) == sorted(tags)
            assert dev.stats()["redelivered"] == 2
        assert host.completions(0.05) == []
        assert host.stats()["errors"] == 0


def test_resume_after_a_pause_that_timed_out_serves_again(ctx: mlx5tlp.Context,
                                                          host: sim.Host) -> None:
    """pause() returns False at its deadline while a lane cannot write its batch (the host
    consumes nothing: the page holds 15 records); resume() then takes the pause back, and once
    the host consumes every read is answered. Before, resume() of the still-running engine did
    nothing: each lane paused as soon as it could and stayed paused (a planned handover that
    aborted at the pause left its primary answering nothing)."""
    mem = engine.MemoryRegion(0, 0, 0x1000)
    with _served(ctx, [mem], batch=32) as dev:
        bus = Bus(host)
        bus.enumerate()
        tags = []
        for i in range(40):
            tags.append(bus.next_tag())
            bus.send(tlp.Tlp.mem_read(BAR0 + 4 * i, 1, tag=tags[-1]))
        time.sleep(0.2)  # the lanes fill the page and wait for room
        assert not dev.pause(0.2)
        assert dev.state == "running"
        dev.resume()
        got = bus.collect(40)
        assert sorted(c.tag for c in got) == sorted(tags)
        assert all(c.status == tlp.Status.SC for c in got)
        assert dev.pause(5.0)  # and a later pause still works
        dev.resume()


@pytest.mark.parametrize("lean", [False, True])
def test_prepare_pause_takes_only_what_the_page_can_take(ctx: mlx5tlp.Context, host: sim.Host,
                                                         device: str, lean: bool) -> None:
    """40 one-completion reads wait while the host consumes nothing; the page holds 15
    records (docs/sim.md). The first batch after a (re)start is 4 reads (the host waits for
    a first answer: it is in the page once its batch is served). Then a lane takes a whole
    batch (32): 11 written, all 32 claimed until the batch is written (a pause would wait for
    the host to consume 21 more), 4 left. After prepare_pause() it takes what the page can
    take (11), then one at a time: 1 claimed and waiting, 24 left in the channel for whoever
    serves next. Either way every read is answered once when the host consumes."""
    mem = engine.MemoryRegion(0, 0, 0x1000)
    with _served(ctx, [mem], batch=32) as dev:
        bus = Bus(host)
        bus.enumerate()
        assert dev.pause(5.0)
        tags = []
        for i in range(40):
            tags.append(bus.next_tag())
            bus.send(tlp.Tlp.mem_read(BAR0 + 4 * i, 1, tag=tags[-1]))
        dev.prepare_pause(lean)
        dev.resume()
        want = (1, 24) if lean else (32, 4)
        deadline = time.monotonic() + 10
        while True:
            st = sim.device_stats(device)
            now = (st["requests_claimed"], st["requests_pending"])
            if now == want or time.monotonic() > deadline:
                break
            time.sleep(0.005)
        assert now == want, st
        got = bus.collect(40)
        assert sorted(c.tag for c in got) == sorted(tags)
        assert all(c.status == tlp.Status.SC for c in got)
        dev.prepare_pause(False)
