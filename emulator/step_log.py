"""--step-log of `replay` and `serve`: one JSON line per engine step — the audit trail against
vLLM's scheduler. "sampled" lists the requests that got a token at the step's end, from which
every request's token times can be read back (what a client's inter-token latencies are
compared with). A server names each request by its engine id, as vLLM's engine does: the client's id
plus "-" and 8 random hex characters (its --request-log names the client's)."""
from __future__ import annotations

import json
from typing import IO

from emulator.engine import StepRecord


class StepLog:
    def __init__(self, file: IO[str], multi_engine: bool) -> None:
        self.file = file
        self.multi_engine = multi_engine

    def on_step(self, r: StepRecord) -> None:
        line = {"step": r.step, "start": r.start, "duration": r.duration,
                "scheduled": {q.request_id: n for q, n in r.scheduled.items()},
                "preempted": [q.request_id for q in r.preempted],
                "finished": [q.request_id for q in r.finished],
                "cached_tokens": {q.request_id: n for q, n in r.cached_tokens.items()},
                "sampled": [q.request_id for q in r.got_token]}
        if self.multi_engine:
            line["engine"] = r.engine
        self.file.write(json.dumps(line) + "\n")
