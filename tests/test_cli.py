"""The mlx5tlp command line: info."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mlx5tlp.cli import main


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mlx5tlp", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_info_json_sim() -> None:
    out = _cli("info", "--backend", "sim", "--json")
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert {"backend", "libraries", "rdma_core_version", "capabilities", "devices"} <= set(rep)
    assert rep["backend"] == "sim"
    assert rep["capabilities"]["tlp_var"] is True
    assert any(d["name"] == "mlx5_sim0" for d in rep["devices"])
    assert all(set(d) >= {"name", "node_guid"} for d in rep["devices"])


def test_info_without_rdma_core_reports_and_exits_zero() -> None:
    out = _cli("info", "--backend", "rdma", "--json", MLX5TLP_IBVERBS_LIB="/nonexistent/lib.so")
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert rep["libraries"] == [] and rep["rdma_core_version"] is None and rep["devices"] == []
    assert rep["diagnostics"][0].startswith("rdma-core not loaded")


def test_info_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--backend", "sim"]) == 0
    text = capsys.readouterr().out
    assert "backend" in text and "sim" in text and "mlx5_sim0" in text
    assert "cap var_export" in text


def test_info_bad_backend_env_is_one_line_error() -> None:
    out = _cli("info", MLX5TLP_BACKEND="bogus")
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0
    assert "MLX5TLP_BACKEND='bogus'" in out.stderr


def test_info_reports_tlp_emulation_per_device(notlp_device: str, device: str) -> None:
    out = _cli("info", "--backend", "sim", "--json")
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    by_name = {d["name"]: d for d in rep["devices"]}
    assert by_name[device]["tlp_emulation"] is True and by_name[device]["gw_pages"] == 8
    assert by_name[notlp_device]["tlp_emulation"] is False
    assert any(
        line.startswith(f"{notlp_device}: firmware does not enable tlp_device_emulation_manager")
        for line in rep["diagnostics"]
    )
