"""Pickling Var/Umem/DevxObj: in-process, with no context, and across fork/spawn children."""

from __future__ import annotations

import json
import mmap
import multiprocessing
import os
import pickle
import socket
import struct
from typing import Any

import pytest

import mlx5tlp
from mlx5tlp import share, sim

CREATE_OBJ = struct.pack(">HHHH", 0x0A00, 0, 0, 0x42) + b"pickled!" + bytes(8)
QUERY = struct.pack(">HHHH", 0x0A02, 0, 0, 0x42) + bytes(8)
RW = mmap.PROT_READ | mmap.PROT_WRITE
CHILD_TIMEOUT = 60.0


def make_objects(ctx: mlx5tlp.Context) -> tuple[mlx5tlp.Var, mlx5tlp.Umem, mlx5tlp.DevxObj]:
    return (
        ctx.alloc_var(tlp=True),
        ctx.reg_umem(mlx5tlp.alloc_umem_buffer(4096)),
        ctx.create_devx_obj(CREATE_OBJ, 16),
    )


# -- in-process ------------------------------------------------------------------------------


def test_round_trip_in_process(ctx: mlx5tlp.Context) -> None:
    var, umem, obj = make_objects(ctx)
    with mlx5tlp.Context.import_fd(ctx.cmd_fd) as ictx:
        # Unpickling imports onto the newest open context of the device: ictx.
        v2, u2, o2 = pickle.loads(pickle.dumps([var, umem, obj]))
        for orig, copy in ((var, v2), (umem, u2), (obj, o2)):
            assert type(copy) is type(orig)
            assert copy.imported
            assert not copy.closed
            assert copy.context is ictx
        assert (v2.page_id, v2.length, v2.mmap_off, v2.is_tlp) == (
            var.page_id,
            var.length,
            var.mmap_off,
            True,
        )
        assert u2.umem_id == umem.umem_id
        assert o2.query(QUERY, 16 + len(CREATE_OBJ))[16:] == CREATE_OBJ
        with v2.mmap(RW) as theirs, var.mmap(RW) as mine:
            theirs[0:6] = b"pickle"
            assert mine[0:6] == b"pickle"
        # An imported object pickles too (its own export).
        v3 = pickle.loads(pickle.dumps(v2))
        assert v3.imported
        assert v3.page_id == var.page_id
        for o in (v3, v2, u2, o2):
            o.close()
        # The kernel objects belong to the owner still.
        stats = sim.device_stats(ctx.name)
        assert (stats["tlp_vars"], stats["umems"], stats["devx_objs"]) == (1, 1, 1)
    for o in (var, umem, obj):
        o.free()


def test_round_trip_onto_the_owning_context(ctx: mlx5tlp.Context) -> None:
    var = ctx.alloc_var(tlp=True)
    copy = pickle.loads(pickle.dumps(var))
    assert copy.imported
    assert copy.context is ctx
    copy.close()
    assert var.probe()
    var.free()


def test_pickle_a_closed_object(ctx: mlx5tlp.Context) -> None:
    var = ctx.alloc_var(tlp=True)
    var.free()
    with pytest.raises(mlx5tlp.InvalidHandleError):
        pickle.dumps(var)


def test_unpickle_a_freed_var(ctx: mlx5tlp.Context) -> None:
    var = ctx.alloc_var(tlp=True)
    data = pickle.dumps(var)
    var.free()
    with pytest.raises(mlx5tlp.InvalidHandleError):
        pickle.loads(data)


def test_unpickle_without_a_context(device: str) -> None:
    with mlx5tlp.open_device(device) as ctx:
        data = [pickle.dumps(o) for o in make_objects(ctx)]
    for i, kind in enumerate(("VAR", "UMEM", "DEVX_OBJ")):
        with pytest.raises(mlx5tlp.DeviceNotFoundError) as info:
            pickle.loads(data[i])
        msg = str(info.value)
        assert device in msg
        assert kind in msg
        assert "import_fd" in msg or "share.recv" in msg  # says what to import first
        assert info.value.operation == "unpickle"


def test_unpickle_with_only_another_device_open(device: str, notlp_device: str) -> None:
    with mlx5tlp.open_device(device) as ctx:
        data = pickle.dumps(ctx.create_devx_obj(CREATE_OBJ, 16))
    with (
        mlx5tlp.open_device(notlp_device),
        pytest.raises(mlx5tlp.DeviceNotFoundError, match=device),
    ):
        pickle.loads(data)


# -- across processes ------------------------------------------------------------------------


def _child_no_context(sock: socket.socket) -> None:
    """Unpickle with no context of the device in this process; report the error."""
    with sock:
        (data,) = share.recv_fds(sock, max_fds=0, timeout=CHILD_TIMEOUT)[1]
        try:
            pickle.loads(data)
        except mlx5tlp.DeviceNotFoundError as exc:
            result = {"error": type(exc).__name__, "message": str(exc)}
        else:  # pragma: no cover - reported to the parent
            result = {"error": None, "message": ""}
        sock.sendall(json.dumps(result).encode())


def _child_write(sock: socket.socket, marker: bytes) -> None:
    """Import the parent's context fd, unpickle its objects, write the VAR page, report."""
    with sock:
        fds, payloads, _creds = share.recv_fds(sock, max_fds=1, timeout=CHILD_TIMEOUT)
        try:
            ctx = mlx5tlp.Context.import_fd(fds[0])
        finally:
            os.close(fds[0])
        with ctx:
            var, umem, obj = (pickle.loads(p) for p in payloads)
            with var.mmap(RW) as m:
                m[0 : len(marker)] = marker
            result: dict[str, Any] = {
                "pid": os.getpid(),
                "types": [type(o).__name__ for o in (var, umem, obj)],
                "imported": [o.imported for o in (var, umem, obj)],
                "on_ctx": [o.context is ctx for o in (var, umem, obj)],
                "page_id": var.page_id,
                "umem_id": umem.umem_id,
                "query": obj.query(QUERY, 16 + len(CREATE_OBJ))[16:].hex(),
            }
            for o in (var, umem, obj):
                o.unimport()
        sock.sendall(json.dumps(result).encode())


def _recv_json(sock: socket.socket) -> Any:
    sock.settimeout(CHILD_TIMEOUT)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return json.loads(b"".join(chunks))


def _run_child(method: str, target: Any, payloads: list[bytes], fds: list[int], *args: Any) -> Any:
    mp = multiprocessing.get_context(method)
    parent, child = share.socketpair()
    with parent:
        with child:
            proc = mp.Process(target=target, args=(child, *args), daemon=True)
            proc.start()
        try:
            share.send_fds(parent, fds, payloads)
            result = _recv_json(parent)
        finally:
            proc.join(CHILD_TIMEOUT)
            if proc.is_alive():  # pragma: no cover - never hang the suite
                proc.kill()
                proc.join(5)
    assert proc.exitcode == 0, f"{method} child exited with {proc.exitcode}"
    proc.close()
    return result


def test_unpickle_in_a_spawned_child_without_a_context(ctx: mlx5tlp.Context) -> None:
    # (Only spawn: a forked child inherits this process's open contexts.)
    var = ctx.alloc_var(tlp=True)
    result = _run_child("spawn", _child_no_context, [pickle.dumps(var)], [])
    assert result["error"] == "DeviceNotFoundError"
    assert ctx.name in result["message"]
    var.free()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_child_writes_through_unpickled_var(ctx: mlx5tlp.Context, method: str) -> None:
    var, umem, obj = make_objects(ctx)
    marker = f"written by a {method} child".encode()
    with var.mmap(RW) as m:
        m[0:64] = bytes(64)
    payloads = [pickle.dumps(o) for o in (var, umem, obj)]
    result = _run_child(method, _child_write, payloads, [ctx.cmd_fd], marker)

    assert result["pid"] != os.getpid()
    assert result["types"] == ["Var", "Umem", "DevxObj"]
    assert result["imported"] == [True, True, True]
    assert result["on_ctx"] == [True, True, True]
    assert result["page_id"] == var.page_id
    assert result["umem_id"] == umem.umem_id
    assert bytes.fromhex(result["query"]) == CREATE_OBJ
    with var.mmap(RW) as m:
        assert m[0 : len(marker)] == marker
    # The child's imports are gone; the parent's objects live on.
    stats = sim.device_stats(ctx.name)
    assert stats["contexts"] == 1
    assert (stats["tlp_vars"], stats["umems"], stats["devx_objs"]) == (1, 1, 1)
    assert var.probe()
    for o in (var, umem, obj):
        o.free()


def test_unpickle_prefers_the_context_that_shares_the_objects(device: str) -> None:
    # A second, separately opened context of the same device does not share the owner's
    # objects (another ucontext); unpickling must not pick it just because it is newer.
    with mlx5tlp.open_device(device) as owner:
        var = owner.alloc_var(tlp=True)
        blob = pickle.dumps(var)
        with mlx5tlp.open_device(device) as _stranger:
            back = pickle.loads(blob)
            assert back.context is owner and back.probe()
            back.unimport()
