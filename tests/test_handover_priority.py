"""A real-time standby joins at ordinary priority and rehearses its commit before it waits.

fork(2) and sched(7): threads and children inherit the creating thread's policy. A standby
under ``--realtime`` that imported the primary's objects at SCHED_FIFO took a CPU from the
serving primary's lanes (and from a handover in progress) for the whole import; it now joins
under ``mlx5tlp.realtime.ordinary`` and waits at its own priority. The rehearsal runs a
commit's first-time work (the state block's pages, our start time from ``/proc/<pid>/stat``)
while standing by instead of inside the first pause, and builds its engine then: its lanes
(threads created by the standby's thread) run at the standby's real-time policy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from handover_rig import Rig, stop

CHILD = """
import json, os, sys
from mlx5tlp.handover import Standby, engine_node, lease
from mlx5tlp.realtime import use_fifo

use_fifo(4)
seen = []
imports = engine_node.EngineNode.from_message

def watched(*args, **kw):  # the real import, with the policy it ran under
    seen.append(os.sched_getscheduler(0))
    return imports(*args, **kw)

engine_node.EngineNode.from_message = watched
sb = Standby(sys.argv[1], sys.argv[2].encode())
tasks = [int(t) for t in os.listdir("/proc/self/task")]  # this thread and the parked lanes
out = {"joined_under": seen, "waits_under": os.sched_getscheduler(0),
       "threads": len(tasks), "thread_policies": sorted({os.sched_getscheduler(t) for t in tasks}),
       "priority": os.sched_getparam(0).sched_priority,
       "start_time_read": lease._own_start[0] == os.getpid()}
sb.close()
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="SCHED_FIFO needs root here (CI runs as root); "
                    "tests/test_realtime.py covers the refusal")
def test_realtime_standby_joins_at_ordinary_priority(tmp_path: Path, device: str) -> None:
    rig = Rig(tmp_path, device)
    try:
        rig.primary()
        r = subprocess.run([sys.executable, "-c", CHILD, rig.path, rig.key.decode()],
                           capture_output=True, text=True, timeout=60, env=rig.env)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["joined_under"] == [os.SCHED_OTHER], out
        assert (out["waits_under"], out["priority"]) == (os.SCHED_FIFO, 4), out
        assert out["start_time_read"], out
        # The engine is built while standing by, its lanes at the policy they serve at.
        assert out["threads"] > 1 and out["thread_policies"] == [os.SCHED_FIFO], out
        assert stop(rig) is not None
    finally:
        rig.close()
