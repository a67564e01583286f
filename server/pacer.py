"""The bridge between asyncio and the simulation: the core runs at the pace of the wall clock.

Virtual time is `(wall - wall0) * speed`. The core only ever moves forward as
causality allows (DESIGN §1):

- a request is stamped with the virtual time at which the server had read it and
  submitted after the core has processed every event strictly before that time (an
  arrival that ties with an engine event goes first, as in offline replay). Parsing
  and tokenizing happen between the stamp and the submission without yielding to
  the event loop, so nothing else can move the core in between: the engine sees the
  request at the moment it arrived, and the time spent tokenizing is not added to
  its latency (the GPU would not have waited for our CPU);
- a timer fires at the wall time of the core's next event and advances the core to
  the virtual now; the engine steps that finish call the step listeners, which
  write the tokens to the clients right there, in the same callback;
- an abort is applied at the virtual now, after every event due before it.

The step listeners only note which streams have new tokens; after each advance the
delivery callbacks (`on_delivery`) write them, so a stream that is behind by several
steps gets their tokens in one write (as vLLM's front end merges the outputs it has
not yet sent), and the core is never re-entered from a write.

Event loop timers have millisecond granularity (epoll's timeout; uvloop's clock), so
the timer is set a little early; the loop then keeps turning (serving any I/O) until
the last fraction of a millisecond, which is slept: tokens leave at their due time
rather than up to a millisecond after it, and requests are read meanwhile.

So the per-request virtual timings are exactly those of an offline replay of the
same arrivals; the wall clock only decides when they are delivered.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable

from emulator.instance import Instance
from emulator.request import Request
from emulator.simulation import Simulation

# Wake this much before an event: event loop timers are only as fine as a millisecond, and
# may even fire early (uvloop). Closer than SLEEP_WITHIN, sleep; before that, let the loop turn.
TIMER_LEAD = 0.0015
SLEEP_WITHIN = 0.0002


class Pacer:
    def __init__(self, simulation: Simulation, speed: float, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if not speed > 0:
            raise ValueError(f"--speed must be positive; got {speed}")
        self.sim = simulation
        self.speed = speed
        self._loop = loop or asyncio.get_running_loop()
        self.wall0 = time.perf_counter()  # not loop.time(): uvloop's clock ticks in milliseconds
        self._timer: asyncio.Handle | None = None
        self._timer_due: float | None = None
        self._deliveries: list[Callable[[], None]] = []
        self._delivery: asyncio.Handle | None = None  # a delivery set for the loop's next turn

    # -- clocks ---------------------------------------------------------------------
    def virtual_now(self) -> float:
        return (time.perf_counter() - self.wall0) * self.speed

    def wall_time(self, virtual: float) -> float:
        """The perf_counter() time at which virtual time `virtual` is due."""
        return self.wall0 + virtual / self.speed

    def on_delivery(self, callback: Callable[[], None]) -> None:
        """`callback()` runs after every advance of the core, once the listeners have seen each step due."""
        self._deliveries.append(callback)

    # -- driving the core -------------------------------------------------------------
    def submit(self, requests: list[Request], arrival: float, pinned_engine: int | None = None,
               instance: Instance | None = None) -> None:
        """Hand the engine requests of one API request to the core as arriving at virtual time `arrival`
        (stamped when read), to the cluster's router, which sends them all to one instance, or to
        `instance` (a request on that instance's own port): Simulation.submit_group."""
        arrival = max(arrival, self.sim.now)
        self.sim.advance(math.nextafter(arrival, -math.inf))
        try:
            for request in requests:
                request.arrival_time = arrival
            self.sim.submit_group(requests, pinned_engine, instance)
        finally:
            self._advanced()

    def abort(self, request_ids: Iterable[str]) -> None:
        """Abort requests now (a client went away); their blocks are freed at once."""
        self.sim.advance(max(self.virtual_now(), self.sim.now))
        for request_id in request_ids:
            self.sim.abort(request_id)
        self._advanced()

    def catch_up(self) -> None:
        """Process every event due by now (before reading engine state for an answer)."""
        self.sim.advance(max(self.virtual_now(), self.sim.now))
        self._advanced()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _advanced(self, deliver_now: bool = False) -> None:
        """Deliver what the core produced, then wait for its next event. The timer delivers at once;
        a submission, an abort or a catch-up on the loop's next turn, so that the many of one turn (a
        burst of requests, of clients leaving) cost one delivery, not one each."""
        if deliver_now:
            self._deliver()
        elif self._delivery is None:
            self._delivery = self._loop.call_soon(self._deliver)
        self._arm()

    def _deliver(self) -> None:
        if self._delivery is not None:
            self._delivery.cancel()
            self._delivery = None
        for deliver in self._deliveries:
            deliver()

    def _arm(self) -> None:
        """Set the timer for the core's next event (a submission may have made it earlier)."""
        t = self.sim.next_event_time()
        if t is None:
            self.close()
            return
        due = self.wall_time(t)
        if self._timer is not None:
            if self._timer_due <= due:
                return  # already set to fire no later than this
            self._timer.cancel()
        self._timer_due = due
        self._timer = self._loop.call_later(max(0.0, due - time.perf_counter() - TIMER_LEAD), self._on_timer)

    def _on_timer(self) -> None:
        early = self._timer_due - time.perf_counter()
        if early > SLEEP_WITHIN:
            self._timer = self._loop.call_soon(self._on_timer)  # one more turn of the loop first
            return
        self._timer = None
        if early > 0:
            time.sleep(early)
        self.sim.advance(max(self.virtual_now(), self.sim.now))
        self._advanced(deliver_now=True)
