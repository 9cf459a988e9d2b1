"""Progress output: a bar on a terminal, a few plain lines otherwise."""

from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


class Progress:
    """Reports `done` out of `total`, at most every 0.1 s (a bar) or every 25% (lines)."""

    def __init__(self, total: int, *, enabled: bool = True) -> None:
        self.total = max(total, 1)
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()
        self.last = 0.0
        self.next_line = 25

    def update(self, done: int, errors: int) -> None:
        if not self.enabled:
            return
        pct = 100 * done // self.total
        now = time.perf_counter()
        rate = done / (now - self.start) if now > self.start else 0.0
        if self.tty:
            if now - self.last >= 0.1:
                self.last = now
                bar = "#" * (pct // 4) + "." * (25 - pct // 4)
                sys.stderr.write(f"\r[{bar}] {pct:3d}% {done}/{self.total} "
                                 f"{rate:,.0f} req/s errors {errors}")
                sys.stderr.flush()
        elif pct >= self.next_line:
            self.next_line = pct // 25 * 25 + 25
            print(f"{pct}%: {done}/{self.total} verified, {rate:,.0f} req/s, errors {errors}",
                  file=sys.stderr)

    def done(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()
