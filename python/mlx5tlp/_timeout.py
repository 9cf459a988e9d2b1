"""One reading of a caller's timeout for the Python-side waits (the handover, share).

The same rules as the core's ``Deadline::in_seconds`` (cpp/include/mlx5tlp/deadline.hpp), so a
timeout means the same thing on both sides of the binding:

* NaN or a negative number is refused (``InvalidArgumentError``, ``EINVAL``, naming the
  parameter; a non-number is a ``TypeError``) — a NaN deadline compares false forever, so a
  retry loop bounded by it never ends;
* ``None``, ``+inf`` and anything beyond :data:`MAX_SECONDS` (100 years) mean "no limit" —
  Python's ``select``/``socket.settimeout``/``time.sleep`` raise ``OverflowError`` above
  ~9.2e9 s (nanoseconds in an int64), so such values must not reach them;
* ``-0.0`` is ``0.0``: try once, do not wait.
"""

from __future__ import annotations

import errno
import math
import time
from typing import NoReturn, Optional

from mlx5tlp.errors import InvalidArgumentError

__all__ = ["MAX_SECONDS", "deadline", "remaining", "seconds"]

#: Beyond this a caller means "no limit" (deadline.hpp's kMaxSeconds).
MAX_SECONDS = 100.0 * 365 * 24 * 3600


def seconds(value: object, what: str = "timeout", where: str = "handover") -> Optional[float]:
    """`value` as seconds >= 0, or None for no limit.

    Raises:
        InvalidArgumentError: ``EINVAL``: NaN or negative.
        TypeError: not a number (bool included).
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number of seconds or None, not "
                        f"{type(value).__name__}")
    try:
        v = float(value)
    except OverflowError:  # an int beyond float range: a limit nobody will reach
        if value < 0:
            _negative(what, where, value)
        return None
    if math.isnan(v):
        raise InvalidArgumentError(errno.EINVAL, f"{what} is NaN: give seconds >= 0, or None/inf "
                                   "for no limit", where)
    if v < 0:
        _negative(what, where, v)
    if v > MAX_SECONDS:
        return None
    return v + 0.0  # -0.0 -> 0.0


def _negative(what: str, where: str, v: object) -> NoReturn:
    raise InvalidArgumentError(errno.EINVAL, f"{what} is negative ({v}): give seconds >= 0, or "
                               "None/inf for no limit", where)


def deadline(value: object, what: str = "timeout", where: str = "handover") -> Optional[float]:
    """The ``time.monotonic()`` at which a wait of `value` seconds ends (None: never)."""
    s = seconds(value, what, where)
    return None if s is None else time.monotonic() + s


def remaining(end: Optional[float]) -> Optional[float]:
    """Seconds left until `end` (>= 0), None for no limit: safe for ``select``/``settimeout``."""
    return None if end is None else max(end - time.monotonic(), 0.0)
