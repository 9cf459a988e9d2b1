"""Real-time scheduling for a serving process (``mlx5tlp serve --realtime PRIO``).

A handover's pause is a chain of wake-ups: the old primary's lanes pausing, its control
thread, the successor's control thread, the successor's lanes. On a machine whose CPUs are
shared with other work, each wake-up of a ``SCHED_OTHER`` thread may wait for the running task's
time slice to end — milliseconds (docs/handover.md, "Proof under load"). Under ``SCHED_FIFO``
(sched(7)) a woken thread preempts every ``SCHED_OTHER`` task at once, so the pause is what the
protocol itself costs.

Call :func:`use_fifo` before the engine starts its lanes: Linux applies a policy to the calling
thread, and threads created afterwards inherit it (sched(7), "Policy inheritance"). Nothing here
spins: the lanes spin at most ``spin_us`` before they block, and the kernel's real-time
throttling (``/proc/sys/kernel/sched_rt_runtime_us``, 95% by default) keeps a runaway real-time
thread from taking a CPU whole.
"""

from __future__ import annotations

import errno
import os

from mlx5tlp.errors import InvalidArgumentError, PermissionDeniedError

__all__ = ["use_fifo"]


def use_fifo(priority: int) -> None:
    """Run the calling thread (and the threads it creates from now on) under ``SCHED_FIFO``
    at `priority`.

    Raises:
        InvalidArgumentError: `priority` outside what the kernel allows for ``SCHED_FIFO``
            (``sched_get_priority_min`` .. ``_max``: 1..99 on Linux), ``EINVAL``.
        PermissionDeniedError: the process may not (no ``CAP_SYS_NICE`` and ``RLIMIT_RTPRIO``
            below `priority`: sched_setscheduler(2) ``EPERM``); the message says how to allow it.
    """
    lo, hi = os.sched_get_priority_min(os.SCHED_FIFO), os.sched_get_priority_max(os.SCHED_FIFO)
    if isinstance(priority, bool) or not isinstance(priority, int) or not lo <= priority <= hi:
        raise InvalidArgumentError(errno.EINVAL, f"realtime priority: {priority!r} is not "
                                   f"{lo}..{hi} (SCHED_FIFO)", "realtime")
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except PermissionError:
        raise PermissionDeniedError(
            errno.EPERM, f"SCHED_FIFO priority {priority} refused: this process needs "
            "CAP_SYS_NICE or an RLIMIT_RTPRIO of at least that (ulimit -r, or LimitRTPRIO= "
            "in a systemd unit)", "realtime") from None
