"""Which engine of a data-parallel deployment gets a new request (inside one instance).

`least_loaded` is vLLM's data-parallel load balancer: the engine with the lowest
waiting * 4 + running. A request may also be pinned to an engine (vLLM's
`X-data-parallel-rank` header). Across instances, emulator.routing decides.
"""
from __future__ import annotations

from itertools import count

from emulator.engine import Engine
from emulator.request import Request

POLICIES = ("least_loaded", "round_robin")


class DPBalancer:
    def __init__(self, engines: list[Engine], policy: str = "least_loaded") -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; choose one of {', '.join(POLICIES)}")
        self.engines = engines
        self.policy = policy
        self._turn = count()

    def pick(self, request: Request, pinned: int | None = None) -> Engine:
        """`pinned`: a data-parallel rank of this deployment (0-based)."""
        if pinned is not None:
            if not 0 <= pinned < len(self.engines):
                raise ValueError(f"data parallel rank {pinned} is out of range [0, {len(self.engines)})")
            return self.engines[pinned]
        if len(self.engines) == 1:
            return self.engines[0]
        if self.policy == "round_robin":
            return self.engines[next(self._turn) % len(self.engines)]
        return min(self.engines, key=lambda e: (e.num_waiting * 4 + e.num_running, e.index))
