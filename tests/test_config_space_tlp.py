"""Configuration-space rules checked against the native engine through TLPs, as a host sees them.

tests/test_config_space.py checks the compiled model directly; here every access is a CfgRd0 /
CfgWr0 (``sim.Host.config_read/write``) or MRd / MWr / IORd TLP sent by ``sim.Host`` to an
``engine.Device``, and every completion is checked by the host model. Rules: PCIe Base
Specification 6.x (5.0 numbering of chapter 7 is the same) —

* §7.5.1.1.3 Command register, Table 7-4 (RW enables, hardwired bits); Memory/I/O Space
  Enable clear: memory/I/O requests are Unsupported Requests;
* §7.5.1.1.4 Status register, Table 7-5 (Capabilities List RO 1b; error bits RW1C; Signaled
  Target Abort set when the function completes a request as Completer Abort);
* §7.5.3.5 Device Status (Unsupported Request Detected, RW1C, logged regardless of enables);
* §7.5.1.2.1 BAR sizing (all 1s reads back the size mask with the RO type bits; 64-bit pairs),
  §7.5.1.2.4 Expansion ROM BAR;
* §7.5.1.1.11 Capabilities Pointer and the linked list (§7.5.1.1, §7.6.3 extended list at 100h);
* §5.3.1 / §7.5.2.2 power states (memory requests outside D0 are URs; an unsupported state
  written is discarded);
* §7.7.2 MSI-X table and PBA in BAR space (reset: every vector masked; PBA read-only; aligned
  DW/QW accesses), §6.1.4.5 (a masked vector's Pending bit).
"""

from __future__ import annotations

import time
from typing import Any

import pytest

import mlx5tlp
from mlx5tlp import engine, sim, tlp
from mlx5tlp import function as fn
from test_config_space import make_spec as model_spec
from test_engine import Bus


def make_spec() -> fn.FunctionSpec:
    # test_config_space.py's function (both capability lists, every BAR kind, the ROM), with
    # an 8-vector MSI-X table whose PBA is one QWORD.
    return model_spec(msix=fn.Msix(vectors=8, table_bar=2, table_offset=0x0, pba_offset=0x2000))


@pytest.fixture
def host(device: str) -> Any:
    with sim.Host(device) as h:
        yield h


@pytest.fixture
def served(ctx: mlx5tlp.Context, host: sim.Host) -> Any:
    mem = engine.MemoryRegion(0, 0, 0x1000, name="mem")
    mem.write(0, bytes(range(256)) * 16)
    io = engine.MemoryRegion(3, 0, 0x100, name="io")
    io.write(0, b"\x5a" * 0x100)
    with engine.Device(ctx, make_spec(), [mem, io]) as dev:
        yield dev, Bus(host), host  # sim.Host reaches configuration space by CfgRd0/CfgWr0
    assert host.stats()["errors"] == 0, host.stats()["last_error"]


def _request(bus: Bus, t: tlp.Tlp) -> tlp.Tlp:
    bus.send(t)
    (c,) = bus.collect(1)
    assert c.tag == t.tag
    return c


def test_enumeration_over_tlps_finds_the_declaration(served: Any) -> None:
    # The root-complex walk (identity, both capability lists, BAR sizing, assignment,
    # enables) through the engine; nothing non-compliant found.
    _dev, _bus, cfg = served
    e = fn.enumerate_function(cfg)
    assert e.problems == ()
    assert (e.vendor_id, e.device_id, e.revision, e.class_code) == (0x15B3, 0x1234, 7, 0x020000)
    assert (e.subsystem_vendor_id, e.subsystem_id, e.header_type) == (0x15B3, 0x0042, 0)
    assert [(b.index, b.kind, b.size, b.prefetchable) for b in e.bars] == [
        (0, "mem64", 1 << 20, True), (2, "mem32", 16384, False), (3, "io", 256, False)]
    assert e.rom is not None and e.rom.size == 64 << 10
    # §7.5.1.1.11 / §7.6.3: standard capabilities from 34h, extended from 100h, all declared.
    std = [c.id for c in e.capabilities if not c.extended]
    ext = [c.id for c in e.capabilities if c.extended]
    assert sorted(std) == sorted([0x10, 0x01, 0x11, 0x09])
    assert sorted(ext) == [0x0001, 0x0003, 0x000B]
    assert min(c.offset for c in e.capabilities if c.extended) == 0x100
    assert all(c.offset % 4 == 0 for c in e.capabilities)
    assert e.msix is not None and (e.msix.vectors, e.msix.table_bar, e.msix.pba_offset) == (
        8, 2, 0x2000)


def test_command_register_table_7_4_and_space_enables(served: Any) -> None:
    dev, bus, cfg = served
    e = fn.enumerate_function(cfg, bus_master=False)
    bar0 = e.bar(0).address  # type: ignore[union-attr]
    io = e.bar(3).address  # type: ignore[union-attr]
    # Table 7-4: I/O, Memory, Bus Master, Parity Error Response, SERR#, Interrupt Disable RW;
    # Special Cycle, MWI, VGA snoop, IDSEL stepping, Fast B2B hardwired 0; 15:11 RsvdP.
    cfg.config_write(0x04, 0xFFFF, 2)
    assert cfg.config_read(0x04, 2) == 0x0547
    # §7.5.1.1.3: Memory Space Enable clear -> a memory read is an Unsupported Request.
    cfg.config_write(0x04, 0x0001, 2)  # I/O only
    c = _request(bus, tlp.Tlp.mem_read(bar0, 1, tag=bus.next_tag()))
    assert c.status == tlp.Status.UR and not c.data
    c = _request(bus, tlp.Tlp.io_read(io + 4, tag=bus.next_tag()))
    assert c.status == tlp.Status.SC and c.data == b"\x5a" * 4
    # A posted write to the disabled BAR is dropped (no completion) and changes nothing.
    bus.send(tlp.Tlp.mem_write(bar0, b"\xee" * 4))
    cfg.config_write(0x04, 0x0002, 2)  # memory only: now I/O is the UR
    c = _request(bus, tlp.Tlp.io_read(io + 4, tag=bus.next_tag()))
    assert c.status == tlp.Status.UR
    c = _request(bus, tlp.Tlp.mem_read(bar0, 1, tag=bus.next_tag()))
    assert c.status == tlp.Status.SC and c.data == bytes(range(4))
    st = dev.stats()
    assert st["ur"] == 2 and st["unsupported_posted"] == 1


def test_status_register_table_7_5_and_device_status(served: Any) -> None:
    _dev, bus, cfg = served
    pcie = fn.Function(make_spec()).capability_offset("pcie")
    # Capabilities List (bit 4) hardwired 1b; nothing else set at reset.
    assert cfg.config_read(0x06, 2) == 0x0010
    cfg.config_write(0x06, 0xFFFF, 2)
    assert cfg.config_read(0x06, 2) == 0x0010  # RO bit stays, RW1C bits were clear
    assert cfg.config_read(pcie + 0x0A, 2) & 0x000F == 0
    # An Unsupported Request received: Device Status UR Detected (bit 3), logged although
    # UR Reporting Enable (Device Control bit 3) is clear (§7.5.3.5).
    c = _request(bus, tlp.Tlp.mem_read(0x1000, 1, tag=bus.next_tag()))  # nobody's address
    assert c.status == tlp.Status.UR
    assert cfg.config_read(pcie + 0x0A, 2) & 0x0008
    cfg.config_write(pcie + 0x0A, 0x0000, 2)  # RW1C: writing 0 leaves it
    assert cfg.config_read(pcie + 0x0A, 2) & 0x0008
    cfg.config_write(pcie + 0x0A, 0x0008, 2)  # writing 1 clears it
    assert cfg.config_read(pcie + 0x0A, 2) & 0x0008 == 0
    assert cfg.config_read(0x06, 2) & 0x0800 == 0  # a UR is not a Completer Abort


def test_completer_abort_sets_signaled_target_abort(ctx: mlx5tlp.Context, host: sim.Host
                                                    ) -> None:
    # Table 7-5: "Signaled Target Abort - This bit is Set when a Function completes a Posted
    # or Non-Posted Request as a Completer Abort error"; RW1C.
    cb = engine.CallbackRegion(0, 0, 0x1000, lambda reqs: [r.fail("CA") for r in reqs])
    with engine.Device(ctx, make_spec(), [cb]) as dev:
        bus, cfg = Bus(host), host
        e = fn.enumerate_function(cfg)
        bar0 = e.bar(0).address  # type: ignore[union-attr]
        assert cfg.config_read(0x06, 2) & 0x0800 == 0
        c = _request(bus, tlp.Tlp.mem_read(bar0, 1, tag=bus.next_tag()))
        assert c.status == tlp.Status.CA
        assert cfg.config_read(0x06, 2) == 0x0810
        cfg.config_write(0x06, 0x0800, 2)
        assert cfg.config_read(0x06, 2) == 0x0010
        assert dev.stats()["ca"] == 1
    assert host.stats()["errors"] == 0


def test_bar_sizing_and_reassignment_move_the_decode(served: Any) -> None:
    _dev, bus, cfg = served
    # §7.5.1.2.1: all 1s reads back the size mask with the read-only type bits; the 64-bit
    # BAR's upper register is all address; unimplemented BARs read 0.
    for i in range(6):
        cfg.config_write(0x10 + 4 * i, 0xFFFF_FFFF)
    assert [cfg.config_read(0x10 + 4 * i) for i in range(6)] == [
        0xFFF0000C, 0xFFFFFFFF, 0xFFFFC000, 0xFFFFFF01, 0, 0]
    # §7.5.1.2.4: the ROM BAR's address bits down to its size, Enable (bit 0) RW.
    cfg.config_write(0x30, 0xFFFF_FFFF)
    assert cfg.config_read(0x30) == 0xFFFF0001
    cfg.config_write(0x30, 0)
    # Assign BAR 0 at one address, enable, read; move it: the old address is nobody's.
    old, new = 0x40_0000_0000, 0x50_0010_0000
    for base in (old, new):
        cfg.config_write(0x10, base & 0xFFFF_FFFF)
        cfg.config_write(0x14, base >> 32)
        assert cfg.config_read(0x10) == (base & 0xFFFF_FFFF) | 0xC  # type bits read back
        cfg.config_write(0x04, 0x0002, 2)
        c = _request(bus, tlp.Tlp.mem_read(base + 8, 1, tag=bus.next_tag()))
        assert c.status == tlp.Status.SC and c.data == bytes(range(8, 12))
    c = _request(bus, tlp.Tlp.mem_read(old + 8, 1, tag=bus.next_tag()))
    assert c.status == tlp.Status.UR


def test_msix_table_and_pba_through_tlps(served: Any) -> None:
    dev, bus, cfg = served
    e = fn.enumerate_function(cfg)
    assert e.msix is not None
    table = e.bar(2).address  # type: ignore[union-attr]
    pba = table + e.msix.pba_offset
    # §7.7.2.2 Message Control: Table Size is N-1, RO.
    assert (cfg.config_read(e.msix.offset + 2, 2) & 0x7FF) == 7
    # §7.7.2: reset state — every Vector Control Mask Bit set (§7.7.2.8), no Pending bit.
    for k in range(8):
        c = _request(bus, tlp.Tlp.mem_read(table + 16 * k + 12, 1, tag=bus.next_tag()))
        assert c.status == tlp.Status.SC and int.from_bytes(c.data, "little") == 1
    c = _request(bus, tlp.Tlp.mem_read(pba, 2, tag=bus.next_tag()))
    assert c.data == bytes(8)
    # Program entry 2 with one QWORD write (address) and a DW write (data); enable MSI-X.
    bus.send(tlp.Tlp.mem_write(table + 32, (0xFEE0_1000).to_bytes(8, "little")))
    bus.send(tlp.Tlp.mem_write(table + 40, (0xBEEF).to_bytes(4, "little")))
    cfg.config_write(e.msix.offset + 2, 1 << 15, 2)
    # Masked: raising sets the Pending bit (§6.1.4.5), which the host reads in the PBA.
    assert dev.raise_msix(2) == "pending"
    c = _request(bus, tlp.Tlp.mem_read(pba, 2, tag=bus.next_tag()))
    assert int.from_bytes(c.data, "little") == 1 << 2
    # The PBA is read-only: a write leaves the bits.
    bus.send(tlp.Tlp.mem_write(pba, bytes(8)))
    c = _request(bus, tlp.Tlp.mem_read(pba, 2, tag=bus.next_tag()))
    assert int.from_bytes(c.data, "little") == 1 << 2
    # A write that is not an aligned full DW (byte enables 0011b) is ignored (undefined
    # result: this model leaves the entry alone).
    bus.send(tlp.Tlp.mem_write(table + 44, (0).to_bytes(4, "little"), first_be=0x3))
    c = _request(bus, tlp.Tlp.mem_read(table + 44, 1, tag=bus.next_tag()))
    assert int.from_bytes(c.data, "little") == 1
    # Unmask: the message goes out (an MWr of the data to the address) and Pending clears.
    bus.send(tlp.Tlp.mem_write(table + 44, (0).to_bytes(4, "little")))
    deadline = time.monotonic() + 5
    got: list[bytes] = []
    while not got and time.monotonic() < deadline:
        got = [r for r in bus.host.completions(0.05) if r[0] & 0xDF == 0x40]
    (m,) = got
    w = tlp.decode(m)
    assert (w.kind, w.address, w.data) == ("MWr", 0xFEE0_1000, (0xBEEF).to_bytes(4, "little"))
    c = _request(bus, tlp.Tlp.mem_read(pba, 2, tag=bus.next_tag()))
    assert c.data == bytes(8)


def test_power_state_and_absent_functions(served: Any) -> None:
    dev, bus, cfg = served
    e = fn.enumerate_function(cfg)
    bar0 = e.bar(0).address  # type: ignore[union-attr]
    pm = fn.Function(make_spec()).capability_offset("power_management")
    # §5.3.1: in D1/D2/D3hot only Configuration and Message Requests are accepted; memory
    # requests are Unsupported Requests. PMCSR PowerState (§7.5.2.2) is RW.
    cfg.config_write(pm + 4, 0x3, 2)  # D3hot
    assert cfg.config_read(pm + 4, 2) & 0x3 == 0x3
    c = _request(bus, tlp.Tlp.mem_read(bar0, 1, tag=bus.next_tag()))
    assert c.status == tlp.Status.UR
    # D1 is not declared: "the data is discarded and no state change occurs" (§7.5.2.2).
    cfg.config_write(pm + 4, 0x1, 2)
    assert cfg.config_read(pm + 4, 2) & 0x3 == 0x3
    cfg.config_write(pm + 4, 0x0, 2)  # back to D0; No_Soft_Reset set: configuration kept
    assert cfg.config_read(0x04, 2) & 0x2 == 0x2
    c = _request(bus, tlp.Tlp.mem_read(bar0, 1, tag=bus.next_tag()))
    assert c.status == tlp.Status.SC and c.data == bytes(range(4))
    # A single-Function device: a Type 0 request to Function 1..7 is an Unsupported Request.
    for function in (1, 7):
        c = _request(bus, tlp.Tlp.cfg_read(0x0100 | function, 0, tag=bus.next_tag()))
        assert c.status == tlp.Status.UR and not c.data
    assert cfg.config_read(0x00) == 0x1234_15B3  # Function 0 answers
    assert dev.stats()["requests"]["CfgRd0"] >= 3
