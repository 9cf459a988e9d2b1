"""mlx5tlp.share.send/recv of a context and its objects across real process boundaries."""

from __future__ import annotations

import errno
import json
import mmap
import multiprocessing
import os
import socket
import struct
import subprocess
import sys
import textwrap
from typing import Any

import pytest

import mlx5tlp
from mlx5tlp import share, sim

CREATE_OBJ = struct.pack(">HHHH", 0x0A00, 0, 0, 0x42) + b"from-parent" + bytes(5)
QUERY = struct.pack(">HHHH", 0x0A02, 0, 0, 0x42) + bytes(8)
MODIFY = struct.pack(">HHHH", 0x0A01, 0, 0, 0x42) + b"from-child!!" + bytes(4)
RW = mmap.PROT_READ | mmap.PROT_WRITE
KEY = b"s" * 32
TIMEOUT = 60.0
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(mlx5tlp.__file__)))


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def child_main(sock: socket.socket, marker: bytes, key: bytes | None = None) -> None:
    """The receiving side: import everything, use it, unimport it, report as JSON."""
    with sock:
        ctx, objs = share.recv(sock, key=key, timeout=TIMEOUT)
        with ctx:
            var, umem, obj = objs
            with var.mmap(RW) as m:
                m[0 : len(marker)] = marker
            seen = obj.query(QUERY, 16 + len(CREATE_OBJ))[16:]
            obj.modify(MODIFY, 16)
            result: dict[str, Any] = {
                "pid": os.getpid(),
                "ctx_imported": ctx.imported,
                "device": ctx.name,
                "types": [type(o).__name__ for o in objs],
                "imported": [o.imported for o in objs],
                "page_id": var.page_id,
                "is_tlp": var.is_tlp,
                "umem_id": umem.umem_id,
                "query": seen.hex(),
            }
            for o in objs:
                o.unimport()
            result["closed"] = [o.closed for o in objs]
        result["ctx_closed"] = ctx.closed
        sock.sendall(json.dumps(result).encode())


def _recv_json(sock: socket.socket) -> Any:
    sock.settimeout(TIMEOUT)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return json.loads(b"".join(chunks))


def _wait(proc: Any) -> int:
    """Join a multiprocessing.Process or a Popen without ever hanging; its exit code."""
    if isinstance(proc, subprocess.Popen):
        try:
            return proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
            proc.wait(5)
            raise
    proc.join(TIMEOUT)
    if proc.is_alive():  # pragma: no cover
        proc.kill()
        proc.join(5)
    code = proc.exitcode
    proc.close()
    return int(code)


def _start(method: str, child: socket.socket, marker: bytes, key: bytes | None) -> Any:
    if method in ("fork", "spawn"):
        mp = multiprocessing.get_context(method)
        proc = mp.Process(target=child_main, args=(child, marker, key), daemon=True)
        proc.start()
        return proc
    # A fresh interpreter (fork + exec) that inherits the socket fd through pass_fds.
    script = textwrap.dedent(
        f"""
        import socket, sys
        sys.path[:0] = [{PYTHON_DIR!r}, {TESTS_DIR!r}]
        import test_share
        sock = socket.socket(fileno={child.fileno()})
        test_share.child_main(sock, {marker!r}, {key!r})
        """
    )
    return subprocess.Popen([sys.executable, "-c", script], pass_fds=[child.fileno()])


@pytest.mark.parametrize("key", [None, KEY], ids=["unkeyed", "keyed"])
@pytest.mark.parametrize("method", ["fork", "spawn", "exec"])
def test_send_to_a_child_process(ctx: mlx5tlp.Context, method: str, key: bytes | None) -> None:
    var = ctx.alloc_var(tlp=True)
    umem = ctx.reg_umem(mlx5tlp.alloc_umem_buffer(4096))
    obj = ctx.create_devx_obj(CREATE_OBJ, 16)
    marker = f"hello from the {method} child".encode()
    parent, child = share.socketpair()
    with parent:
        with child:
            proc = _start(method, child, marker, key)
        try:
            share.send(parent, ctx, var, umem, obj, key=key)
            result = _recv_json(parent)
        finally:
            code = _wait(proc)
    assert code == 0

    assert result["pid"] != os.getpid()
    assert result["ctx_imported"] is True
    assert result["device"] == ctx.name
    assert result["types"] == ["Var", "Umem", "DevxObj"]
    assert result["imported"] == [True, True, True]
    assert result["closed"] == [True, True, True]
    assert result["ctx_closed"] is True
    assert result["page_id"] == var.page_id
    assert result["is_tlp"] is True
    assert result["umem_id"] == umem.umem_id
    assert bytes.fromhex(result["query"]) == CREATE_OBJ

    # What the child wrote and modified is in the parent's objects.
    with var.mmap(RW) as m:
        assert m[0 : len(marker)] == marker
    assert obj.query(QUERY, 16 + len(MODIFY))[16:] == MODIFY
    # The child's context is gone; the parent's objects are alive and still its own.
    stats = sim.device_stats(ctx.name)
    assert stats["contexts"] == 1
    assert (stats["tlp_vars"], stats["umems"], stats["devx_objs"]) == (1, 1, 1)
    assert stats["gw_pages_free"] == 7
    assert var.probe()
    for o in (var, umem, obj):
        assert not o.closed
        o.free()
    assert sim.device_stats(ctx.name)["gw_pages_free"] == 8


def test_sender_may_close_its_context_after_send(device: str) -> None:
    ctx = mlx5tlp.open_device(device)
    umem = ctx.reg_umem(mlx5tlp.alloc_umem_buffer(4096))
    a, b = share.socketpair()
    with a, b:
        share.send(a, ctx, umem)
        ctx.close()  # also deregisters the UMEM: the envelope outlives its object
        assert sim.device_stats(device)["contexts"] == 1  # the sent fd keeps the context
        # The UMEM's envelope names nothing now: refused at import (the software device's
        # identity check), and nothing received is left open.
        with pytest.raises(mlx5tlp.InvalidHandleError) as info:
            share.recv(b, timeout=TIMEOUT)
        assert info.value.errno == errno.ENOENT
    assert sim.device_stats(device)["umems"] == 0
    assert sim.device_stats(device)["contexts"] == 0


@pytest.mark.parametrize(
    ("send_key", "recv_key", "fragment"),
    [
        (KEY, b"w" * 32, "HMAC-SHA256 mismatch"),
        (KEY, None, "no key was given"),
        (None, KEY, "not keyed"),
    ],
    ids=["wrong-key", "missing-key", "unexpected-key"],
)
def test_keyed_recv_refuses_and_leaks_nothing(
    ctx: mlx5tlp.Context, send_key: bytes | None, recv_key: bytes | None, fragment: str
) -> None:
    var = ctx.alloc_var(tlp=True)
    obj = ctx.create_devx_obj(CREATE_OBJ, 16)
    a, b = share.socketpair()
    with a, b:
        before = fd_count()
        stats_before = sim.device_stats(ctx.name)
        share.send(a, ctx, obj, var, key=send_key)
        with pytest.raises(mlx5tlp.ExportFormatError, match=fragment):
            share.recv(b, key=recv_key, timeout=TIMEOUT)
        assert fd_count() == before
        assert sim.device_stats(ctx.name) == stats_before
        # The socket is still usable: a correct message goes through.
        share.send(a, ctx, obj, var, key=send_key)
        rctx, (o2, v2) = share.recv(b, key=send_key, timeout=TIMEOUT)
        with rctx:
            assert o2.imported and v2.imported
            assert fd_count() == before + 1  # the imported context's own fd
        assert o2.closed and v2.closed
        assert fd_count() == before
    var.free()
    obj.free()


def test_keyed_recv_in_a_child_refuses(ctx: mlx5tlp.Context) -> None:
    var = ctx.alloc_var(tlp=True)
    script = textwrap.dedent(
        f"""
        import json, os, socket, sys
        sys.path[:0] = [{PYTHON_DIR!r}]
        import mlx5tlp
        from mlx5tlp import share
        sock = socket.socket(fileno=int(sys.argv[1]))
        before = len(os.listdir("/proc/self/fd"))
        try:
            share.recv(sock, key=b"w" * 32, timeout={TIMEOUT})
        except mlx5tlp.ExportFormatError as exc:
            error = type(exc).__name__ + ": " + str(exc)
        else:
            error = None
        after = len(os.listdir("/proc/self/fd"))
        sock.sendall(json.dumps({{"error": error, "before": before, "after": after}}).encode())
        sock.close()
        """
    )
    parent, child = share.socketpair()
    with parent:
        with child:
            proc = subprocess.Popen(
                [sys.executable, "-c", script, str(child.fileno())], pass_fds=[child.fileno()]
            )
        try:
            share.send(parent, ctx, var, key=KEY)
            result = _recv_json(parent)
        finally:
            code = _wait(proc)
    assert code == 0
    assert result["error"] is not None
    assert result["error"].startswith("ExportFormatError")
    assert "HMAC" in result["error"]
    assert result["after"] == result["before"]
    assert sim.device_stats(ctx.name)["contexts"] == 1
    assert var.probe()
    var.free()


def test_recv_of_a_freed_var_closes_everything(ctx: mlx5tlp.Context) -> None:
    obj = ctx.create_devx_obj(CREATE_OBJ, 16)
    var = ctx.alloc_var(tlp=True)
    a, b = share.socketpair()
    with a, b:
        before = fd_count()
        share.send(a, ctx, obj, var)
        var.free()  # between send and recv: the envelope is well-formed but stale
        with pytest.raises(mlx5tlp.InvalidHandleError):
            share.recv(b, timeout=TIMEOUT)
        assert fd_count() == before
    assert sim.device_stats(ctx.name)["devx_objs"] == 1
    obj.free()


# -- the backend travels with the context --------------------------------------------------------
def test_receiver_gets_the_senders_backend_without_naming_it(ctx: mlx5tlp.Context) -> None:
    # The receiver is a fresh interpreter whose default backend is rdma ($MLX5TLP_BACKEND
    # unset): the context arrives on the software device all the same.
    var = ctx.alloc_var(tlp=True)
    parent, child = share.socketpair()
    script = textwrap.dedent(
        f"""
        import json, socket
        from mlx5tlp import share
        sock = socket.socket(fileno={child.fileno()})
        ctx, (var,) = share.recv(sock, timeout=60)
        sock.sendall(json.dumps([ctx.backend, ctx.name, var.page_id]).encode())
        var.unimport()
        ctx.close()
        sock.close()
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "MLX5TLP_BACKEND"}
    with parent:
        with child:
            proc = subprocess.Popen([sys.executable, "-c", script], pass_fds=[child.fileno()],
                                    env=env)
        try:
            share.send(parent, ctx, var)
            result = _recv_json(parent)
        finally:
            code = _wait(proc)
    assert code == 0
    assert result == ["sim", ctx.name, var.page_id]
    var.free()


def test_recv_expecting_another_backend_is_refused_and_leaks_nothing(
        ctx: mlx5tlp.Context) -> None:
    a, b = share.socketpair()
    with a, b:
        share.send(a, ctx)
        before = fd_count()
        with pytest.raises(mlx5tlp.InvalidArgumentError) as info:
            share.recv(b, backend="rdma", timeout=TIMEOUT)
        assert info.value.errno == errno.EINVAL
        assert f"the peer sent a context of backend 'sim' (device {ctx.name!r}), not 'rdma'" \
            in str(info.value)
        assert fd_count() == before
        share.send(a, ctx)
        got, objs = share.recv(b, backend="sim", timeout=TIMEOUT)  # the same name: fine
        with got:
            assert got.backend == "sim" and objs == []


def test_import_fd_recognises_a_software_device_fd(
        ctx: mlx5tlp.Context, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLX5TLP_BACKEND", "rdma")  # the default would be wrong for this fd
    with mlx5tlp.Context.import_fd(ctx.cmd_fd) as imported:
        assert imported.backend == "sim" and imported.name == ctx.name


def test_import_fd_of_the_other_backend_says_which_it_is(ctx: mlx5tlp.Context) -> None:
    before = fd_count()
    with pytest.raises(mlx5tlp.InvalidHandleError) as info:
        mlx5tlp.Context.import_fd(ctx.cmd_fd, backend="rdma")
    assert info.value.errno == errno.EINVAL
    message = str(info.value)
    assert message.startswith(f"fd {ctx.cmd_fd} is a command fd of the 'sim' backend "
                              f"(software device {ctx.name!r} at ")
    assert "use backend='sim'" in message
    assert fd_count() == before
    # An fd that is neither: the core's own error, on the backend asked for.
    with open(os.devnull, "rb") as f, pytest.raises(mlx5tlp.InvalidHandleError) as info:
        mlx5tlp.Context.import_fd(f.fileno(), backend="sim")
    assert "is not a device context's command fd" in str(info.value)
