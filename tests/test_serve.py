"""``mlx5tlp serve SPEC``: a spec file with regions, served until stopped, talked to by a host.

The example spec (examples/serve/nic.toml) is served in a separate process and enumerated and
exercised from ``sim.Host`` through TLPs, every completion checked by the host model and here.
Rules cited: PCIe Base Specification 6.x §7.5.1.2.1 (BAR sizing and assignment), §7.5.1.1.3
(Memory Space Enable; UR for what no region claims), §7.4 (reserved bits: read 0, writes
ignored), RW1C fields as in §7.4's register attribute table.
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mlx5tlp
from mlx5tlp import served, sim, tlp
from mlx5tlp.function import load as fn_load
from test_engine import Bus, _read_all

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "serve" / "nic.toml"
BAR0 = 0x1_0000_0000  # a 64-bit BAR above 4 GiB
BAR2 = 0xE000_0000


class Server:
    """`mlx5tlp serve SPEC` in a child process; `serving` is its first stdout line."""

    def __init__(self, spec: Path, device: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlx5tlp", "serve", str(spec), "--device", device, *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(30)
            raise AssertionError(f"serve did not start: {self.proc.stderr.read()}")  # type: ignore[union-attr]
        self.serving = json.loads(line)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30
             ) -> tuple[int, dict[str, Any], str]:
        self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=timeout)
        events = [json.loads(x) for x in out.splitlines()]
        return self.proc.returncode, events[-1] if events else {}, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def host(device: str) -> Iterator[sim.Host]:
    with sim.Host(device) as h:
        yield h


def _enumerate(bus: Bus) -> None:
    # §7.5.1.2.1: size BAR 0 (64-bit: the pair), then assign it and BAR 2, then enable.
    bus.cfg_write(0x10, 0xFFFF_FFFF)
    bus.cfg_write(0x14, 0xFFFF_FFFF)
    assert bus.cfg_read(0x10) == 0xFFFF_0000 | 0b0100  # 64 KiB, 64-bit, not prefetchable
    assert bus.cfg_read(0x14) == 0xFFFF_FFFF
    bus.cfg_write(0x10, BAR0 & 0xFFFF_FFFF)
    bus.cfg_write(0x14, BAR0 >> 32)
    bus.cfg_write(0x18, BAR2)
    bus.cfg_write(0x04, 0x6)  # Memory Space + Bus Master Enable


def _word(bus: Bus, address: int) -> int:
    data, _ = _read_all(bus, address, 4)
    return int.from_bytes(data, "little")


def _write(bus: Bus, address: int, value: int) -> None:
    bus.send(tlp.Tlp.mem_write(address, value.to_bytes(4, "little")))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_example_spec_serves_a_host_until_stopped(device: str, host: sim.Host,
                                                      sig: int) -> None:
    server = Server(EXAMPLE, device)
    try:
        ev = server.serving
        assert ev["event"] == "serving" and ev["device"] == device and len(ev["pages"]) == 1
        assert [(r["name"], r["kind"]) for r in ev["regions"]] == [
            ("sram", "memory"), ("ctrl", "registers"), ("mailbox", "callback")]
        bus = Bus(host)
        assert bus.cfg_read(0x00) == 0x1234_15B3  # Device ID | Vendor ID, as declared
        assert bus.cfg_read(0x08) == 0x0200_0001  # class 020000h, revision 1
        _enumerate(bus)
        # memory: contents then fill
        data, _ = _read_all(bus, BAR0, 16)
        assert data == b"mlx5tlp\x00" + b"\xa5" * 8
        _write(bus, BAR0 + 0x100, 0xDEADBEEF)
        assert _word(bus, BAR0 + 0x100) == 0xDEADBEEF
        # ... and the same bytes through the server's memfd, mapped here
        fd = os.open(ev["regions"][0]["memfd"], os.O_RDWR)
        try:
            with mmap.mmap(fd, 0x4000) as shared:
                assert shared[0x100:0x104] == (0xDEADBEEF).to_bytes(4, "little")
                shared[0x200:0x204] = b"\x01\x02\x03\x04"  # the device side changes it
                assert _word(bus, BAR0 + 0x200) == 0x04030201
        finally:
            os.close(fd)
        # registers: ro, rw with reserved bits, w1c, a write hook counted by a read hook
        regs = BAR0 + 0x4000
        _write(bus, regs + 0x0, 0)
        assert _word(bus, regs + 0x0) == 0x1234_0001  # ro
        _write(bus, regs + 0x4, 0xFFFF_FFFF)
        assert _word(bus, regs + 0x4) == 0x0000_FFFF  # bits 31:16 reserved: read 0 (§7.4)
        _write(bus, regs + 0x8, 0x1)
        assert _word(bus, regs + 0x8) == 0x2  # the written 1 cleared bit 0
        for _ in range(3):
            _write(bus, regs + 0xC, 1)
        assert _word(bus, regs + 0xC) == 0  # write-only reads 0
        assert _word(bus, regs + 0x10) == 3  # the hook counted the doorbells
        # callback: the handler's data
        data, _ = _read_all(bus, BAR0 + 0x8010, 8)
        assert data == (0x10 ^ 0x5A5A5A5A).to_bytes(4, "little") + \
            (0x14 ^ 0x5A5A5A5A).to_bytes(4, "little")
        # unclaimed inside the BAR: UR (§7.5.1.1.3's decode, no region)
        bus.send(tlp.Tlp.mem_read(BAR0 + 0xC000, 1, tag=bus.next_tag()))
        (c,) = bus.collect(1)
        assert c.status == tlp.Status.UR
        code, stopped, err = server.stop(sig)
    finally:
        server.kill()
    assert code == 0, err
    assert stopped["event"] == "stopped" and stopped["hook_errors"] == 0
    assert stopped["requests"] >= 20 and stopped["ur"] == 1
    assert "Traceback" not in err
    st = host.stats()
    assert st["errors"] == 0 and st["outstanding"] == 0, st["last_error"]
    ds = sim.device_stats(device)
    assert (ds["contexts"], ds["tlp_vars"], ds["gw_pages_free"]) == (0, 0, 8)  # nothing leaked


def test_a_shared_memory_region_is_the_file(device: str, host: sim.Host, tmp_path: Path
                                            ) -> None:
    backing = tmp_path / "bar0.bin"
    backing.write_bytes(b"\x11\x22\x33\x44" * 16)
    spec = tmp_path / "shared.json"
    spec.write_text(json.dumps({
        "identity": {"vendor_id": "0x15b3", "device_id": "0x1235"},
        "bars": [{"index": 0, "kind": "mem32", "size": 4096}],
        "regions": [{"kind": "memory", "bar": 0, "offset": 0, "size": 4096,
                     "shared": str(backing)}],
    }))
    server = Server(spec, device)
    try:
        bus = Bus(host)
        bus.cfg_write(0x10, BAR2)
        bus.cfg_write(0x04, 0x2)
        data, _ = _read_all(bus, BAR2, 8)
        assert data == b"\x11\x22\x33\x44" * 2  # the file's bytes were kept (no fill given)
        _write(bus, BAR2 + 0x40, 0xCAFEF00D)
        _word(bus, BAR2 + 0x40)  # the read after the write: it is done
        assert backing.read_bytes()[0x40:0x44] == (0xCAFEF00D).to_bytes(4, "little")
        assert backing.stat().st_size == 4096  # grown to the region
        code, _stopped, err = server.stop()
    finally:
        server.kill()
    assert code == 0, err


def _spec_with(tmp_path: Path, regions: list[Any], **top: Any) -> Path:
    p = tmp_path / "bad.json"
    doc = {"identity": {"vendor_id": "0x15b3", "device_id": "0x1"},
           "bars": [{"index": 0, "kind": "mem32", "size": 65536}], "regions": regions, **top}
    p.write_text(json.dumps(doc))
    return p


_MEM = {"kind": "memory", "bar": 0, "offset": 0, "size": 4096}
_REG = {"kind": "registers", "bar": 0, "offset": 0x1000, "registers": [{"name": "a",
                                                                          "offset": 0}]}


@pytest.mark.parametrize("regions, top, message", [
    ([{**_MEM, "kind": "rom"}], {}, "regions[0].kind: 'rom' is not one of memory, registers, "
     "callback"),
    ([{**_MEM, "sise": 4}], {}, "regions[0].sise: unknown key (expected one of kind, bar,"),
    ([{k: v for k, v in _MEM.items() if k != "size"}], {}, "regions[0].size: missing"),
    ([{**_MEM, "size": 6}], {}, "regions[0].size: 6 is not a positive multiple of 4"),
    ([{**_MEM, "offset": 2}], {}, "regions[0].offset: 0x2 is not DW (4-byte) aligned"),
    ([{**_MEM, "bar": 9}], {}, "regions[0].bar: 9 is not a BAR index 0..5"),
    ([{**_MEM, "bar": "zero"}], {}, "regions[0].bar: 'zero' is not an integer"),
    ([{**_MEM, "fill": 256}], {}, "regions[0].fill: 256 is not a byte 0..255"),
    ([{**_MEM, "contents": "zz"}], {}, "regions[0].contents: 'zz' is not hex"),
    ([{**_MEM, "size": 4, "contents": "0102030405"}], {},
     "regions[0].contents: 5 bytes do not fit the region's 4"),
    ([_MEM, {**_REG, "registers": []}], {},
     "regions[1].registers: must be a non-empty array of tables, not []"),
    ([{**_REG, "registers": [{"name": "a", "offset": 0, "access": "rx"}]}], {},
     "regions[0].registers[0].access: 'rx' is not one of ro, rw, rw1c, wo, w1c"),
    ([{**_REG, "registers": [{"name": "a", "offset": 0, "width": 3}]}], {},
     "regions[0].registers[0].width: 3 is not 1, 2, 4 or 8"),
    ([{**_REG, "registers": [{"name": "a", "offset": 0, "on_read": "nocolon"}]}], {},
     "regions[0].registers[0].on_read: 'nocolon' is not 'module:function'"),
    ([{**_REG, "registers": [{"offset": 0}]}], {}, "regions[0].registers[0].name: missing"),
    ([{"kind": "callback", "bar": 0, "offset": 0, "size": 64, "handler": "m:f",
       "deadline": -1}], {}, "regions[0].deadline: -1.0 is not 0 < seconds <= 4000"),
    ("nope", {}, "regions: must be an array of tables, not 'nope'"),
    ([], {"bars": [{"index": 0, "kind": "mem32", "size": 100}]},
     "bars[0].size: 100 is not a power of two"),
    ([], {"identity": {"vendor_id": 1}}, "identity.device_id: missing"),
    ([], {"colour": "red"}, "colour: unknown key"),
])
def test_bad_spec_fields_are_named_with_the_file(tmp_path: Path, regions: Any,
                                                 top: dict[str, Any], message: str) -> None:
    path = _spec_with(tmp_path, regions, **top)
    with pytest.raises(mlx5tlp.InvalidArgumentError) as info:
        served.load(path)
    assert f"{path}: {message}" in str(info.value)


def test_the_function_loader_points_to_the_served_loader() -> None:
    with pytest.raises(ValueError, match=r"regions: .*mlx5tlp.served.load\(\)"):
        fn_load(EXAMPLE)
    spec = served.load(EXAMPLE)
    assert spec.function.identity.device_id == 0x1234 and len(spec.regions) == 3


def test_bad_syntax_and_missing_files_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "x.toml"
    bad.write_text("[identity\nvendor_id = 1\n")
    with pytest.raises(mlx5tlp.InvalidArgumentError, match=rf"{bad}: not valid TOML"):
        served.load(bad)
    with pytest.raises(mlx5tlp.InvalidArgumentError, match="No such file"):
        served.load(tmp_path / "missing.json")


def test_hooks_that_cannot_be_imported_and_misplaced_regions_are_named(
        ctx: mlx5tlp.Context, tmp_path: Path) -> None:
    path = _spec_with(tmp_path, [{"kind": "callback", "bar": 0, "offset": 0, "size": 64,
                                  "handler": "no_such_module_xyz:handle"}])
    spec = served.load(path)
    with pytest.raises(mlx5tlp.InvalidArgumentError,
                       match=r"regions\[0\].handler: cannot import module 'no_such_module_xyz'"):
        spec.device(ctx)
    (tmp_path / "hooks_here.py").write_text("value = 3\n")
    path = _spec_with(tmp_path, [{"kind": "callback", "bar": 0, "offset": 0, "size": 64,
                                  "handler": "hooks_here:value"}])
    with pytest.raises(mlx5tlp.InvalidArgumentError, match="'hooks_here:value' is not callable"):
        served.load(path).device(ctx)
    path = _spec_with(tmp_path, [{**_REG, "registers": [{"name": "a", "offset": 0,
                                                         "reset": 3, "reserved": 2}]}])
    with pytest.raises(mlx5tlp.InvalidArgumentError,
                       match=r"regions\[0\]: .*registers\[0\].reset: 0x3 sets reserved bits 0x2"):
        served.load(path).device(ctx)
    path = _spec_with(tmp_path, [{**_MEM, "offset": 0xF000, "size": 0x2000}])
    with pytest.raises(mlx5tlp.InvalidArgumentError, match=rf"{path}: .*outside BAR 0"):
        served.load(path)  # refused when the file is read, before anything is mapped
    assert sim.device_stats(ctx.name)["tlp_vars"] == 0


def test_cli_bad_spec_is_one_line_and_options_are_checked(device: str, tmp_path: Path) -> None:
    path = _spec_with(tmp_path, [{**_MEM, "fill": 300}])

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mlx5tlp", "serve", *args],
                              capture_output=True, text=True, timeout=60)

    out = run(str(path), "--device", device)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == f"mlx5tlp serve: {path}: regions[0].fill: 300 is not a byte 0..255\n"
    out = run(str(EXAMPLE), "--control", str(tmp_path / "sock"))
    assert out.returncode == 2 and "not SPEC and --control" in out.stderr
    out = run(str(EXAMPLE), "--engine", "python")
    assert out.returncode == 2 and "--engine are for --control/--standby only" in out.stderr
    out = run(str(EXAMPLE), "--pages", "9")
    assert out.returncode == 2 and "argument --pages: must be an integer in 1..8" in out.stderr
    out = run("--control", str(tmp_path / "sock"))
    assert out.returncode == 2 and "need --key-file" in out.stderr


def test_max_seconds_ends_serving(device: str) -> None:
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "mlx5tlp", "serve", str(EXAMPLE), "--device",
                          device, "--max-seconds", "0.5"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    events = [json.loads(x)["event"] for x in out.stdout.splitlines()]
    assert events == ["serving", "stopped"]
    assert time.monotonic() - start < 30


def test_a_handler_that_never_returns_cannot_hold_the_command(device: str, host: sim.Host,
                                                              tmp_path: Path) -> None:
    (tmp_path / "stuck.py").write_text("import time\n\n\ndef handle(reqs):\n"
                                       "    time.sleep(3600)\n")
    path = _spec_with(tmp_path, [{"kind": "callback", "bar": 0, "offset": 0, "size": 64,
                                  "handler": "stuck:handle"}])
    server = Server(path, device)
    try:
        bus = Bus(host)
        bus.cfg_write(0x10, BAR2)
        bus.cfg_write(0x04, 0x2)
        bus.send(tlp.Tlp.mem_read(BAR2, 1, tag=bus.next_tag()))
        time.sleep(0.2)  # the lane is in the handler now
        start = time.monotonic()
        code, _stopped, err = server.stop(timeout=60)
        took = time.monotonic() - start
    finally:
        server.kill()
    assert code == 1
    assert "did not stop within 5.0 s (a hook or handler does not return); ending the " \
        "process" in err
    assert took < 30
    assert "Traceback" not in err
    deadline = time.monotonic() + 10
    while sim.device_stats(device)["contexts"] and time.monotonic() < deadline:
        time.sleep(0.05)
    ds = sim.device_stats(device)  # the dead server's objects were reclaimed
    assert (ds["contexts"], ds["tlp_vars"]) == (0, 0), ds
