"""No automatic garbage collection inside a handover's pause.

A full (generation 2) collection of a process that has served for hours walks every tracked
object: milliseconds, at a point the allocator chooses — inside the few hundred microseconds a
planned handover has, it would be the pause. The steps allocate little, so holding collection
off for their duration costs nothing; it is re-enabled (if it was enabled) when they end, and
anything due is collected then, outside the pause.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Disable automatic collection for the block (process-wide; the serving control thread's
    own critical section — not for library callers' threads)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
