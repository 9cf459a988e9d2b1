"""Real-time scheduling for a serving process (``mlx5tlp serve --realtime PRIO``).

A handover's pause is a chain of wake-ups: the old primary's lanes pausing, its control
thread, the successor's control thread, the successor's lanes. On a machine whose CPUs are
shared with other work, each wake-up of a ``SCHED_OTHER`` thread may wait for the running task's
time slice to end — milliseconds (docs/handover.md, "Proof under load"). Under ``SCHED_FIFO``
(sched(7)) a woken thread preempts every ``SCHED_OTHER`` task at once, so the pause is what the
protocol itself costs.

Call :func:`use_fifo` before the engine starts its lanes: Linux applies a policy to the calling
thread, and threads created afterwards inherit it (sched(7), "Policy inheritance"). Children
inherit it too (fork(2): the child inherits the forking thread's policy), so heavy work that is
not on a pause's path — a child interpreter's start-up, a standby's import of the primary's
objects — runs under :func:`ordinary`: otherwise it takes a CPU at real-time priority for
hundreds of milliseconds, ahead of the very wake-ups a handover waits for. Nothing here
spins: the lanes spin at most ``spin_us`` before they block, and the kernel's real-time
throttling (``/proc/sys/kernel/sched_rt_runtime_us``, 95% by default) keeps a runaway real-time
thread from taking a CPU whole.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
from collections.abc import Iterator

from mlx5tlp.errors import InvalidArgumentError, PermissionDeniedError

__all__ = ["ordinary", "use_fifo"]

_REALTIME = (os.SCHED_FIFO, os.SCHED_RR)


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


@contextlib.contextmanager
def ordinary() -> Iterator[None]:
    """Run the block (and the children and threads it creates) under ``SCHED_OTHER`` when the
    calling thread is real-time, then return the thread to its policy and priority.

    A thread that is not real-time is left alone (nothing to restore). Lowering a policy needs
    no privilege; returning to it needs the privilege the thread had (sched(7)): a real-time
    thread that could not regain its policy (an ``RLIMIT_RTPRIO`` below its priority, no
    ``CAP_SYS_NICE``: it inherited the policy from a privileged parent) is left real-time for
    the block rather than dropped for good.

    Raises:
        PermissionDeniedError: the kernel refused to restore the policy afterwards (``EPERM``:
            the process's privilege changed inside the block); the thread is then
            ``SCHED_OTHER``.

    Thread-safety: affects the calling thread only.
    """
    policy = os.sched_getscheduler(0)
    if policy not in _REALTIME:
        yield
        return
    param = os.sched_getparam(0)
    if not _may_return(param.sched_priority):
        yield
        return
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    try:
        yield
    finally:
        try:
            os.sched_setscheduler(0, policy, param)
        except PermissionError:
            raise PermissionDeniedError(
                errno.EPERM, f"could not return to real-time priority {param.sched_priority} "
                "after ordinary work (the process lost CAP_SYS_NICE or its RLIMIT_RTPRIO)",
                "realtime") from None


def _may_return(priority: int) -> bool:
    # Root (CAP_SYS_NICE in practice) or a soft RLIMIT_RTPRIO that allows `priority` again.
    # A capability held without root is not looked up: such a thread keeps its policy.
    soft = resource.getrlimit(resource.RLIMIT_RTPRIO)[0]
    return os.geteuid() == 0 or soft == resource.RLIM_INFINITY or soft >= priority
