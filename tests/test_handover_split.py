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

import mmap
import os
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from handover_rig import REQUESTER, EventProc, collect
from mlx5tlp import engine, handover, sim, tlp
from mlx5tlp.function import Bar, FunctionSpec, Identity

FUNCTION = 0x0100
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


def regions() -> list[engine.Region]:
    return [engine.MemoryRegion(0, 0, 0x1000, name="mem")]


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[str, bytes, dict[str, str]]]:
    d = tmp_path / "ho"
    d.mkdir(mode=0o700)
    locks = d / "locks"
    locks.mkdir(mode=0o700)
    env = dict(os.environ, MLX5TLP_LOCK_DIR=str(locks))
    os.environ["MLX5TLP_LOCK_DIR"] = str(locks)  # the standby in this process too
    yield str(d / "ctl"), os.urandom(32).hex().encode(), env
    os.environ.pop("MLX5TLP_LOCK_DIR", None)


def cfg_write(reg: int, value: int, tag: int) -> bytes:
    return tlp.Tlp.cfg_write(FUNCTION, reg, value.to_bytes(4, "little"), requester_id=REQUESTER,
                             tag=tag).encode()


def doorbell(page: mmap.mmap) -> int:
    return int(struct.unpack_from("<Q", page, 0)[0])  # docs/sim.md: u64 records published


def wait_doorbell(page: mmap.mmap, want: int, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while doorbell(page) < want:
        assert time.monotonic() < end, f"doorbell {doorbell(page)}, waited for {want}"
        time.sleep(0.002)
    time.sleep(0.05)
    assert doorbell(page) == want, "the lane wrote past a full page"


@pytest.mark.parametrize("consumed", [0, PAGE_RECORDS],
                         ids=["after-doorbell-1", "after-doorbell-2"])
def test_split_read_is_answered_exactly_once_across_sigkill(
        setup: tuple[str, bytes, dict[str, str]], device: str, consumed: int) -> None:
    path, key, env = setup
    memory = bytes((i * 7 + 3) & 0xFF for i in range(4096))
    code = PRIMARY.format(tests=str(Path(__file__).parent), device=device, path=path, key=key)
    with sim.Host(device) as host:
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
            try:
                base = doorbell(page)
                # 1023 DWs from byte 4, first byte disabled, last byte too: Byte Count 4090
                # (§2.3.1.1), a first completion with Lower Address 5 and 31 DWs up to the
                # first 128-byte boundary, then 31 of 128 bytes: 32 completions.
                read = tlp.Tlp.mem_read(BAR_BASE + 4, 1023, requester_id=REQUESTER, tag=9,
                                        first_be=0xE, last_be=0x7)
                assert host.send_request(read.encode())
                got = []
                wait_doorbell(page, base + PAGE_RECORDS)  # the page is full: the lane waits
                if consumed:
                    # Exactly the first chunk (no "a little more" as collect() does: the lane
                    # writes the second chunk as soon as the whole page is free again).
                    end = time.monotonic() + 30
                    while len(got) < consumed and time.monotonic() < end:
                        got += [tlp.decode(c) for c in host.completions(timeout=0.2)]
                    assert len(got) == consumed
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
    # The host model's own checks (cpp/sim/host_check.cpp): Byte Count, Lower Address, tag.
    assert (st["errors"], st["unexpected"], st["outstanding"]) == (0, 0, 0), st
    assert len(got) == 32, [(c.byte_count, c.lower_address) for c in got]
    # §2.3.1.1: each Byte Count is what is still to be returned, each Lower Address the low
    # 7 bits of the next byte's address; together they return bytes 5..4094 once, in order.
    data = b""
    next_addr = BAR_BASE + 5
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
    # The successor resolved one redelivered claim, and answered only what the host lacked.
    assert (es["redelivered"], es["partly_published"], es["already_published"]) == (1, 1, 0), es
    assert es["completions"] == 32 - PAGE_RECORDS * (1 + bool(consumed)), es
    ds = sim.device_stats(device)
    assert (ds["requests_claimed"], ds["contexts"], ds["tlp_vars"]) == (0, 0, 0), ds
