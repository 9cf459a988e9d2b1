"""The loader through Python: rdma-core found or not, capability flags, devices, selection."""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys

import pytest

import mlx5tlp

HAVE_RDMA_CORE = ctypes.util.find_library("ibverbs") is not None


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=60
    )


def test_ci_has_rdma_core() -> None:
    # CI installs Debian's rdma-core (libibverbs1, ibverbs-providers): the tests against the
    # real library below must run there, never silently take the not-installed path.
    if os.environ.get("CI") == "true":
        assert HAVE_RDMA_CORE, ".ci/run must install libibverbs1 and ibverbs-providers"


@pytest.mark.skipif(not HAVE_RDMA_CORE, reason="rdma-core not installed (CI installs it)")
def test_real_rdma_core_is_found_with_v63_symbols_absent_or_present() -> None:
    info = mlx5tlp.rdma_info("rdma")
    assert info.loaded and info.load_error is None
    assert info.backend == "rdma"
    assert any("libibverbs.so.1." in p for p in info.libraries)
    assert info.rdma_core_version is not None
    major = int(info.rdma_core_version.split(".")[0])
    caps = info.capabilities
    assert set(caps) == {
        "tlp_var", "var_export", "devx_obj_export", "devx_umem_export", "import_device", "devx"
    }
    if any("libmlx5.so.1." in p for p in info.libraries):
        for flag in ("tlp_var", "var_export", "devx_obj_export", "devx_umem_export"):
            assert caps[flag] is (major >= 63), flag
        assert caps["devx"] is True
    assert caps["import_device"] is (major >= 32)


@pytest.mark.skipif(not HAVE_RDMA_CORE, reason="rdma-core not installed (CI installs it)")
def test_real_rdma_core_without_devices() -> None:
    devices = mlx5tlp.list_devices("rdma")
    if devices:  # a machine with real hardware: nothing more to check here
        return
    with pytest.raises(mlx5tlp.DeviceNotFoundError) as exc:
        mlx5tlp.open_device(backend="rdma")
    assert exc.value.errno == 19  # ENODEV
    assert "no mlx5 device" in str(exc.value)


def test_missing_rdma_core_is_not_an_import_error() -> None:
    out = _run(
        "import mlx5tlp, json; i = mlx5tlp.rdma_info('rdma');"
        "print(json.dumps([i.loaded, i.libraries, i.rdma_core_version, i.load_error]))",
        MLX5TLP_IBVERBS_LIB="/nonexistent/libibverbs.so.1",
    )
    assert out.returncode == 0, out.stderr
    loaded, libs, version, error = json.loads(out.stdout)
    assert (loaded, libs, version) == (False, [], None)
    assert "/nonexistent/libibverbs.so.1" in error and "backend='sim'" in error


def test_missing_rdma_core_raises_on_use() -> None:
    out = _run(
        "import mlx5tlp\n"
        "try:\n    mlx5tlp.open_device(backend='rdma')\n"
        "except mlx5tlp.LibraryNotFoundError as e:\n"
        "    print('ok', isinstance(e, mlx5tlp.NotSupportedError))\n",
        MLX5TLP_IBVERBS_LIB="/nonexistent/libibverbs.so.1",
    )
    assert out.stdout.strip() == "ok True", out.stderr


def test_sim_backend_info() -> None:
    info = mlx5tlp.rdma_info("sim")
    assert info.loaded
    assert info.libraries and info.libraries[0].endswith("libmlx5tlp_sim.so")
    assert info.rdma_core_version == "63.0"
    assert all(info.capabilities.values())
    assert info.fork_status == "unneeded"


def test_list_devices_sim_has_default_device() -> None:
    devs = mlx5tlp.list_devices("sim")
    names = [d.name for d in devs]
    assert "mlx5_sim0" in names
    d = devs[names.index("mlx5_sim0")]
    assert d.backend == "sim" and d.mlx5
    assert len(d.node_guid) == 19 and d.node_guid.count(":") == 3


def test_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLX5TLP_BACKEND")
    assert mlx5tlp.resolve_backend() == "rdma"
    monkeypatch.setenv("MLX5TLP_BACKEND", "sim")
    assert mlx5tlp.resolve_backend() == "sim"
    assert mlx5tlp.resolve_backend("rdma") == "rdma"
    monkeypatch.setenv("MLX5TLP_BACKEND", "nope")
    with pytest.raises(mlx5tlp.InvalidArgumentError, match="MLX5TLP_BACKEND='nope'"):
        mlx5tlp.resolve_backend()
    with pytest.raises(ValueError, match="unknown backend 'RDMA'"):
        mlx5tlp.rdma_info("RDMA")
