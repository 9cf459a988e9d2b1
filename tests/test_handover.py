"""Live upgrade and crash takeover with real processes (`mlx5tlp serve`), no mocks.

Every completion is checked by the software device's host model (a second answer to a request
is "unexpected", a missing one stays "outstanding"), and the objects are counted afterwards.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import mlx5tlp
from handover_rig import VENDOR_DEVICE, Rig, cfg_read, cfg_write, check_clean, collect, stop
from mlx5tlp import handover, sim, tlp
from mlx5tlp.handover.node import default_spec
from mlx5tlp.handover.standby import connect
from mlx5tlp.handover.wire import Wire
from mlx5tlp.share import ProtocolError


@pytest.fixture(params=["native", "python"])
def rig(request: pytest.FixtureRequest, tmp_path: Path, device: str) -> Iterator[Rig]:
    # Every scenario with the primary served by the native engine and by the Python loop.
    r = Rig(tmp_path, device, engine=request.param)
    yield r
    r.close()


def scratch_reg() -> int:
    """A writable dword of the default function (its vendor capability's data bytes 1..28)."""
    from mlx5tlp.function import Function

    with Function(default_spec()) as f:
        return int(f._layout["vendor_caps"][0]) + 4


def wait_objects_gone(device: str) -> dict[str, int]:
    deadline = time.monotonic() + 10
    while True:
        ds = sim.device_stats(device)
        if (ds["contexts"] == 0 and ds["tlp_vars"] == 0) or time.monotonic() > deadline:
            return ds
        time.sleep(0.02)


def test_planned_handover_keeps_state_and_answers_everything(rig: Rig) -> None:
    reg = scratch_reg()
    with sim.Host(rig.device) as host:
        p0 = rig.primary()
        s1 = rig.standby("S1", p0)
        assert host.send_request(cfg_write(reg, 0xA5A5_1234, 1))
        assert host.send_request(cfg_read(0, 2))
        got = collect(host, 2)
        assert len(got) == 2 and got[1].data == VENDOR_DEVICE.to_bytes(4, "little")
        out = handover.request(rig.path, rig.key, "handover")
        assert out["successor"] == s1.pid and out["generation"] == 2
        # The successor continues from the shared function state: the write is still there.
        assert host.send_request(cfg_read(reg, 3))
        (cpl,) = collect(host, 1)
        assert cpl.data == (0xA5A5_1234).to_bytes(4, "little")
        assert s1.wait_event("first-served")["how"] == "handover"
        assert p0.wait_event("handed-over")["successor"] == s1.pid
        # The old primary stays as a standby of the new one (its own "standby" event names
        # its primary; the earlier one, as primary, named the standby that joined).
        deadline = time.monotonic() + 30
        while not any(e["event"] == "standby" and e.get("primary") == s1.pid
                      for e in list(p0.events)):
            assert time.monotonic() < deadline, p0.events
            time.sleep(0.01)
        while (st := handover.request(rig.path, rig.key, "status"))["standbys"] < 1:
            assert time.monotonic() < deadline, st
            time.sleep(0.01)
        assert (st["pid"], st["generation"], st["standbys"]) == (s1.pid, 2, 1)
        # ... and can take the function back.
        back = handover.request(rig.path, rig.key, "handover")
        assert (back["successor"], back["generation"]) == (p0.pid, 3)
        assert host.send_request(cfg_read(reg, 4))
        (cpl,) = collect(host, 1)
        assert cpl.data == (0xA5A5_1234).to_bytes(4, "little")
        # S1 re-joins as a standby of P0; stop once it holds its imports (a standby still
        # joining when the function stops finds the VAR freed and exits 1). Its first
        # "standby" event also named P0 (it joined P0 at the start): wait for the second.
        while sum(e["event"] == "standby" and e.get("primary") == p0.pid
                  for e in list(s1.events)) < 2:
            assert time.monotonic() < deadline, s1.events
            time.sleep(0.01)
        while (st := handover.request(rig.path, rig.key, "status"))["standbys"] < 1:
            assert time.monotonic() < deadline, st
            time.sleep(0.01)
        stop(rig)
        for proc in (p0, s1):
            assert proc.p.wait(30) == 0, (proc.name, proc.p.stderr.read() if proc.p.stderr else "")
        check_clean(host, rig.device, 4)
    ds = wait_objects_gone(rig.device)
    assert (ds["contexts"], ds["tlp_vars"]) == (0, 0), ds


def test_two_would_be_primaries_one_wins(rig: Rig) -> None:
    p0 = rig.primary()
    second = subprocess.run(
        [sys.executable, "-m", "mlx5tlp", "serve", "--control", rig.path, "--key-file",
         str(rig.key_file), "--device", rig.device, "--engine", rig.engine],
        capture_output=True, text=True, env=rig.env, timeout=60)
    assert second.returncode == 1
    assert "already has a primary" in second.stderr and f"pid {p0.pid}" in second.stderr
    assert "generation 1" in second.stderr
    # The lease is the kernel's: once the winner is dead, the next one gets generation 2.
    p0.kill()
    p1 = rig.primary("P1")
    assert p1.wait_event("serving")["generation"] == 2
    stop(rig)
    assert p1.p.wait(30) == 0


def test_crash_takeover_with_claims_in_flight_answers_each_exactly_once(rig: Rig) -> None:
    total = 0
    with sim.Host(rig.device) as host:
        primary = rig.primary()
        standby = rig.standby("S1", primary)
        for round_ in range(3):
            # Keep requests flowing while the primary is SIGKILLed at some point among them.
            # The host consumes completions as it goes, as a host does: a gateway page holds
            # 15 records, and a host that stops consuming stalls the successor's first writes
            # (test_takeover_while_the_host_stalls).
            sent = 0
            got: list[tlp.Tlp] = []
            kill_at = 20 + round_ * 7
            while sent < 60:
                if host.send_request(cfg_read(0, (total + sent) % 256)):
                    sent += 1
                got += [tlp.decode(c) for c in host.completions()]
                if sent == kill_at:
                    primary.kill()
            total += sent
            deadline = time.monotonic() + 30
            while not standby.count("takeover") and time.monotonic() < deadline:
                got += [tlp.decode(c) for c in host.completions(timeout=0.01)]
            ev = standby.wait_event("takeover")
            assert ev["generation"] == round_ + 2
            got += collect(host, sent - len(got))
            assert len(got) == sent, f"round {round_}: {len(got)} of {sent}"
            assert all(c.data == VENDOR_DEVICE.to_bytes(4, "little") for c in got)
            check_clean(host, rig.device, total)
            primary, standby = standby, rig.standby(f"S{round_ + 2}", standby)
        stop(rig)
        assert primary.p.wait(30) == 0 and standby.p.wait(30) == 0
    ds = wait_objects_gone(rig.device)
    assert (ds["contexts"], ds["tlp_vars"], ds["requests_claimed"]) == (0, 0, 0), ds


def test_takeover_while_the_host_stalls(rig: Rig) -> None:
    # The host stops consuming with 20 requests in flight: the primary fills its page (15
    # records) and blocks; it is SIGKILLed then. Its successor must wait for room rather than
    # give up (it did after 5 s: the cause of a flaky crash-takeover test), and once the host
    # consumes again, every request is answered exactly once.
    with sim.Host(rig.device) as host:
        primary = rig.primary()
        standby = rig.standby("S1", primary)
        for tag in range(20):
            assert host.send_request(cfg_read(0, tag))
        time.sleep(1.0)
        primary.kill()
        time.sleep(6.0)  # longer than the successor used to wait
        got = collect(host, 20)
        assert sorted(c.tag for c in got) == list(range(20)), [c.tag for c in got]
        assert standby.wait_event("takeover")["generation"] == 2
        check_clean(host, rig.device, 20)
        stop(rig)
        assert standby.p.wait(30) == 0


def _fake_standby(rig: Rig) -> tuple[socket.socket, Wire]:
    """A standby run by the test itself, step by step, to fail at a chosen step."""
    sock = connect(rig.path)
    wire, _welcome = Wire.client(sock, rig.key, {"role": "standby", "pid": os.getpid(),
                                                  "state_version": handover.STATE_VERSION})
    wire.send("join", {})
    objs = wire.recv(timeout=10)
    assert objs.type == "objects" and len(objs.fds) == 3
    objs.close_fds()
    wire.send("ready", {})
    return sock, wire


@pytest.mark.parametrize("step", ["closed", "abort", "took-then-gave-back"])
def test_standby_failing_after_the_commit_message_rolls_back(rig: Rig, step: str) -> None:
    """The commit message names this process in the lease (docs/handover.md, "Planned
    handover" step 3); a standby that refuses without taking the lease leaves the primary its
    own generation; one that took the lease and gave it back costs a generation."""
    with sim.Host(rig.device) as host:
        p0 = rig.primary()
        sock, wire = _fake_standby(rig)
        p0.wait_event("standby")
        wire.send("handover", {})
        commit = wire.recv(timeout=10)
        assert commit.type == "commit" and len(commit.payloads) == 1
        lease = handover.Lease(rig.path + ".lease")
        rec = lease.read()
        assert rec is not None and (rec.generation, rec.pid, rec.successor) == (1, p0.pid,
                                                                              os.getpid())
        want_gen = 1
        if step == "took-then-gave-back":
            assert lease.acquire(1.0) == 2
            lease.release(successor=p0.pid)
            want_gen = 3
        lease.close()
        if step != "closed":
            wire.send("abort", {"message": "refused by the test"})
        sock.close()
        ev = p0.wait_event("rollback")
        assert ev["committed"] is (want_gen != 1) and ev["generation"] == want_gen, ev
        # The primary serves again.
        for tag in range(10):
            assert host.send_request(cfg_read(0, tag))
        assert len(collect(host, 10)) == 10
        st = handover.request(rig.path, rig.key, "status")
        assert (st["pid"], st["generation"], st["rollbacks"]) == (p0.pid, want_gen, 1)
        stop(rig)
        check_clean(host, rig.device, 10)


STANDBY_KILLED_MID_HANDOVER = """
import os, signal, sys
sys.path[:0] = [{tests!r}]
from handover_rig import Rig
from mlx5tlp import handover
from mlx5tlp.handover.standby import connect
from mlx5tlp.handover.wire import Wire
sock = connect({path!r})
wire, _ = Wire.client(sock, {key!r}, {{"role": "standby", "pid": os.getpid(),
                                       "state_version": handover.STATE_VERSION}})
wire.send("join", {{}})
wire.recv(timeout=10).close_fds()
wire.send("ready", {{}})
wire.send("handover", {{}})
assert wire.recv(timeout=10).type == "commit"
os.kill(os.getpid(), signal.SIGKILL)  # named successor in the lease, dead before taking it
"""


def test_standby_killed_mid_handover_primary_resumes(rig: Rig) -> None:
    with sim.Host(rig.device) as host:
        p0 = rig.primary()
        code = STANDBY_KILLED_MID_HANDOVER.format(
            tests=str(Path(__file__).parent), path=rig.path, key=rig.key)
        r = subprocess.run([sys.executable, "-c", code], env=rig.env, timeout=60,
                           capture_output=True, text=True)
        assert r.returncode == -9, r.stderr
        assert p0.wait_event("rollback")["committed"] is False
        for tag in range(5):
            assert host.send_request(cfg_read(0, tag))
        assert len(collect(host, 5)) == 5
        stop(rig)
        check_clean(host, rig.device, 5)


def test_successor_of_another_state_version_refuses(rig: Rig) -> None:
    p0 = rig.primary()
    with pytest.raises(handover.StateMismatchError) as exc:
        handover.Standby(rig.path, rig.key, state_version=handover.STATE_VERSION + 1)
    assert exc.value.errno == errno.EPROTO
    assert "version" in str(exc.value) and "migrat" in str(exc.value)
    # Another function (spec digest) is refused too.
    from mlx5tlp.function import Bar, FunctionSpec, Identity

    other = FunctionSpec(identity=Identity(vendor_id=0x15B3, device_id=0x1, class_code=0),
                         bars=[Bar(0, "mem32", 4096)])
    with pytest.raises(handover.StateMismatchError) as exc2:
        handover.Standby(rig.path, rig.key, spec=other)
    assert exc2.value.errno == errno.EINVAL and "digest" in str(exc2.value)
    assert p0.p.poll() is None
    stop(rig)


def test_bad_hmac_is_refused(rig: Rig) -> None:
    p0 = rig.primary()
    with pytest.raises((handover.AuthenticationError, ProtocolError)) as exc:
        handover.Standby(rig.path, os.urandom(32))
    if isinstance(exc.value, handover.AuthenticationError):
        assert exc.value.errno == errno.EBADMSG and "HMAC" in str(exc.value)
    # The first 'refused' whose text names the MAC (not whichever refusal came first).
    assert "HMAC" in p0.wait_event("refused", error="HMAC")["error"]
    assert handover.request(rig.path, rig.key, "status")["standbys"] == 0
    stop(rig)


def test_peer_uid_not_allowed_is_refused(tmp_path: Path) -> None:
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(5)
        client = Wire(a, b"k" * 32, is_server=False)
        client.send("hello", {"role": "standby"})
        with pytest.raises(handover.AuthenticationError) as exc:
            Wire.server(b, b"k" * 32, allow_uids=[os.getuid() + 12345])
        assert exc.value.errno == errno.EACCES and f"uid {os.getuid()}" in str(exc.value)


def test_replayed_message_is_refused() -> None:
    # A message recorded on one connection fails on another: it is bound to the receiver's nonce.
    key = b"r" * 32
    a1, b1 = socket.socketpair()
    a2, b2 = socket.socketpair()
    with a1, b1, a2, b2:
        for s in (a1, b1, a2, b2):
            s.settimeout(5)
        c1 = Wire(a1, key, is_server=False)
        c1.send("hello", {})
        s1, _ = Wire.server(b1, key)
        s1.send("welcome", {})
        c1.recv()
        c1.send("request", {"action": "stop"})
        raw = b1.recv(65536)  # the signed "stop", as an eavesdropper with the socket saw it
        c2 = Wire(a2, key, is_server=False)
        c2.send("hello", {})
        s2, _ = Wire.server(b2, key)
        s2.send("welcome", {})
        c2.recv()
        a2.sendall(raw)  # replay it on the second connection
        with pytest.raises(handover.AuthenticationError) as exc:
            s2.recv()
        assert exc.value.errno == errno.EBADMSG


def test_lease_directory_must_be_private(tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o777)
    with pytest.raises(mlx5tlp.Error) as exc:
        handover.Lease(str(d / "x.lease"))
    assert exc.value.errno == errno.EPERM and "0700" in str(exc.value)
