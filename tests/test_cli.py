"""The mlx5tlp command line: the command, info and its diagnostics, and `mlx5tlp sim`."""

from __future__ import annotations

import ctypes
import errno
import importlib.metadata
import json
import os
import re
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import mlx5tlp
import mlx5tlp.tlp
from mlx5tlp import sim
from mlx5tlp._cli_info import MEMLOCK_ENOUGH, SIM_HINT, diagnose
from mlx5tlp.backend import CAPABILITY_NAMES
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


# -- the command itself ---------------------------------------------------------------------
def test_bare_command_prints_help() -> None:
    out = _cli()
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: mlx5tlp")
    for command in ("info", "demo", "sim", "bench"):
        assert f"    {command} " in out.stdout
    assert out.stderr == ""


def test_version_is_the_one_version_source() -> None:
    source = (Path(mlx5tlp.__file__).parent / "_version.py").read_text()
    match = re.search(r'^__version__ = "([0-9.]+)"$', source, re.M)
    assert match is not None
    out = _cli("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"mlx5tlp {match.group(1)}\n"
    assert mlx5tlp.__version__ == match.group(1)
    assert importlib.metadata.version("mlx5tlp") == match.group(1)


def test_info_into_a_closed_pipe_ends_quietly() -> None:
    # `mlx5tlp info | head`: the reader is gone before info writes.
    with subprocess.Popen([sys.executable, "-m", "mlx5tlp", "info", "--backend", "sim"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        err = proc.stderr.read()
        assert proc.wait(60) == 141  # 128 + SIGPIPE, what a shell shows for a C program
    assert err == b""


def test_bad_option_is_one_line_with_the_rule() -> None:
    out = _cli("info", "--backend", "gpu")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1
    assert "argument --backend: invalid choice: 'gpu'" in out.stderr


# -- diagnostics ----------------------------------------------------------------------------
def _has_rdma_mlx5_device() -> bool:
    try:
        return any(d.mlx5 for d in mlx5tlp.list_devices("rdma"))
    except mlx5tlp.Error:
        return False


def test_info_rdma_without_rdma_core_points_to_the_software_device() -> None:
    out = _cli("info", "--backend", "rdma", "--json", MLX5TLP_IBVERBS_LIB="/nonexistent/lib.so")
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert rep["diagnostics"][-1] == SIM_HINT
    assert not any("RLIMIT_MEMLOCK" in line for line in rep["diagnostics"])  # nothing to pin


@pytest.mark.skipif(_has_rdma_mlx5_device(), reason="this machine has an mlx5 device")
def test_info_rdma_without_device_points_to_the_software_device() -> None:
    out = _cli("info", "--backend", "rdma", "--json")
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert SIM_HINT in rep["diagnostics"]
    assert 'backend="sim"' in SIM_HINT and "mlx5tlp demo" in SIM_HINT
    text = _cli("info", "--backend", "rdma")
    assert f"note: {SIM_HINT}" in text.stdout


@pytest.mark.skipif(_has_rdma_mlx5_device(), reason="this machine has an mlx5 device")
def test_open_device_rdma_without_device_points_to_the_software_device() -> None:
    with pytest.raises(mlx5tlp.DeviceNotFoundError) as info:
        mlx5tlp.open_device(backend="rdma")
    assert info.value.errno == errno.ENODEV
    assert 'open_device(backend="sim")' in str(info.value) and "mlx5tlp demo" in str(info.value)
    # A device of the software backend that does not exist: no hint about itself.
    with pytest.raises(mlx5tlp.DeviceNotFoundError) as info:
        mlx5tlp.open_device("nope", backend="sim")
    assert "mlx5tlp demo" not in str(info.value)


def test_info_sim_does_not_hint_at_itself() -> None:
    rep = json.loads(_cli("info", "--backend", "sim", "--json").stdout)
    assert SIM_HINT not in rep["diagnostics"]


def test_memlock_note_rule() -> None:
    dev = [{"name": "mlx5_0", "node_guid": "0", "mlx5": True, "tlp_emulation": True}]
    caps = dict.fromkeys(CAPABILITY_NAMES, True)

    def notes(memlock: int | None, ipc_lock: bool, devices: list[dict[str, object]]) -> bool:
        return any("RLIMIT_MEMLOCK" in line
                   for line in diagnose("rdma", None, caps, devices, memlock, ipc_lock))

    assert notes(8 << 20, False, dev)
    assert not notes(8 << 20, True, dev)  # CAP_IPC_LOCK: the kernel does not enforce it
    assert not notes(None, False, dev)  # unlimited
    assert not notes(MEMLOCK_ENOUGH, False, dev)
    assert not notes(8 << 20, False, [])  # no device to register UMEMs on


PR_CAPBSET_DROP = 24  # include/uapi/linux/prctl.h
CAP_IPC_LOCK = 14  # include/uapi/linux/capability.h


def _lower_memlock(drop_ipc_lock: bool) -> Callable[[], None]:
    def pre() -> None:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (1 << 20, 1 << 20))
        if drop_ipc_lock and os.geteuid() == 0:  # others have no CAP_IPC_LOCK to drop
            # Out of the bounding set, CAP_IPC_LOCK is not in the effective set after execve,
            # even for root (capabilities(7), "Transformation of capabilities during execve").
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_CAPBSET_DROP, CAP_IPC_LOCK, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")

    return pre


def _info_in(drop_ipc_lock: bool) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "mlx5tlp", "info", "--backend", "sim", "--json"],
        capture_output=True, text=True, timeout=60, preexec_fn=_lower_memlock(drop_ipc_lock))
    assert out.returncode == 0, out.stderr
    rep: dict[str, object] = json.loads(out.stdout)
    return rep


def _memlock_noted(rep: dict[str, object]) -> bool:
    diagnostics = rep["diagnostics"]
    assert isinstance(diagnostics, list)
    return any("RLIMIT_MEMLOCK" in line for line in diagnostics)


def test_memlock_note_follows_the_real_process() -> None:
    # The same `info` under a 1 MiB memlock limit, with CAP_IPC_LOCK (root) and without it.
    without = _info_in(drop_ipc_lock=True)
    assert without["cap_ipc_lock"] is False and _memlock_noted(without)
    if os.geteuid() != 0:
        pytest.skip("the CAP_IPC_LOCK half needs root (the other half passed)")
    with_cap = _info_in(drop_ipc_lock=False)
    assert with_cap["cap_ipc_lock"] is True and not _memlock_noted(with_cap)


# -- mlx5tlp sim ----------------------------------------------------------------------------
def test_sim_create_list_stats_remove(sim_dir: str) -> None:
    name = f"cli{os.getpid()}"
    made = _cli("sim", "create", name, "--gw-pages", "3", "--no-tlp", "--slot-size", "0x200",
                "--no-var-flags-attr")
    assert made.returncode == 0, made.stderr
    try:
        assert sim.device_config(name) | {"node_guid": 0} == {
            "tlp": False, "gw_pages": 3, "gw_log_stride": 0, "virtio_pages": 16,
            "slot_size": 512, "bar_offset": 0x200000, "node_guid": 0,
            "var_support": True, "var_flags_attr": False}
        listed = json.loads(_cli("sim", "list", "--json").stdout)
        assert listed["device_dir"] == sim_dir
        assert {d["name"] for d in listed["devices"]} >= {name, "mlx5_sim0"}
        stats = json.loads(_cli("sim", "stats", name, "--json").stdout)
        assert stats["stats"] == sim.device_stats(name)
        again = _cli("sim", "create", name)
        assert again.returncode == 1 and "File exists (errno 17)" in again.stderr
        with mlx5tlp.open_device(name, backend="sim"):
            busy = _cli("sim", "remove", name)
            assert busy.returncode == 1 and "errno 16" in busy.stderr, busy.stderr
    finally:
        gone = _cli("sim", "remove", name)
    assert gone.returncode == 0, gone.stderr
    assert name not in {d.name for d in mlx5tlp.list_devices("sim")}


@pytest.mark.parametrize("param, value", [
    ("gw_pages", 0), ("gw_pages", 16), ("gw_log_stride", 5), ("virtio_pages", 257),
    ("slot_size", 32), ("slot_size", 96), ("slot_size", 2048),
])
def test_sim_create_validates_like_the_python_api(param: str, value: int) -> None:
    with pytest.raises(ValueError) as api:
        sim.create_device("never", **{param: value})  # type: ignore[arg-type]
    out = _cli("sim", "create", "never", f"--{param.replace('_', '-')}", str(value))
    assert out.returncode == 2
    assert out.stderr == (f"mlx5tlp sim create: --{param.replace('_', '-')}"
                          f"{str(api.value)[len(param):]}\n")
    assert "never" not in {d.name for d in mlx5tlp.list_devices("sim")}


@pytest.mark.parametrize("verb", ["remove", "reset", "stats"])
def test_sim_unknown_device_lists_the_devices(verb: str, device: str) -> None:
    out = _cli("sim", verb, "nope")
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1
    assert "no software device named 'nope'" in out.stderr
    assert device in out.stderr and "mlx5_sim0" in out.stderr


def test_sim_reset_discards_queued_requests(device: str) -> None:
    # Needs mlx5tlp.sim.reset_device() (the `sim` branch): until it is merged this fails.
    with sim.Host(device) as host:
        req = mlx5tlp.tlp.Tlp.mem_read(0x1000, 1, requester_id=0, tag=1).encode()
        for channel in (0, 3):
            assert host.send_request(req, channel=channel)
    assert sim.device_stats(device)["requests_pending"] == 2
    with mlx5tlp.open_device(device, backend="sim"):
        busy = _cli("sim", "reset", device)
        assert busy.returncode == 1 and "errno 16" in busy.stderr, busy.stderr
    out = _cli("sim", "reset", device)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"reset {device}: discarded ")
    assert sim.device_stats(device)["requests_pending"] == 0
