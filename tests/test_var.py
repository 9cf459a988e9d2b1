"""Tests of mlx5tlp.Var: TLP gateway and VirtIO VAR pages (the pyverbs VAR scenarios)."""

from __future__ import annotations

import errno
import mmap

import pytest

import mlx5tlp
from mlx5tlp import sim

RW = mmap.PROT_READ | mmap.PROT_WRITE


def test_alloc_tlp_var_and_map_it(ctx: mlx5tlp.Context) -> None:
    var = ctx.alloc_var(tlp=True)
    assert var.is_tlp
    assert not var.imported
    assert not var.closed
    assert var.context is ctx
    assert var.length == ctx.query_tlp_caps().gw_page_stride == 4096
    assert 0 <= var.page_id < 8
    assert var.mmap_off % mmap.PAGESIZE == 0
    assert var.probe()
    assert sim.device_stats(ctx.name)["tlp_vars"] == 1
    assert sim.device_stats(ctx.name)["gw_pages_free"] == 7

    # Plain Python mmap on the command fd, as pyverbs does.
    with (
        mmap.mmap(ctx.cmd_fd, var.length, offset=var.mmap_off) as first,
        mmap.mmap(ctx.cmd_fd, var.length, offset=var.mmap_off) as second,
    ):
        first[0:8] = b"\x01\x02\x03\x04\x05\x06\x07\x08"
        first[var.length - 4 :] = b"tail"
        assert second[0:8] == b"\x01\x02\x03\x04\x05\x06\x07\x08"
        assert second[var.length - 4 :] == b"tail"
    # And through Var.mmap.
    with var.mmap(RW) as m:
        assert m[0:8] == b"\x01\x02\x03\x04\x05\x06\x07\x08"
        assert len(m) == var.length
    var.free()
    assert var.closed
    assert sim.device_stats(ctx.name)["gw_pages_free"] == 8


def test_distinct_pages_do_not_alias(ctx: mlx5tlp.Context) -> None:
    a = ctx.alloc_var(tlp=True)
    b = ctx.alloc_var(tlp=True)
    assert a.page_id != b.page_id
    assert a.mmap_off != b.mmap_off
    with a.mmap(RW) as ma, b.mmap(RW) as mb:
        ma[0:4] = b"AAAA"
        mb[0:4] = b"BBBB"
        assert ma[0:4] == b"AAAA"
        assert mb[0:4] == b"BBBB"
    a.free()
    b.free()


def test_export_import_mmap_unimport(ctx: mlx5tlp.Context) -> None:
    var = ctx.alloc_var(tlp=True)
    blob = var.export()
    with mlx5tlp.Context.import_fd(ctx.cmd_fd) as ictx:
        imp = ictx.import_var(blob)
        assert imp.imported
        assert imp.is_tlp
        assert imp.context is ictx
        assert (imp.page_id, imp.length, imp.mmap_off) == (var.page_id, var.length, var.mmap_off)
        assert imp.probe()
        with (
            mmap.mmap(ictx.cmd_fd, imp.length, offset=imp.mmap_off) as theirs,
            var.mmap(RW) as mine,
        ):
            theirs[16:24] = b"imported"
            assert mine[16:24] == b"imported"
        imp.unimport()
        assert imp.closed
        with pytest.raises(mlx5tlp.InvalidHandleError) as info:
            imp.mmap()
        assert info.value.errno == errno.EBADF
        # Unimporting leaves the page allocated for its owner.
        assert var.probe()
        assert sim.device_stats(ctx.name)["tlp_vars"] == 1
    var.free()


def test_exhaustion_and_recovery(ctx: mlx5tlp.Context) -> None:
    vars_ = [ctx.alloc_var(tlp=True) for _ in range(8)]
    assert sorted(v.page_id for v in vars_) == list(range(8))
    assert sim.device_stats(ctx.name)["gw_pages_free"] == 0
    with pytest.raises(mlx5tlp.ResourceExhaustedError) as info:
        ctx.alloc_var(tlp=True)
    assert info.value.errno == errno.ENOSPC  # the kernel: alloc_var_entry -> -ENOSPC
    assert info.value.operation is not None
    assert "mlx5dv_alloc_var" in info.value.operation
    # VirtIO pages are a separate pool.
    with ctx.alloc_var() as virtio:
        assert not virtio.is_tlp
    freed = vars_.pop(3)
    page = freed.page_id
    freed.free()
    again = ctx.alloc_var(tlp=True)
    assert again.page_id == page
    with pytest.raises(mlx5tlp.ResourceExhaustedError):
        ctx.alloc_var(tlp=True)
    again.free()
    for v in vars_:
        v.free()
    assert sim.device_stats(ctx.name)["gw_pages_free"] == 8


def test_tlp_var_not_supported(notlp_device: str) -> None:
    with mlx5tlp.open_device(notlp_device) as ctx:
        with pytest.raises(mlx5tlp.NotSupportedError) as info:
            ctx.alloc_var(tlp=True)
        assert info.value.errno == errno.EOPNOTSUPP
        assert sim.device_stats(notlp_device)["tlp_vars"] == 0


def test_virtio_var(notlp_device: str) -> None:
    with mlx5tlp.open_device(notlp_device) as ctx:
        var = ctx.alloc_var(tlp=False)
        assert not var.is_tlp
        assert var.length == mmap.PAGESIZE
        assert var.probe()
        assert sim.device_stats(notlp_device)["virtio_vars"] == 1
        assert sim.device_stats(notlp_device)["virtio_pages_free"] == 15
        with var.mmap(RW) as m:
            m[0:4] = b"ring"
            assert m[0:4] == b"ring"
        blob = var.export()
        with mlx5tlp.Context.import_fd(ctx.cmd_fd) as ictx:
            imp = ictx.import_var(blob)
            assert not imp.is_tlp
            assert imp.page_id == var.page_id
            imp.close()
        var.free()
        assert sim.device_stats(notlp_device)["virtio_pages_free"] == 16


def test_unimport_refuses_an_owned_var_and_an_importer_may_free(ctx: mlx5tlp.Context) -> None:
    var = ctx.alloc_var(tlp=True)
    with pytest.raises(mlx5tlp.InvalidArgumentError) as info:
        var.unimport()
    assert isinstance(info.value, ValueError)
    assert info.value.errno == errno.EINVAL
    assert not var.closed  # the refusal changed nothing
    with mlx5tlp.Context.import_fd(ctx.cmd_fd) as ictx:
        imp = ictx.import_var(var.export())
        # rdma-core allows free on an imported VAR (exactly one party frees; it may be an
        # importer taking over): the page goes back to the device.
        imp.free()
        assert imp.closed
        assert not var.probe()
        assert sim.device_stats(ctx.name)["tlp_vars"] == 0
    var.close()  # the owner's stale struct: released (free_var on a gone handle)
    assert var.closed


def test_double_free_and_use_after_free(ctx: mlx5tlp.Context) -> None:
    var = ctx.alloc_var(tlp=True)
    var.free()
    with pytest.raises(mlx5tlp.InvalidHandleError) as info:
        var.free()
    assert info.value.errno == errno.EBADF
    for call in (var.export, var.mmap, var.unimport):
        with pytest.raises(mlx5tlp.InvalidHandleError):
            call()
    var.close()  # close stays idempotent
    assert sim.device_stats(ctx.name)["gw_pages_free"] == 8


def test_import_of_a_freed_var_is_refused(ctx: mlx5tlp.Context) -> None:
    var = ctx.alloc_var(tlp=True)
    blob = var.export()
    var.free()
    with mlx5tlp.Context.import_fd(ctx.cmd_fd) as ictx:
        with pytest.raises(mlx5tlp.InvalidHandleError) as info:
            ictx.import_var(blob)
        assert info.value.errno == errno.EINVAL
        assert info.value.operation == "mlx5dv_var_import"
    # Same on the exporting context itself.
    with pytest.raises(mlx5tlp.InvalidHandleError):
        ctx.import_var(blob)


def test_importer_sees_owner_free(ctx: mlx5tlp.Context) -> None:
    var = ctx.alloc_var(tlp=True)
    with mlx5tlp.Context.import_fd(ctx.cmd_fd) as ictx:
        imp = ictx.import_var(var.export())
        assert imp.probe()
        var.free()
        assert not imp.probe()
        assert not imp.closed  # still needs its unimport
        with pytest.raises(mlx5tlp.InvalidHandleError) as info:
            imp.mmap()
        assert info.value.errno == errno.EINVAL
        imp.unimport()
        assert imp.closed


def test_page_reused_after_free_is_a_new_allocation(ctx: mlx5tlp.Context) -> None:
    var = ctx.alloc_var(tlp=True)
    with mlx5tlp.Context.import_fd(ctx.cmd_fd) as ictx:
        imp = ictx.import_var(var.export())
        page = var.page_id
        var.free()
        others = [ctx.alloc_var(tlp=True) for _ in range(8)]
        assert page in {o.page_id for o in others}
        # The page is allocated again, so the stale import maps it: the envelope cannot tell.
        # What matters is that nothing crashes and close still only unimports.
        imp.close()
        for o in others:
            assert o.probe()
            o.free()


def test_separate_open_device_cannot_import(ctx: mlx5tlp.Context) -> None:
    var = ctx.alloc_var(tlp=True)
    blob = var.export()
    # A second open_device() on the same device is another ucontext: the kernel scopes VAR
    # pages (and their mmap offsets) to the ucontext (the command fd) that allocated them.
    # Only a context created from that fd (ibv_import_device) shares the objects, so the
    # envelope passes every format check but the mapping is refused.
    with mlx5tlp.open_device(ctx.name) as other:
        assert not other.imported
        with pytest.raises(mlx5tlp.InvalidHandleError) as info:
            other.import_var(blob)
        assert info.value.errno == errno.EINVAL
        assert "import_fd" in str(info.value)
        # (A raw mmap of the offset on other.cmd_fd is not checked here: the software device
        # cannot police a plain mmap() of its command fd, only the mapping the library asks
        # it for.)
    assert var.probe()
    var.free()


def test_repr(ctx: mlx5tlp.Context) -> None:
    var = ctx.alloc_var(tlp=True)
    assert "TLP gateway VAR" in repr(var)
    assert "owned" in repr(var)
    var.free()
    assert "closed" in repr(var)
    virtio = ctx.alloc_var()
    assert "VirtIO" in repr(virtio)
    virtio.close()
