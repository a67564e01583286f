"""Every flag of `vllm serve` 0.33.0, so a command line written for vLLM is accepted unchanged.

Read from vLLM's own `vllm serve --help=all` (captured in
../shared/reference/vllm-0.33.0-serve-help.txt): each entry is the flag's spellings
and how it takes its value ("flag": none; "value": one; "optional": zero or one;
"list": one or more). `serve` defines the flags it honours itself; the others are
accepted through this table and listed once at start-up as not simulated.
"""
from __future__ import annotations

import argparse
import json

from emulator.engine_flags import human_readable_int

VLLM_SERVE_FLAGS = (
    (('--aggregate-engine-logging',), 'flag'),
    (('--api-server-count', '-asc'), 'value'),
    (('--disable-log-stats',), 'flag'),
    (('--enable-log-requests', '--disable-log-requests'), 'flag'),
    (('--fail-on-environ-validation', '--no-fail-on-environ-validation'), 'flag'),
    (('--gdn-prefill-backend',), 'value'),
    (('--grpc',), 'flag'),
    (('--headless',), 'flag'),
    (('--kda-decode-backend',), 'value'),
    (('--kda-prefill-backend',), 'value'),
    (('--shutdown-timeout',), 'value'),
    (('--allow-credentials', '--no-allow-credentials'), 'flag'),
    (('--allowed-headers',), 'value'),
    (('--allowed-methods',), 'value'),
    (('--allowed-origins',), 'value'),
    (('--anthropic-disabled-thinking-effort',), 'value'),
    (('--api-key',), 'list'),
    (('--chat-template',), 'value'),
    (('--chat-template-content-format',), 'value'),
    (('--cohere-format',), 'value'),
    (('--cohere-is-reasoning-model', '--no-cohere-is-reasoning-model'), 'flag'),
    (('--data-parallel-supervisor-port',), 'value'),
    (('--default-chat-template-kwargs',), 'value'),
    (('--disable-access-log-for-endpoints',), 'value'),
    (('--disable-fastapi-docs', '--enable-fastapi-docs'), 'flag'),
    (('--disable-uvicorn-access-log', '--enable-uvicorn-access-log'), 'flag'),
    (('--dp-supervisor-probe-failure-threshold',), 'value'),
    (('--dp-supervisor-probe-interval-s',), 'value'),
    (('--dp-supervisor-probe-timeout-s',), 'value'),
    (('--enable-auto-tool-choice', '--disable-auto-tool-choice'), 'flag'),
    (('--enable-flash-late-interaction', '--disable-flash-late-interaction'), 'flag'),
    (('--enable-force-include-usage', '--disable-force-include-usage'), 'flag'),
    (('--enable-log-deltas', '--disable-log-deltas'), 'flag'),
    (('--enable-log-outputs', '--disable-log-outputs'), 'flag'),
    (('--enable-offline-docs', '--disable-offline-docs'), 'flag'),
    (('--enable-per-request-metrics', '--disable-per-request-metrics'), 'flag'),
    (('--enable-prompt-tokens-details', '--disable-prompt-tokens-details'), 'flag'),
    (('--enable-request-id-headers', '--disable-request-id-headers'), 'flag'),
    (('--enable-scale-out', '--disable-scale-out'), 'flag'),
    (('--enable-server-load-tracking', '--disable-server-load-tracking'), 'flag'),
    (('--enable-ssl-refresh', '--disable-ssl-refresh'), 'flag'),
    (('--enable-tokenizer-info-endpoint', '--disable-tokenizer-info-endpoint'), 'flag'),
    (('--exclude-tools-when-tool-choice-none', '--no-exclude-tools-when-tool-choice-none'), 'flag'),
    (('--fingerprint-mode',), 'value'),
    (('--fingerprint-value',), 'value'),
    (('--grpc-port',), 'value'),
    (('--h11-max-header-count',), 'value'),
    (('--h11-max-incomplete-event-size',), 'value'),
    (('--host',), 'value'),
    (('--log-error-stack', '--no-log-error-stack'), 'flag'),
    (('--lora-modules',), 'list'),
    (('--max-log-len',), 'value'),
    (('--middleware',), 'value'),
    (('--port',), 'value'),
    (('--reasoning-effort-map',), 'value'),
    (('--response-role',), 'value'),
    (('--return-tokens-as-token-ids', '--no-return-tokens-as-token-ids'), 'flag'),
    (('--root-path',), 'value'),
    (('--sse-keep-alive-interval',), 'value'),
    (('--ssl-ca-certs',), 'value'),
    (('--ssl-cert-reqs',), 'value'),
    (('--ssl-certfile',), 'value'),
    (('--ssl-ciphers',), 'value'),
    (('--ssl-keyfile',), 'value'),
    (('--tokens-only', '--no-tokens-only'), 'flag'),
    (('--tool-call-parser',), 'value'),
    (('--tool-parser-plugin',), 'value'),
    (('--tool-server',), 'value'),
    (('--tool-strict-level',), 'value'),
    (('--trust-request-chat-template', '--no-trust-request-chat-template'), 'flag'),
    (('--trust-request-mm-kwargs', '--no-trust-request-mm-kwargs'), 'flag'),
    (('--uds',), 'value'),
    (('--uvicorn-log-level',), 'value'),
    (('--allow-deprecated-quantization', '--no-allow-deprecated-quantization'), 'flag'),
    (('--allowed-local-media-path',), 'value'),
    (('--allowed-media-domains',), 'list'),
    (('--code-revision',), 'value'),
    (('--config-format',), 'value'),
    (('--convert',), 'value'),
    (('--disable-cascade-attn', '--enable-cascade-attn'), 'flag'),
    (('--disable-sliding-window', '--enable-sliding-window'), 'flag'),
    (('--dtype',), 'value'),
    (('--enable-cumem-allocator', '--disable-cumem-allocator'), 'flag'),
    (('--enable-nccl-comm-suspend', '--disable-nccl-comm-suspend'), 'flag'),
    (('--enable-prompt-embeds', '--disable-prompt-embeds'), 'flag'),
    (('--enable-return-routed-experts', '--disable-return-routed-experts'), 'flag'),
    (('--enable-sleep-mode', '--disable-sleep-mode'), 'flag'),
    (('--enable-trace-replay', '--disable-trace-replay'), 'flag'),
    (('--enforce-eager', '--no-enforce-eager'), 'flag'),
    (('--generation-config',), 'value'),
    (('--hf-config-path',), 'value'),
    (('--hf-overrides',), 'value'),
    (('--hf-token',), 'optional'),
    (('--io-processor-plugin',), 'value'),
    (('--logits-processors',), 'list'),
    (('--logprobs-mode',), 'value'),
    (('--max-logprobs',), 'value'),
    (('--max-model-len',), 'value'),
    (('--model',), 'value'),
    (('--model-class-overrides',), 'value'),
    (('--model-impl',), 'value'),
    (('--override-generation-config',), 'value'),
    (('--pooler-config',), 'value'),
    (('--quantization', '-q'), 'value'),
    (('--quantization-config',), 'value'),
    (('--renderer-num-workers',), 'value'),
    (('--return-sampling-mask', '--no-return-sampling-mask'), 'flag'),
    (('--revision',), 'value'),
    (('--runner',), 'value'),
    (('--seed',), 'value'),
    (('--served-model-name',), 'list'),
    (('--skip-tokenizer-init', '--no-skip-tokenizer-init'), 'flag'),
    (('--sleep-mode-backend',), 'value'),
    (('--sleep-mode-offload-cudagraph', '--no-sleep-mode-offload-cudagraph'), 'flag'),
    (('--sleep-preserve-parameter-names',), 'list'),
    (('--tokenizer',), 'value'),
    (('--tokenizer-mode',), 'value'),
    (('--tokenizer-revision',), 'value'),
    (('--trust-remote-code', '--no-trust-remote-code'), 'flag'),
    (('--use-fp64-gumbel', '--no-use-fp64-gumbel'), 'flag'),
    (('--download-dir',), 'value'),
    (('--ignore-patterns',), 'list'),
    (('--load-format',), 'value'),
    (('--model-loader-extra-config',), 'value'),
    (('--pt-load-map-location',), 'value'),
    (('--safetensors-load-strategy',), 'value'),
    (('--safetensors-prefetch-block-size',), 'value'),
    (('--safetensors-prefetch-num-threads',), 'value'),
    (('--use-tqdm-on-load', '--no-use-tqdm-on-load'), 'flag'),
    (('--attention-backend',), 'value'),
    (('--enable-mamba-cache-stochastic-rounding', '--disable-mamba-cache-stochastic-rounding'), 'flag'),
    (('--mamba-backend',), 'value'),
    (('--mamba-cache-philox-rounds',), 'value'),
    (('--mamba-ssu-algorithm',), 'value'),
    (('--reasoning-parser',), 'value'),
    (('--reasoning-parser-plugin',), 'value'),
    (('--all2all-backend',), 'value'),
    (('--cp-kv-cache-interleave-size',), 'value'),
    (('--cpu-distributed-timeout-seconds',), 'value'),
    (('--data-parallel-address', '-dpa'), 'value'),
    (('--data-parallel-backend', '-dpb'), 'value'),
    (('--data-parallel-external-lb', '--no-data-parallel-external-lb', '-dpe'), 'flag'),
    (('--data-parallel-hybrid-lb', '--no-data-parallel-hybrid-lb', '-dph'), 'flag'),
    (('--data-parallel-multi-port-external-lb', '-dpm'), 'flag'),
    (('--data-parallel-rank', '-dpn'), 'value'),
    (('--data-parallel-rpc-port', '-dpp'), 'value'),
    (('--data-parallel-size', '-dp'), 'value'),
    (('--data-parallel-size-local', '-dpl'), 'value'),
    (('--data-parallel-start-rank', '-dpr'), 'value'),
    (('--dbo-decode-token-threshold',), 'value'),
    (('--dbo-prefill-token-threshold',), 'value'),
    (('--dcp-comm-backend',), 'value'),
    (('--dcp-kv-cache-interleave-size',), 'value'),
    (('--dcp-q-replicate', '--no-dcp-q-replicate'), 'flag'),
    (('--decode-context-parallel-size', '-dcp'), 'value'),
    (('--device-ids',), 'value'),
    (('--disable-custom-all-reduce', '--enable-custom-all-reduce'), 'flag'),
    (('--disable-nccl-for-dp-synchronization', '--enable-nccl-for-dp-synchronization'), 'flag'),
    (('--distributed-executor-backend',), 'value'),
    (('--distributed-timeout-seconds',), 'value'),
    (('--dp-sync-interval',), 'value'),
    (('--elastic-ep-max-dp-size',), 'value'),
    (('--enable-batch-sharded-sampling', '--disable-batch-sharded-sampling'), 'flag'),
    (('--enable-dbo', '--disable-dbo'), 'flag'),
    (('--enable-elastic-ep', '--disable-elastic-ep'), 'flag'),
    (('--enable-ep-weight-filter', '--disable-ep-weight-filter'), 'flag'),
    (('--enable-eplb', '--disable-eplb'), 'flag'),
    (('--enable-expert-parallel', '-ep', '--disable-expert-parallel'), 'flag'),
    (('--enable-fault-tolerance', '--disable-fault-tolerance'), 'flag'),
    (('--enable-hc-sp', '--disable-hc-sp'), 'flag'),
    (('--enable-shm-tensor-arena', '--disable-shm-tensor-arena'), 'flag'),
    (('--eplb-config',), 'value'),
    (('--expert-placement-strategy',), 'value'),
    (('--fault-tolerance-config',), 'value'),
    (('--master-addr',), 'value'),
    (('--master-port',), 'value'),
    (('--max-parallel-loading-workers',), 'value'),
    (('--nnodes', '-n'), 'value'),
    (('--node-rank', '-r'), 'value'),
    (('--numa-bind', '--no-numa-bind'), 'flag'),
    (('--numa-bind-cpus',), 'list'),
    (('--numa-bind-nodes',), 'list'),
    (('--pipeline-parallel-size', '-pp'), 'value'),
    (('--prefill-context-parallel-size', '-pcp'), 'value'),
    (('--ray-workers-use-nsight', '--no-ray-workers-use-nsight'), 'flag'),
    (('--tensor-parallel-size', '-tp'), 'value'),
    (('--ubatch-size',), 'value'),
    (('--worker-cls',), 'value'),
    (('--worker-extension-cls',), 'value'),
    (('--block-size',), 'value'),
    (('--enable-mamba-shared-prefix-checkpoint', '--disable-mamba-shared-prefix-checkpoint'), 'flag'),
    (('--enable-prefix-caching', '--disable-prefix-caching'), 'flag'),
    (('--gpu-memory-utilization', '--device-memory-utilization'), 'value'),
    (('--kv-cache-dtype',), 'value'),
    (('--kv-cache-dtype-skip-layers',), 'list'),
    (('--kv-cache-memory-bytes',), 'value'),
    (('--kv-offloading-backend',), 'value'),
    (('--kv-offloading-size',), 'value'),
    (('--kv-sharing-fast-prefill', '--no-kv-sharing-fast-prefill'), 'flag'),
    (('--mamba-block-size',), 'value'),
    (('--mamba-cache-dtype',), 'value'),
    (('--mamba-cache-mode',), 'value'),
    (('--mamba-ssm-cache-dtype',), 'value'),
    (('--num-gpu-blocks-override',), 'value'),
    (('--prefix-cache-retention-interval',), 'value'),
    (('--prefix-caching-hash-algo',), 'value'),
    (('--prefix-match-unit',), 'value'),
    (('--replayssm-buffer-len',), 'value'),
    (('--swa-bounded-replay', '--no-swa-bounded-replay'), 'flag'),
    (('--use-replayssm', '--no-use-replayssm'), 'flag'),
    (('--cpu-offload-gb',), 'value'),
    (('--cpu-offload-params',), 'list'),
    (('--offload-backend',), 'value'),
    (('--offload-group-size',), 'value'),
    (('--offload-num-in-group',), 'value'),
    (('--offload-params',), 'list'),
    (('--offload-prefetch-step',), 'value'),
    (('--enable-mm-embeds', '--disable-mm-embeds'), 'flag'),
    (('--interleave-mm-strings', '--no-interleave-mm-strings'), 'flag'),
    (('--language-model-only', '--no-language-model-only'), 'flag'),
    (('--limit-mm-per-prompt',), 'value'),
    (('--media-io-kwargs',), 'value'),
    (('--mm-device-do-normalize', '--no-mm-device-do-normalize'), 'flag'),
    (('--mm-encoder-attn-backend',), 'value'),
    (('--mm-encoder-attn-dtype',), 'value'),
    (('--mm-encoder-fp8-scale-path',), 'value'),
    (('--mm-encoder-fp8-scale-save-margin',), 'value'),
    (('--mm-encoder-fp8-scale-save-path',), 'value'),
    (('--mm-encoder-only', '--no-mm-encoder-only'), 'flag'),
    (('--mm-encoder-tp-mode',), 'value'),
    (('--mm-hasher-algorithm',), 'value'),
    (('--mm-ipc-gpu-memory-gb',), 'value'),
    (('--mm-processor-cache-gb',), 'value'),
    (('--mm-processor-cache-type',), 'value'),
    (('--mm-processor-device',), 'value'),
    (('--mm-processor-kwargs',), 'value'),
    (('--mm-shm-cache-max-object-size-mb',), 'value'),
    (('--mm-tensor-ipc',), 'value'),
    (('--skip-mm-profiling', '--no-skip-mm-profiling'), 'flag'),
    (('--video-pruning-method',), 'value'),
    (('--video-pruning-rate',), 'value'),
    (('--default-mm-loras',), 'value'),
    (('--enable-lora', '--disable-lora'), 'flag'),
    (('--enable-mixed-moe-lora-format', '--disable-mixed-moe-lora-format'), 'flag'),
    (('--enable-moe-shared-loras', '--disable-moe-shared-loras'), 'flag'),
    (('--enable-tower-connector-lora', '--disable-tower-connector-lora'), 'flag'),
    (('--fully-sharded-loras', '--no-fully-sharded-loras'), 'flag'),
    (('--lora-dtype',), 'value'),
    (('--lora-target-modules',), 'list'),
    (('--max-cpu-loras',), 'value'),
    (('--max-lora-cls-labels',), 'value'),
    (('--max-lora-rank',), 'value'),
    (('--max-loras',), 'value'),
    (('--specialize-active-lora', '--no-specialize-active-lora'), 'flag'),
    (('--log-config-file',), 'value'),
    (('--log-level',), 'value'),
    (('--logging-config',), 'value'),
    (('--collect-detailed-traces',), 'list'),
    (('--cudagraph-metrics', '--no-cudagraph-metrics'), 'flag'),
    (('--custom-histogram-buckets',), 'value'),
    (('--enable-layerwise-nvtx-tracing', '--disable-layerwise-nvtx-tracing'), 'flag'),
    (('--enable-logging-iteration-details', '--disable-logging-iteration-details'), 'flag'),
    (('--enable-mfu-metrics', '--disable-mfu-metrics'), 'flag'),
    (('--jit-monitor-mode',), 'value'),
    (('--jit-monitor-verbose', '--no-jit-monitor-verbose'), 'flag'),
    (('--kv-cache-metrics', '--no-kv-cache-metrics'), 'flag'),
    (('--kv-cache-metrics-sample',), 'value'),
    (('--otlp-traces-endpoint',), 'value'),
    (('--per-request-spec-decode-metrics',), 'value'),
    (('--show-hidden-metrics-for-version',), 'value'),
    (('--async-scheduling', '--no-async-scheduling'), 'flag'),
    (('--disable-chunked-mm-input', '--enable-chunked-mm-input'), 'flag'),
    (('--disable-hybrid-kv-cache-manager', '--enable-hybrid-kv-cache-manager'), 'flag'),
    (('--enable-chunked-prefill', '--disable-chunked-prefill'), 'flag'),
    (('--long-prefill-token-threshold',), 'value'),
    (('--long-prefill-token-threshold-adaptive', '--no-long-prefill-token-threshold-adaptive'), 'flag'),
    (('--max-num-active-seqs',), 'value'),
    (('--max-num-batched-tokens',), 'value'),
    (('--max-num-queued-reqs',), 'value'),
    (('--max-num-queued-tokens',), 'value'),
    (('--max-num-scheduled-tokens',), 'value'),
    (('--max-num-seqs',), 'value'),
    (('--prefill-schedule-interval',), 'value'),
    (('--scheduler-cls',), 'value'),
    (('--scheduler-reserve-full-isl', '--no-scheduler-reserve-full-isl'), 'flag'),
    (('--scheduling-policy',), 'value'),
    (('--stream-interval',), 'value'),
    (('--watermark',), 'value'),
    (('--cudagraph-capture-sizes',), 'list'),
    (('--max-cudagraph-capture-size',), 'value'),
    (('--enable-flashinfer-autotune', '--disable-flashinfer-autotune'), 'flag'),
    (('--ir-op-priority',), 'value'),
    (('--linear-backend',), 'value'),
    (('--moe-backend',), 'value'),
    (('--monokernel', '--no-monokernel'), 'flag'),
    (('--sparse-indexer-topk-backend',), 'value'),
    (('--additional-config',), 'value'),
    (('--attention-config', '-ac'), 'value'),
    (('--aux-output-config',), 'value'),
    (('--compilation-config', '-cc'), 'value'),
    (('--diffusion-config', '-dc'), 'value'),
    (('--ec-manager-config',), 'value'),
    (('--ec-transfer-config',), 'value'),
    (('--engram-config',), 'value'),
    (('--kernel-config',), 'value'),
    (('--kv-events-config',), 'value'),
    (('--kv-transfer-config',), 'value'),
    (('--optimization-level',), 'value'),
    (('--performance-mode',), 'value'),
    (('--profiler-config',), 'value'),
    (('--reasoning-config',), 'value'),
    (('--spec-method',), 'value'),
    (('--spec-model',), 'value'),
    (('--spec-tokens',), 'value'),
    (('--speculative-config', '-sc'), 'value'),
    (('--structured-outputs-config',), 'value'),
    (('--watchdog-config',), 'value'),
    (('--watermark-config',), 'value'),
    (('--weight-transfer-config',), 'value'),
)

_NARGS = {"flag": 0, "value": None, "optional": "?", "list": "+"}
# How vLLM's argparse reads the values of some flags accepted here, so that a value it refuses is refused
# alike: human_readable_int (1k = 1000, 1K = 1024, vllm/engine/arg_utils.py) and argparse choices
VALUE_KWARGS = {
    "--max-num-scheduled-tokens": {"type": human_readable_int},
    "--safetensors-prefetch-block-size": {"type": human_readable_int},
    "--dtype": {"choices": ["auto", "bfloat16", "float", "float16", "float32", "half"]},
    # vLLM's FrontendArgs read these three with json.loads (one JSON list each)
    "--allowed-origins": {"type": json.loads},
    "--allowed-methods": {"type": json.loads},
    "--allowed-headers": {"type": json.loads},
}
UNSUPPORTED_PREFIX = "vllm_unsupported__"


class _StoreSpelling(argparse.Action):
    """Keeps the spelling used (vLLM's hidden `--no-enable-x` is kept as `--disable-x`, which it means)."""

    def __init__(self, *args, canonical: dict[str, str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.canonical = canonical or {}

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, self.canonical.get(option_string, option_string))


_INVERSE_PREFIXES = {"--enable-": "--disable-", "--disable-": "--enable-"}


def hidden_negation(names: tuple[str, ...]) -> tuple[str, str] | None:
    """vLLM's hidden spelling of an `--enable-x`/`--disable-x` pair, and the visible one it means: its
    EnableDisableAction keeps BooleanOptionalAction's `--no-<first name>` (vllm/utils/argparse_utils.py)."""
    first = names[0]
    for prefix, inverse in _INVERSE_PREFIXES.items():
        if first.startswith(prefix) and inverse + first.removeprefix(prefix) in names:
            return "--no-" + first[2:], inverse + first.removeprefix(prefix)
    return None


def _negatives(names: tuple[str, ...]) -> set[str]:
    """The spellings of a vLLM switch that turn it off (the first name turns it on, as do its short aliases)."""
    first = names[0]
    off = {"--no-" + first[2:]}
    for prefix, inverse in _INVERSE_PREFIXES.items():
        if first.startswith(prefix):
            off.add(inverse + first.removeprefix(prefix))
    return off & set(names) | ({hidden_negation(names)[0]} if hidden_negation(names) else set())


# vLLM's help groups (`vllm serve --help=<group>`), each from its first flag in VLLM_SERVE_FLAGS (in help order)
VLLM_GROUPS = (("options", "--aggregate-engine-logging"), ("Frontend", "--allow-credentials"),
               ("ModelConfig", "--allow-deprecated-quantization"), ("LoadConfig", "--download-dir"),
               ("AttentionConfig", "--attention-backend"), ("MambaConfig", "--enable-mamba-cache-stochastic-rounding"),
               ("StructuredOutputsConfig", "--reasoning-parser"), ("ParallelConfig", "--all2all-backend"),
               ("CacheConfig", "--block-size"), ("OffloadConfig", "--cpu-offload-gb"),
               ("MultiModalConfig", "--enable-mm-embeds"), ("LoRAConfig", "--default-mm-loras"),
               ("LoggingConfig", "--log-config-file"), ("ObservabilityConfig", "--collect-detailed-traces"),
               ("SchedulerConfig", "--async-scheduling"), ("CompilationConfig", "--cudagraph-capture-sizes"),
               ("KernelConfig", "--enable-flashinfer-autotune"), ("VllmConfig", "--additional-config"))

# What the vLLM flags that the front end reads (server/serving.py SIMULATED_VLLM_FLAGS) do here, for --help
FRONTEND_FLAG_HELP = {
    "--chat-template": "the chat template (a file, or the template itself) that renders chat messages",
    "--default-chat-template-kwargs": "JSON object of keyword arguments every chat template rendering gets",
    "--enable-auto-tool-choice": "the model may call tools on its own (tool_choice auto); needs --tool-call-parser",
    "--enable-log-deltas": "with --enable-log-outputs, a line per streamed delta too (default: on)",
    "--enable-log-outputs": "vLLM's 'Generated response' line per output (needs --enable-log-requests)",
    "--enable-log-requests": "vLLM's 'Received request' line per request (at DEBUG: the prompt and its token ids)",
    "--disable-access-log-for-endpoints": "comma-separated paths with no access log line (e.g. /health,/metrics)",
    "--log-config-file": "a Python logging config file (JSON, dictConfig schema) for vLLM's and uvicorn's loggers",
    "--logging-config": "vLLM's LoggingConfig as JSON (or dotted): log_level, formatter (text or json), "
                        "configure_logging, pylogging_config_file",
    "--enable-scale-out": "serve /render, /derender and /inference/v1/generate",
    "--enable-tokenizer-info-endpoint": "serve /tokenizer_info",
    "--generation-config": "The folder path to the generation config. Defaults to `\"auto\"`, the generation config "
                           "will be loaded from model path. If set to `\"vllm\"`, no generation config is loaded, vLLM "
                           "defaults will be used. If set to a folder path, the generation config will be loaded "
                           "from the specified folder path. If `max_new_tokens` is specified in generation config, "
                           "then it sets a server-wide limit on the number of output tokens for all requests. "
                           "(default: auto)",
    "--override-generation-config": "Overrides or sets generation config. e.g. `{\"temperature\": 0.5}`. If used "
                                    "with `--generation-config auto`, the override parameters will be merged with "
                                    "the default config from the model. If used with `--generation-config vllm`, "
                                    "only the override parameters are used. A JSON string. (default: {})",
    "--exclude-tools-when-tool-choice-none": "no tool definitions in the prompt when tool_choice is none",
    "--lora-modules": "LoRA adapters to serve: name=path, or vLLM's JSON form",
    "--max-log-len": "the most characters (and token ids) of a prompt a request line shows",
    "--return-tokens-as-token-ids": "logprobs' tokens as 'token_id:N'",
    "--skip-tokenizer-init": "no tokenizer: prompts are token ids, outputs token ids",
    "--tokens-only": "the scale-out routes, with token ids only (implies --skip-tokenizer-init)",
    "--tool-call-parser": "how the model's tool calls are written (hermes, llama3_json, ...)",
    "--reasoning-parser": "how the model's reasoning is split from its answer (qwen3, deepseek_r1, openai_gptoss, "
                          "...): the reasoning field, reasoning tokens, thinking budgets",
    "--reasoning-parser-plugin": "a reasoning parser plugin file (not loaded here): --reasoning-parser may then "
                                 "name a parser vLLM does not register",
    "--allowed-origins": "CORS: JSON list of origins allowed cross-origin access (default [], none; [\"*\"]: any)",
    "--allowed-methods": "CORS: JSON list of methods a preflight allows (default [\"*\"])",
    "--allowed-headers": "CORS: JSON list of headers a preflight allows (default [\"*\"])",
    "--allow-credentials": "CORS: credentials allowed (the origin is echoed, never *)",
    "--trust-request-chat-template": "a request's own chat_template is accepted",
}
NOT_SIMULATED = "accepted; no effect here (listed at start-up)"


def add_remaining_vllm_flags(parser: argparse.ArgumentParser, honoured: frozenset[str] = frozenset()) -> None:
    """Accept every vLLM flag the parser does not define yet, and every spelling vLLM accepts of the switches
    it does define (`--no-enforce-eager`, the hidden `--no-enable-prefix-caching`). `honoured`: the flags
    among them that the server reads (shown in --help); the others change nothing and are shown only by
    `--help=all`, `--help=<vLLM group>` and `--help=<keyword>`. Sets `parser.vllm_groups`: each vLLM help
    group's actions."""
    taken = set(parser._option_string_actions)
    read = parser.add_argument_group("vLLM flags the front end reads", "vLLM's own flags, read here as vLLM reads them")
    other = parser.add_argument_group("other vLLM flags", "accepted for compatibility; they change nothing in the "
                                      "simulation and are listed at start-up (see them: --help=all)")
    other.full_help_only = True
    for names, kind in VLLM_SERVE_FLAGS:
        if any(n in taken for n in names):
            if kind == "flag":
                _add_missing_spellings(parser, names)
            continue  # honoured (or spelled) by serve itself
        dest = UNSUPPORTED_PREFIX + names[0].lstrip("-").replace("-", "_")
        group = read if names[0] in honoured else other
        text = FRONTEND_FLAG_HELP.get(names[0], "read by the front end") if group is read else NOT_SIMULATED
        if kind != "flag":
            kwargs = VALUE_KWARGS.get(names[0], {})
            metavar = None if "choices" in kwargs else names[0].lstrip("-").replace("-", "_").upper()
            group.add_argument(*names, dest=dest, nargs=_NARGS[kind], default=None, help=text, metavar=metavar,
                               **kwargs)
            continue
        group.add_argument(*names, dest=dest, action=_StoreSpelling, nargs=0, default=None, help=text)
        hidden = hidden_negation(names)  # the spelling used is kept: --no-x (--disable-x) is not --x
        if hidden:
            group.add_argument(hidden[0], dest=dest, action=_StoreSpelling, nargs=0, default=argparse.SUPPRESS,
                               help=argparse.SUPPRESS, canonical=dict([hidden]))
    parser.vllm_groups = _vllm_groups(parser)


def _vllm_groups(parser: argparse.ArgumentParser) -> dict[str, list[argparse.Action]]:
    known = parser._option_string_actions
    starts = dict((first, title) for title, first in VLLM_GROUPS)
    groups: dict[str, list[argparse.Action]] = {}
    title = VLLM_GROUPS[0][0]
    for names, _ in VLLM_SERVE_FLAGS:
        title = starts.get(names[0], title)
        for action in (known[n] for n in names if n in known):
            if action.help != argparse.SUPPRESS and action not in groups.setdefault(title, []):
                groups[title].append(action)
    return groups


def _add_missing_spellings(parser: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    """The spellings of a switch serve defines that vLLM accepts and serve does not, with the same effect."""
    hidden = hidden_negation(names)
    spellings = [*names, *hidden[:1]] if hidden else list(names)
    off = _negatives(names)
    known = parser._option_string_actions
    on_action = next((known[n] for n in spellings if n in known and n not in off), None)
    if on_action is None or not isinstance(on_action.const, bool):
        return  # serve reads the switch its own way (or only its off spelling)
    group = next(g for g in parser._action_groups if on_action in g._group_actions)
    for spelling in spellings:
        if spelling not in known:
            shown = argparse.SUPPRESS if hidden and spelling == hidden[0] else \
                f"the opposite of {on_action.option_strings[0]}" if spelling in off else \
                f"the same as {on_action.option_strings[0]}"
            group.add_argument(spelling, dest=on_action.dest, action="store_const",
                               const=on_action.const != (spelling in off), default=argparse.SUPPRESS, help=shown)


def unsupported_flags_used(args: argparse.Namespace) -> list[str]:
    """The accepted-but-not-simulated flags present on the command line, spelled as vLLM spells them."""
    used = []
    for dest, value in vars(args).items():
        if dest.startswith(UNSUPPORTED_PREFIX) and value is not None:
            used.append("--" + dest[len(UNSUPPORTED_PREFIX):].replace("_", "-"))
    return sorted(used)
