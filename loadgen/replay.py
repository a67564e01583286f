"""Offline replay: run a trace through the simulated cluster as fast as the CPU allows.

    vllm-emulator replay TRACE --model MODEL --hardware HW [vLLM engine flags] --output DIR

Writes DIR/requests.jsonl (one object per request, in trace order), DIR/summary.json
and DIR/timeseries.csv; with --step-log FILE, one JSON line per engine step.
Requests replay with their recorded output length (as with `ignore_eos`).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from emulator.cluster import build_simulation
from emulator.deployment import Deployment
from emulator.engine_flags import add_engine_args, engine_args_from
from emulator.request import Request
from emulator.stats import TimeSeries, request_record, summarize
from emulator.step_log import StepLog
from loadgen.traces import FORMATS, TraceError, TraceRecord, read_trace
from profiles.deployment import build_deployment


class ReplayError(ValueError):
    """A trace line the engine would reject."""


def content_seed(seed: int, request_id: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{request_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def make_requests(records: Iterator[TraceRecord], deployment: Deployment, seed: int, source: str,
                  skip_invalid: bool, skipped: list[str]) -> Iterator[Request]:
    """Turn trace records into engine requests, checking them as vLLM's front end would."""
    max_len = deployment.config.max_model_len
    seen: set[str] = set()
    last_arrival = 0.0
    for index, record in enumerate(records):
        request_id = record.request_id if record.request_id is not None else f"req-{index}"
        if record.arrival < last_arrival:
            raise ReplayError(f"{source}:{record.line}: arrives at {record.arrival:.6f} s, before the line above it "
                              f"({last_arrival:.6f} s); sort the trace by arrival time")
        last_arrival = record.arrival
        problem = None
        if record.input_len < 1 or record.output_len < 1:
            problem = (f"{source}:{record.line}: {record.input_len} prompt and {record.output_len} output tokens; "
                       f"a request needs at least one of each")
        elif record.input_len >= max_len:
            problem = (f"{source}:{record.line}: prompt of {record.input_len} tokens does not fit "
                       f"max_model_len={max_len} (vLLM answers 400: the prompt plus at least one output token "
                       f"must fit)")
        elif request_id in seen:
            problem = f"{source}:{record.line}: duplicate request_id {request_id!r}"
        if problem:
            if not skip_invalid:
                raise ReplayError(problem + "; pass --skip-invalid to drop such lines")
            skipped.append(problem)
            continue
        seen.add(request_id)
        # vLLM clamps max_tokens to what still fits in max_model_len
        output_len = min(record.output_len, max_len - record.input_len)
        yield Request(request_id, record.input_len, output_len, arrival_time=record.arrival,
                      prompt_token_ids=record.token_ids, output_token_ids=record.output_token_ids,
                      content_seed=content_seed(seed, request_id))


def replay(trace: str, deployment: Deployment, output: Path, *, trace_format: str | None = None,
           seed: int = 0, step_log: Path | None = None, skip_invalid: bool = False,
           progress: bool = False, routing: str = "least_loaded") -> dict:
    """Run the whole trace; write the output files; return the summary."""
    output.mkdir(parents=True, exist_ok=True)
    sim = build_simulation(deployment, routing)
    series = TimeSeries(len(sim.engines))
    sim.add_listener(series.on_step)
    log_file = None
    if step_log is not None:
        log_file = step_log.open("w")
        sim.add_listener(StepLog(log_file, len(sim.engines) > 1).on_step)
    order: list[Request] = []
    skipped: list[str] = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(unit="req", desc="replay", mininterval=0.5)
        sim.add_finish_listener(lambda _r: bar.update(1))

    def arrivals() -> Iterator[Request]:
        for request in make_requests(read_trace(trace, trace_format), deployment, seed, trace, skip_invalid, skipped):
            order.append(request)
            yield request

    wall = time.perf_counter()
    try:
        sim.run(arrivals())
    finally:
        if log_file is not None:
            log_file.close()
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - wall
    records = [request_record(r) for r in order]
    duration = max((r["finish_time"] or 0.0) for r in records) if records else 0.0
    with (output / "requests.jsonl").open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    rows = series.finish(duration)
    with (output / "timeseries.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["t", "prompt_throughput", "gen_throughput", "running", "waiting",
                                               "kv_cache_pct"])
        writer.writeheader()
        writer.writerows(rows)
    summary = summarize(records, duration)
    summary.update({
        "model": deployment.model.name, "hardware": deployment.device.name,
        "num_gpu_blocks": deployment.num_gpu_blocks,
        "engine": asdict(deployment.config),
        "num_engines": len(sim.engines),
        "num_steps": sum(i.num_steps for i in sim.engines),
        "skipped_lines": skipped,
        "extrapolated_lookups": deployment.cost_model.extrapolation_counts(),
        "wall_seconds": wall,
    })
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for engine in sim.engines:  # every block back in the pool, every request accounted for
        assert (engine.is_idle and all(loop.is_idle for loop in sim.loops)
                and engine.kv.num_free_blocks == engine.num_gpu_blocks - 1), \
            f"engine {engine.index} ended with blocks in use or requests pending"
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trace", help="request trace (JSONL or CSV)")
    parser.add_argument("--model", default="meta-llama/Llama-3.1-8B", help="HF id of a shipped config, or a "
                        "directory with config.json")
    parser.add_argument("--hardware", default="RTX4090", help="device name (see `vllm-emulator hardware list`)")
    parser.add_argument("--trace-format", choices=FORMATS, default=None, help="default: detected")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", "-o", type=Path, required=True, help="output directory")
    parser.add_argument("--step-log", type=Path, default=None, help="write one JSON line per engine step")
    parser.add_argument("--skip-invalid", action="store_true", help="drop trace lines vLLM would reject")
    parser.add_argument("--routing", choices=["least_loaded", "round_robin"], default="least_loaded")
    add_engine_args(parser)


def main(args: argparse.Namespace) -> int:
    try:
        deployment = build_deployment(args.model, args.hardware, engine_args_from(args), args.compile_cache,
                                      args.cost_model)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in deployment.startup_lines():
        print(line, file=sys.stderr)
    try:
        summary = replay(args.trace, deployment, args.output, trace_format=args.trace_format, seed=args.seed,
                         step_log=args.step_log, skip_invalid=args.skip_invalid, progress=sys.stderr.isatty(),
                         routing=args.routing)
    except (TraceError, ReplayError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ms = lambda d, k: f"{1000 * d[k]:.1f}" if k in d else "-"  # noqa: E731
    print(f"{summary['num_finished']} requests in {summary['duration']:.1f} s of virtual time "
          f"({summary['wall_seconds']:.2f} s wall); TTFT mean {ms(summary['ttft'], 'mean')} ms, "
          f"TPOT mean {ms(summary['tpot'], 'mean')} ms, E2E mean {ms(summary['e2e'], 'mean')} ms; "
          f"{summary['preemptions']['total']} preemptions. Output in {args.output}/")
    return 0
