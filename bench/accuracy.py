"""Accuracy report: replay measured closed-loop serving points and compare TTFT and TPOT.

    python bench/accuracy.py ../shared/data/calibration/aiconfigurator-silicon-vllm-h200.csv [--json OUT]

The CSV has AIConfigurator's silicon columns (any GPU): model_path, system,
backend_version, isl, osl, batch_size (the client's concurrency), tp_size,
pp_size, moe_tp_size, moe_ep_size, gemm_quant_mode, silicon_data_source,
silicon_ttft_ms, silicon_tpot_ms. Each row is replayed the way it was measured.

How the points were measured (the protocol decides everything)
--------------------------------------------------------------
Most rows (Llama-3.1-70B, gpt-oss-120b, MiniMax-M2.5, Kimi-K2.5) are SemiAnalysis
InferenceX runs: `silicon_data_source` names an InferenceX database dump
(`db-dump ... config_id ... workflow_run_id`) or one of its CSV exports
(`source_file=2026-..csv; model=GPT-OSS-120B; ...`). NVIDIA's own replay of these
points (ai-dynamo/aisimulate, scripts/e2e_accuracy/run_e2e_accuracy.py) takes
`silicon_ttft_ms = mean_ttft` and `silicon_tpot_ms = mean_tpot` of the run, and
replays `request_count = 10 x concurrency` with `random_range_ratio = 0.8`. The
client is InferenceX's `utils/bench_serving/benchmark_serving.py` (a fork of
vLLM's; SemiAnalysisAI/InferenceX benchmarks/benchmark_lib.sh, run_benchmark_serving):

* `--dataset-name random --random-range-ratio 0.8` (benchmark-tmpl.yml): every
  prompt gets its own random token ids (no shared prefix, so prefix caching has
  nothing to hit), input and output lengths uniform integers in [int(0.8 L), L]
  (`sample_uniform`: lower = int(L * ratio), upper = L);
* `--num-prompts 10 x CONC --max-concurrency CONC --request-rate inf --ignore-eos`:
  all prompts are queued at once behind a semaphore of CONC, so the first CONC
  arrive together and each finished request lets the next one in (closed loop);
* `--num-warmups 2 x CONC` (later revisions) runs the first prompt 2 x CONC times
  before the measured run starts and waits for them all, so the engine is empty
  when the measured burst arrives; warm-ups are not measured;
* TTFT is the client's time to the first streamed token, TPOT
  `(latency - ttft) / (output_tokens - 1)`; the report quotes the means over all
  measured requests.

The engine flags come from the model's InferenceX recipe of that period
(benchmarks/70b_fp8_h200_slurm.sh, benchmarks/gptoss_fp4_h200.sh,
benchmarks/single_node/minimaxm2.5_fp8_h200.sh): see RECIPES.

The Llama-3.1-8B-Instruct-FP8 and Qwen3-235B-A22B-FP8 rows come from NVIDIA's
internal AIConfigurator gap analysis (`source_file=.../aic-auto-gap-analysis/...`),
whose client is not published. They are replayed with AIConfigurator's own
benchmark conventions (src/aiconfigurator/eval/benchmarks/genai_perf_runner.py:
fixed lengths, `--request-count 10 x c`, `--warmup-request-count 2 x c`; and the
engine of its vLLM benchmark rule, generator/rule_plugin/benchmark/vllm.rule:
`max_num_seqs = c`, no prefix caching, max model length isl + osl + 1500).

Each replay: 10 x c requests, the first c sent at t = 0, each finish sending the
next; the parallel layout of the row (DP = moe_tp * moe_ep / tp for MoE models,
expert parallelism when moe_ep > 1, or when vLLM cannot split the experts over
TP: see expert_split) and its weight precision. Between a send and the engine
sits vLLM's API server (FrontEnd): the clients send text, which the server's
micro-batching tokenizer encodes before the engine core sees the request; TTFT
runs from the send, as the client measures it. Printed: per row and per model
the median |error| of TTFT and TPOT.
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

from emulator.batch import BatchShape  # noqa: E402
from emulator.config import ConfigError, EngineArgs, resolve  # noqa: E402
from profiles.cost_selection import select_cost_model  # noqa: E402
from emulator.cluster import build_simulation  # noqa: E402
from emulator.deployment import Deployment  # noqa: E402
from emulator.hardware import UnknownHardwareError, load_device  # noqa: E402
from emulator.memory import CapacityError, plan_memory  # noqa: E402
from emulator.models import ModelSpec, UnknownModelError, load_model  # noqa: E402
from emulator.request import Request  # noqa: E402

DEFAULT_CSV = ROOT.parent / "shared/data/calibration/aiconfigurator-silicon-vllm-h200.csv"
WEIGHT_DTYPES = {"fp8": "fp8", "fp8_block": "fp8", "nvfp4": "fp4", "mxfp4": "fp4", "int4_wo": "int4",
                 "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16"}


class Unsupported(Exception):
    """A row the emulator cannot price yet, with the reason."""


# The schema's fields a row needs, and the ones that, when set, describe a point we do not replay.
REQUIRED = ("model_path", "system", "isl", "osl", "batch_size", "tp_size", "silicon_ttft_ms", "silicon_tpot_ms")


def check_row(row: dict) -> None:
    """Raise Unsupported for a row of AIConfigurator's silicon schema that cannot be replayed as it ran."""
    missing = [name for name in REQUIRED if not (row.get(name) or "").strip()]
    if missing:
        raise Unsupported(f"empty field(s) {', '.join(missing)}")
    mode = (row.get("mode") or "agg").strip()
    if mode != "agg":
        raise Unsupported(f"mode={mode}: disaggregated prefill/decode workers (prefill_*/decode_* fields) are "
                          f"not replayed by this benchmark; only aggregated serving points are")
    backend = (row.get("backend") or "vllm").strip()
    if backend != "vllm":
        raise Unsupported(f"backend {backend!r}: only vLLM points are replayed")
    for name in ("isl", "osl", "batch_size", "tp_size", "pp_size", "moe_tp_size", "moe_ep_size",
                 "attention_dp_size"):
        value = (row.get(name) or "").strip()
        if value and not (value.isdigit() and int(value) >= 1):
            raise Unsupported(f"{name}={value!r} is not a positive whole number")
    for name in ("silicon_ttft_ms", "silicon_tpot_ms"):
        try:
            value = float(row[name])
        except ValueError:
            raise Unsupported(f"{name}={row[name]!r} is not a number") from None
        if not value > 0:
            raise Unsupported(f"{name}={row[name]!r} is not a positive time")
    if int(row.get("attention_dp_size") or 1) > 1:
        raise Unsupported(f"attention_dp_size={row['attention_dp_size']}: data-parallel attention ranks are not "
                          f"mapped to vLLM engines here")


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How the client drove the server (see the module docstring)."""
    name: str
    range_ratio: float            # lengths uniform in [int(L * ratio), L]; 1.0 = fixed lengths
    prompts_per_client: int = 10  # requests = prompts_per_client x concurrency, all measured
    statistic: str = "mean"       # what the source quotes
    seed: int = 0


PROTOCOLS = {
    "inferencex": Protocol("inferencex", range_ratio=0.8),
    "aic-gap": Protocol("aic-gap", range_ratio=1.0),
}


def protocol_for(row: dict) -> Protocol:
    source = row.get("silicon_data_source", "")
    return PROTOCOLS["aic-gap" if "aic-auto-gap-analysis" in source else "inferencex"]


# Engine flags of the InferenceX recipe per model family (H200, vLLM), beyond the row's parallel layout.
#   llama: benchmarks/70b_fp8_h200_slurm.sh: --kv-cache-dtype fp8, --max-num-batched-tokens 8192,
#          --gpu-memory-utilization 0.9, --max-num-seqs $CONC, no prefix caching, async scheduling
#   gpt_oss: benchmarks/gptoss_fp4_h200.sh: the same without fp8 KV cache, and VLLM_MXFP4_USE_MARLIN=1 (the
#          MXFP4 experts run vLLM's Marlin MoE kernel, not its default one)
#   minimax_m2: benchmarks/single_node/minimaxm2.5_fp8_h200.sh (March 2026): --gpu-memory-utilization 0.95,
#          vLLM's defaults otherwise
RECIPES = {
    "llama": {"kv_cache_dtype": "fp8", "gpu_memory_utilization": 0.9, "max_num_batched_tokens": 8192,
              "max_num_seqs": "concurrency"},
    "gpt_oss": {"gpu_memory_utilization": 0.9, "max_num_batched_tokens": 8192, "max_num_seqs": "concurrency",
                "moe_backend": "marlin"},
    "minimax_m2": {"gpu_memory_utilization": 0.95},
}
# AIConfigurator's vLLM benchmark rule (generator/rule_plugin/benchmark/vllm.rule) for the gap-analysis rows.
AIC_BENCHMARK = {"gpu_memory_utilization": 0.9, "max_num_seqs": "concurrency"}


def version_defaults(version: str) -> dict:
    """Engine defaults of the vLLM that ran the point (0.x before 0.20 reserved 90 % of memory)."""
    try:
        minor = int(version.split(".")[1])
    except (IndexError, ValueError):
        minor = 18  # rows without a version come from the same campaign as the 0.18 ones
    return {"gpu_memory_utilization": 0.9 if minor < 20 else 0.92}


def max_model_len_for(row: dict, protocol: Protocol) -> int:
    """The recipes' --max-model-len: isl + osl + 20 at 1k/1k, + 200 otherwise; AIC's rule adds 1500."""
    isl, osl = int(row["isl"]), int(row["osl"])
    if protocol.name == "aic-gap":
        return isl + osl + 1500
    return isl + osl + (20 if (isl, osl) == (1024, 1024) else 200)


def expert_split(row: dict, model: ModelSpec) -> tuple[int, int]:
    """(moe_tp, moe_ep) the run had. vLLM refuses to slice block-quantised FP8 experts over
    tensor parallelism when a rank's slice is not a whole number of quantisation blocks
    (validate_fp8_block_shape_moe: MiniMax-M2's 1536 over 8 ranks is 192, not a multiple of
    128), so such a row can only have run with its experts spread by expert parallelism, as
    MiniMax's vLLM guide deploys it on 8 GPUs (`--enable_expert_parallel --tensor-parallel-size 8`)."""
    tp = int(row["tp_size"])
    moe_tp, moe_ep = int(row.get("moe_tp_size") or tp), int(row.get("moe_ep_size") or 1)
    block = (model.weight_block_size or (0,))[0]
    if model.is_moe and moe_tp > 1 and block and (model.moe_intermediate_size // moe_tp) % block:
        return 1, moe_tp * moe_ep
    return moe_tp, moe_ep


def engine_args_for(row: dict, model: ModelSpec, protocol: Protocol) -> EngineArgs:
    tp, pp = int(row["tp_size"]), int(row["pp_size"] or 1)
    moe_tp, moe_ep = expert_split(row, model)
    dp = max(1, moe_tp * moe_ep // tp) if model.is_moe else 1
    flags = dict(version_defaults(row.get("backend_version", "")))
    flags.update(AIC_BENCHMARK if protocol.name == "aic-gap" else RECIPES.get(model.model_type, {}))
    if flags.get("max_num_seqs") == "concurrency":
        flags["max_num_seqs"] = int(row["batch_size"])
    flags.pop("moe_backend", None)  # a kernel choice, priced by the cost model (see moe_backend_for)
    return EngineArgs(tensor_parallel_size=tp, pipeline_parallel_size=pp, data_parallel_size=dp,
                      enable_expert_parallel=moe_ep > 1, enable_prefix_caching=False,
                      max_model_len=max_model_len_for(row, protocol), **flags)


def moe_backend_for(row: dict, model: ModelSpec, protocol: Protocol) -> str:
    recipe = {} if protocol.name == "aic-gap" else RECIPES.get(model.model_type, {})
    return recipe.get("moe_backend", "auto")


def deployment_for(row: dict, cost_model: str | None = None, protocol: Protocol | None = None) -> Deployment:
    check_row(row)
    protocol = protocol or protocol_for(row)
    quant = (row.get("gemm_quant_mode") or "").strip()
    reasons = []
    if quant and quant not in WEIGHT_DTYPES:
        reasons.append(f"weight precision {quant!r} is not modelled")
    elif WEIGHT_DTYPES.get(quant) == "int4":
        reasons.append("INT4 weight-only layers (W4A16) have no operator tables or composition")
    model = None
    try:
        model = load_model(row["model_path"])
        if model.is_mla:
            reasons.append("multi-head latent attention (MLA): no MLA operator composition yet")
    except UnknownModelError:
        reasons.append(f"no config.json shipped for {row['model_path']}")
    try:
        device = load_device(row["system"])
    except UnknownHardwareError:
        reasons.append(f"no device {row['system']!r} in the catalogue")
    if reasons:
        raise Unsupported("; ".join(reasons))
    weight_dtype = WEIGHT_DTYPES[quant] if quant else model.weight_dtype  # empty: the checkpoint's own dtype
    if weight_dtype == "fp4" and model.expert_weight_dtype == "fp4":
        pass  # gpt-oss: the checkpoint already says which layers are MXFP4
    elif weight_dtype != model.weight_dtype:  # e.g. `--quantization fp8` on a bf16 checkpoint
        model = dataclasses.replace(model, weight_dtype=weight_dtype, expert_weight_dtype=weight_dtype)
    args = engine_args_for(row, model, protocol)
    try:
        config = resolve(args, model, device)
        memory = plan_memory(model, device, config)
    except (CapacityError, ConfigError) as exc:
        raise Unsupported(f"does not fit: {exc}") from None
    moe_backend = moe_backend_for(row, model, protocol)
    return Deployment(model, device, config, memory, select_cost_model(model, device, config, cost_model, moe_backend))


def request_lengths(row: dict, protocol: Protocol) -> list[tuple[int, int]]:
    """(prompt, output) tokens of every request, drawn as the client draws them."""
    concurrency, isl, osl = int(row["batch_size"]), int(row["isl"]), int(row["osl"])
    total = concurrency * protocol.prompts_per_client
    rng = np.random.RandomState(protocol.seed)
    r = protocol.range_ratio
    inputs = rng.randint(int(isl * r), isl + 1, size=total)
    outputs = rng.randint(int(osl * r), osl + 1, size=total)
    return [(max(1, int(i)), max(1, int(o))) for i, o in zip(inputs, outputs)]


# A finished request's client sends the next one over HTTP at once (the semaphore it held is released
# as the stream ends); what happens before the engine sees it is the API server's (FrontEnd).
CLIENT_TURNAROUND = 1e-6  # seconds: strictly after the finish, shorter than any step

# Encode time (ms) of one InferenceX prompt of n tokens (decoded runs of consecutive vocabulary ids)
# by a Hugging Face fast byte-level BPE tokenizer of the kind these models ship (tiktoken-style
# pre-tokenisation, 131k vocabulary: Mistral's tekken_240911 converted with transformers'
# TikTokenConverter; Llama 3, gpt-oss and MiniMax-M2 use the same algorithm with 128k-200k
# vocabularies). Measured with bench/frontend_tokenize.py (medians of 31 prompts, tokenizers
# 0.22, one core of an AMD EPYC VM); the cost per token grows with the prompt (longer runs of
# rare pieces per pre-token).
TOKENIZE_MS = ((128, 0.15), (512, 0.72), (1024, 2.2), (2048, 6.8), (4096, 14.6), (8192, 27.0))


@dataclasses.dataclass
class FrontEnd:
    """vLLM's API server between a client's send and the engine core.

    vLLM 0.10 (vllm-project/vllm#19334) to mid 2026 (#45759, which removed it) tokenizes
    prompts in an AsyncMicrobatchTokenizer: its loop takes the first waiting prompt, waits
    `window` (batch_wait_timeout_s = 2 ms) for up to 31 more, and encodes the batch on its one
    executor thread (the Rust tokenizer spreads a batch over cores, so a batch takes as long
    as its longest prompt); the next batch starts when that one is done. A request reaches the
    engine when its batch is encoded; the client's TTFT runs from its send.
    """
    window: float                      # seconds the micro-batcher waits for company
    max_batch: int = 32
    open_close: float | None = None    # when the batch being gathered stops gathering
    members: list = dataclasses.field(default_factory=list)   # (tokens, item) of that batch
    busy_until: float = 0.0            # end of the encode in progress
    deliveries: list = dataclasses.field(default_factory=list)  # (time, item), in time order

    @staticmethod
    def encode_seconds(tokens: int) -> float:
        n, ms = zip(*TOKENIZE_MS)
        return 1e-3 * float(np.interp(tokens, n, ms, right=ms[-1] * tokens / n[-1]))

    def send(self, t: float, tokens: int, item) -> None:
        if self.open_close is not None and t > self.open_close:  # that batch stopped gathering before
            self._encode()
        if self.open_close is None:  # the loop takes it when idle, or when the encode in progress ends
            self.open_close = max(t, self.busy_until) + self.window
        self.members.append((tokens, item))
        if len(self.members) == self.max_batch:  # a full batch stops gathering at once
            self.open_close = max(t, self.busy_until)
            self._encode()

    def next_time(self) -> float | None:
        times = [t for t in (self.open_close, self.deliveries[0][0] if self.deliveries else None) if t is not None]
        return min(times) if times else None

    def advance(self, now: float) -> list:
        """Process the front end up to `now`; the items that reach the engine at `now`."""
        if self.open_close is not None and self.open_close <= now:
            self._encode()
        out = []
        while self.deliveries and self.deliveries[0][0] <= now:
            out.append(self.deliveries.pop(0)[1])
        return out

    def _encode(self) -> None:
        end = self.open_close + max(self.encode_seconds(n) for n, _ in self.members)
        self.deliveries.extend((end, item) for _, item in self.members)
        self.busy_until, self.open_close, self.members = end, None, []


def front_end_for(row: dict) -> FrontEnd:
    """The API server of the row's vLLM: the 2 ms micro-batch window from 0.10 until its removal."""
    try:
        minor = int(row.get("backend_version", "").split(".")[1])
    except (IndexError, ValueError):
        minor = 18  # rows without a version come from the 0.1x campaigns
    return FrontEnd(window=0.002 if 10 <= minor < 24 else 0.0)


def closed_loop(row: dict, deployment: Deployment, protocol: Protocol,
                bulk: bool = True) -> list[tuple[float, Request]]:
    """Run the row's closed loop; (send time, request) of every finished request. `bulk=False` steps
    one engine event at a time (the reference the bounded decode runs must reproduce exactly)."""
    sim = build_simulation(deployment, "least_loaded")
    lengths = request_lengths(row, protocol)
    max_len = deployment.config.max_model_len
    front = front_end_for(row)
    sent: list[float] = []
    finished: list[Request] = []

    def send(t: float) -> None:
        i = len(sent)
        sent.append(t)
        front.send(t, min(lengths[i][0], max_len - 1), i)

    def submit(i: int) -> None:
        n_in, n_out = lengths[i]
        n_in = min(n_in, max_len - 1)
        sim.submit(Request(f"r{i}", n_in, max(1, min(n_out, max_len - n_in)), arrival_time=sim.now))

    def on_finish(request: Request) -> None:
        finished.append(request)
        if len(sent) < len(lengths):
            send(request.finish_time + CLIENT_TURNAROUND)

    sim.add_finish_listener(on_finish)
    for _ in range(min(int(row["batch_size"]), len(lengths))):
        send(0.0)
    # The next send follows the next finish, which is no sooner than the fewest tokens any request
    # still has to produce, each taking at least a one-token step: advancing to there lets the engine
    # take decode runs, and never past a finish whose successor should join.
    floor = deployment.cost_model.step_time(BatchShape(1, 1, 0, 0.0, 1, 1, 1))
    while True:
        t, f = sim.next_event_time(), front.next_time()
        if f is not None and (t is None or f <= t):
            sim.advance(f)
            for i in front.advance(f):
                submit(i)
            continue
        if t is None:
            return [(sent[int(q.request_id[1:])], q) for q in finished]
        left = min((q.output_len - q.num_output_tokens for q in sim.active.values()), default=0)
        until = t + max(0, left - 2) * floor if bulk else t
        sim.advance(min(until, f) if f is not None else until)


def simulate(row: dict, deployment: Deployment, protocol: Protocol | None = None) -> tuple[float, float]:
    """Closed loop at the row's concurrency; the source's statistic of TTFT and TPOT (ms)."""
    protocol = protocol or protocol_for(row)
    finished = closed_loop(row, deployment, protocol)
    ttft = [q.first_token_time - sent for sent, q in finished]
    tpot = [(q.last_token_time - q.first_token_time) / (q.num_output_tokens - 1) for _, q in finished
            if q.num_output_tokens > 1]
    stat = np.mean if protocol.statistic == "mean" else np.median
    return 1000 * float(stat(ttft)), 1000 * float(stat(tpot))


def evaluate(rows: list[dict], cost_model: str | None = None, protocol: Protocol | None = None,
             progress: bool = True) -> list[dict]:
    results = []
    for row in rows:
        out = {"id": row.get("id") or "", "model": row.get("model_path") or "", "system": row.get("system") or "",
               "supported": True, "reason": "", "ttft_ms_real": _number(row.get("silicon_ttft_ms")),
               "tpot_ms_real": _number(row.get("silicon_tpot_ms")), "ttft_ms_pred": None, "tpot_ms_pred": None}
        try:
            chosen = protocol or protocol_for(row)
            deployment = deployment_for(row, cost_model, chosen)
            out["ttft_ms_pred"], out["tpot_ms_pred"] = simulate(row, deployment, chosen)
            out["cost_model"] = deployment.cost_model.describe().split(":")[0]
        except Unsupported as exc:
            out.update(supported=False, reason=str(exc))
        except (ValueError, RuntimeError) as exc:  # e.g. a configuration vLLM itself would refuse
            out.update(supported=False, reason=f"the emulator refused the row: {exc}")
        results.append(out)
        if progress:
            print(_row_line(row, out), flush=True)
    return results


def _number(text) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _err(pred, real):
    return None if pred is None else 100.0 * (pred - real) / real


def _row_line(row: dict, r: dict) -> str:
    field = lambda name: row.get(name) or ""  # noqa: E731  (a short row has None in its missing columns)
    shape = (f"isl {field('isl'):>5} osl {field('osl'):>5} c{field('batch_size'):<4} "
             f"tp{field('tp_size')} mtp{field('moe_tp_size')} mep{field('moe_ep_size')}")
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
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default=None,
                        help="force one client protocol (default: the one that measured each row)")
    args = parser.parse_args(argv)
    with args.csv.open() as f:
        rows = [r for r in csv.DictReader(f) if args.model is None or args.model in (r.get("model_path") or "")]
    if not rows:
        print(f"no rows in {args.csv}", file=sys.stderr)
        return 2
    wall = time.perf_counter()
    results = evaluate(rows, args.cost_model, PROTOCOLS.get(args.protocol))
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
