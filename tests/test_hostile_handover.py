"""Hostile tests of the handover and the engine's newest calls: bad timeouts, peers that hang
up or stall, closes racing blocked threads, damaged lease files. Real processes and sockets,
no mocks; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mlx5tlp
from handover_rig import EventProc, Proc, Rig, cfg_read, collect, private_control, stop
from mlx5tlp import engine, handover, share, sim
from mlx5tlp import function as fn
from mlx5tlp.handover.standby import connect
from mlx5tlp.handover.wire import _MAX_CLIENT_BYTES, Wire

BAD_TIMEOUTS = [float("nan"), -1.0, -1e300, float("-inf")]
# No limit: must not overflow select()/settimeout() (OverflowError above ~9.2e9 s).
NO_LIMIT = [float("inf"), 1e300, 1e10, 10**400]


def _spec() -> fn.FunctionSpec:
    return fn.FunctionSpec(
        identity=fn.Identity(vendor_id=0x15B3, device_id=0x1234, class_code=0x020000),
        bars=[fn.Bar(0, "mem32", 1 << 16), fn.Bar(2, "mem32", 1 << 14)],
        msix=fn.Msix(vectors=4, table_bar=2, table_offset=0x2000, pba_bar=2, pba_offset=0x3000),
    )


@pytest.fixture
def rig(tmp_path: Path, device: str) -> Iterator[Rig]:
    r = Rig(tmp_path, device, engine="python")
    yield r
    r.close()


@pytest.fixture
def private(tmp_path: Path) -> Path:
    d = tmp_path / "priv"
    d.mkdir(mode=0o700)
    return d


def _in_thread(fn_: Any, *args: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def body() -> None:
        try:
            out.append(fn_(*args))
        except BaseException as exc:  # reported to the test, not lost in the thread
            out.append(exc)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, out


# ---- the engine: close while another thread blocks in wait_first_answer ----


def test_close_wakes_a_thread_in_wait_first_answer(ctx: mlx5tlp.Context) -> None:
    """Before: close() destroyed the engine while the waiter slept on its futex word (a use
    after free; the waiter never returned). Now close() wakes it (0: no answer) and frees the
    engine only after the waiter left."""
    dev = engine.Device(ctx, _spec(), [engine.MemoryRegion(0, 0, 0x1000)])
    try:
        t, got = _in_thread(dev.wait_first_answer, None)
        time.sleep(0.05)
        assert t.is_alive()  # blocked: nothing was sent
        t0 = time.monotonic()
        dev.close()
        t.join(5.0)
        assert not t.is_alive(), "the waiter still sleeps on a closed device"
        assert got == [0] and time.monotonic() - t0 < 5.0
    finally:
        dev.close()
    with pytest.raises(mlx5tlp.InvalidHandleError):
        dev.wait_first_answer(0.0)


def _voluntary_switches() -> int:
    """This thread's voluntary context switches (each sleep or blocking wait is one)."""
    status = Path(f"/proc/self/task/{threading.get_native_id()}/status").read_text()
    return int(status.split("voluntary_ctxt_switches:")[1].split()[0])


def test_close_sleeps_until_the_last_share_is_dropped(ctx: mlx5tlp.Context,
                                                      tmp_path: Path) -> None:
    """Before: close() waited for a call still holding a share of the engine in a nap loop
    (10 us, then 1 ms: ~300 wake-ups in 0.3 s). Now it sleeps on a futex word the call that
    drops the last share wakes. The share here: trace_dump, blocked (without the GIL) in
    open() of a FIFO nobody reads — stop() does not wake it."""
    fifo = tmp_path / "trace.fifo"
    os.mkfifo(fifo)
    dev = engine.Device(ctx, _spec(), [engine.MemoryRegion(0, 0, 0x1000)])
    dump, dumped = _in_thread(dev.trace_dump, fifo)
    time.sleep(0.1)
    assert dump.is_alive()  # in open(), holding its share
    switches: list[int] = []

    def close() -> None:
        before = _voluntary_switches()
        dev.close()
        switches.append(_voluntary_switches() - before)

    closer = threading.Thread(target=close, daemon=True)
    closer.start()
    time.sleep(0.3)
    assert closer.is_alive(), "close() did not wait for the call holding a share"
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # the dump's open() returns
    try:
        closer.join(10)
        dump.join(10)
    finally:
        os.close(fd)
    assert not closer.is_alive() and not dump.is_alive()
    assert dumped == [0], dumped
    assert switches and switches[0] < 30, f"close() woke up {switches} times while it waited"
    assert dev.closed


def test_stop_wakes_a_thread_in_wait_first_answer(ctx: mlx5tlp.Context) -> None:
    with engine.Device(ctx, _spec(), [engine.MemoryRegion(0, 0, 0x1000)]) as dev:
        t, got = _in_thread(dev.wait_first_answer, 30.0)
        time.sleep(0.05)
        dev.stop()
        t.join(5.0)
        assert not t.is_alive() and got == [0]
        assert dev.wait_first_answer(None) == 0  # stopped: returns at once


@pytest.mark.parametrize("call", ["wait_first_answer", "pause", "drain_deferred"])
def test_engine_timeouts(ctx: mlx5tlp.Context, call: str) -> None:
    with engine.Device(ctx, _spec(), [engine.MemoryRegion(0, 0, 0x1000)]) as dev:
        if call == "drain_deferred":
            assert dev.pause(5.0)
        f = getattr(dev, call)
        for bad in BAD_TIMEOUTS:
            with pytest.raises(mlx5tlp.InvalidArgumentError, match=r"NaN|negative"):
                f(bad)
        if call == "wait_first_answer":
            assert f(-0.0) == 0 and f(0.0) == 0
        else:
            t0 = time.monotonic()
            assert f(-0.0) in (True, False) and time.monotonic() - t0 < 1.0  # try once
            assert f(1e300) is True and f(float("inf")) is True


# ---- timeouts of the Python side ----


def test_lease_timeouts(private: Path) -> None:
    holder = handover.Lease(str(private / "f.lease"))
    other = handover.Lease(str(private / "f.lease"))
    try:
        assert holder.acquire(0.0) == 1
        for bad in BAD_TIMEOUTS:
            # Before: NaN made the retry loop's deadline compare false forever (a hang).
            with pytest.raises(mlx5tlp.InvalidArgumentError, match="lease timeout"):
                other.acquire(bad)
            with pytest.raises(mlx5tlp.InvalidArgumentError, match="lease timeout"):
                other.reclaim(1, bad)
        for zero in (0.0, -0.0, 0):
            with pytest.raises(handover.LeaseHeldError):
                other.acquire(zero)
        for not_a_number in ("1", True, b"1"):
            with pytest.raises(mlx5tlp.InvalidArgumentError, match="number of seconds"):
                other.acquire(not_a_number)  # type: ignore[arg-type]
        # No limit: waits until the holder lets go (here, a release from another thread).
        threading.Timer(0.1, holder.release).start()
        t0 = time.monotonic()
        assert other.acquire(math.inf) == 2 and time.monotonic() - t0 < 5
        other.release()
        assert holder.reclaim(2, 1e300) == 2  # same process: the record is still "ours"
    finally:
        holder.close()
        other.close()


def test_connect_and_standby_timeouts(private: Path) -> None:
    path = str(private / "ctl")
    for bad in BAD_TIMEOUTS:
        # Before: connect() with NaN retried forever when nobody listened.
        with pytest.raises(mlx5tlp.InvalidArgumentError, match="connect timeout"):
            connect(path, bad)
        with pytest.raises(mlx5tlp.InvalidArgumentError, match="standby timeout"):
            handover.Standby(path, b"k" * 32, timeout=bad)
        with pytest.raises(mlx5tlp.InvalidArgumentError, match="connect timeout"):
            handover.request(path, b"k" * 32, "status", timeout=bad)
    with pytest.raises(handover.HandoverError) as exc:
        connect(path, -0.0)
    assert exc.value.errno == errno.ENOENT


def test_recv_fds_timeouts() -> None:
    a, b = socket.socketpair()
    with a, b:
        for bad in BAD_TIMEOUTS:
            with pytest.raises(ValueError, match=r"NaN|negative"):
                share.recv_fds(b, timeout=bad)
        for huge in NO_LIMIT:
            # Before: OverflowError from settimeout() (inf, 1e300) once a message began.
            share.send_fds(a, [], [b"x" * 10])
            fds, payloads, _ = share.recv_fds(b, timeout=huge)
            assert (fds, payloads) == ([], [b"x" * 10])
        share.send_fds(a, [], [b"y"])
        assert share.recv_fds(b, timeout=-0.0)[1] == [b"y"]


def test_standby_wait_timeouts(rig: Rig) -> None:
    p0 = rig.primary()
    sb = handover.Standby(rig.path, rig.key, timeout=math.inf)
    try:
        for bad in BAD_TIMEOUTS:
            with pytest.raises(mlx5tlp.InvalidArgumentError, match="wait timeout"):
                sb.wait(bad)
        assert sb.wait(-0.0) is None and sb.wait(0.0) is None
        # inf: no limit — before, select() raised OverflowError at once.
        t, got = _in_thread(sb.wait, math.inf)
        time.sleep(0.1)
        assert t.is_alive()
        stop(rig)  # the primary tells its standbys to shut down
        t.join(10)
        assert not t.is_alive() and got == [None], got
    finally:
        sb.close()
    assert p0.p.wait(30) == 0


def test_cli_handover_timeout_is_checked(rig: Rig) -> None:
    for bad in ("nan", "-1", "inf", "1e300"):
        r = subprocess.run([sys.executable, "-m", "mlx5tlp", "handover", rig.path, "--key-file",
                            str(rig.key_file), "--action", "status", "--timeout", bad],
                           env=rig.env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "--timeout" in r.stderr, (bad, r.stderr)


# ---- the control socket: peers that hang up, stall or send junk ----


def _operator(rig: Rig) -> tuple[socket.socket, Wire]:
    sock = connect(rig.path)
    wire, welcome = Wire.client(sock, rig.key, {"role": "operator", "pid": os.getpid()},
                                timeout=10)
    welcome.close_fds()
    return sock, wire


def _still_serves(rig: Rig, p0: Any, host: Any, tag: int) -> None:
    assert p0.p.poll() is None, p0.p.stderr.read() if p0.p.stderr else ""
    assert host.send_request(cfg_read(0, tag))
    assert len(collect(host, 1, timeout=10)) == 1
    st = handover.request(rig.path, rig.key, "status", timeout=10)
    assert st["pid"] == p0.pid


@pytest.mark.parametrize("what", ["status", "join", "unexpected"])
def test_peer_that_hangs_up_before_the_answer_does_not_kill_the_primary(rig: Rig,
                                                                        what: str) -> None:
    """Before: the primary's reply to a peer that had already closed raised BrokenPipeError
    out of Primary.run() — an operator killed after sending "status" ended the function."""
    with sim.Host(rig.device) as host:
        p0 = rig.primary()
        for tag in range(3):
            if what == "join":
                sock = connect(rig.path)
                wire, _ = Wire.client(sock, rig.key, {"role": "standby", "pid": os.getpid(),
                                                      "state_version": handover.STATE_VERSION},
                                      timeout=10)
                wire.send("join", {})
            else:
                sock, wire = _operator(rig)
                if what == "status":
                    wire.send("request", {"action": "status"})
                else:
                    wire.send("ready", {})  # not an operator's message: answered "error"
            sock.close()  # gone before the primary answers
            _still_serves(rig, p0, host, tag)
        stop(rig)
        assert p0.p.wait(30) == 0


def test_silent_and_junk_peers_do_not_stop_serving(rig: Rig) -> None:
    with sim.Host(rig.device) as host:
        p0 = rig.primary()
        silent = [connect(rig.path) for _ in range(20)]  # connect and never speak
        junk = connect(rig.path)
        junk.sendall(b"\xff" * 64)  # not a message: refused, dropped
        partial = connect(rig.path)
        partial.sendall(share.WIRE_MAGIC[:2])  # a header that never completes
        wrong_key = connect(rig.path)
        Wire(wrong_key, b"w" * 32, is_server=False).send("hello", {"role": "operator"})
        try:
            t0 = time.monotonic()
            for tag in range(5):
                _still_serves(rig, p0, host, tag)
            assert time.monotonic() - t0 < 15
            # The wrong key's refusal (the partial header's comes 2 s after its accept; the
            # junk's bad magic is a framing error, dropped without an event).
            assert "HMAC" in p0.wait_event("refused", error="HMAC")["error"]
            # The peer with the wrong key was hung up on.
            wrong_key.settimeout(5)
            assert wrong_key.recv(1) == b""
        finally:
            for s in [*silent, junk, partial, wrong_key]:
                s.close()
        t0 = time.monotonic()
        stop(rig)  # silent peers do not hold up the stop
        assert p0.p.wait(30) == 0 and time.monotonic() - t0 < 15


def _half_hello(key: bytes) -> bytes:
    """The first half of a correctly signed HELLO frame."""
    a, b = socket.socketpair()
    with a, b:
        Wire(a, key, is_server=False).send("hello", {"role": "operator", "pid": os.getpid()})
        frame = b.recv(65536)
    return frame[: len(frame) // 2]


def _stalling_peers(rig: Rig, n: int) -> list[socket.socket]:
    """`n` connections the primary has accepted (a status request made after them was
    answered: the listener accepts in order), each of which then sends half a HELLO and
    stalls — all readable in the primary's next poll round."""
    conns = [connect(rig.path) for _ in range(n)]
    handover.request(rig.path, rig.key, "status", timeout=10)
    half = _half_hello(rig.key)
    for c in conns:
        c.sendall(half)
        c.setblocking(False)
    return conns


def _hung_up(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False  # still connected, nothing to read
    except ConnectionResetError:
        return True  # closed with our bytes unread

def _answered_while_they_stall(rig: Rig, host: sim.Host, primary_pid: int,
                               stalled: list[socket.socket]) -> None:
    """20 requests and a status request answered while every stalled peer is still connected
    (an order, not a time), then every stalled peer dropped (within 15 s)."""
    for tag in range(20):
        assert host.send_request(cfg_read(0, tag))
    got: list[Any] = []
    end = time.monotonic() + 30
    while len(got) < 20 and time.monotonic() < end:
        got += host.completions(timeout=0.01)
    status = handover.request(rig.path, rig.key, "status", timeout=10)
    assert len(got) == 20 and status["pid"] == primary_pid
    alive = [not _hung_up(c) for c in stalled]
    assert all(alive), f"stalled peers dropped before the requests were answered: {alive}"
    end = time.monotonic() + 15
    while not all(_hung_up(c) for c in stalled):
        assert time.monotonic() < end, "the stalled peers are never dropped"
        time.sleep(0.05)

def _hands_over_and_serves(rig: Rig, host: sim.Host, successor: Proc) -> None:
    """An operator's planned handover goes to `successor`, which then answers a request."""
    out = handover.request(rig.path, rig.key, "handover", timeout=20)
    assert out["successor"] == successor.pid
    assert host.send_request(cfg_read(0, 99))
    assert len(collect(host, 1, timeout=10)) == 1




def test_peers_that_stall_mid_hello_do_not_hold_up_serving(rig: Rig) -> None:
    """Before: the primary read a HELLO with a blocking recv (0.5 s bound) as soon as its
    socket was readable, so ten peers that each sent half of one held the serving loop 5 s in
    one poll round, and each was dropped before a request sent meanwhile was answered. Now the
    HELLO is assembled from what has arrived (wire.Handshake) and a connection without a whole
    one 2 s after its accept is dropped: the requests are answered while the stalled peers
    are still connected (an order, not a time, is asserted), and a handover goes through
    while others stall."""
    with sim.Host(rig.device) as host:
        p0 = rig.primary()
        s1 = rig.standby("S1", p0)
        stalled = _stalling_peers(rig, 10)
        try:
            _answered_while_they_stall(rig, host, p0.pid, stalled)  # ...and then dropped
            ev = p0.wait_event("refused", error="no complete hello")
            assert ev["error"] == "no complete hello within 2 s", ev
            # Another operator's handover while peers stall.
            more = _stalling_peers(rig, 10)
            stalled += more
            _hands_over_and_serves(rig, host, s1)
        finally:
            for c in stalled:
                c.close()
        stop(rig)
        assert s1.p.wait(30) == 0


def _half_message(wire: Wire, kind: str, fields: dict[str, Any], fds: tuple[int, ...] = ()
                  ) -> bytes:
    """The first half of the next message `wire` would send (signed, bound to the peer's
    nonce and the next seq); `wire` counts it as sent. fds, if any, go with the half."""
    a, b = socket.socketpair()
    with a, b:
        real, wire.sock = wire.sock, a
        try:
            wire.send(kind, fields)
        finally:
            wire.sock = real
        frame = b.recv(1 << 20)
    half = frame[: len(frame) // 2]
    if fds:
        share_fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
        assert wire.sock.sendmsg([half[:1]], share_fds) == 1
        wire.sock.sendall(half[1:])
    else:
        wire.sock.sendall(half)
    return half


def _key_holders_stalled_mid_message(rig: Rig) -> list[socket.socket]:
    """Welcomed peers (operators and standbys: they hold the key) that each send half of a
    later message ("request", "join") and stall — all welcomed first, then all halves sent:
    readable in the primary's next poll round."""
    peers: list[tuple[Wire, str, dict[str, Any]]] = []
    for role, kind, fields in [("operator", "request", {"action": "status"}),
                               ("standby", "join", {}),
                               ("operator", "request", {"action": "handover"}),
                               ("standby", "join", {})]:
        wire, welcome = Wire.client(connect(rig.path), rig.key,
                                    {"role": role, "pid": os.getpid(),
                                     "state_version": handover.STATE_VERSION}, timeout=10)
        welcome.close_fds()
        peers.append((wire, kind, fields))
    for wire, kind, fields in peers:
        _half_message(wire, kind, fields)
        wire.sock.setblocking(False)
    return [w.sock for w, _, _ in peers]


def test_key_holders_that_stall_mid_message_do_not_hold_up_serving(rig: Rig) -> None:
    """Before: after its HELLO a peer's messages were read with a blocking recv (2 s bound,
    _STEP_TIMEOUT), so four key holders that each sent half of a "request" or "join" held
    the python engine's serving loop 8 s in one poll round, and each was dropped before a
    request sent meanwhile was answered. Now every message is assembled from what has arrived
    (Wire.step) and a peer whose message is not complete 2 s after its first byte is
    dropped: requests and a status request are answered while the stalled peers are still
    connected (an order, not a time, is asserted); then a planned handover goes through."""
    with sim.Host(rig.device) as host:
        p0 = rig.primary()
        s1 = rig.standby("S1", p0)
        stalled = _key_holders_stalled_mid_message(rig)
        try:
            _answered_while_they_stall(rig, host, p0.pid, stalled)
            ev = p0.wait_event("refused", error="no complete message")
            assert "stalled mid-message" in ev["error"], ev
            # The planned handover (its commit exchange is a bounded blocking wait, as before).
            _hands_over_and_serves(rig, host, s1)
        finally:
            for c in stalled:
                c.close()
        stop(rig)
        assert s1.p.wait(30) == 0


def test_partial_frames_with_fds_and_huge_announcements_cost_a_bounded_wait(rig: Rig) -> None:
    """Attacks on the non-blocking reads: key holders whose partial frame announces the most a
    client's message may carry (wire._MAX_CLIENT_BYTES) or carries fds, a HELLO cut short with
    fds, and a header announcing one byte more than the limit. Serving and status go on while they
    stall; the over-limit one is hung up on at its header; the others are dropped 2 s after
    their first byte, and every fd their partial frames brought is closed (the primary's
    /proc/<pid>/fd count comes back)."""
    with sim.Host(rig.device) as host:
        p0 = rig.primary()
        handover.request(rig.path, rig.key, "status", timeout=10)  # warm: lazy fds opened

        def fds() -> int:
            return len(os.listdir(f"/proc/{p0.pid}/fd"))

        def fewest() -> int:  # over 50 ms: the warm-up's connection may not be closed yet
            n = fds()
            for _ in range(5):
                time.sleep(0.01)
                n = min(n, fds())
            return n

        before = fewest()
        r, w = os.pipe()
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("2i", r, w))]
        head = share._PREFIX.pack(share.WIRE_MAGIC, share.WIRE_VERSION, 2, 1)
        conns: list[socket.socket] = []
        try:
            ops = [_operator(rig) for _ in range(3)]
            hello = connect(rig.path)
            handover.request(rig.path, rig.key, "status", timeout=10)  # `hello` accepted
            # The limit announced, 4 KiB sent, 2 fds with it.
            ops[0][0].sendmsg([head + struct.pack("<I", _MAX_CLIENT_BYTES)
                               + b"\0" * 4096], rights)
            # Half of a signed request, 2 fds with its first byte.
            _half_message(ops[1][1], "request", {"action": "status"}, fds=(r, w))
            # Over the limit: refused at the header (a framing error: no event).
            ops[2][0].sendall(share._PREFIX.pack(share.WIRE_MAGIC, share.WIRE_VERSION, 0, 1)
                              + struct.pack("<I", _MAX_CLIENT_BYTES + 1) + b"\0" * 64)
            # A HELLO cut short, with 2 fds (before any key is proved).
            half = _half_hello(rig.key)
            assert hello.sendmsg([half[:1]], rights) == 1
            hello.sendall(half[1:])
            stalled = [ops[0][0], ops[1][0], hello]
            conns = [*stalled, ops[2][0]]
            for c in conns:
                c.setblocking(False)
            for tag in range(10):
                assert host.send_request(cfg_read(0, tag))
            assert len(collect(host, 10, timeout=30)) == 10
            assert handover.request(rig.path, rig.key, "status", timeout=10)["pid"] == p0.pid
            alive = [not _hung_up(c) for c in stalled]
            assert all(alive), f"stalled peers dropped before the requests were answered: {alive}"
            end = time.monotonic() + 10
            while not _hung_up(ops[2][0]):
                assert time.monotonic() < end, "the over-limit header was not refused"
                time.sleep(0.01)
            assert fds() >= before + 6, (before, fds())  # 2 per partial frame, held meanwhile
            end = time.monotonic() + 15
            while not all(_hung_up(c) for c in stalled):
                assert time.monotonic() < end, "the stalled peers are never dropped"
                time.sleep(0.05)
            assert p0.wait_event("refused", error="no complete message")
            assert p0.wait_event("refused", error="no complete hello")
            end = time.monotonic() + 10
            while (after := fds()) > before and time.monotonic() < end:
                time.sleep(0.01)
            assert after <= before, f"fds of partial frames kept: {before} -> {after}"
            _still_serves(rig, p0, host, 99)
        finally:
            for c in conns:
                c.close()
            os.close(r)
            os.close(w)
        stop(rig)
        assert p0.p.wait(30) == 0


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_partial_hellos_of_many_peers_hold_little_memory(rig: Rig) -> None:
    """Before: the primary assembled a HELLO up to share.MAX_PAYLOAD_BYTES (1 MiB), so each of
    its 32 unwelcomed connections — no key needed — could make it hold ~1 MiB for 2 s (20
    peers pushing 512 KiB each: ~10 MiB more RSS). What a client sends a server is well under
    1 KiB: a HELLO announcing more than 64 KiB (wire._MAX_CLIENT_BYTES) is refused at its
    header (hung up on), and serving goes on."""
    with sim.Host(rig.device) as host:
        p0 = rig.primary()
        conns = [connect(rig.path) for _ in range(20)]
        handover.request(rig.path, rig.key, "status", timeout=10)  # all accepted
        rss0 = _rss_kib(p0.pid)
        head = share._PREFIX.pack(share.WIRE_MAGIC, share.WIRE_VERSION, 0, 1)
        try:
            for c in conns:
                c.settimeout(10)
                with contextlib.suppress(ConnectionError):  # refused mid-send: hung up on
                    c.sendall(head + struct.pack("<I", 1 << 20) + b"\0" * (512 << 10))
            handover.request(rig.path, rig.key, "status", timeout=10)  # a round after them
            grown = _rss_kib(p0.pid) - rss0
            assert grown < 4 << 10, f"the primary's RSS grew {grown} KiB for 20 partial HELLOs"
            for c in conns:
                c.setblocking(False)
            assert all(_hung_up(c) for c in conns)
            _still_serves(rig, p0, host, 1)
        finally:
            for c in conns:
                c.close()
        stop(rig)
        assert p0.p.wait(30) == 0


# ---- a key holder's messages with forged field types (the standby checks each field) ----

_GONE = object()  # the field is left out
_REGION = {"kind": "memory", "name": "m", "bar": 0, "offset": 0, "size": 4096}
FORGED = [
    # (message, field, value, the name the error must give)
    ("welcome", "state_version", "1", "state_version"),
    ("welcome", "state_version", _GONE, "state_version"),
    ("welcome", "generation", _GONE, "generation"),
    ("welcome", "generation", 0, "generation"),
    ("welcome", "pid", "12", "pid"),
    ("objects", "memory_size", "65536", "memory_size"),
    ("objects", "memory_size", -1, "memory_size"),
    ("objects", "bar_base", 1.5, "bar_base"),
    ("objects", "bar_base", _GONE, "bar_base"),
    ("objects", "channels", "01", "channels"),
    ("objects", "channels", [True], "channels"),
    ("objects", "channels", [64], "channels"),
    ("objects", "spec", 5, "spec"),
    ("objects", "spec", "{", "spec"),
    ("objects", "spec", '{"identity": 1}', "spec"),
    ("objects", "engine", "memory", "engine"),
    ("objects", "engine", [dict(_REGION, bar=9)], "engine[0].bar"),
    ("objects", "engine", [dict(_REGION, kind="other")], "engine[0].kind"),
    ("objects", "engine", [dict(_REGION, kind="registers")], "engine[0].registers"),
    ("objects", "engine", [dict(_REGION, registers=[["r", "0", 4, 0, "rw"]])],
     "engine[0].registers"),
    ("objects", "pages", "1", "pages"),  # with a well-formed engine layout, below
    ("commit", "generation", "1", "generation"),
    ("commit", "generation", _GONE, "generation"),
    ("commit", "t_stop", "now", "t_stop"),
    ("abort", "message", {"x": 1}, "message"),
]


def _forging_primary(path: str, key: bytes, node: Any, forged: tuple[Any, ...],
                     out: list[Any]) -> None:
    """Plays the primary with the key: real objects, one field of one message forged."""
    from mlx5tlp.handover.node import bind_listener

    message, name, value, _ = forged
    fields: dict[str, dict[str, Any]] = {
        "welcome": {"generation": 1, "state_version": handover.STATE_VERSION,
                    "digest": node.state.digest, "pid": os.getpid()},
        "objects": dict(node.describe(), generation=1),
        "commit": {"generation": 1, "t_stop": time.monotonic_ns()},
        "abort": {"message": "no"},
    }
    if name == "pages":
        fields["objects"]["engine"] = [_REGION]
    if value is _GONE:
        del fields[message][name]
    else:
        fields[message][name] = value
    listener = bind_listener(path)
    listener.settimeout(10)  # bind_listener's is non-blocking (the primary polls it)
    try:
        sock, _ = listener.accept()
        with sock:
            wire, hello = Wire.server(sock, key, timeout=10)
            hello.close_fds()
            wire.send("welcome", fields["welcome"])
            if message != "welcome":
                wire.recv(timeout=10).close_fds()  # join
                wire.send("objects", fields["objects"], payloads=node.exports(key),
                          fds=node.fds())
            if message in ("commit", "abort"):
                assert wire.recv(timeout=10).type == "ready"
                wire.send("go", {"generation": 1})
                assert wire.recv(timeout=10).type == "handover"
                wire.send(message, fields[message], payloads=[b"summary"])
            sock.settimeout(10)
            with contextlib.suppress(OSError):
                sock.recv(1)  # until the standby hangs up
        out.append("done")
    except BaseException as exc:
        out.append(exc)
    finally:
        listener.close()


@pytest.mark.parametrize("forged", FORGED, ids=lambda f: f"{f[0]}-{f[1]}-{f[2]!r}"[:60])
def test_standby_checks_every_field_of_a_signed_message(tmp_path: Path, device: str,
                                                        forged: tuple[Any, ...]) -> None:
    """Before: the standby trusted the field types of a correctly signed message, so a wrong
    type or a missing field escaped as KeyError/ValueError/TypeError/AttributeError — for the
    commit's t_stop after the standby had taken the lease. Now each is a
    HandoverProtocolError (EPROTO) naming the message and the field, raised before anything
    is taken."""
    from mlx5tlp.handover.node import Node

    message, _, _, named = forged
    with private_control(tmp_path) as (path, key, _env):
        node = Node.create(device=device, spec=handover.default_spec(), generation=1,
                           memory_size=1 << 16, channels=(0,))
        node.state.adopt(1)
        try:
            out: list[Any] = []
            t = threading.Thread(target=_forging_primary, args=(path, key, node, forged, out),
                                 daemon=True)
            t.start()
            sb = None
            try:
                with pytest.raises(handover.HandoverError) as exc:
                    sb = handover.Standby(path, key, timeout=10)
                    sb.wait(10)
            finally:
                if sb is not None:
                    sb.close()
            assert type(exc.value) is handover.HandoverProtocolError, repr(exc.value)
            assert exc.value.errno == errno.EPROTO
            assert f"{message!r} message: field {named!r}" in str(exc.value), str(exc.value)
            t.join(15)
            assert out == ["done"], out
        finally:
            node.close(free=True)


# ---- damaged lease files ----


def test_damaged_lease_files_are_refused(private: Path) -> None:
    path = private / "f.lease"
    path.write_bytes(b"garbage!" * 8)
    path.chmod(0o600)
    with handover.Lease(str(path)) as lease, pytest.raises(mlx5tlp.InvalidArgumentError) as exc:
        lease.acquire(0.0)
    assert exc.value.errno == errno.EPROTO and "damaged" in str(exc.value)
    with handover.Lease(str(path)) as a, handover.Lease(str(path)) as b:
        with pytest.raises(mlx5tlp.InvalidArgumentError):
            a.try_acquire()
        assert not a.held
        # a gave the lock back when it refused: b gets the same refusal, not EBUSY.
        with pytest.raises(mlx5tlp.InvalidArgumentError):
            b.try_acquire()
    # A truncated record (a lease that was held: its generation must not restart at 1).
    good = handover.Lease(str(private / "g.lease"))
    assert good.acquire(0.0) == 1
    good.release()
    good.close()
    raw = (private / "g.lease").read_bytes()
    (private / "g.lease").write_bytes(raw[:20])
    with handover.Lease(str(private / "g.lease")) as lease, \
            pytest.raises(mlx5tlp.InvalidArgumentError) as exc:
        lease.acquire(0.0)
    assert exc.value.errno == errno.EPROTO and "20 bytes" in str(exc.value)


def test_lease_file_symlink_and_foreign_modes_are_refused(private: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    (private / "s.lease").symlink_to(target)
    with pytest.raises(mlx5tlp.InvalidArgumentError) as exc:
        handover.Lease(str(private / "s.lease"))
    assert exc.value.errno == errno.ELOOP
    (private / "w.lease").write_bytes(b"")
    (private / "w.lease").chmod(0o666)
    with pytest.raises(mlx5tlp.InvalidArgumentError, match="private regular file"):
        handover.Lease(str(private / "w.lease"))
    os.mkfifo(private / "p.lease", 0o600)
    with pytest.raises(mlx5tlp.InvalidArgumentError, match="private regular file"):
        handover.Lease(str(private / "p.lease"))
    os.mkdir(private / "d.lease", 0o700)
    with pytest.raises(mlx5tlp.InvalidArgumentError):
        handover.Lease(str(private / "d.lease"))


def test_lease_record_of_another_living_successor(private: Path) -> None:
    """A record naming a living successor that is not us: we do not take the lease."""
    path = private / "f.lease"
    with handover.Lease(str(path)) as lease:
        assert lease.acquire(0.0) == 1
        lease.release(successor=1)  # pid 1 lives (init)
        with pytest.raises(handover.LeaseHeldError, match="handing over to pid 1"):
            lease.acquire(0.05)
    raw = bytearray(path.read_bytes())
    struct.pack_into("<I", raw, 20, 0)  # no successor
    path.write_bytes(bytes(raw))
    with handover.Lease(str(path)) as lease:
        assert lease.acquire(0.0) == 2


# ---- descriptors: many connections, fd numbers past 1024, RLIMIT_NOFILE ----


LOW_NOFILE = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, {limit}))
from mlx5tlp.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("flood", ["idle", "out-of-descriptors"])
def test_a_connection_flood_does_not_stop_the_primary(rig: Rig, flood: str) -> None:
    """idle: 1100 connections that never speak. Before: select() in the primary's loop raised
    ValueError for an fd >= 1024 (1021 idle connections ended run()); now poll(), and at most
    32 connections that never said hello are kept (the oldest are hung up on).

    out-of-descriptors: 60 connections to a primary limited to 48 fds. accept() failing with
    EMFILE ended run(); now it is reported (`refused`), the oldest silent connection is
    dropped to make room, and the primary serves on."""
    low = flood == "out-of-descriptors"
    with sim.Host(rig.device) as host:
        if low:
            argv = [sys.executable, "-c", LOW_NOFILE.format(limit=48), "serve", "--control",
                    rig.path, "--key-file", str(rig.key_file), "--device", rig.device,
                    "--events", "--engine", rig.engine]
            p0 = EventProc("P0", argv, rig.env)
            rig.procs.append(p0)  # type: ignore[arg-type]
            p0.wait_event("serving")
        else:
            p0 = rig.primary()
        conns: list[socket.socket] = []
        try:
            for _ in range(60 if low else 1100):  # more than the primary's descriptors
                conns.append(connect(rig.path, 10.0))
            if low:
                ev = p0.wait_event("refused", error="cannot accept a connection")
                assert "Too many open files" in ev["error"] or "EMFILE" in ev["error"], ev
                for c in conns[:40]:
                    c.close()
            else:
                # The primary keeps only the newest silent ones: the oldest see EOF.
                conns[0].settimeout(10)
                assert conns[0].recv(1) == b""
                fds = len(os.listdir(f"/proc/{p0.pid}/fd"))
                assert fds < 200, f"the primary holds {fds} fds"
            _still_serves(rig, p0, host, 1)
        finally:
            for c in conns:
                c.close()
        stop(rig)
        assert p0.p.wait(30) == 0


STANDBY_LOW_NOFILE = """
import os, resource, sys
from mlx5tlp import handover
# Room for the interpreter and the control socket, not for the objects message's fds.
used = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (used + 2, used + 2))
try:
    handover.Standby({path!r}, {key!r}, timeout=10)
except Exception as exc:
    print(type(exc).__name__, exc)
    sys.exit(3)
sys.exit(0)
"""


def test_standby_out_of_descriptors_is_refused_clearly(rig: Rig) -> None:
    with sim.Host(rig.device) as host:
        p0 = rig.primary()
        code = STANDBY_LOW_NOFILE.format(path=rig.path, key=rig.key)
        r = subprocess.run([sys.executable, "-c", code], env=rig.env, timeout=60,
                           capture_output=True, text=True)
        assert r.returncode == 3, (r.stdout, r.stderr)
        assert "RLIMIT_NOFILE" in r.stdout or "Too many open files" in r.stdout, r.stdout
        _still_serves(rig, p0, host, 1)
        stop(rig)
        assert p0.p.wait(30) == 0


# ---- close while another thread blocks ----


def test_standby_close_wakes_a_thread_in_wait(rig: Rig) -> None:
    """Before: close() closed the socket and pidfd under a wait() in another thread, which
    slept on (poll is not woken by a close) and, once the primary stopped, failed with an
    AttributeError on the torn-down wire. Now close() wakes it (None) and waits for it."""
    p0 = rig.primary()
    sb = handover.Standby(rig.path, rig.key)
    t, got = _in_thread(sb.wait, None)
    time.sleep(0.1)
    assert t.is_alive()
    with pytest.raises(handover.HandoverError) as exc:
        sb.wait(0.0)  # one waiter at a time
    assert exc.value.errno == errno.EBUSY
    t0 = time.monotonic()
    sb.close()
    t.join(5)
    assert not t.is_alive() and got == [None] and time.monotonic() - t0 < 5
    with pytest.raises(mlx5tlp.InvalidHandleError):
        sb.wait(0.0)
    sb.close()  # idempotent
    # The primary is unaffected and still sees no ready standby.
    assert handover.request(rig.path, rig.key, "status", timeout=10)["standbys"] == 0
    stop(rig)
    assert p0.p.wait(30) == 0


@pytest.mark.parametrize("engine_kind", ["python", "native"])
def test_primary_close_while_run_serves_in_another_thread(private: Path, device: str,
                                                          engine_kind: str) -> None:
    """Before: close() freed the objects under run(), which then failed with EBADF (python)
    or a ValueError for fd -1 (native). Now close() stops run() and waits for it."""
    p = handover.Primary.create(str(private / "ctl"), b"k" * 32, device=device,
                                engine=engine_kind)
    t, got = _in_thread(p.run)
    time.sleep(0.2)
    assert t.is_alive()
    with pytest.raises(handover.HandoverError) as exc:
        p.run(max_seconds=0.01)  # one runner at a time
    assert exc.value.errno == errno.EBUSY
    t0 = time.monotonic()
    assert p.close() == "freed"
    t.join(5)
    assert not t.is_alive() and got == ["stopped"], got
    assert time.monotonic() - t0 < 5
    assert p.close() is None  # idempotent
    with pytest.raises(mlx5tlp.InvalidHandleError):
        p.run()
    assert not (private / "ctl").exists()


def test_fds_sent_to_the_primary_are_not_kept(rig: Rig) -> None:
    """fds on a HELLO (signed or not), or more than a control message may carry: the primary
    closes what the kernel gave it and keeps serving."""
    p0 = rig.primary()
    handover.request(rig.path, rig.key, "status", timeout=10)  # warm: lazy fds opened

    def fds() -> int:
        return len(os.listdir(f"/proc/{p0.pid}/fd"))

    # The fewest over 50 ms: the warm-up's connection may not be closed yet.
    before = fds()
    for _ in range(5):
        time.sleep(0.01)
        before = min(before, fds())
    r, w = os.pipe()
    try:
        for n in (1, 8, 9, 200):
            s = connect(rig.path)
            share.send_fds(s, [r] * n, [b"\x00" * 40])  # unsigned junk with n fds
            s.close()
            s = connect(rig.path)
            Wire(s, rig.key, is_server=False).send("hello", {"role": "operator"},
                                                   fds=[w] * min(n, 8))
            s.settimeout(10)
            s.recv(65536)  # welcomed (the fds were closed)
            s.close()
        st = handover.request(rig.path, rig.key, "status", timeout=10)
        assert st["pid"] == p0.pid
        # The primary closes an operator's connection when it reads its EOF, a poll after the
        # reply: look until the count is back (bounded), not once.
        end = time.monotonic() + 10
        while (after := fds()) > before and time.monotonic() < end:
            time.sleep(0.01)
        assert after <= before, (before, after)
    finally:
        os.close(r)
        os.close(w)
    stop(rig)
    assert p0.p.wait(30) == 0


def test_sigterm_ends_a_standby(rig: Rig) -> None:
    """Before: `mlx5tlp serve --standby` ignored SIGTERM (the handler only stopped a primary)
    and had to be SIGKILLed. Now it ends its wait and exits 0; the primary serves on."""
    import signal

    with sim.Host(rig.device) as host:
        p0 = rig.primary()
        s1 = rig.standby("S1", p0)
        os.kill(s1.pid, signal.SIGTERM)
        assert s1.p.wait(10) == 0
        _still_serves(rig, p0, host, 1)
        assert handover.request(rig.path, rig.key, "status", timeout=10)["standbys"] == 0
        stop(rig)
        assert p0.p.wait(30) == 0


def test_standby_interrupt(rig: Rig) -> None:
    p0 = rig.primary()
    sb = handover.Standby(rig.path, rig.key)
    try:
        sb.interrupt()
        assert sb.wait(None) is None  # at once: the interrupt came first
        t, got = _in_thread(sb.wait, 30.0)
        time.sleep(0.1)
        assert t.is_alive()  # consumed: this wait waits
        sb.interrupt()
        t.join(5)
        assert not t.is_alive() and got == [None]
    finally:
        sb.close()
    stop(rig)
    assert p0.p.wait(30) == 0


def test_hostile_message_bodies_do_not_end_the_primary(rig: Rig) -> None:
    """Before: the body's JSON was parsed before its HMAC was checked, and a deeply nested one
    (no key needed) raised RecursionError out of run(); a signed "error" whose errno was not
    an int raised ValueError the same way."""
    with sim.Host(rig.device) as host:
        p0 = rig.primary()
        deep = b"[" * 20_000 + b"]" * 20_000  # past any recursion limit; fits a socket buffer
        for body in (deep, b'{"t":"hello","nonce":' + deep + b"}", b"\xff\xfe", b"{}"):
            s = connect(rig.path)
            share.send_fds(s, [], [os.urandom(32) + body])  # any MAC: refused before parsing
            s.settimeout(10)
            assert s.recv(1) == b""  # hung up on
            s.close()
        ev = p0.wait_event("refused", error="HMAC")
        assert "failed its HMAC check" in ev["error"], ev
        for code in ("junk", [1], 10**30, -5, True, None):
            s, wire = _operator(rig)
            wire.send("error", {"errno": code, "message": "hostile"})
            s.settimeout(10)
            assert s.recv(1) == b""  # refused and dropped
            s.close()
        # A signed body that is deeply nested JSON: malformed, not a RecursionError.
        a, b = socket.socketpair()
        with a, b:
            client = Wire(a, rig.key, is_server=False)
            client.send("hello", {})
            srv, _ = Wire.server(b, rig.key, timeout=5)
            mac_body = deep
            from mlx5tlp.handover import wire as wire_mod

            mac = wire_mod._mac(rig.key, b"C>S", srv.nonce, 1, [mac_body])
            share.send_fds(a, [], [mac + mac_body])
            with pytest.raises(handover.AuthenticationError, match="malformed"):
                srv.recv(timeout=5)
        _still_serves(rig, p0, host, 1)
        stop(rig)
        assert p0.p.wait(30) == 0


def test_control_path_too_long_for_a_unix_socket(private: Path, device: str) -> None:
    """Before: a bare OSError("AF_UNIX path too long") from bind()/connect()."""
    path = str(private / ("c" * 120))
    with pytest.raises(mlx5tlp.InvalidArgumentError) as exc:
        handover.Primary.create(path, b"k" * 32, device=device, engine="python")
    assert exc.value.errno == errno.ENAMETOOLONG and "at most" in str(exc.value)
    assert not os.path.exists(path + ".lease")  # refused before anything was taken
    for make in (lambda: handover.Standby(path, b"k" * 32, timeout=0.1),
                 lambda: handover.request(path, b"k" * 32, "status", timeout=0.1)):
        with pytest.raises(mlx5tlp.InvalidArgumentError) as exc:
            make()
        assert exc.value.errno == errno.ENAMETOOLONG
    # Just short enough for connect() but not for the listener's temporary name.
    room = 107 - len(os.fsencode(str(private))) - 1
    edge = str(private / ("e" * room))
    assert len(os.fsencode(edge)) == 107
    with pytest.raises(mlx5tlp.InvalidArgumentError, match="at most"):
        handover.Primary.create(edge, b"k" * 32, device=device, engine="native")
    with pytest.raises(handover.HandoverError):  # fits: nobody listens
        connect(edge, 0.0)


def test_concurrent_handover_requests_and_a_standby_that_vanishes(rig: Rig) -> None:
    """Before: a second operator's handover request replaced the first (who never heard how
    its handover went), and a standby gone after "go" left the operator waiting for its whole
    timeout. Now the second is refused (EBUSY) and the first told at once (ECANCELED)."""
    with sim.Host(rig.device) as host:
        p0 = rig.primary()
        sock = connect(rig.path)
        wire, _ = Wire.client(sock, rig.key, {"role": "standby", "pid": os.getpid(),
                                               "state_version": handover.STATE_VERSION},
                              timeout=10)
        wire.send("join", {})
        wire.recv(timeout=10).close_fds()
        wire.send("ready", {})
        p0.wait_event("standby")
        t, got = _in_thread(lambda: handover.request(rig.path, rig.key, "handover",
                                                     timeout=20))
        assert wire.recv(timeout=10).type == "go"  # the primary told us; we do not ask
        with pytest.raises(handover.HandoverError) as exc:
            handover.request(rig.path, rig.key, "handover", timeout=10)
        assert exc.value.errno == errno.EBUSY and "in progress" in str(exc.value)
        t0 = time.monotonic()
        sock.close()  # the standby vanishes before asking
        t.join(15)
        assert not t.is_alive() and time.monotonic() - t0 < 5
        assert isinstance(got[0], handover.HandoverError), got
        assert got[0].errno == errno.ECANCELED and "went away" in str(got[0])
        _still_serves(rig, p0, host, 1)
        stop(rig)
        assert p0.p.wait(30) == 0


# ---- the one poll(2) wrapper (handover/_poll.py) ----


def test_poller_timeouts() -> None:
    from mlx5tlp.handover._poll import Poller, readable

    a, b = socket.socketpair()
    with a, b:
        p = Poller([b])
        for bad in BAD_TIMEOUTS:
            with pytest.raises(mlx5tlp.InvalidArgumentError, match="poll timeout"):
                p.wait(bad)
        assert p.wait(0.0) == [] and p.wait(-0.0) == [] and p.wait(1e-4) == []
        a.send(b"x")
        for huge in [*NO_LIMIT, None]:
            # Ready at once; no OverflowError from poll()'s C int of milliseconds.
            assert [fd for fd, _ in p.wait(huge)] == [b.fileno()]  # type: ignore[arg-type]
        assert readable([b], 1e300) == {b.fileno()}
        p.remove(b)
        p.remove(b)  # not watched: a no-op
        assert p.wait(1e-3) == []


def test_primary_poll_registers_each_connection_once(private: Path, device: str) -> None:
    """Before: every look of the serving loop (up to one per 16 requests) built a new poll
    object and a dict of every connection. Now both are kept: a look with 30 idle
    connections (fewer than the 32 silent ones
    kept) allocates next to nothing (traced peak, not a time)."""
    import tracemalloc

    p = handover.Primary.create(str(private / "ctl"), b"k" * 32, device=device,
                                engine="python")
    conns: list[socket.socket] = []
    try:
        end = time.monotonic() + 10
        for _ in range(30):
            # One at a time: nobody runs the loop, and connect() blocks on a full backlog.
            conns.append(connect(str(private / "ctl")))
            while len(p.peers) < len(conns):  # one accept per look
                assert time.monotonic() < end
                p._poll(0.0)
        p._poll(0.0)
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            for _ in range(200):
                p._poll(0.0)
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        assert peak < 1024, f"a look at 30 idle connections allocated up to {peak} bytes"
        assert len(p.peers) == 30
    finally:
        for c in conns:
            c.close()
        p.close()
