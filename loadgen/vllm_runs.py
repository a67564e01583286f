"""A user's own vLLM runs, read as what `vllm-emulator calibrate` fits to: the workload and the measurements.

A run is any of
- a folder with `vllm/meta.json` (model, engine arguments, device) and `vllm/requests.jsonl` (vLLM's
  per-request engine timestamps: queued_ts, first_token_ts, last_token_ts, input_toks, output_toks),
  as in ../shared/data/calibration/vllm-runs/; its workload is the trace it served (meta's
  `dataset_path`, looked up beside the run and in the trace folders given) or, without it, the
  requests' own arrivals and lengths;
- a folder written by `vllm-emulator loadgen` against a vLLM server (`requests.jsonl` with each
  request's arrival, lengths, TTFT, TPOT and E2E as the client measured them);
- a Prometheus exposition of the server's /metrics taken after the run (a file, optionally the one
  before it too: `before.prom,after.prom`), with the trace the run served: the means of vLLM's TTFT,
  inter-token and end-to-end latency histograms;
- vLLM's log of the run (a file with its periodic `Avg prompt throughput ... Avg generation
  throughput ...` lines), with its trace: their mean generation and prompt throughput while requests ran.

Each gives statistics (name -> measured value and its standard error); the emulator computes the
same ones from its replay of the workload (`statistics`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from emulator.config import EngineArgs
from emulator.request import Request
from loadgen.replay import make_requests
from loadgen.traces import TraceRecord, read_trace

PERCENTILES = ("mean", "p50", "p90")
LATENCIES = ("TTFT", "TPOT", "E2E")
# a measured statistic is never known better than this (clock resolution, run-to-run variation)
RELATIVE_FLOOR = 0.01
_BOOTSTRAP = 200


class RunError(ValueError):
    """A run folder or file that cannot be read as a vLLM run."""


@dataclass
class MeasuredRun:
    name: str
    model: str
    hardware: str
    engine_args: EngineArgs
    workload: list[TraceRecord]
    targets: dict[str, tuple[float, float]]  # statistic -> (measured value, standard error)
    kind: str  # requests | client | metrics | log
    notes: list[str] = field(default_factory=list)
    # per request, in workload order: TTFT, TPOT (NaN with one output token), E2E (requests and client kinds)
    measured: np.ndarray | None = None
    window: tuple[int, int] | None = None  # the targets come from these requests only (by workload position)

    def requests(self, max_model_len: int) -> list[Request]:
        """The workload as engine requests, with the ids the statistics pick them by."""
        records = [TraceRecord(r.arrival, r.input_len, r.output_len, r.line, r.token_ids, r.output_token_ids,
                               f"w{i}") for i, r in enumerate(self.workload)]
        return list(make_requests(iter(records), max_model_len, 0, self.name, True, []))

    def windows(self, k: int) -> list["MeasuredRun"]:
        """The run cut into k windows of consecutive requests, each with the targets of its own requests (the
        replay is still of the whole run): held out one at a time, they test a fit within a single run."""
        if self.measured is None:
            return []
        edges = np.linspace(0, len(self.measured), k + 1).astype(int)
        out = []
        for i, (lo, hi) in enumerate(zip(edges, edges[1:])):
            part = self.measured[lo:hi]
            tpot = part[:, 1][~np.isnan(part[:, 1])]
            out.append(replace(self, name=f"{self.name} [requests {lo}-{hi - 1}]",
                               targets=_with_errors(part[:, 0], tpot, part[:, 2]), window=(int(lo), int(hi))))
        return out


# -- statistics -------------------------------------------------------------------------------------
def latency_statistics(ttft: np.ndarray, tpot: np.ndarray, e2e: np.ndarray) -> dict[str, float]:
    out = {}
    for metric, values in zip(LATENCIES, (ttft, tpot, e2e)):
        if len(values):
            for stat in PERCENTILES:
                value = values.mean() if stat == "mean" else np.percentile(values, int(stat[1:]))
                out[f"{metric} {stat}"] = float(value)
    return out


def _with_errors(ttft: np.ndarray, tpot: np.ndarray, e2e: np.ndarray) -> dict[str, tuple[float, float]]:
    """Each statistic with its bootstrap standard error over the requests (floored: see RELATIVE_FLOOR)."""
    values = latency_statistics(ttft, tpot, e2e)
    rng = np.random.default_rng(0)
    samples: dict[str, list[float]] = {k: [] for k in values}
    for _ in range(_BOOTSTRAP):
        picks = [a[rng.integers(0, len(a), len(a))] if len(a) else a for a in (ttft, tpot, e2e)]
        for k, v in latency_statistics(*picks).items():
            samples[k].append(v)
    return {k: (v, max(float(np.std(samples[k])), RELATIVE_FLOOR * abs(v))) for k, v in values.items()}


def _busy_seconds(requests: list[Request]) -> float:
    """How long at least one request was in the engine."""
    busy, end = 0.0, -np.inf
    for start, finish in sorted((r.arrival_time, r.finish_time) for r in requests):
        if finish > end:
            busy += finish - max(start, end)
            end = finish
    return busy


def statistics(run: MeasuredRun, finished: list[Request]) -> dict[str, float]:
    """The emulator's value of each of the run's statistics, from its replay (`finished`: its requests)."""
    if run.kind == "log":
        busy = _busy_seconds(finished)
        tokens = sum(r.num_output_tokens for r in finished)
        prompt = sum(r.num_prompt_tokens - max(r.num_cached_tokens, 0) for r in finished)
        return {"generation throughput": tokens / busy, "prompt throughput": prompt / busy}
    if run.window is not None:
        lo, hi = run.window
        finished = [r for r in finished if lo <= int(r.request_id[1:]) < hi]
    # vLLM's latency histograms start at the front end's arrival_time (v1/metrics/stats.py); its per-request
    # engine timestamps (vllm/requests.jsonl) at queued_ts
    start = {"requests": "queued_time", "metrics": "arrival_time", "client": "arrival_time"}[run.kind]
    ttft = np.array([r.first_token_time - getattr(r, start) for r in finished])
    tpot = np.array([(r.last_token_time - r.first_token_time) / (r.num_output_tokens - 1)
                     for r in finished if r.num_output_tokens > 1])
    e2e = np.array([r.last_token_time - getattr(r, start) for r in finished])
    if run.kind == "metrics":  # vLLM's histograms: inter-token gaps weigh by their number
        gaps = np.array([r.num_output_tokens - 1 for r in finished if r.num_output_tokens > 1])
        return {"TTFT mean": float(ttft.mean()), "ITL mean": float((tpot * gaps).sum() / gaps.sum()),
                "E2E mean": float(e2e.mean())}
    return latency_statistics(ttft, tpot, e2e)


# -- readers --------------------------------------------------------------------------------------------
def read_run(path: Path, trace: Path | None = None, trace_dirs: tuple[Path, ...] = (),
             model: str | None = None, hardware: str | None = None, engine_flags: dict | None = None
             ) -> MeasuredRun:
    """One run, by what `path` is (see the module docstring). `model`, `hardware` and `engine_flags` (EngineArgs
    fields) name the deployment where the run does not record it, and override what it records."""
    if "," in path.name:
        parts = [path.parent / p for p in path.name.split(",")]
        return _from_metrics(parts, _need(trace, path), model, hardware, engine_flags)
    if path.is_file():  # a scrape or a log, told apart by what is in it
        if _LOG_LINE.search(_text(path)):
            return _from_log(path, _need(trace, path), model, hardware, engine_flags)
        return _from_metrics([path], _need(trace, path), model, hardware, engine_flags)
    if (path / "vllm" / "meta.json").is_file():
        return _from_vllm_run(path, trace, trace_dirs, model, hardware, engine_flags)
    if (path / "requests.jsonl").is_file():
        return _from_client_run(path, model, hardware, engine_flags)
    raise RunError(f"{path}: not a vLLM run (a folder with vllm/meta.json or a loadgen requests.jsonl, "
                   f"a /metrics exposition .prom/.txt, or a vLLM .log)")


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError as exc:
        raise RunError(f"{path}: {exc.strerror}") from None


def _need(trace: Path | None, path: Path) -> Path:
    if trace is None:
        raise RunError(f"{path}: metrics and logs do not say what was sent; pass the run's trace with --trace")
    return trace


def _deployment_of(path: Path, model, hardware, engine_flags) -> tuple[str, str, EngineArgs]:
    if model is None or hardware is None:
        raise RunError(f"{path}: the run does not record its deployment; pass --model and --hardware "
                       f"(and the engine flags it ran with)")
    return model, hardware, EngineArgs(**(engine_flags or {}))


def _jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise RunError(f"{path}:{number}: not JSON ({exc.msg})") from None
    if not rows:
        raise RunError(f"{path}: no requests")
    return rows


def _engine_args(meta: dict, overrides: dict | None) -> EngineArgs:
    """vLLM's engine arguments as the run's meta.json records them, with `overrides` on top."""
    kw, kv = meta.get("engine_kwargs", {}), meta.get("kv_cache", {})
    return replace(EngineArgs(
        max_num_seqs=kw.get("max_num_seqs"), max_num_batched_tokens=kw.get("max_num_batched_tokens"),
        max_model_len=kw.get("max_model_len"), tensor_parallel_size=kw.get("tensor_parallel_size", 1),
        pipeline_parallel_size=kw.get("pipeline_parallel_size", 1),
        data_parallel_size=kw.get("data_parallel_size", 1),
        enable_expert_parallel=kw.get("enable_expert_parallel", False), block_size=kv.get("block_size", 16),
        gpu_memory_utilization=kv.get("gpu_memory_utilization", 0.9),
        enable_prefix_caching=kv.get("enable_prefix_caching", True),
        kv_cache_dtype=kw.get("kv_cache_dtype") or "auto"), **(overrides or {}))


def _from_vllm_run(path: Path, trace: Path | None, trace_dirs, model, hardware, engine_flags) -> MeasuredRun:
    meta_path = path / "vllm" / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise RunError(f"{meta_path}: not JSON ({exc.msg})") from None
    rows = _jsonl(path / "vllm" / "requests.jsonl")
    notes = []
    try:
        queued = np.array([r["queued_ts"] for r in rows], float)
        first = np.array([r["first_token_ts"] for r in rows], float)
        last = np.array([r["last_token_ts"] for r in rows], float)
        outputs = np.array([r["output_toks"] for r in rows], int)
        inputs = np.array([r["input_toks"] for r in rows], int)
    except KeyError as exc:
        raise RunError(f"{path / 'vllm' / 'requests.jsonl'}: a request lacks {exc.args[0]!r}") from None
    if trace is None:
        name = Path(meta.get("dataset_path", "")).name
        trace = next((d / name for d in (path, *trace_dirs) if name and (d / name).is_file()), None)
    order = np.argsort(queued, kind="stable")  # the order the requests arrived in: the workload's
    if trace is not None:
        workload = list(read_trace(trace))
        notes.append(f"workload: {trace}")
        if len(workload) != len(rows):
            raise RunError(f"{trace}: {len(workload)} requests, the run has {len(rows)}; pass the trace it served")
    else:  # the requests' own arrivals and lengths (no token ids: no prefix-cache hits)
        workload = [TraceRecord(float(queued[i] - queued[order[0]]), int(inputs[i]), int(outputs[i]), int(i) + 1,
                                request_id=str(rows[i].get("request_id", i))) for i in order]
        notes.append("workload: the requests' own arrivals and lengths (no trace found; no prefix sharing)")
    tpot = np.where(outputs > 1, (last - first) / np.maximum(outputs - 1, 1), np.nan)
    measured = np.column_stack([first - queued, tpot, last - queued])[order]
    targets = _with_errors(measured[:, 0], measured[:, 1][~np.isnan(measured[:, 1])], measured[:, 2])
    device = hardware or meta.get("hardware", {}).get("device_name") or path.parent.name
    return MeasuredRun(str(path), model or meta["model"], device, _engine_args(meta, engine_flags), workload,
                       targets, "requests", notes, measured)


def _from_client_run(path: Path, model, hardware, engine_flags) -> MeasuredRun:
    rows = [r for r in _jsonl(path / "requests.jsonl") if r.get("ttft") is not None]
    if not rows:
        raise RunError(f"{path / 'requests.jsonl'}: no request has a time to first token")
    try:
        rows.sort(key=lambda r: r["arrival_time"])
        workload = [TraceRecord(float(r["arrival_time"]), int(r["input_tokens"]), int(r["output_tokens"]), i + 1,
                                request_id=str(r.get("request_id", i))) for i, r in enumerate(rows)]
        measured = np.array([[r["ttft"], np.nan if r.get("tpot") is None else r["tpot"], r["e2e"]] for r in rows],
                            float)
    except (KeyError, TypeError) as exc:
        raise RunError(f"{path / 'requests.jsonl'}: a request lacks {exc}") from None
    model, hardware, engine_args = _deployment_of(path, model, hardware, engine_flags)
    targets = _with_errors(measured[:, 0], measured[:, 1][~np.isnan(measured[:, 1])], measured[:, 2])
    return MeasuredRun(str(path), model, hardware, engine_args, workload, targets, "client",
                       ["latencies as the client measured them, from each request's send"], measured)


_HISTOGRAMS = {"TTFT mean": "vllm:time_to_first_token_seconds", "ITL mean": "vllm:inter_token_latency_seconds",
               "E2E mean": "vllm:e2e_request_latency_seconds"}


def _sums(text: str) -> dict[str, float]:
    """`<histogram>_sum` and `_count`, summed over label sets."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"(vllm:[a-z_]+_(?:sum|count))(?:\{[^}]*\})?\s+([-+0-9.eE]+|NaN)", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def _from_metrics(parts: list[Path], trace: Path, model, hardware, engine_flags) -> MeasuredRun:
    scrapes = [_sums(_text(p)) for p in parts]
    after, before = scrapes[-1], (scrapes[0] if len(scrapes) > 1 else {})
    targets = {}
    for stat, series in _HISTOGRAMS.items():
        count = after.get(f"{series}_count", 0.0) - before.get(f"{series}_count", 0.0)
        if count > 0:
            value = (after[f"{series}_sum"] - before.get(f"{series}_sum", 0.0)) / count
            targets[stat] = (value, max(RELATIVE_FLOOR, 1.0 / np.sqrt(count)) * value)
    if not targets:
        raise RunError(f"{parts[-1]}: no vLLM latency histograms (vllm:time_to_first_token_seconds, ...)")
    model, hardware, engine_args = _deployment_of(parts[-1], model, hardware, engine_flags)
    return MeasuredRun(",".join(map(str, parts)), model, hardware, engine_args, list(read_trace(trace)), targets,
                       "metrics", [f"workload: {trace}"])


_LOG_LINE = re.compile(r"Avg prompt throughput: ([0-9.]+) tokens/s, Avg generation throughput: ([0-9.]+) tokens/s, "
                       r"Running: (\d+) reqs")


def _from_log(path: Path, trace: Path, model, hardware, engine_flags) -> MeasuredRun:
    found = _LOG_LINE.findall(_text(path))
    busy = [(float(p), float(g)) for p, g, running in found if int(running) > 0]
    if not busy:
        raise RunError(f"{path}: no periodic throughput lines of vLLM with requests running")
    prompt, gen = (np.array(v) for v in zip(*busy))
    se = lambda x: max(float(x.std() / np.sqrt(len(x))), RELATIVE_FLOOR * float(x.mean()))  # noqa: E731
    targets = {"generation throughput": (float(gen.mean()), se(gen)),
               "prompt throughput": (float(prompt.mean()), se(prompt))}
    model, hardware, engine_args = _deployment_of(path, model, hardware, engine_flags)
    return MeasuredRun(str(path), model, hardware, engine_args, list(read_trace(trace)), targets, "log",
                       [f"workload: {trace}", f"{len(busy)} log lines with requests running"])
