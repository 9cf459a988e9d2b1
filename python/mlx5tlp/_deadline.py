"""The Python twin of the core's ``Deadline`` (cpp/include/mlx5tlp/deadline.hpp).

Pure-Python waits (the lease, the control socket) take a caller's seconds through
:meth:`Deadline.in_seconds`, so NaN, negative and huge timeouts mean what they mean in the core:
NaN and negative values are refused naming the parameter; ``None``, ``+inf`` and values beyond
``MAX_SECONDS`` (~100 years) wait without limit; 0 tries once. Thread-safety: a value type.
"""

from __future__ import annotations

import errno
import math
import time
from typing import Optional

from .errors import InvalidArgumentError

#: Beyond this many seconds a timeout means "no limit" (the core's ``kMaxSeconds``).
MAX_SECONDS = 100 * 365 * 24 * 3600.0


class Deadline:
    """A fixed point in ``CLOCK_MONOTONIC`` time, or never."""

    __slots__ = ("_end",)

    def __init__(self, end: Optional[float]) -> None:
        self._end = end

    @classmethod
    def in_seconds(cls, seconds: Optional[float], what: str = "timeout") -> Deadline:
        """`seconds` from now (None / inf / huge: never).

        Raises:
            InvalidArgumentError: ``EINVAL``: NaN, negative, or not a number (names `what`).
        """
        s = cls.checked(seconds, what)
        return cls(None if s is None else time.monotonic() + s)

    @staticmethod
    def checked(seconds: Optional[float], what: str = "timeout") -> Optional[float]:
        """`seconds` checked as :meth:`in_seconds` does: a float >= 0, or None for no limit
        (None / inf / huge) — for a duration kept and applied per step (``settimeout``).

        Raises:
            InvalidArgumentError: ``EINVAL``: NaN, negative, or not a number (names `what`).
        """
        if seconds is None:
            return None
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            # As the core's seconds_of: not "1" or True (float() would take them).
            raise InvalidArgumentError(
                errno.EINVAL, f"{what} must be a number of seconds or None, not "
                f"{type(seconds).__name__}", what)
        try:
            s = float(seconds)
        except OverflowError:  # an int beyond float range: a limit nobody reaches
            s = -math.inf if seconds < 0 else math.inf
        if math.isnan(s):
            raise InvalidArgumentError(
                errno.EINVAL, f"{what} is NaN: give seconds >= 0, or None/inf for no limit", what)
        if s < 0:
            raise InvalidArgumentError(
                errno.EINVAL, f"{what} is negative ({s}): give seconds >= 0, or None/inf for "
                "no limit", what)
        if s > MAX_SECONDS:
            return None
        return s + 0.0  # -0.0 -> 0.0

    @property
    def end(self) -> Optional[float]:
        """The ``time.monotonic()`` value it expires at, or None for never."""
        return self._end

    def remaining(self) -> Optional[float]:
        """Seconds left (>= 0), or None for never (the form ``select``/``settimeout`` take)."""
        return None if self._end is None else max(self._end - time.monotonic(), 0.0)

    def expired(self) -> bool:
        return self._end is not None and time.monotonic() >= self._end
