"""The event loop and the public API drivers use: submit, abort, advance, run.

Virtual time only moves by popping the next event: an arrival, or an engine
whose loop is due (a batch it waits on has finished). Every finished step is
reported to the listeners (statistics, step log, the server's token delivery).
Ties are broken deterministically: arrivals first, then engines by index.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

from emulator.engine_loop import EngineLoop
from emulator.engine import Engine, StepRecord
from emulator.request import Request
from emulator.router import Router

Listener = Callable[[StepRecord], None]


class Simulation:
    """`engines` are where requests are routed to; `loops` drive them (see engine_loop)."""

    def __init__(self, engines: list[Engine], loops: list[EngineLoop], router: Router | None = None) -> None:
        self.engines = engines
        self.loops = loops
        self._loop_of = {engine.index: loop for loop in loops for engine in loop.engines}
        self.router = router or Router(engines)
        self.now = 0.0
        self.active: dict[str, Request] = {}
        self._listeners: list[Listener] = []
        self._finish_listeners: list[Callable[[Request], None]] = []

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def add_finish_listener(self, listener: Callable[[Request], None]) -> None:
        """Called for every request that ends (finished, stopped or aborted)."""
        self._finish_listeners.append(listener)

    # -- driving the simulation ------------------------------------------------------
    def submit(self, request: Request, pinned_engine: int | None = None) -> Engine:
        """Hand a request to an engine at its arrival time (which must not be in the past)."""
        if request.request_id in self.active:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if request.arrival_time < self.now:
            request.arrival_time = self.now
        engine = self.router.pick(request, pinned_engine)
        self.active[request.request_id] = request
        engine.add_request(request)
        self._loop_of[engine.index].wake(request.arrival_time)
        return engine

    def abort(self, request_id: str) -> bool:
        """Abort a request wherever it is; its blocks are freed at once. False if unknown or done."""
        request = self.active.pop(request_id, None)
        if request is None:
            return False
        self.engines[request.engine_index].abort(request, self.now)
        for listener in self._finish_listeners:
            listener(request)
        return True

    def abort_all(self) -> int:
        """Abort every request in every engine; returns how many."""
        ids = list(self.active)
        for request_id in ids:
            self.abort(request_id)
        return len(ids)

    def pause(self, mode: str = "abort") -> None:
        """vLLM's pause_scheduler: "abort" aborts every request and stops; "keep" stops with the
        requests kept; "wait" lets running requests finish but admits nothing. Arrivals queue."""
        if mode not in ("abort", "keep", "wait"):
            raise ValueError(f"Invalid pause mode: {mode}")
        if mode == "abort":
            self.abort_all()
        for loop in self.loops:
            loop.pause("new" if mode == "wait" else "all")

    def resume(self) -> None:
        for loop in self.loops:
            loop.resume(self.now)

    @property
    def is_paused(self) -> bool:
        return any(loop.paused for loop in self.loops)

    def next_event_time(self) -> float | None:
        times = [loop.wake_at for loop in self.loops if loop.wake_at is not None]
        return min(times) if times else None

    def advance(self, until: float) -> None:
        """Process every engine event due at or before `until`, then set the clock to it.

        Nothing is known about what comes after `until` (a server's present), so it is
        the horizon of bulk decode runs."""
        while True:
            t = self.next_event_time()
            if t is None or t > until:
                break
            self._run_engines_at(t, until)
        self.now = max(self.now, until)

    def run(self, arrivals: Iterable[Request]) -> None:
        """Offline replay: feed arrivals (sorted by arrival_time) and run until all finish."""
        pending = iter(arrivals)
        upcoming = next(pending, None)
        while True:
            t_engine = self.next_event_time()
            if upcoming is not None and (t_engine is None or upcoming.arrival_time <= t_engine):
                self.now = max(self.now, upcoming.arrival_time)
                self.submit(upcoming)
                nxt = next(pending, None)
                if nxt is not None and nxt.arrival_time < upcoming.arrival_time:
                    raise ValueError(f"arrivals are not sorted: {nxt.request_id!r} arrives before "
                                     f"{upcoming.request_id!r}")
                upcoming = nxt
            elif t_engine is not None:
                self._run_engines_at(t_engine, float("inf") if upcoming is None else upcoming.arrival_time)
            else:
                break

    def _run_engines_at(self, t: float, horizon: float) -> None:
        """Run the loops due at t; none may decide past `horizon` or another loop's next event."""
        self.now = t
        for loop in self.loops:
            if loop.wake_at is not None and loop.wake_at <= t:
                others = [o.wake_at for o in self.loops if o is not loop and o.wake_at is not None]
                loop.run(t, min(horizon, *others) if others else horizon, self._report)

    def _report(self, record: StepRecord) -> None:
        for listener in self._listeners:
            listener(record)
        for request in record.finished:
            del self.active[request.request_id]
            for listener in self._finish_listeners:
                listener(request)
