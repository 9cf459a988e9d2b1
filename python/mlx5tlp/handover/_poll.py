"""The one poll(2) wrapper of the handover: the primary's serving loop and the standby's wait.

poll(2), not select(2): select() refuses fds >= FD_SETSIZE (1024) with ValueError, so a thousand
idle connections (or an application with many files open) ended the primary's loop.
"""

from __future__ import annotations

import contextlib
import select
import time
from collections.abc import Iterable
from typing import Any, Optional

from mlx5tlp._deadline import Deadline

__all__ = ["Poller", "readable"]

# poll() takes a C int of milliseconds (OverflowError beyond ~24.8 days): longer waits go in
# steps of a day.
_STEP_MS = 86_400_000.0


class Poller:
    """A set of fds (ints or objects with ``fileno()``) watched for input, kept between waits:
    the serving loop registers a connection once, not on every look, and a wait allocates
    nothing but poll's own result list. Hang-ups and errors are reported as ready too (the
    read that follows sees them).

    Thread-safety: one thread.
    """

    __slots__ = ("_poll",)

    def __init__(self, fds: Iterable[Any] = ()) -> None:
        self._poll = select.poll()
        for f in fds:
            self.add(f)

    def add(self, fd: Any) -> None:
        """Watch `fd` (again: a no-op)."""
        self._poll.register(fd, select.POLLIN)

    def remove(self, fd: Any) -> None:
        """Stop watching `fd` — before it is closed (its number may be reused)."""
        with contextlib.suppress(KeyError):
            self._poll.unregister(fd)

    def wait(self, timeout: Optional[float]) -> list[tuple[int, int]]:
        """The ``(fd, events)`` ready within `timeout` seconds.

        `timeout` as :class:`~mlx5tlp._deadline.Deadline` takes it: NaN or negative refused
        (``InvalidArgumentError``), None / inf / beyond 100 years no limit, 0 looks once. poll()
        counts whole milliseconds (rounded up), so a wait under one looks once and then sleeps
        (the serving loop's idle step is 50 us). A signal whose handler raises ends the wait
        with nothing ready (EINTR is otherwise retried, PEP 475).

        Raises:
            InvalidArgumentError: ``EINVAL``: `timeout` NaN, negative or not a number.
        """
        try:
            if timeout == 0.0:  # the busy serving loop's look: nothing to check or compute
                return self._poll.poll(0)
            left = Deadline.checked(timeout, "poll timeout")
            if left is not None and left < 1e-3:
                ready = self._poll.poll(0)
                if not ready:
                    time.sleep(left)
                return ready
            end = None if left is None else time.monotonic() + left
            while True:
                ms = _STEP_MS if end is None else min((end - time.monotonic()) * 1000.0,
                                                      _STEP_MS)
                ready = self._poll.poll(max(ms, 0.0))
                if ready or ms < _STEP_MS:
                    return ready
        except InterruptedError:
            return []


def readable(fds: Iterable[Any], timeout: Optional[float]) -> set[int]:
    """The fd numbers of `fds` readable (or hung up) within `timeout` (see :meth:`Poller.wait`)."""
    return {fd for fd, _ev in Poller(fds).wait(timeout)}
