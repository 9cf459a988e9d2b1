"""Progress output: a bar on a terminal, a few plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

__all__ = ["Progress"]


class Progress:
    """Reports `done` out of `total`, at most every 0.1 s (a bar) or every 25% (lines).

    :meth:`done` always draws the final state (the bar's last frame, or a last line when the
    run ended between two 25% steps), so what stays on screen is where the run ended.
    """

    def __init__(self, total: int, *, enabled: bool = True, stream: Optional[TextIO] = None
                 ) -> None:
        self.total = max(total, 1)
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()
        self.last = 0.0
        self.next_line = 25
        self.state = (0, 0)
        self.printed: Optional[tuple[int, int]] = None

    def update(self, done: int, errors: int, *, final: bool = False) -> None:
        """Records progress; draws when 0.1 s passed (terminal) or a 25% step was crossed."""
        if not self.enabled:
            return
        self.state = (done, errors)
        pct = 100 * done // self.total
        now = time.perf_counter()
        rate = done / (now - self.start) if now > self.start else 0.0
        if self.tty:
            if final or now - self.last >= 0.1:
                self.last = now
                filled = min(pct, 100) // 4
                bar = "#" * filled + "." * (25 - filled)
                self.stream.write(f"\r[{bar}] {pct:3d}% {done}/{self.total} "
                                  f"{rate:,.0f} req/s errors {errors}")
                self.stream.flush()
                self.printed = self.state
        elif pct >= self.next_line or (final and self.printed != self.state):
            self.next_line = pct // 25 * 25 + 25
            print(f"{pct}%: {done}/{self.total} verified, {rate:,.0f} req/s, errors {errors}",
                  file=self.stream, flush=True)
            self.printed = self.state

    def done(self, done: Optional[int] = None, errors: Optional[int] = None) -> None:
        """Draws the final frame (with the counts given, else the last ones), then ends it."""
        if not self.enabled:
            return
        last_done, last_errors = self.state
        self.update(last_done if done is None else done,
                    last_errors if errors is None else errors, final=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
