"""vLLM 0.33's data-parallel load balancer on the virtual clock: its score, the rotation of ties, the
KV-pressure penalty, the coordinator's view between publications, and deterministic replays with two
data-parallel engines."""
from __future__ import annotations

import random
from itertools import count

import pytest

from emulator.config import EngineArgs
from emulator.dp_balancer import STATS_INTERVAL, DPBalancer
from emulator.engine import Engine, StepRecord
from emulator.request import Request
from loadgen.replay import replay
from profiles.deployment import build_deployment


@pytest.fixture
def make_balancer(engine_config):
    """Factory: a least_loaded balancer over `n` idle engines of 100 KV blocks."""
    def make(n: int = 2, policy: str = "least_loaded") -> DPBalancer:
        return DPBalancer([Engine(i, engine_config(), 100) for i in range(n)], policy)
    return make


def report(balancer: DPBalancer, engine: int, time: float, waiting: int, running: int, kv_usage: float = 0.0) -> None:
    """Engine `engine` processed a step's output at `time` in this state."""
    balancer.observe(StepRecord(engine, 1, time, 0.0, {}, [], {}, 0, num_running=running, num_waiting=waiting,
                                kv_usage=kv_usage))


NAMES = (f"r{i}" for i in count())


def place(balancer: DPBalancer, now: float, n: int = 1) -> list[int]:
    """Place `n` new requests at `now`, each on the engine picked; the engines picked."""
    picked = []
    for _ in range(n):
        request = Request(next(NAMES), 10, 10)
        engine = balancer.pick(request, now)
        engine.add_request(request)
        picked.append(engine.index)
    return picked


# -- the score ------------------------------------------------------------------------------------
def test_score_is_the_larger_of_the_unfinished_requests_and_the_views_waiting_plus_running(make_balancer):
    balancer = make_balancer()
    report(balancer, 0, 0.0, waiting=1, running=5)
    for name in ("x", "y", "z"):
        balancer.engines[1].add_request(Request(name, 10, 10))  # placed, in no report yet
    assert balancer.pick(Request("a", 10, 10), 0.0).index == 1  # takes the publication at 0
    assert balancer.score(0) == 6  # the view
    assert balancer.score(1) == 3  # its unfinished requests, more than the view's 1 (the pick's own)


def test_the_least_score_wins(make_balancer):
    balancer = make_balancer()
    report(balancer, 0, 0.0, waiting=0, running=3)
    report(balancer, 1, 0.0, waiting=0, running=2)
    assert place(balancer, 0.0) == [1]
    assert place(balancer, 0.0) == [1]  # 3 against 3 now: a tie, and this scan starts at engine 1


def test_a_picked_engine_counts_one_more_waiting_request_until_the_next_publication(make_balancer):
    balancer = make_balancer()
    report(balancer, 0, 0.0, waiting=0, running=4)
    report(balancer, 1, 0.0, waiting=0, running=4)
    place(balancer, 0.0, 2)
    assert [view[0] for view in balancer.view] == [1, 1]
    report(balancer, 0, 0.15, waiting=0, running=5)
    place(balancer, 0.2)
    assert balancer.published_at == 0.15
    assert [view[:2] for view in balancer.view] == [[0, 5], [1, 4]]  # 1's waiting one: the pick at 0.2


# -- ties ---------------------------------------------------------------------------------------
def test_ties_rotate_over_the_engines(make_balancer):
    """Each publication shows the engines equally loaded and nothing is left on them: vLLM 0.19 sent every
    request to engine 0 then; 0.33 starts each scan one engine further."""
    balancer = make_balancer(3)
    picked = []
    for k in range(6):
        for engine in range(3):
            report(balancer, engine, k * 1.0, waiting=0, running=k + 1)
        picked += [balancer.pick(Request(f"r{k}", 10, 10), k * 1.0).index]
    assert picked == [0, 1, 2, 0, 1, 2]


def test_a_burst_between_publications_spreads_round_robin(make_balancer):
    assert place(make_balancer(3), 0.0, 7) == [0, 1, 2, 0, 1, 2, 0]


# -- KV pressure ----------------------------------------------------------------------------------
def test_waiting_requests_weigh_more_on_an_engine_whose_kv_cache_is_over_half_full(make_balancer):
    balancer = make_balancer()
    report(balancer, 0, 0.0, waiting=2, running=10, kv_usage=0.9)
    report(balancer, 1, 0.0, waiting=2, running=11, kv_usage=0.4)
    assert place(balancer, 0.0) == [1]
    assert balancer.score(0) == pytest.approx(12 + 2 * 6 * 0.4)  # 0.4 above half full: 2.4 per waiting request
    assert balancer.score(1) == 14  # no penalty at or below half full (its own waiting count is now 3)


def test_no_penalty_without_waiting_requests(make_balancer):
    balancer = make_balancer()
    report(balancer, 0, 0.0, waiting=0, running=10, kv_usage=1.0)
    report(balancer, 1, 0.0, waiting=1, running=10, kv_usage=0.5)
    assert place(balancer, 0.0) == [0]
    assert balancer.score(0) == pytest.approx(11 + 1 * 6 * 0.5)  # the pick's own waiting request now counts


# -- the coordinator's view on the virtual clock ------------------------------------------------------
def test_reports_reach_the_view_at_most_every_stats_interval(make_balancer):
    balancer = make_balancer()
    report(balancer, 0, 0.0, waiting=0, running=5)
    report(balancer, 1, 0.0, waiting=0, running=4)
    assert place(balancer, 0.0) == [1]  # published at once: nothing was published before
    report(balancer, 0, 0.05, waiting=0, running=0)  # its requests finished
    assert place(balancer, 0.08) == [1]  # not published yet: engine 0 still looks busy
    assert place(balancer, STATS_INTERVAL) == [0]
    assert balancer.published_at == STATS_INTERVAL


def test_the_view_holds_each_engines_last_report_at_the_publication(make_balancer):
    balancer = make_balancer()
    report(balancer, 0, 0.0, waiting=0, running=1)
    balancer.pick(Request("a", 10, 10), 0.0)
    for time, running in ((0.02, 2), (0.07, 3), (0.13, 4)):
        report(balancer, 0, time, waiting=0, running=running)
    balancer.pick(Request("b", 10, 10), 0.3)
    # the publication at 0.1 held 3; the one after it waited for 0.2 (the interval), carrying 0.13's report
    assert balancer.published_at == pytest.approx(0.2)
    assert balancer.view[0][1] == 4


def test_without_new_reports_nothing_is_published_and_the_picks_stay_counted(make_balancer):
    balancer = make_balancer()
    report(balancer, 0, 0.0, waiting=0, running=1)
    report(balancer, 1, 0.0, waiting=0, running=1)
    place(balancer, 0.0, 2)
    balancer.pick(Request("late", 10, 10), 5.0)
    assert balancer.published_at == 0.0
    assert [view[0] for view in balancer.view] == [2, 1]


def test_unchanged_counts_are_not_reported(make_balancer):
    balancer = make_balancer()
    report(balancer, 0, 0.0, waiting=0, running=2, kv_usage=0.1)
    balancer.pick(Request("a", 10, 10), 0.0)
    report(balancer, 0, 0.5, waiting=0, running=2, kv_usage=0.7)  # only the KV usage moved: not sent
    balancer.pick(Request("b", 10, 10), 1.0)
    assert balancer.published_at == 0.0 and balancer.view[0][2] == 0.1


# -- pinning, round robin, a restart ---------------------------------------------------------------------
def test_a_pinned_request_counts_on_its_engine_but_moves_neither_the_scan_nor_the_view(make_balancer):
    balancer = make_balancer()
    report(balancer, 1, 0.0, waiting=0, running=1)
    pinned = balancer.pick(Request("p", 10, 10), 0.0, pinned=0)
    pinned.add_request(Request("p", 10, 10))
    assert pinned.index == 0 and balancer.view == [[0, 0, 0.0], [0, 1, 0.0]]  # the publication at 0 came
    assert place(balancer, 0.0) == [0]  # a tie (1 unfinished against 1 running), and the scan starts at 0
    with pytest.raises(ValueError, match=r"data parallel rank 2 is out of range \[0, 2\)"):
        balancer.pick(Request("q", 10, 10), 0.0, pinned=2)


def test_round_robin_takes_the_engines_in_turn_whatever_their_load(make_balancer):
    balancer = make_balancer(3, "round_robin")
    report(balancer, 0, 0.0, waiting=9, running=9)
    assert place(balancer, 0.0, 4) == [0, 1, 2, 0]


def test_a_restart_forgets_the_view_and_the_scan_start(make_balancer):
    balancer = make_balancer()
    report(balancer, 0, 0.0, waiting=3, running=3)
    place(balancer, 0.0)
    balancer.reset()
    assert balancer.view == [[0, 0, 0.0], [0, 0, 0.0]] and balancer.published_at == float("-inf")
    report(balancer, 1, 1.0, waiting=0, running=1)
    assert place(balancer, 1.0) == [0]


# -- in a simulation ---------------------------------------------------------------------------------
def test_an_abort_reaches_the_coordinator(make_simulation):
    """Two requests on engine 0 and one on engine 1; those on engine 0 are aborted: the next request goes
    to engine 0 though the scan starts at engine 1 (without the abort's report engine 0 would look busy)."""
    sim = make_simulation(num_blocks=200, data_parallel_size=2)
    for name in ("a", "b", "x"):
        sim.submit(Request(name, 20, 100, arrival_time=0.0))
    assert [sim.active[name].engine_index for name in "abx"] == [0, 1, 0]
    sim.advance(1.0)
    assert sim.abort("a") and sim.abort("x")
    sim.advance(1.5)
    assert sim.submit(Request("c", 20, 100, arrival_time=1.5)).index == 0


def test_the_view_follows_the_engines_steps(make_simulation):
    sim = make_simulation(num_blocks=200, data_parallel_size=2)
    sim.submit(Request("a", 20, 100, arrival_time=0.0))
    sim.submit(Request("b", 20, 100, arrival_time=0.0))
    sim.advance(2.5)
    sim.submit(Request("c", 20, 100, arrival_time=2.5))
    balancer = sim.instances[0].balancer
    assert balancer.published_at == 1.0  # steps last 1 s; the counts last changed when the first ones ended
    assert [view[:2] for view in balancer.view] == [[1, 1], [0, 1]]  # c, counted waiting on engine 0


def _arrivals(seed: int) -> list[Request]:
    rng = random.Random(seed)
    t, requests = 0.0, []
    for i in range(120):
        t += rng.expovariate(20.0)
        requests.append(Request(f"r{i}", rng.randint(20, 300), rng.randint(1, 60), arrival_time=t))
    return requests


def test_a_two_engine_simulation_is_deterministic_and_spreads_its_requests(make_simulation):
    outcomes = []
    for _ in range(2):
        sim = make_simulation(num_blocks=400, step_seconds=0.02, data_parallel_size=2)
        requests = _arrivals(7)
        sim.run(requests)
        outcomes.append([(r.engine_index, r.first_token_time, r.finish_time) for r in requests])
    assert outcomes[0] == outcomes[1]
    per_engine = [sum(1 for engine, _, _ in outcomes[0] if engine == e) for e in (0, 1)]
    assert min(per_engine) >= 50


def test_replay_with_two_data_parallel_engines_is_deterministic(tmp_path, test_data):
    deployment = build_deployment("meta-llama/Llama-3.1-8B", "RTX4090", EngineArgs(max_model_len=4096,
                                                                                 data_parallel_size=2))
    outputs = []
    for k in range(2):
        out = tmp_path / str(k)
        replay(str(test_data / "llmservingsim_small.jsonl"), deployment, out, step_log=out / "steps.jsonl")
        outputs.append(((out / "requests.jsonl").read_text(), (out / "steps.jsonl").read_text()))
    assert outputs[0] == outputs[1]
    assert '"engine": 1' in outputs[0][1]  # both engines served
