"""MSI-X as a host drives it: table and PBA in BAR space, masking and pending semantics.

Rules from the PCIe Base Specification 6.x: §7.7.2 (structures, access rules: "aligned full
DWORD or aligned full QWORD transactions; otherwise, the result is undefined"), §7.7.2.2
(MSI-X Enable, Function Mask), §7.7.2.8 (Mask Bit, default 1b), §7.7.2.9 (Pending Bits) and
§6.1.4.5 (masked -> Pending bit; unmask -> send and clear). The host reaches the table
through the BAR addresses ``enumerate_function`` assigned, as a driver would.
"""

from __future__ import annotations

import struct

import pytest

from mlx5tlp import function as fn

VECTORS = 40
SPEC = fn.FunctionSpec(
    identity=fn.Identity(vendor_id=0x15B3, device_id=0x1234, class_code=0x020000),
    bars=[fn.Bar(0, "mem64", 1 << 20, prefetchable=True), fn.Bar(2, "mem64", 16384)],
    msix=fn.Msix(vectors=VECTORS, table_bar=2, table_offset=0x0, pba_bar=2, pba_offset=0x2000),
)


class Host:
    """A driver's view: the function enumerated, MSI-X entries programmed through BAR2."""

    def __init__(self) -> None:
        self.f = fn.Function(SPEC)
        self.e = fn.enumerate_function(self.f)
        assert self.e.problems == () and self.e.msix is not None
        bar = self.e.bar(self.e.msix.table_bar)
        assert bar is not None
        self.table = bar.address + self.e.msix.table_offset
        self.pba = bar.address + self.e.msix.pba_offset
        self.cap = self.e.msix.offset

    def entry(self, k: int, address: int, data: int) -> None:
        assert self.f.memory_write(self.table + 16 * k, struct.pack("<Q", address)) == "ok"
        assert self.f.memory_write(self.table + 16 * k + 8, struct.pack("<I", data)) == "ok"

    def mask(self, k: int, masked: bool) -> None:
        assert self.f.memory_write(self.table + 16 * k + 12, struct.pack("<I", int(masked))) == "ok"

    def control(self, *, enable: bool, function_mask: bool = False) -> None:
        self.f.config_write(self.cap + 2, (enable << 15) | (function_mask << 14), 2)

    def pending_bits(self) -> int:
        status, data = self.f.memory_read(self.pba, 8)
        assert status == "ok"
        return int.from_bytes(data, "little")


@pytest.fixture
def host() -> Host:
    h = Host()
    for k in range(VECTORS):
        h.entry(k, 0xFEE0_0000 + 4 * k, 0x4000 + k)
    return h


def test_capability_and_reset_state(host: Host) -> None:
    # §7.7.2.2 Table Size N-1 (RO), §7.7.2.3/4 BIR + QWORD offset, §7.7.2.8 masked by default.
    assert host.f.config_read(host.cap + 2, 2) == VECTORS - 1
    host.f.config_write(host.cap + 2, 0x07FF, 2)
    assert host.f.config_read(host.cap + 2, 2) == VECTORS - 1  # Table Size is RO
    assert host.f.config_read(host.cap + 4) == 0x0000_0002
    assert host.f.config_read(host.cap + 8) == 0x0000_2002
    fresh = fn.Function(SPEC)
    fn.enumerate_function(fresh)
    (s0, lo), (s1, hi) = fresh.msix_read(2, 16 * 5, 8), fresh.msix_read(2, 16 * 5 + 8, 8)
    assert (s0, s1) == ("ok", "ok") and struct.unpack("<4I", lo + hi) == (0, 0, 0, 1)
    assert fresh.msix_read(2, 16 * 5, 16)[0] == "undefined_size"  # 4 DWs: not DW or QW
    assert host.pending_bits() == 0


def test_masked_vector_sets_pending_and_unmask_sends_once(host: Host) -> None:
    host.control(enable=True)
    assert host.f.raise_msix(3) == "pending"  # §6.1.4.5: masked -> Pending bit, no message
    assert host.f.raise_msix(3) == "pending"  # still one pending message
    assert host.pending_bits() == 1 << 3 and host.f.take_interrupts() == []
    host.mask(3, False)
    assert host.f.take_interrupts() == [(0xFEE0_000C, 0x4003)]
    assert host.pending_bits() == 0 and not host.f.msix_pending(3)
    assert host.f.raise_msix(3) == "sent"
    assert host.f.take_interrupts() == [(0xFEE0_000C, 0x4003)]
    host.mask(3, True)
    host.mask(3, False)
    assert host.f.take_interrupts() == []  # nothing was pending: no spurious message


def test_function_mask_overrides_vector_masks(host: Host) -> None:
    # §7.7.2.2: Function Mask set -> all vectors masked regardless of their Mask bits; clearing
    # it "may result in many messages needing to be sent".
    for k in range(VECTORS):
        host.mask(k, False)
    host.control(enable=True, function_mask=True)
    for k in (1, 33, 39):
        assert host.f.raise_msix(k) == "pending"
    assert host.pending_bits() == (1 << 1) | (1 << 33) | (1 << 39)
    status, high = host.f.memory_read(host.pba + 4, 4)  # DW access to the PBA (Equation 7-3)
    assert status == "ok" and int.from_bytes(high, "little") == (1 << 1) | (1 << 7)
    host.control(enable=True, function_mask=False)
    assert sorted(host.f.take_interrupts()) == [
        (0xFEE0_0004, 0x4001), (0xFEE0_0084, 0x4021), (0xFEE0_009C, 0x4027)]
    assert host.pending_bits() == 0
    # Setting or clearing the Function Mask leaves the per-vector Mask bits alone.
    status, data = host.f.msix_read(2, 16 * 1 + 12, 4)
    assert data == b"\x00\x00\x00\x00"


def test_msix_disabled_sends_and_records_nothing(host: Host) -> None:
    # §7.7.2.2: with MSI-X Enable clear the function is prohibited from using MSI-X.
    host.mask(5, False)
    assert host.f.raise_msix(5) == "disabled"
    assert host.pending_bits() == 0 and host.f.take_interrupts() == []
    host.control(enable=True)
    assert host.f.raise_msix(5) == "sent" and host.f.messages_sent == 1


def test_bus_master_clear_holds_messages_pending(host: Host) -> None:
    # §7.5.1.1.3: "setting the Bus Master Enable bit to 0b disables MSI/MSI-X interrupt
    # Messages as well": held pending here, sent once Bus Master Enable is set again.
    host.mask(2, False)
    host.control(enable=True)
    command = host.f.config_read(0x04, 2)
    host.f.config_write(0x04, command & ~0x4, 2)
    assert not host.f.bus_master and host.f.raise_msix(2) == "pending"
    host.f.config_write(0x04, command, 2)
    assert host.f.take_interrupts() == [(0xFEE0_0008, 0x4002)]


def test_function_clears_pending_when_condition_goes_away(host: Host) -> None:
    # §6.1.4.5: "the Function must Clear the Pending bit, to avoid sending a spurious interrupt
    # message later when software unmasks the vector".
    host.control(enable=True)
    assert host.f.raise_msix(9) == "pending"
    host.f.clear_msix_pending(9)
    host.mask(9, False)
    assert host.f.take_interrupts() == [] and host.pending_bits() == 0


def test_64bit_message_address(host: Host) -> None:
    # §7.7.2.6: a non-zero Message Upper Address means a 64-bit address Memory Write.
    host.entry(7, 0x1_2345_6780, 0xABCD)
    host.mask(7, False)
    host.control(enable=True)
    assert host.f.raise_msix(7) == "sent"
    assert host.f.take_interrupts() == [(0x1_2345_6780, 0xABCD)]


def test_access_rules_aligned_dword_or_qword_only(host: Host) -> None:
    # §7.7.2: other accesses are undefined; this model ignores such writes.
    entry = host.table + 16 * 4
    before = host.f.memory_read(entry, 16)[1]
    assert host.f.memory_write(entry, b"\xff\xff") == "undefined_size"  # partial DW
    assert host.f.memory_write(entry + 4, b"\xff" * 8) == "undefined_size"  # QW not QW-aligned
    assert host.f.memory_write(entry, b"\xff" * 16) == "undefined_size"  # 4 DWs at once
    assert host.f.memory_read(entry, 16)[1] == before
    # Reserved bits: Message Address 1:0 (RO here), Vector Control 31:1 (RsvdP here).
    assert host.f.memory_write(entry, b"\xff" * 8) == "ok"
    assert host.f.memory_write(entry + 12, b"\xff" * 4) == "ok"
    assert host.f.memory_read(entry, 16)[1] == (
        struct.pack("<II", 0xFFFF_FFFC, 0xFFFF_FFFF) + before[8:12] + b"\x01\x00\x00\x00")
    # The PBA is read-only here ("Software should never write ... undefined", §7.7.2.9).
    host.control(enable=True)
    host.f.raise_msix(0)
    assert host.f.memory_write(host.pba, b"\x00" * 8) == "read_only" and host.pending_bits() == 1


def test_routing_outside_msix_and_disabled_space(host: Host) -> None:
    bar0 = host.e.bar(0)
    assert bar0 is not None
    assert host.f.memory_read(bar0.address, 4) == ("no_region", b"")  # a BAR, not MSI-X
    assert host.f.msix_region(2, 0x2000 - 8, 16) == ("straddles", 0)
    host.f.config_write(0x04, 0, 2)  # Memory Space Enable clear -> UR at the engine
    assert host.f.memory_read(host.table, 4) == ("disabled", b"")
    assert host.f.memory_write(host.table, b"\0" * 4) == "disabled"
    assert host.f.raise_msix(VECTORS) == "bad_vector"
