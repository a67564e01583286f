"""Power and energy of a simulated cluster, from what each engine step does (a simulation listener).

A device draws its idle power; for `standby_s` after work, its standby power; during a step, the mean
of its compute-, memory- and communication-bound draws weighted by the cost model's breakdown of the
step, at most its board limit (emulator.hardware.DevicePower). A node adds what it draws besides
(emulator.node_power): chassis, CPU (more while its engines step), DRAM, links and NICs (idle, plus
energy per bit moved), storage, and the power supply's loss. Each engine carries the share of its
node that its devices are of the node's devices, so per-instance figures add up to the cluster's.

Energy is conserved and attributed: what an engine draws while it steps goes to the requests of the
step (compute-bound and communication time by the tokens each brings, memory-bound time, weights and
KV streamed once per step, in equal parts); what it draws between steps is idle energy. The requests'
energy plus the idle energy is the total.

A run of decode steps (RunRecord) is taken at once: its requests share each step equally, and its
split by bound is priced once, at its middle step (decode attention grows linearly with the context,
so the middle step's split is the run's mean), over the run's busy time.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import replace

from emulator.engine import RunRecord, StepRecord
from emulator.hardware import DevicePower
from emulator.instance import Instance
from emulator.node_power import NodePower, device_power_changes, node_power_from_dict
from emulator.request import Request
from emulator.stats import distribution

COMPONENTS = ("gpu", "cpu", "dram", "link", "nic", "storage", "base", "psu")
GPU_STATES = ("idle", "standby", "compute", "memory", "communication")


def _wall(dc: dict[str, float], efficiency: float) -> dict[str, float]:
    """DC watts (or joules) by component, plus what the power supply loses delivering them."""
    return {**dc, "psu": sum(dc.values()) * (1.0 / efficiency - 1.0)}


class _Engine:
    """One engine's devices and its share of the node, and how far its energy has been counted."""

    def __init__(self, instance: Instance, devices: int, power: DevicePower, node: NodePower, share: float,
                 static_dc: dict[str, float]) -> None:
        self.instance = instance.name
        self.cost_model = instance.deployment.cost_model
        self.devices = devices
        self.power = power
        self.efficiency = node.psu_efficiency
        self.static_dc = {k: v * share for k, v in static_dc.items()}
        self.cpu_busy_w = node.cpu.busy_extra_w * share
        self.link = node.links
        model, config = instance.deployment.model, instance.deployment.config
        tp = config.tensor_parallel_size
        # bytes each device sends per token of a step: TP all-reduces (ring: 2(p-1)/p of the message,
        # twice a layer) and the activations a pipeline stage hands on
        stage_layers = model.num_layers / config.pipeline_parallel_size
        self.link_bytes_per_token = model.hidden_size * model.activation_bytes * (
            (2 * stage_layers * 2.0 * (tp - 1) / tp if tp > 1 else 0.0)
            + (1.0 if config.pipeline_parallel_size > 1 else 0.0))
        self.idle_w = _wall({**self.static_dc, "gpu": devices * power.idle_w}, self.efficiency)
        self.standby_w = _wall({**self.static_dc, "gpu": devices * power.standby_w}, self.efficiency)
        self.last_end: float | None = None  # end of its last step (None: it never worked)
        self.counted = 0.0                  # its energy is counted up to here
        self.step_w = self.standby_w        # what it drew in its last step


class PowerModel:
    """Listens to a Simulation (`sim.add_listener(model.on_step, model.on_run)`), then `finish(end)`.

    `nodes`: each node's power by name (instances name their node; one without a node, or on a node
    without a power section, has only its devices). `tick`: the width of the power series' bins
    (None: no series, for a long-running server)."""

    def __init__(self, instances: list[Instance], nodes: dict[str, NodePower] | None = None,
                 tick: float | None = 1.0) -> None:
        nodes = nodes or {}
        self.tick = tick
        self.instance_names = list(dict.fromkeys(i.name for i in instances))
        members: list[tuple[Instance, str, int, DevicePower]] = []  # per engine, in engine order
        for instance in instances:
            node_name = instance.spec.node if instance.spec.node is not None else f"instance:{instance.name}"
            config = instance.deployment.config
            power = nodes.get(node_name, NodePower()).device_power(instance.deployment.device)
            if "power" in instance.spec.extra:
                power = replace(power, **device_power_changes(instance.spec.extra["power"],
                                                              f"instance {instance.name}: power"))
            per_engine = config.tensor_parallel_size * config.pipeline_parallel_size
            members.extend((instance, node_name, per_engine, power) for _ in instance.engines)
        devices_on: dict[str, int] = {}
        idle_on: dict[str, float] = {}
        for _, node_name, devices, power in members:
            devices_on[node_name] = devices_on.get(node_name, 0) + devices
            idle_on[node_name] = idle_on.get(node_name, 0.0) + devices * power.idle_w
        static = {name: nodes.get(name, NodePower()).static_dc_w(idle_on[name]) for name in devices_on}
        self.engines = [_Engine(instance, devices, power, nodes.get(node_name, NodePower()),
                                devices / devices_on[node_name], static[node_name])
                        for instance, node_name, devices, power in members]
        self.energy = {c: 0.0 for c in COMPONENTS}          # joules, by component
        self.gpu_energy = {s: 0.0 for s in GPU_STATES}      # the devices' joules, by state
        self.by_instance = {name: {c: 0.0 for c in COMPONENTS} for name in self.instance_names}
        self.idle_energy = 0.0
        self.request_energy: dict[Request, float] = {}
        self.series: dict[str, list[float]] = {c: [] for c in COMPONENTS}  # joules per tick, by component
        self.instance_series: dict[str, list[float]] = {name: [] for name in self.instance_names}
        self.end = 0.0

    # -- listening ------------------------------------------------------------------------
    def on_step(self, record: StepRecord) -> None:
        e = self.engines[record.engine]
        self._gap(e, record.start)
        d = record.duration
        if d <= 0:
            return
        shape = record.shape
        c, m, x = e.cost_model.breakdown([shape]) if shape is not None else (0.0, d, 0.0)
        tokens = sum(record.scheduled.values())
        joules = self._busy(e, record.start, record.end, d, (c, m, x), tokens)
        if not tokens:  # nothing of any request ran (not seen in practice): nobody's energy
            self.idle_energy += joules
            return
        busy = c + m + x
        token_share = (c + x) / busy if busy > 0 else 1.0
        n = len(record.scheduled)
        energy = self.request_energy
        for request, num in record.scheduled.items():
            weight = token_share * num / tokens + (1.0 - token_share) / n
            energy[request] = energy.get(request, 0.0) + joules * weight

    def on_run(self, run: RunRecord) -> None:
        e = self.engines[run.engine]
        start, end = run.starts[0], run.ends[-1]
        self._gap(e, start)
        busy = sum(b - a for a, b in zip(run.starts, run.ends))
        if busy <= 0:
            return
        c, m, x = e.cost_model.breakdown([run.shape(run.num_steps // 2)])
        total = c + m + x
        scale = busy / total if total > 0 else 0.0  # the middle step's split, over the run's busy time
        joules = self._busy(e, start, end, busy, (c * scale, m * scale, x * scale), len(run.requests) * run.num_steps)
        each = joules / len(run.requests)
        energy = self.request_energy
        for request in run.requests:
            energy[request] = energy.get(request, 0.0) + each

    def finish(self, end: float) -> None:
        """Count every engine's energy up to `end` (the end of the run)."""
        self.end = max(self.end, end)
        for e in self.engines:
            self._gap(e, self.end)

    # -- counting -----------------------------------------------------------------------------
    def _busy(self, e: _Engine, start: float, end: float, busy: float, parts: tuple[float, float, float],
              tokens: int) -> float:
        """Count an engine busy for `busy` seconds within [start, end) (the rest: standby between steps),
        its kernels split by bound as `parts` says; return the busy joules (the requests')."""
        p = e.power
        c, m, x = parts
        total = c + m + x
        if total <= 0:
            c, m, x = 0.0, busy, 0.0
        elif total >= busy:  # priced above the step's duration: the same split over the duration
            c, m, x = c * busy / total, m * busy / total, x * busy / total
        else:  # a lockstep peer's wait beyond its own work is communication
            x += busy - total
        draws = (c * p.compute_w, m * p.memory_w, x * p.communication_w)
        cap = min(1.0, p.max_w * busy / sum(draws)) if sum(draws) > 0 and p.max_w > 0 else 1.0
        gpu = [e.devices * j * cap for j in draws]
        for state, j in zip(("compute", "memory", "communication"), gpu):
            self.gpu_energy[state] += j
        dc = {k: v * busy for k, v in e.static_dc.items()}
        dc["cpu"] = dc.get("cpu", 0.0) + e.cpu_busy_w * busy
        dc["link"] = dc.get("link", 0.0) + e.link.joules(e.link_bytes_per_token * tokens * e.devices)
        dc["gpu"] = sum(gpu)
        joules = _wall(dc, e.efficiency)
        e.step_w = {k: v / busy for k, v in joules.items()}
        idle = end - start - busy
        if idle > 0:  # short waits between the steps of a run, at standby
            self.gpu_energy["standby"] += e.devices * e.power.standby_w * idle
            self.idle_energy += self._add(e, {k: v * idle for k, v in e.standby_w.items()})
        self._add(e, joules)
        if self.tick is not None:
            self._bin(e, start, end, {k: joules[k] + (e.standby_w[k] * idle if idle > 0 else 0.0) for k in joules})
        e.last_end = e.counted = end
        return sum(joules.values())

    def _gap(self, e: _Engine, until: float) -> None:
        """Count an engine's time between steps, up to `until`: standby after work, then idle."""
        for a, b, watts, state in self._gap_segments(e, until):
            joules = {k: v * (b - a) for k, v in watts.items()}
            self.gpu_energy[state] += e.devices * (b - a) * (e.power.standby_w if state == "standby"
                                                             else e.power.idle_w)
            self.idle_energy += self._add(e, joules)
            if self.tick is not None:
                self._bin(e, a, b, joules)
        e.counted = max(e.counted, until)

    @staticmethod
    def _gap_segments(e: _Engine, until: float) -> list[tuple[float, float, dict[str, float], str]]:
        segments = []
        a = e.counted
        if until <= a:
            return segments
        if e.last_end is not None:
            standby_end = min(until, e.last_end + e.power.standby_s)
            if standby_end > a:
                segments.append((a, standby_end, e.standby_w, "standby"))
                a = standby_end
        if until > a:
            segments.append((a, until, e.idle_w, "idle"))
        return segments

    def _add(self, e: _Engine, joules: dict[str, float]) -> float:
        mine = self.by_instance[e.instance]
        for k, v in joules.items():
            self.energy[k] += v
            mine[k] += v
        return sum(joules.values())

    def _bin(self, e: _Engine, a: float, b: float, joules: dict[str, float]) -> None:
        """Spread joules evenly over [a, b) into the ticks [k, k + 1) * tick."""
        if b <= a:
            return
        tick, mine = self.tick, self.instance_series[e.instance]
        k = int(a // tick)
        while k * tick < b:
            fraction = (min(b, (k + 1) * tick) - max(a, k * tick)) / (b - a)
            if fraction > 0:
                for c, j in joules.items():
                    series = self.series[c]
                    if len(series) <= k:
                        series.extend([0.0] * (k + 1 - len(series)))
                    series[k] += j * fraction
                if len(mine) <= k:
                    mine.extend([0.0] * (k + 1 - len(mine)))
                mine[k] += sum(joules.values()) * fraction
            k += 1

    # -- reading ---------------------------------------------------------------------------
    @property
    def total_energy(self) -> float:
        return sum(self.energy.values())

    def energy_of(self, request: Request) -> float:
        """Joules attributed to a request so far."""
        return self.request_energy.get(request, 0.0)

    def power_series(self, end: float | None = None, components: Iterable[str] = COMPONENTS) -> list[float]:
        """Mean watts of the cluster (of these components) in each tick [k, k + 1) * tick up to the one
        holding `end` (default: the end counted)."""
        ticks = self._ticks(end)
        total = [0.0] * ticks
        for c in components:
            for k, j in enumerate(self.series[c][:ticks]):
                total[k] += j / self.tick
        return total

    def instance_power_series(self, name: str, end: float | None = None) -> list[float]:
        ticks = self._ticks(end)
        return [j / self.tick for j in (self.instance_series[name] + [0.0] * ticks)[:ticks]]

    def _ticks(self, end: float | None) -> int:
        return max(0, math.ceil((self.end if end is None else end) / self.tick))

    def summary(self, output_tokens: int, request_energies: Iterable[float] | None = None) -> dict:
        """The energy section of summary.json."""
        total = self.total_energy
        attributed = sum(self.request_energy.values())
        return {
            "total_j": total,
            "requests_j": attributed,
            "idle_j": self.idle_energy,
            "mean_power_w": total / self.end if self.end > 0 else 0.0,
            "per_output_token_j": total / output_tokens if output_tokens else None,
            "requests_per_output_token_j": attributed / output_tokens if output_tokens else None,
            "per_request_j": distribution(self.request_energy.values() if request_energies is None
                                          else request_energies),
            "by_component_j": dict(self.energy),
            "gpu_by_state_j": dict(self.gpu_energy),
            "by_instance_j": {name: {"total_j": sum(comps.values()), **comps}
                              for name, comps in self.by_instance.items()},
        }

    # -- now (a server's gauges and counters) ---------------------------------------------------
    def power_now(self, now: float, busy: set[int]) -> dict[tuple[str, str], float]:
        """Watts by (instance, component) at virtual time `now`; `busy`: the engines with a step running."""
        out = {(name, c): 0.0 for name in self.instance_names for c in COMPONENTS}
        for index, e in enumerate(self.engines):
            if index in busy:
                watts = e.step_w
            elif e.last_end is not None and now < e.last_end + e.power.standby_s:
                watts = e.standby_w
            else:
                watts = e.idle_w
            for c, w in watts.items():
                out[e.instance, c] += w
        return out

    def energy_now(self, now: float, busy: set[int]) -> dict[tuple[str, str], float]:
        """Joules by (instance, component) up to `now`: each engine counted to its last step, and an
        engine with no step running to `now` (so the counters only grow)."""
        out = {(name, c): v for name, comps in self.by_instance.items() for c, v in comps.items()}
        for index, e in enumerate(self.engines):
            if index in busy:
                continue
            for a, b, watts, _ in self._gap_segments(e, now):
                for c, w in watts.items():
                    out[e.instance, c] += w * (b - a)
        return out


def nodes_power(nodes: dict[str, dict]) -> dict[str, NodePower]:
    """The power of each node of a cluster spec that has a `power` section (ClusterSpec.nodes)."""
    return {name: node_power_from_dict(settings["power"], settings.get("host_memory"))
            for name, settings in nodes.items() if "power" in settings}
