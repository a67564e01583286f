"""A prefill that its prefill pod aborts (vLLM's /sleep?mode=abort on that pod) behind the cluster's own P/D proxy:
the pod answers 200 with finish_reason "abort" and no kv_transfer_params (NIXL's request_finished gives none for an
aborted request), and vLLM's toy proxy sends the decode pod the client's request without them, so that the decode
pod computes the whole prompt itself; the client gets its tokens. Offline (a scheduled pause) and as a server's
pacer drives the core, with the same virtual timings; over HTTP through the front door. Virtual time."""
from __future__ import annotations

import asyncio

import aiohttp
import pytest

from emulator.cluster import build_cluster
from emulator.request import Request
from pd_pair import pd_pair_file
from profiles.cluster_file import read_cluster_file
from served_trace import TIMING_KEYS
from test_pd_hardening import assert_all_blocks_free
from test_pd_serve_replay import advanced_as_served
from server.testing import free_port, running_server

CLUSTER = """
engine: {max-model-len: 8192}
instances:
  - {name: p, model: meta-llama/Llama-3.1-8B, hardware: H100,
     kv-transfer-config: {kv_connector: NixlConnector, kv_role: kv_producer}}
  - {name: d, model: meta-llama/Llama-3.1-8B, hardware: H100,
     kv-transfer-config: {kv_connector: NixlConnector, kv_role: kv_consumer}}
"""
PAUSE, RESUME = 0.021, 0.051  # the prefill pod aborts what it runs at PAUSE, and takes new work again at RESUME


def _sim(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(CLUSTER)
    sim = build_cluster(read_cluster_file(path)[0])
    pod = sim.instance("p")
    sim.schedule(PAUSE, lambda: sim.pause("abort", pod))
    sim.schedule(RESUME, lambda: sim.resume(pod))
    return sim


def _requests() -> list[Request]:
    """Long prompts, 4 ms apart: some are prefilling at PAUSE, some have been handed over, some come after."""
    return [Request(f"r{i}", 3000 + 100 * i, 8, arrival_time=0.004 * i,
                    prompt_token_ids=list(range(1000 + 5000 * i, 1000 + 5000 * i + 3000 + 100 * i)))
            for i in range(20)]


def _prefills(sim) -> list[Request]:
    ended = []
    sim.add_finish_listener(lambda r: ended.append(r) if r.request_id.endswith("@prefill") else None, prefills=True)
    return ended


def test_a_prefill_its_pod_aborts_goes_on_to_decode_which_computes_the_whole_prompt(tmp_path):
    sim = _sim(tmp_path)
    prefills = _prefills(sim)
    requests = _requests()
    sim.run(requests)
    aborted = {p.request_id.removesuffix("@prefill") for p in prefills if p.finish_reason == "abort"}
    assert aborted and len(aborted) < len(requests)  # (the others' prefills ended before PAUSE, or ran after RESUME)
    for request in requests:
        assert request.finish_reason == "length" and request.num_output_tokens == 8, request.request_id
        assert sim.instance_of[request.engine_index].name == "d"
        if request.request_id in aborted:  # no KV to load: the decode pod prefilled all of it
            assert request.num_external_tokens == 0 and request.num_prompt_tokens_not_computed == 0
            assert request.remote_prefill_cached_tokens is None and request.first_token_time > PAUSE
        else:
            assert request.num_external_tokens == request.num_prompt_tokens
    # nothing is left held or loading; only the others' prefills were read
    assert not sim.active and not sim.transfers.held and not sim.transfers.loads and not sim.pd.group_of
    assert sim.transfers.stats[1].pd_loads == len(requests) - len(aborted)
    assert_all_blocks_free(sim)


@pytest.mark.parametrize("late", [0.0, 0.05])
def test_served_and_replayed_the_aborted_prefills_requests_are_timed_alike(tmp_path, late):
    offline, served = _requests(), _requests()
    _sim(tmp_path).run(offline)
    sim = _sim(tmp_path)
    advanced_as_served(sim, served, late)
    assert not sim.active
    assert any(r.num_external_tokens == 0 for r in offline)
    for a, b in zip(offline, served):
        assert (a.finish_reason, a.num_external_tokens) == (b.finish_reason, b.num_external_tokens)
        for key in TIMING_KEYS:
            assert getattr(b, key) == pytest.approx(getattr(a, key), abs=1e-9), (a.request_id, key)


def test_a_group_goes_on_with_the_kv_of_the_prefills_that_ended_and_recomputes_the_aborted_ones(tmp_path):
    """Two prompts of one client request: the short one's prefill has ended (held, waiting for the other's) when
    the pod aborts the long one's; the decode pod loads the first's KV and computes the second's prompt."""
    path = tmp_path / "cluster.yaml"
    path.write_text(CLUSTER)
    sim = build_cluster(read_cluster_file(path)[0])
    short, long = (Request(rid, n, 4, prompt_token_ids=list(range(start, start + n)))
                   for rid, n, start in (("a", 200, 7), ("b", 8100, 10000)))
    sim.submit_group([short, long])
    while not sim.transfers.held:  # the short prompt's prefill ends first
        sim.advance(sim.next_event_time())
    assert sim.pd.in_prefill(long)
    sim.pause("abort", sim.instance("p"))
    sim.resume(sim.instance("p"))
    assert sim.engines[short.engine_index] is sim.engines[long.engine_index] is sim.instance("d").engines[0]
    while sim.next_event_time() is not None:
        sim.advance(sim.next_event_time())
    assert (short.finish_reason, long.finish_reason) == ("length", "length")
    assert (short.num_external_tokens, long.num_external_tokens) == (200, 0)
    assert_all_blocks_free(sim)


def test_an_error_of_the_prefill_is_still_the_clients_error(tmp_path):
    """Only an abort goes on: a prefill that ends with an error is the prefill pod's 500, which the toy proxy raises
    (raise_for_status), so its client's request fails."""
    path = tmp_path / "cluster.yaml"
    path.write_text(CLUSTER)
    sim = build_cluster(read_cluster_file(path)[0])
    request = Request("r", 2000, 4, prompt_token_ids=list(range(2000)))
    sim.submit(request)
    prefill = sim.pd.prefill_of["r"]
    sim.advance(0.001)
    sim.fail_placed(prefill)  # (how a request its engine holds ends with finish reason error)
    assert request.finish_reason == "error" and request.engine_index is None
    assert not sim.active and not sim.transfers.held


@pytest.mark.usefixtures("dev_mode")
@pytest.mark.parametrize("stream", [False, True])
async def test_over_http_the_client_gets_its_tokens_from_the_decode_pod(tmp_path, stream):
    path = pd_pair_file(tmp_path, free_port(), free_port(), prefill="p", decode="d")
    async with running_server("--speed", "0.02", deployment=read_cluster_file(path)[0]) as server, \
            aiohttp.ClientSession() as http:
        sim = server.engine.sim
        answer = asyncio.ensure_future(http.post(server.url + "/v1/completions", json={
            "prompt": list(range(1000, 5000)), "max_tokens": 3, "ignore_eos": True, "stream": stream}))
        while not sim.pd.prefill_of:  # its prefill runs on the prefill pod
            await asyncio.sleep(0.01)
        async with http.post(server.urls[1] + "/sleep?level=0&mode=abort") as r:  # the prefill pod's own port
            assert r.status == 200
        response = await answer
        text = await response.text()
        assert response.status == 200, text
        if stream:
            assert '"finish_reason":"length"' in text and '"finish_reason":"abort"' not in text, text
            assert text.endswith("data: [DONE]\n\n")
        else:
            body = await response.json()
            assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 3
            assert body["usage"]["prompt_tokens"] == 4000
        assert not sim.active and not sim.pd.group_of and not sim.transfers.held
        assert sim.transfers.stats[1].pd_loads == 0  # the decode pod computed the prompt: nothing was read
        assert sim.is_paused(sim.instance("p")) and not sim.is_paused(sim.instance("d"))
