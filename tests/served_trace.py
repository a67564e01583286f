"""Serve and replay compared request by request: a workload sent to a server at its gaps, the requests the
server logged as a trace an offline replay reads (LLMServingSim's JSONL with token ids: the same arrivals,
prompts and outputs), and the fields where the two must agree. The arrivals compared are the server's own
log's, so how late a send leaves on a busy machine does not matter."""
from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import aiohttp

TIMING_KEYS = ("arrival_time", "queued_time", "scheduled_time", "first_token_time", "finish_time")


async def send_paced(url: str, workload: list[dict], payload: Callable[[dict], dict]) -> dict[str, list[int]]:
    """POST each item's `payload(item)` to /v1/completions `item["gap"]` wall seconds after the one before
    (X-Request-Id: its "id"), all open at once; each id's output token ids (the payload asks for them)."""
    outputs = {}
    async with aiohttp.ClientSession() as http:
        async def one(item):
            async with http.post(url + "/v1/completions", json=payload(item),
                                 headers={"X-Request-Id": item["id"]}) as r:
                body = await r.json()
                assert r.status == 200, body
            outputs[item["id"]] = body["choices"][0]["token_ids"]
        tasks = []
        for item in workload:
            await asyncio.sleep(item["gap"])
            tasks.append(asyncio.ensure_future(one(item)))
        await asyncio.gather(*tasks)
    return outputs


def write_served_trace(path: Path, served: list[dict], workload: list[dict], outputs: dict[str, list[int]],
                       extra: Callable[[dict], dict] | None = None) -> Path:
    """`served`: the server's request log; `workload`: what was sent ({"id", "prompt", "max_tokens"});
    `outputs`: each sent id's output token ids; `extra(item)`: more fields for its line (an adapter's)."""
    by_id = {f"cmpl-{w['id']}-0": w for w in workload}
    with path.open("w") as f:
        for r in sorted(served, key=lambda r: r["arrival_time"]):
            item = by_id[r["request_id"]]
            line = {"request_id": r["request_id"], "arrival_time_ns": round(r["arrival_time"] * 1e9),
                    "input_toks": len(item["prompt"]), "output_toks": item["max_tokens"],
                    "input_tok_ids": item["prompt"], "output_tok_ids": outputs[item["id"]]}
            f.write(json.dumps({**line, **(extra(item) if extra else {})}) + "\n")
    return path


def rebased(records: list[dict]) -> dict[str, dict]:
    """Each request's record by id, its times counted from the first arrival."""
    t0 = min(r["arrival_time"] for r in records)
    return {r["request_id"]: {k: (v - t0 if k in TIMING_KEYS and v is not None else v) for k, v in r.items()}
            for r in records}


def differences(served: list[dict], replayed: list[dict], tolerance: float = 1e-6) -> list[tuple]:
    """(request id, field, served, replayed) wherever the replay's record differs from the served one (a
    replay may add fields, such as energy or the instance, not change any); floats within `tolerance`."""
    ours, theirs = rebased(served), rebased(replayed)
    assert ours.keys() == theirs.keys()
    found = []
    for request_id, mine in ours.items():
        for key, value in mine.items():
            other = theirs[request_id][key]
            if (abs(value - other) >= tolerance) if isinstance(value, float) else value != other:
                found.append((request_id, key, value, other))
    return found
