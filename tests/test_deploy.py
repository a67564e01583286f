"""deploy/ against the code it wraps: the image, compose stack, dashboard and chart must fit the server.

No Docker, Compose, Helm or Grafana is needed. The Helm chart is checked without Helm by
rendering its one interesting part, the container's arguments, from values.yaml the way
templates/deployment.yaml does (`chart_args` below mirrors it line for line), and comparing the
plain manifests in deploy/k8s/ with values.yaml; where `helm` is installed, the manifests must
also be exactly what `helm template` renders. Where Prometheus is installed, a slow test runs
every dashboard query against a live, scraped emulator.
"""
from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.parse
import urllib.request
from pathlib import Path

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from emulator.config import EngineArgs
from emulator.cluster import build_simulation
from profiles.deployment import build_deployment
from vllm_emulator.cli import COMMANDS, build_parser
from server.metrics import EngineMetrics
from server.testing import free_port, running_server, server_process

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "vllm-emulator"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "vllm-emulator.json"
SCRAPE_LABELS = {"job", "instance"}  # added by Prometheus to every series it scrapes


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def compose() -> dict:
    return load_yaml(DEPLOY / "compose.yaml")


def values() -> dict:
    return load_yaml(CHART / "values.yaml")


def chart() -> dict:
    return load_yaml(CHART / "Chart.yaml")


def manifests(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if doc]


def manifest(kind: str) -> dict:
    (found,) = [doc for doc in manifests("vllm-emulator.yaml") if doc["kind"] == kind]
    return found


def serve_default(name: str):
    return build_parser("serve").get_default(name)


# -- the emulator's real /metrics ------------------------------------------------------------------
def exported_series() -> dict[str, set[str]]:
    """Sample name -> label names, from a real deployment's /metrics exposition."""
    deployment = build_deployment("meta-llama/Llama-3.1-8B", "RTX4090", EngineArgs(max_model_len=8192))
    simulation = build_simulation(deployment)
    metrics = EngineMetrics("llama", deployment, deployment.config.data_parallel_size)
    metrics.attach(simulation)
    body, _ = metrics.render()
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


# -- a small PromQL reader: which metrics, matchers and grouping labels an expression uses ----------
TOKEN = re.compile(r'\s*(?:(?P<string>"(?:[^"\\]|\\.)*")|(?P<range>\[[^\]]*\])|(?P<matchers>\{[^}]*\})'
                   r'|(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)|(?P<number>\d+(?:\.\d+)?)|(?P<op>[-+*/^%(),<>=!~]+))')
MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?')
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
AGGREGATORS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
               "quantile", "limitk", "limit_ratio"}  # may be followed by `by (...)` rather than `(`
KEYWORDS = GROUPING | AGGREGATORS | {"bool", "and", "or", "unless", "offset"}


def read_promql(expr: str) -> tuple[list[tuple[str, dict[str, str]]], set[str]]:
    """The selectors (metric name, {label: matched value}) and the labels named in by/on/... clauses."""
    tokens = []
    position = 0
    while position < len(expr):
        match = TOKEN.match(expr, position)
        assert match and match.end() > position, f"cannot read {expr[position:]!r} in {expr!r}"
        tokens.append((match.lastgroup, match.group(match.lastgroup)))
        position = match.end()
    selectors, grouping = [], set()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else (None, None)
        if kind == "name" and text in GROUPING:
            if following == ("op", "("):  # a label list: by (le, model_name)
                end = next(j for j in range(i + 2, len(tokens)) if tokens[j][1] == ")")
                grouping.update(t for k, t in tokens[i + 2:end] if k == "name")
                i = end
        elif kind == "name" and text not in KEYWORDS and following != ("op", "("):
            matchers = {}
            if following[0] == "matchers":
                body = following[1][1:-1]
                for label, _, value in MATCHER.findall(body):
                    matchers[label] = value
                assert MATCHER.sub("", body).strip() == "", f"unread label matchers {body!r} in {expr!r}"
            selectors.append((text, matchers))
        i += 1
    return selectors, grouping


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every panel target."""
    board = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in board["panels"] for target in panel.get("targets", [])]


def variable_queries() -> list[tuple[str, str, str]]:
    """(variable, selector, label) of every label_values() template variable."""
    board = json.loads(DASHBOARD.read_text())
    out = []
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*([A-Za-z_]+)\)", variable["query"]["query"])
            assert match, variable["query"]
            out.append((variable["name"], match.group(1), match.group(2)))
    return out


def test_promql_reader_finds_metrics_matchers_and_grouping_labels():
    selectors, grouping = read_promql(
        'histogram_quantile(0.9, sum by (le, model_name) (rate(vllm:ttft_bucket{engine=~"$engine"}[$__rate_interval])))'
        ' / on (model_name) group_left max by (model_name) (vllm_emulator:speed)')
    assert selectors == [("vllm:ttft_bucket", {"engine": "$engine"}), ("vllm_emulator:speed", {})]
    assert grouping == {"le", "model_name"}


# -- every file parses ---------------------------------------------------------------------------
def test_every_yaml_and_json_file_in_deploy_parses():
    templates = CHART / "templates"
    files = [p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml", ".json") and templates not in p.parents]
    assert len(files) >= 9
    for path in files:
        if path.suffix == ".json":
            assert isinstance(json.loads(path.read_text()), dict), path
        else:
            documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
            assert documents and all(isinstance(d, dict) for d in documents), path


# -- the image ------------------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [tuple(line.split(None, 1)) for line in lines]


def test_dockerfile_runs_the_serve_command_as_a_non_root_user_on_the_cli_port():
    instructions = dockerfile_instructions()
    final_stage = instructions[max(i for i, (op, _) in enumerate(instructions) if op == "FROM"):]
    last = {op: arg for op, arg in final_stage}
    assert last["FROM"] == "python:3.11-slim"
    program, command = json.loads(last["ENTRYPOINT"])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[program] == "vllm_emulator.cli:main" and command in COMMANDS
    port = serve_default("port")
    assert last["EXPOSE"] == str(port) == "8000"
    assert f"http://127.0.0.1:{port}/health" in last["HEALTHCHECK"]
    assert last["USER"] not in ("root", "0")


def test_dockerfile_copies_every_package_pyproject_ships_and_the_ignore_file_lets_them_in():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {source for op, arg in dockerfile_instructions() if op == "COPY" and not arg.startswith("--from")
              for source in arg.split()[:-1]}
    assert packages | {"pyproject.toml", pyproject["project"]["readme"]} <= copied
    allowed = {line[1:].rstrip("/") for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")}
    assert copied <= allowed


# -- compose, Prometheus, Grafana -----------------------------------------------------------------
def test_compose_runs_the_image_built_from_the_dockerfile_on_the_cli_port():
    emulator = compose()["services"]["emulator"]
    build = emulator["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    args = build_parser("serve").parse_args(emulator["command"])
    assert f"8000:{args.port}" in emulator["ports"]


def test_prometheus_scrapes_the_compose_emulator_service_every_5_seconds():
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    (job,) = config["scrape_configs"]
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    port = build_parser("serve").parse_args(compose()["services"]["emulator"]["command"]).port
    assert targets == [f"emulator:{port}"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert config["global"]["scrape_interval"] == "5s"
    mounted = [v.split(":") for v in compose()["services"]["prometheus"]["volumes"]]
    assert ["./prometheus/prometheus.yml", "/etc/prometheus/prometheus.yml", "ro"] in mounted


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_prometheus_config():
    result = subprocess.run(["promtool", "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                            check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisions_the_compose_prometheus_and_the_dashboard_folder():
    services = compose()["services"]
    (source,) = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert "9090:9090" in services["prometheus"]["ports"]
    # container path -> host path, from "./host:/container:ro"
    mounts = {container: (DEPLOY / host).resolve()
              for host, container, _ in (v.split(":") for v in services["grafana"]["volumes"])}
    (provider,) = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "vllm-emulator.yml")["providers"]
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent
    assert mounts["/etc/grafana/provisioning"] == DEPLOY / "grafana" / "provisioning"


# -- the dashboard --------------------------------------------------------------------------------
def test_dashboard_is_what_make_dashboard_writes():
    sys.path.insert(0, str(DEPLOY / "grafana"))
    try:
        import make_dashboard
    finally:
        sys.path.remove(str(DEPLOY / "grafana"))
    assert DASHBOARD.read_text() == make_dashboard.render(), "run deploy/grafana/make_dashboard.py"


def test_dashboard_panels_have_unique_ids_the_datasource_variable_and_no_overlap():
    board = json.loads(DASHBOARD.read_text())
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for panel in panels:
        grid = panel["gridPos"]
        area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not area & cells, panel["title"]
        cells |= area
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"], panel["title"]
    assert [v["name"] for v in board["templating"]["list"]] == ["datasource", "model_name", "engine"]


def test_dashboard_shows_the_panels_an_sre_expects_from_vllm():
    used = {name for _, expr in dashboard_queries() for name, _ in read_promql(expr)[0]}
    for metric in ("vllm:e2e_request_latency_seconds_bucket", "vllm:time_to_first_token_seconds_bucket",
                   "vllm:inter_token_latency_seconds_bucket", "vllm:prompt_tokens_total",
                   "vllm:generation_tokens_total", "vllm:num_requests_running", "vllm:num_requests_waiting",
                   "vllm:kv_cache_usage_perc", "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total",
                   "vllm:num_preemptions_total", "vllm:request_success_total", "vllm:request_prompt_tokens_bucket",
                   "vllm:request_generation_tokens_bucket", "vllm:request_queue_time_seconds_bucket",
                   "vllm_emulator:simulated_time_seconds", "vllm_emulator:speed", "vllm_emulator:engine_steps_total"):
        assert metric in used, metric


def test_dashboard_queries_use_only_metrics_and_labels_the_emulator_exports():
    series = exported_series()
    queries = dashboard_queries() + [(f"variable {name}", selector) for name, selector, _ in variable_queries()]
    for title, expr in queries:
        selectors, grouping = read_promql(expr)
        assert selectors, (title, expr)
        known_labels = SCRAPE_LABELS.copy()
        for name, matchers in selectors:
            assert name in series, f"{title}: {name} is not on the emulator's /metrics"
            assert set(matchers) <= series[name], f"{title}: {name} has no label {set(matchers) - series[name]}"
            known_labels |= series[name]
        assert grouping <= known_labels, f"{title}: grouping by unknown labels {grouping - known_labels}"
        for name, _ in selectors:
            if "quantile" in expr and name.endswith("_bucket"):
                assert f"rate({name}" in expr, f"{title}: histogram_quantile over a non-rate of {name}"
    for name, selector, label in variable_queries():
        assert label in series[read_promql(selector)[0][0][0]], name


def test_every_dashboard_query_is_filtered_by_model_name_and_engine():
    series = exported_series()
    for title, expr in dashboard_queries():
        for name, matchers in read_promql(expr)[0]:
            assert matchers.get("model_name") == "$model_name", f"{title}: {name} is not filtered by model_name"
            if "engine" in series[name]:
                assert matchers.get("engine") == "$engine", f"{title}: {name} is not filtered by engine"


# -- the Helm chart and the plain manifests --------------------------------------------------------
def test_chart_templates_use_only_values_that_exist_and_every_value_is_used():
    defaults = values()
    used = set()
    for template in (CHART / "templates").iterdir():
        for path in re.findall(r"\.Values\.([A-Za-z0-9_.]+)", template.read_text()):
            node = defaults
            for key in path.split("."):
                assert isinstance(node, dict) and key in node, f"{template.name}: .Values.{path} is not in values.yaml"
                node = node[key]
            used.add(path.split(".")[0])
    assert used == set(defaults), f"values no template uses: {set(defaults) - used}"


def chart_args(values: dict) -> list[str]:
    """The container's args as templates/deployment.yaml builds them from `values`."""
    args = [values["model"], "--hardware", values["hardware"], "--speed", str(values["speed"]),
            "--port", str(int(values["port"]))]
    if values["servedModelName"]:
        args += ["--served-model-name", values["servedModelName"]]
    if values["maxModelLen"]:  # a number, or a string the CLI reads ("auto", "32k")
        length = values["maxModelLen"]
        args += ["--max-model-len", length if isinstance(length, str) else str(int(length))]
    args += ["--tensor-parallel-size", str(int(values["tensorParallelSize"])),
             "--data-parallel-size", str(int(values["dataParallelSize"]))]
    return args + [str(a) for a in values["extraArgs"]]


def test_chart_args_template_matches_the_mirror_used_here():
    """chart_args() must follow templates/deployment.yaml: the flags appear in the same order."""
    template = (CHART / "templates" / "deployment.yaml").read_text()
    flags = re.findall(r"^\s*- (--[a-z-]+)$", template, flags=re.MULTILINE)
    every_option = {**values(), "servedModelName": "x", "maxModelLen": 4096}
    mirrored = [a for a in chart_args(every_option) if a.startswith("--")]
    assert flags == mirrored


def test_k8s_manifests_match_the_chart_defaults():
    defaults, app_version = values(), chart()["appVersion"]
    deployment, service = manifest("Deployment"), manifest("Service")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert deployment["spec"]["replicas"] == defaults["replicaCount"]
    assert container["image"] == f"{defaults['image']['repository']}:{defaults['image']['tag'] or app_version}"
    assert container["args"] == chart_args(defaults)
    assert container["ports"] == [{"name": "http", "containerPort": defaults["port"], "protocol": "TCP"}]
    assert container["readinessProbe"] == defaults["readinessProbe"]
    assert container["livenessProbe"] == defaults["livenessProbe"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["resources"] == defaults["resources"]
    assert container["securityContext"] == defaults["securityContext"]
    assert pod["spec"]["securityContext"] == defaults["podSecurityContext"]
    assert pod["metadata"]["annotations"] == defaults["podAnnotations"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(defaults["port"])
    assert service["spec"]["ports"][0]["port"] == defaults["service"]["port"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert set(service["spec"]["selector"].items()) <= set(pod["metadata"]["labels"].items())
    (monitor,) = manifests("servicemonitor.yaml")
    assert monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics",
                                             "interval": defaults["serviceMonitor"]["interval"]}]


@pytest.mark.skipif(shutil.which("helm") is None, reason="helm is not installed")
def test_k8s_manifests_are_what_helm_renders_for_the_default_values(tmp_path):
    target = tmp_path / "k8s"
    shutil.copytree(DEPLOY / "k8s", target)
    shutil.copytree(CHART, tmp_path / "helm" / "vllm-emulator")
    subprocess.run(["sh", str(target / "generate.sh")], check=True, capture_output=True)
    for name in ("vllm-emulator.yaml", "servicemonitor.yaml"):
        assert (target / name).read_text() == (DEPLOY / "k8s" / name).read_text(), \
            f"run deploy/k8s/generate.sh ({name})"


@pytest.mark.skipif(shutil.which("helm") is None, reason="helm is not installed")
@pytest.mark.parametrize("max_model_len", [1048576, "auto"])  # "auto" must reach the CLI as it is, not as 0
def test_helm_renders_values_into_the_args_the_mirror_predicts(max_model_len):
    overrides = {"servedModelName": "llama", "maxModelLen": max_model_len, "speed": 2.5, "dataParallelSize": 2,
                 "extraArgs": ["--max-num-seqs", "128"]}
    command = ["helm", "template", "t", str(CHART), "--show-only", "templates/deployment.yaml"]
    for key, value in overrides.items():
        command += ["--set-json", f"{key}={json.dumps(value)}"]
    rendered = yaml.safe_load(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    assert rendered["spec"]["template"]["spec"]["containers"][0]["args"] == chart_args({**values(), **overrides})


def test_compose_chart_and_manifest_arguments_start_a_server_that_answers_health():
    (container,) = manifest("Deployment")["spec"]["template"]["spec"]["containers"]
    argvs = {"compose": compose()["services"]["emulator"]["command"], "k8s": container["args"]}

    async def health(argv: list[str]) -> int:
        # the port flag names the container's port; the test server listens on a free one
        argv = [a for i, a in enumerate(argv) if a != "--port" and (i == 0 or argv[i - 1] != "--port")]
        async with running_server(*argv) as server, aiohttp.ClientSession() as http:
            async with http.get(server.url + "/health") as response:
                return response.status

    for where, argv in argvs.items():
        assert asyncio.run(health(argv)) == 200, where


# -- live: Prometheus scrapes an emulator under load and answers every dashboard query --------------
def http_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus is not installed")
def test_dashboard_queries_answer_from_a_prometheus_scraping_a_loaded_emulator(tmp_path):
    with server_process("--speed", "20") as url:
        prometheus_port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s"},
            "scrape_configs": [{"job_name": "vllm-emulator", "static_configs": [{"targets": [url.split("//")[1]]}]}]}))
        prometheus = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{prometheus_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        api = f"http://127.0.0.1:{prometheus_port}/api/v1/query?query="
        try:
            # 20 s of wall time at speed 20: 400 simulated seconds at 2 requests per simulated second
            traffic = subprocess.run([sys.executable, str(DEPLOY / "traffic.py"), "--url", url, "--rate", "40",
                                      "--duration", "20", "--report-every", "100"],
                                     check=False, capture_output=True, text=True, timeout=120)
            assert traffic.returncode == 0, traffic.stdout + traffic.stderr
            time.sleep(2)  # a last scrape after the final requests finished
            variables = {"$model_name": ".*", "$engine": ".*", "$__rate_interval": "30s"}
            results = {}
            for title, expr in dashboard_queries():
                for variable, value in variables.items():
                    expr = expr.replace(variable, value)
                answer = http_json(api + urllib.parse.quote(expr))
                assert answer["status"] == "success", (title, expr, answer)
                assert answer["data"]["result"], f"{title}: no data for {expr}"
                results[expr] = [float(r["value"][1]) for r in answer["data"]["result"]]
        finally:
            prometheus.terminate()
            prometheus.wait(timeout=30)
    generation = next(v for e, v in results.items() if "vllm:generation_tokens_total" in e)
    assert 0 < generation[0] < 1e5  # tokens per simulated second of one RTX 4090
    speed = next(v for e, v in results.items() if e.startswith("vllm_emulator:speed"))
    assert speed == [20.0]
    hit_rate = next(v for e, v in results.items() if "prefix_cache_hits" in e)
    assert 0 < hit_rate[0] <= 1  # the demo traffic shares system prompts
