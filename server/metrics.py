"""vLLM's Prometheus metrics, fed from the simulation in virtual time.

Every family that vLLM 0.33's `PrometheusStatLogger` (`v1/metrics/loggers.py`) exports for a text
model is declared here with vLLM's name, help text, labels and buckets, and created eagerly for
every engine, so a dashboard or an autoscaler cannot tell the difference. Values follow vLLM's
semantics (`v1/metrics/stats.py`, `v1/engine/output_processor.py`), with virtual timestamps where
vLLM reads a clock:

- per engine step that produced outputs (vLLM's "iteration"): generated tokens, inter-token
  latencies, and for the requests that got their first token: prompt tokens (by source), TTFT;
  then one `iteration_tokens_total` observation (computed prompt tokens + generated tokens);
- per finished request (front-end aborts are not counted, as in vLLM): success by finish reason and
  the per-request histograms;
- gauges and the prefix-cache counters are read from the engines when /metrics is rendered;
- with LoRA on, `vllm:lora_requests_info` per engine step (`LoRARequestStates`).

A cluster instance that fails is a dead vLLM pod: a scrape of it fails, so Prometheus has none of its
vLLM series until it is back, and the requests it held never finish in them (vLLM's front end hands the
engine's death to each request and records nothing: AsyncLLM's output handler, propagate_error). Its
vLLM series leave these metrics when it fails; when it is restored it is a new process, whose series
start from zero (Prometheus sees counters reset) with its info series set again, and a port that shows
that instance alone restarts its front end's series (`http_*`, rejections) too. The emulator's own series
count on across the fault.

Emulator-only series use the prefix `vllm_emulator:`; a cluster instance is named by the label
`cluster_instance` (Prometheus keeps `instance` for the scraped target). `vllm_emulator:engine_info` maps
each engine label to its instance, served model and hardware. The `http_*` families of vLLM's
prometheus-fastapi-instrumentator are here too, fed by the server's middleware (`observe_http`).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, GCCollector, Histogram,
                               PlatformCollector, ProcessCollector, Summary, generate_latest)

from emulator.deployment import Deployment
from emulator.engine import StepRecord
from emulator.disaggregation import DEFAULT_CONNECTOR
from emulator.instance import Instance
from emulator.kv_stats import kv_fetch_stages
from emulator.request import Request, RequestStatus
from emulator.simulation import Simulation

# -- buckets (vLLM v1/metrics/buckets.py) -----------------------------------------------------
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                           60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TIME_TO_FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                               2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                               2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
REQUEST_PARAMS_N_BUCKETS = (1, 2, 5, 10, 20)
REQUEST_NUM_PREEMPTIONS_BUCKETS = (1, 2, 3, 4, 5, 10, 20)
# prometheus-fastapi-instrumentator's `metrics.default()`
HTTP_LATENCY_HIGHR_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 2.5, 3, 3.5, 4,
                              4.5, 5, 7.5, 10, 30, 60)
HTTP_LATENCY_LOWR_BUCKETS = (0.1, 0.5, 1)


def request_tokens_buckets(max_model_len: int) -> list[int]:
    """vLLM's token-count buckets: the 1-2-5 series up to max_model_len."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_model_len:
                return buckets
            buckets.append(mantissa * scale)
        scale *= 10


# -- label values vLLM pre-creates -----------------------------------------------------------
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")  # vLLM's FinishReason, in order
ADMISSION_REASONS = ("max_num_queued_reqs", "max_num_queued_tokens")
PROMPT_TOKEN_SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")
CACHE_HIT_SOURCES = ("device", "host", "p2p", "disk", "external_unspecified")
SLEEP_STATES = ("awake", "weights_offloaded", "discard_all")
WAITING_REASONS = ("capacity", "deferred")
P2P_CONNECTORS = ("NixlConnector", "MooncakeConnector")  # those vLLM labels p2p (others: external_unspecified)
# the handlers vLLM's Instrumentator leaves out
HTTP_EXCLUDED_HANDLERS = frozenset({"/metrics", "/health", "/load", "/ping", "/version", "/server_info"})
ENGINE_LABELS = ("model_name", "engine")
# the families of _declare that are no vLLM process's per-engine series: they stay when a pod fails
NOT_PER_PROCESS = frozenset({"admission_rejections", "simulated_time", "speed", "steps", "busy", "engine_info"})
DEFAULT_BLOCK_SIZE = 16  # vLLM's CacheConfig.DEFAULT_BLOCK_SIZE


def _declare(registry: CollectorRegistry, max_model_len: int) -> dict[str, object]:
    """Every family, in vLLM's order, keyed by a short name used below."""
    tokens = request_tokens_buckets(max_model_len)
    labels = ENGINE_LABELS

    def counter(name, doc, extra=()):
        return Counter(name, doc, labels + extra, registry=registry)

    def gauge(name, doc, extra=()):
        return Gauge(name, doc, labels + extra, registry=registry)

    def histogram(name, doc, buckets):
        return Histogram(name, doc, labels, buckets=buckets, registry=registry)

    mfu = "(for Model Flops Utilization calculations)."
    return {
        "flops": counter("vllm:estimated_flops_per_gpu",
                         f"Estimated number of floating point operations per GPU {mfu}"),
        "read_bytes": counter("vllm:estimated_read_bytes_per_gpu",
                              f"Estimated number of bytes read from memory per GPU {mfu}"),
        "write_bytes": counter("vllm:estimated_write_bytes_per_gpu",
                               f"Estimated number of bytes written to memory per GPU {mfu}"),
        "running": gauge("vllm:num_requests_running", "Number of requests in model execution batches."),
        "waiting": gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed."),
        "waiting_by_reason": gauge(
            "vllm:num_requests_waiting_by_reason",
            "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for scheduling "
            "capacity; 'deferred' = deferred by transient constraints (LoRA budget, KV transfer, blocked "
            "status). Sum of all reasons equals vllm:num_requests_waiting.", ("reason",)),
        "sleep_state": gauge(
            "vllm:engine_sleep_state",
            "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is awake; "
            "weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.",
            ("sleep_state",)),
        "kv_usage": gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."),
        "prefix_queries": counter("vllm:prefix_cache_queries",
                                  "Prefix cache queries, in terms of number of queried tokens."),
        "prefix_hits": counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."),
        "external_queries": counter(
            "vllm:external_prefix_cache_queries",
            "External prefix cache queries from KV connector cross-instance cache sharing, in terms of "
            "number of queried tokens."),
        "external_hits": counter(
            "vllm:external_prefix_cache_hits",
            "External prefix cache hits from KV connector cross-instance cache sharing, in terms of number "
            "of cached tokens."),
        "mm_queries": counter("vllm:mm_cache_queries",
                              "Multi-modal cache queries, in terms of number of queried items."),
        "mm_hits": counter("vllm:mm_cache_hits", "Multi-modal cache hits, in terms of number of cached items."),
        "preemptions": counter("vllm:num_preemptions", "Cumulative number of preemption from the engine."),
        "prompt_tokens": counter("vllm:prompt_tokens", "Number of prefill tokens processed."),
        "prompt_by_source": counter("vllm:prompt_tokens_by_source", "Number of prompt tokens by source.",
                                    ("source",)),
        "prompt_cached": counter("vllm:prompt_tokens_cached", "Number of cached prompt tokens (local + external)."),
        "cached_by_source": counter(
            "vllm:prompt_tokens_cached_by_source",
            "Prefix-cache hit tokens by the cache tier that supplied them: device (local HBM), host "
            "(offloaded to DRAM), disk, p2p (transferred from another vLLM instance) or external_unspecified. "
            "Counted at admission; sums to vllm:prefix_cache_hits + vllm:external_prefix_cache_hits.",
            ("source",)),
        "generation_tokens": counter("vllm:generation_tokens", "Number of generation tokens processed."),
        "success": counter("vllm:request_success", "Count of successfully processed requests.",
                           ("finished_reason",)),
        "admission_rejections": Counter(
            "vllm:admission_rejections", "Number of admission attempts rejected by a queue limit, by reason.",
            ("model_name", "reason"), registry=registry),
        "prompt_hist": histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.", tokens),
        "generation_hist": histogram("vllm:request_generation_tokens", "Number of generation tokens processed.",
                                     tokens),
        "iteration_tokens": histogram("vllm:iteration_tokens_total",
                                      "Histogram of number of tokens per engine_step.", ITERATION_TOKENS_BUCKETS),
        "max_generation": histogram("vllm:request_max_num_generation_tokens",
                                    "Histogram of maximum number of requested generation tokens.", tokens),
        "n": histogram("vllm:request_params_n", "Histogram of the n request parameter.", REQUEST_PARAMS_N_BUCKETS),
        "max_tokens": histogram("vllm:request_params_max_tokens",
                                "Histogram of the max_tokens request parameter.", tokens),
        "ttft": histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                          TIME_TO_FIRST_TOKEN_BUCKETS),
        "itl": histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                         INTER_TOKEN_LATENCY_BUCKETS),
        "tpot": histogram("vllm:request_time_per_output_token_seconds",
                          "Histogram of time_per_output_token_seconds per request.", INTER_TOKEN_LATENCY_BUCKETS),
        "e2e": histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                         REQUEST_LATENCY_BUCKETS),
        "queue": histogram("vllm:request_queue_time_seconds",
                           "Histogram of time spent in WAITING phase for request.", REQUEST_LATENCY_BUCKETS),
        "inference": histogram("vllm:request_inference_time_seconds",
                               "Histogram of time spent in RUNNING phase for request.", REQUEST_LATENCY_BUCKETS),
        "prefill": histogram("vllm:request_prefill_time_seconds",
                             "Histogram of time spent in PREFILL phase for request.", REQUEST_LATENCY_BUCKETS),
        "decode": histogram("vllm:request_decode_time_seconds",
                            "Histogram of time spent in DECODE phase for request.", REQUEST_LATENCY_BUCKETS),
        "num_preemptions": histogram("vllm:request_num_preemptions",
                                     "Histogram of the number of times a request was preempted.",
                                     REQUEST_NUM_PREEMPTIONS_BUCKETS),
        "prefill_kv_computed": histogram(
            "vllm:request_prefill_kv_computed_tokens",
            "Histogram of new KV tokens computed during prefill (excluding cached tokens).", tokens),
        # emulator-only
        "simulated_time": Gauge("vllm_emulator:simulated_time_seconds",
                                "Virtual time of the simulation, in seconds since it started.",
                                ("model_name",), registry=registry),
        "speed": Gauge("vllm_emulator:speed", "Virtual seconds simulated per wall-clock second.",
                       ("model_name",), registry=registry),
        "steps": counter("vllm_emulator:engine_steps", "Engine steps executed."),
        "busy": counter("vllm_emulator:engine_busy_seconds",
                        "Virtual GPU time spent executing engine steps, in seconds."),
        "engine_info": Gauge("vllm_emulator:engine_info",
                             "The cluster instance an engine belongs to, its served model and its hardware; "
                             "always 1.", ("engine", "cluster_instance", "model_name", "hardware"),
                             registry=registry),
    }


def _declare_http(registry: CollectorRegistry) -> dict[str, object]:
    """prometheus-fastapi-instrumentator's default families, as `vllm serve` registers them."""
    return {
        "requests": Counter("http_requests_total", "Total number of requests by method, status and handler.",
                            ("method", "status", "handler"), registry=registry),
        "request_size": Summary(
            "http_request_size_bytes",
            "Content length of incoming requests by handler. Only value of header is respected. "
            "Otherwise ignored. No percentile calculated. ", ("handler",), registry=registry),
        "response_size": Summary(
            "http_response_size_bytes",
            "Content length of outgoing responses by handler. Only value of header is respected. "
            "Otherwise ignored. No percentile calculated. ", ("handler",), registry=registry),
        "latency_highr": Histogram(
            "http_request_duration_highr_seconds",
            "Latency with many buckets but no API specific labels. Made for more accurate percentile "
            "calculations. ", buckets=HTTP_LATENCY_HIGHR_BUCKETS, registry=registry),
        "latency_lowr": Histogram(
            "http_request_duration_seconds",
            "Latency with only few buckets by handler. Made to be only used if aggregation by handler "
            "is important. ", ("method", "handler"), buckets=HTTP_LATENCY_LOWR_BUCKETS, registry=registry),
    }


def cache_config_labels(deployment: Deployment, num_engines: int) -> dict[str, str]:
    """`CacheConfig.metrics_info()` as the API server of an instance with `num_engines` data-parallel
    engines holds it once they are up.

    The API server learns num_gpu_blocks (summed over its engines), the effective block size and
    the KV capacity (one engine's) from the engines' ready messages; the flags the deployment was
    configured with are reported as given; the other fields keep the values `vllm serve` gives them
    for a dense full-attention model. Values are rendered with str(), as vLLM does (None: "None").
    """
    config = deployment.config
    blocks, block_size, max_model_len = deployment.num_gpu_blocks, config.block_size, config.max_model_len
    max_concurrency = blocks / -(-max_model_len // block_size)
    values = {
        "block_size": block_size,
        # EngineConfig cannot tell a default block size from an explicit --block-size 16
        "user_specified_block_size": block_size != DEFAULT_BLOCK_SIZE,
        "kv_cache_layout": None,
        "prefix_match_unit": None,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "cache_dtype": config.kv_cache_dtype,
        "is_attention_free": False,
        "num_gpu_blocks_override": config.num_gpu_blocks_override,
        "sliding_window": deployment.model.sliding_window,
        "enable_prefix_caching": config.enable_prefix_caching,
        "prefix_caching_hash_algo": config.prefix_caching_hash_algo,
        "prefix_cache_retention_interval": 0,
        "kv_cache_dtype_skip_layers": [],
        "mamba_page_size_padded": None,
        "skip_page_size_padded": None,
        "mamba_block_size": None,
        "mamba_cache_dtype": "auto",
        "mamba_ssm_cache_dtype": "auto",
        "mamba_cache_mode": "none",
        "enable_mamba_shared_prefix_checkpoint": False,
        "replayssm_buffer_len": 16,
        "use_replayssm": False,
        "use_kda_recoverssm": False,
        "num_gpu_blocks": blocks * num_engines,
        "num_cpu_blocks": None,
        "simple_cpu_offload_num_blocks": None,
        "effective_attention_block_size": block_size,
        "kv_cache_size_tokens": int(max_concurrency * max_model_len),
        "kv_cache_max_concurrency": max_concurrency,
        "hash_block_size": None,
        "cache_hit_alignment_tokens": None,
        "kv_sharing_fast_prefill": False,
        "swa_bounded_replay": True,
        "kv_cache_memory_bytes": config.kv_cache_memory_bytes,
        # a float field of vLLM's CacheConfig: --kv-offloading-size 2 is reported as 2.0
        "kv_offloading_size": None if config.kv_offloading_size is None else float(config.kv_offloading_size),
        "kv_offloading_backend": config.kv_offloading_backend,
        "_block_size_resolved": True,
    }
    return {key: str(value) for key, value in values.items()}


def observe_all(histogram: Histogram, values: list[float]) -> None:
    """`histogram.observe(v)` for every value, in one pass: bucket counts by numpy, one increment
    per bucket touched (prometheus-client's observe walks the buckets and locks once per value)."""
    if not values:
        return
    amounts = np.asarray(values, dtype=float)
    counts = np.bincount(np.searchsorted(histogram._upper_bounds, amounts, side="left"),
                         minlength=len(histogram._upper_bounds))
    for bucket in np.flatnonzero(counts):
        histogram._buckets[bucket].inc(int(counts[bucket]))
    histogram._sum.inc(float(amounts.sum()))


class _EngineSeries:
    """One engine's labelled children of the per-engine families, resolved once."""

    def __init__(self, families: dict, model_name: str, engine: int) -> None:
        labels = (model_name, str(engine))
        for key in ("running", "waiting", "kv_usage", "prefix_queries", "prefix_hits", "preemptions",
                    "prompt_tokens", "prompt_cached", "generation_tokens", "prompt_hist", "generation_hist",
                    "iteration_tokens", "max_generation", "n", "max_tokens", "ttft", "itl", "tpot", "e2e",
                    "queue", "inference", "prefill", "decode", "num_preemptions", "prefill_kv_computed",
                    "steps", "busy"):
            setattr(self, key, families[key].labels(*labels))
        self.waiting_by_reason = {r: families["waiting_by_reason"].labels(*labels, r) for r in WAITING_REASONS}
        self.sleep_state = {s: families["sleep_state"].labels(*labels, s) for s in SLEEP_STATES}
        self.prompt_by_source = {s: families["prompt_by_source"].labels(*labels, s) for s in PROMPT_TOKEN_SOURCES}
        self.cached_by_source = {s: families["cached_by_source"].labels(*labels, s) for s in CACHE_HIT_SOURCES}
        self.success = {r: families["success"].labels(*labels, r) for r in FINISH_REASONS}
        self.external_queries = families["external_queries"].labels(*labels)
        self.external_hits = families["external_hits"].labels(*labels)
        for key in ("flops", "read_bytes", "write_bytes", "mm_queries", "mm_hits"):
            families[key].labels(*labels)  # always exported, at 0: no MFU or multimodal
        self.seen: dict[str, int] = {}  # the engine's cumulative counts already counted, by name
        self.seen_tier_tokens: dict = {}  # KVTier -> tokens loaded from it already counted

    def grown(self, name: str, total: int) -> int:
        """How much a cumulative count of the engine's grew since last read (0 if it did not)."""
        grown = total - self.seen.get(name, 0)
        if grown <= 0:
            return 0
        self.seen[name] = total
        return grown


class _ParentRequest:
    """The n engine requests of one API request (vLLM's ParentRequest, for n > 1)."""
    __slots__ = ("n", "pending", "max_generation", "aborted")

    def __init__(self, n: int) -> None:
        self.n = n
        self.pending = n
        self.max_generation = 0
        self.aborted = False


class EngineMetrics:
    """vLLM's /metrics for the engines of one simulation.

    `engines` picks which of the simulation's engines these metrics show (default: all), labelled
    "0".."n-1" in that order: a port that serves one engine alone looks like a one-engine vLLM pod.
    `served` gives, for a cluster, each of those engines' model name and deployment (its instance's):
    one scrape then shows every instance's engines as vLLM pods would, each under its model's name.
    The info series (vllm:cache_config_info, vllm_emulator:engine_info) are set by `attach`, which
    tells each engine's instance.
    """

    def __init__(self, model_name: str, deployment: Deployment, num_engines: int,
                 registry: CollectorRegistry | None = None, engines: Sequence[int] | None = None,
                 served: Sequence[tuple[str, Deployment]] | None = None) -> None:
        if num_engines < 1:
            raise ValueError(f"num_engines must be at least 1; got {num_engines}")
        engines = list(range(num_engines)) if engines is None else list(engines)
        if len(engines) != num_engines:
            raise ValueError(f"{len(engines)} engines named for metrics of {num_engines}")
        served = list(served) if served is not None else [(model_name, deployment)] * num_engines
        self._local = {engine: label for label, engine in enumerate(engines)}  # simulation index -> label
        if registry is None:  # like the default registry vLLM uses, but owned by this server
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        self.registry = registry
        self.model_name = model_name
        self.num_engines = num_engines
        self._served = served
        families = self._families = _declare(registry, max(d.config.max_model_len for _, d in served))
        self._engine_info = families["engine_info"]
        self._engines = [_EngineSeries(families, name, e) for e, (name, _) in enumerate(served)]
        names = list(dict.fromkeys(name for name, _ in served))
        self._rejection_family = families["admission_rejections"]
        self._rejection_models = list(dict.fromkeys([model_name, *names]))  # vLLM creates their series up front
        self._rejections: dict[tuple[str, str], Counter] = {}
        self._precreate_rejections()
        self._simulated_time = [families["simulated_time"].labels(name) for name in names]
        self._speed = [families["speed"].labels(name) for name in names]
        self._http = _declare_http(registry)
        loras = [d.config.lora.max_loras for _, d in served if d.config.lora is not None]
        self._lora = LoRARequestStates(registry, loras[0]) if loras else None  # only with --enable-lora, as vLLM
        self._clock: tuple[float, float, float] | None = None  # (virtual now, speed, Unix time) at the last scrape
        self._cache_config_info = Gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                                        [*cache_config_labels(deployment, num_engines), "engine"], registry=registry)
        self._cache_config_labels: dict[int, dict[str, str]] = {}  # engine label -> its cache_config_info labels
        self.set_sleep_level(0)
        self._simulation: Simulation | None = None
        self._last_token: dict[Request, float] = {}  # request -> virtual time of its last token
        self._preemptions: dict[Request, int] = {}  # request -> preemptions already counted
        self._preempted_elsewhere: dict[Request, int] = {}  # a re-routed request -> its preemptions on a failed pod
        self._parents: dict[Request, _ParentRequest] = {}
        self._cluster: dict | None = None

    # -- wiring -------------------------------------------------------------------------------
    def attach(self, simulation: Simulation) -> None:
        """Feed the metrics from `simulation`'s engine steps, finished requests and engine state."""
        if self._simulation is not None:
            raise RuntimeError("these metrics are already attached to a simulation")
        if max(self._local) >= len(simulation.engines):
            raise ValueError(f"the simulation has {len(simulation.engines)} engines; "
                             f"the metrics were made for {self.num_engines}")
        self._simulation = simulation
        self._show_engines(simulation)
        simulation.add_listener(self._on_step)
        simulation.add_finish_listener(self._on_finish, prefills=True)  # a prefill pod counts its prefills
        simulation.add_reroute_listener(self._on_reroute)
        simulation.add_engine_down_listener(self._on_engine_down)
        simulation.add_restore_listener(self._on_restore)
        if len(simulation.instances) > 1 and len(self._local) == len(simulation.engines):  # a cluster's front door
            self._cluster = _declare_cluster(self.registry)

    def _show_engines(self, simulation: Simulation) -> None:
        """The info series, set as vLLM's API server sets cache_config_info: once its engines are up.

        Each instance is its own `vllm serve` pod, so an engine's cache_config_info sums the blocks of
        the engines of its own instance that these metrics show (its data-parallel peers), never those
        of another replica built from the same deployment."""
        instance_of = {label: simulation.instance_of[engine] for engine, label in self._local.items()}
        shown: dict[Instance, int] = {}  # how many of each instance's engines are shown here
        for instance in instance_of.values():
            shown[instance] = shown.get(instance, 0) + 1
        for label, instance in sorted(instance_of.items()):
            model_name, deployment = self._served[label]
            engine = str(label)
            self._cache_config_labels[label] = {**cache_config_labels(deployment, shown[instance]), "engine": engine}
            self._cache_config_info.labels(**self._cache_config_labels[label]).set(1)
            self._engine_info.labels(engine, instance.name, model_name, deployment.device.name).set(1)

    # -- faults -------------------------------------------------------------------------------
    def _on_engine_down(self, engine: int, now: float) -> None:
        """Its pod died: a scrape of it fails, so none of its vLLM series is seen until a new process is up."""
        label = self._local.get(engine)
        if label is None:
            return
        for key, family in self._families.items():
            if key not in NOT_PER_PROCESS:
                family.remove_by_labels({"engine": str(label)})
        self._cache_config_info.remove_by_labels({"engine": str(label)})

    def _on_restore(self, instance: Instance) -> None:
        """A new vLLM process on the instance: its engines' series from zero, awake, its cache config set
        again once its engines are up; a port that shows this instance alone restarts its front end's too."""
        shown = [(engine, self._local[engine.index]) for engine in instance.engines if engine.index in self._local]
        for engine, label in shown:
            series = self._engines[label] = _EngineSeries(self._families, self._served[label][0], label)
            series.sleep_state["awake"].set(1)
            # the engine's cumulative counts so far are the dead process's
            kv = engine.kv
            series.seen = {"prefix_queries": kv.prefix_queries, "prefix_hits": kv.prefix_hits,
                           "external_queries": kv.external_queries, "external_hits": kv.external_hits}
            series.seen_tier_tokens = {tier: blocks * kv.block_size for tier, blocks in
                                       self._simulation.transfers.stats[engine.index].tier_loaded_blocks.items()}
            self._cache_config_info.labels(**self._cache_config_labels[label]).set(1)
        if shown and len(shown) == len(self._local):
            for collector in self._http.values():
                self.registry.unregister(collector)
            self._http = _declare_http(self.registry)
            self._rejection_family.clear()
            self._precreate_rejections()
            if self._lora is not None:
                self._lora.clear()

    def _on_reroute(self, request: Request) -> None:
        """A fault sent it to another pod, where it is a new request: its preemptions on the failed pod
        are not the new one's to count."""
        if request.num_preemptions:
            self._preemptions[request] = self._preempted_elsewhere[request] = request.num_preemptions

    def _precreate_rejections(self) -> None:
        self._rejections = {(name, r): self._rejection_family.labels(name, r)
                            for name in self._rejection_models for r in ADMISSION_REASONS}

    # -- events from the server -----------------------------------------------------------
    def add_parent_request(self, children: Sequence[Request]) -> None:
        """The engine requests of one API request with n > 1, registered before any finishes.

        vLLM observes `request_params_n` and `request_max_num_generation_tokens` once per API
        request, when its last child finishes; a lone request is observed with n = 1.
        """
        parent = _ParentRequest(len(children))
        for child in children:
            self._parents[child] = parent

    def observe_admission_rejection(self, reason: str, model_name: str | None = None) -> None:
        """A request refused with 503 because a queue limit was reached; `model_name`: the refusing pod's
        (a cluster's front door: that of the instances serving the model asked for; default: these
        metrics' own)."""
        if reason not in ADMISSION_REASONS:
            raise ValueError(f"unknown admission rejection reason {reason!r}; "
                             f"expected one of {', '.join(ADMISSION_REASONS)}")
        key = (model_name or self.model_name, reason)
        if key not in self._rejections:
            self._rejections[key] = self._rejection_family.labels(*key)
        self._rejections[key].inc()

    def set_sleep_level(self, level: int) -> None:
        """0 = awake; 1 = weights offloaded; 2 = weights and KV cache discarded (vLLM's /sleep)."""
        if level not in (0, 1, 2):
            raise ValueError(f"sleep level must be 0, 1 or 2; got {level}")
        values = {"awake": int(level == 0), "weights_offloaded": int(level == 1), "discard_all": int(level == 2)}
        for engine in self._engines:
            for state, gauge in engine.sleep_state.items():
                gauge.set(values[state])

    def set_clock(self, virtual_now: float, speed: float) -> None:
        """The virtual time now and the speed, at a scrape (they also map virtual times to Unix times)."""
        self._clock = (virtual_now, speed, time.time())
        for gauge in self._simulated_time:
            gauge.set(virtual_now)
        for gauge in self._speed:
            gauge.set(speed)

    def observe_http(self, handler: str | None, method: str, status: int, request_bytes: int,
                     response_bytes: int, seconds: float) -> None:
        """One HTTP exchange, as prometheus-fastapi-instrumentator records it for `vllm serve`.

        `handler` is the route's path template (None for an unmatched path); sizes are the
        Content-Length headers (0 when absent); `seconds` is the latency in virtual time.
        """
        if handler in HTTP_EXCLUDED_HANDLERS:
            return
        handler = handler or "none"
        http = self._http
        http["requests"].labels(method, f"{status // 100}xx", handler).inc()
        http["request_size"].labels(handler).observe(request_bytes)
        http["response_size"].labels(handler).observe(response_bytes)
        http["latency_highr"].observe(seconds)
        http["latency_lowr"].labels(method, handler).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The /metrics body and its content type.

        vLLM's /metrics route (the Instrumentator's `expose`) always answers the text format,
        whatever the scraper's Accept header asks for.
        """
        self._read_engines()
        if self._lora is not None:
            self._lora.render(self._unix_time)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def _unix_time(self, virtual: float) -> float:
        """The Unix time of a virtual instant, as the server's clock runs (virtual seconds before any scrape)."""
        if self._clock is None:
            return virtual
        now, speed, unix = self._clock
        return unix - (now - virtual) / speed

    # -- from the simulation -----------------------------------------------------------------
    def _on_step(self, record: StepRecord) -> None:
        label = self._local.get(record.engine)
        if label is None:
            return  # another pod's engine
        series = self._engines[label]
        series.steps.inc()
        series.busy.inc(record.duration)
        if self._lora is not None:
            self._lora.on_step(record)
        got_token = record.got_token
        if not got_token:
            return  # vLLM records iteration stats only for steps with outputs
        # Per step, not per token: the per-token work is a dict lookup; the histograms are fed once.
        now = record.end
        last_token = self._last_token
        first, itl = [], []
        for request in got_token:
            last = last_token.get(request)
            if last is None:  # its first token: the front end leaves the prefill state
                first.append(request)
            else:
                itl.append(now - last)
            last_token[request] = now
        observe_all(series.itl, itl)
        prompt = cached = external = 0
        for request in first:
            prompt += request.num_prompt_tokens
            cached += max(request.num_cached_tokens, 0)
            external += request.num_external_tokens
        if first:
            observe_all(series.ttft, [now - request.arrival_time for request in first])
        # a preemption reaches vLLM's front end with the request's next output
        preempted = 0
        for request in got_token:
            if request.num_preemptions:
                counted = self._preemptions.get(request, 0)
                if request.num_preemptions != counted:
                    preempted += request.num_preemptions - counted
                    self._preemptions[request] = request.num_preemptions
        computed = prompt - cached - external
        if prompt:
            series.prompt_tokens.inc(prompt)
            series.prompt_by_source["local_compute"].inc(computed)
            series.prompt_by_source["local_cache_hit"].inc(cached)
            series.prompt_by_source["external_kv_transfer"].inc(external)
            series.prompt_cached.inc(cached + external)
        if preempted:
            series.preemptions.inc(preempted)
        series.generation_tokens.inc(len(got_token))
        series.iteration_tokens.observe(computed + len(got_token))

    def _on_finish(self, request: Request) -> None:
        if self._lora is not None and request.lora is not None:
            self._lora.update(request, waiting=False, running=False)
        self._last_token.pop(request, None)
        self._preemptions.pop(request, None)
        preempted_elsewhere = self._preempted_elsewhere.pop(request, 0)
        parent = self._parents.pop(request, None)
        label = self._local.get(request.engine_index)
        if label is None:
            return  # another pod's engine
        if not self._simulation.instance_of[request.engine_index].up:
            return  # lost with its pod: a dead vLLM process records nothing more (nor its parent, ever)
        if request.status == RequestStatus.FINISHED_ABORTED:
            if parent is not None:
                parent.aborted = True  # vLLM's front end aborts all n together
            return  # aborted by the front end: vLLM records no finished-request stats
        if parent is not None and parent.aborted:
            return
        series = self._engines[label]
        generated = request.num_output_tokens
        # A request that ended with an error before it was scheduled or had a token (its instance failed, its
        # KV load failed) never reached those points: the intervals up to them are observed as empty (vLLM
        # subtracts its unset timestamps, 0.0, and observes nonsense there).
        queued = request.queued_time if request.queued_time is not None else request.arrival_time
        scheduled = request.scheduled_time if request.scheduled_time is not None else queued
        first = request.first_token_time if request.first_token_time is not None else scheduled
        last = request.last_token_time if request.last_token_time is not None else first
        decode = last - first
        series.success[request.finish_reason].inc()
        series.e2e.observe(request.finish_time - request.arrival_time)
        series.queue.observe(scheduled - queued)
        series.prefill.observe(first - scheduled)
        series.inference.observe(last - scheduled)
        series.decode.observe(decode)
        series.num_preemptions.observe(request.num_preemptions - preempted_elsewhere)
        series.prefill_kv_computed.observe(request.num_prompt_tokens - request.num_cached_tokens_reported)
        series.prompt_hist.observe(request.num_prompt_tokens)
        series.generation_hist.observe(generated)
        series.tpot.observe(decode / (generated - 1) if generated > 1 else 0.0)
        if request.max_tokens:
            series.max_tokens.observe(request.max_tokens)
        if parent is None:
            series.n.observe(1)
            series.max_generation.observe(generated)
            return
        parent.max_generation = max(parent.max_generation, generated)
        parent.pending -= 1
        if parent.pending == 0:
            series.n.observe(parent.n)
            series.max_generation.observe(parent.max_generation)

    def _read_cluster(self) -> None:
        _read_cluster_into(self._cluster, self._simulation)

    def _read_engines(self) -> None:
        """Scheduler gauges and prefix-cache counters, as of the engines' latest step."""
        if self._simulation is None:
            return
        if self._cluster is not None:
            self._read_cluster()
        for engine, label in self._local.items():
            if not self._simulation.instance_of[engine].up:
                continue  # a dead pod: its series are gone until it is restored
            instance, series = self._simulation.engines[engine], self._engines[label]
            waiting = instance.num_waiting
            deferred = deferred_requests(instance)
            series.running.set(instance.num_running)
            series.waiting.set(waiting)
            series.waiting_by_reason["capacity"].set(waiting - deferred)
            series.waiting_by_reason["deferred"].set(deferred)
            series.kv_usage.set(instance.kv.usage)
            kv = instance.kv
            if queries := series.grown("prefix_queries", kv.prefix_queries):
                series.prefix_queries.inc(queries)
            if hits := series.grown("prefix_hits", kv.prefix_hits):
                series.prefix_hits.inc(hits)
                series.cached_by_source["device"].inc(hits)
            if queries := series.grown("external_queries", kv.external_queries):
                series.external_queries.inc(queries)
            if hits := series.grown("external_hits", kv.external_hits):
                series.external_hits.inc(hits)
                self._count_external_hits(series, engine, hits)

    def _count_external_hits(self, series: _EngineSeries, engine: int, hits: int) -> None:
        """Cached tokens from outside the GPU by the connector that supplied them, as vLLM labels each: an
        offload tier in host memory (OffloadingConnector: host; LMCache's pool: unspecified), or another
        instance (P/D)."""
        instance = self._simulation.engines[engine]
        for tier, blocks in self._simulation.transfers.stats[engine].tier_loaded_blocks.items():
            source = "external_unspecified" if tier.spec.name == "lmcache" else "host"
            tokens = min(blocks * instance.kv.block_size - series.seen_tier_tokens.get(tier, 0), hits)
            if tokens > 0:
                series.cached_by_source[source].inc(tokens)
                series.seen_tier_tokens[tier] = series.seen_tier_tokens.get(tier, 0) + tokens
                hits -= tokens
        if hits > 0:
            connector = instance.config.kv_transfer.get("kv_connector", DEFAULT_CONNECTOR)
            series.cached_by_source["p2p" if connector in P2P_CONNECTORS else "external_unspecified"].inc(hits)


def deferred_requests(engine) -> int:
    """vLLM's deferred waiting requests: those a schedule pass skipped because their KV was loading
    (WAITING_FOR_REMOTE_KVS) or max_loras kept their adapter out; each stays deferred until it is scheduled."""
    lora = engine.scheduler.lora_deferred
    if not engine.scheduler.num_loading and engine.kv.offload is None and not engine.config.kv_transfer:
        return len(lora)
    stages = kv_fetch_stages(engine)
    return (stages["in_progress"] + stages["completed_waiting"]
            + sum(1 for r in lora if not r.kv_loading and r.kv_blocks is None))


class LoRARequestStates:
    """`vllm:lora_requests_info`, as vLLM's front end keeps it (LoRARequestStates, v1/metrics/stats.py, fed
    the engine core's events with each request's outputs; loggers.py sets the gauge).

    An adapter's request counts from its first output on, which brings its QUEUED and SCHEDULED events: as
    running, or as waiting when the output comes back after a preemption (an async step's stale token,
    with its PREEMPTED event); it is forgotten when it finishes. After every engine step the series of the
    current label values is set to the time (vLLM: the Unix time at which it records the step). Both adapter
    labels list every adapter with a request, waiting or running, in the order they first had one: vLLM 0.33
    fills its waiting and running counts from the same keys and joins the keys."""

    def __init__(self, registry: CollectorRegistry, max_loras: int) -> None:
        self.gauge = Gauge("vllm:lora_requests_info", "Running stats on lora requests.",
                           ("max_lora", "waiting_lora_adapters", "running_lora_adapters"), registry=registry)
        self.max_lora = str(max_loras)
        self.requests: dict[str, tuple[set[Request], set[Request]]] = {}  # adapter -> (waiting, running)
        self.set_at: dict[tuple[str, str, str], float] = {}  # label values -> virtual time last set

    def clear(self) -> None:
        """A new front end: no adapter's request, no series."""
        self.requests.clear()
        self.set_at.clear()
        self.gauge.clear()

    def update(self, request: Request, waiting: bool, running: bool) -> None:
        name = request.lora.name
        entry = self.requests.get(name)
        if entry is None:
            entry = self.requests[name] = (set(), set())
        for state, member in zip(entry, (waiting, running)):
            if member:
                state.add(request)
            else:
                state.discard(request)
        if not entry[0] and not entry[1]:
            del self.requests[name]

    def on_step(self, record: StepRecord) -> None:
        preempted = RequestStatus.PREEMPTED
        for request in record.got_token:
            if request.lora is not None:
                stale = request.status == preempted
                self.update(request, waiting=stale, running=not stale)
        for request in record.finished:
            if request.lora is not None:
                self.update(request, waiting=False, running=False)
        self.record(record.end)

    def record(self, virtual_time: float) -> None:
        """An engine step was recorded at `virtual_time`: the current label values' series is set to it."""
        adapters = ",".join(self.requests)
        self.set_at[(self.max_lora, adapters, adapters)] = virtual_time

    def render(self, unix_time: Callable[[float], float]) -> None:
        for labels, virtual in self.set_at.items():
            self.gauge.labels(*labels).set(unix_time(virtual))


def _declare_cluster(registry: CollectorRegistry) -> dict:
    """The emulator's series about a cluster behind one front door."""
    labels = ("cluster_instance", "model_name", "role")  # not `instance`: Prometheus' target label
    return {
        "up": Gauge("vllm_emulator:instance_up", "1 while the instance is up, 0 while it is down (a fault).", labels,
                    registry=registry),
        "routed": Counter("vllm_emulator:routing_decisions", "Routing decisions of the cluster's router for each "
                          "instance (one per HTTP request sent in, P/D hand-over or re-route), by routing policy.",
                          ("policy", *labels), registry=registry),
        "outstanding": Gauge("vllm_emulator:instance_outstanding_tokens", "Tokens the instance still owes, as a "
                             "gateway counts them (prompt plus max_tokens, less tokens streamed).", labels,
                             registry=registry),
        "seen": {},
    }


def _cluster_labels(instance) -> tuple[str, str, str]:
    return instance.name, instance.served_model_names[0], instance.role


def _read_cluster_into(series: dict, simulation: Simulation) -> None:
    policy = getattr(simulation.routing, "name", type(simulation.routing).__name__)
    seen = series["seen"]
    for instance in simulation.instances:
        labels = _cluster_labels(instance)
        series["up"].labels(*labels).set(1 if instance.up else 0)
        series["outstanding"].labels(*labels).set(max(instance.outstanding_tokens, 0))
        routed = simulation.routing_decisions.get(instance.name, 0)
        counter = series["routed"].labels(policy, *labels)
        if routed > seen.get(instance.name, 0):
            counter.inc(routed - seen.get(instance.name, 0))
            seen[instance.name] = routed
