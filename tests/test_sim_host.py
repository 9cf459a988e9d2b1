"""The device model: requests to the function, completions collected from gateway pages.

The gateway writer comes with the gateway; here records are written by hand in the software
device's documented page layout (docs/sim.md), which is what the model reads.
"""

from __future__ import annotations

import mmap
import os
import signal
import struct
import subprocess
import sys

import pytest

import mlx5tlp
from mlx5tlp import sim

DOORBELL, CONSUMER, SLOTS, SLOT = 0x00, 0x40, 0x80, 256


def mrd32(
    rid: int, tag: int, addr: int, length: int, first_be: int = 0xF, last_be: int = 0xF
) -> bytes:
    # Memory Read Request, 3DW header (Fmt 000, Type 0 0000).
    be = (last_be << 4) | first_be
    return struct.pack(">BBHHBBI", 0x00, 0, length & 0x3FF, rid, tag, be, addr)


def cfgrd0(rid: int, tag: int, dest: int, reg: int) -> bytes:
    # Configuration Read Type 0 (Fmt 000, Type 0 0100), length 1, first BE 0xF.
    return struct.pack(">BBHHBBHH", 0x04, 0, 1, rid, tag, 0x0F, dest, reg)


def cpld(
    cid: int, rid: int, tag: int, byte_count: int, lower: int, data: bytes, status: int = 0
) -> bytes:
    fmt_type = 0x4A if data else 0x0A
    length = len(data) // 4
    dw1 = (cid << 16) | (status << 13) | (byte_count & 0xFFF)
    return struct.pack(">BBHIHBB", fmt_type, 0, length, dw1, rid, tag, lower & 0x7F) + data


def write_records(page: mmap.mmap, records: list[bytes]) -> None:
    produced = struct.unpack_from("<Q", page, DOORBELL)[0]
    count = struct.unpack_from("<I", page, 0x10)[0]
    for rec in records:
        slot = SLOTS + (produced % count) * SLOT
        page[slot : slot + 8 + len(rec)] = struct.pack("<II", len(rec), 0) + rec
        produced += 1
    struct.pack_into("<Q", page, DOORBELL, produced)  # the doorbell: publish the batch


@pytest.fixture
def setup(ctx: mlx5tlp.Context, device: str):  # type: ignore[no-untyped-def]
    var = ctx.alloc_var(tlp=True)
    page = var.mmap(mmap.PROT_READ | mmap.PROT_WRITE)
    host = sim.Host(device)
    yield ctx, var, page, host
    host.close()
    page.close()


def test_requests_reach_the_function(setup) -> None:  # type: ignore[no-untyped-def]
    ctx, _var, _page, host = setup
    req = mrd32(0x0100, 7, 0x1000, 4)
    assert host.send_request(req, channel=3)
    assert sim.take_request(ctx, channel=0) is None
    assert sim.take_request(ctx, channel=3) == req
    assert sim.take_request(ctx, channel=3) is None
    with pytest.raises(ValueError):
        host.send_request(req, channel=8)
    with pytest.raises(ValueError):
        host.send_request(b"short")


def test_channel_back_pressure(setup) -> None:  # type: ignore[no-untyped-def]
    ctx, _var, _page, host = setup
    req = mrd32(0x0100, 1, 0x1000, 1)
    sent = 0
    while host.send_request(req, channel=1):
        sent += 1
        assert sent <= 64
    assert sent == 64
    assert sum(1 for _ in iter(lambda: sim.take_request(ctx, 1), None)) == 64


def test_split_read_completions_are_checked(setup) -> None:  # type: ignore[no-untyped-def]
    _ctx, var, page, host = setup
    # 256-byte read at 0x1000 (64 DW), answered in two 128-byte CplDs (RCB 64, MPS 128).
    host.send_request(mrd32(0x0100, 5, 0x1000, 64))
    data = bytes(range(256))
    write_records(page, [cpld(0x0200, 0x0100, 5, 256, 0x00, data[:128]),
                         cpld(0x0200, 0x0100, 5, 128, 0x80 & 0x7F, data[128:])])
    got = host.completion_records(timeout=1.0)
    assert [c.page_id for c in got] == [var.page_id] * 2
    assert [c.sequence for c in got] == [0, 1]
    assert got[0].tlp[12:] + got[1].tlp[12:] == data
    st = host.stats()
    assert (st["completions"], st["retired"], st["outstanding"], st["errors"]) == (2, 1, 0, 0)
    # The consumer index advanced: two credits returned to the writer.
    assert struct.unpack_from("<Q", page, CONSUMER)[0] == 2


def test_bad_completions_are_reported(setup) -> None:  # type: ignore[no-untyped-def]
    _ctx, _var, page, host = setup
    host.send_request(mrd32(0x0100, 9, 0x1004, 2, first_be=0xC, last_be=0x3))
    # Byte count must be 8 - 2 (first BE skips 2 bytes) - 2 (last BE ends 2 early) = 4.
    write_records(page, [cpld(0x0200, 0x0100, 9, 8, 0x06, bytes(8))])
    assert len(host.completions(timeout=1.0)) == 1
    st = host.stats()
    assert (st["errors"], st["unexpected"]) == (1, 0)
    assert st["last_error"] == "byte count 8, expected 4 remaining (tag 9)"
    write_records(page, [cpld(0x0200, 0x0100, 77, 4, 0, bytes(4))])  # nobody asked for tag 77
    assert len(host.completions(timeout=1.0)) == 1
    st = host.stats()
    assert (st["errors"], st["unexpected"]) == (2, 1)
    assert st["last_error"].startswith("unexpected completion: requester 0100 tag 77")


def test_config_read_and_unsupported_request(setup) -> None:  # type: ignore[no-untyped-def]
    _ctx, _var, page, host = setup
    host.send_request(cfgrd0(0x0000, 1, 0x0100, 0x10))
    host.send_request(mrd32(0x0000, 2, 0x2000, 1))
    write_records(page, [cpld(0x0100, 0x0000, 1, 4, 0, b"\x11\x22\x33\x44"),
                         cpld(0x0100, 0x0000, 2, 4, 0, b"", status=1)])  # UR, no data
    assert len(host.completions(timeout=1.0)) == 2
    st = host.stats()
    assert (st["errors"], st["retired"], st["status_ur"], st["outstanding"]) == (0, 2, 1, 0)


def test_torn_or_overrun_rings_are_detected(setup) -> None:  # type: ignore[no-untyped-def]
    _ctx, _var, page, host = setup
    struct.pack_into("<II", page, SLOTS, 4000, 0)  # impossible length in slot 0
    struct.pack_into("<Q", page, DOORBELL, 1)
    assert host.completions(timeout=0.2) == []
    assert host.stats()["bad_records"] == 1
    struct.pack_into("<Q", page, DOORBELL, 1 + 100)  # doorbell a hundred records ahead
    assert host.completions(timeout=0.2) == []
    assert host.stats()["bad_records"] == 2


def test_one_host_per_device(setup, device: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(mlx5tlp.Error) as exc:
        sim.Host(device)
    assert exc.value.errno == 16  # EBUSY
    _ctx, _var, _page, host = setup
    host.close()
    with pytest.raises(mlx5tlp.InvalidHandleError):
        host.stats()
    sim.Host(device).close()  # free again


# -- a hostile page: scribbled over from another process --------------------------------------

SCRIBBLER = """
import mmap, os, random, struct, sys
fd, off, length = (int(x) for x in sys.argv[1:4])
page = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=off)
random.seed(7)
for round in range(400):
    struct.pack_into("<I", page, 0x10, random.choice([0, 1, 0xFFFFFFFF, 3]))  # slot count
    struct.pack_into("<HH", page, 0x0C, 1, random.choice([0, 8, 0xFFF0]))    # slot size
    struct.pack_into("<I", page, 0x08, random.getrandbits(32))                # magic
    for _ in range(32):
        page[random.randrange(0x80, length)] = random.getrandbits(8)
    struct.pack_into("<I", page, 0x80 + (round % 15) * 256, random.choice([0, 4000, 2**31, 20]))
    struct.pack_into("<Q", page, 0x40, random.getrandbits(64))                # consumer
    struct.pack_into("<Q", page, 0x00, random.choice([random.getrandbits(64), round]))
"""


def test_scribbled_page_from_another_process(setup) -> None:  # type: ignore[no-untyped-def]
    ctx, var, page, host = setup
    args = [str(ctx.cmd_fd), str(var.mmap_off), str(var.length)]
    with subprocess.Popen([sys.executable, "-c", SCRIBBLER, *args], pass_fds=(ctx.cmd_fd,)) as p:
        while p.poll() is None:
            host.completion_records(timeout=0)  # the model reads while garbage is written
        assert p.wait(60) == 0
    host.completion_records(timeout=0)
    st = host.stats()
    assert st["bad_records"] > 0
    # The model survived and still hears a writer that starts over on the page.
    struct.pack_into("<I", page, 0x10, (4096 - 128) // 256)
    struct.pack_into("<Q", page, DOORBELL, struct.unpack_from("<Q", page, DOORBELL)[0] + 10**6)
    for _ in range(3):  # garbage left the model's count anywhere: it resynchronises to the
        host.completion_records(timeout=0)  # doorbell (ahead: at once; behind: once it stays)
    host.send_request(cfgrd0(0x0300, 1, 0x0100, 0x10))
    rec = cpld(0x0100, 0x0300, 1, 4, 0, b"\x01\x02\x03\x04")
    write_records(page, [rec])
    got = host.completion_records(timeout=5.0)
    assert [c.tlp for c in got] == [rec]
    assert host.stats()["retired"] >= 1


# -- delivered means delivered: flush, then free / exit / SIGKILL -----------------------------

WRITER = """
import os, signal, sys, time
sys.path.insert(0, {python_dir!r})
import mlx5tlp
from mlx5tlp import sim
device, how, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
ctx = mlx5tlp.open_device(device)
var = ctx.alloc_var(tlp=True)
gw = var.gateway()
done = 0
while done < n:
    req = sim.take_request(ctx, 0)
    if req is None:
        time.sleep(0.001)
        continue
    cpl = bytes([0x4A, 0, 0, 1, 0x01, 0x00, 0x00, 0x04, req[4], req[5], req[6], 0, 1, 2, 3, 4])
    assert gw.post(cpl, timeout=10)
    done += 1
assert gw.flush(timeout=10)  # written into the page: delivered, as far as the writer knows
if how == "free":
    gw.close()
    var.free()
print("flushed", flush=True)
if how == "sigkill":
    signal.pause()
"""


@pytest.mark.parametrize("how", ["free", "exit", "sigkill"])
def test_flushed_records_survive_their_writer(device: str, how: str) -> None:
    python_dir = os.path.dirname(os.path.dirname(os.path.abspath(mlx5tlp.__file__)))
    n = 12  # fewer than the page's 15 slots: all in the page before the model reads any
    with sim.Host(device) as host:
        for tag in range(n):
            assert host.send_request(cfgrd0(0x0400, tag, 0x0100, 0x10))
        code = WRITER.format(python_dir=python_dir)
        with subprocess.Popen([sys.executable, "-c", code, device, how, str(n)],
                              stdout=subprocess.PIPE, text=True) as proc:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "flushed\n"
            if how == "sigkill":
                proc.send_signal(signal.SIGKILL)
                assert proc.wait(60) == -signal.SIGKILL
            else:
                assert proc.wait(60) == 0
        # The writer's context is gone: its page is reclaimed but keeps the records.
        st = sim.device_stats(device)
        assert (st["contexts"], st["tlp_vars"], st["gw_pages_draining"]) == (0, 0, 1)
        got = host.completion_records(timeout=5.0)
        assert len(got) == n and len({c.tlp[10] for c in got}) == n
        assert host.completion_records(timeout=0.05) == []  # exactly once
        hs = host.stats()
        assert (hs["retired"], hs["unexpected"], hs["errors"], hs["outstanding"]) == (n, 0, 0, 0)
        st = sim.device_stats(device)
        assert (st["gw_pages_draining"], st["gw_pages_free"]) == (0, 8)  # drained: back in the pool


def test_new_host_discards_what_the_old_one_left(ctx: mlx5tlp.Context, device: str) -> None:
    var = ctx.alloc_var(tlp=True)
    with sim.Host(device) as host:
        host.send_request(cfgrd0(1, 1, 0x0100, 0x10))
        host.send_request(cfgrd0(1, 2, 0x0100, 0x10))
        with var.mmap(mmap.PROT_READ | mmap.PROT_WRITE) as page:
            write_records(page, [cpld(0x0100, 1, 1, 4, 0, bytes(4))] * 3)
        var.free()  # three records left for this host: the page drains
        assert sim.device_stats(device)["gw_pages_draining"] == 1
    with sim.Host(device) as host:  # e.g. the previous host process died
        st = host.stats()
        assert (st["stale_requests"], st["stale_completions"]) == (2, 3)
        assert st["epoch"] >= 2
        assert host.completions(timeout=0.05) == []
        assert sim.take_request(ctx, 0) is None
    dst = sim.device_stats(device)
    assert (dst["gw_pages_draining"], dst["gw_pages_free"]) == (0, 8)
    assert dst["stale_requests"] >= 2 and dst["stale_completions"] >= 3


def test_completion_timeout_is_a_deadline(setup) -> None:  # type: ignore[no-untyped-def]
    _ctx, _var, page, host = setup
    with pytest.raises(ValueError):
        host.completion_records(timeout=float("nan"))
    with pytest.raises(ValueError):
        host.completion_records(timeout=-1.0)
    host.send_request(cfgrd0(0x0500, 1, 0x0100, 0x10))
    write_records(page, [cpld(0x0100, 0x0500, 1, 4, 0, bytes(4))])
    assert len(host.completion_records(timeout=float("inf"))) == 1  # waits for the first one
