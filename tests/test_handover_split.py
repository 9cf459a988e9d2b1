"""Exactly once across a crash for a read whose completions do not fit one gateway page.

A 4 KiB Memory Read at Max_Payload_Size 128 bytes needs 32 completions (PCIe Base 6.x
§2.3.1.1: every completion but the last ends on a Read Completion Boundary, none carries more
than Max_Payload_Size); a software-device page holds 15 (4 KiB pages of 256-byte slots), so
the lane publishes the answer with three doorbells and marks each chunk's progress before its
doorbell (docs/handover.md, "Crash takeover"). The serving process is SIGKILLed while its lane
waits for room in the page mid-answer (the host stopped consuming: deterministic, no timing),
a standby takes over, and the host model must see one complete sequence of completions: every
Byte Count the bytes still to be returned, every Lower Address the next byte's (§2.2.9,
§2.3.1.1), the data the memory holds, nothing twice, nothing missing.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest

from handover_rig import REQUESTER, EventProc, Rig, cfg_write, collect, private_control
from mlx5tlp import engine, handover, sim, tlp
from mlx5tlp.function import Bar, FunctionSpec, Identity
from mlx5tlp.handover.node import DEFAULT_BAR_BASE, DEFAULT_BAR_SIZE, memory_pattern

BAR_BASE = 0xE000_0000
PAGE_RECORDS = 15  # docs/sim.md: a 4 KiB gateway page of 256-byte slots (0x80 header)

PRIMARY = r"""
import json, sys
from mlx5tlp import engine, open_device
sys.path[:0] = [{tests!r}]
from test_handover_split import regions, spec

def emit(ev):
    sys.stdout.write(json.dumps(ev) + "\n")
    sys.stdout.flush()

ctx = open_device({device!r}, backend="sim")
dev = engine.Device(ctx, spec(), regions(), handover=True)
p = dev.serve({path!r}, {key!r}, events=emit)
p.run(max_seconds=120)
"""


def spec() -> FunctionSpec:
    return FunctionSpec(identity=Identity(vendor_id=0x15B3, device_id=0x7F21, class_code=0x028000),
                        bars=[Bar(0, "mem32", 1 << 16)])


PATTERN = bytes((i * 7 + 3) & 0xFF for i in range(4096))


def pattern_handler(reqs: list[engine.Request]) -> list[Optional[bytes]]:
    """The callback region's reads: PATTERN at the offset (the same in both processes)."""
    return [PATTERN[r.offset:r.offset + r.length] if r.needs_answer else None for r in reqs]


def regions() -> list[engine.Region]:
    # Memory at BAR 0 [0, 4 KiB), and a callback region at 4 KiB answered by its handler
    # during the batch call (the engine's batched path).
    return [engine.MemoryRegion(0, 0, 0x1000, name="mem"),
            engine.CallbackRegion(0, 0x1000, 0x1000, pattern_handler, name="cb")]


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[str, bytes, dict[str, str]]]:
    with private_control(tmp_path) as ctl:
        yield ctl


def doorbell(page: mmap.mmap) -> int:
    return int(struct.unpack_from("<Q", page, 0)[0])  # docs/sim.md: u64 records published


def wait_doorbell(page: mmap.mmap, want: int, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while doorbell(page) < want:
        assert time.monotonic() < end, f"doorbell {doorbell(page)}, waited for {want}"
        time.sleep(0.002)
    time.sleep(0.05)
    assert doorbell(page) == want, "the lane wrote past a full page"


def check_sequence(st: dict[str, Any], got: list[tlp.Tlp], memory: bytes, bar: int) -> None:
    """The 32 completions of the 4090-byte read at bar + 5: one correct sequence, once."""
    # The host model's own checks (cpp/sim/host_check.cpp): Byte Count, Lower Address, tag.
    assert (st["errors"], st["unexpected"], st["outstanding"]) == (0, 0, 0), st
    assert len(got) == 32, [(c.byte_count, c.lower_address) for c in got]
    # §2.3.1.1: each Byte Count is what is still to be returned, each Lower Address the low
    # 7 bits of the next byte's address; together they return bytes 5..4094 once, in order.
    data = b""
    next_addr = bar + 5
    for c in got:
        assert (c.kind, c.status, c.tag, c.requester_id) == ("CplD", tlp.Status.SC, 9, REQUESTER)
        assert c.byte_count == 4090 - len(data), c
        assert c.lower_address == next_addr & 0x7F, c
        lead = c.lower_address & 3
        take = min(len(c.data) - lead, c.byte_count)
        data += bytes(c.data[lead:lead + take])
        next_addr += take
        if c is not got[-1]:
            assert next_addr % 64 == 0, "a non-final completion ends on the RCB (64 bytes)"
        assert len(c.data) <= 128, "no payload above Max_Payload_Size"
    assert data == memory[5:4095]


def split_read(bar: int) -> bytes:
    # 1023 DWs from byte 4, first byte disabled, last byte too: Byte Count 4090 (§2.3.1.1),
    # a first completion with Lower Address 5 and 31 DWs up to the first 128-byte boundary,
    # then 31 of 128 bytes: 32 completions.
    return tlp.Tlp.mem_read(bar + 4, 1023, requester_id=REQUESTER, tag=9, first_be=0xE,
                            last_be=0x7).encode()


def take_exactly(host: sim.Host, n: int) -> list[tlp.Tlp]:
    """Exactly the first `n` completions (no "a little more" as collect() does: the lane
    writes the next chunk as soon as the whole page is free again)."""
    got: list[tlp.Tlp] = []
    end = time.monotonic() + 30
    while len(got) < n and time.monotonic() < end:
        # At most what is still wanted: a call that returns part of the first page would
        # otherwise pick up the next chunk in the next call (flaked under load).
        got += [tlp.decode(c.tlp) for c in host.completion_records(
            timeout=0.2, max_records=n - len(got))]
    assert len(got) == n
    return got


@pytest.mark.parametrize("where", [0, 0x1000], ids=["memory", "callback"])
@pytest.mark.parametrize("consumed", [0, PAGE_RECORDS],
                         ids=["after-doorbell-1", "after-doorbell-2"])
def test_split_read_is_answered_exactly_once_across_sigkill(
        setup: tuple[str, bytes, dict[str, str]], device: str, consumed: int, where: int) -> None:
    path, key, env = setup
    memory = PATTERN
    code = PRIMARY.format(tests=str(Path(__file__).parent), device=device, path=path, key=key)
    with sim.Host(device) as host, contextlib.ExitStack() as stack:
        primary = EventProc("primary", [sys.executable, "-c", code], env)
        try:
            primary.wait_event("serving")
            # BAR 0, Memory Space Enable (§7.5.1.1.3); Max_Payload_Size stays at its reset
            # value, 128 bytes (§7.5.3.4), and the Read Completion Boundary at 64 (§7.5.3.7).
            assert host.send_request(cfg_write(0x10, BAR_BASE, 1))
            assert host.send_request(cfg_write(0x04, 0x0006, 2))
            assert [c.status for c in collect(host, 2)] == [tlp.Status.SC] * 2
            for off in range(0, 4096, 128):  # posted, at most Max_Payload_Size each (§2.2.2)
                assert host.send_request(tlp.Tlp.mem_write(
                    BAR_BASE + off, memory[off:off + 128], requester_id=REQUESTER).encode())
            sb = handover.Standby(path, key, spec=spec(), regions=regions())
            assert sb.node is not None
            page = sb.node.vars[0].mmap(mmap.PROT_READ)
            stack.callback(sb.close)  # also when a step fails: no socket left open
            try:
                base = doorbell(page)
                assert host.send_request(split_read(BAR_BASE + where))
                got = []
                wait_doorbell(page, base + PAGE_RECORDS)  # the page is full: the lane waits
                if consumed:
                    got += take_exactly(host, consumed)
                    wait_doorbell(page, base + 2 * PAGE_RECORDS)
                primary.p.kill()
                assert primary.p.wait(30) == -9
                new = sb.wait(timeout=30)
                assert new is not None
                try:
                    got += collect(host, 32 - len(got))
                    dev = new.server.device
                    assert dev is not None
                    es = dev.stats()
                finally:
                    new.stop()
                    new.close()
                    sb.close()
            finally:
                page.close()
        finally:
            primary.close()
        st = host.stats()
    check_sequence(st, got, memory, BAR_BASE + where)
    # The successor resolved one redelivered claim, and answered only what the host lacked.
    assert (es["redelivered"], es["partly_published"], es["already_published"]) == (1, 1, 0), es
    assert es["completions"] == 32 - PAGE_RECORDS * (1 + bool(consumed)), es
    ds = sim.device_stats(device)
    assert (ds["requests_claimed"], ds["contexts"], ds["tlp_vars"]) == (0, 0, 0), ds


@pytest.mark.parametrize("consumed", [0, PAGE_RECORDS],
                         ids=["after-doorbell-1", "after-doorbell-2"])
def test_split_read_on_the_python_server_is_answered_exactly_once_across_sigkill(
        tmp_path: Path, device: str, consumed: int) -> None:
    # The same on `mlx5tlp serve --engine python` (handover/server.py): chunks of a page,
    # each marked with its progress; the successor (a standby in this process) answers the rest.
    rig = Rig(tmp_path, device, engine="python")
    os.environ["MLX5TLP_LOCK_DIR"] = rig.env["MLX5TLP_LOCK_DIR"]
    result: dict[str, Any] = {}
    try:
        with sim.Host(device) as host:
            primary = rig.primary()
            sb = handover.Standby(rig.path, rig.key)
            assert sb.node is not None
            page = sb.node.var.mmap(mmap.PROT_READ)
            try:
                base = doorbell(page)
                assert host.send_request(split_read(DEFAULT_BAR_BASE))
                got: list[tlp.Tlp] = []
                wait_doorbell(page, base + PAGE_RECORDS)
                if consumed:
                    got += take_exactly(host, consumed)
                    wait_doorbell(page, base + 2 * PAGE_RECORDS)
            finally:
                page.close()
            primary.kill()

            def successor() -> None:
                # Takes over (recover answers the rest, waiting for the host to consume) and
                # serves until stopped; on its own thread, as this one is the host.
                new: Optional[handover.Primary] = sb.wait(timeout=30)
                result["primary"] = new
                if new is not None:
                    result["served"] = new.server.served
                    result["partial"] = getattr(new.server, "partial", None)
                    new.run(max_seconds=60)

            t = threading.Thread(target=successor, daemon=True)
            t.start()
            got += collect(host, 32 - len(got))
            st = host.stats()
            handover.request(rig.path, rig.key, "stop", timeout=30)
            t.join(60)
            assert not t.is_alive()
            new = result["primary"]
            assert new is not None
            new.close()
            sb.close()
    finally:
        os.environ.pop("MLX5TLP_LOCK_DIR", None)
        rig.close()
    check_sequence(st, got, memory_pattern(DEFAULT_BAR_SIZE), DEFAULT_BAR_BASE)
    assert (result["served"], result["partial"]) == (1, 1), result
