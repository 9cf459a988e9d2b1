"""A file served from that another process truncates: an error, never a SIGBUS that kills.

mmap(2): an access to a page of a ``MAP_SHARED`` file mapping past the end of the file raises
SIGBUS (``BUS_ADRERR``). A spec's ``shared`` file (docs/spec-format.md) or an application's fd
can be truncated by any process of the same user while the engine serves it; the native SIGBUS
guard (cpp/src/sigbus_guard.cpp, after Wayland's wl_shm pool handling) replaces the range with
zero pages, and the region reports the loss: ``backing_lost``, reads answered Completer Abort,
the Python accessors raise ``Error`` (``EIO``). A SIGBUS anywhere else still ends the process
with SIGBUS. No mocks: real files, real truncation from another process, real faults.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mlx5tlp
from mlx5tlp import engine, sim, tlp
from mlx5tlp._memfd import sealed_memfd
from test_engine import Bus, _read_all
from test_serve import BAR2, Server

SIZE = 0x4000  # four pages: the whole range is replaced, whichever page faults


@pytest.fixture
def host(device: str) -> Iterator[sim.Host]:
    with sim.Host(device) as h:
        yield h


def truncate_elsewhere(path: str, size: int = 0) -> None:
    """ftruncate from another process, as a hostile peer of the same user would."""
    subprocess.run([sys.executable, "-c", f"import os; os.truncate({path!r}, {size})"],
                   check=True, timeout=60)


def backing_file(tmp_path: Path) -> Path:
    p = tmp_path / "backing.bin"
    p.write_bytes(bytes(range(256)) * (SIZE // 256))
    return p


def test_a_region_on_a_truncated_file_reports_the_loss(tmp_path: Path) -> None:
    path = backing_file(tmp_path)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        region = engine.MemoryRegion(0, 0, SIZE, fd=fd, name="shared")
    finally:
        os.close(fd)
    assert region._core.guarded and not region.backing_lost
    assert region.read(0x3000, 4) == bytes(range(4))
    truncate_elsewhere(str(path), 0x1000)  # pages 1..3 are past the end now
    with pytest.raises(mlx5tlp.Error) as exc:
        region.read(0x3000, 4)  # faults; the guard maps zero pages; the read reports the loss
    assert exc.value.errno == errno.EIO
    assert "region 'shared'" in str(exc.value) and "truncated by another process" in str(
        exc.value)
    assert region.backing_lost
    with pytest.raises(mlx5tlp.Error, match="truncated"):
        region.read(0, 4)  # page 0 was still in the file: the whole range is gone anyway
    with pytest.raises(mlx5tlp.Error, match="truncated"):
        region.write(0x2000, b"abcd")
    assert path.stat().st_size == 0x1000  # the file is what the other process left
    # A region on a sealed memfd needs no guard: nobody can shrink it.
    mfd = sealed_memfd("test-sealed", SIZE)
    try:
        sealed = engine.MemoryRegion(0, 0, SIZE, fd=mfd, name="sealed")
    finally:
        os.close(mfd)
    assert not sealed._core.guarded and not sealed.backing_lost
    assert not engine.MemoryRegion(0, 0, SIZE)._core.guarded  # its own memfd is sealed


def test_an_adopted_unsealed_register_file_reports_the_loss() -> None:
    mfd = os.memfd_create("test-unsealed-registers", os.MFD_CLOEXEC)
    try:
        os.ftruncate(mfd, 16)
        os.pwrite(mfd, (0x1234).to_bytes(8, "little"), 0)
        regs = engine.RegisterRegion(0, 0, [engine.Register("a", 0), engine.Register("b", 4)],
                                     fd=mfd, name="regs")
        assert regs["a"] == 0x1234
        os.ftruncate(mfd, 0)  # same-process truncation faults the same way
    finally:
        os.close(mfd)
    with pytest.raises(mlx5tlp.Error) as exc:
        regs["a"]
    assert exc.value.errno == errno.EIO and "region 'regs'" in str(exc.value)
    assert regs.backing_lost


class Lines:
    """The server's stdout lines, read by a thread (readline would block the test)."""

    def __init__(self, server: Server) -> None:
        self.q: queue.Queue[dict[str, Any]] = queue.Queue()
        assert server.proc.stdout is not None
        self.stdout = server.proc.stdout
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.thread.join(30)  # at EOF once the process has exited
        self.stdout.close()

    def _run(self) -> None:
        for line in self.stdout:
            self.q.put(json.loads(line))

    def wait(self, event: str, timeout: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            ev = self.q.get(timeout=max(0.01, deadline - time.monotonic()))
            if ev["event"] == event:
                return ev


def test_serving_survives_truncation_of_its_shared_file(device: str, host: sim.Host,
                                                        tmp_path: Path) -> None:
    path = backing_file(tmp_path)
    spec = tmp_path / "shared.json"
    spec.write_text(json.dumps({
        "identity": {"vendor_id": "0x15b3", "device_id": "0x1235"},
        "bars": [{"index": 0, "kind": "mem32", "size": SIZE}],
        "regions": [{"kind": "memory", "name": "sram", "bar": 0, "offset": 0, "size": SIZE,
                     "shared": str(path)}],
    }))
    server = Server(spec, device)
    try:
        lines = Lines(server)
        bus = Bus(host)
        bus.cfg_write(0x10, BAR2)
        bus.cfg_write(0x04, 0x2)
        data, _ = _read_all(bus, BAR2 + 0x3000, 16)
        assert data == bytes(range(16))
        # Requests keep reading and writing every page while another process truncates.
        truncator = threading.Timer(0.05, truncate_elsewhere, (str(path),))
        truncator.start()
        statuses: list[tlp.Status] = []
        deadline = time.monotonic() + 20
        while tlp.Status.CA not in statuses[-4:] and time.monotonic() < deadline:
            for page in range(SIZE // 0x1000):
                addr = BAR2 + page * 0x1000 + 0x10
                bus.send(tlp.Tlp.mem_write(addr, b"\xee" * 4))
                bus.send(tlp.Tlp.mem_read(addr, 1, tag=bus.next_tag()))
                (c,) = bus.collect(1)
                statuses.append(c.status)
        truncator.join()
        assert server.proc.poll() is None, "the server died"
        ev = lines.wait("backing_lost")
        assert (ev["region"], ev["bar"], ev["offset"]) == ("sram", 0, 0)
        # From the loss on, every read of the region is answered Completer Abort (§2.3.1),
        # never zeros presented as its bytes; before it, Successful Completion.
        first_ca = statuses.index(tlp.Status.CA)
        assert set(statuses[:first_ca]) <= {tlp.Status.SC}
        assert set(statuses[first_ca:]) == {tlp.Status.CA}
        for page in range(SIZE // 0x1000):
            bus.send(tlp.Tlp.mem_read(BAR2 + page * 0x1000, 4, tag=bus.next_tag()))
            (c,) = bus.collect(1)
            assert c.status == tlp.Status.CA and not c.data
        assert path.stat().st_size == 0  # the lost pages never reach the file again
        server.proc.send_signal(signal.SIGTERM)
        stopped = lines.wait("stopped", timeout=30)  # the thread owns stdout: not communicate
        code = server.proc.wait(30)
        lines.close()
        assert server.proc.stderr is not None
        with server.proc.stderr:
            err = server.proc.stderr.read()
    finally:
        if server.proc.poll() is None:
            server.kill()
    assert code == 0, err
    assert stopped["backing_lost"] == ["sram"]
    assert stopped["ca"] >= 1 + SIZE // 0x1000
    assert "Traceback" not in err and "Bus error" not in err
    st = host.stats()
    assert st["errors"] == 0 and st["outstanding"] == 0, st["last_error"]


UNGUARDED = r"""
import mmap, os, signal, sys
from mlx5tlp import engine
def caught():  # SigCgt of /proc/self/status (proc(5)): a handler is installed for SIGBUS
    line = next(x for x in open("/proc/self/status") if x.startswith("SigCgt:"))
    return bool(int(line.split()[1], 16) >> (signal.SIGBUS - 1) & 1)
faulthandler = sys.flags.dev_mode or "faulthandler" in sys._xoptions
assert caught() == faulthandler
# A guarded region: the guard's handler is installed.
path, other = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDWR)
region = engine.MemoryRegion(0, 0, 0x4000, fd=fd, name="guarded")
assert region._core.guarded and caught()
print("guarded", flush=True)
if sys.argv[3] == "kill":
    os.kill(os.getpid(), signal.SIGBUS)  # sent, not a fault: not ours either
else:
    # A mapping nobody registered, truncated: the real fault a bug would be.
    ofd = os.open(other, os.O_RDWR)
    m = mmap.mmap(ofd, 0x4000)
    os.ftruncate(ofd, 0)
    m[0x3000]
print("survived", flush=True)
"""


@pytest.mark.parametrize("how, python_flags", [
    ("fault", []),                       # chained to the default action
    ("fault", ["-X", "faulthandler"]),   # chained to the handler installed before ours
    ("kill", []),                        # a SIGBUS sent with kill(2)
])
def test_a_sigbus_outside_guarded_ranges_still_kills(tmp_path: Path, how: str,
                                                     python_flags: list[str]) -> None:
    guarded = backing_file(tmp_path)
    other = tmp_path / "other.bin"
    other.write_bytes(bytes(SIZE))
    env = dict(os.environ)
    if "ASAN_OPTIONS" in env:
        # Under AddressSanitizer (tests/test_asan_bindings.py) ASan's SIGBUS handler would be
        # the previous one: chained to, it reports and exits 86. Without it the child dies
        # of the default action, as it does without ASan.
        env["ASAN_OPTIONS"] += ":handle_sigbus=0"
    out = subprocess.run([sys.executable, *python_flags, "-c", UNGUARDED, str(guarded),
                          str(other), how], capture_output=True, text=True, timeout=60, env=env)
    assert out.stdout.splitlines() == ["guarded"], out.stderr
    assert out.returncode == -signal.SIGBUS, (out.returncode, out.stderr)
    if python_flags:
        assert "Fatal Python error: Bus error" in out.stderr  # faulthandler ran: chained


SIM_FILES = r"""
import mmap, os, subprocess, sys
import mlx5tlp
from mlx5tlp import sim, tlp
name, path = sys.argv[1], sys.argv[2]

def attempt(what, fn):
    try:
        fn()
        print(what, "ok", flush=True)
    except mlx5tlp.Error as exc:
        print(what, exc.errno, str(exc).replace("\n", " "), flush=True)

ctx = mlx5tlp.open_device(name, backend="sim")
var = ctx.alloc_var(tlp=True)
gw = var.gateway(direct=True)  # the page mapped by the core (the bar file, guarded)
page = ctx.alloc_var(tlp=True).mmap(mmap.PROT_READ | mmap.PROT_WRITE)  # ... and by Python
page[8] = 1
host = sim.Host(name)
record = tlp.Tlp.completion(completer_id=0x0100, requester_id=0x0200, tag=1,
                            data=b"abcd").encode()
assert gw.write(record, timeout=1)
print("serving", flush=True)
subprocess.run([sys.executable, "-c", "import os, sys; [os.truncate(p, 0) for p in sys.argv[1:]]",
                os.path.join(path, "state"), os.path.join(path, "bar")], check=True)
# Lock-free paths run on zero pages instead of faulting; locked ones report the loss.
attempt("write", lambda: gw.write(record, timeout=0.1))
attempt("send", lambda: host.send_request(tlp.Tlp.mem_read(0x1000, 1, tag=1).encode()))
attempt("completions", lambda: host.completions(0.05))
attempt("python_page", lambda: print("page_byte", page[8], flush=True))
page.close()  # unguarded before the munmap
attempt("stats", lambda: sim.device_stats(name))
attempt("alloc_var", lambda: ctx.alloc_var(tlp=True))
print("alive", flush=True)
os._exit(0)  # the device is gone: nothing to close cleanly
"""


def test_the_software_devices_truncated_files_are_errors(sim_dir: str) -> None:
    """docs/sim.md "Devices and their files": the state and bar files live in a directory of
    this user's, so any of its processes can truncate them under every process that maps
    them. The device's own mappings and the core's mapping of a gateway page are guarded:
    lock-free accesses run on zero pages, locked operations fail with EIO naming the file."""
    name = f"t{os.getpid()}_sigbus"
    sim.create_device(name)
    path = os.path.join(sim_dir, name)
    try:
        out = subprocess.run([sys.executable, "-c", SIM_FILES, name, path],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, (out.returncode, out.stdout, out.stderr)
        lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
        assert out.stdout.splitlines()[0] == "serving" and "alive" in out.stdout, out.stdout
        for what in ("stats", "alloc_var"):
            assert lines[what].startswith(f"{errno.EIO} "), (what, lines[what])
        assert (lines["python_page"], lines["page_byte"]) == ("ok", "0")  # zero pages: no SIGBUS
        for what in ("stats", "alloc_var"):
            assert f"software device '{name}': its state file was truncated" in lines[what]
            assert "remove and re-create the device" in lines[what]
        # A process that opens it afterwards is refused as for any damaged state (EPROTO).
        with pytest.raises(mlx5tlp.Error) as exc:
            sim.device_stats(name)
        assert exc.value.errno == errno.EPROTO and "state" in str(exc.value)
    finally:
        import shutil

        shutil.rmtree(path, ignore_errors=True)
