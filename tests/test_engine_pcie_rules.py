"""Request rules of the PCIe Base Specification (6.x numbering) the engine must follow.

§2.7.2.2 (Rules for Use of Data Poisoning): the data of a poisoned (EP) write is not applied —
"A Poisoned Configuration Write Request must be discarded by the Completer, and a Completion
with a Completion Status of UR is returned"; a poisoned Memory Write is posted: discarded,
no completion. §2.2.5 / §2.2.9: a zero-length read (Length 1, First DW BE 0000b) is answered
with one DW and Byte Count 1.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

import mlx5tlp
from mlx5tlp import engine, sim, tlp
from test_engine import BAR0, BAR2, Bus, spec


@pytest.fixture
def host(device: str) -> Iterator[sim.Host]:
    with sim.Host(device) as h:
        yield h


def _collect(host: sim.Host, n: int, timeout: float = 10.0) -> list[tlp.Tlp]:
    out: list[tlp.Tlp] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out += [tlp.decode(r) for r in host.completions(0.05)]
    return out


def _read_dw(bus: Bus, address: int) -> bytes:
    tag = bus.next_tag()
    bus.send(tlp.Tlp.mem_read(address, 1, tag=tag))
    (c,) = bus.collect(1)
    assert c.tag == tag and c.status == tlp.Status.SC
    return bytes(c.data)


def test_poisoned_writes_are_not_applied(ctx: mlx5tlp.Context, host: sim.Host) -> None:
    mem = engine.MemoryRegion(0, 0x1000, 0x1000)
    mem.write(0, b"\x11\x22\x33\x44")
    regs = engine.RegisterRegion(0, 0x3000, [engine.Register("ctl", 0, reset=0x5A5A5A5A)])
    with engine.Device(ctx, spec(), [mem, regs]) as dev:
        bus = Bus(host)
        bus.enumerate()
        for address in (BAR0 + 0x1000, BAR0 + 0x3000, BAR2 + 0x2008):  # memory, register,
            # MSI-X table entry 0 Message Data (all bits writable, §7.7.2)
            before = _read_dw(bus, address)
            bus.send(tlp.Tlp.mem_write(address, b"\xde\xad\xbe\xef", ep=True))
            assert _read_dw(bus, address) == before, hex(address)  # read after write: done
            bus.send(tlp.Tlp.mem_write(address, b"\xde\xad\xbe\xef"))  # the same, not poisoned
            assert _read_dw(bus, address) == b"\xde\xad\xbe\xef", hex(address)
        assert mem.read(0, 4) == b"\xde\xad\xbe\xef"
        # A poisoned CfgWr0: discarded, answered with a Cpl of status UR (no data).
        bar2 = bus.cfg_read(0x18)
        tag = bus.next_tag()
        bus.send(tlp.Tlp.cfg_write(0x0100, 0x18, (0xD000_0000).to_bytes(4, "little"), tag=tag,
                                   ep=True))
        (c,) = bus.collect(1)
        assert (c.kind, c.tag, c.status, len(c.data)) == ("Cpl", tag, tlp.Status.UR, 0)
        assert bus.cfg_read(0x18) == bar2
        st = dev.stats()
        assert st["poisoned"] == 4 and st["unsupported_posted"] == 3
        assert host.stats()["errors"] == 0, host.stats()["last_error"]


def test_a_zero_length_read_gets_one_dw(ctx: mlx5tlp.Context, host: sim.Host) -> None:
    mem = engine.MemoryRegion(0, 0x1000, 0x1000)
    with engine.Device(ctx, spec(), [mem]):
        bus = Bus(host)
        bus.enumerate()
        bus.send(tlp.Tlp.mem_read(BAR0 + 0x1010, 1, first_be=0, tag=9))
        (c,) = _collect(host, 1)
        assert (c.kind, c.status, c.tag, c.length, c.byte_count, c.lower_address) == (
            "CplD", tlp.Status.SC, 9, 1, 1, 0x10)


def _pcie_cap(bus: Bus) -> int:
    at = bus.cfg_read(0x34) & 0xFC  # Capabilities Pointer (§7.5.1.1.11)
    while at:
        header = bus.cfg_read(at)
        if header & 0xFF == 0x10:  # PCI Express Capability ID
            return at
        at = (header >> 8) & 0xFC
    raise AssertionError("no PCI Express Capability")


def test_a_payload_above_max_payload_size_is_malformed(ctx: mlx5tlp.Context,
                                                       host: sim.Host) -> None:
    # §2.2.2: "Receivers must check for violations of this rule": a TLP whose payload
    # exceeds Max_Payload_Size (Device Control bits 7:5, 000b = 128 bytes after reset,
    # §7.5.3.4) is a Malformed TLP: not applied, no completion.
    mem = engine.MemoryRegion(0, 0x1000, 0x1000)
    with engine.Device(ctx, spec(), [mem]) as dev:
        bus = Bus(host)
        bus.enumerate()
        bus.send(tlp.Tlp.mem_write(BAR0 + 0x1000, b"\x77" * 128))  # exactly MPS: applied
        assert _read_dw(bus, BAR0 + 0x1000) == b"\x77" * 4
        bus.send(tlp.Tlp.mem_write(BAR0 + 0x1000, b"\x88" * 256))
        assert _read_dw(bus, BAR0 + 0x1000) == b"\x77" * 4
        assert dev.stats()["malformed"] == 1
        devctl = _pcie_cap(bus) + 8
        bus.cfg_write(devctl, (bus.cfg_read(devctl) & ~0xE0) | 0x20)  # MPS 256 (supported)
        bus.send(tlp.Tlp.mem_write(BAR0 + 0x1000, b"\x88" * 256))
        assert _read_dw(bus, BAR0 + 0x1000) == b"\x88" * 4
        assert mem.read(252, 4) == b"\x88" * 4
        assert dev.stats()["malformed"] == 1
        assert host.stats()["errors"] == 0, host.stats()["last_error"]


def test_the_load_generator_sends_no_write_above_max_payload(host: sim.Host) -> None:
    r = [sim.LoadRange(BAR0, bytes(4096))]
    with pytest.raises(mlx5tlp.Error, match="write op 0 of 512 bytes exceeds max_payload 256"):
        host.load(r, [sim.LoadOp("write", 512)], count=1, max_payload=256)
