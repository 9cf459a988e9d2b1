"""A primary that dies while standbys race for it, or in the middle of a planned handover.

docs/handover.md, "Crash takeover": between several standbys the lease decides (one wins, the
others reconnect to the winner and stand by). A primary SIGKILLed after its standby asked, or
after it committed, leaves a standby that holds every object: it takes the function over, and
every request is answered exactly once (the software device's host model counts a second answer
as unexpected and a missing one as outstanding).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from handover_rig import VENDOR_DEVICE, Rig, cfg_read, check_clean, collect, stop
from mlx5tlp import handover, sim


@pytest.fixture(params=["native", "python"])
def rig(request: pytest.FixtureRequest, tmp_path: Path, device: str) -> Iterator[Rig]:
    r = Rig(tmp_path, device, engine=request.param)
    yield r
    r.close()


def _send(host: sim.Host, first_tag: int, n: int) -> None:
    deadline = time.monotonic() + 30
    for i in range(n):
        while not host.send_request(cfg_read(0, (first_tag + i) % 256)):  # a full channel
            assert time.monotonic() < deadline, f"the channel stayed full ({i} of {n} sent)"
            time.sleep(0.001)


def test_the_standby_that_loses_the_race_stays_a_standby(rig: Rig) -> None:
    # Before: the loser's wait() raised LeaseHeldError and `mlx5tlp serve --standby` exited
    # ("the function already has a primary"), so every crash cost the function a standby.
    with sim.Host(rig.device) as host:
        p0 = rig.primary()
        s1 = rig.standby("S1", p0)
        s2 = rig.standby("S2", p0)
        _send(host, 0, 20)
        assert len(collect(host, 20)) == 20
        p0.kill()
        deadline = time.monotonic() + 30
        while s1.count("takeover") + s2.count("takeover") == 0:
            assert time.monotonic() < deadline, "nobody took over"
            time.sleep(0.01)
        winner, loser = (s1, s2) if s1.count("takeover") else (s2, s1)
        lost = loser.wait_event("outraced")
        assert "already has a primary" in lost["error"], lost
        # It reconnected to the winner (before it reported the lost race) and stands by
        # again: the next death is its to take.
        after = loser.events.index(lost)
        assert any(e["event"] == "standby" and e.get("primary") == winner.pid
                   for e in loser.events[:after]), loser.events
        assert loser.p.poll() is None
        _send(host, 20, 20)
        assert len(collect(host, 20)) == 20
        winner.kill()
        ev = loser.wait_event("takeover", after=after)
        assert ev["generation"] == 3, ev
        _send(host, 40, 20)
        got = collect(host, 20)
        assert len(got) == 20 and all(c.data == VENDOR_DEVICE.to_bytes(4, "little")
                                      for c in got)
        check_clean(host, rig.device, 60)
        stop(rig)
        assert loser.p.wait(30) == 0


@pytest.mark.parametrize("when", ["after-asking", "after-commit"])
def test_primary_killed_mid_handover_is_taken_over(rig: Rig, when: str) -> None:
    """The standby (in this process) asks; the primary is SIGKILLed right after the standby's
    request went out (it dies somewhere in its pause), or right after its commit arrived (it
    released the lease naming the standby, which then cannot tell it "done"). Before, the
    first raised the socket's EOF out of wait() and the second an EPIPE out of promote() — the
    lanes already serving, no primary loop behind them."""
    with sim.Host(rig.device) as host:
        p0 = rig.primary()
        sb = handover.Standby(rig.path, rig.key, timeout=10.0)
        try:
            p0.wait_event("standby")
            _send(host, 0, 20)
            assert len(collect(host, 20)) == 20
            _send(host, 20, 10)  # in flight when the handover starts
            wire = sb.wire
            assert wire is not None
            send, recv = wire.send, wire.recv

            def kill_after_send(kind: str, *args: Any, **kw: Any) -> None:
                send(kind, *args, **kw)
                if kind == "handover" and when == "after-asking":
                    p0.kill()

            def kill_after_recv(*args: Any, **kw: Any) -> Any:
                msg = recv(*args, **kw)
                if msg.type == "commit" and when == "after-commit":
                    p0.kill()
                return msg

            wire.send, wire.recv = kill_after_send, kill_after_recv  # type: ignore[method-assign]

            t = threading.Thread(target=_quiet_request, args=(rig,), daemon=True)
            t.start()
            p = sb.wait(timeout=30)
            t.join(30)
            assert p is not None, "the standby did not take the function"
            assert p.generation == 2, p.generation
            runner = threading.Thread(target=p.run, kwargs={"max_seconds": 60}, daemon=True)
            runner.start()
            _send(host, 30, 20)
            got = collect(host, 30)
            assert len(got) == 30, f"{len(got)} of 30 (10 in flight at the kill, 20 after)"
            assert all(c.data == VENDOR_DEVICE.to_bytes(4, "little") for c in got)
            check_clean(host, rig.device, 50)
            p.stop()
            runner.join(30)
            p.close(free=True)  # the successor frees what it inherited
        finally:
            sb.close()
        deadline = time.monotonic() + 10
        while (ds := sim.device_stats(rig.device))["contexts"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (ds["contexts"], ds["tlp_vars"]) == (0, 0), ds


def test_a_standby_whose_handover_rolled_back_stands_by_again(tmp_path: Path,
                                                              device: str) -> None:
    # The host stops consuming with the page full: the primary's lanes cannot pause (a claimed
    # request's completion has nowhere to go), so it sends "abort" instead of its commit and
    # serves on. Before, the standby's wait() raised HandoverAborted and `mlx5tlp serve
    # --standby` exited; now it stands by, and takes the next handover.
    rig = Rig(tmp_path, device)
    try:
        with sim.Host(device) as host:
            p0 = rig.primary()
            s1 = rig.standby("S1", p0)
            _send(host, 0, 40)  # 15 fit in the page; the rest wait, claimed or not
            time.sleep(0.5)
            with pytest.raises(handover.HandoverError) as exc:
                handover.request(rig.path, rig.key, "handover", timeout=20)
            assert "rolled back" in str(exc.value) or "could not stop" in str(exc.value)
            ev = s1.wait_event("handover-aborted")
            assert "could not stop" in ev["error"], ev
            assert s1.p.poll() is None
            assert len(collect(host, 40)) == 40  # consuming again: the primary serves on
            # Still connected and ready (the primary aborted before anything changed hands).
            deadline = time.monotonic() + 30
            while True:  # the primary counts it ready once its "ready" is read
                st = handover.request(rig.path, rig.key, "status")
                if st["standbys"] or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            r = handover.request(rig.path, rig.key, "handover", timeout=20)
            assert r["successor"] == s1.pid and r["generation"] == 2, r
            _send(host, 40, 20)
            assert len(collect(host, 20)) == 20
            check_clean(host, device, 60)
            stop(rig)
    finally:
        rig.close()


def test_a_standby_outwaited_by_a_stopped_primary_stands_by(tmp_path: Path, device: str) -> None:
    """The primary is stopped (SIGSTOP) right after its standby asked: no commit within the
    standby's step timeout (1 s here). wait() raises HandoverAborted (ETIMEDOUT) and the
    standby stays one; the continued primary's late commit is refused at once (abort), so the
    primary takes its own lease back and serves on, and the standby takes the next handover.
    Before, TimeoutError escaped wait() (`serve --standby` exited) and the late commit was
    read as an unexpected message."""
    rig = Rig(tmp_path, device)
    try:
        with sim.Host(device) as host:
            p0 = rig.primary()
            sb = handover.Standby(rig.path, rig.key, timeout=1.0)
            try:
                p0.wait_event("standby")
                wire = sb.wire
                assert wire is not None
                send = wire.send

                def stop_after_asking(kind: str, *args: Any, **kw: Any) -> None:
                    send(kind, *args, **kw)
                    if kind == "handover":
                        os.kill(p0.pid, signal.SIGSTOP)

                wire.send = stop_after_asking  # type: ignore[method-assign]
                op = threading.Thread(target=_quiet_request, args=(rig,), daemon=True)
                op.start()
                with pytest.raises(handover.HandoverAborted) as exc:
                    sb.wait(timeout=30)
                assert exc.value.errno == errno.ETIMEDOUT, exc.value
                wire.send = send  # type: ignore[method-assign]
                got: list[Any] = []
                waiter = threading.Thread(target=lambda: got.append(sb.wait(timeout=60)),
                                          daemon=True)
                waiter.start()
                os.kill(p0.pid, signal.SIGCONT)
                ev = p0.wait_event("rollback")
                assert ev["generation"] == 1 and ev["committed"] is False, ev
                assert "came after this standby's step timeout" in ev["error"], ev
                op.join(30)
                _send(host, 0, 20)
                assert len(collect(host, 20)) == 20  # the primary serves on
                deadline = time.monotonic() + 30
                while not handover.request(rig.path, rig.key, "status")["standbys"]:
                    assert time.monotonic() < deadline, "the standby did not stand by again"
                    time.sleep(0.01)
                r = handover.request(rig.path, rig.key, "handover", timeout=20)
                assert r["generation"] == 2, r
                waiter.join(30)
                assert got and got[0] is not None
                p = got[0]
                runner = threading.Thread(target=p.run, kwargs={"max_seconds": 60}, daemon=True)
                runner.start()
                _send(host, 20, 20)
                assert len(collect(host, 20)) == 20
                check_clean(host, device, 40)
                p.stop()
                runner.join(30)
                p.close(free=True)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p0.pid, signal.SIGCONT)
                sb.close()
    finally:
        rig.close()


def _quiet_request(rig: Rig) -> None:
    # The operator of a handover that does not happen: what it hears is not the point.
    with contextlib.suppress(Exception):
        handover.request(rig.path, rig.key, "handover", timeout=20)
