"""An error detected once for one request is logged once, also when its claimer dies.

PCIe Base 6.x §6.2.5 (Figure 6-2, "Sequence of Device Error Signaling and Logging
Operations"): a function that detects an error sets its status bits, records the first
unmasked uncorrectable error's header (§6.2.4.2: First Error Pointer + Header Log) and sends
the one error Message the enables call for. A redelivered request (its claimer died after
serving it and before retiring it, docs/handover.md "Crash takeover") is not a new detection:
a successor that answers it again must not log it again — in particular not count (send)
another ERR_COR / ERR_NONFATAL for it.

The serving process is SIGKILLed at that point deterministically, without timing: the gateway
page is full (the host stops consuming), so the lane has served — and logged the errors of —
a posted write to nothing (an Unsupported Request, §2.3.1: no completion; SERR# Enable alone
calls for ERR_NONFATAL, §6.2.7 Implementation Note "Device UR Reporting Compatibility") and a
read of nothing (a UR Completion: an Advisory Non-Fatal Error, §6.2.3.2.4.1, ERR_COR with the
Advisory mask clear and Correctable + UR Reporting Enable set, §6.2.4.3) and waits for room in
the page to publish the read's completion. Neither request is retired; both are redelivered
to a standby of this process, which takes over.
"""

from __future__ import annotations

import contextlib
import mmap
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from handover_rig import REQUESTER, EventProc, collect, private_control
from mlx5tlp import engine, handover, sim, tlp
from mlx5tlp import function as fn
from test_handover_split import PAGE_RECORDS, doorbell, take_exactly, wait_doorbell

BAR_BASE = 0xE000_0000
NOTHING = BAR_BASE + 0x8000  # inside BAR 0, no region: Unsupported Request (§2.3.1)
# pci_regs.h: PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_SERR; PCI_EXP_DEVCTL_CERE,
# _URRE; PCI_EXP_DEVSTA_CED, _NFED, _URD; PCI_ERR_UNC_UNSUP, PCI_ERR_COR_ADV_NFAT; the AER
# register offsets PCI_ERR_UNCOR_STATUS, _COR_STATUS, _COR_MASK, _CAP, _HEADER_LOG.
COMMAND = 0x0106
CERE, URRE = 0x1, 0x8
CED, NFED, URD = 0x1, 0x2, 0x8
UNSUP, ADV_NFAT = 1 << 20, 1 << 13
UNC_STATUS, COR_STATUS, COR_MASK, CAP, HEADER_LOG = 0x04, 0x10, 0x14, 0x18, 0x1C

PRIMARY = r"""
import json, sys, threading, time
from mlx5tlp import engine, open_device
sys.path[:0] = [{tests!r}]
from test_handover_error_once import regions, spec

lock = threading.Lock()
def emit(ev):
    with lock:
        sys.stdout.write(json.dumps(ev) + "\n")
        sys.stdout.flush()

ctx = open_device({device!r}, backend="sim")
dev = engine.Device(ctx, spec(), regions(), handover=True)

def report():  # what this process logged and counted, for the test to see before the kill
    while True:
        st = dev.stats()
        emit({{"event": "stats", "mrd": st["requests"]["MRd"], **{{k: st[k] for k in {keys!r}}}}})
        time.sleep(0.02)

threading.Thread(target=report, daemon=True).start()
p = dev.serve({path!r}, {key!r}, events=emit)
p.run(max_seconds=120)
"""

KEYS = ["ur", "unsupported_posted", "err_cor_unsent", "err_nonfatal_unsent",
        "err_fatal_unsent", "errors_logged_before", "redelivered"]


def spec() -> fn.FunctionSpec:
    return fn.FunctionSpec(
        identity=fn.Identity(vendor_id=0x15B3, device_id=0x7F21, class_code=0x028000),
        bars=[fn.Bar(0, "mem32", 1 << 16)], aer=fn.Aer())


def regions() -> list[engine.Region]:
    return [engine.MemoryRegion(0, 0, 0x1000, name="mem")]


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[str, bytes, dict[str, str]]]:
    with private_control(tmp_path) as ctl:
        yield ctl


def wait_stats(p: EventProc, want: dict[str, int], timeout: float = 30.0) -> dict[str, Any]:
    """The first `stats` event of `p` whose counters include `want`."""
    end = time.monotonic() + timeout
    with p.cond:
        while True:
            for e in p.events:
                if e["event"] == "stats" and all(e[k] == v for k, v in want.items()):
                    return e
            left = end - time.monotonic()
            assert left > 0, f"{p.name}: no stats with {want}: {p.events[-1:]}"
            p.cond.wait(left)


def mem_read(address: int, dws: int, tag: int) -> bytes:
    return tlp.Tlp.mem_read(address, dws, requester_id=REQUESTER, tag=tag).encode()


def test_error_of_a_redelivered_request_is_logged_once(
        setup: tuple[str, bytes, dict[str, str]], device: str) -> None:
    path, key, env = setup
    model = fn.Function(spec())
    pcie, aer = model.capability_offset("pcie"), model.capability_offset("aer")
    code = PRIMARY.format(tests=str(Path(__file__).parent), device=device, path=path, key=key,
                          keys=KEYS)
    posted_ur = tlp.Tlp.mem_write(NOTHING, b"\x5a" * 4, requester_id=REQUESTER).encode()
    read_ur = mem_read(NOTHING, 1, 40)
    with sim.Host(device) as host, contextlib.ExitStack() as stack:
        primary = EventProc("primary", [sys.executable, "-c", code], env)
        stack.callback(primary.close)
        primary.wait_event("serving")
        host.config_write(0x10, BAR_BASE)
        host.config_write(0x04, COMMAND, 2)
        # ERR_COR for a UR answered with a UR Completion: Correctable and UR Reporting Enable
        # (§7.5.3.4), the Advisory Non-Fatal Error unmasked (its reset value masks it, §7.8.4.6).
        host.config_write(pcie + 0x08, (host.config_read(pcie + 0x08, 2) & ~0xF) | CERE | URRE, 2)
        host.config_write(aer + COR_MASK, host.config_read(aer + COR_MASK) & ~ADV_NFAT)
        sb = handover.Standby(path, key, spec=spec(), regions=regions())
        stack.callback(sb.close)
        assert sb.node is not None
        page = sb.node.vars[0].mmap(mmap.PROT_READ)
        stack.callback(page.close)
        base = doorbell(page)
        # Fill the page (15 one-completion reads), then a read of 15 completions (480 DWs from
        # a 128-byte boundary at Max_Payload_Size 128, §2.3.1.1) waits for the whole page.
        for k in range(PAGE_RECORDS):
            assert host.send_request(mem_read(BAR_BASE + 4 * k, 1, k))
        wait_doorbell(page, base + PAGE_RECORDS)
        assert host.send_request(mem_read(BAR_BASE, 480, 30))
        wait_stats(primary, {"mrd": PAGE_RECORDS + 1})  # taken: the lane waits for room with it
        # Queued behind it, taken together once the host frees the page for the long read:
        # then the page is full again and the UR read's completion waits, logged, unretired.
        assert host.send_request(posted_ur)
        assert host.send_request(read_ur)
        got = take_exactly(host, PAGE_RECORDS)
        wait_doorbell(page, base + 2 * PAGE_RECORDS)
        before = wait_stats(primary, {"ur": 1, "unsupported_posted": 1})
        assert (before["err_cor_unsent"], before["err_nonfatal_unsent"]) == (1, 1), before
        primary.p.kill()
        assert primary.p.wait(30) == -9
        new = sb.wait(timeout=30)
        assert new is not None
        try:
            got += collect(host, PAGE_RECORDS + 1)
            dev = new.server.device
            assert dev is not None
            es = dev.stats()
            cfg = {name: dev.config_read(off, size) for name, off, size in [
                ("devsta", pcie + 0x0A, 2), ("unc", aer + UNC_STATUS, 4),
                ("cor", aer + COR_STATUS, 4), ("cap", aer + CAP, 4)]}
            header = [dev.config_read(aer + HEADER_LOG + 4 * i) for i in range(4)]
        finally:
            new.stop()
            new.close()
        st = host.stats()
    # The host saw every completion once: 15 + 15 + the UR read's (its first answer never
    # reached the page), and nothing it did not expect.
    assert (st["errors"], st["unexpected"], st["outstanding"]) == (0, 0, 0), st
    assert len(got) == 2 * PAGE_RECORDS + 1, got
    ur = [c for c in got if c.tag == 40]
    assert [(c.kind, c.status) for c in ur] == [("Cpl", tlp.Status.UR)]
    # The successor answered both redelivered requests but logged neither again: no second
    # ERR_COR / ERR_NONFATAL for errors the dead primary detected and logged.
    assert es["redelivered"] == 2, es
    unsent = (es["err_cor_unsent"], es["err_nonfatal_unsent"], es["err_fatal_unsent"])
    assert unsent == (0, 0, 0), es
    assert es["errors_logged_before"] == 2, es
    # Logged once, as the primary left it (configuration space is shared state): Device Status
    # Correctable + Non-Fatal Error Detected and UR Detected; the UR status bit with the First
    # Error Pointer at it (bit 20) and the Header Log holding the first error's header (the
    # posted write's, §7.8.4.8 byte 0 in bits 31:24); Advisory Non-Fatal Error Status.
    assert cfg["devsta"] & 0xF == CED | NFED | URD, cfg
    assert cfg["unc"] == UNSUP and cfg["cor"] == ADV_NFAT, cfg
    assert cfg["cap"] & 0x1F == 20, cfg
    raw = posted_ur[:12] + bytes(4)
    assert header == [int.from_bytes(raw[4 * i:4 * i + 4], "big") for i in range(4)]
    ds = sim.device_stats(device)
    assert (ds["requests_claimed"], ds["contexts"]) == (0, 0), ds

