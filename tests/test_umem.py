"""Tests of mlx5tlp.Umem: registration, buffer lifetime, export/import, dereg vs unimport."""

from __future__ import annotations

import errno
import gc
import mmap
import os
import weakref

import pytest

import mlx5tlp
from mlx5tlp import sim


def test_reg_bytearray(ctx: mlx5tlp.Context) -> None:
    buf = bytearray(3 * mmap.PAGESIZE)
    # The software device's fork status is "unneeded", so an unaligned heap buffer is fine.
    umem = ctx.reg_umem(buf, allow_unaligned=True)
    assert not umem.imported
    assert umem.size == len(buf)
    assert umem.umem_id > 0
    assert umem.context is ctx
    assert sim.device_stats(ctx.name)["umems"] == 1
    assert "owned" in repr(umem)
    umem.free()
    assert umem.closed
    assert "closed" in repr(umem)
    assert sim.device_stats(ctx.name)["umems"] == 0


def test_reg_alloc_umem_buffer(ctx: mlx5tlp.Context) -> None:
    buf = mlx5tlp.alloc_umem_buffer(5000)
    assert len(buf) == 2 * mmap.PAGESIZE  # rounded to whole pages
    with ctx.reg_umem(buf, mlx5tlp.ACCESS_LOCAL_WRITE | mlx5tlp.ACCESS_REMOTE_READ) as umem:
        assert umem.size == len(buf)
        buf[0:5] = b"hello"  # still the user's memory
    assert umem.closed
    buf.close()


def test_alloc_umem_buffer_with_fd(ctx: mlx5tlp.Context) -> None:
    fd = os.memfd_create("umem-test", os.MFD_CLOEXEC)
    try:
        buf = mlx5tlp.alloc_umem_buffer(100, fd=fd)
        assert os.fstat(fd).st_size == mmap.PAGESIZE
        with ctx.reg_umem(buf) as umem:
            buf[0:3] = b"abc"
            assert os.pread(fd, 3, 0) == b"abc"
            assert umem.size == mmap.PAGESIZE
        buf.close()
    finally:
        os.close(fd)


def test_alloc_umem_buffer_argument_checks() -> None:
    for bad in (0, -1, 1.5, "1"):
        with pytest.raises(ValueError):
            mlx5tlp.alloc_umem_buffer(bad)  # type: ignore[arg-type]


def test_distinct_ids(ctx: mlx5tlp.Context) -> None:
    umems = [ctx.reg_umem(mlx5tlp.alloc_umem_buffer(4096)) for _ in range(4)]
    assert len({u.umem_id for u in umems}) == 4
    for u in umems:
        u.close()


def test_export_import_preserves_id(ctx: mlx5tlp.Context) -> None:
    umem = ctx.reg_umem(mlx5tlp.alloc_umem_buffer(4096))
    with mlx5tlp.Context.import_fd(ctx.cmd_fd) as ictx:
        imp = ictx.import_umem(umem.export())
        assert imp.imported
        assert imp.umem_id == umem.umem_id
        assert imp.size == 0  # the export carries the id, not the memory
        assert imp.context is ictx
        assert "imported" in repr(imp)
        imp.unimport()
        assert imp.closed
    # Unimporting left the owner's registration alone.
    assert sim.device_stats(ctx.name)["umems"] == 1
    umem.export()
    umem.free()


def test_buffer_kept_alive(ctx: mlx5tlp.Context) -> None:
    buf = mlx5tlp.alloc_umem_buffer(4096)
    alive = weakref.ref(buf)
    umem = ctx.reg_umem(buf)
    del buf
    gc.collect()
    assert alive() is not None  # the UMEM holds the buffer
    alive()[0:4] = b"live"  # type: ignore[index]
    assert umem.umem_id > 0
    assert umem.export()
    umem.close()
    gc.collect()
    assert alive() is None  # and lets it go on close


def test_bytearray_cannot_be_resized_while_registered(ctx: mlx5tlp.Context) -> None:
    buf = bytearray(4096)
    umem = ctx.reg_umem(buf, allow_unaligned=True)
    with pytest.raises(BufferError):
        buf.append(0)
    with pytest.raises(BufferError):
        buf.extend(b"xx")
    with pytest.raises(BufferError):
        del buf[0:10]
    assert len(buf) == 4096
    buf[0] = 7  # writing in place is fine
    umem.close()
    buf.append(0)
    assert len(buf) == 4097


def test_bytearray_resizable_after_free(ctx: mlx5tlp.Context) -> None:
    buf = bytearray(4096)
    umem = ctx.reg_umem(buf, allow_unaligned=True)
    umem.free()
    buf.extend(b"more")
    assert len(buf) == 4100


def test_context_close_releases_the_buffer(device: str) -> None:
    # Context.close() closes every object on it; a closed UMEM must not keep the user's
    # buffer exported (locked against resizing) or alive, without an extra umem.close().
    buf = bytearray(4096)
    mbuf = mlx5tlp.alloc_umem_buffer(4096)
    alive = weakref.ref(mbuf)
    ctx = mlx5tlp.open_device(device)
    umem = ctx.reg_umem(buf, allow_unaligned=True)
    umem2 = ctx.reg_umem(mbuf)
    del mbuf
    ctx.close()
    assert umem.closed
    assert umem2.closed
    buf.append(1)  # BufferError while the closed UMEM still holds its memoryview
    assert len(buf) == 4097
    gc.collect()
    assert alive() is None


def test_explicit_close_after_context_close_releases_the_buffer(device: str) -> None:
    buf = bytearray(4096)
    ctx = mlx5tlp.open_device(device)
    umem = ctx.reg_umem(buf, allow_unaligned=True)
    ctx.close()
    umem.close()  # idempotent, and releases the buffer
    buf.append(1)
    with pytest.raises(mlx5tlp.InvalidHandleError) as info:
        umem.free()
    assert info.value.errno == errno.EBADF


def test_read_only_buffer(ctx: mlx5tlp.Context) -> None:
    with pytest.raises(TypeError, match="writable"):
        ctx.reg_umem(bytes(4096))
    with pytest.raises(TypeError):
        ctx.reg_umem(memoryview(bytearray(4096)).toreadonly())


def test_not_a_buffer(ctx: mlx5tlp.Context) -> None:
    with pytest.raises(TypeError):
        ctx.reg_umem(4096)
    with pytest.raises(TypeError):
        ctx.reg_umem("text")


def test_empty_buffer(ctx: mlx5tlp.Context) -> None:
    with pytest.raises(ValueError, match="empty"):
        ctx.reg_umem(bytearray(), allow_unaligned=True)
    assert sim.device_stats(ctx.name)["umems"] == 0


def test_non_contiguous_buffer(ctx: mlx5tlp.Context) -> None:
    view = memoryview(bytearray(8192))[::2]
    with pytest.raises(ValueError, match="contiguous"):
        ctx.reg_umem(view, allow_unaligned=True)
    view.release()
    assert sim.device_stats(ctx.name)["umems"] == 0


@pytest.mark.parametrize("access", [-1, 1 << 15, "rw", 1.0])
def test_bad_access(ctx: mlx5tlp.Context, access: object) -> None:
    buf = bytearray(4096)
    with pytest.raises(ValueError):
        ctx.reg_umem(buf, access, allow_unaligned=True)
    buf.append(0)  # a refused registration holds nothing


def test_dereg_vs_unimport(ctx: mlx5tlp.Context) -> None:
    umem = ctx.reg_umem(mlx5tlp.alloc_umem_buffer(4096))
    with pytest.raises(mlx5tlp.InvalidArgumentError) as info:
        umem.unimport()
    assert info.value.errno == errno.EINVAL
    assert not umem.closed
    with mlx5tlp.Context.import_fd(ctx.cmd_fd) as ictx:
        imp = ictx.import_umem(umem.export())
        imp.unimport()  # unimport leaves the kernel object alone
        assert sim.device_stats(ctx.name)["umems"] == 1
        other = ictx.import_umem(umem.export())
        # free on an import destroys it (rdma-core: exactly one party frees, maybe an importer)
        other.free()
        assert other.closed
        assert sim.device_stats(ctx.name)["umems"] == 0
    # The owner's dereg now finds nothing (ENOENT): its handle is released, with that error.
    with pytest.raises(mlx5tlp.InvalidHandleError) as hinfo:
        umem.free()
    assert hinfo.value.errno == errno.ENOENT
    assert umem.closed
    with pytest.raises(mlx5tlp.InvalidHandleError) as hinfo:
        umem.free()
    assert hinfo.value.errno == errno.EBADF
    assert sim.device_stats(ctx.name)["umems"] == 0


def test_import_after_owner_deregistered(ctx: mlx5tlp.Context) -> None:
    umem = ctx.reg_umem(mlx5tlp.alloc_umem_buffer(4096))
    blob = umem.export()
    umem.free()
    with mlx5tlp.Context.import_fd(ctx.cmd_fd) as ictx:
        # The envelope is well-formed and rdma-core's import asks the kernel nothing; the
        # software device's identity check finds no UMEM with its handle: refused at import
        # (docs/export-format.md says what rdma-core itself cannot detect).
        with pytest.raises(mlx5tlp.InvalidHandleError, match="exporter freed it") as info:
            ictx.import_umem(blob)
        assert info.value.errno == errno.ENOENT
        assert sim.device_stats(ctx.name)["umems"] == 0


def test_export_after_close(ctx: mlx5tlp.Context) -> None:
    umem = ctx.reg_umem(mlx5tlp.alloc_umem_buffer(4096))
    umem.close()
    with pytest.raises(mlx5tlp.InvalidHandleError) as info:
        umem.export()
    assert info.value.errno == errno.EBADF
