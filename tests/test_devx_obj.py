"""Tests of mlx5tlp.DevxObj and Context.devx_general_cmd on the software device."""

from __future__ import annotations

import errno
import struct

import pytest

import mlx5tlp
from mlx5tlp import sim


def create_cmd(obj_type: int = 0x42, extra: bytes = b"") -> bytes:
    """CREATE_GENERAL_OBJECT (opcode 0xa00) of `obj_type`, 16 bytes plus `extra`."""
    return struct.pack(">HHHH", 0x0A00, 0, 0, obj_type) + bytes(8) + extra


QUERY = struct.pack(">HHHH", 0x0A02, 0, 0, 0x42) + bytes(8)
MODIFY_HEAD = struct.pack(">HHHH", 0x0A01, 0, 0, 0x42) + bytes(8)


def obj_id(out: bytes) -> int:
    return int(struct.unpack_from(">I", out, 8)[0])


def test_create_query_modify_destroy(ctx: mlx5tlp.Context) -> None:
    cmd = create_cmd(extra=b"payload!")
    obj = ctx.create_devx_obj(cmd, 16)
    assert not obj.imported
    assert obj.context is ctx
    assert len(obj.out) == 16
    assert obj.out[0] == 0  # status ok
    first = obj_id(obj.out)
    assert first != 0
    assert sim.device_stats(ctx.name)["devx_objs"] == 1

    out = obj.query(QUERY, 16 + len(cmd))
    assert out[0] == 0
    assert out[16:] == cmd  # the last create/modify inbox

    new = MODIFY_HEAD + b"changed!"
    mod_out = obj.modify(new, 16)
    assert mod_out[0] == 0
    assert obj.query(QUERY, 16 + len(new))[16:] == new

    second = ctx.create_devx_obj(create_cmd(), 16)
    assert obj_id(second.out) != first
    second.free()
    obj.free()
    assert obj.closed
    assert sim.device_stats(ctx.name)["devx_objs"] == 0
    with pytest.raises(mlx5tlp.InvalidHandleError) as info:
        obj.query(QUERY, 32)
    assert info.value.errno == errno.EBADF
    with pytest.raises(mlx5tlp.InvalidHandleError):
        obj.free()
    obj.close()


def test_export_import_and_query_through_importer(ctx: mlx5tlp.Context) -> None:
    cmd = create_cmd(extra=b"shared..")
    obj = ctx.create_devx_obj(cmd, 16)
    with mlx5tlp.Context.import_fd(ctx.cmd_fd) as ictx:
        imp = ictx.import_devx_obj(obj.export())
        assert imp.imported
        assert imp.out == b""
        assert imp.query(QUERY, 16 + len(cmd))[16:] == cmd
        # The importer's modify is seen by the owner: one kernel object.
        new = MODIFY_HEAD + b"by-imp.."
        imp.modify(new, 16)
        assert obj.query(QUERY, 16 + len(new))[16:] == new
        imp.unimport()  # the kernel object stays: the owner still queries it below
        assert imp.closed
    assert obj.query(QUERY, 32)[0] == 0
    with pytest.raises(mlx5tlp.InvalidArgumentError):
        obj.unimport()
    obj.free()


def test_destroy_while_imported(ctx: mlx5tlp.Context) -> None:
    obj = ctx.create_devx_obj(create_cmd(), 16)
    with mlx5tlp.Context.import_fd(ctx.cmd_fd) as ictx:
        imp = ictx.import_devx_obj(obj.export())
        assert imp.query(QUERY, 32)[0] == 0
        obj.free()
        with pytest.raises(mlx5tlp.InvalidHandleError) as info:
            imp.query(QUERY, 32)
        assert info.value.errno == errno.ENOENT
        with pytest.raises(mlx5tlp.InvalidHandleError) as info:
            imp.modify(MODIFY_HEAD, 16)
        assert info.value.errno == errno.ENOENT
        assert not imp.closed
        imp.close()  # unimport: no error although the object is gone
        assert imp.closed


def test_import_of_a_destroyed_object_is_refused(ctx: mlx5tlp.Context) -> None:
    obj = ctx.create_devx_obj(create_cmd(), 16)
    blob = obj.export()
    obj.free()
    with mlx5tlp.Context.import_fd(ctx.cmd_fd) as ictx:
        # rdma-core's import asks the kernel nothing; the software device's identity check
        # finds no object with the envelope's handle.
        with pytest.raises(mlx5tlp.InvalidHandleError) as info:
            ictx.import_devx_obj(blob)
        assert info.value.errno == errno.ENOENT


def test_general_cmd_query_hca_cap(ctx: mlx5tlp.Context) -> None:
    # QUERY_HCA_CAP, op_mod = general caps (current): tlp_device_emulation_manager is PRM bit
    # 0x398 of the capability (counted from the MSB of byte 0): byte 0x73, mask 0x80.
    cmd = struct.pack(">HHHH", 0x100, 0, 0, 1) + bytes(8)
    out = ctx.devx_general_cmd(cmd, 16 + 0x100)
    assert len(out) == 16 + 0x100
    assert out[0] == 0
    cap = out[16:]
    assert cap[0x398 // 8] & (0x80 >> (0x398 % 8))


def test_general_cmd_unknown_opcode(ctx: mlx5tlp.Context) -> None:
    cmd = struct.pack(">HHHH", 0x0999, 0, 0, 0) + bytes(8)
    with pytest.raises(mlx5tlp.DevxCommandError) as info:
        ctx.devx_general_cmd(cmd, 16)
    err = info.value
    assert err.errno == errno.EREMOTEIO
    assert err.status == 2
    assert err.syndrome != 0
    assert err.operation is not None
    assert "mlx5dv_devx_general_cmd" in err.operation
    assert isinstance(err, mlx5tlp.Error)


BAD_TYPES: list[object] = ["0a000000", 1234, None, [0] * 16]
BAD_LENGTHS: list[bytes] = [b"", bytes(4), bytes(7), bytes(9), bytes(18)]
BAD_OUT_LENS: list[object] = [0, 15, -16, (1 << 20) + 1, True, 16.0, "16"]


def _calls(ctx: mlx5tlp.Context, obj: mlx5tlp.DevxObj) -> dict[str, object]:
    return {
        "create": ctx.create_devx_obj,
        "general": ctx.devx_general_cmd,
        "query": obj.query,
        "modify": obj.modify,
    }


@pytest.mark.parametrize("call", ["create", "general", "query", "modify"])
def test_mailbox_validation(ctx: mlx5tlp.Context, call: str) -> None:
    obj = ctx.create_devx_obj(create_cmd(), 16)
    fn = _calls(ctx, obj)[call]
    for bad in BAD_TYPES:
        with pytest.raises(TypeError):
            fn(bad, 16)  # type: ignore[operator]
    for short in BAD_LENGTHS:
        with pytest.raises(ValueError):
            fn(short, 16)  # type: ignore[operator]
    for out_len in BAD_OUT_LENS:
        with pytest.raises(ValueError):
            fn(create_cmd(), out_len)  # type: ignore[operator]
    # bytearray and memoryview mailboxes are accepted.
    if call == "query":
        assert fn(bytearray(QUERY), 32)[0] == 0  # type: ignore[operator,index]
        assert fn(memoryview(QUERY), 1 << 20)[0] == 0  # type: ignore[operator,index]
    # Nothing was created by the refused calls.
    assert sim.device_stats(ctx.name)["devx_objs"] == 1
    obj.free()


def test_export_closed_object(ctx: mlx5tlp.Context) -> None:
    obj = ctx.create_devx_obj(create_cmd(), 16)
    obj.close()
    with pytest.raises(mlx5tlp.InvalidHandleError):
        obj.export()
    assert "closed" in repr(obj)
