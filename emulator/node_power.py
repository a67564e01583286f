"""What a node (one server) draws besides its accelerators: the `power` section of a cluster file's node.

Two spellings are read, told apart by their keys:

- the emulator's (README: Power and energy), in watts and picojoules per bit:

      power:
        idle_w: 382            # the node measured idle at the wall (base_w is what its parts leave), or
        base_w: 219            # the chassis itself: motherboard, fans, BMC, ...
        psu_efficiency: 0.9    # wall power = DC power / efficiency
        cpu: {idle_w: 10, active_w: 185, util: 0.5, busy_util: 0.7}
        dram: {dimms: 4, idle_w: 4, pj_per_bit: 6}
        links: {count: 1, idle_w: 5, pj_per_bit: 4}
        nics: {count: 1, idle_w: 11.2, pj_per_bit: 10}
        storage: {count: 1, idle_w: 5.9}
        devices: {A6000: {idle_w: 33, standby_w: 89}}   # a device's own `power` fields, for this node

- LLMServingSim 2.0's (`base_node_power`, `npu`, `cpu`, `dram`, `link`, `nic`, `storage`), read as
  LLMServingSim reads it: its `active_power` is what a device draws in every kernel, a CPU runs at
  `util` while the node is up and at 0.7 while a device computes (its simulator's constant),
  DIMMs are the node's memory over `dimm_size`, devices are counted from the instances (`num_npus`
  is not needed), a device's standby is flat (no decay after work), and there is no power-supply loss.

The CPU draws idle_w + (active_w - idle_w) * utilisation: `util` while the node serves, `busy_util`
while its engines step. Energy per bit is charged for the bytes a component moves: DRAM for KV
blocks offloaded to host memory, links and NICs for collectives and KV transfers.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from emulator.hardware import DevicePower, DeviceSpec, GiB

LLMSERVINGSIM_BUSY_UTIL = 0.7  # LLMServingSim's CPU utilisation while a device computes


@dataclass(frozen=True)
class Part:
    """`count` identical parts (DIMMs, links, NICs, drives): each draws `idle_w`, plus `pj_per_bit` for each
    bit it moves."""
    count: float = 0.0
    idle_w: float = 0.0
    pj_per_bit: float = 0.0

    @property
    def idle_total_w(self) -> float:
        return self.count * self.idle_w

    def joules(self, num_bytes: float) -> float:
        return num_bytes * 8.0 * self.pj_per_bit * 1e-12


@dataclass(frozen=True)
class CPU:
    idle_w: float = 0.0
    active_w: float = 0.0
    util: float = 0.0        # utilisation while the node is up (server processes waiting)
    busy_util: float = 0.0   # utilisation while its engines step; below `util` means no extra draw

    def draw(self, util: float) -> float:
        return self.idle_w + (self.active_w - self.idle_w) * util

    @property
    def busy_extra_w(self) -> float:
        """What stepping adds to the CPU's draw."""
        return (self.active_w - self.idle_w) * max(self.busy_util - self.util, 0.0)


@dataclass(frozen=True)
class NodePower:
    base_w: float = 0.0
    psu_efficiency: float = 1.0
    cpu: CPU = field(default_factory=CPU)
    dram: Part = field(default_factory=Part)
    links: Part = field(default_factory=Part)
    nics: Part = field(default_factory=Part)
    storage: Part = field(default_factory=Part)
    devices: dict[str, dict] = field(default_factory=dict)  # device name -> DevicePower fields for this node
    idle_w: float | None = None  # measured at the wall, all idle: then the chassis is what the other parts leave

    def static_dc_w(self, devices_idle_w: float = 0.0) -> dict[str, float]:
        """DC watts the node draws whatever its engines do, by component; `devices_idle_w`: what its
        devices draw idle (the chassis is derived from a measured idle)."""
        parts = {"cpu": self.cpu.draw(self.cpu.util), "dram": self.dram.idle_total_w, "link": self.links.idle_total_w,
                 "nic": self.nics.idle_total_w, "storage": self.storage.idle_total_w}
        base = self.base_w
        if self.idle_w is not None:
            dc = sum(parts.values()) + devices_idle_w
            base = self.idle_w * self.psu_efficiency - dc
            if base < 0:
                raise ValueError(f"power.idle_w: {self.idle_w:g} W at the wall is less than what the node's parts "
                                 f"draw idle ({dc / self.psu_efficiency:.1f} W)")
        return {"base": base, **parts}

    def device_power(self, device: DeviceSpec) -> DevicePower:
        """A device's draw on this node: its spec, with what this node's section says of it (by name or alias)."""
        names = {_normalise(n) for n in (device.name, *device.aliases)}
        power = device.power
        for name, changes in self.devices.items():
            if _normalise(name) in names:
                power = replace(power, **changes)
        return power


def _normalise(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def node_power_from_dict(d: dict, host_memory: float | None = None) -> NodePower:
    """A node's `power` section in either spelling. `host_memory` (bytes): the node's memory, for
    LLMServingSim's DIMM count. Raises ValueError naming the field."""
    if not isinstance(d, dict):
        raise ValueError("power: expected a mapping")
    if "base_node_power" in d or "npu" in d:
        return _llmservingsim(d, host_memory)
    return _emulator(d)


def device_power_changes(d: dict, where: str = "power") -> dict[str, float]:
    """Fields of a device's `power` (emulator.hardware.DevicePower) that a node or an instance sets for
    its devices, checked. Raises ValueError naming the field."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a mapping")
    known = {f.name for f in fields(DevicePower)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r}; known: {', '.join(sorted(known))}")
    return {k: _number(d, k, where) for k in d}


def _number(d: dict, key: str, where: str, default: float = 0.0, upper: float | None = None) -> float:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf") \
            or (upper is not None and value > upper):
        bound = f" and at most {upper:g}" if upper is not None else ""
        raise ValueError(f"{where}.{key}: expected a number >= 0{bound}; got {value!r}")
    return float(value)


def _section(d: dict, key: str, where: str, allowed: set[str]) -> dict:
    value = d.get(key, {})
    if not isinstance(value, dict):
        raise ValueError(f"{where}.{key}: expected a mapping")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ValueError(f"{where}.{key}: unknown field {unknown[0]!r}; known: {', '.join(sorted(allowed))}")
    return value


def _part(d: dict, key: str, count_key: str) -> Part:
    s = _section(d, key, "power", {count_key, "idle_w", "pj_per_bit"})
    w = f"power.{key}"
    return Part(_number(s, count_key, w), _number(s, "idle_w", w), _number(s, "pj_per_bit", w))


def _emulator(d: dict) -> NodePower:
    _check_keys(d, {"idle_w", "base_w", "psu_efficiency", "cpu", "dram", "links", "nics", "storage", "devices"})
    if "idle_w" in d and "base_w" in d:
        raise ValueError("power: give `idle_w` (the node measured idle) or `base_w` (the chassis), not both")
    cpu_d = _section(d, "cpu", "power", {"idle_w", "active_w", "util", "busy_util"})
    util = _number(cpu_d, "util", "power.cpu", upper=1.0)
    cpu = CPU(_number(cpu_d, "idle_w", "power.cpu"), _number(cpu_d, "active_w", "power.cpu"), util,
              _number(cpu_d, "busy_util", "power.cpu", default=util, upper=1.0))
    own = _section(d, "devices", "power", set(d.get("devices", {}) if isinstance(d.get("devices"), dict) else ()))
    overrides = {str(name): device_power_changes(changes, f"power.devices.{name}") for name, changes in own.items()}
    efficiency = _number(d, "psu_efficiency", "power", default=1.0, upper=1.0)
    if efficiency == 0:
        raise ValueError("power.psu_efficiency: expected a fraction above 0")
    return NodePower(_number(d, "base_w", "power"), efficiency, cpu, _part(d, "dram", "dimms"),
                     _part(d, "links", "count"), _part(d, "nics", "count"), _part(d, "storage", "count"), overrides,
                     _number(d, "idle_w", "power") if "idle_w" in d else None)


def _check_keys(d: dict, known: set[str]) -> None:
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"power: unknown field {unknown[0]!r}; known: {', '.join(sorted(known))}")


def _llmservingsim(d: dict, host_memory: float | None) -> NodePower:
    _check_keys(d, {"base_node_power", "npu", "cpu", "dram", "link", "nic", "storage"})
    npus = _section(d, "npu", "power", set(d.get("npu", {}) if isinstance(d.get("npu"), dict) else ()))
    devices = {}
    for name in npus:
        s = _section(npus, name, "power.npu", {"idle_power", "standby_power", "active_power", "standby_duration",
                                               "num_npus"})
        w = f"power.npu.{name}"
        active = _number(s, "active_power", w)
        idle = _number(s, "idle_power", w)
        standby = _number(s, "standby_power", w, default=idle)
        devices[str(name)] = {"idle_w": idle, "standby_w": standby, "standby_peak_w": standby, "standby_decay_s": 0.0,
                              "standby_s": _number(s, "standby_duration", w), "max_w": active, "compute_w": active,
                              "memory_w": active, "communication_w": active}  # its standby is flat
    cpu_d = _section(d, "cpu", "power", {"idle_power", "active_power", "util"})
    cpu = CPU(_number(cpu_d, "idle_power", "power.cpu"), _number(cpu_d, "active_power", "power.cpu"),
              _number(cpu_d, "util", "power.cpu", upper=1.0), LLMSERVINGSIM_BUSY_UTIL)
    dram_d = _section(d, "dram", "power", {"dimm_size", "idle_power", "energy_per_bit", "mem_size",
                                           "pim_active_power"})
    size = _number(dram_d, "mem_size", "power.dram", default=(host_memory or 0.0) / GiB)
    dimm = _number(dram_d, "dimm_size", "power.dram")
    dram = Part(size // dimm if dimm else 0.0, _number(dram_d, "idle_power", "power.dram"),
                _number(dram_d, "energy_per_bit", "power.dram"))
    link_d = _section(d, "link", "power", {"num_links", "idle_power", "energy_per_bit"})
    nic_d = _section(d, "nic", "power", {"num_nics", "idle_power"})
    storage_d = _section(d, "storage", "power", {"num_devices", "idle_power"})
    return NodePower(
        _number(d, "base_node_power", "power"), 1.0, cpu, dram,
        Part(_number(link_d, "num_links", "power.link"), _number(link_d, "idle_power", "power.link"),
             _number(link_d, "energy_per_bit", "power.link")),
        Part(_number(nic_d, "num_nics", "power.nic"), _number(nic_d, "idle_power", "power.nic")),
        Part(_number(storage_d, "num_devices", "power.storage"), _number(storage_d, "idle_power", "power.storage")),
        devices)
