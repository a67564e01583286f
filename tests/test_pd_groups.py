"""The requests of one client request (its prompts, its n choices) through the cluster's P/D proxy and through
faults, as one unit: vLLM's toy P/D proxy sends one HTTP request to a prefill pod and sends the decode pod the
request only once the prefill pod has answered for all of it; a router retries a failed HTTP request whole.
All in virtual time."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from emulator.cluster import ClusterSpec, build_cluster
from emulator.config import EngineArgs
from emulator.instance import InstanceSpec
from emulator.request import Request
from emulator.simulation import ContextTooLong
from profiles.deployment import build_deployment

LLAMA = "meta-llama/Llama-3.1-8B"


@pytest.fixture(scope="module")
def h100():
    return build_deployment(LLAMA, "H100", EngineArgs(max_model_len=16384, max_num_batched_tokens=2048))


def pd_cluster(deployment, prefills: int = 1, decodes: int = 1, mixed: int = 0):
    specs = [InstanceSpec(f"p{k}", deployment, ("llama",), "prefill", "n0") for k in range(prefills)]
    specs += [InstanceSpec(f"d{k}", deployment, ("llama",), "decode", "n0") for k in range(decodes)]
    specs += [InstanceSpec(f"m{k}", deployment, ("llama",), "mixed", "n0") for k in range(mixed)]
    return build_cluster(ClusterSpec(tuple(specs), "round_robin"))


def prompt_list(stem: str, lengths: list[int], output_len: int = 16) -> list[Request]:
    return [Request(f"{stem}-{p}", n, output_len, max_tokens=output_len,
                    prompt_token_ids=np.arange(n, dtype=np.int64) + 100_000 * (p + 1)) for p, n in enumerate(lengths)]


class Ledger:
    """Every end a simulation reports: the clients' and (separately) its P/D prefills'."""

    def __init__(self, sim) -> None:
        self.ends: Counter[str] = Counter()
        self.prefill_end: dict[str, float] = {}
        sim.add_finish_listener(self._ended, prefills=True)

    def _ended(self, request: Request) -> None:
        if request.request_id.endswith("@prefill"):
            self.prefill_end[request.request_id.removesuffix("@prefill")] = request.finish_time
        else:
            self.ends[request.request_id] += 1


def assert_conserved(sim, ledger: Ledger, requests: list[Request]) -> None:
    """Every request ended exactly once, nothing is in flight, every block is free."""
    assert all(ledger.ends[r.request_id] == 1 for r in requests) and all(r.is_finished for r in requests)
    assert not sim.active and not sim.groups
    assert not sim.pd.group_of and not sim.pd.client_of and not sim.pd.prefill_of
    assert not sim.transfers.loads and not sim.transfers.held
    for engine in sim.engines:
        assert engine.is_idle and engine.kv.num_free_blocks == engine.num_gpu_blocks - 1


def instance_of(sim, request: Request) -> str:
    return sim.instance_of[request.engine_index].name


# -- the hand-over waits for the whole group's prefill --------------------------------------------------
def test_a_groups_requests_reach_decode_together_when_its_last_prefill_is_done(h100):
    sim = pd_cluster(h100)
    ledger = Ledger(sim)
    group = prompt_list("cmpl-pl", [200, 6000])
    sim.submit_group(group)
    sim.run([])
    short, long_ = (ledger.prefill_end[r.request_id] for r in group)
    assert short < long_  # the short prompt's prefill is done steps before the long one's ...
    assert [r.arrival_time for r in group] == [long_, long_]  # ... but both reach the decode pod at the second
    assert all(r.sent_time == 0.0 for r in group)  # the client sent them at 0
    assert group[0].first_token_time > long_
    assert_conserved(sim, ledger, group)

    alone = pd_cluster(h100)
    single = prompt_list("cmpl-one", [200])
    alone.submit_group(single)
    alone.run([])
    # on its own (n = 1, one prompt) the same prompt reaches decode at its own prefill's end: sooner
    assert single[0].arrival_time < long_ and single[0].first_token_time < group[0].first_token_time


def test_n_choices_go_to_decode_together_on_one_decode_instance(h100):
    sim = pd_cluster(h100, decodes=2)
    ledger = Ledger(sim)
    prompt = np.arange(1000, dtype=np.int64)
    choices = [Request(f"{c}_cmpl-n", 1000, 8, max_tokens=8, prompt_token_ids=prompt) for c in range(3)]
    sim.submit_group(choices)
    sim.run([])
    last = max(ledger.prefill_end[r.request_id] for r in choices)
    assert {r.arrival_time for r in choices} == {last}
    assert {instance_of(sim, r) for r in choices} == {"d0"}
    assert dict(sim.routing_decisions) == {"p0": 1, "d0": 1}
    assert_conserved(sim, ledger, choices)


def test_aborting_the_request_the_others_wait_for_sends_them_on_at_once(h100):
    sim = pd_cluster(h100)
    ledger = Ledger(sim)
    group = prompt_list("cmpl-ab", [200, 6000])
    sim.submit_group(group)
    while group[0].request_id not in ledger.prefill_end:  # the short prefill is done, the long one runs
        sim.advance(sim.next_event_time())
    assert not group[0].is_finished and group[0].engine_index is None
    t = sim.now
    sim.abort(group[1].request_id)
    assert group[1].finish_reason == "abort" and group[0].arrival_time == t  # on to decode now
    assert instance_of(sim, group[0]) == "d0"
    sim.run([])
    assert group[0].finish_reason == "length"
    assert_conserved(sim, ledger, group)


def test_aborting_a_waiting_request_frees_its_prefills_blocks_and_the_rest_go_on_later(h100):
    sim = pd_cluster(h100)
    ledger = Ledger(sim)
    group = prompt_list("cmpl-aw", [200, 6000])
    sim.submit_group(group)
    while group[0].request_id not in ledger.prefill_end:
        sim.advance(sim.next_event_time())
    prefill_engine = sim.instance("p0").engines[0]
    held = prefill_engine.kv.num_free_blocks
    sim.abort(group[0].request_id)
    assert group[0].finish_reason == "abort" and prefill_engine.kv.num_free_blocks > held
    sim.run([])
    assert group[1].arrival_time == ledger.prefill_end[group[1].request_id] and group[1].finish_reason == "length"
    assert_conserved(sim, ledger, group)


# -- faults: a group is failed or re-routed whole ---------------------------------------------------------
def _short_done_long_running(h100) -> float:
    """A time at which, on a fresh pd_cluster, the short prefill of prompt_list(.., [200, 6000]) is done and
    the long one runs."""
    sim = pd_cluster(h100)
    ledger = Ledger(sim)
    group = prompt_list("probe", [200, 6000])
    sim.submit_group(group)
    sim.run([])
    return (ledger.prefill_end["probe-0"] + ledger.prefill_end["probe-1"]) / 2


@pytest.mark.parametrize("reroute", [False, True])
def test_a_prefill_instance_failing_mid_group_fails_or_resends_the_whole_group(h100, reroute):
    when = _short_done_long_running(h100)
    sim = pd_cluster(h100, prefills=2)
    ledger = Ledger(sim)
    rerouted = []
    sim.add_reroute_listener(rerouted.append)
    group = prompt_list("probe", [200, 6000])
    sim.submit_group(group)
    sim.schedule(when, lambda: sim.fail_instance("p0", reroute=reroute))
    sim.run([])
    if not reroute:
        assert [r.finish_reason for r in group] == ["error", "error"] and not rerouted
    else:  # both re-sent to p1 (one routing decision), the finished short one's KV being lost with p0
        assert rerouted == group
        assert sim.routing_decisions["p1"] == 1 and [r.finish_reason for r in group] == ["length", "length"]
        assert {r.arrival_time for r in group} == {ledger.prefill_end["probe-1"]} and group[0].arrival_time > when
    assert_conserved(sim, ledger, group)


def test_a_mixed_group_is_rerouted_whole_to_one_instance(h100):
    sim = pd_cluster(h100, prefills=0, decodes=0, mixed=3)
    ledger = Ledger(sim)
    prompt = np.arange(3000, dtype=np.int64)
    choices = [Request(f"{c}_cmpl-f", 3000, 8, max_tokens=8, prompt_token_ids=prompt) for c in range(3)]
    sim.submit_group(choices)
    assert {instance_of(sim, r) for r in choices} == {"m0"}
    sim.schedule(1e-4, lambda: sim.fail_instance("m0", reroute=True))  # before any token
    sim.run([])
    (target,) = {instance_of(sim, r) for r in choices}  # one retry, one decision, one instance
    assert target != "m0" and dict(sim.routing_decisions) == {"m0": 1, target: 1}
    assert all(r.finish_reason == "length" and r.arrival_time == 1e-4 for r in choices)
    assert_conserved(sim, ledger, choices)


def test_a_group_that_has_streamed_a_token_is_not_retried(h100):
    sim = pd_cluster(h100, prefills=0, decodes=0, mixed=2)
    ledger = Ledger(sim)
    group = prompt_list("cmpl-st", [100, 12000], output_len=400)
    sim.submit_group(group)
    while group[0].first_token_time is None:
        sim.advance(sim.next_event_time())
    assert group[1].first_token_time is None  # its long prompt is still being prefilled
    sim.fail_instance("m0", reroute=True)
    assert [r.finish_reason for r in group] == ["error", "error"]  # the client had a token: no retry
    sim.run([])
    assert sim.routing_decisions == {"m0": 1}
    assert_conserved(sim, ledger, group)


def test_a_decode_instance_failing_before_a_token_resends_the_group_to_one_decode_instance(h100):
    sim = pd_cluster(h100, decodes=2)
    ledger = Ledger(sim)
    group = prompt_list("cmpl-dd", [300, 900])
    sim.submit_group(group)
    while group[0].engine_index is None:  # until the hand-over
        sim.advance(sim.next_event_time())
    assert {instance_of(sim, r) for r in group} == {"d0"} and group[0].first_token_time is None
    sim.fail_instance("d0", reroute=True)
    assert {instance_of(sim, r) for r in group} == {"d1"}
    sim.run([])
    assert [r.finish_reason for r in group] == ["length", "length"]
    assert_conserved(sim, ledger, group)


@pytest.mark.parametrize("lease, short_ends", [(0.05, "error"), (0.5, "length")])
def test_a_finished_prefill_waits_for_its_group_under_the_prefill_pods_kv_lease(lease, short_ends):
    """The lease starts when a prefill finishes (vLLM's request_finished); no decode side renews it before the
    proxy sends the decode request, so a group whose last prefill ends more than a lease after its first
    loses the first's KV (its load fails: kv_load_failure_policy "fail")."""
    from test_pd_hardening import deployment, pd_pair
    sim = pd_pair(prefill=deployment(extra={"kv_lease_duration": lease}))
    ledger = Ledger(sim)
    group = prompt_list("cmpl-lease", [200, 12000])
    sim.submit_group(group)
    sim.run([])
    short, long_ = (ledger.prefill_end[r.request_id] for r in group)
    assert 0.05 < long_ - short < 0.5  # (the two leases tried lie either side of the wait)
    assert [r.finish_reason for r in group] == [short_ends, "length"]
    assert sim.transfers.stats[0].pd_expired == (short_ends == "error")
    assert_conserved(sim, ledger, group)


def test_a_rerouted_requests_choices_are_checked_as_one_prompt_at_the_new_instances_queue_bound(h100):
    """m0 holds an n=4 request of 1000 tokens with no token yet; m1 (--max-num-queued-tokens 4000) has 3500
    prefill tokens waiting. m0 fails and the router resends the request to m1, whose front end checks its one
    prompt once (3500 < 4000) and takes all 4 choices, as vLLM adds the choices of one prompt after one check.
    (The engine had dropped the choices' shared token ids: the retry must not count them as 4 prompts.)"""
    bounded = build_deployment(LLAMA, "H100", EngineArgs(max_model_len=16384, max_num_batched_tokens=2048,
                                                         max_num_queued_tokens=4000))
    sim = build_cluster(ClusterSpec((InstanceSpec("m0", h100, ("llama",)), InstanceSpec("m1", bounded, ("llama",))),
                                    "round_robin"))
    ledger = Ledger(sim)
    prompt = np.arange(1000, dtype=np.int64)
    choices = [Request(f"{c}_cmpl-q", 1000, 8, max_tokens=8, prompt_token_ids=prompt) for c in range(4)]
    sim.submit_group(choices)
    waiting = Request("cmpl-pod", 3500, 8, max_tokens=8, prompt_token_ids=np.arange(3500, dtype=np.int64) + 7)
    sim.submit(waiting, instance=sim.instance("m1"))
    assert {instance_of(sim, r) for r in choices} == {"m0"}
    assert sim.fail_instance("m0", reroute=True) == []
    assert {instance_of(sim, r) for r in choices} == {"m1"}
    sim.run([])
    assert all(r.finish_reason == "length" for r in choices + [waiting])
    assert_conserved(sim, ledger, choices + [waiting])


@pytest.mark.parametrize("pd", [False, True])
def test_a_retry_that_cannot_place_its_whole_group_ends_each_request_once_with_an_error(h100, monkeypatch, pd):
    """The retry of a failed instance's group puts its first request on the new instance, then the second cannot
    be placed: the first is taken back and every request of the group ends once, with an error (a router's
    failed retry), its prefill on the new prefill instance (P/D) once, aborted."""
    sim = pd_cluster(h100, prefills=2) if pd else pd_cluster(h100, prefills=0, decodes=0, mixed=2)
    ledger = Ledger(sim)
    prefills_ended = Counter()
    sim.add_finish_listener(lambda r: prefills_ended.update([r.request_id]) if r.request_id.endswith("@prefill")
                            else None, prefills=True)
    group = prompt_list("cmpl-half", [300, 400, 500])
    sim.submit_group(group)
    source = "p0" if pd else "m0"
    other = sim.instance("p1" if pd else "m1")
    pick, picked = other.pick_engine, []

    def dies_at_the_second(request, now, pinned=None):
        picked.append(request)
        if len(picked) == 2:
            raise ContextTooLong(request.num_prompt_tokens, 16384)
        return pick(request, now, pinned)
    monkeypatch.setattr(other, "pick_engine", dies_at_the_second)
    failed = sim.fail_instance(source, reroute=True)
    monkeypatch.undo()
    assert failed == group and [r.finish_reason for r in group] == ["error"] * 3
    assert all(n == 1 for n in ledger.ends.values()) and set(ledger.ends) == {r.request_id for r in group}
    if pd:  # p0's three prefills (failed) and the one placed on p1 (aborted), each once
        assert prefills_ended == Counter({f"cmpl-half-{p}@prefill": 1 for p in range(3)}) + Counter(
            {"cmpl-half-0@prefill": 1})
    assert other.outstanding_tokens == 0
    sim.run([])
    assert_conserved(sim, ledger, group)


def test_aborting_a_request_in_its_prefill_gives_back_what_its_prefill_instance_counted_for_it(h100):
    """A prefill instance's outstanding tokens (what a least-loaded policy reads) count each prefill placed
    there (its prompt and its one token); aborting the clients' requests while their prefills run leaves none."""
    sim = pd_cluster(h100)
    ledger = Ledger(sim)
    group = prompt_list("cmpl-ab", [300, 400])
    sim.submit_group(group)
    p0 = sim.instance("p0")
    assert p0.outstanding_tokens == 301 + 401
    for request in group:
        assert sim.abort(request.request_id)
    assert p0.outstanding_tokens == 0 and [r.finish_reason for r in group] == ["abort", "abort"]
    sim.run([])
    assert_conserved(sim, ledger, group)
