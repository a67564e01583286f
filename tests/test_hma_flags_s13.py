"""--disable-hybrid-kv-cache-manager / --enable-hybrid-kv-cache-manager as vLLM 0.33 reads them
(vllm/config/vllm.py VllmConfig.__post_init__, "Hybrid KV cache manager (HMA) runtime rules"): with the manager off,
gpt-oss's sliding-window layers are allocated as full-attention ones in one KV cache group (v1/core/
kv_cache_planning.py get_kv_cache_groups -> unify_hybrid_kv_cache_specs), so a block holds every layer; an explicit
enable with a KV connector that does not subclass SupportsHMA stops the start-up with the connector factory's
ValueError (distributed/kv_transfer/kv_connector/factory.py create_connector), whatever the model. Taken by
serve's command line and by a cluster file's engine flags."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from emulator.cluster import build_cluster, build_simulation
from emulator.config import ConfigError, EngineArgs, resolve
from emulator.hardware import GiB, load_device
from emulator.memory import engine_kv_groups, kv_cache_groups, plan_memory
from emulator.models import load_model
from emulator.sliding_window import HybridKVCacheManager
from profiles.cluster_file import read_cluster_file
from server.serve import RESULT_CHANGING_FLAGS, load_target, normalize_argv, not_simulated
from vllm_emulator.cli import build_parser
from vllm_venv import run_vllm_side, vllm_python_or_skip

GPT_OSS = load_model("openai/gpt-oss-120b")
LLAMA = load_model("meta-llama/Llama-3.1-8B")
VLLM_SIDE = Path(__file__).resolve().parent / "hma_vllm_side_s13.py"
LMCACHE = json.dumps({"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"})
P2P = json.dumps({"kv_connector": "P2pNcclConnector", "kv_role": "kv_both"})
NIXL_AND_OFFLOAD = json.dumps({"kv_connector": "MultiConnector", "kv_role": "kv_both", "kv_connector_extra_config": {
    "connectors": [{"kv_connector": "NixlConnector", "kv_role": "kv_both"},
                   {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
                    "kv_connector_extra_config": {"cpu_bytes_to_use": 1 << 30}}]}})


def serve(*argv: str):
    parser = build_parser("serve")
    args = parser.parse_args(normalize_argv(["openai/gpt-oss-120b", "--hardware", "H100", *argv], parser))
    return args, load_target(args)[0]


def _config(model, **args):
    return resolve(EngineArgs(**args), model, load_device("H100"))


def test_disable_keeps_one_group_whose_block_holds_every_layer():
    _, hybrid = serve()
    args, one = serve("--disable-hybrid-kv-cache-manager")
    assert args.disable_hybrid_kv_cache_manager is True and one.config.disable_hybrid_kv_cache_manager is True
    assert hybrid.memory.groups.kinds == ("sliding", "full") and one.memory.groups is None
    per_layer = 2 * GPT_OSS.num_kv_heads * GPT_OSS.head_dim * 2 * 16  # K and V, bf16, 16-token block
    assert hybrid.memory.block_bytes == 18 * per_layer  # one group's 18 layers
    assert one.memory.block_bytes == 36 * per_layer  # the sliding layers allocated as full ones, with the others
    assert one.memory.available_bytes == hybrid.memory.available_bytes
    assert one.memory.num_gpu_blocks == one.memory.available_bytes // (36 * per_layer)
    sim = build_simulation(one)
    assert not isinstance(sim.engines[0].kv, HybridKVCacheManager)
    assert isinstance(build_simulation(hybrid).engines[0].kv, HybridKVCacheManager)


def test_enable_and_its_hidden_spelling_keep_the_hybrid_groups():
    for flag in ("--enable-hybrid-kv-cache-manager", "--no-disable-hybrid-kv-cache-manager"):
        args, deployment = serve(flag)
        assert args.disable_hybrid_kv_cache_manager is False
        assert deployment.memory.groups.kinds == ("sliding", "full")


def test_the_flags_are_simulated_now():
    assert "--disable-hybrid-kv-cache-manager" not in RESULT_CHANGING_FLAGS
    for flag in ("--disable-hybrid-kv-cache-manager", "--enable-hybrid-kv-cache-manager"):
        args, _ = serve(flag)
        assert not_simulated(args) == ([], [])


@pytest.mark.parametrize("transfer, name", [(LMCACHE, "LMCacheConnectorV1"), (P2P, "P2pNcclConnector")])
def test_enable_with_a_connector_without_hma_support_stops_the_start_up(transfer, name):
    message = (f"Connector {name} does not support HMA but HMA is enabled. Please set "
               "`--disable-hybrid-kv-cache-manager`.")
    with pytest.raises(ConfigError) as e:
        serve("--kv-transfer-config", transfer, "--enable-hybrid-kv-cache-manager")
    assert str(e.value) == message
    with pytest.raises(ConfigError, match="does not support HMA"):  # the connector factory checks any model
        _config(LLAMA, kv_transfer_config=transfer, disable_hybrid_kv_cache_manager=False)
    # with no preference vLLM turns the manager off for it; disabled, it starts
    for flag in ((), ("--disable-hybrid-kv-cache-manager",)):
        _, deployment = serve("--kv-transfer-config", transfer, *flag)
        assert deployment.memory.groups is None
        assert not deployment.config.hybrid_kv_cache_manager


def test_lmcache_offloading_backend_does_not_support_hma():
    config = _config(LLAMA, kv_offloading_size=4.0, kv_offloading_backend="lmcache")
    assert not config.kv_connectors.supports_hma and not config.hybrid_kv_cache_manager
    with pytest.raises(ConfigError, match="^Connector LMCacheMPConnector does not support HMA"):
        _config(LLAMA, kv_offloading_size=4.0, kv_offloading_backend="lmcache", disable_hybrid_kv_cache_manager=False)


def test_connectors_with_hma_support_and_multiconnector_children():
    nixl = json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_both"})
    assert _config(GPT_OSS, kv_transfer_config=nixl).hybrid_kv_cache_manager
    assert _config(LLAMA, kv_transfer_config=NIXL_AND_OFFLOAD).kv_connectors.supports_hma
    multi_lmcache = json.dumps({"kv_connector": "MultiConnector", "kv_role": "kv_both", "kv_connector_extra_config": {
        "connectors": [{"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"},
                       {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
                        "kv_connector_extra_config": {"cpu_bytes_to_use": 1 << 30}}]}})
    assert not _config(LLAMA, kv_transfer_config=multi_lmcache).kv_connectors.supports_hma
    with pytest.raises(ConfigError, match="^Connector MultiConnector does not support HMA"):
        _config(LLAMA, kv_transfer_config=multi_lmcache, disable_hybrid_kv_cache_manager=False)


def test_offloading_on_a_hybrid_model_keeps_one_group_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="vllm_emulator.config"):
        config = _config(GPT_OSS, kv_offloading_size=8.0)
    # vLLM's groups plan the memory; the engine runs one group (memory.engine_kv_groups)
    groups = kv_cache_groups(GPT_OSS, config)
    assert config.hybrid_kv_cache_manager and groups.kinds == ("sliding", "full")
    assert engine_kv_groups(groups, config) is None
    assert "KV offloading on openai/gpt-oss-120b runs one KV cache group here" in caplog.text
    with pytest.raises(ConfigError, match="with KV offloading is not simulated for a model with sliding-window"):
        _config(GPT_OSS, kv_transfer_config=NIXL_AND_OFFLOAD, disable_hybrid_kv_cache_manager=False)
    assert _config(LLAMA, kv_transfer_config=NIXL_AND_OFFLOAD, disable_hybrid_kv_cache_manager=False)


def test_a_cluster_file_takes_the_flag(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("instances:\n"
                    "  - {name: one, model: openai/gpt-oss-120b, hardware: H100,\n"
                    "     disable-hybrid-kv-cache-manager: true}\n"
                    "  - {name: two, model: openai/gpt-oss-120b, hardware: H100}\n"
                    "  - {name: three, model: openai/gpt-oss-120b, hardware: H100,\n"
                    "     kv-transfer-config: {kv_connector: LMCacheConnectorV1, kv_role: kv_both},\n"
                    "     disable_hybrid_kv_cache_manager: false}\n")
    with pytest.raises(Exception, match="Connector LMCacheConnectorV1 does not support HMA"):
        read_cluster_file(path)
    path.write_text("\n".join(path.read_text().splitlines()[:4]) + "\n")
    spec, _ = read_cluster_file(path)
    one, two = build_cluster(spec).engines
    assert not isinstance(one.kv, HybridKVCacheManager) and isinstance(two.kv, HybridKVCacheManager)
    # serve's command-line flag reaches every instance of a cluster (a file's own setting wins)
    parser = build_parser("serve")
    args = parser.parse_args(normalize_argv(["--cluster", str(path), "--enable-hybrid-kv-cache-manager"], parser))
    spec = load_target(args)[0]
    assert [i.deployment.config.disable_hybrid_kv_cache_manager for i in spec.instances] == [True, False]


def _vllm_case(model, config):
    return {"layer_types": list(model.layer_types), "sliding_window": model.sliding_window,
            "num_kv_heads": model.num_kv_heads, "head_size": model.head_dim, "block_size": config.block_size,
            "max_model_len": config.max_model_len, "max_num_batched_tokens": config.max_num_batched_tokens,
            "async_scheduling": config.async_scheduling, "pp": config.pipeline_parallel_size,
            "available_memory": config.kv_cache_memory_bytes, "num_gpu_blocks_override": None, "auto_fit": False,
            "disable_hma": bool(config.disable_hybrid_kv_cache_manager)}


@pytest.mark.vllm
def test_one_group_sizing_equals_vllms_planner_with_the_manager_off():
    python = vllm_python_or_skip()
    configs = [_config(GPT_OSS, kv_cache_memory_bytes=40 * GiB, max_model_len=8192, disable_hybrid_kv_cache_manager=d)
               for d in (True, False)]
    configs.append(_config(GPT_OSS, kv_cache_memory_bytes=30 * GiB, max_model_len=8192, pipeline_parallel_size=2,
                           disable_hybrid_kv_cache_manager=True))
    answers = run_vllm_side(python, VLLM_SIDE, {"cases": [_vllm_case(GPT_OSS, c) for c in configs]})["answers"]
    for config, vllm in zip(configs, answers):
        plan = plan_memory(GPT_OSS, load_device("H100"), config)
        kinds = [kind for kind, _ in vllm["groups"]]
        if config.disable_hybrid_kv_cache_manager:
            assert kinds == ["FullAttentionSpec"] and plan.groups is None
        else:
            assert kinds == ["SlidingWindowSpec", "FullAttentionSpec"] and plan.groups is not None
        assert plan.num_gpu_blocks == vllm["num_blocks"], (config, vllm)
        assert plan.capacity(config.max_model_len, config.block_size) == (vllm["tokens"], vllm["concurrency"])
