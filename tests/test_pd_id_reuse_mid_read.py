"""A decode request aborted mid-read keeps its engine request id in use until its read ends (vLLM's worker
finishes the read, the scheduler keeps its blocks: tests/test_pd_abort_mid_read.py). A new request under that id
meanwhile would have the old read end the new one's load: the core refuses it as it refuses any id in use, and a
server with VLLM_DISABLE_REQUEST_ID_RANDOMIZATION gives it vLLM's random suffix after all. Virtual time."""
from __future__ import annotations

import logging

import pytest

from server.engine_client import EngineClient
from server.generation import OutputPlanner
from test_pd_abort_notice import _decode
from test_pd_hardening import assert_all_blocks_free, pd_pair


def _aborted_mid_read():
    sim = pd_pair()
    _decode(sim, "r")
    while "r" not in sim.transfers.loads:
        sim.advance(sim.next_event_time())
    assert sim.abort("r") and "r" not in sim.active and "r" in sim.transfers.loads  # its read goes on
    return sim


def test_the_id_of_a_request_aborted_mid_read_is_in_use_until_its_read_ends():
    sim = _aborted_mid_read()
    reader = sim.instance("d0").engines[0]
    with pytest.raises(ValueError, match="'r' is already in use"):
        _decode(sim, "r")
    assert "r" not in sim.active and reader.scheduler.num_loading == 0
    while "r" in sim.transfers.loads:  # the read ends: the aborted request's blocks are free, the id too
        sim.advance(sim.next_event_time())
    assert not reader.scheduler.held
    again = _decode(sim, "r")
    sim.advance(sim.now + 120.0)
    assert again.finish_reason == "length" and again.num_output_tokens == 20 and not again.kv_loading
    assert_all_blocks_free(sim)


async def test_a_server_without_id_randomization_suffixes_an_id_whose_aborted_read_runs(caplog):
    sim = _aborted_mid_read()
    client = EngineClient(sim, {"llama": OutputPlanner([(5, " a")], None)}, 1.0, randomize_request_ids=False)
    with caplog.at_level(logging.WARNING):
        engine_id = client._engine_request_id("r")
    assert engine_id.startswith("r-") and len(engine_id) == len("r-") + 8 and "already running" in caplog.text
    assert client._engine_request_id("other") == "other"
