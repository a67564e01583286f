"""vLLM's side of test_kv_offload_policies.py, run with the CPU venv's python (it imports vLLM 0.33).

Reads a JSON list of jobs on stdin and prints one JSON answer, a list of runs. Each job,
{"policy", "num_chunks", "store_threshold", "max_tracker_size", "ops"}, drives one of vLLM's own
CPUOffloadingManager (kv_offload/cpu/manager.py) as its offloading connector's scheduler side does,
each op one request from start to finish (chunk keys are integers, vLLM's OffloadKey of their 8 bytes):

- {"op": "store", "keys"}: prepare_store of the keys (a request's new chunks, head first), then
  complete_store of those it chose, then on_request_finished;
- {"op": "load", "keys", "id"}: prepare_load of the keys, then on_request_finished (the load stays
  in flight, its chunks pinned, until:)
- {"op": "release", "id"}: complete_load of that load's keys.

A job may instead drive requests that live across ops, as vLLM's OffloadingConnector scheduler side does
(offloading/scheduler.py): each keeps its ReqContext (one on_new_request) and its next_stored_chunk_idx:

- {"op": "admit", "req", "keys", "load"}: the request (its chunk keys, head to tail) is admitted;
  get_num_new_matched_tokens sets next_stored_chunk_idx to 0, and with "load" [s, e] the chunks s..e are
  loaded (prepare_load, pinned until "release" of the request) and it becomes e (update_state_after_alloc);
- {"op": "step", "req", "end"}: a step ran it with its first `end` chunks full: _build_store_jobs offers
  chunks next..end (prepare_store, then complete_store of those it chose); next becomes end unless
  prepare_store failed (None);
- {"op": "release", "req"}: complete_load of its load;
- {"op": "finish", "req", "end"}: the step after it finished: a last "step", then on_request_finished;
- {"op": "complete", "n"}: with "in_flight" set on the job, a step's store is not completed at once (its
  chunks stay not ready: unreadable, unevictable) but by this op, which completes the oldest n store jobs
  (complete_store, in the order they were built: vLLM's worker runs them one after another).

After each op the run records the manager's state: "t1", "t2", "b1", "b2" and "p" (ARC's lists,
least recently used first, and target_t1_size) or "held" (LRU: the keys held, sorted); "counts"
(store_threshold's table, least recently offered first) and "skipped" (stores skipped so far); and
for a store "stored" (the keys it stored; null when prepare_store failed); "failures" (prepare_store
calls that failed so far).
"""
from __future__ import annotations

import json
import logging
import sys


def _key(value: int) -> bytes:
    from vllm.v1.kv_offload.base import make_offload_key
    return make_offload_key(value.to_bytes(8, "big"), 0)


def _int(key: bytes) -> int:
    return int.from_bytes(key[:8], "big")


def run(job: dict) -> list[dict]:
    from vllm.v1.kv_offload.base import ReqContext
    from vllm.v1.kv_offload.cpu.manager import CPUOffloadingManager
    manager = CPUOffloadingManager(num_chunks=job["num_chunks"], cache_policy=job["policy"],
                                   store_threshold=job["store_threshold"], max_tracker_size=job["max_tracker_size"])
    loads: dict[int, list[bytes]] = {}
    requests: dict[int, dict] = {}  # request -> its context, keys, next_stored_chunk_idx and load
    jobs: list[tuple[list[bytes], object]] = []  # store jobs not completed (in_flight), oldest first
    failures = 0
    states = []
    for number, op in enumerate(job["ops"]):
        context = ReqContext(f"r{number}")
        state: dict = {}
        if op["op"] == "complete":
            for keys, context in jobs[:op["n"]]:
                manager.complete_store(keys, context)
            del jobs[:op["n"]]
        elif "req" in op:
            failures += _request_op(manager, requests, op, jobs if job.get("in_flight") else None)
        elif op["op"] == "release":
            manager.complete_load(loads.pop(op["id"]), context)
        else:
            keys = [_key(k) for k in op["keys"]]
            for position, key in enumerate(keys):
                context.set_offload_key_position(key, position + 1)
            manager.on_new_request(context)
            if op["op"] == "store":
                output = manager.prepare_store(keys, context)
                state["stored"] = None if output is None else [_int(k) for k in output.keys_to_store]
                failures += output is None
                if output is not None and output.keys_to_store:
                    manager.complete_store(output.keys_to_store, context)
            else:
                manager.prepare_load(keys, context)
                loads[op["id"]] = keys
            manager.on_request_finished(context)
        policy = manager._policy
        if job["policy"] == "arc":
            state.update({name: [_int(k) for k in getattr(policy, name)] for name in ("t1", "t2", "b1", "b2")})
            state["p"] = policy.target_t1_size
        else:
            state["held"] = sorted(_int(k) for k in policy.chunks)
        state["counts"] = [[_int(k), n] for k, n in manager.counts.items()] if manager.counts is not None else None
        state["skipped"] = manager.stores_skipped_in_current_batch
        state["failures"] = failures
        states.append(state)
    return states


def _request_op(manager, requests: dict[int, dict], op: dict, jobs: list | None) -> int:
    """One op of a request that lives across ops; 1 if a prepare_store failed. `jobs`: where a store job
    waits for its completion (None: completed at once)."""
    from vllm.v1.kv_offload.base import ReqContext
    if op["op"] == "admit":
        request = requests.get(op["req"])
        if request is None:
            context = ReqContext(f"q{op['req']}")
            keys = [_key(k) for k in op["keys"]]
            for position, key in enumerate(keys):
                context.set_offload_key_position(key, position + 1)
            manager.on_new_request(context)
            request = requests[op["req"]] = {"context": context, "keys": keys, "load": None}
        request["next"] = 0
        if op.get("load"):
            start, end = op["load"]
            request["load"] = request["keys"][start:end]
            manager.prepare_load(request["load"], request["context"])
            request["next"] = end
        return 0
    request = requests[op["req"]]
    if op["op"] == "release":
        manager.complete_load(request.pop("load"), request["context"])
        request["load"] = None
        return 0
    failed = 0
    keys = request["keys"][request["next"]:op["end"]]
    if keys:
        output = manager.prepare_store(keys, request["context"])
        if output is None:
            failed = 1
        else:
            if output.keys_to_store and jobs is not None:
                jobs.append((output.keys_to_store, request["context"]))
            elif output.keys_to_store:
                manager.complete_store(output.keys_to_store, request["context"])
            request["next"] = op["end"]
    if op["op"] == "finish":
        manager.on_request_finished(request["context"])
    return failed


def main() -> int:
    logging.disable(logging.WARNING)
    print(json.dumps([run(job) for job in json.loads(sys.stdin.read())]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
