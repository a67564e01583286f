"""An HTML report of one or more runs, offline or over HTTP, side by side; one file that opens offline.

    vllm-emulator report DIR [DIR ...] [-o report.html] [--names A B ...] [--goodput ttft:200 tpot:50]

A run is a folder written by `vllm-emulator replay` or `vllm-emulator loadgen`
(requests.jsonl, summary.json, timeseries.csv, and metrics.csv when the server's /metrics
was scraped). The report has a summary table (one column per run) and plots, one line per
run (PNG images inside the HTML): latency CDFs (TTFT, TPOT, E2E, ITL), TTFT and TPOT
percentiles over the run, throughput and running/waiting requests over time, goodput
under the SLOs given (or those the run was made with), and the server's metrics over the
run (KV-cache usage, preemptions, prefix-cache hit rate, power when modelled). Needs
matplotlib (`pip install 'vllm-emulator[report]'`).
"""
from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loadgen.goodput import is_good, parse_slos
from loadgen.output_paths import output_file_problem

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


@dataclass
class Run:
    name: str
    folder: Path
    requests: list[dict]
    summary: dict
    series: dict[str, np.ndarray] = field(default_factory=dict)   # timeseries.csv columns
    metrics: dict[str, np.ndarray] = field(default_factory=dict)  # metrics.csv columns

    @property
    def finished(self) -> list[dict]:
        return [r for r in self.requests if r.get("finish_reason") in ("stop", "length")]


def _columns(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    return {key: np.asarray([float(r[key]) if r[key] not in ("", None) else math.nan for r in rows])
            for key in rows[0]}


def load_run(folder: Path, name: str | None = None) -> Run:
    requests_path = folder / "requests.jsonl"
    if not requests_path.is_file():
        raise ValueError(f"{folder}: not a run folder (no requests.jsonl)")
    with requests_path.open() as f:
        requests = [json.loads(line) for line in f if line.strip()]
    summary_path = folder / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return Run(name or folder.name, folder, requests, summary, _columns(folder / "timeseries.csv"),
               _columns(folder / "metrics.csv"))


# -- numbers -----------------------------------------------------------------------------------------------
def _values(run: Run, key: str) -> np.ndarray:
    if key == "itl":
        return np.asarray([g for r in run.finished for g in r.get("itl") or ()], dtype=float)
    return np.asarray([r[key] for r in run.finished if r.get(key) is not None], dtype=float)


def _duration(run: Run) -> float:
    if run.summary.get("duration"):
        return float(run.summary["duration"])
    ends = [r.get("finish_time") or r.get("arrival_time") or 0.0 for r in run.requests]
    return max(ends, default=0.0)


def _ms(values: np.ndarray, q: float | None = None) -> str:
    if not len(values):
        return "–"
    return f"{1000 * (values.mean() if q is None else np.percentile(values, q)):.1f}"


def summary_rows(runs: list[Run], slos: dict[str, float]) -> list[tuple[str, list[str]]]:
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, cell) -> None:
        rows.append((label, [cell(run) for run in runs]))

    row("driver", lambda r: r.summary.get("driver", "offline replay"))
    row("model / device", lambda r: " / ".join(str(x) for x in (r.summary.get("model"), r.summary.get("hardware"))
                                               if x))
    row("target", lambda r: f"{r.summary['target']} (x{r.summary.get('speedup', 1):g})" if "target" in r.summary
        else "in-process simulation")
    row("requests finished / sent", lambda r: f"{len(r.finished)} / {len(r.requests)}")
    if any(q.get("lora") for run in runs for q in run.requests):
        row("LoRA adapters: finished, TTFT mean (ms)", _adapters)
    row("failed or aborted", lambda r: str(sum(q.get("finish_reason") in ("error", "abort") for q in r.requests)))
    row("duration (s)", lambda r: f"{_duration(r):.1f}")
    row("throughput (req/s)", lambda r: f"{len(r.finished) / _duration(r):.2f}" if _duration(r) else "–")
    row("output tokens/s", lambda r: f"{sum(q.get('output_tokens') or 0 for q in r.finished) / _duration(r):.0f}"
        if _duration(r) else "–")
    for key, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2e", "E2E"), ("itl", "ITL")):
        for q, name in ((None, "mean"), (50, "p50"), (90, "p90"), (99, "p99")):
            row(f"{label} {name} (ms)", lambda r, key=key, q=q: _ms(_values(r, key), q))
    row("tokens per streamed chunk (ITL spans them)", _tokens_per_chunk)
    row("preemptions", lambda r: str((r.summary.get("preemptions") or {}).get("total", "–")))
    row("prefix-cache hit rate", lambda r: _hit_rate(r))
    if slos:
        label = ", ".join(f"{k} ≤ {1000 * v:g} ms" for k, v in slos.items())
        row(f"goodput ({label})", lambda r: _goodput_cell(r, slos))
    return rows


def _adapters(run: Run) -> str:
    """Each adapter a run's requests ran under (replay's `lora`), with its finished requests and mean TTFT."""
    names = list(dict.fromkeys(q["lora"] for q in run.requests if q.get("lora")))
    cells = []
    for name in names:
        ttft = np.asarray([q["ttft"] for q in run.finished if q.get("lora") == name and q.get("ttft") is not None])
        cells.append(f"{name}: {sum(q.get('lora') == name for q in run.finished)}, {_ms(ttft) if len(ttft) else '–'}")
    return "; ".join(cells) or "–"


def _tokens_per_chunk(run: Run) -> str:
    """Tokens per content chunk after the first (the server's --stream-interval, or coalescing when behind)."""
    pairs = [(r["output_tokens"] - 1, len(r["itl"])) for r in run.finished if r.get("itl")]
    if not pairs:
        return "–"
    return f"{sum(t for t, _ in pairs) / sum(c for _, c in pairs):.2f}"


def _hit_rate(run: Run) -> str:
    if "prefix_cache_hit_rate" in run.summary:
        return f"{100 * run.summary['prefix_cache_hit_rate']:.1f} %"
    cached = sum(r.get("cached_tokens") or 0 for r in run.requests)
    prompt = sum(r.get("input_tokens") or 0 for r in run.requests)
    if prompt and all(r.get("cached_tokens") is not None for r in run.requests):
        return f"{100 * cached / prompt:.1f} % of prompt tokens"
    return "–"


def _goodput_cell(run: Run, slos: dict[str, float]) -> str:
    good = sum(is_good(r, slos) for r in run.requests)
    duration = _duration(run)
    rate = f"{good / duration:.2f} req/s, " if duration else ""
    return f"{rate}{100 * good / max(len(run.requests), 1):.1f} % of requests"


# -- plots -------------------------------------------------------------------------------------------------
def _figure(ncols: int, height: float = 3.3):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, ncols, figsize=(4.6 * ncols, height), squeeze=False)
    return fig, axes[0]


def _png(fig) -> str:
    import matplotlib.pyplot as plt
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def plot_cdfs(runs: list[Run]) -> str | None:
    keys = [k for k in ("ttft", "tpot", "e2e", "itl") if any(len(_values(r, k)) for r in runs)]
    if not keys:
        return None
    fig, axes = _figure(len(keys))
    titles = {"ttft": "TTFT", "tpot": "TPOT", "e2e": "E2E latency", "itl": "inter-token latency"}
    for ax, key in zip(axes, keys):
        for run, color in zip(runs, COLORS):
            v = np.sort(_values(run, key)) * 1000
            if len(v):
                ax.plot(v, np.arange(1, len(v) + 1) / len(v), color=color, label=run.name)
        ax.set_title(f"{titles[key]} CDF")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests" if key != "itl" else "fraction of gaps")
        ax.grid(alpha=0.3)
        if key in ("e2e", "ttft") and any(len(_values(r, key)) for r in runs):
            ax.set_xscale("log")
    axes[0].legend(fontsize=8)
    return _png(fig)


def _bins(runs: list[Run]) -> np.ndarray:
    span = max(_duration(r) for r in runs) or 1.0
    width = max(span / 60, 1.0)
    return np.arange(0.0, span + width, width)


def _binned_percentile(times: np.ndarray, values: np.ndarray, edges: np.ndarray, q: float) -> np.ndarray:
    which = np.digitize(times, edges) - 1
    out = np.full(len(edges) - 1, math.nan)
    for i in range(len(edges) - 1):
        chosen = values[which == i]
        if len(chosen):
            out[i] = np.percentile(chosen, q)
    return out


def plot_over_time(runs: list[Run]) -> str:
    edges = _bins(runs)
    mids = (edges[:-1] + edges[1:]) / 2
    fig, axes = _figure(2)
    for ax, key, title in ((axes[0], "ttft", "TTFT"), (axes[1], "tpot", "TPOT")):
        for run, color in zip(runs, COLORS):
            rows = [r for r in run.finished if r.get(key) is not None]
            if not rows:
                continue
            times = np.asarray([r["arrival_time"] for r in rows])
            values = np.asarray([r[key] for r in rows]) * 1000
            for q, style in ((50, "-"), (99, "--")):
                ax.plot(mids, _binned_percentile(times, values, edges, q), style, color=color,
                        label=f"{run.name} p{q}")
        ax.set_title(f"{title} p50 (solid) and p99 (dashed) by arrival time")
        ax.set_xlabel("s")
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _png(fig)


def _smooth(t: np.ndarray, v: np.ndarray, edges: np.ndarray) -> np.ndarray:
    which = np.digitize(t, edges) - 1
    out = np.full(len(edges) - 1, math.nan)
    for i in range(len(edges) - 1):
        chosen = v[(which == i) & ~np.isnan(v)]
        if len(chosen):
            out[i] = chosen.mean()
    return out


def plot_throughput(runs: list[Run]) -> str | None:
    if not any(r.series for r in runs):
        return None
    edges = _bins(runs)
    mids = (edges[:-1] + edges[1:]) / 2
    fig, axes = _figure(2)
    for run, color in zip(runs, COLORS):
        s = run.series
        if not s:
            continue
        axes[0].plot(mids, _smooth(s["t"], s["gen_throughput"], edges), color=color, label=f"{run.name} output")
        axes[0].plot(mids, _smooth(s["t"], s["prompt_throughput"], edges), ":", color=color,
                     label=f"{run.name} prompt")
        axes[1].plot(mids, _smooth(s["t"], s["running"], edges), color=color, label=f"{run.name} running")
        if not np.all(np.isnan(s["waiting"])):
            axes[1].plot(mids, _smooth(s["t"], s["waiting"], edges), "--", color=color, label=f"{run.name} waiting")
    axes[0].set_title("throughput (tokens/s)")
    axes[1].set_title("requests running (solid) and waiting (dashed)")
    for ax in axes:
        ax.set_xlabel("s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _png(fig)


def plot_goodput(runs: list[Run], slos: dict[str, float]) -> str | None:
    if not slos:
        return None
    edges = _bins(runs)
    mids = (edges[:-1] + edges[1:]) / 2
    fig, axes = _figure(2)
    names, rates = [], []
    for run, color in zip(runs, COLORS):
        times = np.asarray([r["arrival_time"] for r in run.requests])
        good = np.asarray([is_good(r, slos) for r in run.requests], dtype=float)
        axes[0].plot(mids, 100 * _smooth(times, good, edges), color=color, label=run.name)
        names.append(run.name)
        rates.append(good.sum() / _duration(run) if _duration(run) else 0.0)
    axes[0].set_title("requests meeting every SLO (%), by arrival time")
    axes[0].set_xlabel("s")
    axes[0].set_ylim(-2, 102)
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].bar(names, rates, color=COLORS[:len(names)])
    axes[1].set_title("goodput (requests/s meeting every SLO)")
    axes[1].grid(alpha=0.3, axis="y")
    return _png(fig)


def _rate(t: np.ndarray, counter: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    dt = np.diff(t)
    return t[1:], np.where(dt > 0, np.diff(counter) / np.where(dt > 0, dt, 1), math.nan)


def plot_server(runs: list[Run]) -> str | None:
    panels = []
    if any("kv_cache_usage_perc" in r.metrics or "kv_cache_pct" in r.series for r in runs):
        panels.append("kv")
    if any("num_preemptions_total" in r.metrics for r in runs):
        panels.append("preemptions")
    if any("prefix_cache_queries_total" in r.metrics for r in runs):
        panels.append("prefix")
    power = sorted({k for r in runs for k in r.metrics if "power" in k})
    if power:
        panels.append("power")
    if not panels:
        return None
    fig, axes = _figure(len(panels))
    for ax, panel in zip(axes, panels):
        for run, color in zip(runs, COLORS):
            m = run.metrics
            if panel == "kv":
                if "kv_cache_usage_perc" in m:
                    ax.plot(m["t"], 100 * m["kv_cache_usage_perc"], color=color, label=run.name)
                elif "kv_cache_pct" in run.series:
                    ax.plot(run.series["t"], run.series["kv_cache_pct"], color=color, label=run.name)
                ax.set_title("KV-cache usage (%)")
            elif panel == "preemptions" and "num_preemptions_total" in m:
                ax.plot(*_rate(m["t"], m["num_preemptions_total"]), color=color, label=run.name)
                ax.set_title("preemptions per second")
            elif panel == "prefix" and "prefix_cache_queries_total" in m:
                t, queries = _rate(m["t"], m["prefix_cache_queries_total"])
                _, hits = _rate(m["t"], m["prefix_cache_hits_total"])
                with np.errstate(invalid="ignore", divide="ignore"):
                    ax.plot(t, 100 * np.where(queries > 0, hits / queries, math.nan), color=color, label=run.name)
                ax.set_title("prefix-cache hit rate (%) per sample")
            elif panel == "power":
                for key, style in zip(power, ("-", "--", ":")):
                    if key in m:
                        ax.plot(m["t"], m[key], style, color=color, label=f"{run.name} {key}")
                ax.set_title("power (W)")
        ax.set_xlabel("s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _png(fig)


# -- the page ---------------------------------------------------------------------------------------------------
STYLE = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1500px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:4px 10px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}img{max-width:100%}
.note{color:#666;font-size:13px}"""


def render(runs: list[Run], slos: dict[str, float]) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>vllm-emulator report</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>Load report: {html.escape(' vs '.join(r.name for r in runs))}</h1>",
             "<p class='note'>Times are in the trace's clock: an offline replay's virtual seconds, or an HTTP "
             "run's measured seconds multiplied by its speed-up. Percentiles over time are by arrival time.</p>",
             "<h2>Summary</h2><table><tr><th></th>"
             + "".join(f"<th>{html.escape(r.name)}</th>" for r in runs) + "</tr>"]
    for label, cells in summary_rows(runs, slos):
        parts.append(f"<tr><td>{html.escape(label)}</td>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells)
                     + "</tr>")
    parts.append("</table>")
    sections = (("Latency distributions", plot_cdfs(runs)), ("Latency over the run", plot_over_time(runs)),
                ("Throughput and queue", plot_throughput(runs)), ("Goodput", plot_goodput(runs, slos)),
                ("Server metrics", plot_server(runs)))
    for title, png in sections:
        if png:
            parts.append(f"<h2>{title}</h2><img alt='{title}' src='data:image/png;base64,{png}'>")
    parts.append("<p class='note'>Folders: " + ", ".join(html.escape(str(r.folder)) for r in runs) + "</p>")
    parts.append("</body></html>\n")
    return "".join(parts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (of `replay` or `loadgen`)")
    parser.add_argument("--output", "-o", type=Path, default=None, help="the HTML file (default: DIR/report.html "
                        "for one run, report.html for several)")
    parser.add_argument("--names", nargs="+", default=None, help="a label per run (default: the folder names)")
    parser.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                        help="SLOs, as vllm bench serve: ttft:200 tpot:50 e2el:3000 (default: the runs' own)")


def main(args: argparse.Namespace) -> int:
    try:
        if args.names is not None and len(args.names) != len(args.runs):
            raise ValueError(f"--names gives {len(args.names)} labels for {len(args.runs)} runs")
        runs = [load_run(folder, args.names[i] if args.names else None) for i, folder in enumerate(args.runs)]
        slos = parse_slos(args.goodput)
        if not slos:
            for run in runs:
                given = (run.summary.get("goodput") or {}).get("slo_ms")
                if given:
                    slos = {k: v / 1000 for k, v in given.items()}
                    break
        import matplotlib  # noqa: F401  (said here, before any work, when it is missing)
    except ImportError:
        print("error: the report needs matplotlib: pip install 'vllm-emulator[report]'", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    output = args.output or (args.runs[0] / "report.html" if len(runs) == 1 else Path("report.html"))
    problem = output_file_problem(output)
    if problem:  # before the plots are drawn
        print(f"error: {problem}", file=sys.stderr)
        return 2
    output.write_text(render(runs, slos))
    print(f"report of {len(runs)} run{'s' if len(runs) > 1 else ''} in {output}")
    return 0
