"""Object lifetimes across processes: crash reclaim, shared ucontexts, free while imported."""

from __future__ import annotations

import errno
import json
import mmap
import multiprocessing
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

import mlx5tlp
from mlx5tlp import share, sim

CREATE_OBJ = struct.pack(">HHHH", 0x0A00, 0, 0, 0x42) + bytes(8)
QUERY = struct.pack(">HHHH", 0x0A02, 0, 0, 0x42) + bytes(8)
RW = mmap.PROT_READ | mmap.PROT_WRITE
TIMEOUT = 60.0
PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(mlx5tlp.__file__)))

PRELUDE = f"""
import json, os, socket, sys, time
sys.path.insert(0, {PYTHON_DIR!r})
import mlx5tlp
from mlx5tlp import share
CREATE_OBJ = {CREATE_OBJ!r}
def ready(**info):
    sys.stdout.write(json.dumps(info) + "\\n")
    sys.stdout.flush()
def wait_forever():
    while True:
        time.sleep(60)
"""


@contextmanager
def child(
    script: str, *args: str, pass_fds: tuple[int, ...] = ()
) -> Iterator[subprocess.Popen[str]]:
    """Run `script` in a fresh interpreter (stdout piped; see :func:`wait_ready`).

    The child is SIGKILLed (if still alive) and reaped on exit, so nothing ever hangs.
    """
    code = PRELUDE + textwrap.dedent(script)
    with subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        text=True,
        pass_fds=pass_fds,
    ) as proc:
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(TIMEOUT)


def wait_ready(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """The JSON line the child prints with ready()."""
    line = _readline(proc)
    assert line, f"child exited with {proc.wait(TIMEOUT)} before it was ready"
    return dict(json.loads(line))


def _readline(proc: subprocess.Popen[str]) -> str:
    import selectors

    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(TIMEOUT):  # pragma: no cover
            raise TimeoutError("the child did not report in time")
    return proc.stdout.readline()


def sigkill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(TIMEOUT) == -signal.SIGKILL


# -- a crashed owner's objects are reclaimed -------------------------------------------------


def test_sigkill_reclaims_everything(device: str) -> None:
    script = """
    ctx = mlx5tlp.open_device(sys.argv[1])
    v1 = ctx.alloc_var(tlp=True)
    v2 = ctx.alloc_var(tlp=True)
    buf = mlx5tlp.alloc_umem_buffer(4096)
    umem = ctx.reg_umem(buf)
    obj = ctx.create_devx_obj(CREATE_OBJ, 16)
    ready(pages=[v1.page_id, v2.page_id])
    wait_forever()
    """
    with child(script, device) as proc:
        info = wait_ready(proc)
        assert len(set(info["pages"])) == 2
        stats = sim.device_stats(device)
        assert stats["contexts"] == 1
        assert (stats["tlp_vars"], stats["umems"], stats["devx_objs"]) == (2, 1, 1)
        assert stats["gw_pages_free"] == 6
        sigkill(proc)
    stats = sim.device_stats(device)
    assert stats["contexts"] == 0
    assert (stats["tlp_vars"], stats["umems"], stats["devx_objs"]) == (0, 0, 0)
    assert stats["gw_pages_free"] == 8
    assert stats["reclaimed"] >= 4
    # The pages really are free again.
    with mlx5tlp.open_device(device) as ctx:
        vars_ = [ctx.alloc_var(tlp=True) for _ in range(8)]
        assert set(info["pages"]) <= {v.page_id for v in vars_}
        for v in vars_:
            v.free()


def test_sigkill_of_an_importer_does_not_reclaim_the_owners_objects(
    ctx: mlx5tlp.Context,
) -> None:
    var = ctx.alloc_var(tlp=True)
    umem = ctx.reg_umem(mlx5tlp.alloc_umem_buffer(4096))
    obj = ctx.create_devx_obj(CREATE_OBJ, 16)
    script = """
    sock = socket.socket(fileno=int(sys.argv[1]))
    ictx, objs = share.recv(sock, timeout=60)
    sock.close()
    own = ictx.alloc_var(tlp=True)  # allocated by the child, on the shared ucontext
    with objs[0].mmap() as m:
        m[0:5] = b"child"
    ready(own_page=own.page_id, imported=[o.imported for o in objs])
    wait_forever()
    """
    parent, child_sock = share.socketpair()
    with (
        parent,
        child_sock,
        child(script, str(child_sock.fileno()), pass_fds=(child_sock.fileno(),)) as proc,
    ):
        child_sock.close()
        share.send(parent, ctx, var, umem, obj)
        info = wait_ready(proc)
        assert info["imported"] == [True, True, True]
        sigkill(proc)

    # The parent's fd keeps the (shared) ucontext alive: nothing is reclaimed, not even the
    # page the child allocated on it, since kernel objects belong to the ucontext, not to
    # the process.
    stats = sim.device_stats(ctx.name)
    assert stats["reclaimed"] == 0
    assert stats["contexts"] == 1
    assert (stats["tlp_vars"], stats["umems"], stats["devx_objs"]) == (2, 1, 1)
    assert stats["gw_pages_free"] == 6
    assert var.probe()
    with var.mmap(RW) as m:
        assert m[0:5] == b"child"
    assert obj.query(QUERY, 32)[16:] == CREATE_OBJ
    assert umem.umem_id > 0
    for o in (var, umem, obj):
        o.free()
    # The child's own page goes when the last fd of the ucontext (ours) is closed.
    assert sim.device_stats(ctx.name)["gw_pages_free"] == 7
    ctx.close()
    stats = sim.device_stats(ctx.name)
    assert stats["contexts"] == 0
    assert stats["gw_pages_free"] == 8
    assert stats["tlp_vars"] == 0
    assert stats["reclaimed"] >= 1


def test_importer_keeps_a_crashed_owners_objects(device: str) -> None:
    """The other way round: the owner dies while we hold its context fd."""
    script = """
    sock = socket.socket(fileno=int(sys.argv[2]))
    ctx = mlx5tlp.open_device(sys.argv[1])
    var = ctx.alloc_var(tlp=True)
    obj = ctx.create_devx_obj(CREATE_OBJ, 16)
    share.send(sock, ctx, var, obj)
    sock.close()
    ready(page=var.page_id)
    wait_forever()
    """
    parent, child_sock = share.socketpair()
    with (
        parent,
        child_sock,
        child(script, device, str(child_sock.fileno()), pass_fds=(child_sock.fileno(),)) as proc,
    ):
        child_sock.close()
        ictx, (var, obj) = share.recv(parent, timeout=TIMEOUT)
        info = wait_ready(proc)
        sigkill(proc)
    with ictx:
        assert var.page_id == info["page"]
        stats = sim.device_stats(device)
        assert stats["reclaimed"] == 0
        assert (stats["tlp_vars"], stats["devx_objs"]) == (1, 1)
        assert var.probe()
        with var.mmap(RW) as m:
            m[0:2] = b"ok"
        assert obj.query(QUERY, 32)[16:] == CREATE_OBJ
        # close() on an import stays unimport: the kernel objects are left alone.
    # Closing the last fd of the ucontext reclaims what the dead owner left.
    stats = sim.device_stats(device)
    assert stats["contexts"] == 0
    assert (stats["tlp_vars"], stats["devx_objs"]) == (0, 0)
    assert stats["gw_pages_free"] == 8
    assert stats["reclaimed"] >= 2


def test_importer_frees_what_a_dead_owner_left(device: str) -> None:
    """A process that takes over from a dead owner frees what it inherited (issue 10 A7).

    rdma-core lets any one party free an imported object (exactly one must); without that the
    successor could only wait for the last fd to close.
    """
    script = """
    sock = socket.socket(fileno=int(sys.argv[2]))
    ctx = mlx5tlp.open_device(sys.argv[1])
    var = ctx.alloc_var(tlp=True)
    umem = ctx.reg_umem(mlx5tlp.alloc_umem_buffer(4096))
    obj = ctx.create_devx_obj(CREATE_OBJ, 16)
    share.send(sock, ctx, var, umem, obj)
    sock.close()
    ready(page=var.page_id)
    wait_forever()
    """
    parent, child_sock = share.socketpair()
    with (
        parent,
        child_sock,
        child(script, device, str(child_sock.fileno()), pass_fds=(child_sock.fileno(),)) as proc,
    ):
        child_sock.close()
        ictx, (var, umem, obj) = share.recv(parent, timeout=TIMEOUT)
        wait_ready(proc)
        sigkill(proc)
    with ictx:
        stats = sim.device_stats(device)
        assert (stats["tlp_vars"], stats["umems"], stats["devx_objs"]) == (1, 1, 1)
        for o in (var, umem, obj):
            assert o.imported
            o.free()
            assert o.closed
        # Freed on the device now, while our context (the last fd) is still open.
        stats = sim.device_stats(device)
        assert (stats["tlp_vars"], stats["umems"], stats["devx_objs"]) == (0, 0, 0)
        assert stats["gw_pages_free"] == 8
        assert stats["reclaimed"] == 0
        # Exactly once: a second free is a use after release.
        with pytest.raises(mlx5tlp.InvalidHandleError):
            obj.free()


# -- free while imported across processes ----------------------------------------------------


def _importer(sock: socket.socket) -> None:
    """Import, say so, wait until the owner freed everything, report what happens."""
    with sock:
        ictx, (var, umem, obj) = share.recv(sock, timeout=TIMEOUT)
        with ictx:
            before = {"probe": var.probe(), "query": obj.query(QUERY, 32)[0]}
            sock.sendall(b"I")
            assert sock.recv(1) == b"F"  # the owner freed them
            after: dict[str, Any] = {"probe": var.probe()}
            try:
                var.mmap(RW).close()
                after["mmap"] = None
            except mlx5tlp.InvalidHandleError as exc:
                after["mmap"] = exc.errno
            try:
                obj.query(QUERY, 32)
                after["query"] = None
            except mlx5tlp.InvalidHandleError as exc:
                after["query"] = exc.errno
            after["umem_id"] = umem.umem_id
            for o in (var, umem, obj):
                o.unimport()  # no error although the kernel objects are gone
            after["closed"] = [o.closed for o in (var, umem, obj)]
        sock.sendall(json.dumps({"before": before, "after": after}).encode())


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_free_while_imported_in_another_process(ctx: mlx5tlp.Context, method: str) -> None:
    var = ctx.alloc_var(tlp=True)
    umem = ctx.reg_umem(mlx5tlp.alloc_umem_buffer(4096))
    obj = ctx.create_devx_obj(CREATE_OBJ, 16)
    umem_id = umem.umem_id
    mp = multiprocessing.get_context(method)
    parent, child_sock = share.socketpair()
    with parent:
        with child_sock:
            proc = mp.Process(target=_importer, args=(child_sock,), daemon=True)
            proc.start()
        try:
            parent.settimeout(TIMEOUT)
            share.send(parent, ctx, var, umem, obj)
            assert parent.recv(1) == b"I"
            for o in (var, umem, obj):
                o.free()
            stats = sim.device_stats(ctx.name)
            assert (stats["tlp_vars"], stats["umems"], stats["devx_objs"]) == (0, 0, 0)
            parent.sendall(b"F")
            chunks = []
            while chunk := parent.recv(65536):
                chunks.append(chunk)
            result = json.loads(b"".join(chunks))
        finally:
            proc.join(TIMEOUT)
            if proc.is_alive():  # pragma: no cover
                proc.kill()
                proc.join(5)
    assert proc.exitcode == 0
    proc.close()
    assert result["before"] == {"probe": True, "query": 0}
    after = result["after"]
    assert after["probe"] is False
    assert after["mmap"] == errno.EINVAL
    assert after["query"] == errno.ENOENT
    assert after["umem_id"] == umem_id
    assert after["closed"] == [True, True, True]
    stats = sim.device_stats(ctx.name)
    assert stats["contexts"] == 1
    assert stats["gw_pages_free"] == 8
