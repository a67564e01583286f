"""How `vllm serve` reads its command line before argparse sees it, so that vLLM's command lines work here.

vLLM's FlexibleArgumentParser (vllm/utils/argparse_utils.py, 0.33) rewrites argv first:

- `--model NAME` (warned of) becomes the positional model, so `serve A --model B` is refused as vLLM
  refuses it ("unrecognized arguments: A"); a `model:` from a config file stays `--model`, which the
  positional model overrides (vllm/entrypoints/cli/serve.py);
- `--config FILE.yaml`: the file's keys become flags placed before the rest of the command line
  (so the command line wins): `key: value` -> `--key value`; `true` -> `--key`, `false` -> `--no-key`
  where that flag exists; a list -> `--key item ...`; a mapping -> `--key '<its JSON>'`;
- `--max_num_seqs 8`: underscores in a flag's name are dashes;
- `-O3`, `-O=3`, `-O 3`: `--optimization-level 3`;
- `--kv-transfer-config.kv_connector NixlConnector` (and `=value`): dotted keys build the JSON of the
  flag, merged over every dotted use of it (`key+ a,b` appends to a list); a value is JSON if it
  parses, else a human-readable integer (`80g`, `1K`), else the string. Keys given twice are warned of.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
from collections import defaultdict
from pathlib import Path

import yaml

from emulator.engine_flags import human_readable_int, spell_optimization_level  # vLLM's 1k / 1K, -O3

log = logging.getLogger("vllm_emulator.serve")
_NAME = re.compile(r"(?<=--)[^.=]*")  # a flag's name: from the dashes to the first dot or equals sign


def config_file_args(path: str, known_flags: set[str]) -> list[str]:
    """The flags a `--config` YAML file stands for (ValueError: not a readable YAML mapping)."""
    if Path(path).suffix not in (".yaml", ".yml"):
        raise ValueError(f"Config file must be of a yaml/yml type. {Path(path).suffix.lstrip('.')} supplied")
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"Unable to read the config file at {path}: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"the config file {path} must hold a mapping of flag names to values")
    args: list[str] = []
    for key, value in config.items():
        if isinstance(value, bool):
            if value:
                args.append(f"--{key}")
            elif f"--no-{key}" in known_flags:
                args.append(f"--no-{key}")
        elif isinstance(value, list):
            if value:
                args += [f"--{key}", *map(str, value)]
        elif isinstance(value, dict):
            args += [f"--{key}", json.dumps(value)]
        else:
            args += [f"--{key}", str(value)]
    return args


def normalize_argv(argv: list[str], known_flags: set[str]) -> list[str]:
    """argv (after the sub-command) as vLLM's parser rewrites it; `known_flags`: the parser's option strings."""
    argv = _model_first(argv)
    if "--config" in argv:
        if argv.count("--config") > 1:
            raise ValueError("More than one config file specified!")
        at = argv.index("--config")
        if at == len(argv) - 1:
            raise ValueError("No config file specified! Please check your command-line arguments.")
        from_file = config_file_args(argv[at + 1], known_flags)
        model_first = bool(argv) and not argv[0].startswith("-")  # a positional model stays first
        head = argv[:1] if model_first else []
        argv = head + from_file + argv[len(head):at] + argv[at + 2:]
    spelled = [_NAME.sub(lambda m: m.group(0).replace("_", "-"), arg, count=1) if arg.startswith("--") else arg
               for arg in spell_optimization_level(argv)]
    return _merge_dotted(spelled)


def _model_first(argv: list[str]) -> list[str]:
    """`--model NAME` (or `--model=NAME`) moved to the front as the positional model, as vLLM moves it."""
    at = next((i for i, arg in enumerate(argv) if re.match(r"--model(=.+|$)", arg)), None)
    if at is None:
        return argv
    log.warning("With `vllm serve`, you should provide the model as a positional argument or in a config file "
                "instead of via the `--model` option. The `--model` option will be removed in a future version.")
    if argv[at] != "--model":
        return [argv[at].removeprefix("--model="), *argv[:at], *argv[at + 1:]]
    if at + 1 == len(argv):
        raise ValueError("argument --model: expected one argument")
    return [argv[at + 1], *argv[:at], *argv[at + 2:]]


def _merge_dotted(argv: list[str]) -> list[str]:
    kept: list[str] = []
    merged: defaultdict[str, dict] = defaultdict(dict)
    duplicates: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if not (arg.startswith("-") and "." in name) or (arg[1:2].isdigit()):  # not a dotted flag (or a number)
            kept.append(arg)
            i += 1
            continue
        if not eq:
            if i + 1 >= len(argv):
                raise ValueError(f"{arg} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        if name.endswith("+"):
            name, parsed = name[:-1], value.split(",")
        else:
            parsed = _value(value)
        flag, *keys = name.split(".")
        nested: object = parsed
        for key in reversed(keys):
            nested = {key: nested}
        duplicates += [f"{flag}.{d}" for d in _update(merged[flag], nested)]
    if duplicates:
        log.warning("Found duplicate keys %s", ", ".join(duplicates))
    for flag, value in merged.items():
        kept += [flag, json.dumps(value)]
    return kept


def _value(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        try:
            return human_readable_int(text)
        except (ValueError, argparse.ArgumentTypeError):
            return text


def _update(original: dict, update: dict) -> list[str]:
    """Merge `update` into `original` (lists extend); the keys overwritten."""
    overwritten = []
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(original.get(key), dict):
            overwritten += [f"{key}.{d}" for d in _update(original[key], value)]
        elif isinstance(value, list) and isinstance(original.get(key), list):
            original[key] += value
        else:
            if key in original:
                overwritten.append(key)
            original[key] = value
    return overwritten


# ---- vLLM's "non-default args" line (vllm/entrypoints/common/startup.py get_non_default_args) ----
# `vllm serve`'s argument names (dests), in its parser's order: vLLM 0.33's make_arg_parser, vars(parse_args([]))
VLLM_DESTS = tuple("""
model_tag headless api_server_count config grpc lora_modules chat_template chat_template_content_format
trust_request_chat_template trust_request_mm_kwargs default_chat_template_kwargs reasoning_effort_map response_role
return_tokens_as_token_ids enable_auto_tool_choice exclude_tools_when_tool_choice_none tool_call_parser
tool_parser_plugin tool_strict_level tool_server max_log_len enable_prompt_tokens_details enable_per_request_metrics
enable_server_load_tracking enable_force_include_usage sse_keep_alive_interval enable_tokenizer_info_endpoint
enable_log_outputs enable_log_deltas cohere_is_reasoning_model cohere_format anthropic_disabled_thinking_effort
log_error_stack tokens_only enable_scale_out fingerprint_mode fingerprint_value host port grpc_port
data_parallel_supervisor_port dp_supervisor_probe_interval_s dp_supervisor_probe_timeout_s
dp_supervisor_probe_failure_threshold uds uvicorn_log_level disable_uvicorn_access_log
disable_access_log_for_endpoints allow_credentials allowed_origins allowed_methods allowed_headers api_key
ssl_keyfile ssl_certfile ssl_ca_certs enable_ssl_refresh ssl_cert_reqs ssl_ciphers root_path middleware
enable_request_id_headers disable_fastapi_docs h11_max_incomplete_event_size h11_max_header_count
enable_offline_docs enable_flash_late_interaction model runner convert tokenizer tokenizer_mode trust_remote_code
dtype seed hf_config_path allowed_local_media_path allowed_media_domains revision code_revision tokenizer_revision
max_model_len quantization quantization_config allow_deprecated_quantization enforce_eager
enable_return_routed_experts return_sampling_mask max_logprobs logprobs_mode use_fp64_gumbel enable_trace_replay
disable_sliding_window disable_cascade_attn skip_tokenizer_init enable_prompt_embeds served_model_name config_format
hf_token hf_overrides model_class_overrides pooler_config generation_config override_generation_config
enable_sleep_mode sleep_mode_backend sleep_mode_offload_cudagraph sleep_preserve_parameter_names
enable_cumem_allocator enable_nccl_comm_suspend model_impl logits_processors io_processor_plugin
renderer_num_workers load_format download_dir safetensors_load_strategy safetensors_prefetch_num_threads
safetensors_prefetch_block_size model_loader_extra_config ignore_patterns use_tqdm_on_load pt_load_map_location
attention_backend mamba_backend mamba_ssu_algorithm enable_mamba_cache_stochastic_rounding mamba_cache_philox_rounds
reasoning_parser reasoning_parser_plugin distributed_executor_backend pipeline_parallel_size master_addr master_port
nnodes node_rank distributed_timeout_seconds cpu_distributed_timeout_seconds numa_bind numa_bind_nodes
numa_bind_cpus device_ids tensor_parallel_size decode_context_parallel_size dcp_comm_backend dcp_q_replicate
dcp_kv_cache_interleave_size cp_kv_cache_interleave_size prefill_context_parallel_size data_parallel_size
data_parallel_rank data_parallel_start_rank data_parallel_size_local data_parallel_address data_parallel_rpc_port
data_parallel_backend data_parallel_hybrid_lb data_parallel_external_lb data_parallel_multi_port_external_lb
enable_hc_sp enable_expert_parallel enable_batch_sharded_sampling enable_ep_weight_filter all2all_backend enable_dbo
enable_shm_tensor_arena ubatch_size enable_elastic_ep elastic_ep_max_dp_size dbo_decode_token_threshold
dp_sync_interval dbo_prefill_token_threshold disable_nccl_for_dp_synchronization enable_eplb eplb_config
expert_placement_strategy max_parallel_loading_workers ray_workers_use_nsight disable_custom_all_reduce worker_cls
worker_extension_cls enable_fault_tolerance fault_tolerance_config block_size gpu_memory_utilization
kv_cache_memory_bytes kv_cache_dtype num_gpu_blocks_override enable_prefix_caching prefix_caching_hash_algo
prefix_cache_retention_interval kv_cache_dtype_skip_layers kv_sharing_fast_prefill swa_bounded_replay
mamba_cache_dtype mamba_ssm_cache_dtype mamba_block_size prefix_match_unit mamba_cache_mode
enable_mamba_shared_prefix_checkpoint replayssm_buffer_len use_replayssm kv_offloading_size kv_offloading_backend
offload_backend cpu_offload_gb cpu_offload_params offload_group_size offload_num_in_group offload_prefetch_step
offload_params language_model_only limit_mm_per_prompt enable_mm_embeds media_io_kwargs mm_processor_kwargs
mm_processor_cache_gb mm_processor_cache_type mm_hasher_algorithm mm_shm_cache_max_object_size_mb mm_encoder_only
mm_encoder_tp_mode mm_encoder_attn_backend mm_encoder_attn_dtype mm_encoder_fp8_scale_path
mm_encoder_fp8_scale_save_path mm_encoder_fp8_scale_save_margin interleave_mm_strings skip_mm_profiling
video_pruning_rate video_pruning_method mm_tensor_ipc mm_processor_device mm_ipc_gpu_memory_gb
mm_device_do_normalize enable_lora max_loras max_lora_rank lora_dtype enable_tower_connector_lora max_cpu_loras
fully_sharded_loras lora_target_modules default_mm_loras specialize_active_lora enable_mixed_moe_lora_format
enable_moe_shared_loras max_lora_cls_labels show_hidden_metrics_for_version otlp_traces_endpoint
collect_detailed_traces per_request_spec_decode_metrics kv_cache_metrics kv_cache_metrics_sample
custom_histogram_buckets cudagraph_metrics enable_layerwise_nvtx_tracing enable_mfu_metrics
enable_logging_iteration_details jit_monitor_mode jit_monitor_verbose max_num_batched_tokens
max_num_scheduled_tokens max_num_seqs max_num_active_seqs max_num_queued_reqs max_num_queued_tokens
long_prefill_token_threshold long_prefill_token_threshold_adaptive scheduling_policy enable_chunked_prefill
disable_chunked_mm_input scheduler_cls scheduler_reserve_full_isl watermark prefill_schedule_interval
disable_hybrid_kv_cache_manager async_scheduling stream_interval cudagraph_capture_sizes max_cudagraph_capture_size
ir_op_priority enable_flashinfer_autotune monokernel moe_backend linear_backend sparse_indexer_topk_backend
speculative_config spec_method spec_model spec_tokens watermark_config diffusion_config kv_transfer_config
kv_events_config ec_transfer_config ec_manager_config compilation_config attention_config engram_config
reasoning_config kernel_config additional_config structured_outputs_config aux_output_config profiler_config
watchdog_config optimization_level performance_mode weight_transfer_config disable_log_stats
aggregate_engine_logging fail_on_environ_validation shutdown_timeout gdn_prefill_backend kda_prefill_backend
kda_decode_backend enable_log_requests
""".split())
# those whose default is False (the others: None, or as _DEFAULTS and _OBJECTS say)
_FALSE = frozenset("""
headless grpc trust_request_chat_template trust_request_mm_kwargs return_tokens_as_token_ids enable_auto_tool_choice
exclude_tools_when_tool_choice_none enable_prompt_tokens_details enable_per_request_metrics
enable_server_load_tracking enable_force_include_usage enable_tokenizer_info_endpoint enable_log_outputs
log_error_stack tokens_only enable_scale_out disable_uvicorn_access_log allow_credentials enable_ssl_refresh
enable_request_id_headers disable_fastapi_docs enable_offline_docs trust_remote_code allow_deprecated_quantization
enforce_eager enable_return_routed_experts return_sampling_mask use_fp64_gumbel enable_trace_replay
disable_sliding_window skip_tokenizer_init enable_prompt_embeds enable_sleep_mode sleep_mode_offload_cudagraph
enable_cumem_allocator enable_nccl_comm_suspend enable_mamba_cache_stochastic_rounding numa_bind
data_parallel_hybrid_lb data_parallel_external_lb data_parallel_multi_port_external_lb enable_hc_sp
enable_expert_parallel enable_ep_weight_filter enable_dbo enable_shm_tensor_arena enable_elastic_ep enable_eplb
ray_workers_use_nsight disable_custom_all_reduce enable_fault_tolerance kv_sharing_fast_prefill
enable_mamba_shared_prefix_checkpoint use_replayssm language_model_only enable_mm_embeds mm_encoder_only
interleave_mm_strings skip_mm_profiling enable_tower_connector_lora fully_sharded_loras specialize_active_lora
enable_mixed_moe_lora_format enable_moe_shared_loras kv_cache_metrics cudagraph_metrics
enable_layerwise_nvtx_tracing enable_mfu_metrics enable_logging_iteration_details jit_monitor_verbose
long_prefill_token_threshold_adaptive disable_chunked_mm_input monokernel disable_log_stats aggregate_engine_logging
fail_on_environ_validation enable_log_requests
""".split())
# the defaults that are values
_DEFAULTS = {
    'chat_template_content_format': 'auto', 'response_role': 'assistant', 'tool_parser_plugin': '',
    'sse_keep_alive_interval': 0, 'enable_log_deltas': True, 'cohere_is_reasoning_model': True, 'cohere_format':
    'cmd4', 'anthropic_disabled_thinking_effort': 'auto', 'fingerprint_mode': 'full', 'port': 8000,
    'data_parallel_supervisor_port': 9256, 'dp_supervisor_probe_interval_s': 5.0, 'dp_supervisor_probe_timeout_s':
    5.0, 'dp_supervisor_probe_failure_threshold': 3, 'uvicorn_log_level': 'info', 'allowed_origins': [],
    'allowed_methods': ['*'], 'allowed_headers': ['*'], 'ssl_cert_reqs': 0, 'middleware': [],
    'h11_max_incomplete_event_size': 4194304, 'h11_max_header_count': 256, 'enable_flash_late_interaction': True,
    'model': 'Qwen/Qwen3-0.6B', 'runner': 'auto', 'convert': 'auto', 'tokenizer_mode': 'auto', 'dtype': 'auto',
    'seed': 0, 'allowed_local_media_path': '', 'max_logprobs': 20, 'logprobs_mode': 'raw_logprobs', 'config_format':
    'auto', 'hf_overrides': {}, 'model_class_overrides': {}, 'generation_config': 'auto',
    'override_generation_config': {}, 'sleep_mode_backend': 'cumem', 'sleep_preserve_parameter_names': [],
    'model_impl': 'auto', 'renderer_num_workers': 1, 'load_format': 'auto', 'safetensors_prefetch_num_threads': 8,
    'safetensors_prefetch_block_size': 16777216, 'model_loader_extra_config': {}, 'ignore_patterns':
    ['original/**/*'], 'use_tqdm_on_load': True, 'pt_load_map_location': 'cpu', 'mamba_cache_philox_rounds': 0,
    'reasoning_parser': '', 'reasoning_parser_plugin': '', 'pipeline_parallel_size': 1, 'master_addr': '127.0.0.1',
    'master_port': 29501, 'nnodes': 1, 'node_rank': 0, 'tensor_parallel_size': 1, 'decode_context_parallel_size': 1,
    'dcp_kv_cache_interleave_size': 1, 'prefill_context_parallel_size': 1, 'data_parallel_size': 1,
    'data_parallel_backend': 'mp', 'all2all_backend': 'allgather_reducescatter', 'ubatch_size': 0,
    'dbo_decode_token_threshold': 32, 'dp_sync_interval': 16, 'dbo_prefill_token_threshold': 512,
    'expert_placement_strategy': 'linear', 'worker_cls': 'auto', 'worker_extension_cls': '',
    'gpu_memory_utilization': 0.92, 'kv_cache_dtype': 'auto', 'prefix_caching_hash_algo': 'sha256',
    'prefix_cache_retention_interval': 0, 'kv_cache_dtype_skip_layers': [], 'swa_bounded_replay': True,
    'mamba_cache_dtype': 'auto', 'mamba_ssm_cache_dtype': 'auto', 'replayssm_buffer_len': 16,
    'kv_offloading_backend': 'native', 'offload_backend': 'auto', 'cpu_offload_gb': 0, 'cpu_offload_params': set(),
    'offload_group_size': 0, 'offload_num_in_group': 1, 'offload_prefetch_step': 1, 'offload_params': set(),
    'limit_mm_per_prompt': {}, 'media_io_kwargs': {}, 'mm_processor_cache_gb': 4, 'mm_processor_cache_type': 'lru',
    'mm_hasher_algorithm': 'blake3', 'mm_shm_cache_max_object_size_mb': 128, 'mm_encoder_tp_mode': 'weights',
    'mm_encoder_fp8_scale_save_margin': 1.5, 'video_pruning_method': 'evs', 'mm_tensor_ipc': 'direct_rpc',
    'mm_processor_device': 'auto', 'mm_ipc_gpu_memory_gb': 0, 'max_loras': 1, 'max_lora_rank': 16, 'lora_dtype':
    'auto', 'per_request_spec_decode_metrics': 'none', 'kv_cache_metrics_sample': 0.01, 'jit_monitor_mode': 'warn',
    'long_prefill_token_threshold': 0, 'scheduling_policy': 'fcfs', 'scheduler_reserve_full_isl': True, 'watermark':
    0.0, 'prefill_schedule_interval': 1, 'stream_interval': 1, 'moe_backend': 'auto', 'linear_backend': 'auto',
    'sparse_indexer_topk_backend': 'auto', 'additional_config': {}, 'performance_mode': 'balanced',
    'shutdown_timeout': 0}
# the defaults that are config objects (or enums): a value given is never equal to one
_OBJECTS = frozenset("""
mamba_backend eplb_config fault_tolerance_config ir_op_priority ec_manager_config compilation_config
attention_config kernel_config structured_outputs_config aux_output_config profiler_config watchdog_config
optimization_level
""".split())
_POSITIONS = {dest: i for i, dest in enumerate(VLLM_DESTS)}
# Fields vLLM never logs verbatim (its _SENSITIVE_ARG_FIELDS, redact_sensitive_args)
SENSITIVE_FIELDS = frozenset({"api_key", "hf_token", "watermark_config"})
# serve's own names of vLLM's switches: dest -> (vLLM's dest, whether its value is the opposite)
_RENAMED = {"fastapi_docs": ("disable_fastapi_docs", True), "access_log": ("disable_uvicorn_access_log", True),
            "offline_docs": ("enable_offline_docs", False)}


def _vllm_value(text, default):
    """A value the emulator keeps as vLLM's command line spelled it, as vLLM's parser types it: as its default
    is typed, JSON for an object or a list, else a number where it reads as one."""
    if not isinstance(text, str):
        return text
    kinds = (type(default),) if isinstance(default, (int, float)) and not isinstance(default, bool) else (int, float)
    if text[:1] in "{[":
        try:
            return json.loads(text)
        except ValueError:
            return text
    for kind in kinds:
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def non_default_args(args: argparse.Namespace, given: set[str], emulator_only: frozenset[str],
                     unsupported_prefix: str, flag_spellings: dict[str, tuple[str, ...]]) -> dict:
    """vLLM's get_non_default_args over this command line: each vLLM argument it set to something other than
    vLLM's default, under vLLM's name, in vLLM's parser order (VLLM_DESTS), the sensitive ones redacted as
    vLLM's redact_sensitive_args does. `given`: the dests the command line set (explicit_dests); `emulator_only`:
    serve's own flags' dests (left out); `flag_spellings`: an accepted-but-not-simulated switch's dest -> its
    spellings (the first turns it on), its value being the spelling used."""
    found: dict[str, object] = {}
    for dest in given:
        if dest in emulator_only:
            continue
        value = getattr(args, dest)
        name = dest
        if dest.startswith(unsupported_prefix):
            name = dest[len(unsupported_prefix):]
            spellings = flag_spellings.get(dest)
            if spellings is not None:  # a switch: on unless the spelling used turns it off
                value = value == spellings[0] or not value.startswith(("--no-", "--disable-", "--enable-"))
            else:
                value = _vllm_value(value, _DEFAULTS.get(name))
        elif dest in _RENAMED:
            name, opposite = _RENAMED[dest]
            value = value != opposite
        elif dest == "optimization_level":  # vLLM's parser keeps the level as the string given
            value = str(value)
        elif dest == "kv_events_config" and dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        elif dest == "kv_transfer_config":  # kept as given, JSON
            value = _vllm_value(value, None)
        if name not in _POSITIONS:
            continue  # not a `vllm serve` argument, or one vLLM's namespace lacks unless given (--log-level)
        found[name] = value
    if "model_tag" in given:  # vLLM's serve command: the positional model is the model (over a config file's)
        found["model"] = args.model_tag
    out = {}
    for name in sorted(found, key=_POSITIONS.__getitem__):
        default = False if name in _FALSE else _DEFAULTS.get(name)
        if name in _OBJECTS or found[name] != default:
            out[name] = "***" if name in SENSITIVE_FIELDS else found[name]
    return out
