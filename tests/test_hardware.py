"""Real mlx5 hardware with TLP emulation: these run where such a device exists, and are skipped
visibly (pytest -ra) everywhere else. Everything else in the suite runs on the software device.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator

import pytest

import mlx5tlp

pytestmark = pytest.mark.hardware


@pytest.fixture
def hw_ctx() -> Iterator[mlx5tlp.Context]:
    info = mlx5tlp.rdma_info("rdma")
    if not info.loaded:
        pytest.skip(f"no rdma-core: {info.load_error}")
    devices = [d for d in mlx5tlp.list_devices("rdma") if d.mlx5]
    if not devices:
        pytest.skip("no mlx5 device on this machine")
    ctx = mlx5tlp.open_device(devices[0].name, backend="rdma")
    try:
        if not ctx.query_tlp_caps().supported:
            pytest.skip(f"{ctx.name}: firmware without tlp_device_emulation_manager")
        yield ctx
    finally:
        ctx.close()


def test_tlp_var_on_hardware(hw_ctx: mlx5tlp.Context) -> None:
    caps = hw_ctx.query_tlp_caps()
    assert 1 <= caps.gw_num_pages <= 15
    if not mlx5tlp.rdma_info("rdma").capabilities["tlp_var"]:
        with pytest.raises(mlx5tlp.NotSupportedError, match="rdma-core >= 63"):
            hw_ctx.alloc_var(tlp=True)
        return
    with hw_ctx.alloc_var(tlp=True) as var:
        assert var.is_tlp and var.length == caps.gw_page_stride
        m = var.mmap(mmap.PROT_WRITE)  # the kernel maps TLP pages non-cached, write-only
        m.close()


def test_export_import_on_hardware(hw_ctx: mlx5tlp.Context) -> None:
    if not mlx5tlp.rdma_info("rdma").capabilities["var_export"]:
        pytest.skip("rdma-core < 63: no mlx5dv_var_export")
    with hw_ctx.alloc_var(tlp=True) as var, mlx5tlp.Context.import_fd(
        hw_ctx.cmd_fd, backend="rdma"
    ) as peer:
        imported = peer.import_var(var.export())
        assert (imported.page_id, imported.mmap_off) == (var.page_id, var.mmap_off)
        imported.unimport()
