"""Root-complex style checks of a function, from the host's side of configuration space.

:func:`enumerate_function` does what firmware or an OS does with a new function, through
nothing but configuration reads and writes (any object with ``config_read(offset, size)`` and
``config_write(offset, value, size)``: a :class:`~mlx5tlp.function.Function` now, the host
model over CfgRd/CfgWr TLPs once the engine serves them): read the identity, walk both
capability lists, size every BAR by the all-ones protocol (PCIe Base §7.5.1.2.1), assign
naturally aligned addresses, and enable decoding. It records every deviation from the spec it
notices in ``Enumeration.problems`` instead of stopping.

:func:`lspci_dump` renders 4096 configuration bytes in the text format of ``lspci -xxxx``,
which ``lspci -F <file> -vvv`` (pciutils) decodes: an independent check of the model.

Thread-safety: pure functions over the access object; not for concurrent use of one device.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Protocol

__all__ = [
    "BarInfo",
    "CapabilityInfo",
    "ConfigAccess",
    "Enumeration",
    "MsixInfo",
    "RomInfo",
    "enumerate_function",
    "lspci_dump",
    "read_config",
]

CAP_NAMES = {0x01: "Power Management", 0x05: "MSI", 0x09: "Vendor Specific",
             0x10: "PCI Express", 0x11: "MSI-X"}
EXT_CAP_NAMES = {0x0001: "Advanced Error Reporting", 0x0003: "Device Serial Number",
                 0x000B: "Vendor Specific"}
_MAX_CAPS = 48  # (256 - 64) / 4: more standard capabilities than fit means a loop


class ConfigAccess(Protocol):
    """Configuration reads and writes of 1, 2 or 4 aligned bytes."""

    def config_read(self, offset: int, size: int = 4) -> int: ...

    def config_write(self, offset: int, value: int, size: int = 4) -> None: ...


@dataclass(frozen=True)
class CapabilityInfo:
    """One entry of a capability list; ``version`` is 0 for PCI-compatible capabilities."""

    id: int
    offset: int
    extended: bool
    version: int = 0

    @property
    def name(self) -> str:
        names = EXT_CAP_NAMES if self.extended else CAP_NAMES
        return names.get(self.id, f"{self.id:#x}")


@dataclass(frozen=True)
class BarInfo:
    """A BAR as sized and assigned: ``kind`` is ``mem32``, ``mem64`` or ``io``."""

    index: int
    kind: str
    size: int
    prefetchable: bool
    address: int


@dataclass(frozen=True)
class RomInfo:
    """The Expansion ROM BAR as sized and assigned (left disabled, as an OS does)."""

    size: int
    address: int


@dataclass(frozen=True)
class MsixInfo:
    """The MSI-X capability's view of the table and PBA."""

    offset: int
    vectors: int
    table_bar: int
    table_offset: int
    pba_bar: int
    pba_offset: int


@dataclass(frozen=True)
class Enumeration:
    """What :func:`enumerate_function` found and did."""

    vendor_id: int
    device_id: int
    subsystem_vendor_id: int
    subsystem_id: int
    revision: int
    class_code: int
    header_type: int
    interrupt_pin: int
    capabilities: tuple[CapabilityInfo, ...]
    bars: tuple[BarInfo, ...]
    rom: Optional[RomInfo]
    msix: Optional[MsixInfo]
    problems: tuple[str, ...]

    def capability(self, cap_id: int, *, extended: bool = False) -> Optional[CapabilityInfo]:
        """The first capability with this ID in the given list, or None."""
        for c in self.capabilities:
            if c.id == cap_id and c.extended == extended:
                return c
        return None

    def bar(self, index: int) -> Optional[BarInfo]:
        """The BAR in register slot ``index``, or None."""
        for b in self.bars:
            if b.index == index:
                return b
        return None


def read_config(cfg: ConfigAccess) -> bytes:
    """All 4096 bytes of configuration space, read as 1024 DW reads."""
    return b"".join(cfg.config_read(o, 4).to_bytes(4, "little") for o in range(0, 4096, 4))


def _walk(cfg: ConfigAccess, problems: list[str]) -> list[CapabilityInfo]:
    caps: list[CapabilityInfo] = []
    status = cfg.config_read(0x06, 2)
    ptr = cfg.config_read(0x34, 1)
    if not status & 0x10:
        problems.append("Status: Capabilities List is clear (PCIe requires it set, §7.5.1.1.4)")
    elif ptr & 3:
        problems.append(f"Capabilities Pointer {ptr:#x}: bottom two bits must be 00b (§7.5.1.1.11)")
    seen: set[int] = set()
    p = ptr & ~3
    while p and status & 0x10:
        if p in seen or len(seen) >= _MAX_CAPS or not 0x40 <= p <= 0xFC:
            problems.append(f"capability list: bad or looping pointer {p:#x}")
            break
        seen.add(p)
        nxt = cfg.config_read(p + 1, 1)
        caps.append(CapabilityInfo(cfg.config_read(p, 1), p, False))
        if nxt & 3:
            problems.append(f"capability at {p:#x}: Next {nxt:#x} is not DW-aligned (§7.5.1.1.11)")
        p = nxt & ~3
    p, seen = 0x100, set()
    while True:
        header = cfg.config_read(p, 4)
        if header in (0, 0xFFFFFFFF) and p == 0x100:
            break  # §7.6.3: no extended capabilities
        if p in seen or len(seen) >= 960:
            problems.append(f"extended capability list: loop at {p:#x}")
            break
        seen.add(p)
        caps.append(CapabilityInfo(header & 0xFFFF, p, True, (header >> 16) & 0xF))
        nxt = header >> 20
        if nxt == 0:
            break
        if nxt & 3 or nxt < 0x100:
            problems.append(f"extended capability at {p:#x}: Next {nxt:#x} must be DW-aligned "
                            "and >= 0x100 (§7.6.3)")
            break
        p = nxt
    return caps


def _size_bars(cfg: ConfigAccess, problems: list[str]) -> list[tuple[int, str, int, bool]]:
    """(index, kind, size, prefetchable) of every implemented BAR, by writing all 1s."""
    found: list[tuple[int, str, int, bool]] = []
    i = 0
    while i < 6:
        index, reg = i, 0x10 + 4 * i
        orig = cfg.config_read(reg)
        cfg.config_write(reg, 0xFFFFFFFF)
        probe = cfg.config_read(reg)
        cfg.config_write(reg, orig)
        if probe == 0:
            i += 1
            continue
        if probe & 1:  # I/O: bit 1 reserved, 32-bit decode
            mask = probe & ~0x3
            size = (~mask + 1) & 0xFFFFFFFF
            found.append((i, "io", size, False))
            i += 1
            continue
        typ = (probe >> 1) & 3
        pref = bool(probe & 8)
        if typ == 2:
            if i == 5:
                problems.append("BAR5 claims to be 64-bit: no register for the upper half")
                break
            orig_hi = cfg.config_read(reg + 4)
            cfg.config_write(reg + 4, 0xFFFFFFFF)
            hi = cfg.config_read(reg + 4)
            cfg.config_write(reg + 4, orig_hi)
            mask = hi << 32 | (probe & ~0xF)
            size = (~mask + 1) & (1 << 64) - 1
            found.append((i, "mem64", size, pref))
            i += 2
        else:
            if typ != 0:
                problems.append(f"BAR{i}: reserved memory type {typ:#04b} (§7.5.1.2.1 Table 7-9)")
            size = (~(probe & ~0xF) + 1) & 0xFFFFFFFF
            found.append((i, "mem32", size, pref))
            i += 1
        if size & (size - 1) or (found[-1][1] != "io" and size < 128):
            problems.append(f"BAR{index}: size {size:#x} is not a power of two >= 128 (§7.5.1.2.1)")
    return found


class _Window:
    def __init__(self, base: int, limit: int, name: str) -> None:
        self.next, self.limit, self.name = base, limit, name

    def take(self, size: int, problems: list[str]) -> int:
        addr = (self.next + size - 1) & ~(size - 1)  # naturally aligned
        if addr + size > self.limit:
            problems.append(f"{self.name} window too small for {size:#x} bytes")
            return 0
        self.next = addr + size
        return addr


def enumerate_function(
    cfg: ConfigAccess,
    *,
    mem32_window: tuple[int, int] = (0xE000_0000, 0xF000_0000),
    mem64_window: tuple[int, int] = (0x40_0000_0000, 0x80_0000_0000),
    io_window: tuple[int, int] = (0x1000, 0x10000),
    bus_master: bool = True,
) -> Enumeration:
    """Enumerate one function as a root complex would, and leave it configured.

    Sizes every BAR with decoding disabled, assigns 32-bit memory BARs and the ROM from
    ``mem32_window``, 64-bit BARs from ``mem64_window`` (above 4 GiB, so both halves are
    exercised) and I/O BARs from ``io_window``, largest first, naturally aligned; then sets
    Memory Space (and I/O Space when there are I/O BARs) and, with ``bus_master``, Bus
    Master Enable.

    Returns:
        The identity, both capability lists in list order, the BARs, the ROM and the MSI-X
        layout, and the problems noticed (empty for a compliant function).
    """
    problems: list[str] = []
    vendor = cfg.config_read(0x00, 2)
    if vendor == 0xFFFF:
        problems.append("Vendor ID is FFFFh: no function")
    header_type = cfg.config_read(0x0E, 1)
    if header_type & 0x7F != 0:
        problems.append(f"Header Type {header_type:#x} is not a type-0 header")
    command = cfg.config_read(0x04, 2)
    cfg.config_write(0x04, command & ~0x3, 2)  # no decoding while sizing
    caps = _walk(cfg, problems)
    sized = _size_bars(cfg, problems)
    cfg.config_write(0x30, 0xFFFFF800)
    rom_probe = cfg.config_read(0x30) & 0xFFFFF800
    rom_size = (~rom_probe + 1) & 0xFFFFFFFF if rom_probe else 0

    windows = {"mem32": _Window(*mem32_window, "32-bit memory"),
               "mem64": _Window(*mem64_window, "64-bit memory"),
               "io": _Window(*io_window, "I/O")}
    bars: list[BarInfo] = []
    for index, kind, size, pref in sorted(sized, key=lambda b: -b[2]):
        addr = windows[kind].take(size, problems)
        cfg.config_write(0x10 + 4 * index, addr & 0xFFFFFFFF)
        if kind == "mem64":
            cfg.config_write(0x14 + 4 * index, addr >> 32)
        bars.append(BarInfo(index, kind, size, pref, addr))
    rom = None
    if rom_size:
        rom_addr = windows["mem32"].take(rom_size, problems)
        cfg.config_write(0x30, rom_addr)  # Enable left clear
        rom = RomInfo(rom_size, rom_addr)
    else:
        cfg.config_write(0x30, 0)

    enable = 0
    if any(b.kind != "io" for b in bars) or rom:
        enable |= 0x2
    if any(b.kind == "io" for b in bars):
        enable |= 0x1
    if bus_master:
        enable |= 0x4
    cfg.config_write(0x04, (command & ~0x7) | enable, 2)
    if cfg.config_read(0x04, 2) & 0x7 != enable:
        problems.append(f"Command: enables {enable:#x} did not stick")

    msix = None
    for c in caps:
        if c.id == 0x11 and not c.extended:
            control = cfg.config_read(c.offset + 2, 2)
            table = cfg.config_read(c.offset + 4)
            pba = cfg.config_read(c.offset + 8)
            msix = MsixInfo(c.offset, (control & 0x7FF) + 1, table & 7, table & ~7, pba & 7,
                            pba & ~7)
    class_rev = cfg.config_read(0x08)
    return Enumeration(
        vendor_id=vendor, device_id=cfg.config_read(0x02, 2),
        subsystem_vendor_id=cfg.config_read(0x2C, 2), subsystem_id=cfg.config_read(0x2E, 2),
        revision=class_rev & 0xFF, class_code=class_rev >> 8, header_type=header_type,
        interrupt_pin=cfg.config_read(0x3D, 1), capabilities=tuple(caps),
        bars=tuple(sorted(bars, key=lambda b: b.index)), rom=rom, msix=msix,
        problems=tuple(problems))


_SLOT = re.compile(r"(?:[0-9a-fA-F]{1,4}:)?[0-9a-fA-F]{1,2}:[0-9a-fA-F]{1,2}\.[0-7]")


def lspci_dump(config: bytes, slot: str = "00:00.0") -> str:
    """``config`` (256 or 4096 bytes) in ``lspci -xxxx`` text format, for ``lspci -F``.

    The first line names the slot (pciutils' dump reader starts a device there); then
    16 bytes per line, ``xx: `` offsets below 100h and ``xxx: `` above.
    """
    if len(config) not in (256, 4096):
        raise ValueError(f"configuration space is 256 or 4096 bytes, not {len(config)}")
    if not isinstance(slot, str):
        raise TypeError(f"slot must be a str, not {type(slot).__name__}")
    if not _SLOT.fullmatch(slot):  # else a newline in it would add lines to the dump
        raise ValueError(f"slot must be [domain:]bus:device.function in hex, not {slot!r}")
    vendor = int.from_bytes(config[0:2], "little")
    device = int.from_bytes(config[2:4], "little")
    cls = int.from_bytes(config[0x0A:0x0C], "little")
    lines = [f"{slot} Class {cls:04x}: Device {vendor:04x}:{device:04x}"]
    for off in range(0, len(config), 16):
        prefix = f"{off:02x}" if off < 0x100 else f"{off:03x}"
        lines.append(prefix + ": " + " ".join(f"{b:02x}" for b in config[off:off + 16]))
    return "\n".join(lines) + "\n"
