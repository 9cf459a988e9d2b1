"""ABI constants pinned to rdma-core's values (verbs.h, mlx5dv.h, mlx5_api.h, mlx5_ifc.h)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

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


# -- abi_conformance.c against real rdma-core headers ------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def _header_trees() -> list[tuple[str, list[str]]]:
    """(label, -I flags) for the system headers and each tree in $MLX5TLP_RDMA_INCLUDE."""
    trees: list[tuple[str, list[str]]] = []
    if Path("/usr/include/infiniband/mlx5dv.h").is_file():
        trees.append(("system", []))
    for d in filter(None, os.environ.get("MLX5TLP_RDMA_INCLUDE", "").split(":")):
        if not (Path(d) / "infiniband" / "mlx5dv.h").is_file():
            pytest.fail(f"MLX5TLP_RDMA_INCLUDE names {d}, which has no infiniband/mlx5dv.h")
        trees.append((d, [f"-I{d}"]))
    return trees


def _compile(flags: list[str], out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("a C compiler (cc) is required for the ABI conformance check")
    src = ROOT / "tests" / "cpp" / "abi_conformance.c"
    probe = subprocess.run(
        [cc, "-fsyntax-only", *flags, "-x", "c", "-"],
        input="#include <infiniband/mlx5dv.h>\nstruct mlx5dv_export_sizes probe;\n",
        capture_output=True, text=True,
    )
    v63 = ["-DMLX5TLP_HAVE_EXPORT_SIZES=1"] if probe.returncode == 0 else []
    cmd = [cc, "-std=gnu11", "-Wall", "-Wextra", "-Werror", *flags, f"-I{ROOT / 'cpp/include'}",
           *v63, *extra, str(src), "-o", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True)


def test_abi_conformance_against_rdma_core_headers(tmp_path: Path) -> None:
    """Struct prefixes and every resolved function's prototype (return and parameter types).

    Runs against Debian's rdma-core 44 headers (CI installs libibverbs-dev) and any header
    trees in $MLX5TLP_RDMA_INCLUDE (e.g. rdma-core v63.0's, where mlx5dv_context_attr is 24
    bytes and our 16-byte struct must be its prefix). The same file built with the declaration
    this project once had (``int mlx5dv_is_supported``) must fail to compile: the check can
    fail.
    """
    trees = _header_trees()
    if not trees:
        pytest.skip("no rdma-core headers: install libibverbs-dev or set MLX5TLP_RDMA_INCLUDE")
    for label, flags in trees:
        exe = tmp_path / "abi_conformance"
        built = _compile(flags, exe)
        assert built.returncode == 0, f"{label}: {built.stderr}"
        ran = subprocess.run([str(exe)], capture_output=True, text=True, check=True)
        assert "prototypes of every resolved function" in ran.stdout
        bad = _compile(flags, tmp_path / "abi_negative", "-DMLX5TLP_ABI_NEGATIVE_CHECK")
        assert bad.returncode != 0, f"{label}: the negative check compiled"
        assert "prototype (return or parameter types) of mlx5dv_is_supported" in bad.stderr
