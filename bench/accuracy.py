"""Accuracy report: simulate measured closed-loop serving points and compare TTFT and TPOT.

    python bench/accuracy.py ../shared/data/calibration/aiconfigurator-silicon-vllm-h200.csv [--json OUT]

The CSV has AIConfigurator's silicon columns (any GPU): model_path, system,
backend_version, isl, osl, batch_size (the client's concurrency), tp_size,
pp_size, moe_tp_size, moe_ep_size, gemm_quant_mode, silicon_ttft_ms,
silicon_tpot_ms. Each row is replayed closed-loop as `vllm bench serve
--max-concurrency` runs it: `batch_size` requests of isl prompt and exactly osl
output tokens are kept in flight, each finished one replaced at once by a new
one; the first wave is warm-up, the next four waves are measured. The clients
are out of phase, as in a long-running benchmark (a request that arrives while
others decode is prefilled alone, which is what the measured TTFTs show: they
are shorter than prefilling a whole wave at once could take): the first wave's
arrivals are spread evenly over one request's expected lifetime, and the
closed loop keeps those phases. The engine
gets the version's default arguments for the device, the row's parallel layout
(DP = moe_tp * moe_ep / tp for MoE models, expert parallel when moe_ep > 1) and
the row's weight precision. Printed: per row and per model the median |error|
of TTFT (arrival to first token) and TPOT (mean time between output tokens).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emulator.config import EngineArgs, resolve  # noqa: E402
from emulator.cost_selection import select_cost_model  # noqa: E402
from emulator.costmodel import BatchShape  # noqa: E402
from emulator.deployment import Deployment, build_simulation  # noqa: E402
from emulator.hardware import load_device  # noqa: E402
from emulator.memory import CapacityError, plan_memory  # noqa: E402
from emulator.models import UnknownModelError, load_model  # noqa: E402
from emulator.request import Request  # noqa: E402

DEFAULT_CSV = ROOT.parent / "shared/data/calibration/aiconfigurator-silicon-vllm-h200.csv"
WEIGHT_DTYPES = {"fp8": "fp8", "fp8_block": "fp8", "nvfp4": "fp4", "mxfp4": "fp4", "int4_wo": "int4",
                 "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16"}


class Unsupported(Exception):
    """A row the emulator cannot price yet, with the reason."""


def version_defaults(version: str) -> dict:
    """Engine defaults of the vLLM that ran the point (0.x before 0.20 reserved 90 % of memory)."""
    try:
        minor = int(version.split(".")[1])
    except (IndexError, ValueError):
        minor = 18  # rows without a version come from the same campaign as the 0.18 ones
    return {"gpu_memory_utilization": 0.9 if minor < 20 else 0.92}


def deployment_for(row: dict, cost_model: str | None = None) -> Deployment:
    try:
        model = load_model(row["model_path"])
    except UnknownModelError as exc:
        raise Unsupported(f"no config for {row['model_path']} ({exc})") from None
    if model.is_mla:
        raise Unsupported("multi-head latent attention (MLA): no MLA operator composition yet")
    quant = row.get("gemm_quant_mode") or ""
    if quant not in WEIGHT_DTYPES:
        raise Unsupported(f"weight precision {quant!r} is not modelled")
    weight_dtype = WEIGHT_DTYPES[quant]
    if weight_dtype != model.weight_dtype and not (weight_dtype == "fp4" and model.weight_dtype == "fp4"):
        model = dataclasses.replace(model, weight_dtype=weight_dtype)  # e.g. `--quantization fp8` on a bf16 checkpoint
    if weight_dtype == "int4":
        raise Unsupported("INT4 weight-only layers are not modelled on this device")
    device = load_device(row["system"])
    tp, pp = int(row["tp_size"]), int(row["pp_size"] or 1)
    moe_tp, moe_ep = int(row.get("moe_tp_size") or tp), int(row.get("moe_ep_size") or 1)
    dp = max(1, moe_tp * moe_ep // tp) if model.is_moe else 1
    args = EngineArgs(tensor_parallel_size=tp, pipeline_parallel_size=pp, data_parallel_size=dp,
                      enable_expert_parallel=moe_ep > 1, **version_defaults(row.get("backend_version", "")))
    max_len = int(row["isl"]) + int(row["osl"])
    config = None
    for max_model_len in (None, max_len):
        try:
            config = resolve(args.with_(max_model_len=max_model_len), model, device)
            # MoE weights are split over the whole TP x DP group (TP-sharded or expert-parallel alike)
            sizing = dataclasses.replace(config, enable_expert_parallel=True) if dp > 1 else config
            memory = plan_memory(model, device, sizing)
            break
        except CapacityError as exc:
            if max_model_len is not None:
                raise Unsupported(f"does not fit: {exc}") from None
    return Deployment(model, device, config, memory, select_cost_model(model, device, config, cost_model))


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How the client drives the server (`vllm bench serve --max-concurrency c`)."""
    prompts_per_client: int = 10      # --num-prompts = 10 x concurrency
    range_ratio: float = 0.2           # lengths uniform in [L(1-r), L(1+r)] (--random-range-ratio)
    warmup_waves: int = 0              # leading waves left out of the statistics
    statistic: str = "mean"            # what the report quotes
    seed: int = 0


def simulate(row: dict, deployment: Deployment, protocol: Protocol = Protocol()) -> tuple[float, float]:
    """Closed loop at the row's concurrency; TTFT and TPOT (ms) of the measured requests."""
    sim = build_simulation(deployment, "least_loaded")
    concurrency, isl, osl = int(row["batch_size"]), int(row["isl"]), int(row["osl"])
    total = concurrency * protocol.prompts_per_client
    rng = np.random.default_rng(protocol.seed)
    r = protocol.range_ratio
    max_len = deployment.config.max_model_len
    lengths = [(int(rng.integers(max(1, int(isl * (1 - r))), int(isl * (1 + r)) + 1)),
                int(rng.integers(max(1, int(osl * (1 - r))), int(osl * (1 + r)) + 1))) for _ in range(total)]
    issued = 0
    finished: list[Request] = []

    def issue() -> None:
        nonlocal issued
        n_in, n_out = lengths[issued]
        request = Request(f"r{issued}", min(n_in, max_len - 1), max(1, min(n_out, max_len - n_in)),
                          arrival_time=sim.now, content_seed=issued)
        issued += 1
        sim.submit(request)

    def on_finish(request: Request) -> None:
        finished.append(request)
        if issued < total:
            issue()

    sim.add_finish_listener(on_finish)
    for _ in range(concurrency):
        issue()
    while sim.active:
        t = sim.next_event_time()
        if t is None:
            break
        sim.advance(t)
    measured = sorted(finished, key=lambda q: int(q.request_id[1:]))[concurrency * protocol.warmup_waves:]
    ttft = [q.first_token_time - q.arrival_time for q in measured]
    tpot = [(q.last_token_time - q.first_token_time) / (q.num_output_tokens - 1) for q in measured
            if q.num_output_tokens > 1]
    stat = np.mean if protocol.statistic == "mean" else np.median
    return 1000 * float(stat(ttft)), 1000 * float(stat(tpot))


def evaluate(rows: list[dict], cost_model: str | None = None, protocol: Protocol = Protocol(),
             progress: bool = True) -> list[dict]:
    results = []
    for row in rows:
        out = {"id": row["id"], "model": row["model_path"], "system": row["system"], "supported": True, "reason": "",
               "ttft_ms_real": float(row["silicon_ttft_ms"]), "tpot_ms_real": float(row["silicon_tpot_ms"]),
               "ttft_ms_pred": None, "tpot_ms_pred": None}
        try:
            deployment = deployment_for(row, cost_model)
            out["ttft_ms_pred"], out["tpot_ms_pred"] = simulate(row, deployment, protocol)
            out["cost_model"] = deployment.cost_model.describe().split(":")[0]
        except Unsupported as exc:
            out.update(supported=False, reason=str(exc))
        results.append(out)
        if progress:
            print(_row_line(row, out), flush=True)
    return results


def _err(pred, real):
    return None if pred is None else 100.0 * (pred - real) / real


def _row_line(row: dict, r: dict) -> str:
    shape = (f"isl {row['isl']:>5} osl {row['osl']:>5} c{row['batch_size']:<4} tp{row['tp_size']} "
             f"mtp{row.get('moe_tp_size', '')} mep{row.get('moe_ep_size', '')}")
    if not r["supported"]:
        return f"{r['model'][:34]:<34} {shape}  UNSUPPORTED: {r['reason']}"
    return (f"{r['model'][:34]:<34} {shape}  TTFT {r['ttft_ms_real']:8.1f} -> {r['ttft_ms_pred']:8.1f} ms "
            f"({_err(r['ttft_ms_pred'], r['ttft_ms_real']):+6.1f}%)  TPOT {r['tpot_ms_real']:6.2f} -> "
            f"{r['tpot_ms_pred']:6.2f} ms ({_err(r['tpot_ms_pred'], r['tpot_ms_real']):+6.1f}%)")


def summary(results: list[dict]) -> dict[str, dict]:
    per_model: dict[str, dict] = defaultdict(lambda: {"rows": 0, "supported": 0, "ttft": [], "tpot": [],
                                                      "reasons": set()})
    for r in results:
        m = per_model[r["model"]]
        m["rows"] += 1
        if r["supported"]:
            m["supported"] += 1
            m["ttft"].append(abs(_err(r["ttft_ms_pred"], r["ttft_ms_real"])))
            m["tpot"].append(abs(_err(r["tpot_ms_pred"], r["tpot_ms_real"])))
        else:
            m["reasons"].add(r["reason"])
    return {model: {"rows": m["rows"], "supported": m["supported"],
                    "ttft_median_abs_err_pct": float(np.median(m["ttft"])) if m["ttft"] else None,
                    "tpot_median_abs_err_pct": float(np.median(m["tpot"])) if m["tpot"] else None,
                    "unsupported_reasons": sorted(m["reasons"])}
            for model, m in sorted(per_model.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path, nargs="?", default=DEFAULT_CSV, help="silicon CSV (AIConfigurator columns)")
    parser.add_argument("--json", type=Path, default=None, help="write one object per row to this file")
    parser.add_argument("--model", default=None, help="only rows whose model_path contains this")
    parser.add_argument("--cost-model", choices=["profiled", "operators", "roofline"], default=None,
                        help="force one cost model level (default: the most accurate available)")
    parser.add_argument("--prompts-per-client", type=int, default=Protocol.prompts_per_client)
    parser.add_argument("--range-ratio", type=float, default=Protocol.range_ratio)
    parser.add_argument("--warmup-waves", type=int, default=Protocol.warmup_waves)
    parser.add_argument("--statistic", choices=["mean", "median"], default=Protocol.statistic)
    args = parser.parse_args(argv)
    protocol = Protocol(args.prompts_per_client, args.range_ratio, args.warmup_waves, args.statistic)
    with args.csv.open() as f:
        rows = [r for r in csv.DictReader(f) if args.model is None or args.model in r["model_path"]]
    if not rows:
        print(f"no rows in {args.csv}", file=sys.stderr)
        return 2
    wall = time.perf_counter()
    results = evaluate(rows, args.cost_model, protocol)
    wall = time.perf_counter() - wall
    print(f"\nper model (median |error| over supported rows; {len(rows)} rows in {wall:.1f} s):")
    for model, s in summary(results).items():
        if s["supported"]:
            print(f"  {model:<36} {s['supported']:>3}/{s['rows']:<3} rows  TTFT {s['ttft_median_abs_err_pct']:5.1f}%  "
                  f"TPOT {s['tpot_median_abs_err_pct']:5.1f}%")
        for reason in s["unsupported_reasons"]:
            print(f"  {model:<36} unsupported: {reason}")
    if args.json is not None:
        keys = ("id", "model", "system", "supported", "reason", "ttft_ms_real", "ttft_ms_pred", "tpot_ms_real",
                "tpot_ms_pred")
        args.json.write_text(json.dumps([{k: r[k] for k in keys} for r in results], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
