"""Which engine of a data-parallel deployment gets a new request (inside one instance).

`least_loaded` is vLLM 0.33's data-parallel load balancer as one front end (`--api-server-count 1`, a
client count of 1) runs it (DPLBAsyncMPClient.get_core_engine_for_request, DPCoordinatorProc), on the
simulation's clock:

- An engine reports its waiting and running counts, with its KV-cache usage, to the DP coordinator when
  the counts change, at a step boundary (`_maybe_publish_request_counts`): here when a step's output is
  processed, or when requests are aborted.
- The coordinator publishes every engine's latest report to the front end at most every 100 ms, and only
  once a report came in since the last publication. The front end's view is the last publication; to the
  engine it picks it adds one waiting request, until the next publication replaces the view.
- An engine's score is max(its unfinished requests, waiting + running in the view) + waiting * 6 *
  max(0, KV usage - 0.5). The unfinished requests are counted exactly (vLLM's `engine_inflight`: placed,
  not yet finished); the penalty steers new requests away from a queue on an engine whose KV cache is
  over half full, which drains slowly. The lowest score wins, scanning from an engine one further at
  every pick, so ties rotate.

`round_robin`: in turn. A request may also be pinned to an engine (vLLM's `X-data-parallel-rank`
header): it counts among that engine's unfinished requests, but moves neither the scan start nor the
view. Across instances, emulator.routing decides.
"""
from __future__ import annotations

from collections import deque
from itertools import count

from emulator.engine import Engine, RunRecord, StepRecord
from emulator.request import Request

POLICIES = ("least_loaded", "round_robin")
STATS_INTERVAL = 0.1  # DPCoordinatorProc's min_stats_update_interval_ms: the least time between publications
KV_PRESSURE_FROM = 0.5  # KV usage above which waiting requests weigh more ...
KV_PRESSURE_WEIGHT = 6.0  # ... up to 3 more each at a full cache


class DPBalancer:
    def __init__(self, engines: list[Engine], policy: str = "least_loaded") -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; choose one of {', '.join(POLICIES)}")
        self.engines = engines
        self.policy = policy
        self.coordinated = policy == "least_loaded" and len(engines) > 1  # vLLM runs a DP coordinator
        self._position = {engine.index: i for i, engine in enumerate(engines)}
        self._turn = count()
        self.reset()

    def reset(self) -> None:
        """The front end and coordinator as they start (the instance restarted): nothing reported yet."""
        n = len(self.engines)
        self.view: list[list[float]] = [[0, 0, 0.0] for _ in range(n)]  # [waiting, running, KV usage] each
        self.published_at = float("-inf")
        self._start = 0  # where the next scan starts
        self._counts = [(0, 0)] * n  # each engine's last reported (waiting, running)
        self._held: list[list[float]] = [[0, 0, 0.0] for _ in range(n)]  # the coordinator's latest of each
        self._reports: list[deque[tuple[float, int, int, float]]] = [deque() for _ in range(n)]  # not published

    # -- what the engines report to the coordinator ---------------------------------------
    def observe(self, record: StepRecord | RunRecord) -> None:
        """One of the engines processed a step's output (a run of decode steps: its first; the counts stay)."""
        if not self.coordinated:
            return
        if isinstance(record, RunRecord):
            self._report(record.engine, record.ends[0], record.num_waiting, len(record.requests), record.kv_usage[0])
        else:
            self._report(record.engine, record.end, record.num_waiting, record.num_running, record.kv_usage)

    def engine_changed(self, engine: Engine, now: float) -> None:
        """Requests left the engine outside a step (aborted): it reports its counts as they are now."""
        if self.coordinated:
            self._report(engine.index, now, engine.num_waiting, engine.num_running, engine.kv.usage)

    def _report(self, engine_index: int, time: float, waiting: int, running: int, kv_usage: float) -> None:
        i = self._position[engine_index]
        if (waiting, running) != self._counts[i]:  # an engine sends only changed counts
            self._counts[i] = (waiting, running)
            self._reports[i].append((time, waiting, running, kv_usage))

    def _catch_up(self, now: float) -> None:
        """Apply the coordinator's publications due by `now`: each STATS_INTERVAL after the one before at
        the earliest, and not before a report came in since; each carries every engine's latest report."""
        reports, held = self._reports, self._held
        while True:
            first = min((queue[0][0] for queue in reports if queue), default=None)
            if first is None:
                return
            at = max(self.published_at + STATS_INTERVAL, first)
            if at > now:
                return
            for queue, latest in zip(reports, held):
                while queue and queue[0][0] <= at:
                    latest[:] = queue.popleft()[1:]
            self.view = [list(latest) for latest in held]  # the front end takes the new view whole
            self.published_at = at

    # -- the front end's choice ---------------------------------------------------------------
    def pick(self, request: Request, now: float, pinned: int | None = None) -> Engine:
        """The engine for a request placed at `now`; `pinned`: a data-parallel rank of this deployment (0-based)."""
        n = len(self.engines)
        if pinned is not None and not 0 <= pinned < n:
            raise ValueError(f"data parallel rank {pinned} is out of range [0, {n})")
        if self.coordinated:
            self._catch_up(now)  # publications come whether or not the front end picks (and keep the reports few)
        if pinned is not None:
            return self.engines[pinned]
        if n == 1:
            return self.engines[0]
        if self.policy == "round_robin":
            return self.engines[next(self._turn) % n]
        best = min(((self._start + k) % n for k in range(n)), key=self.score)  # the first of the lowest
        self.view[best][0] += 1
        self._start = (self._start + 1) % n
        return self.engines[best]

    def score(self, i: int) -> float:
        """The load of the engine at position `i` as the front end sees it now (the lower, the likelier)."""
        waiting, running, kv_usage = self.view[i]
        score = max(unfinished(self.engines[i]), waiting + running)
        if waiting:
            score += waiting * KV_PRESSURE_WEIGHT * max(0.0, kv_usage - KV_PRESSURE_FROM)
        return score


def unfinished(engine: Engine) -> int:
    """The requests placed on an engine that have not finished (vLLM's per-engine `engine_inflight`)."""
    return len(engine.inbox) + len(engine.scheduler.waiting) + len(engine.scheduler.running)
