"""Replay a trace over HTTP against any OpenAI-compatible server, in real or accelerated time.

    vllm-emulator loadgen TRACE --base-url http://127.0.0.1:8000 [--speedup 60] [--endpoint chat]
                          [--window 0:1200] [--rate-scale 2] [--max-concurrency 64] -o DIR
    vllm-emulator loadgen --request-rate 20 --cv 2 --input-len lognormal:1000:0.5 --output-len 200 \\
                          --num-requests 1000 --base-url URL -o DIR          (synthetic)
    vllm-emulator loadgen --servegen DIR --duration 600 --base-url URL -o DIR  (ServeGen clients)

Every format offline replay reads is read by the same readers (one implementation, two
drivers). Each request is sent at its arrival time divided by --speedup, with a prompt the
server's tokenizer counts as the trace's input length (--tokenizer: the server's; default
the emulator's), `max_tokens` = the trace's output length and `ignore_eos` (as vLLM's bench
does with timed traces), streamed; a line that names a LoRA adapter (its `lora`, or a `model`
the server lists as an adapter) asks for the adapter by name, as vLLM's clients select one.
Per request it measures what `vllm bench serve` does:
TTFT (first content chunk), ITL (gaps between content chunks), E2E (last content chunk)
and TPOT = (E2E - TTFT) / (output tokens - 1). Times are reported in the trace's clock —
measured and multiplied by --speedup — so a run against `vllm-emulator serve --speed 60`
compares with an offline replay line by line; summary.json also keeps them as measured. Against
the emulator, a --speedup other than the server's --speed (its `vllm_emulator:speed` gauge) is
warned of at the start; a real vLLM has no such gauge and gets no warning. Every request carries
`Authorization: Bearer $OPENAI_API_KEY` when that is set (the key of a server started with --api-key),
as vllm bench serve's do; the server's /v1/models is read first, so a --model it does not list, or a key
it refuses, stops the run before anything is sent.

DIR gets requests.jsonl and summary.json in offline replay's schema (plus `itl`, `error`,
`trace_line`; `lora` where adapters are in play), timeseries.csv (1-s ticks of the trace clock), and,
when the server exports vLLM's Prometheus metrics, metrics.csv (its /metrics sampled over the run, its
counters read across a restarted pod's reset as Prometheus reads them: loadgen.scrape). Each request's
`send_lag` is how late it went out; summary.json's `fell_behind` (and a warning, the last line
on stderr) says when the run could not keep up and its latencies are a backlog's (keeping_up).
Ctrl-C stops sending, aborts the requests in flight and still writes everything measured so far.
`vllm-emulator report DIR` turns it into an HTML report.
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import os
import signal
import sys
import time
import urllib.error
import urllib.parse
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from emulator.stats import distribution, summarize
from loadgen.goodput import goodput, parse_slos
from loadgen.output_paths import output_dir_problem
from loadgen.progress import Progress
from loadgen.prompts import PromptBuilder
from loadgen.scrape import VLLM_SERIES, MetricsSampler, column_name, server_speed
from loadgen.trace_models import ModelResolver, parse_model_map
from loadgen.synthetic import LENGTH_FORMS, retime, servegen, synthetic, window
from loadgen.traces import FORMATS, Trace, TraceError, TraceRecord

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass(slots=True)
class Planned:
    """One request to send: when (trace seconds), what (the JSON body), and what the trace says."""
    index: int
    request_id: str
    arrival: float
    body: bytes
    input_len: int
    output_len: int
    line: int
    model: str  # the served name it asks for
    lora: str | None = None  # the LoRA adapter it asks for (then also its `model`), None: a base model


@dataclass(slots=True)
class Outcome:
    """What the client saw of one request (perf_counter seconds)."""
    due: float = 0.0  # when it should have been sent: its arrival, or when --max-concurrency freed a slot
    sent: float = 0.0
    chunks: array = field(default_factory=lambda: array("d"))
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None


# -- the workload -----------------------------------------------------------------------------------------
def parse_window(text: str | None) -> tuple[float, float]:
    if not text:
        return 0.0, math.inf
    start, sep, end = text.partition(":")
    try:
        lo = float(start) if start else 0.0
        hi = float(end) if end else math.inf
    except ValueError:
        lo = hi = math.nan
    if not sep or not (0 <= lo < hi):
        raise ValueError(f"--window {text}: expected START:END in seconds of the trace, START < END")
    return lo, hi


def workload(args: argparse.Namespace, tokenizer, model_type: str | None = None) -> tuple[list[TraceRecord], dict]:
    """The records to send, and what was skipped on the way (by reason). `tokenizer` counts the tokens of
    a trace that has only text (None: the shipped one of `model_type`'s family, loaded if needed)."""
    start, end = parse_window(args.window)
    skipped: dict = {}
    burst = None
    if args.bursts:
        size, _, period = args.bursts.partition(":")
        try:
            burst = (int(size), float(period))
        except ValueError:
            raise ValueError(f"--bursts {args.bursts}: expected SIZE:PERIOD (requests, seconds)") from None
    timing = dict(rate=args.request_rate, cv=args.cv, burst=burst, seed=args.seed)
    if args.trace:
        trace = Trace(args.trace, args.trace_format, tokenizer, model_type)
        records = iter(trace)
        if args.request_rate is not None or burst is not None:
            records = retime(records, **timing)
        records = list(window(records, start, end, args.rate_scale))
        skipped = dict(trace.skipped)
    elif args.servegen:
        duration = args.duration if args.duration is not None else (end - start if end < math.inf else 600.0)
        records = list(window(servegen(args.servegen, duration, start=start, seed=args.seed), 0.0, math.inf,
                              args.rate_scale))
    else:
        if args.num_requests is None and args.duration is None:
            raise ValueError("a synthetic workload needs --num-requests or --duration (or give a TRACE)")
        if args.duration is not None and burst is None and (args.request_rate is None
                                                             or not math.isfinite(args.request_rate)):
            raise ValueError("--duration needs a finite --request-rate, or --bursts")
        n = args.num_requests
        if n is None:
            rate = args.request_rate if burst is None else burst[0] / burst[1]
            n = max(int(math.ceil(args.duration * rate * 1.5)) + 16, 1)
        records = list(synthetic(n, args.input_len, args.output_len, **timing))
        if args.duration is not None:
            records = [r for r in records if r.arrival < args.duration]
        records = list(window(records, 0.0, math.inf, args.rate_scale))
    if args.num_requests is not None:
        records = records[:args.num_requests]
    if not records:
        raise ValueError("the workload holds no request (check --window and --duration)")
    return records, skipped


def plan(records: list[TraceRecord], builder: PromptBuilder, model: str | ModelResolver, endpoint: str,
         ignore_eos: bool, prefix: str, source: str = "trace",
         adapters: dict[str, dict] | None = None) -> list[Planned]:
    """Every request's JSON body, built before the clock starts (as `vllm bench serve` does). `model`: the
    name every request asks for, or the server's names to route each by the model its trace line names.
    `adapters`: the LoRA adapters the server lists (None: not asked). A line that names an adapter (its
    `lora`, or a `model` that routes to one) asks for it by name, as vLLM's clients select an adapter."""
    planned = []
    for index, record in enumerate(records):
        try:
            name, lora = route(record, model, adapters)
        except ValueError as exc:
            raise ValueError(f"{source}:{record.line}: {exc}") from None
        body: dict = {"model": name, "stream": True, "stream_options": {"include_usage": True}}
        if endpoint == "chat":
            if record.token_ids is not None and record.prompt is None and not record.hash_ids:
                text = builder.tokenizer.decode(record.token_ids.tolist())  # real ids (LLMServingSim traces)
            else:
                text = builder.text(record, index)
            body["messages"] = [{"role": "user", "content": text}]
            body["max_completion_tokens"] = record.output_len
        else:
            if record.token_ids is not None and record.prompt is None and not record.hash_ids:
                body["prompt"] = record.token_ids.tolist()  # the trace's own token ids, sent as given
            else:
                body["prompt"] = builder.text(record, index)
            body["max_tokens"] = record.output_len
        if ignore_eos:
            body["ignore_eos"] = True
        request_id = record.request_id if record.request_id is not None else f"{prefix}{index}"
        planned.append(Planned(index, request_id, record.arrival, json.dumps(body).encode(), record.input_len,
                               record.output_len, record.line, name, lora))
    return planned


def route(record: TraceRecord, model: str | ModelResolver, adapters: dict[str, dict] | None) -> tuple[str, str | None]:
    """The name a trace line asks for, and the adapter that name is (None: a base model). Its `lora` wins
    (vLLM's 404 text, before anything is sent, for one the server does not list); else its `model`, routed
    by the server's names (an adapter's among them), or --model for every line."""
    if record.lora is not None:
        if adapters is not None and record.lora not in adapters:
            raise ValueError(f"The model `{record.lora}` does not exist. (vLLM answers 404: no LoRA adapter "
                             f"{record.lora!r} is served)")
        return record.lora, record.lora
    name = model if isinstance(model, str) else model.resolve(record.model)
    return name, name if adapters and name in adapters else None


# -- sending -------------------------------------------------------------------------------------------------
CHAT_ROLE = b'"role":'
API_KEY_HINT = ("the server wants an API key (its --api-key): set OPENAI_API_KEY, which is sent as "
                "`Authorization: Bearer`, as vllm bench serve sends it")


def api_headers() -> dict[str, str]:
    """Every request's headers: JSON, and `Authorization: Bearer $OPENAI_API_KEY` when it is set (the key
    `vllm serve --api-key` wants; vllm bench serve reads the same variable)."""
    headers = {"Content-Type": "application/json"}
    if os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
    return headers


def unauthorized_hint() -> str:
    """What to do about a 401: set the key, or check the one set."""
    if os.environ.get("OPENAI_API_KEY"):
        return "the server refused the key in OPENAI_API_KEY: set it to the server's --api-key"
    return API_KEY_HINT


async def send(session, url: str, headers: dict, item: Planned, outcome: Outcome, chat: bool) -> None:
    """POST one streaming request and time its content chunks (vLLM bench's rules)."""
    import aiohttp
    now = time.perf_counter
    outcome.sent = now()
    try:
        async with session.post(url, data=item.body, headers={**headers, "X-Request-Id": item.request_id}) as resp:
            if resp.status != 200:
                outcome.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                if resp.status == 401:
                    outcome.error += f" ({unauthorized_hint()})"
                return
            chunks = outcome.chunks
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                if line.startswith(b"data: [DONE]"):
                    break
                fast = b'"choices":[{' in line and b'"finish_reason":null' in line
                if fast and not (chat and CHAT_ROLE in line):
                    chunks.append(now())  # a token chunk: no need to parse it
                    continue
                data = json.loads(line[6:])
                if data.get("error") is not None and not data.get("choices"):
                    outcome.error = json.dumps(data["error"])[:300]
                    continue
                choices = data.get("choices") or []
                if choices:
                    choice = choices[0]
                    delta = choice.get("delta")
                    has_output = ("text" in choice) if not chat else (
                        isinstance(delta, dict) and ("role" not in delta or delta.get("content")))
                    if has_output:
                        chunks.append(now())
                    if choice.get("finish_reason") is not None:
                        outcome.finish_reason = choice["finish_reason"]
                usage = data.get("usage")
                if usage:
                    outcome.prompt_tokens = usage.get("prompt_tokens")
                    outcome.output_tokens = usage.get("completion_tokens")
                    details = usage.get("prompt_tokens_details") or {}
                    outcome.cached_tokens = details.get("cached_tokens")
    except asyncio.CancelledError:
        outcome.finish_reason = "abort"
        raise
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, OSError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"[:300]
    if not outcome.chunks and outcome.error is None:
        outcome.error = "the stream ended without a content chunk"


async def scrape_loop(session, url: str, t0: float, interval: float, samples: list) -> None:
    """GET /metrics every `interval` wall seconds; a server without it is left alone after one try. Counters
    are read across restarts as Prometheus reads them (loadgen.scrape.MetricsSampler)."""
    sampler = MetricsSampler()
    while True:
        try:
            async with session.get(url) as resp:
                if resp.status != 200 and not samples:
                    return
                text = await resp.text() if resp.status == 200 else None  # later: a pod down for a while
        except asyncio.CancelledError:
            raise
        except Exception:  # a scrape that fails is a gap in the plot, never the run's failure
            text = None
        if text is not None:
            values = sampler.sample(text)
            if not values and not samples:
                return
            if values:
                samples.append((time.perf_counter() - t0, values))
        await asyncio.sleep(interval)


async def run(planned: list[Planned], args: argparse.Namespace,
              headers: dict) -> tuple[list[Outcome], float, list, bool]:
    """Send every request at its time; return what was seen, the start, the /metrics samples, and
    whether Ctrl-C cut the run short."""
    import aiohttp
    url = args.base_url.rstrip("/") + ENDPOINTS[args.endpoint]
    chat = args.endpoint == "chat"
    outcomes = [Outcome() for _ in planned]
    samples: list = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGINT, stop.set)
    except (NotImplementedError, RuntimeError):  # not the main thread, or no signals here
        pass
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    progress = Progress(len(planned), "loadgen", interval=args.progress_interval)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=60, sock_read=args.read_timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.perf_counter()
        scraper = None
        if args.scrape_interval > 0:
            scraper = asyncio.create_task(scrape_loop(session, args.base_url.rstrip("/") + "/metrics", t0,
                                                      args.scrape_interval, samples))
        in_flight: set[asyncio.Task] = set()

        def finished(task: asyncio.Task) -> None:
            in_flight.discard(task)
            if limit is not None:
                limit.release()
            progress.update(1, f"{(time.perf_counter() - t0) * args.speedup:.0f} s of trace time")

        async def dispatch() -> None:
            for item, outcome in zip(planned, outcomes):
                outcome.due = t0 + item.arrival / args.speedup
                delay = outcome.due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if limit is not None:
                    held = limit.locked()
                    await limit.acquire()
                    if held:  # held back by --max-concurrency, as asked: due when its slot freed
                        outcome.due = max(outcome.due, time.perf_counter())
                task = asyncio.create_task(send(session, url, headers, item, outcome, chat))
                in_flight.add(task)
                task.add_done_callback(finished)

        dispatcher = asyncio.create_task(dispatch())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([dispatcher, stopper], return_when=asyncio.FIRST_COMPLETED)
        while in_flight and not stop.is_set():
            await asyncio.wait([stopper, *in_flight], return_when=asyncio.FIRST_COMPLETED)
        interrupted = stop.is_set()
        for task in (dispatcher, stopper, *in_flight, *([scraper] if scraper else [])):
            task.cancel()
        await asyncio.gather(dispatcher, stopper, *in_flight, *([scraper] if scraper else []),
                             return_exceptions=True)
        progress.close()
        if interrupted:
            print(f"loadgen: stopped by Ctrl-C; {sum(o.sent > 0 for o in outcomes)} of {len(planned)} requests sent, "
                  "the partial results are kept", file=sys.stderr)
    try:
        loop.remove_signal_handler(signal.SIGINT)
    except (NotImplementedError, RuntimeError):
        pass
    return outcomes, t0, samples, interrupted


# -- results ---------------------------------------------------------------------------------------------------
def request_records(planned: list[Planned], outcomes: list[Outcome], t0: float, speedup: float,
                    with_lora: bool = False) -> list[dict]:
    """One record per sent request, in offline replay's schema, in the trace's clock; `with_lora`: each names
    its adapter (`lora`, None for a base model's), as offline replay's do where the target serves adapters."""
    records = []
    for item, o in zip(planned, outcomes):
        if o.sent == 0.0:
            continue  # never sent (stopped before its time)
        arrival = (o.sent - t0) * speedup
        chunks = np.frombuffer(o.chunks, dtype=np.float64) if len(o.chunks) else np.zeros(0)
        ok = o.error is None and len(chunks) > 0
        n = o.output_tokens if o.output_tokens is not None else len(chunks)
        ttft = (chunks[0] - o.sent) * speedup if len(chunks) else None
        e2e = (chunks[-1] - o.sent) * speedup if len(chunks) else None
        tpot = (e2e - ttft) / (n - 1) if ttft is not None and n and n > 1 else None
        reason = o.finish_reason if o.finish_reason else ("error" if o.error else None)
        if not ok and reason in ("stop", "length"):
            reason = "error"
        records.append({
            "request_id": item.request_id,
            "model": item.model,  # the served name it asked for (offline replay records it on a cluster)
            **({"lora": item.lora} if with_lora else {}),  # the adapter it asked for, as offline replay's records
            "arrival_time": arrival,
            "queued_time": arrival,
            "scheduled_time": None,  # not visible to a client
            "first_token_time": None if ttft is None else arrival + ttft,
            "finish_time": None if e2e is None or reason not in ("stop", "length") else arrival + e2e,
            "input_tokens": o.prompt_tokens if o.prompt_tokens is not None else item.input_len,
            "output_tokens": n or 0,
            "cached_tokens": o.cached_tokens,
            "external_tokens": None,  # KV a connector loaded: not visible to a client
            "num_preemptions": None,  # not visible to a client
            "ttft": ttft,
            "tpot": tpot,
            "e2e": e2e if reason in ("stop", "length") else None,
            "finish_reason": reason,
            "engine": None,
            "itl": [round(float(g), 9) for g in np.diff(chunks) * speedup],
            "trace_arrival": item.arrival,
            "send_lag": max(o.sent - o.due, 0.0) * speedup,
            "trace_line": item.line,
            "error": o.error,
        })
    return records


def timeseries(records: list[dict], samples: list, speedup: float, duration: float) -> list[dict]:
    """1-s ticks of the trace clock, offline replay's columns: throughput seen by the client, and
    running/waiting/KV usage, preemptions and the prefix-cache hit rate from the server's /metrics (counters:
    their growth over the tick; running: the requests in flight when the server has no /metrics)."""
    ticks = max(int(math.ceil(duration)), 1)

    def tick_of(times) -> np.ndarray:  # tick k holds (k - 1, k], as offline replay's TimeSeries counts
        return np.clip(np.ceil(np.asarray(times, dtype=float)).astype(np.int64), 1, ticks) - 1
    gen = np.zeros(ticks)
    prompt = np.zeros(ticks)
    in_flight = np.zeros(ticks)
    for r in records:
        if r["first_token_time"] is None:
            continue
        times = r["first_token_time"] + np.concatenate([[0.0], np.cumsum(r["itl"])])
        weights = np.ones(len(times))
        if len(times) > 1:  # the first chunk is one token; the rest share what remains
            weights[1:] = max(r["output_tokens"] - 1, 0) / (len(times) - 1)
        gen += np.bincount(tick_of(times), weights, minlength=ticks)
        prompt[tick_of([r["first_token_time"]])[0]] += r["input_tokens"]
        end = r["finish_time"] if r["finish_time"] is not None else times[-1]
        in_flight[int(min(r["arrival_time"], ticks - 1)):int(min(end, ticks - 1)) + 1] += 1
    rows = []
    k = 0
    last: dict = {}
    baseline = samples[0][1] if samples else {}  # what the counters held before the run: not its growth
    last_width = duration - (ticks - 1)  # the last tick is partial: its rates are over its width, as vLLM's
    for i in range(ticks):
        t = float(i + 1)
        width = last_width if i == ticks - 1 and last_width > 0 else 1.0
        before = last or baseline
        while k < len(samples) and samples[k][0] * speedup <= t:
            last = samples[k][1]
            k += 1

        def grown(name: str) -> float | None:  # a counter's growth over the tick, as the scrapes saw it
            return last[name] - before.get(name, 0.0) if name in last else None
        running = last.get("vllm:num_requests_running")
        preempted, queries = grown("vllm:num_preemptions_total"), grown("vllm:prefix_cache_queries_total")
        rows.append({
            "t": t, "prompt_throughput": float(prompt[i]) / width, "gen_throughput": float(gen[i]) / width,
            "running": int(running) if running is not None else int(in_flight[i]),
            "waiting": int(last["vllm:num_requests_waiting"]) if "vllm:num_requests_waiting" in last else "",
            "kv_cache_pct": round(100 * last["vllm:kv_cache_usage_perc"], 2) if "vllm:kv_cache_usage_perc" in last
            else "",
            "preemptions": int(preempted) if preempted is not None else "",
            "prefix_hit_pct": round(100 * (grown("vllm:prefix_cache_hits_total") or 0.0) / queries, 2) if queries
            else "",
        })
    return rows


def write_run(output: Path, records: list[dict], samples: list, args: argparse.Namespace, model: str,
              wall: float, skipped: dict, slos: dict, requested: int, adapters: dict[str, dict] | None = None) -> dict:
    """The run folder; `adapters` (the server's adapter cards, or {} where only the trace names adapters):
    summary.json's `lora_adapters` then holds each adapter's statistics, as offline replay's does."""
    output.mkdir(parents=True, exist_ok=True)
    with (output / "requests.jsonl").open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    ends = [r["finish_time"] or r["first_token_time"] or r["arrival_time"] for r in records]
    duration = max(ends) if ends else 0.0
    rows = timeseries(records, samples, args.speedup, duration)
    with (output / "timeseries.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if samples:
        names = sorted({name for _, values in samples for name in values},
                       key=lambda n: (n not in VLLM_SERIES, VLLM_SERIES.index(n) if n in VLLM_SERIES else 0, n))
        with (output / "metrics.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["t", *(column_name(n) for n in names)])
            for wall_t, values in samples:
                writer.writerow([round(wall_t * args.speedup, 6), *(values.get(n, "") for n in names)])
    summary = client_summary(records, duration)
    finished = [r for r in records if r["finish_reason"] in ("stop", "length")]
    summary["itl"] = distribution(g for r in finished for g in r["itl"])
    summary["measured_wall"] = {key: distribution(None if r[key] is None else r[key] / args.speedup
                                                  for r in finished) for key in ("ttft", "tpot", "e2e")}
    if samples:
        first, last = samples[0][1], samples[-1][1]
        delta = {n: last.get(n, 0.0) - first.get(n, 0.0) for n in VLLM_SERIES if n.endswith("_total")}
        summary["preemptions"]["total"] = delta.get("vllm:num_preemptions_total")
        queries = delta.get("vllm:prefix_cache_queries_total")
        if queries:
            summary["prefix_cache_hit_rate"] = delta.get("vllm:prefix_cache_hits_total", 0.0) / queries
    summary.update({
        "driver": "http", "target": args.base_url, "endpoint": args.endpoint, "model": model,
        "speedup": args.speedup, "num_requests_planned": requested,
        "num_failed": sum(r["finish_reason"] == "error" for r in records),
        "errors": sorted({r["error"] for r in records if r["error"]})[:10],
        "skipped_lines": skipped, "wall_seconds": wall, "trace": args.trace,
    })
    if slos:
        summary["goodput"] = goodput(records, slos, duration)
    if adapters is not None:
        names = list(adapters) + sorted({r["lora"] for r in records if r["lora"] is not None} - set(adapters))
        summary["lora_adapters"] = {name: {
            "base_model": adapters[name]["parent"] if name in adapters else None,
            "path": adapters[name].get("root") if name in adapters else None,
            **client_summary([r for r in records if r["lora"] == name], duration)} for name in names}
    summary.update(keeping_up(records, summary["ttft"], samples, args.speedup))
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def client_summary(records: list[dict], duration: float) -> dict:
    """Offline replay's statistics of these records, less what a client cannot see (None): preemptions and
    KV loaded from outside; cached tokens where the server reported them for every request."""
    counted = [{**r, "num_preemptions": r["num_preemptions"] or 0, "cached_tokens": r["cached_tokens"] or 0,
                "external_tokens": 0} for r in records]
    summary = summarize(counted, duration)
    summary["cached_tokens"] = (sum(r["cached_tokens"] for r in records)
                                if all(r["cached_tokens"] is not None for r in records) else None)
    summary["preemptions"] = {"total": None, "requests_preempted": None}
    summary["external_tokens"] = None  # not visible to a client
    return summary


# A client that shares a small machine with its server, or replays too fast for it, falls behind: it sends
# late, and reads tokens late, so what it measures is its own backlog. Warned of when more than LATE_SHARE
# of the requests went out over LATE_S late, or its mean TTFT exceeds TTFT_RATIO x the server's own (from
# /metrics, in the trace's clock at a matching --speedup) plus LATE_S. Both in seconds of the trace's clock.
LATE_S = 0.1
LATE_SHARE = 0.05
TTFT_RATIO = 2.0


def keeping_up(records: list[dict], ttft: dict, samples: list, speedup: float) -> dict:
    """summary.json's `send_lag` (how late requests went out), `server_ttft_mean` (the server's mean TTFT
    over the run, from its vllm:time_to_first_token_seconds histogram; None without one) and `fell_behind`
    (None, or why the measurements are the client's backlog rather than the server's latency)."""
    lags = [r["send_lag"] for r in records]
    server_ttft = None
    if samples:
        first, last = samples[0][1], samples[-1][1]
        count = (last.get("vllm:time_to_first_token_seconds_count", 0.0)
                 - first.get("vllm:time_to_first_token_seconds_count", 0.0))
        if count > 0:
            server_ttft = (last["vllm:time_to_first_token_seconds_sum"]
                           - first.get("vllm:time_to_first_token_seconds_sum", 0.0)) / count
    reasons = []
    late = sum(lag > LATE_S for lag in lags)
    if lags and late > LATE_SHARE * len(lags):
        reasons.append(f"{late} of {len(lags)} requests were sent over {LATE_S:g} s late (median lag "
                       f"{1000 * float(np.median(lags)):.0f} ms)")
    if server_ttft is not None and ttft.get("count") and ttft["mean"] > TTFT_RATIO * server_ttft + LATE_S:
        reasons.append(f"its mean TTFT {1000 * ttft['mean']:.0f} ms is {ttft['mean'] / max(server_ttft, 1e-9):.0f}x "
                       f"the server's own {1000 * server_ttft:.0f} ms (its /metrics)")
    fell_behind = None
    if reasons:
        fell_behind = (f"the run fell behind at --speedup {speedup:g}: {'; '.join(reasons)} (trace clock). Its "
                       f"latencies measure a backlog on this machine (the client's, or an emulator's that cannot "
                       f"deliver at its --speed), not the server's: use a lower --speedup (and --speed), or run the "
                       f"client on a machine of its own")
    return {"send_lag": distribution(lags), "server_ttft_mean": server_ttft, "fell_behind": fell_behind}


# -- command line -----------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trace", nargs="?", help="request trace (any format `replay` reads); omit for a synthetic "
                        "or ServeGen workload")
    parser.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000; requests carry "
                        "`Authorization: Bearer $OPENAI_API_KEY` when that is set (a server started with --api-key "
                        "wants it), as vllm bench serve's do")
    parser.add_argument("--endpoint", choices=list(ENDPOINTS), default="completions")
    parser.add_argument("--model", default=None, help="model name every request asks for (default: the model its "
                        "trace line names where the server serves several, else the server's first in /v1/models); "
                        "a line whose `lora` names an adapter asks for the adapter either way")
    parser.add_argument("--model-map", action="append", default=None, metavar="TRACE_NAME=SERVED_NAME",
                        help="send a trace's requests for TRACE_NAME as SERVED_NAME (repeatable)")
    parser.add_argument("--speedup", type=float, default=1.0, help="trace seconds per wall second (the server's "
                        "--speed); latencies are reported multiplied by it")
    parser.add_argument("--max-concurrency", type=int, default=None, help="at most N requests in flight")
    parser.add_argument("--window", default=None, help="START:END seconds of the trace to replay (e.g. 0:1200)")
    parser.add_argument("--rate-scale", type=float, default=1.0, help="replay the arrivals R times as fast")
    parser.add_argument("--trace-format", choices=FORMATS, default=None, help="default: detected")
    parser.add_argument("--tokenizer", default=None, help="the server's tokenizer (a local Hugging Face directory), "
                        "to size prompts; default: the shipped one of the model's family, as the emulator's")
    group = parser.add_argument_group("synthetic arrivals and lengths")
    group.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals at R per second "
                       "(re-times a trace's requests when a TRACE is given)")
    group.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of the gaps (Gamma; 1 is "
                       "Poisson; vLLM bench's --burstiness B is CV 1/sqrt(B))")
    group.add_argument("--bursts", default=None, help="SIZE:PERIOD: SIZE requests at once every PERIOD seconds")
    group.add_argument("--num-requests", type=int, default=None, help="send at most N requests")
    group.add_argument("--duration", type=float, default=None, help="seconds of synthetic or ServeGen arrivals")
    group.add_argument("--input-len", default="1024", help=f"prompt lengths: {', '.join(LENGTH_FORMS)}")
    group.add_argument("--output-len", default="128", help="output lengths, same forms")
    group.add_argument("--servegen", default=None, help="a ServeGen folder (chunk-*-trace.csv, chunk-*-dataset.json): "
                       "its clients' arrival and length distributions, from --window START (seconds of the day)")
    group.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", "-o", type=Path, required=True, help="output directory")
    parser.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                        help="SLOs for goodput, as vllm bench serve: ttft:200 tpot:50 e2el:3000")
    parser.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                        help="do not send ignore_eos (servers that refuse vLLM's extra parameters)")
    parser.add_argument("--request-id-prefix", default="loadgen-", help="X-Request-Id of request i is PREFIX<i>")
    parser.add_argument("--scrape-interval", type=float, default=1.0, help="wall seconds between /metrics samples "
                        "(0: none). A scrape makes the emulator render ~60 KB of metrics, which holds its event "
                        "loop for ~20 ms on a small machine: at a high --speed, scrape seldom or not at all")
    parser.add_argument("--read-timeout", type=float, default=600.0, help="seconds without a byte before a request "
                        "fails")
    parser.add_argument("--progress-interval", type=float, default=10.0, help="seconds between progress lines when "
                        "stderr is not a terminal")


def server_models(base_url: str, headers: dict, mapping: dict[str, str]) -> tuple[ModelResolver, dict[str, dict]]:
    """The names the server lists in /v1/models (aliases of one model share its `root`; its first base model
    is the default), and its LoRA adapters' cards by name (vLLM lists an adapter with its base model's name
    as `parent`, its path as `root`): an adapter is a name a line may ask for, served by its base model."""
    import urllib.request
    request = urllib.request.Request(base_url.rstrip("/") + "/v1/models", headers=headers)
    with urllib.request.urlopen(request, timeout=30) as resp:
        models = json.loads(resp.read())["data"]
    bases = {m["id"]: m.get("root") or m["id"] for m in models if not m.get("parent")}
    if not bases:
        raise ValueError(f"{base_url}/v1/models lists no model; pass --model")
    adapters = {m["id"]: m for m in models if m.get("parent")}
    served = {**bases, **{name: bases.get(card["parent"], card["parent"]) for name, card in adapters.items()}}
    return ModelResolver(served, next(iter(bases)), mapping), adapters


def served_model_type(name: str, served: ModelResolver | None) -> str | None:
    """The `model_type` of the model served as `name`: found by the `root` /v1/models gives it (vLLM lists a
    --served-model-name alias as `id` and the model's path as `root`), else by the name itself; None if neither
    is known (the default tokenizer then)."""
    from profiles.tokenizer import model_type_of
    root = served.served.get(name) if served is not None else None
    return (model_type_of(root) if isinstance(root, str) and root != name else None) or model_type_of(name)


def base_url_problem(base_url: str) -> str | None:
    """Why --base-url is no server's address (a scheme forgotten, most often), or None."""
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme in ("http", "https") and parts.netloc:
        return None
    if "://" not in base_url:
        return f"--base-url {base_url}: not a URL; add its scheme: --base-url http://{base_url}"
    return f"--base-url {base_url}: expected an http:// or https:// URL, e.g. http://127.0.0.1:8000"


def check_model(model: str, base_url: str, served: ModelResolver) -> None:
    """ValueError (before anything is sent) when the server lists no `model`: every request would get
    vLLM's 404."""
    if model not in served.served:
        raise ValueError(f"--model {model}: the server does not serve it (vLLM would answer 404: The model "
                         f"`{model}` does not exist.); {base_url.rstrip('/')}/v1/models lists: "
                         f"{', '.join(served.served)}")


def speed_mismatch(base_url: str, headers: dict, speedup: float) -> str | None:
    """A warning when the server is an emulator whose --speed (its `vllm_emulator:speed` gauge) is not this
    run's --speedup: latencies measured on the wall clock and scaled by --speedup would be off by their ratio.
    None when they match, or the server has no such gauge (a real vLLM) or no /metrics to read."""
    import urllib.request
    try:
        request = urllib.request.Request(base_url.rstrip("/") + "/metrics", headers=headers)
        with urllib.request.urlopen(request, timeout=10) as resp:
            speed = server_speed(resp.read().decode("utf-8", "replace"))
    except (OSError, ValueError):  # no /metrics to read: nothing to compare with
        return None
    if speed is None or speed <= 0 or math.isclose(speed, speedup, rel_tol=1e-6):
        return None
    ratio, spread, off = (speed / speedup, "sparser", "small") if speed > speedup else (speedup / speed, "denser",
                                                                                         "large")
    return (f"the server simulates at --speed {speed:g} and this run sends at --speedup {speedup:g}: the server sees "
            f"the trace's arrivals {ratio:g}x {spread} than they are, and the latencies (wall-clock times multiplied "
            f"by --speedup) come out {ratio:g}x too {off}; pass --speedup {speed:g}")


def main(args: argparse.Namespace) -> int:
    if not (args.speedup > 0 and math.isfinite(args.speedup)):
        print(f"error: --speedup must be a positive number; got {args.speedup}", file=sys.stderr)
        return 2
    if args.max_concurrency is not None and args.max_concurrency < 1:
        print("error: --max-concurrency must be at least 1", file=sys.stderr)
        return 2
    problem = output_dir_problem(args.output)  # before the workload is sent: its results must have a home
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    problem = base_url_problem(args.base_url)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    headers = api_headers()
    try:
        slos = parse_slos(args.goodput)
        from profiles.tokenizer import load_tokenizer, model_type_of
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
        # the trace is read (and a bad line named) before the server is asked anything
        records, skipped = workload(args, tokenizer, model_type_of(args.model) if args.model else None)
        # the server's names, read before anything is sent: --model must be one of them
        try:
            models, adapters = server_models(args.base_url, headers,
                                             {} if args.model else parse_model_map(args.model_map))
        except urllib.error.HTTPError as exc:
            if not (args.model and exc.code == 404):
                raise
            print(f"loadgen: warning: {exc.url} answered 404: --model {args.model} is sent unchecked",
                  file=sys.stderr)
            models = None  # a server with no model list: --model as given
        served = models  # the server's names and the model behind each (None: it has no list)
        if args.model:
            if models is not None:
                check_model(args.model, args.base_url, models)
            models, adapters = args.model, None
        model = models if isinstance(models, str) else models.default
        tokenizer = tokenizer or load_tokenizer(None, served_model_type(model, served))  # its family's shipped one
        builder = PromptBuilder(tokenizer, chat=args.endpoint == "chat", seed=args.seed)
        planned = plan(records, builder, models, args.endpoint, args.ignore_eos, args.request_id_prefix,
                       args.trace or "workload", adapters)
        short = sum(r.input_len < builder.overhead and r.prompt is None for r in records)
        if short:
            print(f"loadgen: {short} prompts are shorter than the {builder.overhead} tokens the server adds "
                  f"({'its chat template' if builder.chat else 'special tokens'}); they are sent that long",
                  file=sys.stderr)
    except (TraceError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except urllib.error.HTTPError as exc:
        hint = f": {unauthorized_hint()}" if exc.code == 401 else ""
        print(f"error: {exc.url} answered HTTP {exc.code} {exc.reason}{hint}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot reach {args.base_url}: {exc}", file=sys.stderr)
        return 2
    for reason, count in skipped.items():
        print(f"loadgen: skipped {count} trace lines: {reason}", file=sys.stderr)
    mismatch = speed_mismatch(args.base_url, headers, args.speedup)
    if mismatch:
        print(f"loadgen: warning: {mismatch}", file=sys.stderr)
    span = planned[-1].arrival
    print(f"loadgen: {len(planned)} requests over {span:.1f} s of trace time ({span / args.speedup:.1f} s at "
          f"x{args.speedup:g}) to {args.base_url}{ENDPOINTS[args.endpoint]}, model {model}", file=sys.stderr)
    try:
        from uvloop import run as run_loop  # a faster loop: the client shares the machine with the server
    except ImportError:
        run_loop = asyncio.run
    wall = time.perf_counter()
    outcomes, t0, samples, interrupted = run_loop(run(planned, args, headers))
    wall = time.perf_counter() - wall
    with_lora = bool(adapters) or any(item.lora is not None for item in planned)
    records = request_records(planned, outcomes, t0, args.speedup, with_lora)
    summary = write_run(args.output, records, samples, args, model, wall, skipped, slos, len(planned),
                        (adapters or {}) if with_lora else None)
    ms = lambda d, k: f"{1000 * d[k]:.1f}" if k in d else "-"  # noqa: E731
    latencies = (f"TTFT mean {ms(summary['ttft'], 'mean')} ms, TPOT mean {ms(summary['tpot'], 'mean')} ms, E2E mean "
                 f"{ms(summary['e2e'], 'mean')} ms" if summary["num_finished"] else "no latencies: none finished")
    print(f"{summary['num_finished']} of {len(planned)} requests finished, {summary['num_failed']} failed, in "
          f"{summary['duration']:.1f} s of trace time ({wall:.1f} s wall); {latencies}. Output in "
          f"{args.output}/ (`vllm-emulator report {args.output}` for the HTML report)")
    for error in summary["errors"][:3]:
        print(f"  error: {error}", file=sys.stderr)
    if summary["fell_behind"]:
        print(f"loadgen: warning: {summary['fell_behind']}", file=sys.stderr)
    if interrupted:
        return 130  # the shell's status for a run stopped by Ctrl-C
    return 1 if summary["num_failed"] else 0
