"""Device and link specifications: the physical facts a cost model starts from.

Shipped as YAML files (one device each) inside the package; a user adds a device
with their own YAML of the same shape, either by path (`load_device("my_gpu.yaml")`)
or by dropping it in $VLLM_EMULATOR_HOME/hardware/ (default ~/.vllm-emulator/hardware/),
where it joins the catalogue by name (and replaces a shipped device of the same name).
An overlay (`base: NAME` plus the fields it changes, as `vllm-emulator calibrate` writes)
refines a catalogue device; the overlays in data/hardware/calibrated/ were fitted to real
vLLM runs and apply to the shipped device they name.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path

import yaml

GiB = 1 << 30


class UnknownHardwareError(ValueError):
    """No shipped spec and no readable YAML for the given device name."""


# What NCCL's topology model credits a link with, as a share of its spec rate (nccl src/graph/topo.h:
# PCIe width * speed / 80 = 75 % of the raw rate; NVLink 20 GB/s per 25 GB/s lane on Ampere, 20.6 on
# Hopper, 12 per 14 on the GA10x bridge, 40.1 per 50 on Blackwell; AMD xGMI 16 of ~21 GB/s per link).
_BUS_EFFICIENCY = {"nvlink": 0.82, "pcie": 0.75, "xgmi": 0.75, "ici": 0.75}


@dataclass(frozen=True)
class LinkSpec:
    """A link between devices (or to host memory), as a collective sees it.

    `kind` is the link's class (nvlink, pcie, xgmi, ici): it sets the latencies of NCCL's
    protocols over it and whether vLLM's custom all-reduce may span more than two GPUs.
    `p2p`: GPUs can read each other's memory over it (CUDA peer access) -- vLLM's custom
    all-reduce needs it, and without it NCCL stages every transfer through host memory.
    `mesh`: how many GPUs it connects pairwise (an NVSwitch: 8; a bridge: 2; PCIe: none, 0).
    `bus_bandwidth`: the rate a large collective moves data at (NCCL's bus bandwidth);
    by default the spec `bandwidth` times the share NCCL's topology model credits the kind with,
    halved without P2P (the data crosses the bus twice, through host memory).
    `tables`: collectives measured on this device's link apply (false: only the link model, e.g. for
    figures fitted to another system's link)."""
    name: str
    bandwidth: float  # bytes/s, per direction (spec)
    latency: float  # seconds: one hop of a collective's bulk protocol
    kind: str = "pcie"
    p2p: bool = True
    mesh: int = 0
    bus_bandwidth: float = 0.0  # 0: derived from `bandwidth`
    tables: bool = True

    def __post_init__(self) -> None:
        if self.bandwidth <= 0 or self.latency < 0:
            raise ValueError(f"link {self.name}: bandwidth must be > 0 and latency >= 0")
        if not self.bus_bandwidth:
            bus = self.bandwidth * _BUS_EFFICIENCY.get(self.kind, 0.75) * (1.0 if self.p2p else 0.5)
            object.__setattr__(self, "bus_bandwidth", bus)


@dataclass(frozen=True)
class HostSpec:
    """CPU time of one engine step, in microseconds (the YAML's `host` section): vLLM's scheduler, the
    preparation of the step's inputs and the processing of its outputs, which grow with the requests
    in the batch, plus handing the step to each worker process of a tensor/pipeline-parallel group.
    With async scheduling it runs while the GPU works on the previous step and only shows when it is
    longer; without, it adds to every step."""
    step_us: float = 0.0
    per_request_us: float = 0.0
    per_worker_us: float = 0.0

    def seconds(self, num_reqs: int, workers: int) -> float:
        return (self.step_us + self.per_request_us * num_reqs + self.per_worker_us * (workers - 1)) * 1e-6


@dataclass(frozen=True)
class DevicePower:
    """What one device draws, in watts (the YAML's `power` section).

    idle: nothing to do; standby: just after work the driver keeps its clocks up, for `standby_s`
    seconds, then it falls back to idle; during a step, by what bounds the kernels running:
    compute, memory or communication (a collective: clocks up, the SMs mostly waiting). A step
    draws the time-weighted mean of those, at most `max_w`, the board power limit."""
    idle_w: float = 0.0
    max_w: float = 0.0
    standby_w: float | None = None        # default: idle_w (no standby state)
    standby_s: float = 0.0
    compute_w: float | None = None        # default: max_w
    memory_w: float | None = None         # default: max_w
    communication_w: float | None = None  # default: standby_w

    def __post_init__(self) -> None:
        standby = self.idle_w if self.standby_w is None else self.standby_w
        for name, default in (("standby_w", standby), ("compute_w", self.max_w), ("memory_w", self.max_w),
                              ("communication_w", standby)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        for f in fields(self):
            value = getattr(self, f.name)
            if not 0 <= value < float("inf"):
                raise ValueError(f"power.{f.name} must be a finite number >= 0; got {value}")


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    kind: str  # gpu | tpu
    memory_bytes: int
    memory_bandwidth: float  # bytes/s
    flops: dict[str, float]  # dense FLOP/s per dtype
    power: DevicePower
    interconnect: LinkSpec
    host_link: LinkSpec
    host: HostSpec = HostSpec()
    attention_skew: float | None = None  # decode attention over mixed lengths (emulator.cost.base.decode_skew)
    arch: str = ""
    sm_count: int = 0  # streaming multiprocessors (sizes some vLLM buffers)
    aliases: tuple[str, ...] = ()
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GiB

    def peak_flops(self, dtype: str) -> float:
        """Dense peak for a dtype; a dtype the device lacks runs at the next wider one."""
        for candidate in {"fp4": ("fp4", "fp8", "bf16"), "fp8": ("fp8", "bf16"), "int8": ("int8", "fp8", "bf16"),
                          "int4": ("int8", "fp8", "bf16")}.get(dtype, (dtype, "bf16", "fp16")):
            if candidate in self.flops:
                return self.flops[candidate]
        return max(self.flops.values())


def _optional_float(value) -> float | None:
    return None if value is None else float(value)


def _link_kind(name: str) -> str:
    name = name.lower()
    for prefix, kind in (("nvlink", "nvlink"), ("ici", "ici"), ("infinity", "xgmi"), ("xgmi", "xgmi")):
        if name.startswith(prefix):
            return kind
    return "pcie"


def _link(d: dict, default_name: str) -> LinkSpec:
    name = str(d.get("name", default_name))
    kind = str(d.get("kind", _link_kind(name)))
    return LinkSpec(name=name, bandwidth=float(d["bandwidth"]), latency=float(d.get("latency", 0.0)), kind=kind,
                    p2p=bool(d.get("p2p", True)), mesh=int(d.get("mesh", 0 if kind == "pcie" else 8)),
                    bus_bandwidth=float(d.get("bus_bandwidth", 0.0)), tables=bool(d.get("tables", True)))


def device_from_dict(d: dict, source: str = "") -> DeviceSpec:
    try:
        return DeviceSpec(
            name=str(d["name"]),
            kind=str(d.get("kind", "gpu")),
            memory_bytes=int(d["memory_bytes"]),
            memory_bandwidth=float(d["memory_bandwidth"]),
            flops={str(k): float(v) for k, v in d["flops"].items()},
            power=DevicePower(**{k: float(v) for k, v in d.get("power", {}).items()}),
            interconnect=_link(d.get("interconnect", {"bandwidth": 32e9, "latency": 1e-5}), "pcie"),
            host_link=_link(d.get("host_link", {"bandwidth": 32e9, "latency": 1e-5}), "pcie"),
            host=HostSpec(**{k: float(v) for k, v in (d.get("host") or {}).items()}),
            attention_skew=_optional_float((d.get("attention") or {}).get("decode_skew")),
            arch=str(d.get("arch", "")),
            sm_count=int(d.get("sm_count", 0)),
            aliases=tuple(d.get("aliases", ())),
            raw=d,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UnknownHardwareError(f"{source or 'device spec'}: missing or bad field ({exc})") from None


def _shipped():
    return resources.files("emulator") / "data" / "hardware"


def user_hardware_dir() -> Path:
    return Path(os.environ.get("VLLM_EMULATOR_HOME", "~/.vllm-emulator")).expanduser() / "hardware"


class _KeyTwice(yaml.YAMLError):
    def __init__(self, key: str, first: int, again: int) -> None:
        super().__init__(f"{again}: {key!r} is given twice in one mapping (first on line {first}); say it once")
        self.line = again


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's C parser when installed (10x faster)
    """Refuses a key given twice in one mapping: YAML would keep the last one without a word."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.value == "<<":
                    continue
                line = key_node.start_mark.line + 1
                if key_node.value in first:
                    raise _KeyTwice(key_node.value, first[key_node.value], line)
                first[key_node.value] = line
        return super().construct_mapping(node, deep)


def _parse(text: str):
    return yaml.load(text, Loader=_Loader)


def _overlay(base: dict, overlay: dict) -> dict:
    """`base` refined by an overlay: its sections merged field by field, its scalars replacing."""
    merged = dict(base)
    for key, value in overlay.items():
        if key == "base":
            continue
        merged[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def _find(specs: dict[str, dict], name: str) -> dict | None:
    wanted = _normalise(name)
    for d in specs.values():
        if wanted in {_normalise(n) for n in [d["name"], *d.get("aliases", [])]}:
            return d
    return None


def _read_spec(entry, specs: dict[str, dict]) -> dict:
    """One device YAML; an overlay (`base: NAME`, e.g. what `vllm-emulator calibrate` writes) is
    resolved against the devices read so far."""
    try:
        d = _parse(entry.read_text())
    except _KeyTwice as exc:
        raise UnknownHardwareError(f"{entry}:{exc}") from None
    except yaml.YAMLError as exc:
        raise UnknownHardwareError(f"{entry}: not valid YAML ({exc})") from None
    if isinstance(d, dict) and "base" in d:
        base = _find(specs, str(d["base"]))
        if base is None:
            raise UnknownHardwareError(f"{entry}: overlay of unknown device {d['base']!r}")
        d = _overlay(base, d)
    if not isinstance(d, dict) or "name" not in d:
        raise UnknownHardwareError(f"{entry}: a device spec needs at least a `name`")
    aliases = d.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
        got = "nothing" if aliases is None else repr(aliases)
        raise UnknownHardwareError(f"{entry}: aliases: expected a list of names (e.g. [My-GPU]), got {got}; "
                                   "leave the field out for none")
    return d


def _check_names(entry, d: dict, specs: dict[str, dict], sources: dict[str, str]) -> None:
    """A device joining the catalogue may replace the device of its own name, but none of its names or aliases
    may also name another device: a lookup must find one."""
    for alias in [d["name"], *d.get("aliases", [])]:
        other = _find(specs, str(alias))
        if other is not None and other["name"] != d["name"]:
            what = "name" if alias == d["name"] else "aliases"
            raise UnknownHardwareError(
                f"{entry}: {what}: {alias!r} of device {d['name']!r} also names device {other['name']!r} "
                f"({sources[other['name']]}); give each device names of its own")


def _shipped_specs() -> dict[str, dict]:
    """The catalogue: shipped specs, the shipped overlays fitted to real runs (`calibrated/`), then
    the user's files (a user file wins on a name clash)."""
    specs: dict[str, dict] = {}
    sources: dict[str, str] = {}
    user = user_hardware_dir()
    shipped = _shipped()
    entries = ([e for e in shipped.iterdir() if e.name.endswith(".yaml")]
               + sorted((e for e in shipped.joinpath("calibrated").iterdir() if e.name.endswith(".yaml"))
                        if shipped.joinpath("calibrated").is_dir() else (), key=lambda e: e.name))
    users = sorted(user.glob("*.yaml")) if user.is_dir() else []
    for entry in entries + users:
        d = _read_spec(entry, specs)
        _check_names(entry, d, specs, sources)
        specs[str(d["name"])] = d
        sources[str(d["name"])] = str(entry) if entry in users else "shipped"
    return specs


def shipped_devices() -> list[str]:
    """Every device of the catalogue (shipped and the user's)."""
    return sorted(_shipped_specs())


def _normalise(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def load_device(name_or_path: str) -> DeviceSpec:
    """Resolve a device by name or alias (case and punctuation ignored) or from a YAML file."""
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return device_from_dict(_read_spec(path, _shipped_specs()), source=str(path))
    specs = _shipped_specs()
    d = _find(specs, name_or_path)
    if d is not None:
        return device_from_dict(d, source=d["name"])
    names = sorted(specs)
    hint = difflib.get_close_matches(name_or_path, names, n=1, cutoff=0.4)
    hint_text = f" Did you mean {hint[0]!r}?" if hint else ""
    raise UnknownHardwareError(
        f"unknown hardware {name_or_path!r}.{hint_text} Known: {', '.join(names)}; "
        "or pass a YAML file describing the device (see `vllm-emulator hardware show H100`)."
    )
