"""The API reference builds from the docstrings with warnings as errors; the pyverbs page is right.

The reference documents the installed package (Sphinx autodoc imports it), so this test also
catches a docstring that docutils cannot parse.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RDMA_CORE = Path("/work/.mirror/linux-rdma+rdma-core/repo")

pytestmark = pytest.mark.skipif(not (DOCS / "conf.py").exists(), reason="needs a source checkout")


@pytest.mark.slow
def test_api_reference_builds_without_warnings(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    html = tmp_path / "html"
    api = {p.name for p in (html / "api").glob("*.html")}
    assert api >= {"mlx5tlp.html", "objects.html", "gateway.html", "tlp.html", "share.html",
                   "sim.html", "errors.html"}
    # Documented from the docstrings: a few names that must be there, with their text.
    page = (html / "api" / "mlx5tlp.html").read_text()
    assert "Context.import_fd" in page and "duplicated before" in page
    assert "completions_for" in (html / "api" / "tlp.html").read_text()
    assert "post_batch" in (html / "api" / "gateway.html").read_text()
    assert "Mlx5VAR.import_var" in (html / "pyverbs.html").read_text()


# Every pyverbs name the mapping page uses, and where rdma-core v64 defines it.
PYVERBS_NAMES = {
    "pyverbs/providers/mlx5/mlx5dv.pyx": [
        "cdef class Mlx5VAR", "def import_var(", "def unimport_var(", "def get_export_size(",
        "cdef class Mlx5UMEM", "def import_umem(", "def unimport_umem(", "def dereg(",
        "cdef class Mlx5DevxObj", "def import_obj(", "def unimport_obj(", "def destroy(",
        "def export(self)", "def free(self)",
    ],
    "pyverbs/providers/mlx5/mlx5_enums.pyx": ["MLX5DV_VAR_ALLOC_FLAG_TLP_ ="],
    "pyverbs/device.pyx": ["cmd_fd = kwargs.get('cmd_fd')", "ibv_import_device(cmd_fd)"],
}


def test_pyverbs_page_names_every_call_of_the_issue() -> None:
    text = (DOCS / "pyverbs.md").read_text()
    for name in ("Mlx5VAR(ctx, flags=MLX5DV_VAR_ALLOC_FLAG_TLP_)", "var.export()",
                 "Mlx5VAR.import_var(ctx, data)", "Mlx5UMEM.import_umem(ctx, data)",
                 "Mlx5DevxObj.import_obj(ctx, data)", "get_export_size()", "unimport_var()",
                 "Context(cmd_fd=fd)"):
        assert name in text, name
    for heading in ("Validated envelopes", "fd duplication", "free vs unimport"):
        assert re.search(rf"^\* \*\*{heading}\.\*\*", text, re.M), heading


@pytest.mark.skipif(not RDMA_CORE.exists(), reason=f"needs the rdma-core mirror at {RDMA_CORE}")
def test_pyverbs_names_are_those_of_rdma_core_v64() -> None:
    for path, needles in PYVERBS_NAMES.items():
        source = subprocess.run(["git", "-C", str(RDMA_CORE), "show", f"v64.0:{path}"],
                                capture_output=True, text=True, timeout=60, check=True).stdout
        for needle in needles:
            assert needle in source, f"{needle!r} not in rdma-core v64.0 {path}"
