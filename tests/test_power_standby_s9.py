"""A device's standby after work (emulator/power.py): its draw falls from what its last step drew (at most
standby_peak_w) toward standby_w with time constant standby_decay_s, then idles after standby_s."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from emulator.cluster import ClusterSpec, build_cluster
from emulator.config import EngineArgs
from emulator.instance import InstanceSpec
from emulator.power import PowerModel, nodes_power
from emulator.request import Request
from profiles.deployment import build_deployment

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = ROOT.parent / "shared" / "data" / "calibration" / "power-a6000"
LLMSERVINGSIM_NODE = {
    "base_node_power": 219,
    "npu": {"A6000": {"idle_power": 33, "standby_power": 89, "active_power": 300, "standby_duration": 18}},
    "cpu": {"idle_power": 10, "active_power": 185, "util": 0.5},
}


@pytest.fixture(scope="module")
def a6000():
    return build_deployment("meta-llama/Llama-3.1-8B", "A6000", EngineArgs(max_model_len=4096, enforce_eager=True))


@pytest.fixture(scope="module")
def h100():
    return build_deployment("meta-llama/Llama-3.1-8B", "H100", EngineArgs(max_model_len=4096))


def simulate(specs, nodes: dict, requests: list[Request], end: float):
    spec = ClusterSpec(tuple(specs), nodes=nodes)
    sim = build_cluster(spec)
    model = PowerModel(sim, nodes_power(spec.nodes))
    sim.run(requests)
    model.finish(end)
    return sim, model


def test_a6000_reads_its_decay_from_the_device_file(a6000):
    p = a6000.device.power
    assert (p.standby_w, p.standby_peak_w, p.standby_decay_s, p.standby_s) == (89, 144, 0.65, 18)


def test_after_work_the_a6000_falls_from_its_peak_to_standby_then_idles(a6000):
    """A request whose steps draw the board limit (300 W): the standby starts at the peak (144 W) and
    loses 1/e of its excess over 89 W every 0.65 s; the seconds follow the decay's integral."""
    request = Request("r", 50, 3, arrival_time=0.0)
    _, model = simulate([InstanceSpec("a", a6000, ("m",))], {}, [request], end=30.0)
    p, e = a6000.device.power, model.engines[0]
    end, tau, excess = e.last_end, p.standby_decay_s, p.standby_peak_w - p.standby_w
    assert end < 1.0 and e.excess_w == pytest.approx(excess)
    watts = model.gpu_power_series()

    def drawn(a: float, b: float) -> float:  # joules over [a, b) of the curve after the last step
        return p.standby_w * (b - a) + excess * tau * (math.exp((end - a) / tau) - math.exp((end - b) / tau))

    for k in range(1, 18):
        assert watts[k] == pytest.approx(drawn(k, k + 1), rel=1e-9)
    assert all(a > b for a, b in zip(watts[1:6], watts[2:7]))  # falling
    assert p.standby_w < watts[1] < p.standby_peak_w and watts[5] == pytest.approx(p.standby_w, abs=0.1)
    assert watts[20:] == pytest.approx([p.idle_w] * 10)
    assert model.gpu_energy["standby"] == pytest.approx(drawn(end, end + p.standby_s), rel=1e-9)


def test_a_step_below_the_peak_decays_from_its_own_draw(a6000):
    """A device capped at 120 W cannot stand by above it: its decay starts at 120 W, not at 144 W."""
    spec = InstanceSpec("a", a6000, ("m",), extra={"power": {"max_w": 120}})
    _, model = simulate([spec], {}, [Request("r", 50, 3, arrival_time=0.0)], end=30.0)
    assert model.engines[0].excess_w == pytest.approx(120 - 89)
    spec = InstanceSpec("a", a6000, ("m",), extra={"power": {"max_w": 80, "memory_w": 80, "compute_w": 80}})
    _, model = simulate([spec], {}, [Request("r", 50, 3, arrival_time=0.0)], end=30.0)
    assert model.engines[0].excess_w == 0.0  # below standby: flat


def test_energy_is_still_conserved_with_the_decay(a6000):
    """Requests spaced so the engine stands by between them (gaps inside decode runs and between steps):
    requests' plus idle energy, the components, the states and the power series all give the total."""
    def requests() -> list[Request]:
        return [Request(f"r{i}", 200 + 37 * (i % 5), 40 + 11 * (i % 3), arrival_time=0.7 * i) for i in range(40)]

    work = requests()
    specs = [InstanceSpec("a", a6000, ("m",), node="server"), InstanceSpec("b", a6000, ("m",), node="server")]
    nodes = {"server": {"power": {"idle_w": 400, "psu_efficiency": 0.9, "cpu": {"idle_w": 10, "active_w": 185,
                                                                                   "util": 0.2, "busy_util": 0.3}}}}
    _, model = simulate(specs, nodes, work, end=60.0)
    total = model.total_energy
    summary = model.summary(sum(r.num_output_tokens for r in work))
    assert sum(model.energy_of(r) for r in work) + summary["idle_j"] == pytest.approx(total, rel=1e-9)
    assert sum(summary["gpu_by_state_j"].values()) == pytest.approx(summary["by_component_j"]["gpu"], rel=1e-9)
    assert sum(model.power_series()) * model.tick == pytest.approx(total, rel=1e-9)
    assert sum(model.gpu_power_series()) == pytest.approx(summary["by_component_j"]["gpu"], rel=1e-9)
    flat_specs = [InstanceSpec(s.name, a6000, ("m",), node="server", extra={"power": {"standby_decay_s": 0}})
                  for s in specs]
    _, flat = simulate(flat_specs, nodes, requests(), end=60.0)
    assert summary["gpu_by_state_j"]["standby"] > flat.gpu_energy["standby"]  # only the standby draws more
    assert {k: v for k, v in summary["gpu_by_state_j"].items() if k != "standby"} == \
        pytest.approx({k: v for k, v in flat.gpu_energy.items() if k != "standby"}, rel=1e-12)


def test_the_gauges_follow_the_decay_and_the_counters_match_the_series(a6000):
    """A server's /metrics: the GPU gauge reads the curve at `now`; the energy counter, read mid-standby,
    is what the series holds up to then."""
    request = Request("r", 50, 3, arrival_time=0.0)
    spec = ClusterSpec((InstanceSpec("a", a6000, ("m",)),))
    sim = build_cluster(spec)
    model = PowerModel(sim, {})
    sim.run([request])
    e, p = model.engines[0], a6000.device.power
    for t in (0.1, 0.5, 2.0, 10.0):
        now = e.last_end + t
        gpu = model.power_now(now, set())["a", "gpu"]
        assert gpu == pytest.approx(p.standby_w + (p.standby_peak_w - p.standby_w) * math.exp(-t / p.standby_decay_s))
    assert model.power_now(e.last_end + 18.5, set())["a", "gpu"] == pytest.approx(p.idle_w)
    now = 5.0
    counted = sum(model.energy_now(now, set()).values())
    model.finish(now)
    assert counted == pytest.approx(model.total_energy, rel=1e-12)


def test_devices_without_a_measured_decay_and_llmservingsim_stand_by_flat(a6000, h100):
    """The H100 has no decay in its file; LLMServingSim's power section is read with its flat standby."""
    _, model = simulate([InstanceSpec("h", h100, ("m",))], {}, [Request("r", 50, 3, arrival_time=0.0)], end=30.0)
    p = h100.device.power
    assert p.standby_decay_s == 0 and p.standby_peak_w == p.standby_w
    assert model.gpu_power_series()[2:17] == pytest.approx([p.standby_w] * 15)
    spec = InstanceSpec("a", a6000, ("m",), node="server")
    _, model = simulate([spec], {"server": {"power": LLMSERVINGSIM_NODE}}, [Request("r", 50, 3, arrival_time=0.0)],
                        end=30.0)
    assert model.engines[0].excess_w == 0.0
    assert model.gpu_power_series()[2:17] == pytest.approx([89.0] * 15)


@pytest.mark.skipif(not (CALIBRATION / "gpu_power_log_tp1.txt").exists(), reason="calibration data not here")
def test_the_a6000_parameters_are_the_medians_of_the_logged_falls(a6000):
    """bench/power.py reads each pulse's fall off nvidia-smi's log; the device file holds their medians."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from power import standby_decays
    finally:
        sys.path.remove(str(ROOT / "bench"))
    falls = standby_decays(CALIBRATION / "gpu_power_log_tp1.txt")
    assert len(falls) == 3
    decays, peaks = sorted(f[3] for f in falls), sorted(f[4] for f in falls)
    p = a6000.device.power
    assert p.standby_decay_s == pytest.approx(decays[1], abs=0.005)
    assert p.standby_peak_w == pytest.approx(peaks[1], abs=0.5)
