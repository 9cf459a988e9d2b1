"""ABI constants pinned to rdma-core's values (verbs.h, mlx5dv.h, mlx5_api.h, mlx5_ifc.h)."""

from __future__ import annotations

import mlx5tlp
from mlx5tlp import envelope


def test_access_flags() -> None:
    assert mlx5tlp.ACCESS_LOCAL_WRITE == 1  # IBV_ACCESS_LOCAL_WRITE
    assert mlx5tlp.ACCESS_REMOTE_WRITE == 2  # IBV_ACCESS_REMOTE_WRITE
    assert mlx5tlp.ACCESS_REMOTE_READ == 4  # IBV_ACCESS_REMOTE_READ


def test_export_sizes_match_upstream_structs(ctx: mlx5tlp.Context) -> None:
    # rdma-core providers/mlx5/mlx5.h on LP64: mlx5dv_var_attrs {u32 handle, page_id, length;
    # off_t mmap_off} = 24, mlx5dv_devx_umem_attrs = 8, mlx5dv_devx_obj_attrs = 32.
    assert ctx.export_size(envelope.Kind.VAR) == 24
    assert ctx.export_size(envelope.Kind.UMEM) == 8
    assert ctx.export_size(envelope.Kind.DEVX_OBJ) == 32


def test_symbol_versions() -> None:
    from mlx5tlp import _core

    assert _core.symbol_version("mlx5dv_var_export") == "MLX5_1.27"
    assert _core.symbol_version("_mlx5dv_get_export_sizes") == "MLX5_1.27"
    assert _core.symbol_version("mlx5dv_alloc_var") == "MLX5_1.12"
    assert _core.symbol_version("ibv_import_device") == "IBVERBS_1.10"
    assert _core.symbol_version("mlx5dv_devx_obj_create") == "MLX5_1.7"
