"""The C++ operator client (mlx5tlp/handover_client.hpp) against real `mlx5tlp serve` processes.

examples/native/handover_ctl is built against the installed package (as a native caller would
build it) and drives a Python primary and standby over the control socket: it speaks exactly
the protocol of docs/handover.md (framing, nonces, HMAC-SHA256, sequence numbers), so a status
is answered, a handover commits, a rolled-back one is ECANCELED, a wrong key and a missing
primary or standby are refused by errno.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from handover_rig import Rig, cfg_read, collect
from mlx5tlp import handover, native, sim
from mlx5tlp.handover.errors import AuthenticationError
from mlx5tlp.handover.standby import connect
from mlx5tlp.handover.wire import Wire

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ctl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        cmake_dir = native.cmake_dir()
    except FileNotFoundError as e:
        pytest.fail(f"needs an installed mlx5tlp (pip install .): {e}")
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.fail("cmake is required to build the native client (pip install cmake)")
    build = tmp_path_factory.mktemp("ctl")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    for cmd in ([cmake, "-S", str(ROOT / "examples" / "native"), "-B", str(build), *gen,
                 f"-Dmlx5tlp_DIR={cmake_dir}"],
                [cmake, "--build", str(build), "--target", "handover_ctl", "-j", "2"]):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"{cmd}: {out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return build / "handover_ctl"


def run(ctl: Path, path: str, key_file: Path, action: str, want_rc: int = 0,
        timeout: float = 30.0) -> dict[str, Any]:
    out = subprocess.run([str(ctl), path, str(key_file), action, str(timeout)],
                         capture_output=True, text=True, timeout=timeout + 30)
    assert out.returncode == want_rc, (out.returncode, out.stdout, out.stderr)
    fields: dict[str, Any] = json.loads(out.stdout)
    return fields


def test_native_operator_status_handover_stop_and_wrong_key(ctl: Path, tmp_path: Path,
                                                              device: str) -> None:
    rig = Rig(tmp_path, device)
    with contextlib.closing(rig), sim.Host(rig.device) as host:
        p0 = rig.primary()
        s1 = rig.standby("S1", p0)
        st = run(ctl, rig.path, rig.key_file, "status")
        assert st["t"] == "status"
        assert (st["pid"], st["generation"], st["standbys"]) == (p0.pid, 1, 1), st

        out = run(ctl, rig.path, rig.key_file, "handover")
        assert out["t"] == "handed-over", out
        assert (out["successor"], out["generation"]) == (s1.pid, 2), out
        # The successor answers the host (the config space's Vendor/Device ID dword).
        assert host.send_request(cfg_read(0, 1))
        (cpl,) = collect(host, 1)
        assert cpl.data == (0x7F10 << 16 | 0x15B3).to_bytes(4, "little")
        assert s1.wait_event("first-served")["how"] == "handover"
        assert p0.wait_event("handed-over")["successor"] == s1.pid
        # The Python operator sees the same primary the C++ one made.
        py = handover.request(rig.path, rig.key, "status")
        assert (py["pid"], py["generation"]) == (s1.pid, 2), py

        # Another key: the primary refuses our HELLO's MAC and hangs up; we report EACCES.
        bad = tmp_path / "bad-key"
        bad.write_bytes(os.urandom(32).hex().encode())
        bad.chmod(0o600)
        refused = run(ctl, rig.path, bad, "status", want_rc=1)
        assert refused["errno"] == errno.EACCES, refused
        assert "HMAC" in s1.wait_event("refused", error="HMAC")["error"]
        # The Python operator reports the same refusal the same way (not as ECONNRESET).
        seen = len(s1.events)
        with pytest.raises(AuthenticationError) as info:
            handover.request(rig.path, os.urandom(32), "status", timeout=10)
        assert info.value.errno == errno.EACCES, info.value
        assert "refused our HELLO" in str(info.value)
        assert "HMAC" in s1.wait_event("refused", after=seen, error="HMAC")["error"]

        # The old primary re-joins as a standby of the new one before we stop (a standby still
        # joining when the function stops finds the VAR freed and exits 1).
        deadline = time.monotonic() + 30
        while (st := run(ctl, rig.path, rig.key_file, "status"))["standbys"] < 1:
            assert time.monotonic() < deadline, st
            time.sleep(0.02)
        assert (st["pid"], st["generation"]) == (s1.pid, 2), st
        stopped = run(ctl, rig.path, rig.key_file, "stop")
        assert stopped["t"] == "stopped" and stopped["pid"] == s1.pid, stopped
        for proc in (p0, s1):
            assert proc.p.wait(30) == 0, (proc.name, proc.p.stderr.read() if proc.p.stderr else "")


def test_native_operator_without_primary_or_standby(ctl: Path, tmp_path: Path,
                                                    device: str) -> None:
    rig = Rig(tmp_path, device)
    with contextlib.closing(rig):
        # Nobody listens yet: retried until the timeout, then ENOENT.
        t0 = time.monotonic()
        gone = run(ctl, rig.path, rig.key_file, "status", want_rc=1, timeout=0.3)
        assert gone["errno"] == errno.ENOENT and time.monotonic() - t0 >= 0.3, gone
        p0 = rig.primary()
        # A handover with no ready standby is refused by the primary with ENOENT.
        none = run(ctl, rig.path, rig.key_file, "handover", want_rc=1)
        assert none["errno"] == errno.ENOENT and "standby" in none["error"], none
        assert run(ctl, rig.path, rig.key_file, "stop")["t"] == "stopped"
        assert p0.p.wait(30) == 0


def test_native_operator_sees_a_rolled_back_handover_as_ecanceled(ctl: Path, tmp_path: Path,
                                                                  device: str) -> None:
    rig = Rig(tmp_path, device)
    with contextlib.closing(rig):
        p0 = rig.primary()
        # A standby run step by step by the test, which aborts the handover it was told to do.
        sock = connect(rig.path)
        with contextlib.closing(sock):
            wire, _ = Wire.client(sock, rig.key, {"role": "standby", "pid": os.getpid(),
                                                  "state_version": handover.STATE_VERSION})
            wire.send("join", {})
            wire.recv(timeout=10).close_fds()
            wire.send("ready", {})
            p0.wait_event("standby")
            op = subprocess.Popen([str(ctl), rig.path, str(rig.key_file), "handover", "30"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                assert wire.recv(timeout=30).type == "go"
                wire.send("handover", {})
                assert wire.recv(timeout=30).type == "commit"
                wire.send("abort", {"message": "refused by the test"})
                stdout, stderr = op.communicate(timeout=60)
            finally:
                if op.poll() is None:
                    op.kill()
                    op.communicate()
        assert op.returncode == 1, (stdout, stderr)
        aborted = json.loads(stdout)
        assert aborted["errno"] == errno.ECANCELED, aborted
        assert p0.wait_event("rollback")["committed"] is False
        st = run(ctl, rig.path, rig.key_file, "status")
        assert (st["pid"], st["generation"], st["rollbacks"]) == (p0.pid, 1, 1), st
        assert run(ctl, rig.path, rig.key_file, "stop")["t"] == "stopped"
        assert p0.p.wait(30) == 0
