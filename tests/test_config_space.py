"""Configuration space through the bindings, against the PCIe Base Specification (6.x numbering).

Each test names the section (and table) whose rule it checks. The host side is
``mlx5tlp.function.enumerate_function``; the C++ suites (tests/cpp/test_config_space.cpp,
test_msix.cpp) check the same model natively and under ASan.
"""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mlx5tlp
from mlx5tlp import function as fn

PCIE, PM, MSIX, VSC = 0x10, 0x01, 0x11, 0x09


def make_spec(**changes: object) -> fn.FunctionSpec:
    base: dict[str, object] = dict(
        identity=fn.Identity(vendor_id=0x15B3, device_id=0x1234, subsystem_vendor_id=0x15B3,
                             subsystem_id=0x0042, revision=7, class_code=0x020000,
                             interrupt_pin=1),
        bars=[fn.Bar(0, "mem64", 1 << 20, prefetchable=True), fn.Bar(2, "mem32", 16384),
              fn.Bar(3, "io", 256)],
        expansion_rom=fn.ExpansionRom(64 << 10),
        pcie=fn.PciExpress(max_payload_supported=512),
        msix=fn.Msix(vectors=64, table_bar=2, pba_offset=0x2000),
        aer=fn.Aer(),
        serial_number=fn.SerialNumber(0x0011223344556677),
        vendor_caps=[fn.VendorCap(bytes(range(1, 10)), writable=[(4, 4)])],
        vendor_ext_caps=[fn.VendorExtCap(0x1234, 2, b"\xaa\xbb\xcc\xdd", writable=[(0, 2)])],
    )
    base.update(changes)
    return fn.FunctionSpec(**base)  # type: ignore[arg-type]


@pytest.fixture
def f() -> fn.Function:
    return fn.Function(make_spec())


def test_identity_and_type0_header(f: fn.Function) -> None:
    # §7.5.1.1.1-6 identity; §7.5.1.1.9 Header Type 0, Multi-Function clear; §7.5.1.2.3 subsystem.
    e = fn.enumerate_function(f)
    assert (e.vendor_id, e.device_id, e.revision, e.class_code) == (0x15B3, 0x1234, 7, 0x020000)
    assert (e.subsystem_vendor_id, e.subsystem_id, e.header_type, e.interrupt_pin) == (
        0x15B3, 0x0042, 0, 1)
    assert e.problems == ()
    f.config_write(0x00, 0xFFFFFFFF)  # identity is read-only
    assert f.config_read(0x00) == 0x123415B3


def test_command_register_writable_bits_table_7_4(f: fn.Function) -> None:
    # §7.5.1.1.3 Table 7-4: I/O, Memory, Bus Master, Parity Error Response, SERR#, Interrupt
    # Disable are RW; Special Cycle, MWI, VGA snoop, IDSEL, Fast B2B hardwired 0; 15:11 RsvdP.
    f.config_write(0x04, 0xFFFF, 2)
    assert f.config_read(0x04, 2) == 0x0547
    no_io = fn.Function(make_spec(bars=[fn.Bar(2, "mem32", 16384)]))
    no_io.config_write(0x04, 0xFFFF, 2)
    assert no_io.config_read(0x04, 2) == 0x0546  # I/O Space Enable hardwired 0 without I/O BARs


def test_status_rw1c_bits_table_7_5(f: fn.Function) -> None:
    # §7.5.1.1.4 Table 7-5: Capabilities List hardwired 1b; error bits RW1C (write 1 clears,
    # write 0 has no effect); the function sets them itself.
    assert f.config_read(0x06, 2) == 0x0010
    f.device_write(0x06, 0x0010 | 0x2000 | 0x0800 | 0x8000, 2)
    f.config_write(0x06, 0x0000, 2)
    assert f.config_read(0x06, 2) == 0xA810
    f.config_write(0x06, 0x2000 | 0x0010, 2)
    assert f.config_read(0x06, 2) == 0x8810
    f.config_write(0x06, 0xFFFF, 2)
    assert f.config_read(0x06, 2) == 0x0010


def test_first_dw_byte_enables_write_only_enabled_bytes(f: fn.Function) -> None:
    # §2.2.7: a configuration write is one DW with First DW BE; disabled bytes are untouched.
    f.device_write(0x06, 0x2010, 2)  # Received Master Abort
    f.config_write_dword(0x04, 0xFFFF0006, 0b0001)  # Command byte 0 only
    assert f.config_read(0x04, 2) == 0x0006 and f.config_read(0x06, 2) == 0x2010
    f.config_write_dword(0x04, 0x20000000, 0b1000)  # Status high byte: clears bit 13
    assert f.config_read(0x04) == 0x00100006


def test_reserved_and_hardwired_registers_read_zero(f: fn.Function) -> None:
    # §7.5.1.1.8 Latency Timer 00h; §7.5.1.1.10 BIST 00h; §7.5.1.2.2 CardBus CIS 0;
    # 35h-3Bh reserved (RsvdP: read 0, writes ignored, §7.4); §7.5.1.1.7 Cache Line Size RW.
    for off in (0x28, 0x38):
        f.config_write(off, 0xFFFFFFFF)
        assert f.config_read(off) == 0
    f.config_write(0x0C, 0xFFFFFFFF)
    assert f.config_read(0x0C) == 0x000000FF
    f.config_write(0x3C, 0xFFFF, 2)
    assert f.config_read(0x3C, 2) == 0x01FF  # Interrupt Line RW, Interrupt Pin RO (INTA)


def test_bar_sizing_reads_back_size_mask_with_type_bits(f: fn.Function) -> None:
    # §7.5.1.2.1: "write a value of all 1's to each BAR register and then read the value back";
    # bits 3:0 (memory) / 1:0 (I/O) read-only; unimplemented BARs hardwired to zero.
    for i in range(6):
        f.config_write(0x10 + 4 * i, 0xFFFFFFFF)
    assert [f.config_read(0x10 + 4 * i) for i in range(6)] == [
        0xFFF0000C, 0xFFFFFFFF, 0xFFFFC000, 0xFFFFFF01, 0, 0]
    e = fn.enumerate_function(f)
    assert [(b.index, b.kind, b.size, b.prefetchable) for b in e.bars] == [
        (0, "mem64", 1 << 20, True), (2, "mem32", 16384, False), (3, "io", 256, False)]
    # Assigned naturally aligned; the 64-bit BAR above 4 GiB uses both registers.
    for b in e.bars:
        assert b.address % b.size == 0 and f.bar_base(b.index) == b.address
    assert e.bar(0) is not None and e.bar(0).address >> 32 != 0  # type: ignore[union-attr]


def test_expansion_rom_sizing_and_enable(f: fn.Function) -> None:
    # §7.5.1.2.4: address bits 31:11 down to the size, Enable bit 0 RW; the ROM decodes only
    # while both Memory Space Enable and Expansion ROM Enable are set.
    f.config_write(0x30, 0xFFFFF800)
    assert f.config_read(0x30) == 0xFFFF0000
    e = fn.enumerate_function(f)
    assert e.rom is not None and e.rom.size == 64 << 10
    assert f.decode_memory(e.rom.address, 4).status == "unclaimed"  # Enable clear
    f.config_write(0x30, e.rom.address | 1)
    assert f.decode_memory(e.rom.address + 0x10, 4) == fn.Decoded("hit", fn.ROM_BAR, 0x10)
    f.config_write(0x04, 0, 2)
    assert f.decode_memory(e.rom.address, 4).status == "disabled"
    no_rom = fn.Function(make_spec(expansion_rom=None))
    no_rom.config_write(0x30, 0xFFFFFFFF)
    assert no_rom.config_read(0x30) == 0


def test_decode_honours_command_enables_and_64bit_pairs(f: fn.Function) -> None:
    # §7.5.1.1.3: Memory / I/O Space Enable clear -> requests are Unsupported Requests.
    e = fn.enumerate_function(f)
    bar0, bar2, bar3 = e.bar(0), e.bar(2), e.bar(3)
    assert bar0 and bar2 and bar3
    assert f.decode_memory(bar0.address + 0x123, 4) == fn.Decoded("hit", 0, 0x123)
    assert f.decode_memory(bar2.address + bar2.size - 4, 8).status == "crosses_end"
    assert f.decode_memory(bar2.address + bar2.size, 4).status == "unclaimed"
    assert f.decode_io(bar3.address + 0xFC, 4) == fn.Decoded("hit", 3, 0xFC)
    f.config_write(0x04, 0x0001, 2)  # I/O only
    assert f.decode_memory(bar0.address, 4).status == "disabled" and not f.memory_enabled
    assert f.decode_io(bar3.address, 1).status == "hit"
    f.config_write(0x04, 0x0002, 2)
    assert f.decode_io(bar3.address, 1).status == "disabled"
    # Only the upper register of the pair changes: the BAR moves.
    f.config_write(0x14, 0x41)
    assert f.decode_memory(bar0.address, 4).status == "unclaimed"
    assert f.decode_memory(0x41 << 32 | (bar0.address & 0xFFFFFFFF), 4).status == "hit"


def test_capability_lists_are_dword_aligned_and_linked(f: fn.Function) -> None:
    # §7.5.1.1.11: pointer non-zero, bottom two bits 00b; §7.6.3: extended list from 100h.
    e = fn.enumerate_function(f)
    std = [(c.id, c.offset) for c in e.capabilities if not c.extended]
    ext = [(c.id, c.version, c.offset) for c in e.capabilities if c.extended]
    assert [i for i, _ in std] == [PCIE, PM, MSIX, VSC]
    assert all(o % 4 == 0 and 0x40 <= o < 0x100 for _, o in std)
    assert [(i, v) for i, v, _ in ext] == [(0x0001, 2), (0x0003, 1), (0x000B, 1)]
    assert ext[0][2] == 0x100 and all(o % 4 == 0 for *_, o in ext)
    assert f.config_read(0x34, 1) == std[0][1]


def test_capability_at_declared_offset_and_overlap_refused() -> None:
    f = fn.Function(make_spec(msix=fn.Msix(vectors=8, table_bar=2, pba_offset=0x1000,
                                           offset=0xC0)))
    assert f.capability_offset("msix") == 0xC0 and f.config_read(0xC0, 1) == MSIX
    with pytest.raises(mlx5tlp.InvalidArgumentError) as ei:
        fn.Function(make_spec(aer=fn.Aer(offset=0x100),
                              serial_number=fn.SerialNumber(1, offset=0x104)))
    assert ei.value.errno == errno.EINVAL and "serial_number.offset" in str(ei.value)


def test_pcie_capability_mps_rcb_and_completion_timeout(f: fn.Function) -> None:
    x = f.capability_offset("pcie")
    assert f.config_read(x + 2, 2) == 0x0002  # §7.5.3.2: version 2, Endpoint
    assert f.config_read(x + 4) & 0x7 == 2  # §7.5.3.3: MPS Supported 512
    assert (f.max_payload_size, f.read_completion_boundary, f.max_read_request_size) == (
        128, 64, 512)
    f.config_write(x + 8, 0x2810 | 2 << 5, 2)  # MPS 512
    assert f.max_payload_size == 512
    # §7.5.3.4: permissible values are those up to MPS Supported; a larger one reads back
    # but the function never exceeds what it supports (§2.2.2).
    f.config_write(x + 8, 0x2810 | 4 << 5, 2)
    assert (f.config_read(x + 8, 2) >> 5) & 7 == 4 and f.max_payload_size == 512
    f.config_write(x + 0x10, 0x0008, 2)  # §7.5.3.7 Link Control RCB
    assert f.read_completion_boundary == 128
    # §7.5.3.16 Table 7-34: Completion Timeout Value / Disable.
    assert f.completion_timeout == fn.CompletionTimeout(False, 50, 50_000)
    f.config_write(x + 0x28, 0x2, 2)
    assert f.completion_timeout == fn.CompletionTimeout(False, 1000, 10_000)
    f.config_write(x + 0x28, 0x10, 2)
    assert f.completion_timeout.disabled
    # §7.5.3.5 Device Status: error bits RW1C.
    f.device_write(x + 0xA, 0xF, 2)
    f.config_write(x + 0xA, 0x5, 2)
    assert f.config_read(x + 0xA, 2) == 0xA


def test_power_management_states() -> None:
    # §7.5.2.2: an unsupported state write is discarded; D1/D2 optional here. §5.3.1: only
    # Configuration and Message Requests in D3hot; No_Soft_Reset clear resets on D3hot -> D0.
    f = fn.Function(make_spec(power_management=fn.PowerManagement(d1=True, no_soft_reset=False)))
    p = f.capability_offset("power_management")
    assert f.config_read(p + 2, 2) & 0x7 == 3 and f.config_read(p + 2, 2) >> 9 & 3 == 0b01
    e = fn.enumerate_function(f)
    f.config_write(p + 4, 2, 2)  # D2: unsupported
    assert f.power_state == 0
    f.config_write(p + 4, 1, 2)
    assert f.power_state == 1 and not f.memory_enabled
    f.config_write(p + 4, 3, 2)
    bar2 = e.bar(2)
    assert bar2 is not None and f.decode_memory(bar2.address, 4).status == "disabled"
    f.config_write(p + 4, 0, 2)
    assert f.power_state == 0 and f.config_read(0x04, 2) == 0 and f.config_read(0x18) == 0


def test_aer_status_rw1c_mask_severity_rw_header_log_ro(f: fn.Function) -> None:
    a = f.capability_offset("aer")
    assert f.config_read(a + 0x0C) == 0x00462010  # §7.8.4.4 default severities
    assert f.config_read(a + 0x14) == 0x00002000  # §7.8.4.6 Advisory Non-Fatal masked
    f.device_write(a + 0x04, 0x00100000 | 0x00004000)  # UR, Completion Timeout
    f.config_write(a + 0x04, 0x00100000)
    assert f.config_read(a + 0x04) == 0x00004000
    f.config_write(a + 0x08, 0xFFFFFFFF)
    assert f.config_read(a + 0x08) == 0x005FF010  # only the implemented errors are RW
    f.device_write(a + 0x1C, 0x40000001)
    f.config_write(a + 0x1C, 0)
    assert f.config_read(a + 0x1C) == 0x40000001  # Header Log RO (§7.8.4.8)


def test_vendor_specific_capabilities_ro_rw_ranges(f: fn.Function) -> None:
    e = fn.enumerate_function(f)
    vsc = e.capability(VSC)
    assert vsc is not None and f.config_read(vsc.offset + 2, 1) == 12  # §7.9.4 length
    f.config_write(vsc.offset + 4, 0xFFFFFFFF)  # bytes 1..4 of data: byte 4 is writable
    assert f.config_read(vsc.offset + 4) == 0xFF040302
    vsec = e.capability(0x000B, extended=True)
    assert vsec is not None and f.config_read(vsec.offset + 4) == 0x00C21234  # §7.9.5.2
    f.config_write(vsec.offset + 8, 0)
    assert f.config_read(vsec.offset + 8) == 0xDDCC0000


def test_template_masks_are_consistent(f: fn.Function) -> None:
    # A bit is RW, RW1C or checked on restore, never two of them.
    t = f.template()
    assert all(w & c == 0 and w & r == 0 and c & r == 0
               for w, c, r in zip(t.wmask, t.w1cmask, t.cmask, strict=True))
    assert f.config_bytes() == t.init


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1023), st.integers(0, 2**32 - 1), st.integers(0, 15)),
                max_size=40))
def test_no_host_write_changes_a_read_only_bit(writes: list[tuple[int, int, int]]) -> None:
    # Whatever the host writes, every bit the masks call read-only / reserved keeps its reset
    # value (the property restore() checks, QEMU's cmask), and every RW1C bit only clears.
    f = fn.Function(make_spec())
    t = f.template()
    for dw, value, be in writes:
        before = f.config_bytes()
        f.config_write_dword(dw * 4, value, be)
        after = f.config_bytes()
        for i in range(dw * 4, dw * 4 + 4):
            assert after[i] & t.cmask[i] == t.init[i] & t.cmask[i]
            assert after[i] & t.w1cmask[i] & ~before[i] == 0
    f.snapshot()  # and the state still restores
    f.restore(f.snapshot())


def test_config_access_errors(f: fn.Function) -> None:
    for call in (lambda: f.config_read(0x1000), lambda: f.config_read(0x3, 2),
                 lambda: f.config_write(0x4, 1, 3), lambda: f.config_write(0x4, 0x1FFFF, 2),
                 lambda: f.config_write_dword(0x6, 0, 0xF),
                 lambda: f.config_write_dword(0x4, 0, 0x10)):
        with pytest.raises(mlx5tlp.InvalidArgumentError) as ei:
            call()
        assert ei.value.errno == errno.EINVAL
