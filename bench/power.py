"""Power calibration: replay LLMServingSim 2.0's A6000 pulse run and compare with the measured power.

    python bench/power.py [--data DIR] [--tp N] [--trace FILE] [--clock-offset S] [--plot PNG] [--markdown]
    python bench/power.py --cost [TRACE] [--requests N] [--repeat K]

DIR (default ../shared/data/calibration/power-a6000) holds the run: vllm_pulse_power_tp{N}.txt (vLLM's
log: its engine arguments, and when each pulse of requests came, to the second), server_power_log_tp{N}.csv
(IPMI: the server's power at the wall, a few readings a second), gpu_power_log_tp{N}.txt (nvidia-smi:
each GPU's power) and config/power_config_tp{N}.json (LLMServingSim's cluster config, power section
included). TRACE is what the run sent (default: the sharegpt pulse trace of 3 x 10 requests).

The same arrivals are simulated twice on the emulator's timeline:
- emulator: the device's own power (emulator/data/hardware/A6000.yaml) on the node described in
  bench/data/power-a6000-server.yaml, whose idle at the wall is read from the idle seconds of the
  server log (the GPU log at its idle draw) — a reading, not a fit;
- LLMServingSim's parameters: the config's power section read as is.
`--cost` instead measures what the power model adds to a replay: the loop over a trace (default: the
Azure 2023 conversation trace on an H100) without and with it, alternated (each pair in turn reversed),
medians of the wall and of the process's CPU time.

The run spans the first pulse's arrival to its last token (the vLLM log's last line with tokens; the
simulation's last finish). Energy is the power integrated over the run, mean power that over its
duration; the per-second MAPE runs over the seconds of the run up to the log's first idle line after it
(the window of the reference series), for the server at the wall and the GPUs (nvidia-smi).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import re
import statistics
import sys
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emulator.cluster import ClusterSpec, build_cluster  # noqa: E402
from emulator.power import PowerModel, nodes_power  # noqa: E402
from loadgen.replay import make_requests  # noqa: E402
from loadgen.traces import read_trace  # noqa: E402
from profiles.cluster_file import read_cluster_file  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
DEFAULT_DATA = SHARED / "calibration" / "power-a6000"
DEFAULT_TRACE = SHARED / "traces" / "sharegpt" / "sharegpt_pulse_req10_n3_delay60.jsonl"
NODE_FILE = ROOT / "bench" / "data" / "power-a6000-server.yaml"

_VLLM_LINE = re.compile(r"INFO (\d\d-\d\d \d\d:\d\d:\d\d) \[loggers\.py:\d+\] Engine \d+: Avg prompt throughput: "
                        r"([\d.]+) tokens/s, Avg generation throughput: ([\d.]+) tokens/s, Running: (\d+) reqs")


@dataclasses.dataclass
class VLLMLog:
    engine_args: dict
    lines: list[tuple[datetime, float, float, int]]  # stamp, prompt tok/s, generation tok/s, running

    def pulses(self) -> list[datetime]:
        """The stamp of each pulse's first line with prompt tokens (the engine idle before it)."""
        starts, idle = [], True
        for stamp, prompt, _, running in self.lines:
            if prompt > 0 and idle:
                starts.append(stamp)
            idle = running == 0 and prompt == 0
        return starts

    def last_token(self) -> datetime:
        return max(stamp for stamp, _, generation, _ in self.lines if generation > 0)

    def first_idle_after(self, t: datetime) -> datetime:
        return min(stamp for stamp, prompt, generation, running in self.lines
                   if stamp > t and prompt == generation == running == 0)


def read_vllm_log(path: Path, year: int) -> VLLMLog:
    """Engine arguments as vLLM printed them, and its 1-s stat lines (summed over engines)."""
    text = path.read_text(errors="replace")
    args: dict = {}
    m = re.search(r"non-default args: (\{.*\})", text)
    if m:
        given = ast.literal_eval(m.group(1))
        args.update({k: given[k] for k in ("enforce_eager", "block_size", "enable_prefix_caching",
                                            "tensor_parallel_size", "max_num_seqs", "max_num_batched_tokens",
                                            "gpu_memory_utilization") if k in given})
    m = re.search(r"max_num_batched_tokens=(\d+)", text)
    if m and "max_num_batched_tokens" not in args:
        args["max_num_batched_tokens"] = int(m.group(1))
    per_second: dict[datetime, list] = {}
    for m in _VLLM_LINE.finditer(text):
        stamp = datetime.strptime(f"{year}-{m.group(1)}", "%Y-%m-%d %H:%M:%S")
        line = per_second.setdefault(stamp, [0.0, 0.0, 0])
        line[0] += float(m.group(2))
        line[1] += float(m.group(3))
        line[2] += int(m.group(4))
    return VLLMLog(args, [(t, *v) for t, v in sorted(per_second.items())])


def per_second(samples: list[tuple[datetime, float]]) -> dict[datetime, float]:
    """Mean of the readings stamped in each second."""
    bins: dict[datetime, list[float]] = {}
    for stamp, watts in samples:
        bins.setdefault(stamp.replace(microsecond=0), []).append(watts)
    return {t: sum(v) / len(v) for t, v in bins.items()}


def read_server_log(path: Path) -> dict[datetime, float]:
    """IPMI lines `YYYY-MM-DD HH:MM:SS,WATTS`; a garbled line is skipped."""
    samples = []
    for line in path.read_text().splitlines():
        m = re.fullmatch(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d+(?:\.\d+)?)", line.strip())
        if m:
            samples.append((datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"), float(m.group(2))))
    return per_second(samples)


def read_gpu_log(path: Path) -> dict[datetime, float]:
    """nvidia-smi lines `YYYY/MM/DD HH:MM:SS.mmm, index, util, watts`: all GPUs' power, each second."""
    by_gpu: dict[str, list[tuple[datetime, float]]] = {}
    for line in path.read_text().splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) >= 4:
            try:
                by_gpu.setdefault(fields[1], []).append(
                    (datetime.strptime(fields[0], "%Y/%m/%d %H:%M:%S.%f"), float(fields[-1])))
            except ValueError:
                continue
    total: dict[datetime, float] = {}
    for samples in by_gpu.values():
        for t, w in per_second(samples).items():
            total[t] = total.get(t, 0.0) + w
    return total


def standby_decays(path: Path) -> list[tuple[float, float, float, float, float]]:
    """How each GPU's draw falls after work, as nvidia-smi logs it (the readings behind A6000.yaml's
    standby_peak_w and standby_decay_s): from the first reading with utilisation 0 after work, the
    readings 1 s and 2 s later (1-s means on Ampere: the first and the second second without kernels)
    and 10 s later (standby settled). The excess over standby falls by e per `decay` seconds; the
    draw when the kernels stop is the level whose decay averages the first reading over its second.
    Per fall: (first, second, settled, decay s, peak W)."""
    by_gpu: dict[str, list[tuple[datetime, float, float]]] = {}
    for line in path.read_text().splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) >= 4:
            try:
                by_gpu.setdefault(fields[1], []).append(
                    (datetime.strptime(fields[0], "%Y/%m/%d %H:%M:%S.%f"), float(fields[2]), float(fields[3])))
            except ValueError:
                continue

    def at(samples: list[tuple[datetime, float, float]], t: datetime) -> float:
        return [w for stamp, _, w in samples if stamp <= t][-1]

    out = []
    for samples in by_gpu.values():
        for (_, util_before, _), (t0, util, _) in zip(samples, samples[1:]):
            if util_before > 0 and util == 0 and t0 + timedelta(seconds=10) <= samples[-1][0]:
                # half a sampling period on: the reading updates each second, a few ms either side
                first, second, settled = (at(samples, t0 + timedelta(seconds=k + 0.1)) for k in (1, 2, 10))
                if second - settled <= 0 or first <= second:
                    continue  # no decay to read
                decay = 1.0 / np.log((first - settled) / (second - settled))
                peak = settled + (first - settled) / (decay * -np.expm1(-1.0 / decay))
                out.append((first, second, settled, float(decay), float(peak)))
    return out


def series(readings: dict[datetime, float], start: datetime, seconds: int) -> np.ndarray:
    """One value a second from `start`; a second without a reading takes the one before it."""
    out, last = [], None
    for k in range(seconds):
        last = readings.get(start + timedelta(seconds=k), last)
        out.append(np.nan if last is None else last)
    return np.array(out)


def idle_reading(server: dict[datetime, float], gpu: dict[datetime, float]) -> float:
    """The server's idle at the wall: the median of the seconds whose GPUs are at their idle draw."""
    floor = min(gpu.values())
    idle = [server[t] for t, w in gpu.items() if w <= 1.2 * floor and t in server]
    return statistics.median(idle)


def simulate(spec: ClusterSpec, arrivals: list[tuple[float, object]], window: float) -> tuple[PowerModel, float]:
    """Run the arrivals (seconds from the first pulse, trace record) on the cluster; the power model
    counted to `window`, and the time of the last token."""
    sim = build_cluster(spec)
    model = PowerModel(sim, nodes_power(spec.nodes))
    records = [dataclasses.replace(record, arrival=t) for t, record in arrivals]
    requests = list(make_requests(iter(records), 1 << 30, 0, "trace", False, []))
    sim.run(requests)
    last = max(r.finish_time for r in requests)
    model.finish(max(window, last))
    return model, last


def energy(watts: np.ndarray, a: float, b: float) -> float:
    """Joules of a one-value-a-second series over [a, b) seconds."""
    edges = np.arange(len(watts) + 1)
    overlap = np.clip(np.minimum(edges[1:], b) - np.maximum(edges[:-1], a), 0.0, None)
    return float((watts * overlap).sum())


def errors(sim_server: np.ndarray, sim_gpu: np.ndarray | None, sim_run: tuple[float, float],
           meas_server: np.ndarray, meas_gpu: np.ndarray, meas_run: tuple[float, float]) -> dict[str, float]:
    """Percent errors: energy and mean power over each side's run (first arrival to last token, in the
    power logs' seconds), per-second MAPE over the whole window."""
    e_sim, e_meas = energy(sim_server, *sim_run), energy(meas_server, *meas_run)
    mean_sim, mean_meas = e_sim / (sim_run[1] - sim_run[0]), e_meas / (meas_run[1] - meas_run[0])
    out = {
        "energy_kj": e_sim / 1e3,
        "energy_err": 100 * (e_sim / e_meas - 1),
        "mean_w": mean_sim,
        "mean_err": 100 * (mean_sim / mean_meas - 1),
        "server_mape": 100 * float(np.mean(np.abs(sim_server - meas_server) / meas_server)),
    }
    if sim_gpu is not None:
        out["gpu_mean_err"] = 100 * (sim_gpu.mean() / meas_gpu.mean() - 1)
        out["gpu_mape"] = 100 * float(np.mean(np.abs(sim_gpu - meas_gpu) / meas_gpu))
    return out


def cost(trace: Path, num_requests: int, repeat: int) -> None:
    """Seconds of the simulation loop over the trace without and with the power model listening."""
    import time
    from itertools import islice

    from emulator.cluster import build_simulation
    from emulator.config import EngineArgs
    from profiles.deployment import build_deployment
    deployment = build_deployment("meta-llama/Llama-3.1-8B", "H100", EngineArgs(max_model_len=8192))
    records = list(islice(read_trace(str(trace)), num_requests))
    times: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}  # the process's CPU seconds: less swayed by load
    for k in range(repeat):
        for power in (False, True) if k % 2 == 0 else (True, False):
            sim = build_simulation(deployment)
            if power:
                PowerModel(sim)
            requests = list(make_requests(iter(records), 8192, 0, str(trace), True, []))
            start, start_cpu = time.perf_counter(), time.process_time()
            sim.run(requests)
            times[power].append(time.perf_counter() - start)
            cpu[power].append(time.process_time() - start_cpu)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    cpu_off, cpu_on = statistics.median(cpu[False]), statistics.median(cpu[True])
    print(f"{len(records)} requests of {trace.name}, H100, median of {repeat}: loop {off:.2f} s without the power "
          f"model, {on:.2f} s with it (+{100 * (on / off - 1):.1f} %); CPU {cpu_off:.2f} s, {cpu_on:.2f} s "
          f"(+{100 * (cpu_on / cpu_off - 1):.1f} %)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--clock-offset", type=float, default=0.0,
                        help="seconds the power logs' clock runs behind the vLLM log's (default 0: as logged)")
    parser.add_argument("--plot", type=Path, default=None, help="write simulated vs measured power over time (PNG)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--cost", nargs="?", type=Path, const=SHARED / "traces" / "azure2023" /
                        "AzureLLMInferenceTrace_conv.csv", default=None,
                        help="measure what the power model adds to a replay of this trace instead")
    parser.add_argument("--requests", type=int, default=5000, help="with --cost: the trace's first N requests")
    parser.add_argument("--repeat", type=int, default=3, help="with --cost: runs of each, alternated")
    args = parser.parse_args()
    if args.cost is not None:
        cost(args.cost, args.requests, args.repeat)
        return 0
    d, n = args.data, args.tp

    server = read_server_log(d / f"server_power_log_tp{n}.csv")
    gpu = read_gpu_log(d / f"gpu_power_log_tp{n}.txt")
    first = min(server)
    log = read_vllm_log(d / f"vllm_pulse_power_tp{n}.txt", first.year)
    pulses = log.pulses()
    # the vLLM log is in another time zone than the power logs: shift it by whole hours
    shift = timedelta(hours=round((first - pulses[0]).total_seconds() / 3600))
    start = pulses[0] + shift
    run = int((log.last_token() - pulses[0]).total_seconds())
    window = int((log.first_idle_after(log.last_token()) - pulses[0]).total_seconds()) + 1
    meas_server, meas_gpu = series(server, start, window), series(gpu, start, window)

    records = list(read_trace(str(args.trace)))
    groups = sorted({r.arrival for r in records})
    if len(groups) != len(pulses):
        print(f"error: the trace has {len(groups)} pulses, the vLLM log {len(pulses)}", file=sys.stderr)
        return 2
    offset = {a: (p - pulses[0]).total_seconds() + args.clock_offset for a, p in zip(groups, pulses)}
    arrivals = [(offset[r.arrival], r) for r in records]
    engine_args = {**log.engine_args, "tensor_parallel_size": n}

    idle_w = idle_reading(server, gpu)
    spec, _ = read_cluster_file(NODE_FILE, "cold", engine_args)
    node = next(iter(spec.nodes))
    spec = dataclasses.replace(spec, nodes={node: {**spec.nodes[node], "power": {**spec.nodes[node]["power"],
                                                                                  "idle_w": idle_w}}})
    ours, ours_run = simulate(spec, arrivals, window)
    theirs_spec, _ = read_cluster_file(d / "config" / f"power_config_tp{n}.json", "cold", engine_args)
    theirs, theirs_run = simulate(theirs_spec, arrivals, window)

    delta = args.clock_offset
    measured_run = (delta, delta + run)
    rows = {}
    for name, model, last in (("emulator", ours, ours_run), ("LLMServingSim's parameters", theirs, theirs_run)):
        rows[name] = errors(np.array(model.power_series(window)), np.array(model.gpu_power_series(window)),
                            (delta, last), meas_server, meas_gpu, measured_run)

    print(f"A6000 TP {n}, {len(records)} requests in {len(pulses)} pulses; run {run} s (vLLM log), window {window} s; "
          f"clock offset {args.clock_offset:g} s; "
          f"server idle reading {idle_w:.1f} W; engine args {engine_args}")
    print(f"run (first arrival to last token): measured {run} s, simulated {ours_run - delta:.1f} s")
    falls = standby_decays(d / f"gpu_power_log_tp{n}.txt")
    if falls:
        print("GPU after work (nvidia-smi; 1 s, 2 s, 10 s after its utilisation falls to 0 -> decay, peak): "
              + "; ".join(f"{a:.1f}, {b:.1f}, {c:.1f} W -> {t:.2f} s, {p:.0f} W" for a, b, c, t, p in falls)
              + f"; medians {statistics.median(f[3] for f in falls):.2f} s, "
              f"{statistics.median(f[4] for f in falls):.0f} W")
    header = ["", "energy kJ", "energy err %", "mean W", "mean err %", "server MAPE %", "GPU mean err %",
              "GPU MAPE %"]
    keys = ["energy_kj", "energy_err", "mean_w", "mean_err", "server_mape", "gpu_mean_err", "gpu_mape"]
    table = [[name] + [("-" if k not in r else f"{r[k]:+.2f}" if k.endswith("err") else f"{r[k]:.2f}") for k in keys]
             for name, r in rows.items()]
    e_meas = energy(meas_server, *measured_run)
    table.insert(0, ["measured", f"{e_meas / 1e3:.2f}", "", f"{e_meas / run:.2f}", "", "", "", ""])
    if args.markdown:
        print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for row in table:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(str(row[i])) for row in [header, *table]) for i in range(len(header))]
        for row in [header, *table]:
            print("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
    summary = ours.summary(sum(r.output_len for r in records))
    print("emulator energy by component (kJ): " + ", ".join(f"{k} {v / 1e3:.2f}"
                                                          for k, v in summary["by_component_j"].items()))
    print("GPU energy by state (kJ): " + ", ".join(f"{k} {v / 1e3:.2f}" for k, v in summary["gpu_by_state_j"].items()))

    if args.plot is not None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        t = np.arange(window)
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 4.6), sharex=True, dpi=90)
        top.plot(t, meas_server, color="black", lw=1.6, label="measured (IPMI)")
        top.plot(t, ours.power_series(window), color="tab:blue", lw=1.2, label="emulator")
        top.set_ylabel("server W")
        top.legend(fontsize=8, loc="upper right")
        bottom.plot(t, meas_gpu, color="black", lw=1.6, label="measured (nvidia-smi)")
        bottom.plot(t, ours.gpu_power_series(window), color="tab:blue", lw=1.2, label="emulator")
        bottom.set_ylabel("GPU W")
        bottom.set_xlabel("seconds from the first pulse")
        bottom.legend(fontsize=8, loc="upper right")
        top.set_title(f"A6000 TP {n}, Llama-3.1-8B, {len(pulses)} pulses of requests: power at the wall and GPU",
                      fontsize=9)
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
