"""Tests of mlx5tlp.Context: opening, importing from an fd, closing, capabilities, threads."""

from __future__ import annotations

import errno
import os
import pickle
import threading
from collections.abc import Iterator

import pytest

import mlx5tlp
from mlx5tlp import sim

CREATE_OBJ = bytes([0x0A, 0x00, 0, 0, 0, 0, 0, 0x42]) + bytes(8)


def same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


@pytest.fixture
def wide_device() -> Iterator[str]:
    """A device with the largest gateway (15 pages) and a 16 KiB page stride."""
    name = f"wide{os.getpid()}"
    sim.create_device(name, gw_pages=15, gw_log_stride=2)
    yield name
    sim.remove_device(name)


# -- opening ---------------------------------------------------------------------------------


def test_open_named_device(device: str) -> None:
    with mlx5tlp.open_device(device, backend="sim") as ctx:
        assert ctx.name == device
        assert ctx.backend == "sim"
        assert not ctx.imported
        assert not ctx.closed
        assert ctx.cmd_fd >= 0
        os.fstat(ctx.cmd_fd)  # a real, open fd
        assert ctx.identity.name == device
        assert ctx.identity.backend == "sim"
        assert ctx.identity.node_guid == sim.device_config(device)["node_guid"]
        assert sim.device_stats(device)["contexts"] == 1
    assert ctx.closed
    assert sim.device_stats(device)["contexts"] == 0


def test_open_default_device_uses_environment_backend(device: str) -> None:
    # conftest sets MLX5TLP_BACKEND=sim; the first device is opened when no name is given.
    with mlx5tlp.open_device() as ctx:
        assert ctx.backend == "sim"
        names = [d.name for d in mlx5tlp.list_devices("sim")]
        assert ctx.name in names
        assert ctx.name == names[0]


def test_open_unknown_device_names_the_available_ones(device: str) -> None:
    with pytest.raises(mlx5tlp.DeviceNotFoundError) as info:
        mlx5tlp.open_device("no_such_device", backend="sim")
    err = info.value
    assert isinstance(err, mlx5tlp.Error)
    assert isinstance(err, OSError)
    assert err.errno == errno.ENODEV
    assert "no_such_device" in str(err)
    assert device in str(err)  # lists what does exist
    assert sim.device_stats(device)["contexts"] == 0


def test_open_device_argument_checks() -> None:
    with pytest.raises(TypeError):
        mlx5tlp.open_device(5)  # type: ignore[arg-type]
    with pytest.raises(mlx5tlp.InvalidArgumentError) as info:
        mlx5tlp.open_device(backend="no-such-backend")
    assert isinstance(info.value, ValueError)


# -- import_fd -------------------------------------------------------------------------------


def test_import_fd_duplicates_the_fd(ctx: mlx5tlp.Context) -> None:
    mine = os.dup(ctx.cmd_fd)
    try:
        imported = mlx5tlp.Context.import_fd(mine)
    except BaseException:
        os.close(mine)
        raise
    with imported:
        assert imported.imported
        assert imported.name == ctx.name
        assert imported.identity == ctx.identity
        assert imported.cmd_fd != mine
        assert same_file(imported.cmd_fd, mine)
        # The caller still owns its fd: closing it leaves the imported context working.
        os.close(mine)
        caps = imported.query_tlp_caps()
        assert caps.gw_num_pages == 8
        with imported.alloc_var(tlp=True) as var:
            assert var.probe()
    assert imported.closed


def test_closing_imported_context_keeps_callers_fd(ctx: mlx5tlp.Context) -> None:
    fd = ctx.cmd_fd
    before = os.fstat(fd)
    imported = mlx5tlp.Context.import_fd(fd)
    imported.close()
    after = os.fstat(fd)  # raises EBADF if import_fd had taken (and closed) our fd
    assert (before.st_dev, before.st_ino) == (after.st_dev, after.st_ino)
    assert ctx.query_tlp_caps().supported


def test_import_fd_of_a_non_device_fd() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(mlx5tlp.InvalidHandleError) as info:
            mlx5tlp.Context.import_fd(r)
        assert info.value.errno == errno.EINVAL
        os.fstat(r)  # our fd is still ours and open
    finally:
        os.close(r)
        os.close(w)


def test_import_fd_of_a_closed_fd() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(mlx5tlp.InvalidHandleError) as info:
        mlx5tlp.Context.import_fd(r)
    assert info.value.errno == errno.EBADF


@pytest.mark.parametrize("bad", [-1, -100, True, 3.0, "3", None])
def test_import_fd_argument_checks(bad: object) -> None:
    with pytest.raises(ValueError):
        mlx5tlp.Context.import_fd(bad)  # type: ignore[arg-type]


# -- close -----------------------------------------------------------------------------------


def test_use_after_close(device: str) -> None:
    ctx = mlx5tlp.open_device(device)
    ctx.close()
    assert ctx.closed
    checks = [
        lambda: ctx.cmd_fd,
        lambda: ctx.alloc_var(tlp=True),
        lambda: ctx.alloc_var(),
        ctx.query_tlp_caps,
        lambda: ctx.create_devx_obj(CREATE_OBJ, 16),
        lambda: ctx.reg_umem(mlx5tlp.alloc_umem_buffer(4096)),
    ]
    for call in checks:
        with pytest.raises(mlx5tlp.InvalidHandleError) as info:
            call()
        assert info.value.errno == errno.EBADF
    assert "closed" in repr(ctx)
    assert ctx.name == device  # the name stays readable


def test_close_is_idempotent(device: str) -> None:
    ctx = mlx5tlp.open_device(device)
    ctx.close()
    ctx.close()
    with ctx:
        pass
    assert ctx.closed
    assert sim.device_stats(device)["contexts"] == 0


def test_close_closes_children(device: str) -> None:
    ctx = mlx5tlp.open_device(device)
    tlp = [ctx.alloc_var(tlp=True) for _ in range(3)]
    virtio = ctx.alloc_var()
    umem = ctx.reg_umem(mlx5tlp.alloc_umem_buffer(8192))
    obj = ctx.create_devx_obj(CREATE_OBJ, 16)
    imported_ctx = mlx5tlp.Context.import_fd(ctx.cmd_fd)
    imp = imported_ctx.import_var(tlp[0].export())
    stats = sim.device_stats(device)
    assert stats["tlp_vars"] == 3
    assert stats["virtio_vars"] == 1
    assert stats["umems"] == 1
    assert stats["devx_objs"] == 1
    assert stats["gw_pages_free"] == 5
    assert stats["virtio_pages_free"] == 15

    ctx.close()
    for o in [*tlp, virtio, umem, obj]:
        assert o.closed
        with pytest.raises(mlx5tlp.InvalidHandleError):
            o.export()
        o.close()  # still idempotent
    stats = sim.device_stats(device)
    assert stats["tlp_vars"] == 0
    assert stats["virtio_vars"] == 0
    assert stats["umems"] == 0
    assert stats["devx_objs"] == 0
    assert stats["gw_pages_free"] == 8
    assert stats["virtio_pages_free"] == 16
    # The other context's import is its own: not closed, but its page is gone.
    assert not imp.closed
    assert not imp.probe()
    imported_ctx.close()
    assert imp.closed
    assert sim.device_stats(device)["contexts"] == 0


def test_context_cannot_be_pickled(ctx: mlx5tlp.Context) -> None:
    with pytest.raises(TypeError, match="import_fd"):
        pickle.dumps(ctx)


def test_repr(ctx: mlx5tlp.Context) -> None:
    assert ctx.name in repr(ctx)
    assert f"cmd_fd={ctx.cmd_fd}" in repr(ctx)
    with mlx5tlp.Context.import_fd(ctx.cmd_fd) as imp:
        assert "imported" in repr(imp)


# -- capabilities ----------------------------------------------------------------------------


def test_query_tlp_caps_default(ctx: mlx5tlp.Context) -> None:
    caps = ctx.query_tlp_caps()
    assert caps == mlx5tlp.TlpCaps(
        supported=True,
        gw_num_pages=8,
        gw_page_stride=4096,
        gw_bar_offset=0x200000,
        gw_log_stride=0,
    )


def test_query_tlp_caps_wide(wide_device: str) -> None:
    with mlx5tlp.open_device(wide_device) as ctx:
        caps = ctx.query_tlp_caps()
        assert caps.supported
        assert caps.gw_num_pages == 15
        assert caps.gw_log_stride == 2
        assert caps.gw_page_stride == 16384
        assert caps.gw_bar_offset == 0x200000
        # The caps describe what alloc_var hands out.
        vars_ = [ctx.alloc_var(tlp=True) for _ in range(15)]
        assert {v.length for v in vars_} == {16384}
        assert sorted(v.page_id for v in vars_) == list(range(15))
        with pytest.raises(mlx5tlp.ResourceExhaustedError):
            ctx.alloc_var(tlp=True)
        for v in vars_:
            v.free()


def test_query_tlp_caps_without_tlp(notlp_device: str) -> None:
    with mlx5tlp.open_device(notlp_device) as ctx:
        caps = ctx.query_tlp_caps()
        assert not caps.supported
        assert caps.gw_num_pages == 0


# -- threads ---------------------------------------------------------------------------------


def test_threads_allocate_and_free_concurrently(device: str) -> None:
    ctx = mlx5tlp.open_device(device)
    errors: list[BaseException] = []
    leftovers: list[mlx5tlp.Var] = []
    start = threading.Barrier(4)
    lock = threading.Lock()

    def worker(n: int) -> None:
        try:
            start.wait()
            for i in range(60):
                # At most 2 TLP pages per thread: 4 threads never exhaust the 8 pages.
                a = ctx.alloc_var(tlp=True)
                b = ctx.alloc_var(tlp=bool(i % 2))
                assert a.probe()
                assert a.is_tlp
                a.free()
                if i == 59 and n % 2:
                    with lock:
                        leftovers.append(b)  # left for ctx.close()
                else:
                    b.close()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert len(leftovers) == 2
    stats = sim.device_stats(device)
    assert stats["tlp_vars"] + stats["virtio_vars"] == 2
    ctx.close()
    assert all(v.closed for v in leftovers)
    stats = sim.device_stats(device)
    assert stats["gw_pages_free"] == 8
    assert stats["virtio_pages_free"] == 16
    assert stats["contexts"] == 0


def test_close_while_other_threads_use_the_context(device: str) -> None:
    ctx = mlx5tlp.open_device(device)
    stop = threading.Event()
    unexpected: list[BaseException] = []

    def worker() -> None:
        while not stop.is_set():
            try:
                with ctx.alloc_var(tlp=False):
                    pass
            except mlx5tlp.InvalidHandleError:
                return  # the context was closed under us: the documented outcome
            except BaseException as exc:  # pragma: no cover
                unexpected.append(exc)
                return

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    ctx.close()
    stop.set()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert unexpected == []
    stats = sim.device_stats(device)
    assert stats["contexts"] == 0
    assert stats["virtio_pages_free"] == 16
