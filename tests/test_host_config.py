"""Configuration space through TLPs: ``Host.config_read/config_write`` over CfgRd0/CfgWr0.

A root complex reaches a function's configuration space only through Configuration Requests
(PCIe Base Specification 2.2.7 and 7.2); here the host model does the same, and
``enumerate_function`` / ``read_config`` / ``lspci_dump`` run unchanged on top of it. The
function answering is the declarative model (``mlx5tlp.function.Function``) behind a small
Python loop that answers every CfgRd0/CfgWr0 from a request channel; ``tests/test_engine*``
do the same against the native engine.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import mlx5tlp
from mlx5tlp import function as fn
from mlx5tlp import sim, tlp
from mlx5tlp.gateway import Gateway

SPEC = fn.FunctionSpec(
    identity=fn.Identity(vendor_id=0x15B3, device_id=0x1234, subsystem_vendor_id=0x15B3,
                         subsystem_id=0x0042, revision=7, class_code=0x020000, interrupt_pin=1),
    bars=[fn.Bar(0, "mem64", 1 << 20, prefetchable=True), fn.Bar(2, "mem32", 16384)],
    pcie=fn.PciExpress(max_payload_supported=512),
    power_management=fn.PowerManagement(),
    msix=fn.Msix(vectors=16, table_bar=2, pba_offset=0x2000),
    aer=fn.Aer(),
    serial_number=fn.SerialNumber(0x0011223344556677),
)


class ConfigFunction(threading.Thread):
    """Answers configuration requests from `f`; ``status`` other than SC answers every one so."""

    def __init__(self, ctx: mlx5tlp.Context, gw: Gateway, f: fn.Function, cid: int,
                 status: int = tlp.Status.SC) -> None:
        super().__init__(daemon=True)
        self.ctx, self.gw, self.f, self.cid, self.status = ctx, gw, f, cid, status
        self.stop = threading.Event()
        self.answered = 0
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                raw = sim.take_request(self.ctx, 0)
                if raw is None:
                    self.gw.flush(0.01)
                    continue
                req = tlp.decode(raw)
                assert req.kind in ("CfgRd0", "CfgWr0"), req
                if self.status != tlp.Status.SC:
                    cpls = tlp.completions_for(req, completer_id=self.cid, status=self.status)
                elif req.kind == "CfgRd0":
                    value = self.f.config_read(req.address, 4)
                    cpls = tlp.completions_for(req, value.to_bytes(4, "little"),
                                               completer_id=self.cid)
                else:
                    self.f.config_write_dword(req.address,
                                              int.from_bytes(req.data, "little"), req.first_be)
                    cpls = tlp.completions_for(req, completer_id=self.cid)
                for c in cpls:
                    self.gw.post(c.encode())
                self.answered += 1
        except BaseException as e:
            self.failure = e


@pytest.fixture
def served(ctx: mlx5tlp.Context,
           device: str) -> Iterator[tuple[sim.Host, fn.Function, ConfigFunction]]:
    f = fn.Function(SPEC)
    var = ctx.alloc_var(tlp=True)
    with sim.Host(device) as host, var.gateway() as gw:
        host.config_timeout = 10.0  # a loaded machine; never reached while the worker answers
        worker = ConfigFunction(ctx, gw, f, host.function_id)
        worker.start()
        try:
            yield host, f, worker
        finally:
            worker.stop.set()
            worker.join(10)
        assert worker.failure is None, worker.failure
    f.close()
    var.free()


def test_enumerate_through_tlps_matches_the_model(
        served: tuple[sim.Host, fn.Function, ConfigFunction]) -> None:
    host, _f, _worker = served
    found = host.enumerate()
    twin = fn.Function(SPEC)
    assert found == fn.enumerate_function(twin)  # the same walk, directly on the model
    twin.close()
    assert found.problems == ()
    assert (found.vendor_id, found.device_id, found.class_code) == (0x15B3, 0x1234, 0x020000)
    assert [b.index for b in found.bars] == [0, 2]
    assert found.bar(0) is not None and found.bar(0).size == 1 << 20  # type: ignore[union-attr]
    st = host.stats()
    assert st["errors"] == 0 and st["unexpected"] == 0 and st["outstanding"] == 0
    # Every access was a TLP answered by the function and checked by the host model: the BAR
    # sizing writes too (CfgWr0 is non-posted: one Cpl each).
    assert st["retired"] == st["requests"] > 50


def test_config_dump_reads_4096_bytes_through_tlps(
        served: tuple[sim.Host, fn.Function, ConfigFunction]) -> None:
    host, f, _ = served
    host.enumerate()
    before = host.stats()["retired"]
    dump = host.config_dump()
    assert len(dump) == 4096
    assert host.stats()["retired"] - before == 1024  # one CfgRd0 per DW, each answered
    assert dump == fn.read_config(f)


def test_lspci_decodes_the_dump_read_through_tlps(
        served: tuple[sim.Host, fn.Function, ConfigFunction], tmp_path: Path) -> None:
    exe = shutil.which("lspci")
    if exe is None:
        pytest.skip("needs lspci (Debian package pciutils; CI installs it)")
    host, f, _ = served
    host.enumerate()
    path = tmp_path / "dump.txt"
    path.write_text(host.lspci())
    out = subprocess.run([exe, "-F", str(path), "-vvv", "-nn"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    first = text.splitlines()[0]
    assert first.startswith("01:00.0 ") and "[15b3:1234]" in first and "(rev 07)" in first
    assert "Subsystem: " in text and "[15b3:0042]" in text
    assert "Control: I/O- Mem+ BusMaster+" in text
    assert "Region 0: Memory at 4000000000 (64-bit, prefetchable)" in text
    assert "Region 2: Memory at e0000000 (32-bit, non-prefetchable)" in text
    for cap in ("Power Management version", "Express (v2) Endpoint", "MSI-X: Enable- Count=16",
                "Advanced Error Reporting", "Device Serial Number 00-11-22-33-44-55-66-77"):
        assert cap in text, cap
    # The same decode as the dump read directly from the model (test_config_space_lspci checks
    # that one field by field against the spec).
    direct = tmp_path / "direct.txt"
    direct.write_text(fn.lspci_dump(fn.read_config(f), "01:00.0"))
    ref = subprocess.run([exe, "-F", str(direct), "-vvv", "-nn"], capture_output=True, text=True,
                         timeout=60)
    assert text == ref.stdout


def test_sub_dword_accesses_use_byte_enables(
        served: tuple[sim.Host, fn.Function, ConfigFunction]) -> None:
    host, f, _ = served
    assert host.config_read(0x00, 2) == 0x15B3
    assert host.config_read(0x02, 2) == 0x1234
    assert host.config_read(0x08, 1) == 7
    assert host.config_read(0x0B, 1) == 0x02
    host.config_write(0x0C, 0x10, 1)  # Cache Line Size: RW for software (7.5.1.1.7)
    assert f.config_read(0x0C, 1) == 0x10 and host.config_read(0x0C, 1) == 0x10
    # The BE-masked write touched only its byte: Latency Timer (0x0D) is unchanged.
    assert host.config_read(0x0C, 4) & 0xFFFF == 0x0010


def test_unsupported_request_reads_all_ones(ctx: mlx5tlp.Context, device: str) -> None:
    f = fn.Function(SPEC)
    var = ctx.alloc_var(tlp=True)
    with sim.Host(device) as host, var.gateway() as gw:
        worker = ConfigFunction(ctx, gw, f, host.function_id, status=tlp.Status.UR)
        worker.start()
        try:
            assert host.config_read(0x00, 4) == 0xFFFFFFFF
            assert host.config_read(0x08, 1) == 0xFF
            host.config_write(0x04, 0x6, 2)  # dropped, no exception
        finally:
            worker.stop.set()
            worker.join(10)
        st = host.stats()
        assert st["status_ur"] == 3 and st["errors"] == 0
    f.close()
    var.free()


def test_no_function_times_out(device: str) -> None:
    with sim.Host(device) as host:
        host.config_timeout = 0.2
        with pytest.raises(mlx5tlp.Error, match="no completion") as e:
            host.config_read(0)
        assert e.value.errno == errno.ETIMEDOUT


def test_bad_arguments(device: str) -> None:
    with sim.Host(device) as host:
        for offset, size in ((1, 4), (4096, 4), (-4, 4), (3, 2), (0, 3), (0, 4.0), (True, 1)):
            with pytest.raises(ValueError):
                host.config_read(offset, size)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="value"):
            host.config_write(0x0C, 0x100, 1)
