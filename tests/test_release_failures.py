"""Releases that fail, mappings that block a free, and close() racing allocations.

Issue 10 A6 (only ENOENT releases a handle; EBUSY/EREMOTEIO leave it alive and retryable; a
UMEM's buffer stays pinned until its dereg succeeded; Context.close() names what it could not
release), D7 (Var.free() refused while any mapping made through the API is alive) and C4
(Context.close() never misses an allocation in flight). Faults are injected in the software
device (mlx5tlp.sim.inject_fault), which fails the call and leaves the object alive, as a kernel
that returns EBUSY (rdma_core.c: uobj still in use) or firmware that refuses a destroy does.
"""

from __future__ import annotations

import errno
import gc
import mmap
import struct
import threading

import pytest

import mlx5tlp
from mlx5tlp import sim

CREATE_OBJ = struct.pack(">HHHH", 0x0A00, 0, 0, 0x42) + bytes(8)
QUERY = struct.pack(">HHHH", 0x0A02, 0, 0, 0x42) + bytes(8)
RW = mmap.PROT_READ | mmap.PROT_WRITE


def test_refused_dereg_leaves_the_umem_alive_and_its_buffer_pinned(ctx: mlx5tlp.Context) -> None:
    buf = bytearray(8192)
    umem = ctx.reg_umem(buf, allow_unaligned=True)
    sim.inject_fault(ctx.name, "umem_dereg", errno.EBUSY, 1)
    with pytest.raises(mlx5tlp.Error) as info:
        umem.free()
    assert info.value.errno == errno.EBUSY
    assert "mlx5dv_devx_umem_dereg" in str(info.value)
    assert f"UMEM {umem.umem_id} is still alive" in str(info.value)
    assert not umem.closed
    assert sim.device_stats(ctx.name)["umems"] == 1
    assert len(umem.export()) > 0  # still usable
    with pytest.raises(BufferError):
        buf.append(0)  # still exported to the core: cannot move while registered
    umem.free()  # the retry succeeds
    assert umem.closed
    assert sim.device_stats(ctx.name)["umems"] == 0
    buf.append(0)  # released only now


@pytest.mark.parametrize("err", [errno.EBUSY, errno.EIO, errno.EAGAIN])
def test_refused_close_of_a_umem_keeps_it(ctx: mlx5tlp.Context, err: int) -> None:
    umem = ctx.reg_umem(mlx5tlp.alloc_umem_buffer(4096))
    sim.inject_fault(ctx.name, "umem_dereg", err, 1)
    with pytest.raises(mlx5tlp.Error) as info:
        umem.close()
    assert info.value.errno == err
    assert not umem.closed
    umem.close()
    assert umem.closed


def test_firmware_refused_destroy_names_the_operation(ctx: mlx5tlp.Context) -> None:
    obj = ctx.create_devx_obj(CREATE_OBJ, 16)
    sim.inject_fault(ctx.name, "devx_obj_destroy", errno.EREMOTEIO, 1)
    with pytest.raises(mlx5tlp.DevxCommandError) as info:
        obj.free()
    assert info.value.errno == errno.EREMOTEIO
    assert info.value.operation == "mlx5dv_devx_obj_destroy"
    assert "firmware refused" in str(info.value)
    assert not obj.closed
    assert obj.query(QUERY, 32)[16:] == CREATE_OBJ  # alive and usable
    obj.free()
    assert obj.closed
    assert sim.device_stats(ctx.name)["devx_objs"] == 0


def test_destroy_of_an_object_already_gone_releases_the_handle(ctx: mlx5tlp.Context) -> None:
    obj = ctx.create_devx_obj(CREATE_OBJ, 16)
    with mlx5tlp.Context.import_fd(ctx.cmd_fd) as ictx:
        ictx.import_devx_obj(obj.export()).free()  # the other party freed it
    with pytest.raises(mlx5tlp.InvalidHandleError) as info:
        obj.free()
    assert info.value.errno == errno.ENOENT
    assert obj.closed  # only ENOENT releases; nothing is freed twice
    with pytest.raises(mlx5tlp.InvalidHandleError) as again:
        obj.free()
    assert again.value.errno == errno.EBADF


def test_context_close_names_what_it_could_not_release(device: str) -> None:
    ctx = mlx5tlp.open_device(device)
    buf = bytearray(4096)
    umem = ctx.reg_umem(buf, allow_unaligned=True)
    obj = ctx.create_devx_obj(CREATE_OBJ, 16)
    var = ctx.alloc_var(tlp=True)
    sim.inject_fault(device, "umem_dereg", errno.EBUSY, 1)
    with pytest.raises(mlx5tlp.Error) as info:
        ctx.close()
    msg = str(info.value)
    assert info.value.errno == errno.EBUSY
    assert f"close context '{device}'" in msg
    assert f"UMEM {umem.umem_id}" in msg and "1 object(s)" in msg
    # The others were released; the stuck one and the context stay open and usable.
    assert obj.closed and var.closed
    assert not umem.closed and not ctx.closed
    with pytest.raises(BufferError):
        buf.append(0)
    assert ctx.query_tlp_caps().supported
    ctx.close()  # the retry releases it, then the context
    assert umem.closed and ctx.closed
    buf.append(0)
    st = sim.device_stats(device)
    assert (st["umems"], st["devx_objs"], st["tlp_vars"], st["contexts"]) == (0, 0, 0, 0)


# -- D7: a VAR's mappings ----------------------------------------------------------------------


def test_free_is_refused_while_a_python_mapping_is_open(ctx: mlx5tlp.Context) -> None:
    var = ctx.alloc_var(tlp=True)
    m = var.mmap(RW)
    assert isinstance(m, mmap.mmap)
    m[0:4] = b"page"
    with pytest.raises(mlx5tlp.InvalidArgumentError) as info:
        var.free()
    assert info.value.errno == errno.EBUSY
    assert f"VAR page {var.page_id} is still mapped" in str(info.value)
    assert not var.closed and var.probe()
    m.close()
    m.close()  # idempotent: uncounted once
    with var.mmap(RW) as m2:
        assert m2[0:4] == b"page"
        with pytest.raises(mlx5tlp.InvalidArgumentError):
            var.close()
    var.free()
    assert var.closed


def test_a_collected_mapping_no_longer_blocks_free(ctx: mlx5tlp.Context) -> None:
    var = ctx.alloc_var(tlp=True)
    m = var.mmap(RW)
    del m
    gc.collect()
    var.free()


def test_context_close_refuses_while_a_page_is_mapped(device: str) -> None:
    ctx = mlx5tlp.open_device(device)
    var = ctx.alloc_var(tlp=True)
    m = var.mmap(RW)
    with pytest.raises(mlx5tlp.Error) as info:
        ctx.close()
    assert f"TLP gateway VAR page {var.page_id}" in str(info.value)
    assert not ctx.closed and not var.closed
    m.close()
    ctx.close()
    assert var.closed and ctx.closed


def test_mmap_of_a_closed_var_is_refused(ctx: mlx5tlp.Context) -> None:
    var = ctx.alloc_var(tlp=True)
    var.free()
    with pytest.raises(mlx5tlp.InvalidHandleError):
        var.mmap(RW)


# -- C4: close() against allocations in flight -------------------------------------------------


def test_close_never_misses_an_allocation_in_flight(device: str) -> None:
    for _ in range(10):
        ctx = mlx5tlp.open_device(device)
        made: list[mlx5tlp.DeviceObject] = []
        refused: list[BaseException] = []
        errors: list[BaseException] = []
        start = threading.Barrier(4)

        def allocate(kind: int, c: mlx5tlp.Context = ctx, made: list = made,
                     refused: list = refused, errors: list = errors,
                     start: threading.Barrier = start) -> None:
            start.wait()
            held: list[mlx5tlp.DeviceObject] = []
            while True:
                try:
                    if kind == 0:
                        o: mlx5tlp.DeviceObject = c.create_devx_obj(CREATE_OBJ, 16)
                    elif kind == 1:
                        o = c.reg_umem(mlx5tlp.alloc_umem_buffer(4096))
                    else:
                        o = c.alloc_var(tlp=False)
                        o.close()  # VirtIO pages are few: give it back, keep allocating
                        continue
                except mlx5tlp.InvalidHandleError as exc:
                    refused.append(exc)  # the context closed (or is closing): clean refusal
                    return
                except BaseException as exc:  # reported below
                    errors.append(exc)
                    return
                made.append(o)
                held.append(o)
                if len(held) > 32:
                    # Keep a bounded number alive: under load close() may come late, and an
                    # unbounded loop would exhaust RLIMIT_MEMLOCK / DEVX space first.
                    try:
                        held.pop(0).close()
                    except mlx5tlp.InvalidHandleError as exc:
                        refused.append(exc)
                        return

        threads = [threading.Thread(target=allocate, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        start.wait()
        ctx.close()
        for t in threads:
            t.join(30)
            assert not t.is_alive()
        assert not errors, errors
        assert len(refused) == 3
        # Every object an allocation returned was adopted before close() took its snapshot,
        # so close() released it: none outlives the context, and the device holds nothing.
        assert all(o.closed for o in made)
        st = sim.device_stats(device)
        assert (st["contexts"], st["umems"], st["devx_objs"], st["virtio_vars"]) == (0, 0, 0, 0)
