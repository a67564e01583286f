"""Writes dashboards/vllm-emulator.json, the Grafana dashboard for the emulator's /metrics.

    python deploy/grafana/make_dashboard.py        (after editing a panel below)

The panels are those an SRE reads on vLLM's own dashboard (latency percentiles, token
throughput, scheduler state, KV cache, prefix cache, preemptions, finish reasons, request
lengths, queue time), plus a row for the emulator itself. Every query is filtered by the
`model_name` and `engine` variables (the emulator-only clock series carry `model_name` alone).

Time: latencies are histograms of virtual durations, so their percentiles are what the
simulated device would show at any `--speed`. Counter rates are per wall-clock second, which
at `--speed X` is X simulated seconds; the throughput panels divide by `vllm_emulator:speed`
so they too read per simulated second (at `--speed 1`, the same as vLLM's dashboard).
The JSON is checked in; tests/test_deploy.py fails when it differs from this script's output.
"""
from __future__ import annotations

import json
from pathlib import Path

OUTPUT = Path(__file__).resolve().parent / "dashboards" / "vllm-emulator.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
ENGINE = 'model_name=~"$model_name", engine=~"$engine"'
MODEL = 'model_name=~"$model_name"'
# per simulated second: a rate per wall second over the speed of the same model's server
PER_SIM_SECOND = f" / on (model_name) group_left max by (model_name) (vllm_emulator:speed{{{MODEL}}})"
QUANTILES = (("P50", 0.5), ("P90", 0.9), ("P99", 0.99))


def quantiles(histogram: str) -> list[tuple[str, str]]:
    """P50/P90/P99 and the mean of a histogram, per model (all selected engines pooled)."""
    rate = f"rate({histogram}_bucket{{{ENGINE}}}[$__rate_interval])"
    targets = [(f"{label} {{{{model_name}}}}", f"histogram_quantile({q}, sum by (le, model_name) ({rate}))")
               for label, q in QUANTILES]
    mean = (f"sum by (model_name) (rate({histogram}_sum{{{ENGINE}}}[$__rate_interval]))"
            f" / sum by (model_name) (rate({histogram}_count{{{ENGINE}}}[$__rate_interval]))")
    return targets + [("mean {{model_name}}", mean)]


def per_sim_second(counter: str, by: str = "model_name", extra: str = "") -> str:
    selector = f"{ENGINE}, {extra}" if extra else ENGINE
    return f"sum by ({by}) (rate({counter}{{{selector}}}[$__rate_interval])){PER_SIM_SECOND}"


def timeseries(title: str, description: str, targets: list[tuple[str, str]], unit: str,
               stack: bool = False) -> dict:
    custom = {"lineWidth": 1, "fillOpacity": 25 if stack else 10, "showPoints": "never",
              "stacking": {"mode": "normal" if stack else "none", "group": "A"}}
    return {
        "type": "timeseries", "title": title, "description": description, "datasource": DATASOURCE,
        "fieldConfig": {"defaults": {"unit": unit, "min": 0, "custom": custom}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom",
                               "calcs": ["mean", "max", "lastNotNull"]},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend,
                     "range": True} for i, (legend, expr) in enumerate(targets)],
    }


def heatmap(title: str, description: str, histogram: str) -> dict:
    expr = f"sum by (le) (increase({histogram}_bucket{{{ENGINE}}}[$__rate_interval]))"
    return {
        "type": "heatmap", "title": title, "description": description, "datasource": DATASOURCE,
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {"calculate": False, "cellGap": 1, "yAxis": {"unit": "short", "axisLabel": "tokens"},
                    "rowsFrame": {"layout": "le"}, "color": {"mode": "scheme", "scheme": "Spectral", "steps": 64},
                    "tooltip": {"mode": "single", "yHistogram": True}, "legend": {"show": True}},
        "targets": [{"refId": "A", "datasource": DATASOURCE, "expr": expr, "format": "heatmap",
                     "legendFormat": "{{le}}", "range": True}],
    }


def stat(title: str, description: str, expr: str, legend: str, unit: str) -> dict:
    return {
        "type": "stat", "title": title, "description": description, "datasource": DATASOURCE,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value", "graphMode": "area", "textMode": "value_and_name"},
        "targets": [{"refId": "A", "datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "instant": False,
                     "range": True}],
    }


ROWS: list[tuple[str, list[dict]]] = [
    ("Latency", [
        timeseries("E2E request latency", "From arrival to the last token, per finished request (virtual seconds).",
                   quantiles("vllm:e2e_request_latency_seconds"), "s"),
        timeseries("Time to first token", "From arrival to the first output token (virtual seconds).",
                   quantiles("vllm:time_to_first_token_seconds"), "s"),
        timeseries("Inter-token latency", "Time between two output tokens of a request (virtual seconds).",
                   quantiles("vllm:inter_token_latency_seconds"), "s"),
        timeseries("Queue time", "Time a request spent waiting before it was first scheduled.",
                   quantiles("vllm:request_queue_time_seconds"), "s"),
        timeseries("Prefill and decode time", "Per request: from first scheduled to first token (prefill) "
                   "and from first to last token (decode). P50 and P99.",
                   [(f"{phase} {label} {{{{model_name}}}}",
                     f"histogram_quantile({q}, sum by (le, model_name) "
                     f"(rate(vllm:request_{phase}_time_seconds_bucket{{{ENGINE}}}[$__rate_interval])))")
                    for phase in ("prefill", "decode") for label, q in (("P50", 0.5), ("P99", 0.99))], "s"),
        timeseries("Time per output token", "Per request: decode time over output tokens after the first.",
                   quantiles("vllm:request_time_per_output_token_seconds"), "s"),
    ]),
    ("Throughput", [
        timeseries("Token throughput", "Prompt tokens computed or served from the prefix cache, and generated "
                   "tokens, per simulated second.",
                   [("prompt {{model_name}}", per_sim_second("vllm:prompt_tokens_total")),
                    ("generation {{model_name}}", per_sim_second("vllm:generation_tokens_total"))],
                   "short"),
        timeseries("Finished requests by reason", "Requests finished per simulated second, by finish reason "
                   "(stop, length, abort, error).",
                   [("{{finished_reason}}",
                     per_sim_second("vllm:request_success_total", "model_name, finished_reason"))],
                   "reqps", stack=True),
        timeseries("Tokens per engine step", "Prompt tokens computed plus tokens generated in one engine step.",
                   quantiles("vllm:iteration_tokens_total"), "short"),
    ]),
    ("Scheduler and KV cache", [
        timeseries("Scheduler state", "Requests in the running batch and in the waiting queue, per engine.",
                   [("running {{instance}} engine {{engine}}", f"vllm:num_requests_running{{{ENGINE}}}"),
                    ("waiting {{instance}} engine {{engine}}", f"vllm:num_requests_waiting{{{ENGINE}}}")],
                   "short"),
        timeseries("KV cache usage", "Fraction of the engine's KV blocks in use.",
                   [("{{instance}} engine {{engine}}", f"vllm:kv_cache_usage_perc{{{ENGINE}}}")], "percentunit"),
        timeseries("Prefix cache hit rate", "Prompt tokens found in the prefix cache over prompt tokens looked up.",
                   [("{{model_name}}",
                     f"sum by (model_name) (rate(vllm:prefix_cache_hits_total{{{ENGINE}}}[$__rate_interval]))"
                     f" / sum by (model_name) (rate(vllm:prefix_cache_queries_total{{{ENGINE}}}[$__rate_interval]))")],
                   "percentunit"),
        timeseries("Preemptions", "Requests preempted (their KV blocks freed, to be recomputed), per simulated second.",
                   [("{{model_name}}", per_sim_second("vllm:num_preemptions_total"))], "short"),
    ]),
    ("Request lengths", [
        heatmap("Prompt length", "Prompt tokens of finished requests.", "vllm:request_prompt_tokens"),
        heatmap("Generation length", "Output tokens of finished requests.", "vllm:request_generation_tokens"),
        timeseries("Prompt and generation length quantiles", "P50 and P99 of prompt and output tokens per request.",
                   [(f"{kind} {label} {{{{model_name}}}}",
                     f"histogram_quantile({q}, sum by (le, model_name) "
                     f"(rate(vllm:request_{kind}_tokens_bucket{{{ENGINE}}}[$__rate_interval])))")
                    for kind in ("prompt", "generation") for label, q in (("P50", 0.5), ("P99", 0.99))], "short"),
    ]),
    ("Emulator", [
        stat("Simulated time", "Virtual seconds since the server started.",
             f"vllm_emulator:simulated_time_seconds{{{MODEL}}}", "{{instance}}", "s"),
        stat("Speed", "Virtual seconds simulated per wall-clock second (--speed).",
             f"vllm_emulator:speed{{{MODEL}}}", "{{instance}}", "suffix:x"),
        timeseries("Engine steps", "Engine steps per simulated second, per engine.",
                   [("{{instance}} engine {{engine}}",
                     per_sim_second("vllm_emulator:engine_steps_total", "model_name, instance, engine"))], "short"),
        timeseries("Engine busy", "Fraction of simulated time the engine spent executing steps (GPU busy).",
                   [("{{instance}} engine {{engine}}",
                     per_sim_second("vllm_emulator:engine_busy_seconds_total", "model_name, instance, engine"))],
                   "percentunit"),
        timeseries("Mean step duration", "Simulated duration of one engine step, per engine.",
                   [("{{instance}} engine {{engine}}",
                     f"sum by (instance, engine) "
                     f"(rate(vllm_emulator:engine_busy_seconds_total{{{ENGINE}}}[$__rate_interval]))"
                     f" / sum by (instance, engine) "
                     f"(rate(vllm_emulator:engine_steps_total{{{ENGINE}}}[$__rate_interval]))")],
                   "s"),
    ]),
]


def variable(name: str, label: str, query: str) -> dict:
    return {"name": name, "label": label, "type": "query", "datasource": DATASOURCE,
            "query": {"query": query, "refId": name}, "definition": query, "refresh": 2, "sort": 1,
            "multi": True, "includeAll": True, "allValue": ".*", "current": {}, "hide": 0}


def dashboard() -> dict:
    panels, y, next_id = [], 0, 1
    for title, row_panels in ROWS:
        panels.append({"type": "row", "title": title, "id": next_id, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        next_id, y = next_id + 1, y + 1
        stats = [p for p in row_panels if p["type"] == "stat"]
        graphs = [p for p in row_panels if p["type"] != "stat"]
        for i, panel in enumerate(stats):  # small tiles side by side, graphs after them
            panel.update(id=next_id, gridPos={"h": 4, "w": 6, "x": 6 * i, "y": y})
            next_id += 1
        y += 4 if stats else 0
        for i, panel in enumerate(graphs):  # two per line
            panel.update(id=next_id, gridPos={"h": 8, "w": 12, "x": 12 * (i % 2), "y": y + 8 * (i // 2)})
            next_id += 1
        y += 8 * -(-len(graphs) // 2)
        panels.extend(stats + graphs)
    return {
        "title": "vLLM emulator", "uid": "vllm-emulator", "tags": ["vllm", "vllm-emulator"],
        "description": "vLLM's serving metrics from vllm-emulator, in simulated time.",
        "editable": True, "graphTooltip": 1, "schemaVersion": 39, "version": 1, "refresh": "5s",
        "time": {"from": "now-15m", "to": "now"}, "timezone": "browser",
        "annotations": {"list": []}, "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1},
            variable("model_name", "Model", "label_values(vllm:num_requests_running, model_name)"),
            variable("engine", "Engine", f"label_values(vllm:num_requests_running{{{MODEL}}}, engine)"),
        ]},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}")
