"""A host enumerates the README's device, served by the native engine, through TLPs only.

``sim.Host`` plays the root complex: every access below is a CfgRd0/CfgWr0 or a memory
request TLP on the software device's request channels, answered by ``mlx5tlp.engine.Device``
in C++ and checked by the host model. pciutils' ``lspci -F <dump> -vvv`` (Debian ``pciutils``;
CI installs it) decodes the dump the host read, so the decoder is one nobody here wrote.

Rules cited (PCIe Base Specification 6.x numbering):
* 7.5.1.2.1 Base Address Register: writing all ones reads back the size mask with the
  read-only type bits (Memory Space Indicator 0, Type 00b 32-bit / 10b 64-bit, Prefetchable).
* 7.5.1.1.3 Command register: Memory Space Enable; 7.5.1.1.4 Status: Capabilities List.
* 7.5.3 PCI Express Capability, 7.5.2 Power Management, 7.8.4 AER, 7.9.3 Device Serial Number.
* 7.7.2 MSI-X: Message Control (Enable bit 15, Function Mask bit 14, Table Size), Table Offset/
  BIR, PBA Offset/BIR; table entries (address, upper address, data, Vector Control bit 0 Mask).
* 6.1.4.5 (MSI-X per-vector masking and function masking): a masked vector's message sets its
  Pending bit instead of being sent; when unmasked with its Pending bit set, the function sends
  the message and clears the bit.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import mlx5tlp
from mlx5tlp import engine, sim, tlp
from mlx5tlp import function as fn
from test_config_space_lspci import _lspci as lspci_exe
from test_config_space_lspci import section

# The README's device ("A device in 30 lines, served natively").
README_SPEC = fn.FunctionSpec(
    identity=fn.Identity(vendor_id=0x15B3, device_id=0x1234, class_code=0x020000),
    bars=[fn.Bar(0, "mem32", 1 << 16), fn.Bar(2, "mem32", 1 << 14)],
    msix=fn.Msix(vectors=4, table_bar=2, pba_offset=0x1000))

# Every capability the model declares, with non-default parameters, and a 64-bit BAR.
FULL_SPEC = fn.FunctionSpec(
    identity=fn.Identity(vendor_id=0x15B3, device_id=0x1235, subsystem_vendor_id=0x15B3,
                         subsystem_id=0x0042, revision=3, class_code=0x010802, interrupt_pin=1),
    bars=[fn.Bar(0, "mem64", 1 << 20, prefetchable=True), fn.Bar(2, "mem32", 1 << 14)],
    pcie=fn.PciExpress(max_payload_supported=512, max_link_speed=4, max_link_width=16),
    power_management=fn.PowerManagement(d1=True, pme_support=0b01001),
    msix=fn.Msix(vectors=32, table_bar=2, pba_offset=0x2000),
    aer=fn.Aer(ecrc_generation=True),
    serial_number=fn.SerialNumber(0x0011223344556677),
    vendor_caps=[fn.VendorCap(bytes(range(1, 10)))],
)


def readme_regions() -> list[engine.MemoryRegion | engine.RegisterRegion | engine.CallbackRegion]:
    mem = engine.MemoryRegion(0, 0, 0x1000)
    mem.write(0, b"hello, host!")
    regs = engine.RegisterRegion(0, 0x1000, [
        engine.Register("id", 0x0, reset=0xC0DE, access="ro"),
        engine.Register("irq", 0x4, access="rw1c"),
        engine.Register("clock", 0x8, on_read=lambda name: 12345)])
    echo = engine.CallbackRegion(0, 0x2000, 0x1000,
                                 lambda reqs: [r.offset.to_bytes(4, "little") * (r.length // 4)
                                               for r in reqs])
    return [mem, regs, echo]


@pytest.fixture
def host(device: str) -> Iterator[sim.Host]:
    with sim.Host(device) as h:
        h.config_timeout = 10.0  # a loaded 2-CPU machine: generous, and never reached when served
        yield h


def lspci(host: sim.Host, tmp_path: Path) -> str:
    dump = tmp_path / "dump.txt"
    dump.write_text(host.lspci())
    out = subprocess.run([lspci_exe(), "-F", str(dump), "-vvv", "-nn"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def mem_read(host: sim.Host, address: int, nbytes: int, tag: int) -> bytes:
    """One memory read through the host model; the payload bytes in address order."""
    assert host.send_request(tlp.Tlp.mem_read(address, nbytes // 4, tag=tag).encode())
    data = b""
    deadline = time.monotonic() + 10
    while len(data) < nbytes:
        assert time.monotonic() < deadline, f"read of {nbytes} at {address:#x} unanswered"
        for rec in host.completion_records(0.05):
            c = tlp.decode(rec.tlp)
            if c.kind == "MWr":
                continue
            assert c.tag == tag and c.status == tlp.Status.SC, c
            data += c.data
    return data


def mem_write(host: sim.Host, address: int, value: int) -> None:
    assert host.send_request(tlp.Tlp.mem_write(address, value.to_bytes(4, "little")).encode())


def test_bar_sizing_reads_back_the_size_mask_with_the_type_bits(
        ctx: mlx5tlp.Context, host: sim.Host) -> None:
    with engine.Device(ctx, FULL_SPEC, []):
        host.config_write(0x04, 0, 2)  # decoding off while sizing (7.5.1.2.1)
        expect = {
            0x10: ~((1 << 20) - 1) & 0xFFFF_FFF0 | 0b1100,  # 64-bit (10b), prefetchable
            0x14: 0xFFFF_FFFF,                              # upper half: all writable
            0x18: ~((1 << 14) - 1) & 0xFFFF_FFF0,           # 32-bit, non-prefetchable
            0x1C: 0, 0x20: 0, 0x24: 0,                      # unimplemented: hardwired 0
        }
        for reg, want in expect.items():
            host.config_write(reg, 0xFFFF_FFFF)
            assert host.config_read(reg) == want, hex(reg)
            host.config_write(reg, 0)


def test_enumerate_through_tlps_finds_what_was_declared(
        ctx: mlx5tlp.Context, host: sim.Host) -> None:
    with engine.Device(ctx, README_SPEC, readme_regions()) as dev:
        e = host.enumerate()
        assert e.problems == ()
        assert (e.vendor_id, e.device_id, e.class_code, e.header_type) == (0x15B3, 0x1234,
                                                                            0x020000, 0)
        assert [(b.index, b.kind, b.size) for b in e.bars] == [(0, "mem32", 1 << 16),
                                                                (2, "mem32", 1 << 14)]
        # Power Management and PCI Express are always present; MSI-X as declared.
        assert [c.id for c in e.capabilities if not c.extended] == [0x10, 0x01, 0x11]
        assert e.msix is not None
        assert (e.msix.vectors, e.msix.table_bar, e.msix.table_offset) == (4, 2, 0)
        assert (e.msix.pba_bar, e.msix.pba_offset) == (2, 0x1000)
        # The host enabled decoding: the engine now serves the assigned addresses.
        assert dev.config_read(0x04, 2) & 0x6 == 0x6
        bar0 = e.bar(0)
        assert bar0 is not None
        assert mem_read(host, bar0.address, 12, tag=1) == b"hello, host!"
        assert mem_read(host, bar0.address + 0x1000, 4, tag=2) == (0xC0DE).to_bytes(4, "little")
        assert mem_read(host, bar0.address + 0x1008, 4, tag=3) == (12345).to_bytes(4, "little")
        assert mem_read(host, bar0.address + 0x2010, 8, tag=4) == (0x10).to_bytes(4, "little") * 2
        # What the host read through 1024 CfgRd0 TLPs is the engine's configuration space.
        assert host.config_dump() == dev.config_bytes()
        st = host.stats()
        assert st["errors"] == 0 and st["outstanding"] == 0, st["last_error"]


def test_lspci_decodes_the_readme_device_read_through_tlps(
        ctx: mlx5tlp.Context, host: sim.Host, tmp_path: Path) -> None:
    with engine.Device(ctx, README_SPEC, readme_regions()):
        e = host.enumerate()
        text = lspci(host, tmp_path)
    first = text.splitlines()[0]
    assert first.startswith("01:00.0 ") and "[0200]" in first and "[15b3:1234]" in first
    assert "Control: I/O- Mem+ BusMaster+" in text and "Status: Cap+" in text
    regions = dict(re.findall(r"Region (\d): (.*)", text))
    for b in e.bars:
        assert regions[str(b.index)] == f"Memory at {b.address:08x} (32-bit, non-prefetchable)"
    assert set(regions) == {"0", "2"}
    caps = re.findall(r"Capabilities: \[([0-9a-f]+)\] (.*)", text)
    assert [int(off, 16) for off, _ in caps] == [c.offset for c in e.capabilities]
    msix = section(text, "MSI-X")
    assert "MSI-X: Enable- Count=4 Masked-" in msix
    assert "Vector table: BAR=2 offset=00000000" in msix
    assert "PBA: BAR=2 offset=00001000" in msix
    assert "Power Management version 3" in text
    assert "Express (v2) Endpoint" in text


def test_lspci_decodes_every_capability_as_declared(
        ctx: mlx5tlp.Context, host: sim.Host, tmp_path: Path) -> None:
    with engine.Device(ctx, FULL_SPEC, []):
        e = host.enumerate()
        text = lspci(host, tmp_path)
    assert e.problems == ()
    first = text.splitlines()[0]
    assert "[0108]" in first and "[15b3:1235]" in first and "(rev 03)" in first
    assert re.search(r"Subsystem: .*\[15b3:0042\]", text)
    assert "Interrupt: pin A" in text
    regions = dict(re.findall(r"Region (\d): (.*)", text))
    bar0, bar2 = e.bar(0), e.bar(2)
    assert bar0 is not None and bar2 is not None and bar0.address >= 1 << 32
    assert regions["0"] == f"Memory at {bar0.address:x} (64-bit, prefetchable)"
    assert regions["2"] == f"Memory at {bar2.address:08x} (32-bit, non-prefetchable)"
    pm = section(text, "Power Management version 3")
    assert "D1+ D2-" in pm and "PME(D0+,D1-,D2-,D3hot+,D3cold-)" in pm
    exp = section(text, "Express (v2) Endpoint")
    assert "MaxPayload 512 bytes" in exp  # Device Capabilities: supported
    assert "MaxPayload 128 bytes" in exp  # Device Control: 128 at reset
    assert "Speed 16GT/s" in exp and "Width x16" in exp  # Link Capabilities
    msix = section(text, "MSI-X")
    assert "Count=32" in msix and "Vector table: BAR=2 offset=00000000" in msix
    assert "PBA: BAR=2 offset=00002000" in msix
    assert "Vendor Specific Information: Len=0c" in text
    aer = section(text, "Advanced Error Reporting")
    assert "ECRCGenCap+" in aer
    assert "Device Serial Number 00-11-22-33-44-55-66-77" in text


def test_msix_masking_through_the_host(ctx: mlx5tlp.Context, host: sim.Host) -> None:
    with engine.Device(ctx, README_SPEC, readme_regions()) as dev:
        e = host.enumerate()
        bar2 = e.bar(2)
        assert e.msix is not None and bar2 is not None
        table, pba = bar2.address + e.msix.table_offset, bar2.address + e.msix.pba_offset
        control = e.msix.offset + 2
        # Reset: MSI-X disabled, every vector masked (7.7.2.2, 7.7.2.5), nothing pending.
        assert dev.raise_msix(1) == "disabled"
        host.config_write(control, 1 << 15, 2)  # MSI-X Enable
        assert mem_read(host, table + 16 + 12, 4, tag=10) == (1).to_bytes(4, "little")
        for off, value in ((0, 0xFEE0_1000), (4, 0), (8, 0x41)):  # vector 1's message
            mem_write(host, table + 16 + off, value)
        assert dev.raise_msix(1) == "pending"  # masked: the Pending bit instead (6.1.4.5)
        assert mem_read(host, pba, 8, tag=11) == (1 << 1).to_bytes(8, "little")
        assert host.stats()["interrupts"] == 0
        mem_write(host, table + 16 + 12, 0)  # unmask: the pending message goes out
        msgs = wait_interrupts(host, 1)
        assert msgs == [(0xFEE0_1000, 0x41)]
        assert mem_read(host, pba, 8, tag=12) == bytes(8)
        # Function Mask (Message Control bit 14) masks every vector whatever its own mask.
        host.config_write(control, 3 << 14, 2)
        assert dev.raise_msix(1) == "pending"
        assert mem_read(host, pba, 8, tag=13) == (1 << 1).to_bytes(8, "little")
        host.config_write(control, 1 << 15, 2)  # Function Mask cleared: delivered
        assert wait_interrupts(host, 1) == [(0xFEE0_1000, 0x41)]
        assert mem_read(host, pba, 8, tag=14) == bytes(8)
        assert dev.raise_msix(1) == "sent"
        assert wait_interrupts(host, 1) == [(0xFEE0_1000, 0x41)]
        assert dev.raise_msix(4) == "bad_vector"
        st = host.stats()
        assert st["errors"] == 0 and st["interrupts"] == 3, st["last_error"]


def wait_interrupts(host: sim.Host, n: int) -> list[tuple[int, int]]:
    """The next `n` MSI-X messages (MWr records) the host receives: (address, data)."""
    out: list[tuple[int, int]] = []
    deadline = time.monotonic() + 10
    while len(out) < n:
        assert time.monotonic() < deadline, f"{len(out)} of {n} interrupts arrived"
        for rec in host.completion_records(0.05):
            m = tlp.decode(rec.tlp)
            assert m.kind == "MWr", m
            out.append((m.address, int.from_bytes(m.data, "little")))
    time.sleep(0.02)
    assert host.completion_records(0.0) == []  # exactly n: nothing more was sent
    return out


def test_load_generator_checks_the_engine_memory_region(
        ctx: mlx5tlp.Context, host: sim.Host) -> None:
    # The native host against the native function: every completion checked in C++, with
    # writes in the mix (read-after-write order on one channel per page, 2.4.1).
    regions = readme_regions()
    mem = regions[0]
    assert isinstance(mem, engine.MemoryRegion)
    mem.write(0, bytes((i * 13 + 5) & 0xFF for i in range(0x1000)))
    # spin_us=0: the lane blocks in mlx5tlp_sim_function_wait whenever it finds nothing, so
    # every request depends on the generator's wake-up (a lost one costs the 50 ms wait cap).
    with engine.Device(ctx, README_SPEC, regions, spin_us=0) as dev:
        e = host.enumerate()
        bar0 = e.bar(0)
        assert bar0 is not None
        mps = dev.config_read(e.capability(0x10).offset + 8, 2) >> 5 & 7  # type: ignore[union-attr]
        ops = (sim.LoadOp("read", 4), sim.LoadOp("read", 64), sim.LoadOp("read", 256),
               sim.LoadOp("read", 7, align=1), sim.LoadOp("write", 64), sim.LoadOp("read", 4096))
        res = host.load([sim.LoadRange(bar0.address, mem.read(0, 0x1000))], ops, count=2000,
                        window=16, completer_id=dev.completer_id, max_payload=128 << mps,
                        timeout=10.0)
        assert res.ok, (res.errors_by_kind, res.first_errors)
        # The mix is honoured: 1 op in 6 is a write (writes that meet an outstanding read
        # wait for it instead of being replaced).
        assert res.sent == 2000 and 250 <= res.writes <= 420 and res.completions > res.reads
        # Window 1 against a lane that blocks at once: 300 reads, each woken by its push. Lost
        # wake-ups would take 300 x 50 ms = 15 s; woken, it takes milliseconds. 5 s is far from
        # both, so the bound holds on a loaded machine yet fails without wake-ups.
        res1 = host.load([sim.LoadRange(bar0.address, mem.read(0, 0x1000))], count=300,
                         window=1, completer_id=dev.completer_id, max_payload=128 << mps)
        assert res1.ok and res1.elapsed_s < 5.0, res1
        # The engine saw exactly what the generator sent.
        st = dev.stats()
        assert st["requests"]["MRd"] == res.reads + res.flush_reads + res1.reads
        assert st["requests"]["MWr"] == res.writes
