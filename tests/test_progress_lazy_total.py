"""A progress total given as a function is called when first needed: at once for a terminal's bar, only when a
plain line is due off a terminal (a short replay never reads its trace twice to count it)."""
from __future__ import annotations

import io

from loadgen.progress import Progress


def counter(value):
    calls = []

    def total():
        calls.append(1)
        return value
    return total, calls


def test_off_a_terminal_the_total_is_counted_when_a_line_is_due():
    out = io.StringIO()
    total, calls = counter(200)
    progress = Progress(total, "replay", stream=out, interval=3600.0, terminal=False)
    progress.update(50)
    assert calls == [] and out.getvalue() == ""  # no line due yet: nothing counted
    progress.interval, progress._next_line = 0.0, 0.0
    progress.update(50, "120 s virtual")
    progress.update(1)
    assert calls == [1]  # counted once
    assert out.getvalue().startswith("replay: 100/200 requests (50.0%), 120 s virtual, ") and "ETA" in out.getvalue()


def test_a_terminal_bar_counts_at_once():
    out = io.StringIO()
    total, calls = counter(10)
    with Progress(total, "replay", stream=out, terminal=True) as progress:
        assert calls == [1]
        progress.update(10)
    assert "10/10" in out.getvalue()


def test_a_function_may_find_no_total():
    out = io.StringIO()
    progress = Progress(lambda: None, "replay", stream=out, interval=0.0, terminal=False)
    progress.update(3)
    assert out.getvalue().startswith("replay: 3 requests, ") and "ETA" not in out.getvalue()
