"""pciutils decodes our configuration space: an independent check nobody here wrote.

The function is enumerated (``enumerate_function``), its 4096 bytes are read back through
configuration reads and written in ``lspci -xxxx`` format, and ``lspci -F <dump> -vvv -nn``
(Debian ``pciutils``; CI installs it) must decode the identity, every BAR as assigned, and
every declared capability with the declared parameters.

Note on dumps: ``lspci -F`` has no resource sizes (a dump carries none), so BARs decode
without ``[size=...]``; and pciutils 3.9's ``show_bases`` prints the upper register of a 64-bit
BAR as a separate ``<unassigned>`` region when reading a dump (it skips it only when the OS
reports resource flags). Both are properties of the decoder, checked here as such.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mlx5tlp import function as fn

SPEC = fn.FunctionSpec(
    identity=fn.Identity(vendor_id=0x15B3, device_id=0x1234, subsystem_vendor_id=0x15B3,
                         subsystem_id=0x0042, revision=7, class_code=0x020000, interrupt_pin=1),
    bars=[fn.Bar(0, "mem64", 1 << 20, prefetchable=True), fn.Bar(2, "mem32", 16384),
          fn.Bar(3, "io", 256)],
    expansion_rom=fn.ExpansionRom(64 << 10),
    pcie=fn.PciExpress(max_payload_supported=512, max_link_speed=3, max_link_width=16,
                       completion_timeout_ranges=0b0111),
    power_management=fn.PowerManagement(d1=True, pme_support=0b01001),
    msix=fn.Msix(vectors=64, table_bar=2, pba_offset=0x2000),
    aer=fn.Aer(ecrc_generation=True),
    serial_number=fn.SerialNumber(0x0011223344556677),
    vendor_caps=[fn.VendorCap(bytes(range(1, 10)), writable=[(4, 4)])],
    vendor_ext_caps=[fn.VendorExtCap(0x1234, 2, b"\xaa\xbb\xcc\xdd")],
)


def _lspci() -> str:
    exe = shutil.which("lspci")
    if exe is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI installs pciutils (.ci/run): lspci must be present")
        pytest.skip("needs lspci (Debian package pciutils)")
    return exe


def decode(f: fn.Function, tmp_path: Path) -> str:
    dump = tmp_path / "config.txt"
    dump.write_text(fn.lspci_dump(fn.read_config(f)))
    out = subprocess.run([_lspci(), "-F", str(dump), "-vvv", "-nn"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def section(text: str, header: str) -> str:
    """The lines of one capability, from its header line to the next capability."""
    start = text.index(header)
    nxt = text.find("\tCapabilities: [", start + 1)
    return text[start: nxt if nxt > 0 else len(text)]


def test_lspci_decodes_identity_bars_and_every_capability(tmp_path: Path) -> None:
    f = fn.Function(SPEC)
    e = fn.enumerate_function(f)
    assert e.problems == ()
    text = decode(f, tmp_path)
    first = text.splitlines()[0]
    assert first.startswith("00:00.0 ") and "[0200]" in first and "[15b3:1234]" in first
    assert "(rev 07)" in first
    assert re.search(r"Subsystem: .*\[15b3:0042\]", text)
    assert "Control: I/O+ Mem+ BusMaster+" in text
    assert "Status: Cap+" in text and "Interrupt: pin A" in text

    regions = dict(re.findall(r"Region (\d): (.*)", text))
    b0, b2, b3 = e.bar(0), e.bar(2), e.bar(3)
    assert b0 and b2 and b3 and e.rom
    assert regions["0"] == f"Memory at {b0.address:x} (64-bit, prefetchable)"
    assert regions.get("1", "Memory at <unassigned> (32-bit, non-prefetchable)") == (
        "Memory at <unassigned> (32-bit, non-prefetchable)")  # the 64-bit pair's upper half
    assert regions["2"] == f"Memory at {b2.address:x} (32-bit, non-prefetchable)"
    assert regions["3"] == f"I/O ports at {b3.address:x}"
    assert set(regions) <= {"0", "1", "2", "3"}  # BAR4/5 unimplemented
    assert f"Expansion ROM at {e.rom.address:x} [disabled]" in text

    o = {name: f.capability_offset(name) for name in ("pcie", "power_management", "msix")}
    x = section(text, f"Capabilities: [{o['pcie']:x}] Express (v2) Endpoint")
    assert "DevCap:\tMaxPayload 512 bytes" in x and "ExtTag+" in x and "RBE+" in x
    assert "MaxPayload 128 bytes, MaxReadReq 512 bytes" in x
    assert "LnkCap:\tPort #0, Speed 8GT/s, Width x16" in x
    assert "LnkSta:\tSpeed 8GT/s, Width x16" in x
    assert "Completion Timeout: Range ABC, TimeoutDis+" in x
    assert "Supported Link Speeds: 2.5-8GT/s" in x

    p = section(text, f"Capabilities: [{o['power_management']:x}] Power Management version 3")
    assert "D1+ D2-" in p and "PME(D0+,D1-,D2-,D3hot+,D3cold-)" in p
    assert "Status: D0 NoSoftRst+ PME-Enable-" in p

    m = section(text, f"Capabilities: [{o['msix']:x}] MSI-X: Enable- Count=64 Masked-")
    assert "Vector table: BAR=2 offset=00000000" in m and "PBA: BAR=2 offset=00002000" in m

    vsc = e.capability(0x09)
    assert vsc and f"Capabilities: [{vsc.offset:x}] Vendor Specific Information: Len=0c" in text

    a = section(text, "Capabilities: [100 v2] Advanced Error Reporting")
    assert re.search(r"UESvrt:\tDLP\+ SDES- TLP- FCP\+ .*RxOF\+ MalfTLP\+", a)
    assert "AdvNonFatalErr+" in a.split("CEMsk:")[1].splitlines()[0]
    assert "ECRCGenCap+ ECRCGenEn-" in a
    dsn = e.capability(0x0003, extended=True)
    vsec = e.capability(0x000B, extended=True)
    assert dsn and vsec
    assert f"[{dsn.offset:x} v1] Device Serial Number 00-11-22-33-44-55-66-77" in text
    assert (f"[{vsec.offset:x} v1] Vendor Specific Information: ID=1234 Rev=2 Len=00c"
            in text)


def test_lspci_sees_what_the_host_programmed(tmp_path: Path) -> None:
    # Run-time state decodes too: MSI-X enabled with the Function Mask, MPS 256, RCB 128,
    # Completion Timeout 16..55 ms, D0 -> the status bits the function itself set.
    f = fn.Function(SPEC)
    fn.enumerate_function(f)
    o = {name: f.capability_offset(name) for name in ("pcie", "msix", "aer")}
    f.config_write(o["msix"] + 2, 0xC000, 2)
    f.config_write(o["pcie"] + 8, 0x2810 | 1 << 5, 2)
    f.config_write(o["pcie"] + 0x10, 0x0008, 2)
    f.config_write(o["pcie"] + 0x28, 0x5, 2)
    f.device_write(0x06, 0x2010, 2)  # Received Master Abort
    f.device_write(o["aer"] + 4, 1 << 20)  # Unsupported Request Error Status
    text = decode(f, tmp_path)
    assert f"[{o['msix']:x}] MSI-X: Enable+ Count=64 Masked+" in text
    assert "MaxPayload 256 bytes, MaxReadReq 512 bytes" in text
    assert "RCB 128 bytes" in text
    assert "Completion Timeout: 16ms to 55ms" in text
    assert "<MAbort+" in text
    assert re.search(r"UESta:\t.*UnsupReq\+", text)


def test_lspci_dump_refuses_a_slot_that_is_not_one() -> None:
    # pciutils' dump reader (lspci -F) starts a device at a line naming its slot: a slot with a
    # newline would add lines (a forged device or bytes) to the dump.
    config = bytes(256)
    assert fn.lspci_dump(config, "0000:3b:00.1").startswith("0000:3b:00.1 Class 0000")
    for slot in ("00:00.0\n00: ff ff", "", "3b:00.8", "g0:00.0", "00:00.0 "):
        with pytest.raises(ValueError, match="slot must be"):
            fn.lspci_dump(config, slot)
    with pytest.raises(TypeError, match="slot must be a str"):
        fn.lspci_dump(config, 5)  # type: ignore[arg-type]
