"""Decode runs (steps taken in bulk) publish the same KV events as step by step: an engine that publishes them
runs step by step, as vLLM publishes a batch per step (each decode block's BlockStored, and a blocked "full"
head's prefix hit reported again at every scheduling attempt)."""
from __future__ import annotations

import numpy as np

from emulator.cluster import ClusterSpec, build_cluster
from emulator.config import EngineArgs
from emulator.engine import RunRecord
from emulator.instance import InstanceSpec
from emulator.kv_events import BlockHasher, KVEventRecorder
from emulator.request import Request
from profiles.deployment import build_deployment


def _published(decode_runs: bool, events: bool = True) -> tuple[list[tuple[str, str]], float]:
    """(record kind, the events published with it) per step record, as server.kv_events publishes them (a run
    taken at once: one record), and when the blocked request was scheduled."""
    d = build_deployment("meta-llama/Llama-3.1-8B", "H100", EngineArgs(max_model_len=1000, num_gpu_blocks_override=64))
    sim = build_cluster(ClusterSpec((InstanceSpec("i0", d, ("m",)),)))
    sim.loops[0].decode_runs = decode_runs
    engine = sim.engines[0]
    recorder = KVEventRecorder(BlockHasher("sha256"), engine.config.block_size)
    if events:
        engine.kv.attach_events(recorder)
    batches = []

    def on_record(record) -> None:
        batches.append((type(record).__name__, repr(recorder.events)))
        recorder.events.clear()
    sim.add_listener(on_record, on_record)
    shared = np.arange(320, dtype=np.int64) + 11
    warm = Request("warm", 320, 1, max_tokens=1, prompt_token_ids=shared.copy(), arrival_time=0.0)
    long = Request("long", 300, 600, content_seed=1, arrival_time=0.1)
    # 50 blocks: no room while "long" runs; its first 20 a prefix hit on "warm"'s, re-reported at every attempt
    blocked = Request("blocked", 800, 20, arrival_time=0.5, kv_cache_report_mode="full",
                      prompt_token_ids=np.concatenate([shared, np.arange(480, dtype=np.int64) + 5000]))
    sim.run([warm, long, blocked])
    return batches, blocked.scheduled_time


def test_an_engine_publishing_kv_events_publishes_the_same_batches_with_decode_runs():
    stepwise, scheduled = _published(decode_runs=False)
    in_runs, scheduled_in_runs = _published(decode_runs=True)
    assert in_runs == stepwise and scheduled_in_runs == scheduled
    re_reports = sum(batch.count("parent_block_hash=None, token_ids=[11, 12,") for _, batch in stepwise)
    assert re_reports > 300  # the blocked head's hit, reported again at each step it waited
    decode_blocks = [batch for _, batch in stepwise if batch.count("BlockStored(") == 1 and "parent_block_hash=None"
                     not in batch and batch.count("block_hashes=[") == 1]
    assert decode_blocks  # a decode block's BlockStored in the batch of the step that filled it


def test_without_kv_events_the_same_workload_still_takes_decode_runs():
    in_runs, scheduled_in_runs = _published(decode_runs=True, events=False)
    stepwise, scheduled = _published(decode_runs=False, events=False)
    assert any(kind == RunRecord.__name__ for kind, _ in in_runs) and scheduled_in_runs == scheduled
    assert not any(kind == RunRecord.__name__ for kind, _ in stepwise)
