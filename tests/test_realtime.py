"""`mlx5tlp.realtime.use_fifo` and `--realtime`: SCHED_FIFO for the serving processes.

sched(7): a thread's policy is set with sched_setscheduler(2) (pid 0: the calling thread) and
inherited by the threads it creates; SCHED_FIFO priorities are 1..99 on Linux
(sched_get_priority_min/max); an unprivileged process may use them only up to its
RLIMIT_RTPRIO (getrlimit(2)), else EPERM.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading

import pytest

import mlx5tlp
from mlx5tlp.realtime import ordinary, use_fifo


@pytest.mark.parametrize("bad", [0, 100, -1, True, 1.5, "10"])
def test_priority_out_of_range_is_named(bad: object) -> None:
    with pytest.raises(mlx5tlp.InvalidArgumentError) as exc:
        use_fifo(bad)  # type: ignore[arg-type]
    assert "realtime priority" in str(exc.value) and "1..99" in str(exc.value)
    assert os.sched_getscheduler(0) != os.SCHED_FIFO


CHILD = """
import os, resource, sys, threading
from mlx5tlp.realtime import use_fifo
import mlx5tlp.errors  # everything imported before a drop to nobody (root's home is private)
{drop}
try:
    use_fifo(3)
except PermissionError as exc:
    print("EPERM", exc.errno, type(exc).__name__, exc)
    sys.exit(0)
seen = []
t = threading.Thread(target=lambda: seen.append(os.sched_getscheduler(0)))
t.start(); t.join()
print("FIFO", os.sched_getscheduler(0) == os.SCHED_FIFO, os.sched_getparam(0).sched_priority,
      seen[0] == os.SCHED_FIFO)
"""


def _child(drop: str) -> str:
    r = subprocess.run([sys.executable, "-c", CHILD.format(drop=drop)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def _may_use_fifo() -> bool:
    return os.geteuid() == 0 or resource.getrlimit(resource.RLIMIT_RTPRIO)[0] >= 3


@pytest.mark.skipif(not _may_use_fifo(), reason="needs root or RLIMIT_RTPRIO >= 3 (CI runs "
                    "as root); the refusal is tested below")
def test_fifo_is_set_and_inherited_by_new_threads() -> None:
    assert _child("") == "FIFO True 3 True"


def test_refusal_names_how_to_allow_it() -> None:
    # Without privilege: as root, become nobody with RLIMIT_RTPRIO 0; otherwise lower the
    # limit to 0 (an unprivileged process can always lower it).
    drop = "resource.setrlimit(resource.RLIMIT_RTPRIO, (0, 0))"
    if os.geteuid() == 0:
        drop += "\nos.setgroups([]); os.setgid(65534); os.setuid(65534)"
    out = _child(drop)
    assert out.startswith("EPERM 1 PermissionDeniedError"), out
    assert "CAP_SYS_NICE" in out and "RLIMIT_RTPRIO" in out


def test_cli_refuses_a_bad_priority() -> None:
    r = subprocess.run([sys.executable, "-m", "mlx5tlp", "serve", "--control", "/nonexistent",
                        "--key-file", "/nonexistent", "--realtime", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--realtime" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "mlx5tlp", "demo", "--realtime", "5"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--handover-every" in r.stderr, r.stderr


def test_unprivileged_thread_is_unchanged() -> None:
    # This process (the test runner) is never switched: use_fifo runs in children only.
    assert threading.current_thread() is threading.main_thread()
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


ORDINARY = """
import json, os, resource, subprocess, sys, threading
from mlx5tlp.realtime import ordinary, use_fifo
use_fifo(4)
{drop}
def child():
    if {spawn}:  # (an unprivileged user may not be able to run this interpreter)
        return int(subprocess.check_output([sys.executable, "-c",
                                            "import os; print(os.sched_getscheduler(0))"]))
    return -1
seen = {{"outside_child": child()}}
with ordinary():
    seen["inside"] = os.sched_getscheduler(0)
    t = threading.Thread(target=lambda: seen.__setitem__("thread", os.sched_getscheduler(0)))
    t.start(); t.join()
    seen["child"] = child()
seen["after"] = os.sched_getscheduler(0)
seen["priority"] = os.sched_getparam(0).sched_priority
print(json.dumps(seen))
"""


def _ordinary_child(drop: str = "") -> dict[str, int]:
    code = ORDINARY.format(drop=drop, spawn=not drop)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out: dict[str, int] = json.loads(r.stdout)
    return out


@pytest.mark.skipif(not _may_use_fifo(), reason="needs root or RLIMIT_RTPRIO >= 4 (CI runs "
                    "as root)")
def test_ordinary_drops_the_policy_for_the_block_and_what_it_creates() -> None:
    # fork(2)/sched(7): a child inherits the forking thread's policy — the demo's real-time
    # host passed SCHED_FIFO to every `serve` it spawned, whose start-up then took a CPU ahead
    # of the handover being measured. Inside ordinary(): SCHED_OTHER for the thread, a thread
    # it starts and a child it spawns; afterwards the same policy and priority as before.
    seen = _ordinary_child()
    assert seen["outside_child"] == os.SCHED_FIFO, seen
    assert (seen["inside"], seen["thread"], seen["child"]) == (os.SCHED_OTHER,) * 3, seen
    assert (seen["after"], seen["priority"]) == (os.SCHED_FIFO, 4), seen


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand SCHED_FIFO to an unprivileged "
                    "process (CI runs as root)")
def test_ordinary_keeps_a_policy_it_could_not_regain() -> None:
    # Real-time by inheritance, without the privilege to set it again (nobody, RLIMIT_RTPRIO
    # 0): dropping it would be for good, so the block runs real-time.
    drop = ("resource.setrlimit(resource.RLIMIT_RTPRIO, (0, 0))\n"
            "os.setgroups([]); os.setgid(65534); os.setuid(65534)")
    seen = _ordinary_child(drop)
    assert (seen["inside"], seen["after"], seen["priority"]) == (os.SCHED_FIFO, os.SCHED_FIFO,
                                                                  4), seen


def test_ordinary_leaves_an_ordinary_thread_alone() -> None:
    before = os.sched_getparam(0).sched_priority, os.sched_getscheduler(0)
    with ordinary():
        assert os.sched_getscheduler(0) == os.SCHED_OTHER
    assert (os.sched_getparam(0).sched_priority, os.sched_getscheduler(0)) == before
