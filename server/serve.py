"""Serve vLLM's OpenAI-compatible API over the simulated engine, where `vllm serve` stood.

    vllm-emulator serve [MODEL] [vllm serve flags] [--hardware HW] [--speed X] [--tokenizer DIR]

With no arguments it serves the embedded default (Llama-3.1-8B on an H100) on
port 8000: no downloads, no GPU. vLLM's engine flags shape the simulated engine with
vLLM's defaults for the simulated device; its front-end flags (served names, API
key, usage and request-id switches, ...) shape the responses; the model's generation config
(`--generation-config`, `--override-generation-config`) gives its requests' default sampling parameters,
as vLLM's (server/generation_config.py); every other `vllm serve` flag is accepted and listed once at
start-up as not simulated.

Emulator flags: --hardware (the simulated device), --speed (virtual seconds per wall
second: 1 looks like the real hardware, 60 replays an hour in a minute), --tokenizer
(default: the model family's, shipped: Qwen's for Qwen2/Qwen3 models, Llama 3's for the others;
DIR: a local Hugging Face tokenizer, so prompt token counts match another model's; `builtin`: a fast
approximate one), --request-log FILE (one line per finished request, in the schema of replay's
requests.jsonl), --step-log FILE (one line per engine step, as replay writes it, plus the requests
that got a token), --port-per-engine (with --data-parallel-size N, engine i also answers alone on port
PORT+1+i, like N pods).

Logs as vLLM's (server/vllm_logging.py): its lines on stdout, uvicorn's server lines on stderr and its access
lines on stdout, with vLLM's logging flags and VLLM_LOGGING_* variables. Every port is bound before anything
starts: one that is taken ends the start with one line naming it (exit 1).

Help, as vLLM's: `--help=all` shows every flag, also the vLLM flags that change nothing here;
`--help=<group>` one group (emulator, or vLLM's: ModelConfig, Frontend, SchedulerConfig, ...);
`--help=<keyword>` the flags whose names hold it (e.g. --help=prefix).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import hashlib
import ipaddress
import json
import logging
import math
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from emulator.cluster import ClusterSpec, build_cluster, build_simulation
from emulator.deployment import Deployment
from emulator.dp_balancer import POLICIES as DP_POLICIES
from emulator.engine_flags import (add_engine_args, engine_args_from, explicit_engine_args, performance_mode_line,
                                   unsimulated_values)
from emulator.power import nodes_power
from emulator.step_log import StepLog
from profiles.cluster_file import MAX_PORT, cluster_startup_lines, read_cluster_file
from profiles.deployment import build_deployment
from profiles.tokenizer import Tokenizer, load_tokenizers
from server.app import VLLM_VERSION, build_app
from server.openapi import DOCUMENTATION, EMULATOR_ROUTES
from server.connector_metrics import ConnectorMetrics
from server.engine_client import EngineClient, request_id_randomization
from server.generation import OutputPlanner
from server.generation_config import SamplingDefaults, overridden_warning, sampling_defaults
from server.harmony import harmony_tokens, parser_error
from server.kv_read_notice import KVReadNotices
from server.kv_events import KVEventPublishers, parse_kv_events_config, start_kv_event_publishers
from server.metrics import EngineMetrics
from server.periodic_log import PeriodicLogger, interval as stats_interval
from server.power_metrics import PowerMetrics
from server.request_body import BodyDecoder
from server.reasoning import REASONING_FORMATS, parser_name, warn_unsimulated
from server.serving import SIMULATED_VLLM_FLAGS, FrontendOptions, Serving, frontend_switches
from server import vllm_argv, vllm_logging
from server.vllm_logging import LOG_LEVELS, UVICORN_LOG_LEVELS
from server.vllm_flags import (UNSUPPORTED_PREFIX, VLLM_SERVE_FLAGS, add_remaining_vllm_flags,
                               unsupported_flags_used)

# The embedded default: Llama-3.1-8B on an H100, priced from its measured operator tables.
DEFAULT_MODEL = "meta-llama/Llama-3.1-8B"
DEFAULT_HARDWARE = "H100"
# Flags of one deployment that a cluster file sets for itself, and where it does
CLUSTER_SETS = {"routing": ("--routing", "its `routing` (and each instance's `dp_routing`)"),
                "served_model_name": ("--served-model-name", "each instance's `served_model_name`"),
                "port_per_engine": ("--port-per-engine", "each instance's `port`")}

log = logging.getLogger("vllm_emulator.serve")
model_config_log = logging.getLogger("vllm.config.model")  # vLLM's ModelConfig logger (generation config)
vllm_config_log = logging.getLogger("vllm.config.vllm")  # vLLM's VllmConfig logger (--performance-mode)
uvicorn_log = logging.getLogger(vllm_logging.SERVER)  # uvicorn's server lines (startup, shutdown)
# vLLM flags outside the front end's set that serve reads itself (reasoning_settings)
SERVE_READS = frozenset({"--reasoning-config"})
# vLLM's ReasoningConfig fields (vllm/config/reasoning.py)
REASONING_FIELDS = ("reasoning_parser", "reasoning_start_str", "reasoning_end_str")
# vLLM's warning where a reasoning config has no strings to find the reasoning by (config/vllm.py __post_init__)
REASONING_IDS_FAILED = ("Auto-initialization of reasoning token IDs failed. Please check whether your reasoning "
                        "parser has implemented the `reasoning_start_str` and `reasoning_end_str`.")
# serve's own flags (dests), not vLLM's: left out of vLLM's "non-default args" line (vLLM's --tokenizer is a
# tokenizer to load, serve's picks a shipped one)
EMULATOR_DESTS = frozenset({"hardware", "speed", "tokenizer", "request_log", "step_log", "port_per_engine", "cluster",
                            "routing", "compile_cache", "cost_model"})
# vLLM's flags of its logging that serve reads here (server/vllm_logging.py), besides its own
LOGGING_FLAGS = frozenset({"--logging-config", "--log-config-file", "--disable-access-log-for-endpoints"})
# Accepted flags that are not simulated but would change what a client measures under vLLM: the weights and
# kernels (speed, memory), speculative decoding, CUDA graphs and compilation, scheduling, offloading, and the
# transport (TLS, a Unix socket, gRPC, HTTP limits). Start-up warns of them apart from the harmless others.
RESULT_CHANGING_FLAGS = frozenset({
    "--quantization", "--quantization-config", "--dtype", "--allow-deprecated-quantization", "--hf-overrides",
    "--speculative-config", "--spec-method", "--spec-model", "--spec-tokens",
    "--compilation-config", "--cudagraph-capture-sizes", "--max-cudagraph-capture-size", "--attention-backend",
    "--attention-config", "--kernel-config", "--linear-backend", "--ir-op-priority", "--monokernel",
    "--enable-flashinfer-autotune", "--disable-cascade-attn", "--enable-dbo", "--ubatch-size",
    "--dbo-decode-token-threshold", "--dbo-prefill-token-threshold", "--all2all-backend", "--enable-eplb",
    "--eplb-config", "--disable-custom-all-reduce", "--decode-context-parallel-size",
    "--prefill-context-parallel-size", "--max-num-scheduled-tokens", "--max-num-active-seqs",
    "--long-prefill-token-threshold-adaptive", "--prefill-schedule-interval", "--scheduler-cls",
    "--kv-cache-dtype-skip-layers", "--kv-sharing-fast-prefill",
    "--cpu-offload-gb", "--cpu-offload-params", "--offload-backend", "--offload-group-size",
    "--offload-num-in-group", "--offload-params", "--offload-prefetch-step", "--enable-sleep-mode",
    "--api-server-count", "--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certs", "--ssl-cert-reqs", "--ssl-ciphers",
    "--enable-ssl-refresh", "--uds", "--grpc", "--grpc-port", "--root-path", "--h11-max-header-count",
    "--h11-max-incomplete-event-size", "--headless", "--middleware"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = "vllm-emulator serve [model_tag] [options]"  # vLLM's: the flags are too many to list
    parser.add_argument("model_tag", nargs="?", default=None, help=f"model to serve (default: {DEFAULT_MODEL})")
    parser.add_argument("--model", default=None, help="the same as the positional MODEL")
    emu = parser.add_argument_group("emulator")
    emu.add_argument("--hardware", default=None,
                     help=f"simulated device (`vllm-emulator hardware list`; default {DEFAULT_HARDWARE})")
    emu.add_argument("--speed", type=_positive_float, default=1.0,
                     help="virtual seconds per wall second (default 1: real time)")
    emu.add_argument("--tokenizer", default=None, metavar="DIR|MODEL_ID|builtin",
                     help="prompt tokenizer: the model family's, shipped (default: Qwen's for Qwen2 and Qwen3 models, "
                          "Llama 3's for every other); a local Hugging Face tokenizer directory "
                          "(no hub access); a Hugging Face model id of a family whose tokenizer ships "
                          "(meta-llama/Llama-3.1-8B-Instruct, Qwen/Qwen3-8B, ...: that one, no download); "
                          "or `builtin` (fast, ~3 characters a token)")
    emu.add_argument("--request-log", default=None, help="write one JSON line per finished request")
    emu.add_argument("--step-log", default=None, help="write one JSON line per engine step")
    emu.add_argument("--port-per-engine", action="store_true",
                     help="with data parallelism, also serve engine i alone on port PORT+1+i")
    emu.add_argument("--cluster", default=None, metavar="FILE",
                     help="serve a whole cluster (deploy/clusters/README.md, or LLMServingSim's cluster config JSON): "
                          "every model on this port, each instance with a port of its own also there; the engine "
                          "flags given here are every instance's defaults")
    emu.add_argument("--routing", choices=list(DP_POLICIES), default=None,
                     help="how the single port spreads requests over the deployment's data-parallel engines "
                          "(default least_loaded, vLLM's DP balancer; or round_robin). A cluster file routes "
                          "among its instances with its own `routing`")
    front = parser.add_argument_group("vLLM front end")
    front.add_argument("--host", default=None)
    front.add_argument("--port", type=_port, default=8000)
    front.add_argument("--served-model-name", nargs="+", default=None)
    front.add_argument("--api-key", nargs="+", default=None)
    front.add_argument("--max-logprobs", type=int, default=20)
    front.add_argument("--seed", type=int, default=0)
    front.add_argument("--stream-interval", type=int, default=1)
    front.add_argument("--fingerprint-mode", choices=["custom", "full", "hash", "none"], default="full")
    front.add_argument("--fingerprint-value", default=None)
    for name in ("force-include-usage", "prompt-tokens-details", "request-id-headers", "server-load-tracking",
                 "per-request-metrics"):
        dest = "enable_" + name.replace("-", "_")
        front.add_argument(f"--enable-{name}", dest=dest, action="store_true", default=False)
        front.add_argument(f"--disable-{name}", dest=dest, action="store_false")
    front.add_argument("--disable-log-stats", action="store_true",
                       help="no periodic engine log line (vLLM also stops its metrics; here they stay on)")
    front.add_argument("--shutdown-timeout", type=float, default=0.0,
                       help="seconds to let requests in flight finish at shutdown (0: abort them)")
    front.add_argument("--disable-fastapi-docs", dest="fastapi_docs", action="store_false", default=True,
                       help="no /openapi.json, /docs and /redoc")
    front.add_argument("--enable-fastapi-docs", dest="fastapi_docs", action="store_true")
    front.add_argument("--enable-offline-docs", dest="offline_docs", action="store_true", default=False,
                       help="/docs from local Swagger UI assets (pip install 'vllm-emulator[docs]'), no /redoc")
    front.add_argument("--disable-offline-docs", dest="offline_docs", action="store_false")
    front.add_argument("--disable-uvicorn-access-log", dest="access_log", action="store_false", default=True)
    front.add_argument("--enable-uvicorn-access-log", dest="access_log", action="store_true")
    front.add_argument("--uvicorn-log-level", choices=sorted(UVICORN_LOG_LEVELS), default="info",
                       help="log level of the HTTP server: its access log (uvicorn's logs at info)")
    front.add_argument("--log-level", choices=list(LOG_LEVELS), default=None,
                       help="vLLM's log level (default: $VLLM_LOGGING_LEVEL, else INFO); DEBUG adds the prompts "
                            "and token ids to --enable-log-requests' lines")
    front.add_argument("--kv-events-config", type=parse_kv_events_config, default=None,
                       help="vLLM's KV cache events over ZeroMQ, as JSON (e.g. '{\"enable_kv_cache_events\": true, "
                            "\"endpoint\": \"tcp://*:5557\", \"replay_endpoint\": \"tcp://*:5558\"}')")
    add_engine_args(parser)
    add_remaining_vllm_flags(parser, SIMULATED_VLLM_FLAGS | LOGGING_FLAGS | SERVE_READS)


def normalize_argv(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """vLLM's rewriting of a command line (server/vllm_argv.py): --config FILE, --snake_case names,
    -O3, dotted JSON keys."""
    return vllm_argv.normalize_argv(argv, set(parser._option_string_actions))


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not 0 <= value <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"must be a port from 0 to {MAX_PORT} (0: any free one), got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:  # inf would make every virtual time inf (and 0 x inf nan)
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


# uvicorn's keep-alive timeout as vLLM sets it (VLLM_HTTP_TIMEOUT_KEEP_ALIVE): an idle connection, or
# one whose request head has not arrived in full, is closed after this many seconds.
KEEP_ALIVE_TIMEOUT = float(os.environ.get("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", "5"))
# Once every request has ended, how long a handler may take to write its last bytes (a client
# that does not read can hold up the end of its stream) before its connection is closed.
FINAL_WRITE_GRACE = 2.0


@dataclass
class RunningServer:
    """A started server: its engine client, its runners and the ports they listen on."""
    engine: EngineClient
    metrics: EngineMetrics
    runners: list[web.AppRunner]
    ports: list[int]
    logs: list = field(default_factory=list)
    servings: list[Serving] = field(default_factory=list)
    tasks: list[asyncio.Task] = field(default_factory=list)
    body_decoder: BodyDecoder | None = None
    kv_events: KVEventPublishers | None = None
    kv_read_notices: KVReadNotices | None = None

    async def shutdown(self, timeout: float) -> None:
        """vLLM's shutdown (`--shutdown-timeout`): 0 aborts every request at once, more lets them
        finish for that many seconds and then aborts the rest; each stream ends with its
        `finish_reason: "abort"` chunk and [DONE], each request has its line in the request log."""
        mode = "abort" if timeout == 0 else "drain"
        shown = int(timeout) if float(timeout).is_integer() else timeout  # vLLM's is an int: "timeout=0s"
        log.info("[shutdown] API server: stopping engine client mode=%s timeout=%ss", mode, shown)
        await self.engine.shutdown(timeout)
        await self.close()

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for runner in self.runners:
            await runner.cleanup()
        self.engine.pacer.close()
        if self.kv_events is not None:
            self.kv_events.close()
        if self.body_decoder is not None:
            await self.body_decoder.close()
        if self.kv_read_notices is not None:
            await self.kv_read_notices.close()
        for log_file in self.logs:
            log_file.close()


@dataclass
class _ParentsOnly:
    """A pod's metrics hear of parent requests; an instance's own port counts its refusals through its app's
    metrics (Serving.check_admission), the shared port through the engine client's observers."""
    metrics: EngineMetrics

    def observe_admission_rejection(self, reason: str, model_name: str | None = None) -> None:
        pass

    def add_parent_request(self, children) -> None:
        self.metrics.add_parent_request(children)


def system_fingerprint(args: argparse.Namespace, model: str, hardware: str) -> str | None:
    """vLLM's `vllm-<version>[-tpN][-ppN][-dpN][-ep]-<hash8>`; the hash covers the deployment."""
    if args.fingerprint_mode == "none":
        return None
    if args.fingerprint_mode == "custom":
        return args.fingerprint_value
    identity = repr((model, hardware, sorted(vars(engine_args_from(args)).items())))
    hash8 = hashlib.sha256(identity.encode()).hexdigest()[:8]
    parts = ["vllm-0.33.0"]
    if args.fingerprint_mode == "full":
        for flag, size in (("tp", args.tensor_parallel_size), ("pp", args.pipeline_parallel_size),
                           ("dp", args.data_parallel_size)):
            if size > 1:
                parts.append(f"{flag}{size}")
        if args.enable_expert_parallel:
            parts.append("ep")
    return "-".join(parts + [hash8])


def resolve_defaults(args: argparse.Namespace) -> str:
    """Fill the embedded default into `args` where the user named nothing; return the model (the positional
    one wins over a config file's `model:`, as in vLLM's serve command)."""
    model = args.model_tag or args.model
    args.hardware = args.hardware or DEFAULT_HARDWARE
    return model or DEFAULT_MODEL


def load_target(args: argparse.Namespace) -> tuple[Deployment | ClusterSpec, list[str]]:
    """The deployment (or, with --cluster, the cluster) the command line names, and its start-up lines."""
    if args.cluster is not None:
        if args.model or args.model_tag or args.hardware:
            raise ValueError("MODEL and --hardware name a single deployment; a cluster file names its own")
        for dest, (flag, where) in CLUSTER_SETS.items():
            if getattr(args, dest):
                raise ValueError(f"{flag} is a single deployment's; with --cluster the cluster file sets it: {where}")
        spec, notes = read_cluster_file(args.cluster, args.compile_cache, explicit_engine_args(args),
                                        front_door_port=args.port or None, check_adapter_files=True)
        return spec, cluster_startup_lines(args.cluster, spec, notes)
    model = resolve_defaults(args)
    deployment = build_deployment(model, args.hardware, engine_args_from(args), args.compile_cache)
    last = args.port + deployment.config.data_parallel_size
    if args.port_per_engine and args.port and last > MAX_PORT:
        raise ValueError(f"--port-per-engine: engine {deployment.config.data_parallel_size - 1} would answer on "
                         f"port {last}; ports go up to {MAX_PORT}")
    return deployment, deployment.startup_lines()


def served_model_types(args: argparse.Namespace, target: Deployment | ClusterSpec) -> dict[str, str]:
    """Each served model name -> the `model_type` of its model (which tokenizer family it has)."""
    if isinstance(target, ClusterSpec):
        types: dict[str, str] = {}
        for instance in target.instances:
            for name in instance.served_model_names:
                types.setdefault(name, instance.deployment.model.model_type)
        return types
    return dict.fromkeys(args.served_model_name or [resolve_defaults(args)], target.model.model_type)


def served_sampling_defaults(args: argparse.Namespace, target: Deployment | ClusterSpec, generation_config: str,
                             override: dict) -> dict[str, SamplingDefaults]:
    """Each served name's default sampling parameters (vLLM's get_diff_sampling_param and override_max_tokens),
    built once per served model under --generation-config and --override-generation-config (ValueError: a
    --generation-config vLLM refuses). A deployment's model is the one named (a local folder: its own
    generation_config.json), a cluster instance's its deployment's."""
    roots: dict[str, str] = {}
    if isinstance(target, ClusterSpec):
        for instance in target.instances:
            for name in instance.served_model_names:
                roots.setdefault(name, instance.deployment.model.name)
    else:
        model = resolve_defaults(args)
        root = model if Path(model).expanduser().is_dir() else target.model.name
        roots = dict.fromkeys(args.served_model_name or [model], root)
    built: dict[str, SamplingDefaults] = {}
    for root in roots.values():
        if root not in built:
            built[root] = sampling_defaults(root, generation_config, override)
    return {name: built[root] for name, root in roots.items()}


def warn_overridden_defaults(defaults: dict[str, SamplingDefaults], generation_config: str) -> None:
    """vLLM's warning (once per process: once per served model's defaults here) that a generation config
    changed the default sampling parameters."""
    said = set()
    for served in defaults.values():
        line = overridden_warning(served.params, generation_config)
        if line is not None and line not in said:
            said.add(line)
            model_config_log.warning("%s", line)


def listening_ports(args: argparse.Namespace, target: Deployment | ClusterSpec) -> list[tuple[int, str]]:
    """Every port the server will listen on, each with whose it is: --port first, then each cluster
    instance's own (or, with --port-per-engine, each engine's), in the order start_server serves them."""
    ports = [(args.port, "--port")]
    if isinstance(target, ClusterSpec):
        ports += [(spec.port, f"instance {spec.name}'s port") for spec in target.instances if spec.port is not None]
    elif args.port_per_engine:
        ports += [(args.port + 1 + i if args.port else 0, f"engine {i}'s port (--port-per-engine)")
                  for i in range(target.config.data_parallel_size)]
    return ports


class PortInUse(OSError):
    """A port the server must listen on cannot be bound (another process holds it, most often)."""


def bind_ports(host: str | None, ports: list[tuple[int, str]]) -> list[socket.socket]:
    """Bind every port now, before anything is started, as vLLM binds its port before it builds its engine
    (setup_server / create_server_socket): all interfaces' IPv4 address without --host, SO_REUSEADDR. A port
    that cannot be bound raises PortInUse naming it and whose it is, the ones bound before it closed."""
    address = host or ""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    except ValueError:  # a host name, or "" (every interface)
        family = socket.AF_INET
    bound: list[socket.socket] = []
    for port, whose in ports:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, port))
        except OSError as exc:
            sock.close()
            for other in bound:
                other.close()
            where = f"[{address}]:{port}" if family == socket.AF_INET6 else f"{address or '0.0.0.0'}:{port}"
            raise PortInUse(exc.errno, f"{exc.strerror or exc}: cannot listen on {where} ({whose})") from None
        bound.append(sock)
    return bound


async def start_server(args: argparse.Namespace, deployment: Deployment | ClusterSpec | None = None,
                       tokenizer: Tokenizer | dict[str, Tokenizer] | None = None,
                       sockets: list[socket.socket] | None = None) -> RunningServer:
    """Build everything `args` describes and listen; returns once the ports accept connections.
    `deployment`: what to serve when already built (a Deployment, or a ClusterSpec); `tokenizer`: one for
    every served model, or one per served name (default: --tokenizer, else each model's family's);
    `sockets`: the ports already bound (bind_ports over listening_ports; default: bound here, first)."""
    target = deployment if deployment is not None else load_target(args)[0]
    if sockets is None:  # a port that is taken fails here, before any file is opened or publisher started
        sockets = bind_ports(args.host, listening_ports(args, target))
    model_types = served_model_types(args, target)
    if isinstance(tokenizer, dict):
        tokenizers = tokenizer
    elif tokenizer is not None:
        tokenizers = dict.fromkeys(model_types, tokenizer)
    else:
        tokenizers = load_tokenizers(args.tokenizer, model_types)
    request_log = open(args.request_log, "w", buffering=1) if args.request_log else None
    # one planner per tokenizer and EOS: a gpt-oss model's answers end in its own EOS, Harmony's <|return|>
    eos_of = {name: harmony_tokens(t).eos if model_types.get(name) == "gpt_oss" else t.eos_token_id
              for name, t in tokenizers.items()}
    planners = {}
    for name, t in tokenizers.items():
        if (id(t), eos_of[name]) not in planners:
            planners[id(t), eos_of[name]] = OutputPlanner(t.output_pool, eos_of[name], args.seed, t.reply_start_pool)
    if isinstance(target, ClusterSpec):
        sim = build_cluster(target)
        served = list(sim.by_model)
        model = sim.instances[0].deployment.model.name
        deployment = sim.instances[0].deployment
    else:
        model = resolve_defaults(args)
        served = args.served_model_name or [model]
        sim = build_simulation(target, args.routing or "least_loaded", tuple(served))
        deployment = target
    num_engines = len(sim.engines)
    engine_served = [(sim.instance_of[e].served_model_names[0], sim.instance_of[e].deployment)
                     for e in range(num_engines)]
    metrics = EngineMetrics(served[0], deployment, num_engines, served=engine_served)
    # one per port: a pod's /metrics shows its own engines, numbered from "0"
    pods: list[tuple[object, EngineMetrics]] = []  # (a cluster instance, or an engine's index; its metrics)
    if isinstance(target, ClusterSpec):
        for instance in sim.instances:
            if instance.spec.port is not None:
                engines = [e.index for e in instance.engines]
                pods.append((instance, EngineMetrics(instance.served_model_names[0], instance.deployment, len(engines),
                                                     engines=engines)))
    elif args.port_per_engine:
        for i in range(num_engines):
            pods.append((i, EngineMetrics(served[0], deployment, 1, engines=[i])))
    # Rejections are counted once, on the shared port; every pod sees the parents of its own engines' requests.
    observers = [metrics, *(_ParentsOnly(m) for _, m in pods)]
    power = PowerMetrics(sim, metrics.registry, nodes_power(target.nodes) if isinstance(target, ClusterSpec) else None)
    ConnectorMetrics(sim, metrics.registry, emulator_series=True)
    for pod, pod_metric in pods:
        ConnectorMetrics(sim, pod_metric.registry, [pod] if isinstance(pod, int) else [e.index for e in pod.engines])
        if not isinstance(pod, int):  # power is an instance's: one engine's port has none of its own
            power.show_instance(pod_metric.registry, pod.name)
    engine = EngineClient(sim, {name: planners[id(t), eos_of[name]] for name, t in tokenizers.items()}, args.speed,
                          request_log=request_log, observers=observers,
                          address=(args.host or "localhost", args.port), energy_of=power.energy_of,
                          randomize_request_ids=request_id_randomization())
    for m in [metrics, *(m for _, m in pods)]:
        m.attach(engine.sim)
    pacer = engine.pacer
    kv_events = start_kv_event_publishers(args.kv_events_config, engine.sim,
                                          lambda t: time.time() + pacer.wall_time(t) - time.perf_counter())
    logs = [request_log] if request_log else []
    if args.step_log:
        logs.append(open(args.step_log, "w", buffering=1 << 16))
        engine.sim.add_listener(StepLog(logs[-1], engine.num_engines > 1).on_step)
    switches = frontend_switches(args)  # whether thinking budgets are taken: vLLM's reasoning config
    switches["reasoning"] = reasoning_settings(args, switches["reasoning_parser"]).enabled
    api_keys = args.api_key or ([os.environ["VLLM_API_KEY"]] if os.environ.get("VLLM_API_KEY") else [])
    options = FrontendOptions(
        served_model_names=served, model_root=model, max_logprobs=args.max_logprobs,
        enable_force_include_usage=args.enable_force_include_usage,
        enable_prompt_tokens_details=args.enable_prompt_tokens_details,
        enable_request_id_headers=args.enable_request_id_headers,
        enable_server_load_tracking=args.enable_server_load_tracking,
        enable_per_request_metrics=args.enable_per_request_metrics,
        stream_interval=args.stream_interval,
        system_fingerprint=system_fingerprint(args, model, args.hardware), api_keys=api_keys,
        fastapi_docs=args.fastapi_docs, offline_docs=args.offline_docs, **switches)
    options.sampling_defaults = served_sampling_defaults(args, target, options.generation_config,
                                                         options.override_generation_config)
    warn_overridden_defaults(options.sampling_defaults, options.generation_config)
    if isinstance(target, ClusterSpec):  # every port serves its instances' adapters (server/lora.py cluster_adapters)
        options.lora_adapters = None
    warn_unsimulated(options.reasoning_parser, tokenizers)  # what --reasoning-parser cannot show
    body_decoder = BodyDecoder()
    servings = [Serving(engine, tokenizers, options, body_decoder=body_decoder)]
    pod_metrics = [metrics]
    for pod, pod_metric in pods:
        if isinstance(pod, int):  # --port-per-engine: one engine of the deployment alone
            servings.append(Serving(engine, tokenizers, options, pod=pod, body_decoder=body_decoder))
        else:  # a cluster instance's own port: its served names only
            own = dataclasses.replace(options, served_model_names=list(pod.served_model_names),
                                      model_root=pod.deployment.model.name, lora_adapters=None)  # its own
            servings.append(Serving(engine, tokenizers, own, body_decoder=body_decoder, instance=pod))
        pod_metrics.append(pod_metric)
    runners = []
    bound = []
    access_log = logging.getLogger(vllm_logging.ACCESS) if args.access_log else None  # uvicorn's
    # the front door's requests count on the own port of the instance each went to, as behind a gateway
    forwarded = {serving.instance.name: m for serving, m in zip(servings, pod_metrics) if serving.instance is not None}
    assert len(sockets) == len(servings), "one bound port per served port (listening_ports' order)"
    for serving, sock, port_metrics in zip(servings, sockets, pod_metrics):
        ranks = ([serving.pod] if serving.pod is not None else
                 [e.index for e in serving.instance.engines] if serving.instance is not None else None)
        sources = kv_events.sources(ranks) if kv_events else {}
        app = build_app(serving, port_metrics, kv_events=sources, access_log=access_log,
                        pod_metrics=forwarded if serving.instance is None and serving.pod is None else None)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None,  # the app logs it, as uvicorn
                               shutdown_timeout=FINAL_WRITE_GRACE, keepalive_timeout=KEEP_ALIVE_TIMEOUT)
        await runner.setup()
        site = web.SockSite(runner, sock)
        await site.start()
        runners.append(runner)
        bound.append(runner.addresses[0][1])
    engine.address = (engine.address[0], bound[0])  # the port it listens on (--port 0: the one it was given)
    tasks = [] if args.disable_log_stats else [asyncio.ensure_future(PeriodicLogger(engine.sim, engine.pacer).run())]
    return RunningServer(engine, metrics, runners, bound, logs, servings, tasks, body_decoder, kv_events,
                         KVReadNotices(engine.sim))


def configure_logging(args: argparse.Namespace):
    """vLLM's logging set-up and uvicorn's (server/vllm_logging.py), from --log-level, --logging-config,
    --log-config-file, --uvicorn-log-level, --disable-uvicorn-access-log, --disable-access-log-for-endpoints and
    the VLLM_LOGGING_* variables (ValueError: a value vLLM would refuse). Returns what undoes it."""
    def flag(name: str):
        return getattr(args, UNSUPPORTED_PREFIX + name, None)
    config = vllm_logging.logging_config(args, flag("logging_config"), flag("log_config_file"))
    excluded = [p.strip() for p in (flag("disable_access_log_for_endpoints") or "").split(",") if p.strip()]
    return vllm_logging.configure(config, args.uvicorn_log_level, args.access_log, excluded)


def main(args: argparse.Namespace) -> int:
    try:
        restore_logging = configure_logging(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return _main(args)
    finally:  # a process's end; in a host process (a test calling main) its logging is as it was
        restore_logging()


def _main(args: argparse.Namespace) -> int:
    try:
        target, lines = load_target(args)
        tokenizers = load_tokenizers(args.tokenizer, served_model_types(args, target))
        request_id_randomization()  # a value vLLM could not read fails here, not at the first request
        stats_interval()  # $VLLM_LOG_STATS_INTERVAL likewise
        switches = frontend_switches(args)
        check_parsers(args, target, switches)  # vLLM's start-up checks of the front end's flags
        reasoning = reasoning_settings(args, switches["reasoning_parser"])
        served_sampling_defaults(args, target, switches["generation_config"], switches["override_generation_config"])
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:  # vLLM binds its port before it builds its engine: a port that is taken fails before anything starts
        sockets = bind_ports(args.host, listening_ports(args, target))
    except PortInUse as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    vllm_logging.log_version_and_model(log, VLLM_VERSION, resolve_defaults(args) if isinstance(target, Deployment)
                                       else ", ".join(dict.fromkeys(i.deployment.model.name for i in target.instances)))
    log.info("non-default args: %s", non_default_args(args))  # vLLM's setup_server: right after its version
    deployments = [target] if isinstance(target, Deployment) else [i.deployment for i in target.instances]
    for mode in dict.fromkeys(d.config.performance_mode for d in deployments):  # vLLM's info_once
        if performance_mode_line(mode):
            vllm_config_log.info("%s", performance_mode_line(mode))
    if not reasoning.enabled and getattr(args, UNSUPPORTED_PREFIX + "reasoning_config", None) is not None:
        vllm_config_log.warning("%s", REASONING_IDS_FAILED)
    if isinstance(target, Deployment):
        dp = target.config.data_parallel_size
        log.info("Simulating %s on %s (%d engine%s), speed x%g; tokenizer: %s", resolve_defaults(args),
                 target.device.name, dp, "s" if dp > 1 else "", args.speed, _names(tokenizers))
    else:
        log.info("Simulating a cluster of %d instances, speed x%g; tokenizer: %s", len(target.instances), args.speed,
                 _names(tokenizers))
    # a deployment's memory and KV-cache lines are its engine core's in vLLM (its own process, its own prefix)
    core = ("EngineCore" if target.config.data_parallel_size == 1 else "EngineCore_DP0") \
        if isinstance(target, Deployment) else vllm_logging.PROCESS_NAME
    with vllm_logging.as_process(core):
        for line in lines:
            log.info("%s", line)
    differing, unsupported = not_simulated(args)
    if differing:
        log.warning("Not simulated, so throughput, memory or the transport differ from vLLM's with them: %s",
                    ", ".join(differing))
    if unsupported:
        log.info("Accepted but not simulated (no effect here): %s", ", ".join(unsupported))
    if reasoning.unsimulated:
        log.warning("--reasoning-config: %s", reasoning.unsimulated)
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(_serve_forever(args, target, tokenizers, sockets))
    except OSError as exc:  # e.g. a KV-event publisher's endpoint is taken
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def non_default_args(args: argparse.Namespace) -> dict:
    """vLLM's start-up list of the flags set to something other than vLLM's defaults (server/vllm_argv.py), serve's
    own flags left out. The flags set are those the command line named (vllm_emulator/cli.py); for a namespace
    built otherwise, those whose value is not serve's default."""
    given = getattr(args, "explicit_dests", None)
    if given is None:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        defaults = vars(parser.parse_args([]))
        given = {dest for dest, value in vars(args).items() if dest in defaults and value != defaults[dest]}
    switches = {UNSUPPORTED_PREFIX + names[0].lstrip("-").replace("-", "_"): names
                for names, kind in VLLM_SERVE_FLAGS if kind == "flag"}
    return vllm_argv.non_default_args(args, given, EMULATOR_DESTS, UNSUPPORTED_PREFIX, switches)


@dataclass(frozen=True)
class ReasoningSettings:
    """What --reasoning-config (with --reasoning-parser) does here: `enabled`, vLLM's ReasoningConfig.enabled
    (a request's thinking_token_budget is refused without it); `unsimulated`, what of it changes nothing here."""
    enabled: bool
    unsimulated: str | None = None


def reasoning_settings(args: argparse.Namespace, parser: str | None) -> ReasoningSettings:
    """vLLM's reasoning config (vllm/config/reasoning.py; engine/arg_utils.py _set_default_reasoning_config_args;
    config/vllm.py __post_init__): the --reasoning-parser given is its parser; its start and end strings are the
    config's, else the parser's; with both it is enabled (thinking budgets are taken), else vLLM warns
    (REASONING_IDS_FAILED). Without --reasoning-config a parser alone enables it. ValueError: a config vLLM's
    argparse refuses, with its words. `parser`: --reasoning-parser as read (frontend_switches)."""
    text = getattr(args, UNSUPPORTED_PREFIX + "reasoning_config", None)
    if text is None:
        return ReasoningSettings(enabled=parser is not None)
    problem = "1 validation error for ReasoningConfig\n  "
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"argument --reasoning-config: {problem}Invalid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"argument --reasoning-config: {problem}Input should be an object")
    for key, value in config.items():
        if key not in REASONING_FIELDS:
            raise ValueError(f"argument --reasoning-config: {problem}{key}\n  Unexpected keyword argument")
        if not isinstance(value, str):
            raise ValueError(f"argument --reasoning-config: {problem}{key}\n  Input should be a valid string")
    engine_parser = parser or parser_name(config.get("reasoning_parser") or None)  # (an unknown name: its error)
    start, end = config.get("reasoning_start_str", ""), config.get("reasoning_end_str", "")
    fmt = REASONING_FORMATS.get(engine_parser) if engine_parser else None
    if engine_parser is not None and fmt is None:  # a parser whose strings are not known here: taken to have them
        return ReasoningSettings(enabled=True)
    enabled = bool((start or (fmt.start if fmt else "")) and (end or (fmt.end if fmt else "")))
    if not enabled:
        return ReasoningSettings(enabled=False)
    if parser is None or REASONING_FORMATS.get(parser) is None:
        unsimulated = ("a thinking_token_budget is taken but changes nothing here: without a --reasoning-parser whose "
                       "markup is simulated, replies do not think (vLLM's model would, its budget cut short)")
    elif (start and start != fmt.start) or (end and end != fmt.end):
        unsimulated = (f"its reasoning_start_str/reasoning_end_str are not simulated: a thinking_token_budget ends "
                       f"the reasoning with {fmt.end}, counted from {fmt.start} (vLLM forces the configured end "
                       "string, adding its tokens to the reply)")
    else:
        unsimulated = None
    return ReasoningSettings(enabled=True, unsimulated=unsimulated)


def not_simulated(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The flags given that the emulator does not simulate: (those that would change throughput, memory or the
    transport under vLLM, the others). Also the values of simulated flags that are not (-O1, which vLLM runs
    with piecewise CUDA graphs only)."""
    given = [flag for flag in unsupported_flags_used(args)
             if flag not in SIMULATED_VLLM_FLAGS | LOGGING_FLAGS | SERVE_READS]
    differing = [flag for flag in given if flag in RESULT_CHANGING_FLAGS] + unsimulated_values(args)
    return sorted(differing), [flag for flag in given if flag not in RESULT_CHANGING_FLAGS]


def check_parsers(args: argparse.Namespace, target: Deployment | ClusterSpec, options: dict) -> None:
    """vLLM's start-up refusal of parsers a gpt-oss model cannot take (its chat and Responses servings build
    their parser: ParserManager.get_parser, TypeError); `options`: frontend_switches'. ValueError with its text."""
    if options["skip_tokenizer_init"]:
        return  # vLLM checks the parsers against the tokenizer: none, no check
    tool_parser = options["tool_call_parser"] if options["enable_auto_tools"] else None
    if isinstance(target, ClusterSpec):
        models = [(i.deployment.model.model_type, i.deployment.model.name) for i in target.instances]
    else:
        models = [(target.model.model_type, resolve_defaults(args))]
    for model_type, name in models:
        if model_type == "gpt_oss":
            error = parser_error(options["reasoning_parser"], tool_parser, name)
            if error is not None:
                raise ValueError(error)


def _log_routes(app: web.Application) -> None:
    """vLLM's list of its routes before it serves (serve_http): FastAPI's documentation routes first (GET and
    the HEAD Starlette adds), then each route with its method (aiohttp's HEAD twin of a GET route left out)."""
    routes = [(route.resource.canonical, route.method) for route in app.router.routes()
              if route.resource is not None and route.method != "HEAD"
              and not route.resource.canonical.startswith(EMULATOR_ROUTES)]  # vLLM's only
    log.info("Available routes are:")
    for path, method in sorted(routes, key=lambda route: route[0] not in DOCUMENTATION):  # (a stable sort)
        log.info("Route: %s, Methods: %s", path, f"{method}, HEAD" if path in DOCUMENTATION else method)


def _names(tokenizers: dict[str, Tokenizer]) -> str:
    """The tokenizers in use: one name, or which model has which."""
    names = {t.name for t in tokenizers.values()}
    if len(names) == 1:
        return names.pop()
    return "; ".join(f"{model}: {t.name}" for model, t in tokenizers.items())


async def _serve_forever(args: argparse.Namespace, deployment, tokenizers: dict[str, Tokenizer],
                         sockets: list[socket.socket]) -> None:
    server = await start_server(args, deployment, tokenizers, sockets)
    # The start-up heap (vocabulary, tables) never dies: keep the collector from walking it on
    # every full collection, which would stall token delivery for milliseconds.
    gc.collect()
    gc.freeze()
    host = args.host or "0.0.0.0"
    log.info("Starting vLLM server on http://%s:%d", f"[{host}]" if ":" in host else host, server.ports[0])
    for serving, port in zip(server.servings[1:], server.ports[1:]):
        if serving.instance is not None:
            log.info("Instance %s alone on http://%s:%d", serving.instance.name, host, port)
        else:
            log.info("Engine %d alone on http://%s:%d", serving.pod, host, port)
    _log_routes(server.runners[0].app)
    # uvicorn's lines as vLLM's server prints them (it hands uvicorn a bound socket: no "Uvicorn running on")
    uvicorn_log.info("Started server process [%d]", os.getpid())
    uvicorn_log.info("Waiting for application startup.")
    uvicorn_log.info("Application startup complete.")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.shutdown(args.shutdown_timeout)
    uvicorn_log.info("Shutting down")
    uvicorn_log.info("Waiting for application shutdown.")
    uvicorn_log.info("Application shutdown complete.")
