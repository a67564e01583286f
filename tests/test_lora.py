"""LoRA adapters in the core: vLLM 0.33's max_loras admission rule, adapters keeping prefix caches apart,
their KV event fields, the LoRA config's checks and the adapter slots taken from the KV cache. Virtual
time only (the comparisons with vLLM's own scheduler, hasher and events are in test_lora_vllm.py)."""
from __future__ import annotations

import numpy as np
import pytest

from emulator.block_hash import ensure_block_hashes
from emulator.config import ConfigError, EngineArgs, resolve
from emulator.engine_flags import add_engine_args, engine_args_from
from emulator.hardware import load_device
from emulator.kv_cache import KVCacheManager
from emulator.kv_events import BlockHasher, KVEventRecorder, external_hash
from emulator.lora import LoRAAdapter, LoRAConfig, LoRAModulePath, parse_lora_modules
from emulator.models import load_model
from emulator.request import Request, RequestStatus
from profiles.deployment import build_deployment

SQL, CHAT, MATH = (LoRAAdapter(name, i, f"/adapters/{name}") for i, name in enumerate(("sql", "chat", "math"), 1))


def lora_request(request_id: str, lora: LoRAAdapter | None, prompt: int = 20, output: int = 4,
                 arrival: float = 0.0, ids: np.ndarray | None = None) -> Request:
    return Request(request_id, prompt if ids is None else len(ids), output, arrival_time=arrival, lora=lora,
                   prompt_token_ids=ids)


# -- admission under max_loras ---------------------------------------------------------------------------
def test_a_third_adapter_waits_while_two_others_run_then_runs(make_simulation):
    sim = make_simulation(lora=LoRAConfig(max_loras=2, max_cpu_loras=2))
    a, b = lora_request("a", SQL, output=3), lora_request("b", CHAT, output=8)
    c = lora_request("c", MATH, arrival=0.5)
    d, e = lora_request("d", SQL, arrival=0.5, output=2), lora_request("e", None, arrival=0.5)
    sim.run([a, b, c, d, e])
    assert all(r.status == RequestStatus.FINISHED_LENGTH_CAPPED for r in (a, b, c, d, e))
    # d (an adapter already running) and e (the base model) pass c, which waits for sql's requests to end
    assert d.scheduled_time == e.scheduled_time == 1.0 < c.scheduled_time
    assert c.scheduled_time == max(a.finish_time, d.finish_time)
    assert c.scheduled_time < b.finish_time  # chat still runs: sql's slot is what freed


def test_a_request_skipped_for_its_adapter_keeps_its_place_and_is_deferred(make_scheduler):
    scheduler = make_scheduler(lora=LoRAConfig(max_loras=1, max_cpu_loras=1))
    running, blocked, base = lora_request("r", SQL), lora_request("w", CHAT), lora_request("x", None)
    scheduler.add_request(running)
    scheduler.schedule(0.0)
    scheduler.add_request(blocked)
    scheduler.add_request(base)
    assert scheduler.admission_head() is base  # what a bulk decode run looks at
    out = scheduler.schedule(1.0)
    assert base in out.num_scheduled_tokens and blocked not in out.num_scheduled_tokens
    assert list(scheduler.waiting) == [blocked] and scheduler.lora_deferred == {blocked}
    scheduler.abort(running, 2.0)
    out = scheduler.schedule(2.0)
    assert blocked in out.num_scheduled_tokens and not scheduler.lora_deferred


def test_every_waiting_request_kept_out_by_max_loras_leaves_no_admission_head(make_scheduler):
    scheduler = make_scheduler(lora=LoRAConfig(max_loras=1, max_cpu_loras=1))
    scheduler.add_request(lora_request("r", SQL))
    scheduler.schedule(0.0)
    scheduler.add_request(lora_request("w", CHAT))
    assert scheduler.admission_head() is None


def test_without_lora_the_adapters_are_not_counted(make_scheduler):
    scheduler = make_scheduler()
    for i, lora in enumerate((SQL, CHAT, MATH)):
        scheduler.add_request(lora_request(str(i), lora))
    assert len(scheduler.schedule(0.0).num_scheduled_tokens) == 3


# -- prefix caches kept apart ---------------------------------------------------------------------------
def cached_after(first: Request, second: Request, num_blocks: int = 32) -> int:
    """The prefix hit of `second` once `first` has filled the cache with the same tokens."""
    kv = KVCacheManager(num_blocks, 16, enable_caching=True, max_model_len=1024)
    for request in (first, second):
        ensure_block_hashes(request, 16)
    assert kv.allocate_slots(first, first.num_prompt_tokens)
    kv.cache_blocks(first, first.num_prompt_tokens)
    return kv.get_computed_blocks(second)[1]


@pytest.mark.parametrize("first,second,hit", [
    (SQL, SQL, 48), (SQL, CHAT, 0), (None, SQL, 0), (SQL, None, 0), (None, None, 48),
    (SQL, LoRAAdapter("sql", 1, "/adapters/sql-v2"), 0),  # reloaded in place from another path
])
def test_prefix_cache_is_shared_only_within_one_adapter(first, second, hit):
    ids = np.arange(1000, 1064)
    assert cached_after(lora_request("a", first, ids=ids), lora_request("b", second, ids=ids)) == hit


def test_block_stored_carries_the_adapter_and_its_hashes_are_vllms_with_the_lora_key():
    ids = np.arange(500, 540)
    recorder = KVEventRecorder(BlockHasher(), 16)
    request = Request("a", len(ids), 4, prompt_token_ids=ids, lora=SQL, cache_salt="tenant")
    ensure_block_hashes(request, 16)
    recorder.request_added(request)
    recorder.blocks_stored(request, 0, 2)
    event = recorder.take_events()[0]
    assert (event.lora_id, event.lora_name) == (1, "sql")
    assert event.extra_keys == [("sql", "tenant"), ("sql",)]  # to_event_extra_keys: the name, then the salt
    hasher = BlockHasher()
    first = hasher.block_hash(None, ids[:16].tolist(), (("lora", "sql", "/adapters/sql"), ("cache_salt", "tenant")))
    second = hasher.block_hash(first, ids[16:32].tolist(), (("lora", "sql", "/adapters/sql"),))
    assert event.block_hashes == [external_hash(first), external_hash(second)]
    assert hasher.chain(ids.tolist(), 16, cache_salt="tenant", lora=SQL) == [first, second]


def test_a_base_model_block_stored_has_no_adapter():
    ids = np.arange(500, 532)
    recorder = KVEventRecorder(BlockHasher(), 16)
    request = Request("a", len(ids), 4, prompt_token_ids=ids)
    ensure_block_hashes(request, 16)
    recorder.request_added(request)
    recorder.blocks_stored(request, 0, 2)
    event = recorder.take_events()[0]
    assert (event.lora_id, event.lora_name, event.extra_keys) == (None, None, [None, None])


# -- configuration --------------------------------------------------------------------------------------
LLAMA, H100 = load_model("meta-llama/Llama-3.1-8B"), load_device("H100")


def parse_engine_flags(*argv: str) -> EngineArgs:
    import argparse
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    return engine_args_from(parser.parse_args(list(argv)))


def test_lora_flags_take_effect_only_with_enable_lora():
    assert resolve(parse_engine_flags("--max-loras", "4"), LLAMA, H100).lora is None
    config = resolve(parse_engine_flags("--enable-lora", "--max-loras", "4", "--max-lora-rank", "64"), LLAMA, H100)
    assert config.lora == LoRAConfig(max_loras=4, max_lora_rank=64, max_cpu_loras=4)  # max_cpu_loras: max_loras
    assert resolve(parse_engine_flags("--enable-lora", "--max-cpu-loras", "0"), LLAMA, H100).lora.max_cpu_loras == 1


def test_max_lora_rank_is_one_of_vllms_choices(capsys):
    with pytest.raises(SystemExit):
        parse_engine_flags("--enable-lora", "--max-lora-rank", "7")
    assert "invalid choice: 7 (choose from 1, 8, 16, 32, 64, 128, 256, 320, 512)" in capsys.readouterr().err


@pytest.mark.parametrize("changes,message", [
    ({"max_loras": 0}, "max_loras\n  Input should be greater than or equal to 1 [type=greater_than_equal"),
    ({"max_loras": 2, "max_cpu_loras": 1}, "Value error, max_cpu_loras (1) must be >= max_loras (2)."),
])
def test_lora_config_is_checked_as_vllms(changes, message):
    with pytest.raises(ConfigError, match="1 validation error for LoRAConfig") as error:
        resolve(EngineArgs(enable_lora=True, **changes), LLAMA, H100)
    assert message in str(error.value)


def test_adapter_slots_are_taken_from_the_kv_cache():
    base = build_deployment("meta-llama/Llama-3.1-8B", "H100", EngineArgs())
    one = build_deployment("meta-llama/Llama-3.1-8B", "H100", EngineArgs(enable_lora=True))
    four = build_deployment("meta-llama/Llama-3.1-8B", "H100", EngineArgs(enable_lora=True, max_loras=4))
    slot = one.memory.weight_bytes - base.memory.weight_bytes
    # rank 16 in bf16: per layer qkv (3 A of 4096, B of 6144), o (4096 + 4096), gate_up (2 x 4096 + 28672),
    # down (14336 + 4096); the embedding and the LM head (128256 + 4096 each)
    per_layer = 3 * 4096 + 6144 + 2 * 4096 + 2 * 4096 + 28672 + 14336 + 4096
    assert slot == 16 * 2 * (32 * per_layer + 2 * (128256 + 4096))
    assert four.memory.weight_bytes - base.memory.weight_bytes == 4 * slot
    assert base.num_gpu_blocks > one.num_gpu_blocks > four.num_gpu_blocks


@pytest.mark.parametrize("items,expected", [
    (["sql=/a/sql"], [LoRAModulePath("sql", "/a/sql")]),
    (['{"name": "chat", "path": "org/chat", "base_model_name": "m"}', "", "x=y=z"],
     [LoRAModulePath("chat", "org/chat", "m"), LoRAModulePath("x", "y=z")]),
])
def test_lora_modules_are_read_as_vllm_reads_them(items, expected):
    assert parse_lora_modules(items) == expected


@pytest.mark.parametrize("item,message", [
    ("sql", "Invalid JSON format for --lora-modules: sql"),
    ('{"name": "c"}', "Invalid fields for --lora-modules: {\"name\": \"c\"} - LoRAModulePath.__init__() missing 1 "
                      "required positional argument: 'path'"),
])
def test_bad_lora_modules_get_vllms_errors(item, message):
    with pytest.raises(ValueError) as error:
        parse_lora_modules([item])
    assert str(error.value) == message
