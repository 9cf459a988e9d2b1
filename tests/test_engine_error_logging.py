"""The function's error logging in configuration space, driven through TLPs and read back by CfgRd0.

Every error here is made by ``sim.Host`` sending a TLP to an ``engine.Device`` on the software
device; every register is read back with a Configuration Read (``sim.Host.config_read``), as a
root complex's software would. Rules: PCIe Base Specification 6.x —

* §6.2.5 Figure 6-2 (sequence of device error signaling and logging), §6.2.4.3 (Advisory
  Non-Fatal Error logging: Advisory Non-Fatal Error Status set, "the Advisory Non-Fatal Error
  Mask bit ... is checked, and, if set, no further processing is done"; otherwise the
  corresponding uncorrectable status bit, the header if that bit is unmasked, ERR_COR if
  Correctable Error Reporting Enable);
* §6.2.3.2.4.1 (a Completer sending a UR / CA Completion: an Advisory Non-Fatal Error when the
  severity is non-fatal), §6.2.3.2.4.5 (the Receiver of an Unexpected Completion: the same);
* §6.2.3.2.2 (a masked error: status bit set, no Message, not recorded in Header Log / First
  Error Pointer); §6.2.4.2 (the First Error Pointer is valid while its status bit is set; only
  one header without Multiple Header Recording); its Implementation Note (after the pointed-to
  bit is cleared, point at a bit hardware never sets);
* §6.2.7 Table 6-5 default severities (UR, CA, Unexpected Completion, Poisoned TLP Received:
  Non-Fatal; Malformed TLP: Fatal) and the Implementation Note "Device UR Reporting
  Compatibility" (SERR# Enable alone enables ERR_NONFATAL for a posted UR);
* §2.7.2.1 (a poisoned Configuration Write is handled as a Poisoned TLP Received error and
  answered UR);
* §7.5.1.1.4 Table 7-5 (Signaled Target Abort; Detected Parity Error "whenever it receives a
  Poisoned TLP"), §7.5.3.4 Device Control enables, §7.5.3.5 Device Status (logged whatever the
  enables and, with AER, the masks), §7.8.4.2-§7.8.4.8 (AER registers; Header Log: "byte 0 of
  the header is located in byte 3 of the Header Log Register", a DW read shows the header as the
  spec draws it). Bit names follow the Linux kernel's include/uapi/linux/pci_regs.h.

Error Messages are not sent by this engine (docs/engine.md): the ones the enables call for are
counted in ``stats()["err_cor_unsent"]`` / ``["err_nonfatal_unsent"]`` / ``["err_fatal_unsent"]``.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mlx5tlp
from mlx5tlp import engine, sim, tlp
from mlx5tlp import function as fn
from test_config_space_lspci import _lspci as lspci_exe
from test_config_space_lspci import section
from test_engine import BAR0, Bus

# pci_regs.h names: PCI_STATUS_SIG_TARGET_ABORT, PCI_STATUS_SIG_SYSTEM_ERROR,
# PCI_STATUS_DETECTED_PARITY, PCI_COMMAND_SERR.
STATUS_STA, STATUS_SSE, STATUS_DPE, COMMAND_SERR = 0x0800, 0x4000, 0x8000, 0x0100
# PCI_EXP_DEVCTL_CERE / NFERE / FERE / URRE and PCI_EXP_DEVSTA_CED / NFED / FED / URD.
CERE, NFERE, FERE, URRE = 0x1, 0x2, 0x4, 0x8
CED, NFED, FED, URD = 0x1, 0x2, 0x4, 0x8
# PCI_ERR_UNC_POISON_TLP, _COMP_ABORT, _UNX_COMP, _MALF_TLP, _UNSUP; PCI_ERR_COR_ADV_NFAT.
POISON, CA, UNX_COMP, MALF, UNSUP = 1 << 12, 1 << 15, 1 << 16, 1 << 18, 1 << 20
ADV_NFAT = 1 << 13
# AER register offsets (§7.8.4): PCI_ERR_UNCOR_STATUS .. PCI_ERR_HEADER_LOG.
UNC_STATUS, UNC_MASK, UNC_SEVER, COR_STATUS, COR_MASK, CAP, HEADER_LOG = (
    0x04, 0x08, 0x0C, 0x10, 0x14, 0x18, 0x1C)
UNMAPPED = BAR0 + 0x8000  # inside BAR 0, no region: Unsupported Request


def make_spec(aer: bool = True) -> fn.FunctionSpec:
    return fn.FunctionSpec(
        identity=fn.Identity(vendor_id=0x15B3, device_id=0x1234, class_code=0x020000),
        bars=[fn.Bar(0, "mem32", 1 << 16)],
        aer=fn.Aer() if aer else None,
    )


class Rig:
    """The function served on region [BAR0, BAR0 + 4 KiB) of memory; registers read by CfgRd0."""

    def __init__(self, dev: engine.Device, host: sim.Host, spec: fn.FunctionSpec) -> None:
        self.dev, self.host, self.bus = dev, host, Bus(host)
        model = fn.Function(spec)
        self.pcie = model.capability_offset("pcie")
        self.aer = model.capability_offset("aer") if spec.aer is not None else 0
        self.bus.enumerate()  # BAR 0 at BAR0, Memory Space + Bus Master Enable

    def cfg(self, off: int, size: int = 4) -> int:
        return self.host.config_read(off, size)

    def set_cfg(self, off: int, value: int, size: int = 4) -> None:
        self.host.config_write(off, value, size)

    def devsta(self) -> int:
        return self.cfg(self.pcie + 0x0A, 2) & 0xF

    def devctl(self, enables: int) -> None:
        old = self.cfg(self.pcie + 0x08, 2)
        self.set_cfg(self.pcie + 0x08, (old & ~0xF) | enables, 2)

    def a(self, reg: int) -> int:
        return self.cfg(self.aer + reg)

    def set_a(self, reg: int, value: int) -> None:
        self.set_cfg(self.aer + reg, value)

    def fep(self) -> int:
        return self.a(CAP) & 0x1F

    def header_log(self) -> list[int]:
        return [self.a(HEADER_LOG + 4 * i) for i in range(4)]

    def read(self, address: int) -> tlp.Tlp:
        t = tlp.Tlp.mem_read(address, 1, tag=self.bus.next_tag())
        self.bus.send(t)
        (c,) = self.bus.collect(1)
        assert c.tag == t.tag
        return t

    def write(self, address: int, data: bytes = b"\x5a" * 4, **kw: Any) -> tlp.Tlp:
        t = tlp.Tlp.mem_write(address, data, **kw)
        self.bus.send(t)
        self.cfg(0)  # a read after the posted write: the write was served (PCIe ordering)
        return t

    def unsent(self) -> tuple[int, int, int]:
        st = self.dev.stats()
        return st["err_cor_unsent"], st["err_nonfatal_unsent"], st["err_fatal_unsent"]


def logged(t: tlp.Tlp | bytes) -> list[int]:
    # §7.8.4.8: header byte 0 in bits 31:24 of the first DW; a 3-DW header leaves the fourth
    # DW undefined (this model: 0).
    raw = t.encode() if isinstance(t, tlp.Tlp) else t
    hdr = raw[:16] if raw[0] & 0x20 else raw[:12] + bytes(4)
    return [int.from_bytes(hdr[4 * i:4 * i + 4], "big") for i in range(4)]


@pytest.fixture
def host(device: str) -> Iterator[sim.Host]:
    with sim.Host(device) as h:
        yield h


@pytest.fixture
def rig(ctx: mlx5tlp.Context, host: sim.Host) -> Iterator[Rig]:
    spec = make_spec()
    with engine.Device(ctx, spec, [engine.MemoryRegion(0, 0, 0x1000)]) as dev:
        yield Rig(dev, host, spec)
    assert host.stats()["errors"] == 0, host.stats()["last_error"]


def test_reset_state_nothing_logged(rig: Rig) -> None:
    # §7.8.4.4 default severity (Malformed, DLP, FCP, Receiver Overflow, UIE fatal) and
    # §7.8.4.6 default Correctable Mask (Advisory Non-Fatal masked); the pointer at bit 0,
    # which an Endpoint never sets (the Implementation Note's recommended default).
    assert rig.devsta() == 0
    assert (rig.a(UNC_STATUS), rig.a(COR_STATUS), rig.fep()) == (0, 0, 0)
    assert rig.a(UNC_SEVER) & (MALF | UNSUP | CA | POISON | UNX_COMP) == MALF
    assert rig.a(COR_MASK) == ADV_NFAT
    assert rig.header_log() == [0, 0, 0, 0]


def test_non_posted_ur_is_advisory_and_masked_by_default(rig: Rig) -> None:
    # §6.2.3.2.4.1: non-fatal UR with a UR Completion -> Advisory Non-Fatal. Device Status
    # Correctable + UR Detected; ANFE status; ANFE is masked at reset, so "no further
    # processing": no uncorrectable status bit, nothing recorded, no Message.
    rig.devctl(CERE | URRE)
    rig.read(UNMAPPED)
    assert rig.devsta() == CED | URD
    assert rig.a(COR_STATUS) == ADV_NFAT
    assert rig.a(UNC_STATUS) == 0 and rig.fep() == 0 and rig.header_log() == [0] * 4
    assert rig.unsent() == (0, 0, 0)
    assert rig.dev.stats()["ur"] == 1


def test_non_posted_ur_with_advisory_unmasked_records_and_calls_for_err_cor(rig: Rig) -> None:
    rig.set_a(COR_MASK, 0)
    rig.devctl(CERE)  # UR Reporting Enable clear: no ERR_COR for a UR (§7.5.3.4)
    first = rig.read(UNMAPPED)
    assert rig.devsta() == CED | URD
    assert rig.a(COR_STATUS) == ADV_NFAT and rig.a(UNC_STATUS) == UNSUP
    assert rig.fep() == 20 and rig.header_log() == logged(first)
    assert rig.unsent() == (0, 0, 0)
    rig.devctl(CERE | URRE)
    rig.read(UNMAPPED + 0x40)
    assert rig.unsent() == (1, 0, 0)
    assert rig.header_log() == logged(first)  # the log is in use: the first error's header


def test_a_4dw_header_fills_the_whole_header_log(rig: Rig) -> None:
    rig.set_a(COR_MASK, 0)
    r = rig.read(0x1_2345_6780)  # above 4 GiB: a 4-DW header (§2.2.4.1); nobody's address
    assert r.encode()[0] & 0x20 and rig.fep() == 20
    assert rig.header_log() == logged(r) and rig.header_log()[3] == 0x2345_6780


def test_posted_ur_is_uncorrectable_and_serr_enables_err_nonfatal(rig: Rig) -> None:
    # A posted write to nothing: no Completion tells the Requester, so not advisory: Device
    # Status Non-Fatal + UR Detected, UR status, pointer and header of the MWr (3-DW header).
    w = rig.write(UNMAPPED)
    assert rig.devsta() == NFED | URD
    assert (rig.a(UNC_STATUS), rig.a(COR_STATUS), rig.fep()) == (UNSUP, 0, 20)
    assert rig.header_log() == logged(w) and rig.header_log()[3] == 0
    assert rig.dev.stats()["unsupported_posted"] == 1
    assert rig.unsent() == (0, 0, 0)  # nothing enabled
    rig.devctl(NFERE)
    rig.write(UNMAPPED)
    assert rig.unsent() == (0, 0, 0)  # a UR also needs UR Reporting Enable (or SERR#)
    rig.devctl(NFERE | URRE)
    rig.write(UNMAPPED)
    assert rig.unsent() == (0, 1, 0)
    rig.devctl(0)
    rig.set_cfg(0x04, rig.cfg(0x04, 2) | COMMAND_SERR, 2)
    rig.write(UNMAPPED)  # SERR# alone, UR Reporting Enable clear (Table 6-5 note)
    assert rig.unsent() == (0, 2, 0)
    # Signaled System Error is set only when a Message is sent (Table 7-5): none was.
    assert rig.cfg(0x06, 2) & STATUS_SSE == 0


def test_masked_error_sets_status_only(rig: Rig) -> None:
    rig.set_a(UNC_MASK, UNSUP)
    rig.set_cfg(0x04, rig.cfg(0x04, 2) | COMMAND_SERR, 2)
    rig.devctl(NFERE | URRE)
    rig.write(UNMAPPED)
    # §6.2.3.2.2: status set, no Message, not recorded; Device Status regardless of the mask.
    assert rig.a(UNC_STATUS) == UNSUP
    assert rig.fep() == 0 and rig.header_log() == [0] * 4
    assert rig.devsta() == NFED | URD
    assert rig.unsent() == (0, 0, 0)


def test_severity_programmed_fatal_makes_a_ur_not_advisory(rig: Rig) -> None:
    # §6.2.3.2.4.1 footnote: "If the severity is fatal, the error is not an Advisory
    # Non-Fatal Error, and must be signaled (if enabled) with ERR_FATAL."
    rig.set_a(UNC_SEVER, rig.a(UNC_SEVER) | UNSUP)
    rig.devctl(FERE | URRE)
    r = rig.read(UNMAPPED)
    assert rig.devsta() == FED | URD
    assert rig.a(COR_STATUS) == 0 and rig.a(UNC_STATUS) == UNSUP
    assert rig.fep() == 20 and rig.header_log() == logged(r)
    assert rig.unsent() == (0, 0, 1)


def test_completer_abort_from_a_callback(ctx: mlx5tlp.Context, host: sim.Host) -> None:
    spec = make_spec()
    cb = engine.CallbackRegion(0, 0x1000, 0x1000, lambda reqs: [r.fail("CA") for r in reqs])
    with engine.Device(ctx, spec, [cb]) as dev:
        rig = Rig(dev, host, spec)
        rig.set_a(COR_MASK, 0)
        rig.devctl(CERE)
        r = rig.read(BAR0 + 0x1010)
        assert rig.cfg(0x06, 2) & STATUS_STA  # Table 7-5 Signaled Target Abort
        assert rig.devsta() == CED  # advisory; not a UR
        assert (rig.a(COR_STATUS), rig.a(UNC_STATUS), rig.fep()) == (ADV_NFAT, CA, 15)
        assert rig.header_log() == logged(r)
        assert rig.unsent() == (1, 0, 0)
        assert dev.stats()["ca"] == 1
    assert host.stats()["errors"] == 0, host.stats()["last_error"]


def test_malformed_payload_above_mps_is_fatal(rig: Rig) -> None:
    # §2.2.2: a payload above Max_Payload_Size (128 bytes at reset) is a Malformed TLP;
    # Table 6-5: fatal by default, "log the prefix/header".
    rig.devctl(FERE)
    w = rig.write(BAR0, b"\x11" * 256)
    assert rig.dev.stats()["malformed"] == 1
    assert rig.devsta() == FED
    assert (rig.a(UNC_STATUS), rig.fep()) == (MALF, 18)
    assert rig.header_log() == logged(w)
    assert rig.unsent() == (0, 0, 1)


def test_undecodable_tlp_logs_its_first_bytes(rig: Rig) -> None:
    # A MWr whose Length (2 DW) disagrees with its 1-DW payload: cannot be decoded.
    raw = (bytes([0x40, 0x00, 0x00, 0x02, 0x01, 0x00, 0x00, 0x0F]) + BAR0.to_bytes(4, "big")
           + b"\0" * 4)
    with pytest.raises(ValueError):
        tlp.decode(raw)
    assert rig.host.send_request(raw)
    rig.cfg(0)
    assert rig.dev.stats()["malformed"] == 1
    assert rig.devsta() == FED and rig.a(UNC_STATUS) == MALF and rig.fep() == 18
    assert rig.header_log() == logged(raw)


def test_poisoned_write_is_a_poisoned_tlp_received_error(rig: Rig) -> None:
    # A poisoned MWr is discarded (§2.7.2.1), so not an advisory case (§6.2.3.2.4.3:
    # continuing could lose data silently): Non-Fatal; Detected Parity Error (Table 7-5).
    w = rig.write(BAR0, b"\xde\xad\xbe\xef", ep=True)
    assert rig.cfg(0x06, 2) & STATUS_DPE
    assert rig.devsta() == NFED  # not an Unsupported Request
    assert (rig.a(UNC_STATUS), rig.a(COR_STATUS), rig.fep()) == (POISON, 0, 12)
    assert rig.header_log() == logged(w)
    assert rig.header_log()[0] & (1 << 14)  # the EP bit (header byte 2 bit 6) as received


def test_poisoned_config_write_answered_ur_logs_poison_not_ur(rig: Rig) -> None:
    t = tlp.Tlp.cfg_write(0x0100, 0x10, (0x1234_0000).to_bytes(4, "little"),
                          tag=rig.bus.next_tag(), ep=True)
    rig.bus.send(t)
    (c,) = rig.bus.collect(1)
    assert c.status == tlp.Status.UR  # §2.7.2.1: answered UR ...
    assert rig.a(UNC_STATUS) == POISON and rig.devsta() == NFED  # ... logged as poison
    assert rig.header_log() == logged(t)


def test_unexpected_completion_is_advisory(rig: Rig) -> None:
    rig.set_a(COR_MASK, 0)
    rig.devctl(CERE)
    c = tlp.Tlp.completion(completer_id=0x0200, requester_id=0x0100, tag=7, data=b"\1\2\3\4")
    rig.bus.send(c)
    rig.cfg(0)
    assert rig.dev.stats()["unexpected_completions"] == 1
    assert rig.devsta() == CED
    assert (rig.a(COR_STATUS), rig.a(UNC_STATUS), rig.fep()) == (ADV_NFAT, UNX_COMP, 16)
    assert rig.header_log() == logged(c)
    assert rig.unsent() == (1, 0, 0)


def test_first_error_only_then_rw1c_clears_and_rearms(rig: Rig) -> None:
    first = rig.write(BAR0, b"\x22" * 256)  # Malformed
    second = rig.write(UNMAPPED)  # posted UR
    assert rig.a(UNC_STATUS) == MALF | UNSUP
    assert rig.fep() == 18 and rig.header_log() == logged(first)
    assert rig.devsta() == FED | NFED | URD
    rig.set_a(UNC_STATUS, UNSUP)  # RW1C: clears UR only; the pointer still names Malformed
    assert rig.a(UNC_STATUS) == MALF and rig.fep() == 18
    rig.set_a(UNC_STATUS, 0)  # writing 0 changes nothing
    assert rig.a(UNC_STATUS) == MALF
    rig.set_a(UNC_STATUS, MALF)  # the pointed-to bit cleared: the pointer moves to bit 0
    assert rig.a(UNC_STATUS) == 0 and rig.fep() == 0
    third = rig.write(UNMAPPED + 0x100)
    assert rig.fep() == 20 and rig.header_log() == logged(third) != logged(second)
    rig.set_cfg(rig.pcie + 0x0A, FED | NFED | URD, 2)  # Device Status RW1C
    assert rig.devsta() == 0
    rig.set_a(COR_MASK, 0)
    rig.read(UNMAPPED)
    rig.set_a(COR_STATUS, ADV_NFAT)
    assert rig.a(COR_STATUS) == 0


def test_without_aer_only_device_status(ctx: mlx5tlp.Context, host: sim.Host) -> None:
    spec = make_spec(aer=False)
    with engine.Device(ctx, spec, [engine.MemoryRegion(0, 0, 0x1000)]) as dev:
        rig = Rig(dev, host, spec)
        assert rig.cfg(0x100) == 0  # no extended capability (§7.6.3)
        rig.devctl(CERE | NFERE | FERE | URRE)
        rig.read(UNMAPPED)
        # Advisory: "An agent without AER sends no error Message for these cases" (§6.2.3.2.4).
        assert rig.devsta() == CED | URD and rig.unsent() == (0, 0, 0)
        rig.set_cfg(rig.pcie + 0x0A, 0xF, 2)
        rig.write(UNMAPPED)
        assert rig.devsta() == NFED | URD and rig.unsent() == (0, 1, 0)
        rig.write(BAR0, b"\x33" * 256)
        assert rig.devsta() & FED and rig.unsent() == (0, 1, 1)
    assert host.stats()["errors"] == 0, host.stats()["last_error"]


def test_lspci_decodes_the_logged_error(rig: Rig, tmp_path: Path) -> None:
    # An independent decoder: pciutils reads the dump (read through CfgRd0 TLPs) and must see
    # the posted UR as we logged it, the Header Log DWs included.
    rig.set_a(COR_MASK, 0)
    w = rig.write(UNMAPPED)
    dump = tmp_path / "config.txt"
    dump.write_text(rig.host.lspci())
    out = subprocess.run([lspci_exe(), "-F", str(dump), "-vvv"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert re.search(r"DevSta:\tCorrErr- NonFatalErr\+ FatalErr- UnsupReq\+", out.stdout)
    aer = section(out.stdout, "Advanced Error Reporting")
    assert re.search(r"UESta:\t.*UnsupReq\+", aer) and re.search(r"CESta:\t.*AdvNonFatalErr-", aer)
    assert re.search(r"AERCap:\tFirst Error Pointer: 14,", aer)
    assert "HeaderLog: " + " ".join(f"{dw:08x}" for dw in logged(w)) in aer
