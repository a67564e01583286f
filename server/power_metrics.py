"""The emulator's power series on /metrics, read from the power model (emulator/power.py) at each scrape.

    vllm_emulator:power_watts{cluster_instance,component}          gauge: what each part draws now, at the wall
    vllm_emulator:energy_joules_total{cluster_instance,component}  counter: joules drawn since the server started

in virtual time, like vLLM's own series. Components: gpu, cpu, dram, link, nic, storage, base, psu
(all but gpu are zero unless the deployment's node has a power section). An engine with a step on
its GPU draws what its last step drew; its energy is counted to the end of its last step, or to now
when it has nothing running, so the counters only grow. A cluster instance's own port shows its own.
The instance label is `cluster_instance`: Prometheus keeps `instance` for the target it scrapes.
"""
from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from emulator.node_power import NodePower
from emulator.power import PowerModel
from emulator.request import Request
from emulator.simulation import Simulation


class PowerMetrics(Collector):
    """Power and energy of a simulation's instances, collected when /metrics is rendered."""

    def __init__(self, simulation: Simulation, registry: CollectorRegistry,
                 nodes: dict[str, NodePower] | None = None) -> None:
        self.sim = simulation
        self.model = PowerModel(simulation, nodes, tick=None)
        simulation.add_finish_listener(self.model.forget)  # the server runs for days: keep no finished request
        registry.register(self)

    def energy_of(self, request: Request) -> float:
        """Joules a request drew, for the request log (read as it finishes)."""
        return self.model.energy_of(request)

    def show_instance(self, registry: CollectorRegistry, instance: str) -> None:
        """Also show one instance's series on `registry` (the /metrics of that instance's own port)."""
        registry.register(_OneInstance(self, instance))

    def collect(self, only: str | None = None) -> Iterator[Metric]:
        now = self.sim.now
        busy = {e.index for loop in self.sim.loops if loop.gpu_free_at > now for e in loop.engines}
        power = GaugeMetricFamily("vllm_emulator:power_watts",
                                  "Power drawn now at the wall, in watts (virtual time), by instance and component.",
                                  labels=("cluster_instance", "component"))
        for (instance, component), watts in self.model.power_now(now, busy).items():
            if only is None or instance == only:
                power.add_metric((instance, component), watts)
        energy = CounterMetricFamily("vllm_emulator:energy_joules",
                                     "Energy drawn at the wall since the server started, in joules, by instance "
                                     "and component.", labels=("cluster_instance", "component"))
        for (instance, component), joules in self.model.energy_now(now, busy).items():
            if only is None or instance == only:
                energy.add_metric((instance, component), joules)
        yield power
        yield energy


class _OneInstance(Collector):
    """One instance's power series, for its own port."""

    def __init__(self, power: PowerMetrics, instance: str) -> None:
        self.power, self.instance = power, instance

    def collect(self) -> Iterator[Metric]:
        return self.power.collect(self.instance)
