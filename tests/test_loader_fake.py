"""The loader and Context.import_fd against a fake rdma-core that misbehaves as the real one may.

tests/cpp/fake_rdma.c (built here with the system C compiler) exports rdma-core's functions
under its version nodes; ``MLX5TLP_IBVERBS_LIB`` / ``MLX5TLP_MLX5_LIB`` make the "rdma" backend
load it. Each test would fail on the code before the fix it names (issue 10 A1, A8, A9).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

import mlx5tlp
from mlx5tlp._cli_info import info_report

SRC = Path(__file__).parent / "cpp"


@pytest.fixture(scope="module")
def fake_lib(tmp_path_factory: pytest.TempPathFactory) -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("a C compiler (cc) is required to build tests/cpp/fake_rdma.c")
    out = tmp_path_factory.mktemp("fake_rdma") / "libfake_rdma.so"
    subprocess.run(
        [cc, "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror",
         f"-Wl,--version-script={SRC / 'fake_rdma.map'}", str(SRC / "fake_rdma.c"),
         "-o", str(out)],
        check=True,
    )
    return str(out)


@pytest.fixture
def fake_rdma(fake_lib: str, monkeypatch: pytest.MonkeyPatch) -> ctypes.CDLL:
    """The rdma backend is the fake (libibverbs and libmlx5 in one file)."""
    monkeypatch.setenv("MLX5TLP_IBVERBS_LIB", fake_lib)
    monkeypatch.setenv("MLX5TLP_MLX5_LIB", fake_lib)
    return ctypes.CDLL(fake_lib)  # the same handle the core loaded, to read its records


def test_is_supported_is_read_as_bool(fake_rdma: ctypes.CDLL) -> None:
    # rdma-core v63 providers/mlx5/mlx5dv.h: `bool mlx5dv_is_supported(struct ibv_device *)`.
    # The fake returns false in the low byte with garbage above it: read through an `int`
    # (as abi.h once declared it) the device looked like an mlx5 device.
    devices = mlx5tlp.list_devices("rdma")
    assert [(d.name, d.mlx5) for d in devices] == [("fake0", False)]
    with pytest.raises(mlx5tlp.NotSupportedError, match="not an mlx5 device"):
        mlx5tlp.open_device("fake0", backend="rdma")


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def test_import_failure_after_match_does_not_close_the_fd_again(
    fake_rdma: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch
) -> None:
    # libibverbs owns the fd once it matched the device and closes it on a later failure
    # (v63 libibverbs/device.c ibv_import_device -> mlx5_import_context -> mlx5_uninit_context).
    # The fake then hands that number to "another thread" (/dev/null): a second close by the
    # core would close that other owner's fd.
    monkeypatch.setenv("FAKE_RDMA_IMPORT", "closed")
    with open("/dev/zero", "rb") as caller:  # a character device, as /dev/infiniband/uverbs*
        with pytest.raises(mlx5tlp.Error) as info:
            mlx5tlp.Context.import_fd(caller.fileno(), backend="rdma")
        assert info.value.errno == 5  # EIO, from the fake's post-match failure
        assert "ibv_import_device" in str(info.value)
        reused = fake_rdma.fake_rdma_reused_fd()
        assert reused >= 0
        try:
            st = os.fstat(reused)  # EBADF here means the core closed it a second time
            assert os.path.samestat(st, os.stat("/dev/null"))
        finally:
            os.close(reused)
        os.fstat(caller.fileno())  # the caller's own fd is untouched


def test_import_failure_before_match_leaks_no_fd(
    fake_rdma: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An fd that matches no device stays the caller's (ENODEV): the core closes its duplicate.
    monkeypatch.setenv("FAKE_RDMA_IMPORT", "nomatch")
    with open("/dev/zero", "rb") as caller:
        before = _open_fds()
        with pytest.raises(mlx5tlp.DeviceNotFoundError):
            mlx5tlp.Context.import_fd(caller.fileno(), backend="rdma")
        assert _open_fds() == before


def test_import_of_a_non_character_device_never_reaches_the_library(
    fake_rdma: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch
) -> None:
    # libibverbs refuses a non-character-device fd with EINVAL before any match; the core
    # checks that itself, so that an EINVAL from the library always means "matched".
    monkeypatch.setenv("FAKE_RDMA_IMPORT", "closed")  # would close it if it got there
    r, w = os.pipe()
    try:
        before = _open_fds()
        with pytest.raises(mlx5tlp.InvalidHandleError, match="not a device context"):
            mlx5tlp.Context.import_fd(r, backend="rdma")
        assert _open_fds() == before
        assert stat.S_ISFIFO(os.fstat(r).st_mode)  # not closed and replaced by the fake
    finally:
        os.close(r)
        os.close(w)


def test_libmlx5_load_failure_is_reported_as_such(
    fake_lib: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # libibverbs loads, libmlx5 does not: every report carries dlopen's reason, none says
    # "needs rdma-core >= 63".
    missing = str(tmp_path / "libmlx5.so.1")
    monkeypatch.setenv("MLX5TLP_IBVERBS_LIB", fake_lib)
    monkeypatch.setenv("MLX5TLP_MLX5_LIB", missing)
    info = mlx5tlp.rdma_info("rdma")
    assert info.loaded
    assert info.mlx5_load_error is not None
    assert missing in info.mlx5_load_error
    assert "No such file or directory" in info.mlx5_load_error
    assert mlx5tlp.load_error("rdma") == info.mlx5_load_error
    with pytest.raises(mlx5tlp.NotSupportedError) as exc:
        mlx5tlp.open_device("fake0", backend="rdma")
    assert "libmlx5 could not be loaded" in str(exc.value)
    assert missing in str(exc.value)
    assert ">= 63" not in str(exc.value)
    rep = info_report("rdma")
    assert rep["mlx5_load_error"] == info.mlx5_load_error
    notes = " | ".join(rep["diagnostics"])
    assert "libmlx5 not loaded: " + missing in notes
    assert ">= 63" not in notes


def test_sim_backend_has_no_load_error() -> None:
    assert mlx5tlp.load_error("sim") is None
    assert mlx5tlp.rdma_info("sim").mlx5_load_error is None
