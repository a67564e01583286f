"""Progress of a long run, for both drivers: requests done out of a total, with an ETA.

On a terminal it is a tqdm bar; anywhere else (a log file, CI, `nohup`) one plain line
every `interval` seconds, so a replay that runs for minutes is never silent:

    replay: 5000/19366 requests (25.8%), 1204 s virtual, 3.1 s elapsed, ETA 9 s

The total may be unknown (None): the bar and the line then count without an ETA. It may be given as a
function, called when first needed (a bar at once, a plain line only when one is due): counting a trace's
lines costs a read of the whole file, which a run shorter than `interval` off a terminal never shows.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


class Progress:
    def __init__(self, total: int | None | Callable[[], int | None], desc: str, *, unit: str = "requests",
                 stream: TextIO | None = None, interval: float = 10.0, terminal: bool | None = None) -> None:
        self._total = total
        self.desc = desc
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.done = 0
        self.status = ""
        self._start = time.monotonic()
        self._next_line = self._start + interval
        is_tty = terminal if terminal is not None else self.stream.isatty()
        self._bar = None
        if is_tty:
            from tqdm import tqdm
            self._bar = tqdm(total=self.total, desc=desc, unit=" " + unit.rstrip("s"), file=self.stream,
                             mininterval=0.5, dynamic_ncols=True)

    @property
    def total(self) -> int | None:
        if callable(self._total):
            self._total = self._total()
        return self._total

    def update(self, n: int = 1, status: str | None = None) -> None:
        """`n` more done; `status` (e.g. the virtual time reached) is shown beside the count."""
        self.done += n
        if status is not None:
            self.status = status
        if self._bar is not None:
            if status is not None:
                self._bar.set_postfix_str(status, refresh=False)
            self._bar.update(n)
            return
        now = time.monotonic()
        if now >= self._next_line:
            self._next_line = now + self.interval
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()

    def line(self, now: float | None = None) -> str:
        elapsed = (now if now is not None else time.monotonic()) - self._start
        parts = [f"{self.desc}: {self.done}"]
        if self.total:
            parts[0] += f"/{self.total} {self.unit} ({100 * self.done / self.total:.1f}%)"
        else:
            parts[0] += f" {self.unit}"
        if self.status:
            parts.append(self.status)
        parts.append(f"{elapsed:.1f} s elapsed")
        if self.total and self.done:
            parts.append(f"ETA {elapsed * (self.total - self.done) / self.done:.0f} s")
        return ", ".join(parts)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
