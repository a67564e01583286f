"""Power and energy of a simulated cluster, from what each engine step does (a simulation listener).

A device draws its idle power; for `standby_s` after work, its standby power, which falls there from
what the last step drew (at most `standby_peak_w`) with time constant `standby_decay_s` (the clocks and
the hot silicon settle: A6000.yaml reads both off nvidia-smi; a device without them stands by flat at
`standby_w`); during a step, the mean of its compute-, memory- and communication-bound draws weighted
by the cost model's breakdown of the step, at most its board limit (emulator.hardware.DevicePower).
A node adds what it draws besides
(emulator.node_power): chassis, CPU (more while its engines step), DRAM, links and NICs (idle, plus
energy per bit moved), storage, and the power supply's loss. Each engine carries the share of its
node that its devices are of the node's devices, so per-instance figures add up to the cluster's.

Energy is conserved and attributed: what an engine draws while it steps goes to the requests of the
step (compute-bound and communication time by the tokens each brings, memory-bound time, weights and
KV streamed once per step, in equal parts); what it draws between steps is idle energy. The requests'
energy plus the idle energy is the total.

A run of decode steps (RunRecord) is taken at once: its requests share each step equally, and its
split by bound is priced once, at its middle step (decode attention grows linearly with the context,
so the middle step's split is the run's mean), over the run's busy time. Splits are kept per step
shape, contexts to 64 tokens: a replay asks the cost model for each shape's split once, and each
engine turns it into watts once (_Engine.price); a step then costs a few multiplications, and one
within a tick goes straight into it.

Only what varies from step to step is added up as it happens (the devices' joules, the bytes moved,
busy time); what draws at a constant rate (chassis, idle parts) is multiplied out when read.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import replace
from operator import sub

from emulator.batch import BatchShape
from emulator.engine import RunRecord, StepRecord
from emulator.hardware import DevicePower
from emulator.instance import Instance, InstanceSpec
from emulator.kv_transfer import kv_bytes_per_token
from emulator.memory import kv_dtype_bytes
from emulator.node_power import NodePower, device_power_changes, node_power_from_dict
from emulator.request import Request
from emulator.simulation import Simulation
from emulator.stats import distribution

COMPONENTS = ("gpu", "cpu", "dram", "link", "nic", "storage", "base", "psu")
GPU_STATES = ("idle", "standby", "compute", "memory", "communication")
_CONTEXT_GRAIN = 64  # tokens: contexts this close split a step alike
_SPLITS_KEPT = 1 << 16  # step shapes whose split is kept


class _Engine:
    """One engine's devices and its share of the node, and what it has drawn so far."""

    def __init__(self, instance: Instance, rank: int, devices: int, power: DevicePower, node_name: str,
                 node: NodePower, share: float, static_dc: dict[str, float]) -> None:
        self.instance = instance.name
        self.node_name = node_name
        self.node = node
        self.offload = instance.engines[rank].kv.offload  # its KV tiers in host memory (None: none)
        self.cost_model = instance.deployment.cost_model
        self.lockstep = instance.deployment.lockstep_engines
        self.devices = devices
        self.power = power
        self.to_wall = 1.0 / node.psu_efficiency
        self.static_dc = {k: v * share for k, v in static_dc.items()}  # watts whatever it does
        self.static_w = sum(self.static_dc.values())
        self.cpu_busy_w = node.cpu.busy_extra_w * share                 # more while it steps
        model, config = instance.deployment.model, instance.deployment.config
        self.kv_bytes_per_token = kv_bytes_per_token(model, config.tensor_parallel_size,
                                                     kv_dtype_bytes(model, config.kv_cache_dtype))
        tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
        # bytes each device sends per token of a step: TP all-reduces (ring: 2(p-1)/p of the message,
        # twice a layer) and the activations a pipeline stage hands on
        self.link_bytes_per_token = model.hidden_size * model.activation_bytes * (
            (2 * model.num_layers / pp * 2.0 * (tp - 1) / tp if tp > 1 else 0.0) + (1.0 if pp > 1 else 0.0))
        self.charges_links = bool(node.links.pj_per_bit and self.link_bytes_per_token)  # its steps' collectives
        self.busy_static_w = self.static_w + self.cpu_busy_w
        self.max_total_w = power.max_w * devices
        self.standby_total_w = devices * power.standby_w
        self.priced: dict[tuple, tuple] = {}  # step shape (as _split keys it) -> price(its split)
        self.idle_wall_w = (self.static_w + devices * power.idle_w) * self.to_wall
        self.standby_wall_w = (self.static_w + devices * power.standby_w) * self.to_wall
        self.step_gpu_w = devices * power.standby_w  # what its devices drew in its last step
        self.decay_s = power.standby_decay_s    # 0: its standby is flat
        self.excess_w = 0.0                     # each device's draw above standby when its last step ended
        self.step_moved_w: dict[str, float] = {}  # the bytes its last step moved, as watts by component
        self.last_end: float | None = None      # end of its last step (None: it never worked)
        self.counted = 0.0                      # its energy is counted up to here
        self.busy = 0.0                         # seconds stepping
        self.gpu_j = dict.fromkeys(GPU_STATES, 0.0)  # its devices' joules, by state
        self.moved_j = {"dram": 0.0, "link": 0.0, "nic": 0.0}  # joules of the bytes moved, by component

    def components(self, standby: float = 0.0, idle: float = 0.0) -> dict[str, float]:
        """Its joules at the wall by component, counted so far plus `standby` and `idle` seconds more."""
        span = self.counted + standby + idle
        dc = {k: w * span for k, w in self.static_dc.items()}
        dc["cpu"] = dc.get("cpu", 0.0) + self.cpu_busy_w * self.busy
        for k, j in self.moved_j.items():
            dc[k] = dc.get(k, 0.0) + j
        dc["gpu"] = sum(self.gpu_j.values()) + self.devices * (self.power.standby_w * standby
                                                               + self.power.idle_w * idle)
        if standby > 0 and self.excess_w:
            dc["gpu"] += self.excess_j(self.counted, self.counted + standby)
        dc["psu"] = sum(dc.values()) * (self.to_wall - 1.0)
        return dc

    def price(self, c: float, m: float, x: float) -> tuple:
        """A split by bound as a step prices it: (c, m, x, total, the devices' joules per second of each
        bound before scaling, the share of its time that goes by tokens)."""
        total = c + m + x
        share = (c + x) / total if total > 0 else 0.0
        if total <= 0:
            c, m, x, total = 0.0, 1.0, 0.0, 1.0
        p = self.power
        return c, m, x, total, c * p.compute_w, m * p.memory_w, x * p.communication_w, share

    def excess_j(self, a: float, b: float) -> float:
        """Its devices' joules above standby over [a, b) after its last step (the decay's integral)."""
        tau, last = self.decay_s, self.last_end
        return self.devices * self.excess_w * tau * (math.exp((last - a) / tau) - math.exp((last - b) / tau))

    def gap(self, until: float) -> tuple[float, float]:
        """Seconds of standby, then idle, from where it is counted to `until`."""
        if until <= self.counted:
            return 0.0, 0.0
        standby = 0.0
        if self.last_end is not None:
            standby = max(0.0, min(until, self.last_end + self.power.standby_s) - self.counted)
        return standby, until - self.counted - standby


def _decode_key(num_tokens: int, num_reqs: int, num_decode: int, decode_context: int) -> tuple:
    """PowerModel._split's key of a decode-only step (its prefill fields 0), for the lookups that skip _split."""
    return num_tokens, num_reqs, 0, 0, num_decode, decode_context // num_decode // _CONTEXT_GRAIN


class PowerModel:
    """Listens to a Simulation, from when it is made; `finish(end)` counts the idle time to the end.

    `nodes`: each node's power by name (instances name their node; one without a node, or on a node
    without a power section, has only its devices). `tick`: the width of the power series' bins
    (None: no series, for a long-running server).

    Bytes moved cost their energy per bit: a P/D transfer of a prompt's KV on the node's links (both
    instances on one node) or through both nodes' NICs, charged to the request when its decode starts;
    blocks copied to and loaded from KV tiers in host memory in DRAM, charged to the step they come
    with. A P/D prefill's energy is its client request's."""

    def __init__(self, sim: Simulation, nodes: dict[str, NodePower] | None = None, tick: float | None = 1.0) -> None:
        nodes = nodes or {}
        self.tick = tick
        self.pd = sim.pd
        self.instance_names = list(dict.fromkeys(i.name for i in sim.instances))
        members: list[tuple[Instance, int, str, int, DevicePower]] = []  # per engine, in engine order
        for instance in sim.instances:
            node_name = instance.spec.node if instance.spec.node is not None else f"instance:{instance.name}"
            config = instance.deployment.config
            power = instance_device_power(instance.spec, nodes.get(node_name, NodePower()))
            per_engine = config.tensor_parallel_size * config.pipeline_parallel_size
            members.extend((instance, rank, node_name, per_engine, power) for rank in range(len(instance.engines)))
        devices_on: dict[str, int] = {}
        idle_on: dict[str, float] = {}
        for _, _, node_name, devices, power in members:
            devices_on[node_name] = devices_on.get(node_name, 0) + devices
            idle_on[node_name] = idle_on.get(node_name, 0.0) + devices * power.idle_w
        static = {name: nodes.get(name, NodePower()).static_dc_w(idle_on[name]) for name in devices_on}
        self.engines = [_Engine(instance, rank, devices, power, node_name, nodes.get(node_name, NodePower()),
                                devices / devices_on[node_name], static[node_name])
                        for instance, rank, node_name, devices, power in members]
        self.idle_energy = 0.0       # joules at the wall drawn between steps
        self.request_energy: dict[Request, float] = {}
        self._forgotten: list[Request] = []  # ended requests whose energy goes at the next record
        self._kv_home: dict[Request, _Engine] = {}  # a P/D request -> the engine its prefill ran on
        self._tier_blocks: dict[int, int] = {}      # id(KV tiers) -> blocks stored and loaded, counted
        self._splits: dict[tuple, tuple[float, float, float]] = {}  # (cost model, shape) -> its split by bound
        self._wall: list[float] = []  # joules per tick, the cluster at the wall
        self._gpu: list[float] = []   # joules per tick, the cluster's devices
        self._by_instance: dict[str, list[float]] = {name: [] for name in self.instance_names}
        self.end = 0.0
        sim.add_listener(self.on_step, self.on_run)

    # -- listening ------------------------------------------------------------------------
    def forget(self, request: Request) -> None:
        """A finish listener for a long-running server: drop the request's energy once its finish has
        been heard by every listener (at the next record), so memory does not grow with requests."""
        self._forgotten.append(request)

    def on_step(self, record: StepRecord) -> None:
        if self._forgotten:
            self._drop_forgotten()
        e = self.engines[record.engine]
        start = record.start
        if start > e.counted:  # it waited since its last step
            self._gap(e, start)
        d = record.duration
        if d <= 0:
            return
        shape = record.shape
        if shape is None:
            priced = e.price(0.0, d, 0.0)
        else:
            n = shape.num_decode
            # a decode-only step (most of them): priced already, looked up without _split's general key
            priced = None if shape.prefill_tokens or not n else e.priced.get(
                _decode_key(shape.num_tokens, shape.num_reqs, n, shape.decode_context))
            if priced is None:
                priced = self._split(e, shape)
        if e.lockstep:
            c, m, x = priced[0], priced[1], priced[2]
            if c + m + x < d:  # waiting for a lockstep peer's longer step is communication
                priced = e.price(c, m, x + (d - c - m - x))
        scheduled = record.scheduled
        tokens = sum(scheduled.values())
        moved = self._tier_traffic(e) if e.offload is not None else {}
        owners = scheduled.keys()
        if self.pd.client_of or self._kv_home:  # the cluster runs P/D
            owners = [self._owner(e, r) for r in owners]
            for request in owners:
                if request.num_external_tokens and request in self._kv_home:  # its KV came with its decode
                    moved = self._add_moved(moved, self._pd_transfer(self._kv_home.pop(request), e, request))
        joules = self._busy(e, start, record.end, d, priced, tokens, moved)
        if not tokens:  # nothing of any request ran (not seen in practice): nobody's energy
            self.idle_energy += joules
            return
        token_share = priced[7]
        even = (1.0 - token_share) / len(scheduled)
        one = joules * (token_share / tokens + even)  # the share of a request with one token (a decode)
        energy = self.request_energy
        get = energy.get
        if tokens == len(scheduled):  # decodes only: one token each
            for request in owners:
                energy[request] = get(request, 0.0) + one
            return
        for request, num in zip(owners, scheduled.values()):
            energy[request] = get(request, 0.0) + (one if num == 1 else joules * (token_share * num / tokens + even))

    def on_run(self, run: RunRecord) -> None:
        if self._forgotten:
            self._drop_forgotten()
        e = self.engines[run.engine]
        starts, ends = run.starts, run.ends
        start, end = starts[0], ends[-1]
        if start > e.counted:
            self._gap(e, start)
        busy = sum(map(sub, ends, starts))
        if busy <= 0:
            return
        requests = run.requests
        n, middle = len(requests), len(starts) // 2
        # its middle step's shape (a decode: n tokens, n requests), made only if not priced
        priced = e.priced.get(_decode_key(n, n, n, run.first_context + n * middle))
        if priced is None:
            priced = self._split(e, run.shape(middle))
        joules = self._busy(e, start, end, busy, priced, n * len(starts),
                            self._tier_traffic(e) if e.offload is not None else {},
                            map(sub, starts[1:], ends) if e.decay_s else None)
        each = joules / n
        energy = self.request_energy
        get = energy.get
        for request in requests:
            energy[request] = get(request, 0.0) + each

    def finish(self, end: float) -> None:
        """Count every engine's energy up to `end` (the end of the run)."""
        self.end = max(self.end, end)
        for e in self.engines:
            self._gap(e, self.end)

    # -- counting -----------------------------------------------------------------------------
    def _drop_forgotten(self) -> None:
        for request in self._forgotten:
            self.request_energy.pop(request, None)
            self._kv_home.pop(request, None)
        self._forgotten.clear()

    def _owner(self, e: _Engine, request: Request) -> Request:
        """Whose energy a request's is: a P/D prefill's is its client's (whose KV then lives on `e`)."""
        if not request.hold_kv:
            return request
        client = self.pd.client_of.get(request.request_id)
        if client is None:  # a prefill a client sent over HTTP: its own
            return request
        self._kv_home[client] = e
        return client

    def _pd_transfer(self, source: _Engine, e: _Engine, request: Request) -> dict[str, float]:
        """Joules of moving a request's prompt KV from its prefill's engine to `e`, by component."""
        num_bytes = request.num_external_tokens * e.kv_bytes_per_token
        if source.node_name == e.node_name:
            return {"link": e.node.links.joules(num_bytes)}
        return {"nic": source.node.nics.joules(num_bytes) + e.node.nics.joules(num_bytes)}

    def _tier_traffic(self, e: _Engine) -> dict[str, float]:
        """Joules in DRAM of the KV blocks copied to or loaded from the engine's tiers since last asked
        (a node's shared pool: whichever of its engines asks first)."""
        offload = e.offload
        if offload is None or not e.node.dram.pj_per_bit:
            return {}
        blocks = sum(tier.stored + tier.loaded for tier in offload.tiers)
        new = blocks - self._tier_blocks.get(id(offload), 0)
        if not new:
            return {}
        self._tier_blocks[id(offload)] = blocks
        return {"dram": e.node.dram.joules(new * offload.tiers[0].block_bytes)}

    @staticmethod
    def _add_moved(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in {*a, *b}}

    def _split(self, e: _Engine, shape: BatchShape) -> tuple:
        """A step's split by bound (the cost model's breakdown) as the engine prices it (_Engine.price):
        the breakdown once per shape and cost model, its price once per shape and engine (keyed as
        _decode_key keys a decode-only step)."""
        num_decode = shape.num_decode
        pc = shape.prefill_tokens
        # the shape's fields as the key holds them, the step's tokens before its CUDA-graph padding
        raw = (shape.num_tokens, shape.num_reqs, pc,
               int(max(0.0, shape.prefill_work / pc - pc / 2)) // _CONTEXT_GRAIN if pc else 0, num_decode,
               (shape.decode_context // num_decode if num_decode else 0) // _CONTEXT_GRAIN)
        priced = e.priced.get(raw)
        if priced is None:
            cost_model = e.cost_model
            key = (id(cost_model), cost_model.padded_tokens(raw[0]), *raw[1:])
            split = self._splits.get(key)
            if split is None:
                if len(self._splits) >= _SPLITS_KEPT:  # a server runs for days: start afresh now and then
                    self._splits.clear()
                    for other in self.engines:
                        other.priced.clear()
                split = self._splits[key] = tuple(cost_model.breakdown([shape]))
            if len(e.priced) >= _SPLITS_KEPT:
                e.priced.clear()
            priced = e.priced[raw] = e.price(*split)
        return priced

    def _busy(self, e: _Engine, start: float, end: float, busy: float, priced: tuple, tokens: int,
              moved: dict[str, float], gaps: Iterable[float] | None = None) -> float:
        """Count an engine busy for `busy` seconds within [start, end) (the rest: standby between the
        steps of a run, `gaps`: each of them, where its standby decays), its kernels split by bound as
        `priced` (_Engine.price), `tokens` computed and `moved` (joules of bytes moved besides, by
        component); return the busy joules at the wall (the requests')."""
        scale = e.devices * busy / priced[3]
        compute, memory, communication = priced[4] * scale, priced[5] * scale, priced[6] * scale
        gpu = compute + memory + communication
        limit = e.max_total_w * busy
        if 0 < limit < gpu:  # the board's power limit holds the step's mean
            cap = limit / gpu
            compute, memory, communication, gpu = compute * cap, memory * cap, communication * cap, gpu * cap
        gpu_j = e.gpu_j
        gpu_j["compute"] += compute
        gpu_j["memory"] += memory
        gpu_j["communication"] += communication
        if e.charges_links:  # the step's collectives
            moved = self._add_moved(moved, {"link": e.node.links.joules(e.link_bytes_per_token * tokens * e.devices)})
        if moved:
            for k, j in moved.items():
                e.moved_j[k] += j
            e.step_moved_w = {k: j / busy for k, j in moved.items()}
            joules = (e.busy_static_w * busy + gpu + sum(moved.values())) * e.to_wall
        else:
            if e.step_moved_w:
                e.step_moved_w = {}
            joules = (e.busy_static_w * busy + gpu) * e.to_wall
        e.busy += busy
        e.step_gpu_w = gpu / busy
        if e.decay_s:  # its standby falls from what this step drew (at most the peak)
            p = e.power
            e.excess_w = max(0.0, min(p.standby_peak_w, e.step_gpu_w / e.devices) - p.standby_w)
        between = end - start - busy
        wall, drawn = joules, gpu  # what [start, end) drew, at the wall and the devices'
        if between > 0:  # short waits between the steps of a run, at standby
            excess = 0.0
            if gaps is not None and e.excess_w:  # each right after a step: the decay's first moments
                tau = e.decay_s
                excess = e.devices * e.excess_w * tau * sum(-math.expm1(-g / tau) for g in gaps if g > 0)
            gpu_j["standby"] += e.standby_total_w * between + excess
            self.idle_energy += e.standby_wall_w * between + excess * e.to_wall
            wall = joules + between * e.standby_wall_w + excess * e.to_wall
            drawn = gpu + between * e.devices * e.power.standby_w + excess
        tick = self.tick
        if tick is not None:
            k = int(start // tick)
            mine = self._by_instance[e.instance]
            if k == int(end // tick) and k < len(mine) and k * tick <= start < end <= (k + 1) * tick:
                # within one tick, as most steps: all of it there (as _bin would put it)
                self._wall[k] += wall
                self._gpu[k] += drawn
                mine[k] += wall
            else:
                self._bin(e, start, end, wall, drawn)
        e.last_end = e.counted = end
        return joules

    def _gap(self, e: _Engine, until: float) -> None:
        """Count an engine's time between steps, up to `until`: standby after work, then idle."""
        standby, idle = e.gap(until)
        if standby + idle <= 0:
            return
        p = e.power
        e.gpu_j["standby"] += e.devices * p.standby_w * standby
        e.gpu_j["idle"] += e.devices * p.idle_w * idle
        self.idle_energy += e.standby_wall_w * standby + e.idle_wall_w * idle
        a = e.counted
        if standby > 0 and e.excess_w:  # the decay above standby, second by second
            excess = e.excess_j(a, a + standby)
            e.gpu_j["standby"] += excess
            self.idle_energy += excess * e.to_wall
            if self.tick is not None:
                self._bin_decay(e, a, a + standby)
        if self.tick is not None:
            if standby > 0:
                self._bin(e, a, a + standby, e.standby_wall_w * standby, e.devices * p.standby_w * standby)
            if idle > 0:
                self._bin(e, a + standby, until, e.idle_wall_w * idle, e.devices * p.idle_w * idle)
        e.counted = until

    def _bin(self, e: _Engine, a: float, b: float, wall: float, gpu: float) -> None:
        """Spread joules evenly over [a, b) into the ticks [k, k + 1) * tick."""
        if b <= a:
            return
        tick, mine = self.tick, self._by_instance[e.instance]
        k = int(a // tick)
        last = int(b // tick)
        for series in (self._wall, self._gpu, mine):
            if len(series) <= last:
                series.extend([0.0] * (last + 1 - len(series)))
        while k <= last:
            fraction = (min(b, (k + 1) * tick) - max(a, k * tick)) / (b - a)
            if fraction > 0:
                self._wall[k] += wall * fraction
                self._gpu[k] += gpu * fraction
                mine[k] += wall * fraction
            k += 1

    def _bin_decay(self, e: _Engine, a: float, b: float) -> None:
        """Put the decay's joules above standby over [a, b) into the ticks they fall in."""
        tick, mine = self.tick, self._by_instance[e.instance]
        last = int(b // tick)
        for series in (self._wall, self._gpu, mine):
            if len(series) <= last:
                series.extend([0.0] * (last + 1 - len(series)))
        lo, k = a, int(a // tick)
        while lo < b:
            hi = min(b, (k + 1) * tick)
            if hi > lo:
                gpu = e.excess_j(lo, hi)
                self._wall[k] += gpu * e.to_wall
                self._gpu[k] += gpu
                mine[k] += gpu * e.to_wall
                lo = hi
            k += 1

    # -- reading ---------------------------------------------------------------------------
    @property
    def energy(self) -> dict[str, float]:
        """Joules at the wall so far, by component."""
        return self._sum(e.components() for e in self.engines)

    @property
    def gpu_energy(self) -> dict[str, float]:
        """The devices' joules so far, by state."""
        return self._sum(e.gpu_j for e in self.engines)

    @property
    def total_energy(self) -> float:
        return sum(self.energy.values())

    def energy_of(self, request: Request) -> float:
        """Joules attributed to a request so far."""
        return self.request_energy.get(request, 0.0)

    def power_series(self, end: float | None = None) -> list[float]:
        """Mean watts of the cluster at the wall in each tick [k, k + 1) * tick, up to the one holding
        `end` (default: the end counted)."""
        return self._watts(self._wall, end)

    def gpu_power_series(self, end: float | None = None) -> list[float]:
        """The same for the cluster's devices alone."""
        return self._watts(self._gpu, end)

    def instance_power_series(self, name: str, end: float | None = None) -> list[float]:
        return self._watts(self._by_instance[name], end)

    def _watts(self, joules: list[float], end: float | None) -> list[float]:
        ticks = max(0, math.ceil((self.end if end is None else end) / self.tick))
        return [j / self.tick for j in (joules + [0.0] * ticks)[:ticks]]

    @staticmethod
    def _sum(parts: Iterable[dict[str, float]]) -> dict[str, float]:
        out: dict[str, float] = {}
        for part in parts:
            for k, v in part.items():
                out[k] = out.get(k, 0.0) + v
        return out

    def summary(self, output_tokens: int, request_energies: Iterable[float] | None = None) -> dict:
        """The energy section of summary.json."""
        energy = self.energy
        total = sum(energy.values())
        attributed = sum(self.request_energy.values())
        by_instance = {name: dict.fromkeys(COMPONENTS, 0.0) for name in self.instance_names}
        states = {name: dict.fromkeys(GPU_STATES, 0.0) for name in self.instance_names}
        for e in self.engines:
            for k, v in e.components().items():
                by_instance[e.instance][k] += v
            for k, v in e.gpu_j.items():
                states[e.instance][k] += v
        return {
            "total_j": total,
            "requests_j": attributed,
            "idle_j": self.idle_energy,
            "mean_power_w": total / self.end if self.end > 0 else 0.0,
            "per_output_token_j": total / output_tokens if output_tokens else None,
            "requests_per_output_token_j": attributed / output_tokens if output_tokens else None,
            "per_request_j": distribution(self.request_energy.values() if request_energies is None
                                          else request_energies),
            "by_component_j": {c: energy.get(c, 0.0) for c in COMPONENTS},
            "gpu_by_state_j": self.gpu_energy,
            "by_instance_j": {name: {"total_j": sum(comps.values()), **comps, "gpu_by_state_j": states[name]}
                              for name, comps in by_instance.items()},
        }

    # -- now (a server's gauges and counters) ---------------------------------------------------
    def power_now(self, now: float, busy: set[int]) -> dict[tuple[str, str], float]:
        """Watts at the wall by (instance, component) at virtual time `now`; `busy`: the engines with a
        step running (drawing what their last step drew)."""
        out = {(name, c): 0.0 for name in self.instance_names for c in COMPONENTS}
        for index, e in enumerate(self.engines):
            dc = dict(e.static_dc)
            if index in busy:
                dc["cpu"] = dc.get("cpu", 0.0) + e.cpu_busy_w
                for k, w in e.step_moved_w.items():
                    dc[k] = dc.get(k, 0.0) + w
                dc["gpu"] = e.step_gpu_w
            else:
                standby = e.last_end is not None and now < e.last_end + e.power.standby_s
                dc["gpu"] = e.devices * (e.power.standby_w if standby else e.power.idle_w)
                if standby and e.excess_w:
                    dc["gpu"] += e.devices * e.excess_w * math.exp((e.last_end - max(now, e.last_end)) / e.decay_s)
            dc["psu"] = sum(dc.values()) * (e.to_wall - 1.0)
            for c, w in dc.items():
                out[e.instance, c] += w
        return out

    def energy_now(self, now: float, busy: set[int]) -> dict[tuple[str, str], float]:
        """Joules at the wall by (instance, component) up to `now`: each engine counted to its last step,
        and one with no step running on to `now` (so the counters only grow)."""
        out = {(name, c): 0.0 for name in self.instance_names for c in COMPONENTS}
        for index, e in enumerate(self.engines):
            for c, v in e.components(*(e.gap(now) if index not in busy else (0.0, 0.0))).items():
                out[e.instance, c] += v
        return out


def instance_device_power(spec: InstanceSpec, node: NodePower) -> DevicePower:
    """What one of an instance's devices draws: its device's power on its node, with the instance's own
    `power` fields."""
    power = node.device_power(spec.deployment.device)
    if "power" in spec.extra:
        power = replace(power, **device_power_changes(spec.extra["power"], f"instance {spec.name}: power"))
    return power


def devices_idle_w(specs: Iterable[InstanceSpec], nodes: dict[str, NodePower]) -> dict[str, float]:
    """Watts the devices of each node (of those instances that name one) draw idle."""
    idle: dict[str, float] = {}
    for spec in specs:
        if spec.node is not None:
            config = spec.deployment.config
            devices = config.tensor_parallel_size * config.pipeline_parallel_size * config.data_parallel_size
            idle[spec.node] = (idle.get(spec.node, 0.0)
                               + devices * instance_device_power(spec, nodes.get(spec.node, NodePower())).idle_w)
    return idle


def nodes_power(nodes: dict[str, dict]) -> dict[str, NodePower]:
    """The power of each node of a cluster spec that has a `power` section (ClusterSpec.nodes)."""
    return {name: node_power_from_dict(settings["power"], settings.get("host_memory"))
            for name, settings in nodes.items() if "power" in settings}
