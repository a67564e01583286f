"""Power and energy (emulator/power.py, emulator/node_power.py): what each part draws, when, and who pays."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

import emulator.engine_loop as engine_loop
from emulator.batch import BatchShape
from emulator.cluster import ClusterSpec, build_cluster
from emulator.config import EngineArgs
from emulator.instance import InstanceSpec
from emulator.kv_transfer import kv_bytes_per_token
from emulator.node_power import node_power_from_dict
from emulator.power import COMPONENTS, PowerModel, nodes_power
from emulator.request import Request
from loadgen.replay import replay
from profiles.cluster_file import ClusterFileError, read_cluster_file
from profiles.deployment import build_deployment

GiB = 1 << 30
# LLMServingSim 2.0's power section of its A6000 TP 1 run (../shared/data/calibration/power-a6000/config)
LLMSERVINGSIM_NODE = {
    "base_node_power": 219,
    "npu": {"A6000": {"idle_power": 33, "standby_power": 89, "active_power": 300, "standby_duration": 18}},
    "cpu": {"idle_power": 10, "active_power": 185, "util": 0.5},
    "dram": {"dimm_size": 32, "idle_power": 4.0, "energy_per_bit": 6.0},
    "link": {"num_links": 1, "idle_power": 5.0, "energy_per_bit": 4.0},
    "nic": {"num_nics": 1, "idle_power": 11.2},
    "storage": {"num_devices": 1, "idle_power": 5.9},
}
SERVER = {"idle_w": 400, "psu_efficiency": 0.9, "cpu": {"idle_w": 10, "active_w": 185, "util": 0.2, "busy_util": 0.3},
          "dram": {"dimms": 8, "idle_w": 4, "pj_per_bit": 6}, "links": {"count": 2, "idle_w": 5, "pj_per_bit": 4},
          "nics": {"count": 1, "idle_w": 11}, "storage": {"count": 2, "idle_w": 6}}


@pytest.fixture(scope="module")
def a6000():
    return build_deployment("meta-llama/Llama-3.1-8B", "A6000", EngineArgs(max_model_len=4096, enforce_eager=True))


@pytest.fixture(scope="module")
def h100_tp2():
    return build_deployment("meta-llama/Llama-3.1-8B", "H100", EngineArgs(max_model_len=4096,
                                                                          tensor_parallel_size=2))


def simulate(specs, nodes: dict, requests: list[Request], end: float | None = None):
    spec = ClusterSpec(tuple(specs), nodes=nodes)
    sim = build_cluster(spec)
    model = PowerModel(sim, nodes_power(spec.nodes))
    sim.run(requests)
    model.finish(end if end is not None else max(r.finish_time for r in requests))
    return sim, model


def requests(n: int, prompt: int = 200, output: int = 40, gap: float = 0.3, start: float = 0.0) -> list[Request]:
    return [Request(f"r{i}", prompt + 37 * (i % 5), output + 11 * (i % 3), arrival_time=start + gap * i)
            for i in range(n)]


def test_llmservingsim_power_section_is_read_as_is(a6000):
    """Its parameters, its semantics: 689.6 W while the GPU works (300 W GPU, CPU at 0.7), 443.6 W in
    the 18 s of standby after, 387.6 W idle (LLMServingSim's own trace shows these three levels)."""
    node = node_power_from_dict(LLMSERVINGSIM_NODE, host_memory=128 * GiB)
    assert node.dram.count == 4 and node.psu_efficiency == 1.0
    spec = InstanceSpec("a6000", a6000, ("m",), node="server")
    _, model = simulate([spec], {"server": {"host_memory": 128 * GiB, "power": LLMSERVINGSIM_NODE}},
                        [Request("r", 100, 400, arrival_time=2.0)], end=60.0)
    watts = model.power_series()
    busy_end = max(e.last_end for e in model.engines)
    assert watts[0] == pytest.approx(387.6)  # before the request
    assert watts[3] == pytest.approx(689.6)  # its decode, every second of it
    standby = [watts[k] for k in range(math.ceil(busy_end), math.floor(busy_end + 18))]
    assert standby and all(w == pytest.approx(443.6) for w in standby)
    assert watts[-1] == pytest.approx(387.6)  # idle again


def test_energy_is_conserved_and_adds_up_every_way(a6000, h100_tp2):
    """Requests' energy plus idle energy is the total; so are the components, the GPU states, the
    instances, and the power series integrated over time."""
    specs = [InstanceSpec("a", a6000, ("m",), node="server"), InstanceSpec("b", a6000, ("m",), node="server"),
             InstanceSpec("c", h100_tp2, ("m",), node="other")]
    nodes = {"server": {"power": SERVER}, "other": {"power": {"base_w": 300, "nics": {"count": 2, "idle_w": 10}}}}
    work = requests(60, gap=0.15)
    sim, model = simulate(specs, nodes, work, end=40.0)
    total = model.total_energy
    summary = model.summary(sum(r.num_output_tokens for r in work))
    assert sum(model.energy_of(r) for r in work) + summary["idle_j"] == pytest.approx(total, rel=1e-9)
    assert summary["requests_j"] + summary["idle_j"] == pytest.approx(total, rel=1e-9)
    assert sum(summary["by_component_j"].values()) == pytest.approx(total, rel=1e-12)
    assert sum(summary["gpu_by_state_j"].values()) == pytest.approx(summary["by_component_j"]["gpu"], rel=1e-9)
    assert sum(i["total_j"] for i in summary["by_instance_j"].values()) == pytest.approx(total, rel=1e-9)
    assert sum(model.power_series()) * model.tick == pytest.approx(total, rel=1e-9)
    for name in model.instance_names:
        assert sum(model.instance_power_series(name)) == pytest.approx(summary["by_instance_j"][name]["total_j"])
    assert all(model.energy_of(r) > 0 for r in work)
    assert {sim.instance_of[r.engine_index].name for r in work} == {"a", "b", "c"}
    assert set(summary["by_component_j"]) == set(COMPONENTS)
    assert summary["by_component_j"]["psu"] > 0 and summary["by_component_j"]["link"] > 0


def test_a_measured_idle_sets_the_chassis_and_the_supply_loses_its_share(a6000):
    """Idle, the node draws exactly its reading at the wall; the supply's loss is DC * (1/eff - 1)."""
    spec = InstanceSpec("a", a6000, ("m",), node="server")
    _, model = simulate([spec], {"server": {"power": SERVER}}, [Request("r", 50, 5, arrival_time=10.0)], end=40.0)
    watts = model.power_series()
    assert watts[0] == pytest.approx(400.0) and watts[-1] == pytest.approx(400.0)
    dc = sum(v for k, v in model.energy.items() if k != "psu")
    assert model.energy["psu"] == pytest.approx(dc * (1 / 0.9 - 1))
    with pytest.raises(ValueError, match="less than what the node's parts draw idle"):
        PowerModel(build_cluster(ClusterSpec((spec,), nodes={"server": {}})),
                   {"server": node_power_from_dict({**SERVER, "idle_w": 50})})


def test_device_draw_follows_the_steps_breakdown(h100_tp2):
    """A prefill-only request: each GPU draws compute_w in compute-bound kernels, memory_w in memory-bound
    ones and communication_w in the all-reduces, as the cost model splits the step."""
    spec = InstanceSpec("h", h100_tp2, ("m",))
    request = Request("r", 3000, 1, arrival_time=0.0)
    _, model = simulate([spec], {}, [request], end=1.0)
    (c, m, x), p = h100_tp2.cost_model.breakdown([BatchShape.from_chunks([(3000, 0)])]), h100_tp2.device.power
    assert c > 0 and m > 0 and x > 0
    assert model.gpu_energy["compute"] == pytest.approx(2 * c * p.compute_w, rel=1e-9)
    assert model.gpu_energy["memory"] == pytest.approx(2 * m * p.memory_w, rel=1e-9)
    assert model.gpu_energy["communication"] == pytest.approx(2 * x * p.communication_w, rel=1e-9)
    assert model.energy_of(request) == pytest.approx(2 * (c * p.compute_w + m * p.memory_w + x * p.communication_w))


def test_a_step_never_draws_above_the_board_limit(a6000):
    spec = InstanceSpec("a", a6000, ("m",), extra={"power": {"compute_w": 900, "memory_w": 900}})
    request = Request("r", 2000, 1, arrival_time=0.0)
    _, model = simulate([spec], {}, [request], end=1.0)
    busy = request.finish_time - 0.0
    assert model.energy["gpu"] - model.gpu_energy["idle"] - model.gpu_energy["standby"] == \
        pytest.approx(a6000.device.power.max_w * busy, rel=1e-6)


def test_after_work_the_device_stands_by_then_idles(a6000):
    # flat (the fall after work: test_power_standby_s9)
    spec = InstanceSpec("a", a6000, ("m",), extra={"power": {"standby_decay_s": 0}})
    request = Request("r", 50, 3, arrival_time=0.0)
    _, model = simulate([spec], {}, [request], end=30.0)
    watts = model.power_series()
    p = a6000.device.power
    assert watts[2:17] == pytest.approx([p.standby_w] * 15)
    assert watts[20:] == pytest.approx([p.idle_w] * 10)
    assert model.gpu_energy["standby"] == pytest.approx(p.standby_w * p.standby_s)


def test_requests_pay_by_tokens_for_compute_and_equally_for_memory(a6000):
    """Two requests in the same steps: the long prompt pays for its prefill; identical ones pay alike."""
    long, short, twin = (Request("long", 1800, 20), Request("short", 20, 20), Request("twin", 20, 20))
    _, model = simulate([InstanceSpec("a", a6000, ("m",))], {}, [long, short, twin])
    assert model.energy_of(long) > 2 * model.energy_of(short)
    assert model.energy_of(short) == pytest.approx(model.energy_of(twin), rel=1e-9)


def test_decode_runs_price_energy_as_step_by_step_would(h100_tp2, monkeypatch):
    """A run is priced from its middle step: per request and in total within 0.05 % of pricing every step."""
    def run(decode_runs: bool) -> tuple[list[float], float]:
        original = engine_loop.EngineLoop.__init__
        monkeypatch.setattr(engine_loop.EngineLoop, "__init__",
                            lambda self, engines, cost, async_, runs=True: original(self, engines, cost, async_,
                                                                                     decode_runs=decode_runs))
        work = requests(40, prompt=300, output=300, gap=0.4)
        _, model = simulate([InstanceSpec("h", h100_tp2, ("m",))], {}, work, end=60.0)
        monkeypatch.setattr(engine_loop.EngineLoop, "__init__", original)
        return [model.energy_of(r) for r in work], model.total_energy

    (by_step, step_total), (by_run, run_total) = run(False), run(True)
    assert run_total == pytest.approx(step_total, rel=5e-4)
    assert by_run == pytest.approx(by_step, rel=5e-4)


def test_counters_only_grow_and_end_at_the_totals(a6000):
    """What a server exports: energy so far never decreases, and once all is idle it is the total."""
    spec = InstanceSpec("a", a6000, ("m",), node="server")
    nodes = {"server": {"power": SERVER}}
    sim = build_cluster(ClusterSpec((spec,), nodes=nodes))
    model = PowerModel(sim, nodes_power(nodes), tick=None)
    for r in requests(10, gap=0.5):
        sim.submit(r)
    seen, last = [], 0.0
    for k in range(1, 80):
        sim.advance(k * 0.25)
        busy = {e.index for e in sim.engines if not e.is_idle}
        now = model.energy_now(sim.now, busy)
        total = sum(now.values())
        assert total >= last - 1e-9
        last = total
        seen.append(sum(model.power_now(sim.now, busy).values()))
    assert max(seen) > min(seen) >= 400.0 - 1e-9
    model.finish(sim.now)
    final = model.energy_now(sim.now, set())
    assert sum(final.values()) == pytest.approx(model.total_energy)
    assert final == pytest.approx({("a", c): v for c, v in model.energy.items()})


def test_replay_writes_energy_per_request_power_over_time_and_a_breakdown(tmp_path, a6000):
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps({"input_toks": 100 + i, "output_toks": 30, "arrival_time_ns": i * 10 ** 8})
                             + "\n" for i in range(20)))
    summary = replay(str(trace), a6000, tmp_path / "out")
    rows = [json.loads(line) for line in (tmp_path / "out" / "requests.jsonl").read_text().splitlines()]
    with (tmp_path / "out" / "timeseries.csv").open() as f:
        series = list(csv.DictReader(f))
    energy = summary["energy"]
    assert all(r["energy_j"] > 0 for r in rows)
    assert sum(r["energy_j"] for r in rows) + energy["idle_j"] == pytest.approx(energy["total_j"], rel=1e-9)
    widths = [1.0] * (len(series) - 1) + [summary["duration"] - (len(series) - 1)]  # the last tick: partial
    assert sum(float(r["power_w"]) * w for r, w in zip(series, widths)) == pytest.approx(energy["total_j"], rel=1e-3)
    assert energy["per_output_token_j"] == pytest.approx(energy["total_j"] / sum(r["output_tokens"] for r in rows))
    assert energy["per_request_j"]["count"] == 20


def test_a_bad_power_section_is_named_by_file_line_and_field(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("nodes:\n  n:\n    power:\n      cpu: {idle_w: 10, util: 2}\n"
                    "instances:\n  - {model: meta-llama/Llama-3.1-8B, hardware: H100, node: n}\n")
    with pytest.raises(ClusterFileError, match=r"cluster.yaml:4: nodes.n.power.cpu.util: expected a number >= 0 "
                                               r"and at most 1; got 2"):
        read_cluster_file(path)
    path.write_text("instances:\n  - model: meta-llama/Llama-3.1-8B\n    hardware: H100\n"
                    "    power: {idle_watts: 3}\n")
    with pytest.raises(ClusterFileError, match=r"cluster.yaml:4: instances\[0\].power: unknown field 'idle_watts'"):
        read_cluster_file(path)
    # a measured idle below what the node's parts and its two H100s draw idle: refused when the file is read
    path.write_text("nodes:\n  n:\n    power:\n      psu_efficiency: 0.9\n      idle_w: 100\n"
                    "instances:\n  - {model: meta-llama/Llama-3.1-8B, hardware: H100, node: n, count: 2}\n")
    with pytest.raises(ClusterFileError, match=r"cluster.yaml:5: nodes.n.power.idle_w: 100 W at the wall is less than "
                                               r"what the node's parts draw idle \(.* W\) \(its devices included\)"):
        read_cluster_file(path)


def test_llmservingsim_cluster_config_power_is_read_from_the_file(shared_data: Path):
    spec, _ = read_cluster_file(shared_data / "calibration" / "power-a6000" / "config" / "power_config_tp1.json")
    node = nodes_power(spec.nodes)["node0"]
    assert node.base_w == 219 and node.dram.count == 4 and node.devices["A6000"]["standby_w"] == 89
    assert sum(node.static_dc_w(33).values()) + 33 == pytest.approx(387.6)


@pytest.fixture(scope="module")
def h100():
    return build_deployment("meta-llama/Llama-3.1-8B", "H100", EngineArgs(max_model_len=16384))


def test_the_same_trace_on_a_pd_cluster_and_a_mixed_one_says_what_a_token_costs_and_where_it_goes(h100, tmp_path):
    """Two H100s on one node, as one prefill and one decode instance or as two mixed ones: both report
    energy per output token and by component; on P/D the prefill GPU spends its energy compute-bound,
    the decode GPU memory-bound, and each request carries its prefill's energy (conserved)."""
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps({"input_toks": 1500 + 97 * (i % 11), "output_toks": 120 + 13 * (i % 7),
                                         "arrival_time_ns": int(i * 0.25e9)}) + "\n" for i in range(80)))
    out = {}
    for name, roles in (("pd", ("prefill", "decode")), ("mixed", ("mixed", "mixed"))):
        spec = ClusterSpec(tuple(InstanceSpec(n, h100, ("llama",), role, "server") for n, role in zip("ab", roles)),
                           nodes={"server": {"power": SERVER}})
        energy = replay(str(trace), spec, tmp_path / name)["energy"]
        rows = [json.loads(line) for line in (tmp_path / name / "requests.jsonl").read_text().splitlines()]
        assert sum(r["energy_j"] for r in rows) + energy["idle_j"] == pytest.approx(energy["total_j"], rel=1e-9)
        assert energy["per_output_token_j"] == pytest.approx(energy["total_j"] / sum(r["output_tokens"] for r in rows))
        out[name] = energy, rows
    (pd, pd_rows), (mixed, mixed_rows) = out["pd"], out["mixed"]
    assert all(r["external_tokens"] > 0 and r["instance"] == "b" for r in pd_rows)
    assert not any(r["external_tokens"] for r in mixed_rows)
    prefill, decode = pd["by_instance_j"]["a"]["gpu_by_state_j"], pd["by_instance_j"]["b"]["gpu_by_state_j"]
    assert prefill["compute"] > prefill["memory"] and decode["memory"] > decode["compute"]
    assert set(pd["by_component_j"]) == set(mixed["by_component_j"]) == set(COMPONENTS)


@pytest.mark.parametrize("nodes", [("n0", "n0"), ("n0", "n1")], ids=["one node", "two nodes"])
def test_a_pd_transfer_costs_its_bits_on_the_links_or_both_nics(h100, nodes):
    specs = (InstanceSpec("p", h100, ("llama",), "prefill", nodes[0]),
             InstanceSpec("d", h100, ("llama",), "decode", nodes[1]))
    work = [Request(f"r{i}", 2500, 30, arrival_time=0.3 * i) for i in range(12)]
    server = {**SERVER, "nics": {"count": 1, "idle_w": 11, "pj_per_bit": 10}}
    _, model = simulate(specs, {n: {"power": server} for n in set(nodes)}, work)
    num_bytes = sum(r.num_external_tokens for r in work) * kv_bytes_per_token(h100.model, 1, 2.0)
    link, nic = (sum(e.moved_j[k] for e in model.engines) for k in ("link", "nic"))
    if nodes[0] == nodes[1]:  # over the node's links (NVLink)
        assert (link, nic) == (pytest.approx(num_bytes * 8 * 4e-12), 0.0)
    else:  # out of one node's NIC and into the other's
        assert (link, nic) == (0.0, pytest.approx(2 * num_bytes * 8 * 10e-12))
    assert sum(model.energy_of(r) for r in work) + model.idle_energy == pytest.approx(model.total_energy)
    assert all(r in model.request_energy for r in work) and len(model.request_energy) == len(work)


def test_kv_blocks_offloaded_to_host_memory_cost_dram_energy_per_bit():
    """vLLM's CPU offloading copies every full block down and loads hits back: DRAM's energy per bit."""
    offloading = build_deployment("meta-llama/Llama-3.1-8B", "A6000",
                                  EngineArgs(max_model_len=4096, enforce_eager=True, kv_offloading_size=8))
    work = requests(20, prompt=800, output=20, gap=0.2)
    sim, model = simulate([InstanceSpec("a", offloading, ("m",), node="server")], {"server": {"power": SERVER}},
                          work, end=30.0)
    tiers = sim.engines[0].kv.offload.tiers
    blocks = sum(t.stored + t.loaded for t in tiers)
    assert blocks > 0
    assert sum(e.moved_j["dram"] for e in model.engines) == pytest.approx(blocks * tiers[0].block_bytes * 8 * 6e-12)
    assert sum(model.energy_of(r) for r in work) + model.idle_energy == pytest.approx(model.total_energy)
