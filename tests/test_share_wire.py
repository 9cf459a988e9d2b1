"""Tests of the fd-passing wire layer (mlx5tlp.share) with plain fds and fake importers."""

from __future__ import annotations

import array
import errno
import multiprocessing
import os
import socket
import struct
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mlx5tlp import share
from mlx5tlp.errors import Error
from mlx5tlp.share import PeerCredentials, ProtocolError, recv_fds, send_fds


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def new_file(content: bytes = b"") -> int:
    """An anonymous file (memfd when available) containing ``content``."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("mlx5tlp-test", os.MFD_CLOEXEC)
    else:  # pragma: no cover
        fd, path = tempfile.mkstemp()
        os.unlink(path)
    os.write(fd, content)
    return fd


def same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = share.socketpair()
    with a, b:
        yield a, b


def raw_message(nfds: int, lengths: list[int], *, magic: bytes = share.WIRE_MAGIC) -> bytes:
    return struct.pack("<8sHHI", magic, 1, nfds, len(lengths)) + b"".join(
        struct.pack("<I", n) for n in lengths
    )


def send_raw(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([data], anc)


# --- in-process ---------------------------------------------------------------------------------


def test_round_trip_in_process(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    f1, f2 = new_file(b"one"), new_file(b"two")
    try:
        send_fds(a, [f1, f2], [b"alpha", b"", b"\x00" * 1000])
        fds, payloads, creds = recv_fds(b, timeout=5)
        try:
            assert payloads == [b"alpha", b"", b"\x00" * 1000]
            assert creds == PeerCredentials(pid=os.getpid(), uid=os.getuid(), gid=os.getgid())
            assert len(fds) == 2
            assert same_file(fds[0], f1) and same_file(fds[1], f2)
            assert fds[0] not in (f1, f2)
            assert not os.get_inheritable(fds[0])  # close-on-exec
            assert os.pread(fds[1], 3, 0) == b"two"
            os.pwrite(fds[0], b"ONE", 0)
            assert os.pread(f1, 3, 0) == b"ONE"
        finally:
            close_all(fds)
    finally:
        close_all([f1, f2])


def test_no_fds_and_no_payloads(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    send_fds(a, [], [])
    assert recv_fds(b, timeout=5)[:2] == ([], [])


def test_back_to_back_messages_stay_framed(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    f = new_file()
    try:
        for i in range(5):
            send_fds(a, [f] * (i % 3), [bytes([i]) * i, b"x"])
        for i in range(5):
            fds, payloads, _ = recv_fds(b, timeout=5)
            assert payloads == [bytes([i]) * i, b"x"]
            assert len(fds) == i % 3
            close_all(fds)
    finally:
        os.close(f)


def test_large_payload_partial_reads(pair: tuple[socket.socket, socket.socket]) -> None:
    """A message larger than the socket buffer arrives in many pieces."""
    a, b = pair
    big = os.urandom(share.MAX_PAYLOAD_BYTES // 2)
    f = new_file()
    t = threading.Thread(target=send_fds, args=(a, [f], [big, big[:100]]))
    t.start()
    try:
        fds, payloads, _ = recv_fds(b, timeout=10)
        close_all(fds)
        assert payloads == [big, big[:100]]
    finally:
        t.join()
        os.close(f)


# --- refusals and fd hygiene -------------------------------------------------------------------


def test_credentials_refused_without_leak(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    f = new_file()
    try:
        send_fds(a, [f, f, f], [b"x"])
        before = fd_count()
        with pytest.raises(PermissionError, match=f"peer uid {os.getuid()}"):
            recv_fds(b, allow_uids=set(), timeout=5)
        assert fd_count() == before
    finally:
        os.close(f)


def test_allow_uids_widens(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    send_fds(a, [], [b"ok"])
    assert recv_fds(b, allow_uids={12345, os.getuid()}, timeout=5)[1] == [b"ok"]


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (raw_message(2, [3], magic=b"NOTMAGIC") + b"abc", "bad message magic"),
        (struct.pack("<8sHHI", share.WIRE_MAGIC, 9, 2, 0), "unsupported message version 9"),
        (raw_message(1, [3]) + b"abc", "declares 1 fds but 2 arrived"),
        (raw_message(3, [3]) + b"abc", "declares 3 fds but 2 arrived"),
        (raw_message(2, [0] * (share.MAX_PAYLOADS + 1)), "payloads, at most"),
        (raw_message(2, [share.MAX_PAYLOAD_BYTES, 1]), "payload bytes, at most"),
        (raw_message(40, []), "more than max_fds"),
    ],
    ids=["magic", "version", "fewer-fds", "more-fds", "npayloads", "nbytes", "nfds"],
)
def test_garbled_framing_closes_fds(
    pair: tuple[socket.socket, socket.socket], data: bytes, fragment: str
) -> None:
    a, b = pair
    f = new_file()
    try:
        before = fd_count()
        send_raw(a, data, [f, f])
        with pytest.raises(ProtocolError, match=fragment):
            recv_fds(b, timeout=5)
        assert fd_count() == before
    finally:
        os.close(f)


@pytest.mark.parametrize("cut", [0, 5, 16, 19, 20, 25])
def test_truncated_message_closes_fds(cut: int) -> None:
    a, b = share.socketpair()
    f = new_file()
    with b:
        try:
            before = fd_count()
            msg = raw_message(1, [4, 6]) + b"abcdefghij"
            with a:
                if cut:
                    send_raw(a, msg[:cut], [f])
            with pytest.raises(ProtocolError, match="closed the connection"):
                recv_fds(b, timeout=5)
            assert fd_count() == before - 1  # the sender's socket is gone, nothing leaked
        finally:
            os.close(f)


def test_timeout_closes_fds(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    b.settimeout(7.0)
    with pytest.raises(TimeoutError):
        recv_fds(b, timeout=0.1)
    assert b.gettimeout() == 7.0  # restored
    f = new_file()
    try:
        before = fd_count()
        send_raw(a, raw_message(1, [10]) + b"abc", [f])  # 7 bytes never come
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="payload"):
            recv_fds(b, timeout=0.2)
        assert time.monotonic() - t0 < 3
        assert fd_count() == before
    finally:
        os.close(f)


def test_too_many_fds_ctrunc(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    f = new_file()
    try:
        before = fd_count()
        send_fds(a, [f] * 5, [b"x"])
        with pytest.raises(ProtocolError, match=r"more (fds )?than max_fds=2"):
            recv_fds(b, max_fds=2, timeout=5)
        assert fd_count() == before
        send_fds(a, [f], [b"y"])  # max_fds=0 refuses any fd
        with pytest.raises(ProtocolError):
            recv_fds(b, max_fds=0, timeout=5)
        assert fd_count() == before
    finally:
        os.close(f)


def test_non_unix_socket_refused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        with pytest.raises(ValueError, match="AF_UNIX"):
            send_fds(s, [], [])
        with pytest.raises(ValueError, match="AF_UNIX"):
            recv_fds(s)
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s,
        pytest.raises(ValueError, match="SOCK_STREAM"),
    ):
        recv_fds(s)
    with pytest.raises(TypeError):
        recv_fds(0)  # type: ignore[arg-type]


def test_send_argument_checks(pair: tuple[socket.socket, socket.socket]) -> None:
    a, _ = pair
    with pytest.raises(ValueError):
        send_fds(a, [-1], [])
    with pytest.raises(TypeError):
        send_fds(a, [], ["text"])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        send_fds(a, [], [b""] * (share.MAX_PAYLOADS + 1))
    with pytest.raises(ValueError):
        recv_fds(a, max_fds=-1)


# --- other processes ---------------------------------------------------------------------------


def _spawn_child(path: str) -> None:
    """Child: connect, send a memfd with content, wait for the parent's write, check it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        fd = new_file(b"from child")
        st = os.fstat(fd)
        send_fds(s, [fd], [struct.pack("<QQ", st.st_dev, st.st_ino)])
        assert s.recv(1) == b"w"
        ok = os.pread(fd, 11, 0) == b"from parent"
        os.close(fd)
        s.sendall(b"1" if ok else b"0")


def test_to_spawned_process(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    ctx = multiprocessing.get_context("spawn")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(1)
        proc = ctx.Process(target=_spawn_child, args=(path,))
        proc.start()
        try:
            server.settimeout(60)
            conn, _ = server.accept()
            with conn:
                fds, payloads, creds = recv_fds(conn, timeout=60)
                try:
                    assert creds.pid == proc.pid and creds.uid == os.getuid()
                    st = os.fstat(fds[0])
                    assert struct.unpack("<QQ", payloads[0]) == (st.st_dev, st.st_ino)
                    assert os.pread(fds[0], 10, 0) == b"from child"
                    os.pwrite(fds[0], b"from parent", 0)
                finally:
                    close_all(fds)
                conn.sendall(b"w")
                conn.settimeout(60)
                assert conn.recv(1) == b"1"
        finally:
            proc.join(60)
            code = proc.exitcode
            proc.close()
    assert code == 0


def test_to_forked_process() -> None:
    a, b = share.socketpair()
    f = new_file(b"parent data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork in a threaded process
        pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            a.close()
            fds, payloads, _ = recv_fds(b, timeout=30)
            if payloads == [b"hello"] and os.pread(fds[0], 11, 0) == b"parent data":
                os.pwrite(fds[0], b"CHILD", 0)
                st = os.fstat(fds[0])
                send_fds(b, [], [struct.pack("<QQ", st.st_dev, st.st_ino)])
                code = 0
        finally:
            os._exit(code)
    try:
        with b:
            pass
        with a:
            send_fds(a, [f], [b"hello"])
            _, payloads, _ = recv_fds(a, timeout=30)
        st = os.fstat(f)
        assert struct.unpack("<QQ", payloads[0]) == (st.st_dev, st.st_ino)
        assert os.pread(f, 11, 0) == b"CHILDt data"
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(f)
    assert os.waitstatus_to_exitcode(status) == 0


# --- high-level send/recv with fakes -----------------------------------------------------------


class FakeObj:
    def __init__(self, name: str) -> None:
        self.name = name
        self.keys: list[bytes | None] = []

    def export(self, key: bytes | None = None) -> bytes:
        self.keys.append(key)
        return f"blob:{self.name}".encode()


class FakeCtx:
    def __init__(self, fd: int) -> None:
        self.cmd_fd = os.dup(fd)  # what the core's import_fd does
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            os.close(self.cmd_fd)
            self.closed = True


class Imported:
    def __init__(self, ctx: FakeCtx, blob: bytes) -> None:
        self.ctx, self.blob, self.closed = ctx, blob, False

    def close(self) -> None:
        self.closed = True


def test_high_level_round_trip(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    f = new_file()
    sender_ctx = FakeCtx(f)
    objs = [FakeObj("var"), FakeObj("umem")]
    try:
        share.send(a, sender_ctx, *objs)
        assert [o.keys for o in objs] == [[None], [None]]
        before = fd_count()
        ctx, got = share.recv(b, timeout=5, _import_fd=FakeCtx, _import_blob=Imported)
        try:
            assert fd_count() == before + 1  # only the importer's own dup remains
            assert same_file(ctx.cmd_fd, f)
            assert [o.blob for o in got] == [b"blob:var", b"blob:umem"]
            assert all(o.ctx is ctx for o in got)
        finally:
            ctx.close()
        share.send(a, sender_ctx, objs[0], key=b"k" * 16)
        assert objs[0].keys[-1] == b"k" * 16
        ctx, got = share.recv(b, timeout=5, _import_fd=FakeCtx, _import_blob=Imported)
        ctx.close()
    finally:
        sender_ctx.close()
        os.close(f)


def test_high_level_import_failure_closes_everything(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    f = new_file()
    made: list[Any] = []

    def import_fd(fd: int) -> FakeCtx:
        ctx = FakeCtx(fd)
        made.append(ctx)
        return ctx

    def import_blob(ctx: FakeCtx, blob: bytes) -> Imported:
        if blob == b"blob:bad":
            raise Error(None, "import failed")
        obj = Imported(ctx, blob)
        made.append(obj)
        return obj

    sender_ctx = FakeCtx(f)
    try:
        share.send(a, sender_ctx, FakeObj("good"), FakeObj("bad"))
        before = fd_count()
        with pytest.raises(Error, match="import failed"):
            share.recv(b, timeout=5, _import_fd=import_fd, _import_blob=import_blob)
        assert all(m.closed for m in made) and len(made) == 2
        assert fd_count() == before

        def bad_fd(fd: int) -> Any:
            raise Error(None, "no device")

        share.send(a, sender_ctx, FakeObj("x"))
        with pytest.raises(Error, match="no device"):
            share.recv(b, timeout=5, _import_fd=bad_fd, _import_blob=import_blob)
        assert fd_count() == before
    finally:
        sender_ctx.close()
        os.close(f)


def test_zero_timeout_reads_what_is_queued(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    with pytest.raises(TimeoutError):
        recv_fds(b, timeout=0)
    send_fds(a, [], [b"queued"])
    assert recv_fds(b, timeout=0)[1] == [b"queued"]


def test_context_descriptor_round_trip_and_refusals() -> None:
    blob = share.context_descriptor("sim", "mlx5_sim0")
    assert blob.startswith(share.CONTEXT_MAGIC)
    assert share.parse_context_descriptor(blob) == {"backend": "sim", "device": "mlx5_sim0"}
    assert share.parse_context_descriptor(b"MLX5ENV...an envelope") is None
    with pytest.raises(ValueError, match="backend must be one of"):
        share.context_descriptor("gpu")
    for bad in (share.CONTEXT_MAGIC + b"{", share.CONTEXT_MAGIC + b'{"backend": "gpu"}',
                share.CONTEXT_MAGIC + b"[]", share.CONTEXT_MAGIC + b" " * 5000):
        with pytest.raises(share.ProtocolError) as info:
            share.parse_context_descriptor(bad)
        assert info.value.errno == errno.EPROTO


def test_recv_of_a_malformed_descriptor_closes_the_fd(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    f = new_file()
    try:
        send_fds(a, [f], [share.CONTEXT_MAGIC + b"{not json"])
        before = fd_count()
        with pytest.raises(share.ProtocolError, match="malformed context descriptor"):
            share.recv(b, timeout=5, _import_fd=FakeCtx, _import_blob=Imported)
        assert fd_count() == before
    finally:
        os.close(f)


def test_send_puts_the_backend_first_and_recv_uses_it(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    f = new_file()
    ctx = FakeCtx(f)
    ctx.backend, ctx.name = "sim", "dev0"  # type: ignore[attr-defined]
    try:
        share.send(a, ctx, FakeObj("var"))
        fds, payloads, _creds = recv_fds(b, timeout=5)
        for fd in fds:
            os.close(fd)
        assert payloads == [share.context_descriptor("sim", "dev0"), b"blob:var"]
    finally:
        ctx.close()
        os.close(f)


# ---- MessageAssembler (the primary's non-blocking reads): what a stalling peer can make it hold


def _frame_of(payloads: list[bytes]) -> bytes:
    a, b = socket.socketpair()
    with a, b:
        send_fds(a, [], payloads)
        return b.recv(1 << 21)


def test_assembler_holds_what_arrived_however_it_was_dribbled(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Before: every read was kept as its own bytes object (~40 B each), so 60 KB sent a byte
    per step made the assembler hold 2.5 MB — a 1 MiB HELLO (framed before any MAC check)
    dribbled by each of the primary's 32 unwelcomed peers, over a GB. Now one buffer."""
    import tracemalloc

    a, b = pair
    frame = _frame_of([b"x" * 60_000])
    asm = share.MessageAssembler(b)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(len(frame) - 1):
            a.send(frame[i : i + 1])
            assert asm.step() is None and asm.started
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert held < 2 * len(frame), f"{held} B held for {len(frame) - 1} B received"
    a.send(frame[-1:])
    got = asm.step()
    assert got is not None and got[1] == [b"x" * 60_000]


def test_assembler_of_a_huge_announced_message_allocates_what_arrived(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A valid header announcing MAX_PAYLOAD_BYTES, then one byte: before, each step asked
    recvmsg for the whole remaining 1 MiB (allocated, then shrunk); now at most 64 KiB a read.
    One byte more than the limit is refused at the header, before any payload is read."""
    import tracemalloc

    a, b = pair
    head = share._PREFIX.pack(share.WIRE_MAGIC, share.WIRE_VERSION, 0, 1)
    a.send(head + struct.pack("<I", share.MAX_PAYLOAD_BYTES) + b"y")
    asm = share.MessageAssembler(b)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        assert asm.step() is None and asm.started
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - base < 256 << 10, f"one step of a 1-byte read peaked at {peak - base} B"
    a2, b2 = socket.socketpair()
    with a2, b2:
        a2.send(head + struct.pack("<I", share.MAX_PAYLOAD_BYTES + 1) + b"y" * 64)
        with pytest.raises(ProtocolError, match="payload bytes, at most"):
            share.MessageAssembler(b2).step()


def test_assembler_closes_the_fds_of_an_unfinished_message(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    frame = _frame_of([b"z" * 100])
    r, w = os.pipe()
    try:
        before = fd_count()
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r, w]).tobytes())]
        # The header says 0 fds; the kernel delivers them with the first byte anyway.
        assert a.sendmsg([frame[:10]], ancillary) == 10
        asm = share.MessageAssembler(b)
        assert asm.step() is None
        assert fd_count() == before + 2  # held by the assembler
        asm.close()
        asm.close()  # idempotent
        assert fd_count() == before
    finally:
        os.close(r)
        os.close(w)


def test_assembler_max_bytes(pair: tuple[socket.socket, socket.socket]) -> None:
    """A receiver that expects small messages refuses a bigger announcement at the header,
    before reading (and keeping) any of the payload; the limit itself is checked."""
    a, b = pair
    a.send(raw_message(0, [100, 29]) + b"p" * 64)
    with pytest.raises(ProtocolError, match="129 payload bytes, at most 128"):
        share.MessageAssembler(b, max_bytes=128).step()
    for bad, exc in [(-1, ValueError), (share.MAX_PAYLOAD_BYTES + 1, ValueError),
                     (1.5, TypeError), (True, TypeError)]:
        with pytest.raises(exc, match="max_bytes"):
            share.MessageAssembler(b, max_bytes=bad)  # type: ignore[arg-type]
    c, d = socket.socketpair()
    with c, d:
        send_fds(c, [], [b"q" * 128])
        got = share.MessageAssembler(d, max_bytes=128).step()
        assert got is not None and got[1] == [b"q" * 128]  # at the limit: taken
