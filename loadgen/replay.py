"""Offline replay: run a trace through the simulated deployment or cluster as fast as the CPU allows.

    vllm-emulator replay TRACE --model MODEL --hardware HW [vLLM engine flags] --output DIR
    vllm-emulator replay TRACE --cluster FILE [vLLM engine flags: defaults for every instance] --output DIR

Writes DIR/requests.jsonl (one object per request, in trace order, with the joules the power model
charged it), DIR/summary.json (with an energy section) and DIR/timeseries.csv (with the power drawn
each second); with --step-log FILE, one JSON line per engine step. A cluster
adds each request's instance, per-instance statistics and routing decisions in the
summary, and DIR/timeseries_by_instance.csv. Requests replay with their recorded output
length (as with `ignore_eos`); on a cluster of several models each asks for the model its trace
line names (`--model-map` renames), one without for the cluster's first (on a cluster whose requests
enter as LLMServingSim's router sends them, for any model's instance). A line that names a LoRA
adapter (its `lora`, or a `model` that is an adapter's name) runs under it, on its base model, on an
instance that serves it (adapters: `--enable-lora --lora-modules`, or a cluster file's instances'):
each record and the summary then name the adapter.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path

from emulator.cluster import ClusterSpec, build_cluster, build_simulation
from emulator.deployment import Deployment
from emulator.dp_balancer import POLICIES as DP_POLICIES
from emulator.engine_flags import (add_engine_args, engine_args_from, explicit_engine_args, performance_mode_line,
                                   spell_optimization_level, unsimulated_values)
from emulator.kv_stats import TransferTimes, kv_summary
from emulator.lora import LORA_NOT_ENABLED, LoRAAdapter, LoRAModulePath, ServedAdapters, parse_lora_modules
from emulator.power import PowerModel, nodes_power
from emulator.request import Request
from emulator.simulation import Simulation
from emulator.stats import InterTokenLatencies, TimeSeries, request_record, summarize
from emulator.step_log import StepLog
from loadgen.json_lines import json_lines
from loadgen.output_paths import output_dir_problem, output_file_problem
from loadgen.progress import Progress
from loadgen.trace_models import ModelResolver, parse_model_map
from loadgen.traces import FORMATS, Trace, TraceError, TraceRecord
from profiles.deployment import build_deployment

DEFAULT_MODEL = "meta-llama/Llama-3.1-8B"  # the same embedded default as `serve`
DEFAULT_HARDWARE = "H100"


class ReplayError(ValueError):
    """A trace line the engine would reject."""


def content_seed(seed: int, request_id: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{request_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def make_requests(records: Iterator[TraceRecord], max_len: int | Mapping[str, int], seed: int, source: str,
                  skip_invalid: bool, skipped: list[str], models: ModelResolver | None = None,
                  adapters: ServedAdapters | None = None, any_model: bool = False) -> Iterator[Request]:
    """Turn trace records into engine requests, checking them as vLLM's front end would against the
    context `max_len` (max_model_len; per served name when `models` routes each line by its model).
    `adapters`: the LoRA adapters the target serves; a line naming one runs under it, on its base model.
    `any_model`: a line naming no model names none (the cluster routes it to an instance of any model that
    it fits, as `serve` does), so it must fit the longest context of them all."""
    seen: set[str] = set()
    last_arrival = 0.0
    per_model = isinstance(max_len, Mapping)  # asked once: an ABC's isinstance is slow
    routed = models is not None and not models.one_model
    for index, record in enumerate(records):
        request_id = record.request_id if record.request_id is not None else f"req-{index}"
        if record.arrival < last_arrival:
            raise ReplayError(f"{source}:{record.line}: arrives at {record.arrival:.6f} s, before the line above it "
                              f"({last_arrival:.6f} s); sort the trace by arrival time")
        last_arrival = record.arrival
        model = None  # the first model, on a target that serves one
        try:
            # a line that names neither an adapter nor a model (most) runs under none
            lora = None if record.lora is None and record.model is None else _adapter(record, models, adapters)
            if lora is not None:
                model = lora.base_model_name
            elif routed and not (any_model and record.model is None):
                model = models.resolve(record.model)
            if not per_model:
                limit = max_len
            elif model is None and any_model:  # it lands on an instance of any model whose context it fits
                limit = max(max_len.values())
            else:
                limit = max_len[model or models.default]
            if record.input_len < 1 or record.output_len < 1:
                raise ValueError(f"{record.input_len} prompt and {record.output_len} output tokens; a request "
                                 f"needs at least one of each")
            if record.input_len >= limit:
                raise ValueError(f"prompt of {record.input_len} tokens does not fit max_model_len={limit}"
                                 f"{f' of {model}' if model else ''} (vLLM answers 400: the prompt plus at least "
                                 f"one output token must fit)")
            if request_id in seen:
                raise ValueError(f"duplicate request_id {request_id!r}")
        except ValueError as exc:
            problem = f"{source}:{record.line}: {exc}"
            if not skip_invalid:
                raise ReplayError(problem + "; pass --skip-invalid to drop such lines") from None
            skipped.append(problem)
            continue
        seen.add(request_id)
        # vLLM clamps max_tokens to what still fits in max_model_len
        output_len = min(record.output_len, limit - record.input_len)
        yield Request(request_id, record.input_len, output_len, arrival_time=record.arrival,
                      prompt_token_ids=record.token_ids, output_token_ids=record.output_token_ids,
                      content_seed=content_seed(seed, request_id), model=model, lora=lora)


def _adapter(record: TraceRecord, models: ModelResolver | None, adapters: ServedAdapters | None) -> LoRAAdapter | None:
    """The adapter a trace line runs under: the one its `lora` names (ValueError with vLLM's 404 when none
    is served under that name), or the one its `model` (renamed by --model-map) names; None: the base model."""
    if record.lora is not None:
        adapter = adapters.get(record.lora) if adapters is not None else None
        if adapter is None:
            raise ValueError(f"The model `{record.lora}` does not exist. (vLLM answers 404: no LoRA adapter "
                             f"{record.lora!r} is served)")
        return adapter
    if adapters is None or record.model is None:
        return None
    return adapters.get(models.mapping.get(record.model, record.model) if models is not None else record.model)


def replay(trace: str, target: Deployment | ClusterSpec, output: Path, *, trace_format: str | None = None,
           seed: int = 0, step_log: Path | None = None, skip_invalid: bool = False,
           progress: bool = False, routing: str = "least_loaded", request_rate: float | None = None,
           burstiness: float = 1.0, model_map: dict[str, str] | None = None,
           lora_modules: tuple[LoRAModulePath, ...] = ()) -> dict:
    """Run the whole trace on one deployment (`routing`: its DP balancer) or a cluster; write the output
    files; return the summary. `request_rate` (requests/s) replaces the trace's arrivals by Poisson ones
    (Gamma of shape `burstiness`, so a coefficient of variation of 1/sqrt(burstiness)), as `vllm bench serve
    --request-rate --burstiness` sends them (the first after a gap too; rescaled so the last is at N / rate;
    inf: every request at time 0).
    A cluster of several models gets each request under the model its trace line names (`model_map`
    renames the trace's names; loadgen.trace_models). `lora_modules`: one deployment's `--lora-modules`
    (a cluster file gives each instance its own)."""
    if lora_modules and (isinstance(target, ClusterSpec) or target.config.lora is None):
        raise ReplayError("--lora-modules: " + ("give each instance its own lora-modules in the cluster file"
                                                if isinstance(target, ClusterSpec) else
                                                f"Call to add_lora method failed: {LORA_NOT_ENABLED}"))
    names = [m.name for m in lora_modules]
    for name in names:  # vLLM's start-up, loading them one by one
        if names.count(name) > 1:
            raise ReplayError(f"--lora-modules: The lora adapter '{name}' has already been loaded. If you want "
                              "to load the adapter in place, set 'load_inplace' to True.")
        if not isinstance(target, ClusterSpec) and name == target.model.name:
            raise ReplayError(f"--lora-modules: The lora adapter '{name}' conflicts with a served base model.")
    output.mkdir(parents=True, exist_ok=True)
    sim = build_cluster(target) if isinstance(target, ClusterSpec) else \
        build_simulation(target, routing, lora_modules=lora_modules)
    clustered = len(sim.instances) > 1
    instance_names = [sim.instance_of[e.index].name for e in sim.engines]
    series = TimeSeries(len(sim.engines), instance_of=instance_names)
    sim.add_listener(series.on_step, series.on_run)
    sim.add_engine_down_listener(series.on_engine_down)
    itl = InterTokenLatencies(instance_names)
    sim.add_listener(itl.on_step, itl.on_run)
    sim.add_finish_listener(itl.on_finish, prefills=True)
    transfer_times = TransferTimes(sim)
    power = PowerModel(sim, nodes_power(target.nodes) if isinstance(target, ClusterSpec) else None)
    log_file = None
    if step_log is not None:
        log_file = step_log.open("w")
        sim.add_listener(StepLog(log_file, len(sim.engines) > 1).on_step)
    order: list[Request] = []
    skipped: list[str] = []
    first = target.instances[0].deployment if isinstance(target, ClusterSpec) else target
    source = Trace(trace, trace_format, model_type=first.model.model_type)  # text is counted in its tokens
    if request_rate is None:
        records = iter(source)
    else:
        from loadgen.synthetic import retime  # imported when used: a plain replay starts faster without it
        if not (burstiness > 0 and math.isfinite(burstiness)):
            raise ReplayError(f"--burstiness must be a positive number; got {burstiness}")
        records = retime(source, rate=request_rate, cv=1 / math.sqrt(burstiness), seed=seed)
    prefills: list[Request] = []  # P/D: the prefills the cluster's own proxy ran, for their pods' statistics

    def on_end(request: Request) -> None:
        if request.hold_kv:
            prefills.append(request)

    if clustered:
        sim.add_finish_listener(on_end, prefills=True)
    bar = Progress(source.expected_count, "replay") if progress else None  # counted when a bar or line needs it
    if bar is not None:
        sim.add_finish_listener(lambda r: bar.update(1, f"{r.finish_time:.0f} s virtual"))
    try:
        served = {name: tuple(sorted({i.deployment.model.name for i in group}))
                  for name, group in sim.by_model.items()}
        # an adapter is a name --model-map may send a trace's name to, served on its base model's
        served.update({a.name: served[a.base_model_name] for a in sim.adapters.adapters.values()})
        models = ModelResolver(served, sim.default_model, model_map)
    except ValueError as exc:
        raise ReplayError(str(exc)) from None
    # vLLM's front end checks a prompt against its own context: a shared name's smallest
    max_len = {name: min(i.deployment.config.max_model_len for i in group) for name, group in sim.by_model.items()}

    def arrivals() -> Iterator[Request]:
        for request in make_requests(records, max_len, seed, trace, skip_invalid, skipped, models, sim.adapters,
                                     sim.entry == "any_non_decode"):
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
    skipped += [f"{trace}: {n} lines skipped: {why}" for why, n in source.skipped.items()]
    records = [request_record(r, power.energy_of(r)) for r in order]
    if clustered:
        for record, request in zip(records, order):  # None: no instance's engine took it in
            record["instance"] = None if record["engine"] is None else sim.instance_of[record["engine"]].name
            if not models.one_model:  # a request that named none: the model of the instance it ran on
                record["model"] = request.model if request.model is not None or record["engine"] is None \
                    else sim.instance_of[record["engine"]].served_model_names[0]
    proxied = clustered and any(i.role == "prefill" for i in sim.instances)  # the cluster's P/D proxy runs prefills
    if proxied:  # the prefix hits of each request's prefill on its prefill pod (None: no prefill ran)
        prefilled = {p.request_id.removesuffix("@prefill"): p for p in prefills}
        for record in records:
            prefill = prefilled.get(record["request_id"])
            record["prefill_cached_tokens"] = None if prefill is None else max(prefill.num_cached_tokens, 0)
    if sim.adapters.adapters:  # the adapter each request ran under (None: its base model)
        for record, request in zip(records, order):
            record["lora"] = None if request.lora is None else request.lora.name
    duration = max((r["finish_time"] or 0.0) for r in records) if records else 0.0
    power.finish(duration)
    with (output / "requests.jsonl").open("w") as f:
        f.write(json_lines(records))
    rows = series.finish(duration)
    # the power model's joules of a tick are over a whole tick: the last, partial one's over its width
    scale = [1.0] * len(rows)
    if rows:
        scale[-1] = series.tick / series.width(len(rows) - 1, duration)
    for row, watts, s in zip(rows, power.power_series(duration), scale):
        row["power_w"] = round(watts * s, 3)
    _write_csv(output / "timeseries.csv", rows)
    if clustered:
        ticks, rows = len(rows), series.by_instance(duration)
        watts = {name: power.instance_power_series(name, duration) for name in power.instance_names}
        for i, row in enumerate(rows):  # each instance's ticks in order
            row["power_w"] = round(watts[row["instance"]][i % ticks] * scale[i % ticks], 3)
        _write_csv(output / "timeseries_by_instance.csv", rows)
    summary = summarize(records, duration, itl.distribution())
    summary["energy"] = power.summary(sum(r["output_tokens"] for r in records), [r["energy_j"] for r in records])
    summary.update(_describe(sim, target, records, [request_record(r) for r in prefills], duration, itl))
    if sim.adapters.adapters:
        summary["lora_adapters"] = _adapter_summary(sim, records, duration)
    summary.update(kv_summary(sim, transfer_times))  # kv_tiers, kv_transfers: only when the run has them
    if proxied:  # the prompt tokens the prefill pods found cached, beside what moved to the decode pods
        summary.setdefault("kv_transfers", {})["prefill_cached_tokens"] = sum(r["prefill_cached_tokens"] or 0
                                                                            for r in records)
    summary.update({"num_engines": len(sim.engines), "num_steps": sum(e.num_steps for e in sim.engines),
                    "skipped_lines": skipped, "wall_seconds": wall})
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for engine in sim.engines:  # every block back in the pool, every request accounted for
        assert (engine.is_idle and all(loop.is_idle for loop in sim.loops)
                and engine.kv.num_free_blocks == engine.num_gpu_blocks - 1), \
            f"engine {engine.index} ended with blocks in use or requests pending"
    return summary


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        columns = (["instance"] if rows and "instance" in rows[0] else []) + \
            ["t", "prompt_throughput", "gen_throughput", "running", "waiting", "kv_cache_pct", "preemptions",
             "prefix_hit_pct", "power_w"]
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _adapter_summary(sim: Simulation, records: list[dict], duration: float) -> dict:
    """Each adapter the target serves: its base model and path (one across the cluster: ServedAdapters.of),
    the instances serving it, each one's lora_int_id, and the statistics of the requests that ran under it.

    The ids are per instance because each pod numbers its own adapters, as each vLLM front end counts its own
    lora_int_ids: one adapter may be 1 on one pod and 3 on another. A pod's id is what its KV events
    (BlockStored's lora_id) and request logs name the adapter by, so a reader matching those needs that pod's
    id; a single id would be right for the first pod only."""
    out = {}
    for name, adapter in sim.adapters.adapters.items():
        mine = [r for r in records if r["lora"] == name]
        instances = sim.adapters.serving(name)
        out[name] = {"base_model": adapter.base_model_name, "path": adapter.path, "instances": instances,
                     "lora_int_ids": {i: sim.adapters.pod(i).adapters[name].lora_id for i in instances},
                     **summarize(mine, duration)}
    return out


def _describe(sim: Simulation, target: Deployment | ClusterSpec, records: list[dict], prefills: list[dict],
              duration: float, itl: InterTokenLatencies) -> dict:
    """What ran: the deployment, or every instance of the cluster with its own statistics: those of the
    requests it served, as its vLLM would count them. A P/D request is served twice: its prefill
    (`prefills`: max_tokens 1, TTFT from the client's arrival) by a prefill instance, the rest by a decode
    instance, where it finishes."""
    if isinstance(target, Deployment):
        return {"model": target.model.name, "hardware": target.device.name,
                "num_gpu_blocks": target.num_gpu_blocks, "engine": asdict(target.config),
                "extrapolated_lookups": target.cost_model.extrapolation_counts()}
    instances = []
    for instance in sim.instances:
        prefilled = [r for r in prefills if sim.instance_of[r["engine"]] is instance]
        mine = [r for r in records if r["engine"] is not None and sim.instance_of[r["engine"]] is instance]
        mine += prefilled
        d = instance.deployment
        instances.append({
            "name": instance.name, "served_model_names": list(instance.served_model_names),
            **({"lora_adapters": [a.name for a in sim.adapters.on([instance.name])]} if sim.adapters.adapters else {}),
            "model": d.model.name, "hardware": d.device.name, "role": instance.role, "node": instance.spec.node,
            "tensor_parallel_size": d.config.tensor_parallel_size,
            "pipeline_parallel_size": d.config.pipeline_parallel_size,
            "data_parallel_size": d.config.data_parallel_size, "expert_parallel": d.config.enable_expert_parallel,
            "num_gpu_blocks": d.num_gpu_blocks, "capacity_tokens_per_s": instance.capacity,
            "num_steps": sum(e.num_steps for e in instance.engines),
            "busy_fraction": sum(e.busy_time for e in instance.engines) / len(instance.engines) / max(duration, 1e-9),
            "routed": sim.routing_decisions.get(instance.name, 0),
            "prefills": len(prefilled), "prompt_tokens": sum(r["input_tokens"] for r in mine),
            **summarize(mine, duration, itl.distribution(instance.name)),
        })
    return {"model": sim.default_model, "hardware": "+".join(sorted({i["hardware"] for i in instances})),
            "routing": {"policy": target.routing, "params": target.routing_params},
            # the faults and restores of the run: one the cluster file times after the last request ended
            # changed nothing in it
            "instance_events": [{"t": t, "instance": name, "event": event} for t, name, event in sim.instance_events
                                if t <= duration],
            "instances": instances}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trace", help="request trace (JSONL or CSV)")
    parser.add_argument("--model", default=None, help=f"HF id of a shipped config, or a directory with config.json "
                        f"(default {DEFAULT_MODEL})")
    parser.add_argument("--hardware", default=None, help=f"device name (see `vllm-emulator hardware list`) or a "
                        f"device YAML (default {DEFAULT_HARDWARE}, as `serve`)")
    parser.add_argument("--cluster", type=Path, default=None,
                        help="a cluster file (deploy/clusters/README.md, or LLMServingSim's cluster config JSON); "
                             "the engine flags given here are every instance's defaults")
    parser.add_argument("--trace-format", choices=FORMATS, default=None, help="default: detected")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", "-o", type=Path, required=True, help="output directory")
    parser.add_argument("--step-log", type=Path, default=None, help="write one JSON line per engine step")
    parser.add_argument("--skip-invalid", action="store_true", help="drop trace lines vLLM would reject")
    parser.add_argument("--model-map", action="append", default=None, metavar="TRACE_NAME=SERVED_NAME",
                        help="send a trace's requests for TRACE_NAME to the cluster's SERVED_NAME (repeatable; "
                             "used when the cluster serves several models)")
    parser.add_argument("--lora-modules", nargs="+", action="extend", default=None, metavar="NAME=PATH",
                        help="LoRA adapters of one deployment (with --enable-lora), as `vllm serve` takes them: "
                             "name=path or JSON; trace lines run under the one their `lora` or `model` names")
    parser.add_argument("--request-rate", type=float, default=None,
                        help="new arrivals at this many requests/s (Poisson; a trace without timestamps needs it); "
                             "inf: every request at time 0, as vllm bench serve's default sends them")
    parser.add_argument("--burstiness", type=float, default=None,
                        help="with --request-rate: Gamma arrivals of this shape, as vLLM bench's (1: Poisson; "
                             "lower is burstier: the gaps' coefficient of variation is 1/sqrt(B))")
    parser.add_argument("--routing", choices=list(DP_POLICIES), default=None,
                        help="how one deployment's data-parallel engines share the requests (default least_loaded, "
                             "vLLM's DP balancer); a cluster file routes among its instances with its own `routing`")
    add_engine_args(parser)


def normalize_argv(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """vLLM's spellings of the engine flags that argparse does not read: -O3, -O=3, -O 3."""
    return spell_optimization_level(argv)


def engine_notes(args: argparse.Namespace, target: Deployment | ClusterSpec) -> list[str]:
    """What serve says at start-up of the engine flags, as replay prints it: vLLM's line of a performance mode
    other than balanced, and the values given that are not simulated (serve's warning)."""
    deployments = [target] if isinstance(target, Deployment) else [i.deployment for i in target.instances]
    lines = [performance_mode_line(mode) for mode in dict.fromkeys(d.config.performance_mode for d in deployments)]
    lines = [line for line in lines if line]
    differing = unsimulated_values(args)
    if differing:
        lines.append(f"warning: not simulated, so throughput or memory differ from vLLM's with them: "
                     f"{', '.join(differing)}")
    return lines


def load_target(args: argparse.Namespace) -> tuple[Deployment | ClusterSpec, list[str]]:
    """The deployment or cluster the command line names, and its start-up lines."""
    if args.cluster is not None:
        if args.model or args.hardware:
            raise ValueError("--model and --hardware name a single deployment; a cluster file names its own")
        if args.routing:
            raise ValueError("--routing is a single deployment's; with --cluster the cluster file sets it: its "
                             "`routing` (and each instance's `dp_routing`)")
        from profiles.cluster_file import cluster_startup_lines, read_cluster_file  # only a cluster needs it
        spec, notes = read_cluster_file(args.cluster, args.compile_cache, explicit_engine_args(args))
        return spec, cluster_startup_lines(args.cluster, spec, notes)
    deployment = build_deployment(args.model or DEFAULT_MODEL, args.hardware or DEFAULT_HARDWARE,
                                  engine_args_from(args), args.compile_cache, args.cost_model)
    return deployment, deployment.startup_lines()


def main(args: argparse.Namespace) -> int:
    if args.burstiness is not None and args.request_rate is None:
        print("error: --burstiness shapes the arrivals --request-rate draws (as in vLLM bench); give "
              "--request-rate too", file=sys.stderr)
        return 2
    for flag, value in (("--request-rate", args.request_rate), ("--burstiness", args.burstiness)):
        # --request-rate inf: every request at once, vllm bench serve's default
        if value is not None and not (value > 0 and (math.isfinite(value) or flag == "--request-rate")):
            print(f"error: {flag} must be a positive number; got {value}", file=sys.stderr)
            return 2
    try:  # a missing or unreadable trace is told at once, not after the deployment's start-up log
        Path(args.trace).open("rb").close()
    except FileNotFoundError:
        print(f"error: {args.trace}: no such trace file", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {args.trace}: cannot read the trace file: {exc.strerror or exc}", file=sys.stderr)
        return 2
    problem = output_file_problem(args.step_log, "--step-log") if args.step_log is not None else None
    problem = problem or output_dir_problem(args.output)
    if problem:  # told before the replay, not in a traceback after it
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        target, lines = load_target(args)
        model_map = parse_model_map(args.model_map)
        lora_modules = tuple(parse_lora_modules(args.lora_modules or []))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in engine_notes(args, target) + lines:
        print(line, file=sys.stderr)
    try:
        summary = replay(args.trace, target, args.output, trace_format=args.trace_format, seed=args.seed,
                         step_log=args.step_log, skip_invalid=args.skip_invalid, progress=True,
                         routing=args.routing or "least_loaded", request_rate=args.request_rate,
                         burstiness=1.0 if args.burstiness is None else args.burstiness,
                         model_map=model_map, lora_modules=lora_modules)
    except (TraceError, ReplayError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ms = lambda d, k: f"{1000 * d[k]:.1f}" if k in d else "-"  # noqa: E731
    print(f"{summary['num_finished']} requests in {summary['duration']:.1f} s of virtual time "
          f"({summary['wall_seconds']:.2f} s wall); TTFT mean {ms(summary['ttft'], 'mean')} ms, "
          f"TPOT mean {ms(summary['tpot'], 'mean')} ms, E2E mean {ms(summary['e2e'], 'mean')} ms; "
          f"{summary['preemptions']['total']} preemptions. Output in {args.output}/")
    return 0
