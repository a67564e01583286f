"""KV events against vLLM 0.33's own code (the CPU venv, run as a subprocess like the scheduler parity
test; skipped without it): block hashes equal to vLLM's request block hasher for each hash algorithm
and seed; the event stream equal, batch by batch and byte for byte, to vLLM's block pool's on the same
workloads (bench/kv_events_diff.py); and a subscriber of an emulated server that decodes every event
with vLLM's own classes and finds the hashes vLLM computes for the same prompts. The xxhash algorithms
are checked where both venvs have the optional `xxhash` package (skipped elsewhere)."""
from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import zmq

from server.testing import free_port, running_server
from vllm_venv import kv_events_diff, run_vllm_side, vllm_python_or_skip

REPO = Path(__file__).resolve().parents[1]
VLLM_SIDE = Path(__file__).resolve().parent / "kv_events_vllm_side.py"

pytestmark = pytest.mark.vllm
END_SEQ = (-1).to_bytes(8, "big", signed=True)


@pytest.fixture(scope="module")
def vllm_python() -> str:
    return vllm_python_or_skip("msgspec", "zmq")


@pytest.fixture(scope="module")
def vllm_python_xxhash() -> str:
    """vLLM's python, where both it and ours can hash with xxhash (an optional package on either side)."""
    python = vllm_python_or_skip("msgspec", "zmq", "xxhash")
    pytest.importorskip("xxhash")
    return python


def vllm_side(python: str, job: dict) -> dict:
    return run_vllm_side(python, VLLM_SIDE, job)


# -- the hash ---------------------------------------------------------------------------------------
def hash_cases(algos: tuple[str, ...], rng: np.random.Generator, lora: bool = False) -> list[dict]:
    """For each algorithm, seed and block size a request of random and edge-case token ids (prompt and
    output), then the same salted (and, with `lora`, under an adapter, salted or not)."""
    cases = []
    for algo in algos:
        for seed in (None, "0", "12345"):
            for block_size in (1, 16, 64):
                n_prompt, n_out = int(rng.integers(block_size, 300)), int(rng.integers(0, 100))
                ids = rng.choice([0, 1, 23, 24, 255, 256, 65535, 65536, 128255, 151935], n_prompt + n_out).tolist()
                ids[: n_prompt // 2] = rng.integers(0, 200_000, n_prompt // 2).tolist()
                plain = {"algo": algo, "seed": seed, "block_size": block_size, "prompt": ids[:n_prompt],
                         "output": ids[n_prompt:]}
                cases += [plain, {**plain, "cache_salt": f"tenant-{block_size}"}]  # a salted first block
                if lora:
                    adapter = {"lora": ["sql", 3, "/adapters/sql"]}
                    cases += [{**plain, **adapter}, {**plain, **adapter, "cache_salt": "tenant"}]
    return cases


def check_hashes(python: str, cases: list[dict]) -> list[dict]:
    answers = vllm_side(python, {"job": "hashes", "cases": cases})["answers"]
    for case, answer in zip(cases, answers):
        label = {k: v for k, v in case.items() if k not in ("prompt", "output")}
        assert answer["vllm"], label
        assert answer["ours"] == answer["vllm"], label
        # a seed of our own only where vLLM draws one too: xxhash without PYTHONHASHSEED
        assert answer["drawn"] == (case["seed"] is None and case["algo"].startswith("xxhash")), label
    return answers


def test_block_hashes_equal_vllms_request_block_hasher_for_each_algo_and_seed(vllm_python):
    answers = check_hashes(vllm_python, hash_cases(("sha256", "sha256_cbor"), np.random.default_rng(3)))
    assert answers[0]["vllm"][0] != answers[1]["vllm"][0]  # the salt changes the hashes


def test_xxhash_block_hashes_equal_vllms_for_each_seed_salt_and_adapter(vllm_python_xxhash):
    """xxhash and xxhash_cbor (xxh3-128 of the pickled or CBOR block): equal to vLLM's for PYTHONHASHSEED set,
    and, unset, equal from the seed on (each side draws a random seed, as vLLM's engine does)."""
    cases = hash_cases(("xxhash", "xxhash_cbor"), np.random.default_rng(4), lora=True)
    answers = check_hashes(vllm_python_xxhash, cases)
    firsts = [a["vllm"][0] for a, c in zip(answers, cases) if c["seed"] == "0" and c["block_size"] == 16]
    assert len(set(firsts)) == len(firsts) == 8  # salt, adapter and algorithm each key their own blocks


# -- the event stream ---------------------------------------------------------------------------------
def test_event_stream_equals_vllms_block_pool_batch_by_batch(vllm_python):
    """Evictions under KV pressure, preemptions, aborts and prefix hits, sync and async scheduling."""
    results = kv_events_diff(vllm_python, ["prefix_pressure_aborts", "priority_self_preempt",
                                           "stale_token_after_preemption"])
    assert sum(r["removed"] for r in results) > 100


def test_xxhash_event_stream_equals_vllms_block_pool_batch_by_batch(vllm_python_xxhash):
    """bench/kv_events_diff.py with --algo xxhash and xxhash_cbor, plain and LoRA workloads, sync and async."""
    workloads, algos = ["prefix_pressure_aborts", "lora_prefix_sharing"], ["xxhash", "xxhash_cbor"]
    done = subprocess.run([vllm_python_xxhash, str(REPO / "bench" / "kv_events_diff.py"), "--json",
                           *(a for w in workloads for a in ("--only", w)), *(a for x in algos for a in ("--algo", x))],
                          capture_output=True, text=True, cwd=REPO, timeout=900)
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted({(r["workload"], r["algo"]) for r in results}) == sorted(
        (w, a) for w in workloads for a in algos) and len(results) == 8
    for r in results:
        assert r["agrees"], (r["workload"], r["mode"], r["algo"], r["first_divergence"], r["errors"])
    assert sum(r["removed"] for r in results) > 100


# -- a subscriber of a server -----------------------------------------------------------------------------
async def record_server(algo: str, monkeypatch, seed: str | None) -> dict:
    """Serve a small KV cache with events on; send prompts sharing prefixes, reset the prefix cache,
    send one more; return every published payload (from the replay socket) and each request's ids."""
    if seed is None:
        monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    else:
        monkeypatch.setenv("PYTHONHASHSEED", seed)
    replay = free_port()
    flag = json.dumps({"enable_kv_cache_events": True, "endpoint": f"tcp://*:{free_port()}",
                       "replay_endpoint": f"tcp://*:{replay}"})
    rng = np.random.default_rng(5)
    system = [rng.integers(0, 128_000, 40).tolist() for _ in range(2)]
    sequences = []
    async with running_server("--speed", "1000", "--kv-events-config", flag, "--prefix-caching-hash-algo", algo,
                              "--num-gpu-blocks-override", "24", "--max-model-len", "256") as server:
        async with aiohttp.ClientSession() as http:
            for i in range(9):
                prompt = system[i % 2] + rng.integers(0, 128_000, int(rng.integers(1, 60))).tolist()
                sequences.append(await _complete(http, server.url, prompt, int(rng.integers(5, 40))))
            async with http.post(server.url + "/reset_prefix_cache") as r:
                assert (await r.json())["success"]
            sequences.append(await _complete(http, server.url, system[0] + [1, 2, 3], 20))
        publishers = server.running.kv_events.publishers
        for _ in range(2000):  # until the publisher thread has taken every batch (not a fixed wait)
            if server.engine.num_unfinished == 0 and all(p.drained for p in publishers):
                break
            await asyncio.sleep(0.01)
        payloads = _replay(f"tcp://127.0.0.1:{replay}")
    return {"algo": algo, "seed": seed, "block_size": 16, "payloads": payloads, "sequences": sequences}


async def _complete(http: aiohttp.ClientSession, url: str, prompt: list[int], max_tokens: int) -> list:
    payload = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "return_token_ids": True}
    async with http.post(url + "/v1/completions", json=payload) as r:
        body = await r.json()
    return [prompt, body["choices"][0]["token_ids"]]


def _replay(endpoint: str) -> list[str]:
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.connect(endpoint)
    dealer.send_multipart((b"", (0).to_bytes(8, "big")))
    payloads = []
    try:
        while True:
            assert dealer.poll(5000)
            _, _, seq, payload = dealer.recv_multipart()
            if seq == END_SEQ:
                return payloads
            assert int.from_bytes(seq, "big") == len(payloads)
            payloads.append(payload.hex())
    finally:
        dealer.close(linger=0)


async def test_a_subscriber_decodes_every_event_with_vllms_classes_and_finds_vllms_hashes(vllm_python,
                                                                                          monkeypatch):
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")
    runs = [await record_server(algo, monkeypatch, seed)
            for algo, seed in (("sha256", None), ("sha256_cbor", None), ("sha256", "7"))]
    expected = check_subscriber(vllm_python, runs)
    assert expected[0] != expected[1] != expected[2]


async def test_a_subscriber_finds_vllms_xxhash_hashes_for_the_same_pythonhashseed(vllm_python_xxhash, monkeypatch):
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")
    runs = [await record_server(algo, monkeypatch, "7") for algo in ("xxhash", "xxhash_cbor")]
    expected = check_subscriber(vllm_python_xxhash, runs)
    assert expected[0] != expected[1]


def check_subscriber(python: str, runs: list[dict]) -> list:
    """Decode each recorded run with vLLM's classes: the same bytes, rank 0, every stored block's hashes
    vLLM's for its request and position, evictions of stored blocks only, one reset; vLLM's hashes of each."""
    answer = vllm_side(python, {"job": "decode", "runs": runs})
    for run, decoded in zip(runs, answer["runs"]):
        label = (run["algo"], run["seed"])
        batches = decoded["batches"]
        assert batches and all(b["same_bytes"] and b["rank"] == 0 for b in batches), label
        events = [e for b in batches for e in b["events"]]
        expected = decoded["expected"]
        stored, removed = set(), []
        for event in events:
            if event["type"] == "BlockStored":
                assert (event["block_size"], event["medium"], event["lora_id"], event["group_idx"]) == \
                    (16, "GPU", None, 0), label
                assert event["block_hashes"] == _vllm_hashes_of(event, run["sequences"], expected), label
                stored.update(event["block_hashes"])
            elif event["type"] == "BlockRemoved":
                removed += event["block_hashes"]
        assert removed and set(removed) <= stored, label  # KV pressure evicted cached blocks
        for (prompt, _), hashes in zip(run["sequences"], expected):
            assert set(hashes[: len(prompt) // 16]) <= stored, label  # every full prompt block was stored
        cleared = [i for i, e in enumerate(events) if e["type"] == "AllBlocksCleared"]
        assert len(cleared) == 1 and events[cleared[0] + 1]["parent_block_hash"] is None, label
    return [decoded["expected"] for decoded in answer["runs"]]


def _vllm_hashes_of(event: dict, sequences: list, expected: list) -> list:
    """vLLM's hashes for the blocks of the request and position the event's token ids come from."""
    tokens, n = event["token_ids"], len(event["block_hashes"])
    for (prompt, output), hashes in zip(sequences, expected):
        ids = prompt + output
        for i in range(len(hashes) - n + 1):
            parent = hashes[i - 1] if i else None
            if ids[i * 16:(i + n) * 16] == tokens and parent == event["parent_block_hash"]:
                return hashes[i:i + n]
    raise AssertionError(f"no request holds the blocks of {event}")


# -- the session id ---------------------------------------------------------------------------------------
SESSION_CASES = [
    ({"session_id": "body", "vllm_xargs": {"session_id": "xargs"}}, {"X-Session-ID": "header"}),
    ({"session_id": "", "vllm_xargs": {"session_id": "xargs"}}, {"x-session-id": "header"}),
    ({"vllm_xargs": {"session_id": "xargs"}}, {"X-Session-ID": ""}),
    ({"vllm_xargs": {"session_id": 7}}, {}),
    ({"vllm_xargs": {"session_id": ""}}, None),
    ({"user": "alice"}, {"X-Session-Id": "header"}),
    ({"user": "alice"}, None),
]


def test_the_session_id_is_the_one_vllms_front_end_takes(vllm_python):
    from multidict import CIMultiDict

    from server.protocol import CompletionRequest
    from server.session_id import vllm_session_id
    cases = [{"body": {"prompt": [1, 2], **body}, "headers": headers} for body, headers in SESSION_CASES]
    theirs = vllm_side(vllm_python, {"job": "session_ids", "cases": cases})["answers"]
    ours = [vllm_session_id(CompletionRequest.model_validate(case["body"]),
                            None if case["headers"] is None else CIMultiDict(case["headers"])) for case in cases]
    assert ours == theirs and theirs[:3] == ["body", "header", "xargs"]


async def test_a_subscriber_reads_each_requests_session_id_with_vllms_classes(vllm_python):
    replay = free_port()
    flag = json.dumps({"enable_kv_cache_events": True, "endpoint": f"tcp://*:{free_port()}",
                       "replay_endpoint": f"tcp://*:{replay}"})
    sent = [({"session_id": "conv-1"}, {}), ({}, {"X-Session-ID": "conv-2"}),
            ({"vllm_xargs": {"session_id": "conv-3"}}, {}), ({"user": "alice"}, {})]
    sequences = []
    async with running_server("--speed", "1000", "--kv-events-config", flag) as server:
        async with aiohttp.ClientSession() as http:
            for i, (fields, headers) in enumerate(sent):
                prompt = [i + 1] + list(range(200, 239))
                payload = {"prompt": prompt, "max_tokens": 2, "ignore_eos": True, "return_token_ids": True, **fields}
                async with http.post(server.url + "/v1/completions", json=payload, headers=headers) as r:
                    sequences.append([prompt, (await r.json())["choices"][0]["token_ids"]])
        publishers = server.running.kv_events.publishers
        for _ in range(2000):  # until the publisher thread has taken every batch (not a fixed wait)
            if server.engine.num_unfinished == 0 and all(p.drained for p in publishers):
                break
            await asyncio.sleep(0.01)
        payloads = _replay(f"tcp://127.0.0.1:{replay}")
    run = {"algo": "sha256", "seed": None, "block_size": 16, "payloads": payloads, "sequences": sequences}
    decoded = vllm_side(vllm_python, {"job": "decode", "runs": [run]})["runs"][0]
    assert all(b["same_bytes"] for b in decoded["batches"])
    stored = [e for b in decoded["batches"] for e in b["events"] if e["type"] == "BlockStored"]
    by_prompt = {e["token_ids"][0]: e["session_id"] for e in stored if e["parent_block_hash"] is None}
    assert by_prompt == {1: "conv-1", 2: "conv-2", 3: "conv-3", 4: None}
