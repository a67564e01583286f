"""Device and link specifications: the physical facts a cost model starts from.

Shipped as YAML files (one device each) inside the package; a user adds a device
with their own YAML of the same shape, either by path (`load_device("my_gpu.yaml")`)
or by dropping it in $VLLM_EMULATOR_HOME/hardware/ (default ~/.vllm-emulator/hardware/),
where it joins the catalogue by name (and replaces a shipped device of the same name).
An overlay (`base: NAME` plus the fields it changes, as `vllm-emulator calibrate` writes)
refines a catalogue device; the overlays in data/hardware/calibrated/ were fitted to real
vLLM runs and apply to the shipped device they name.

A device file is read strictly, as cluster files are (profiles/cluster_file.py): an unknown field
at any level, a key given twice or a bad value is an error naming the file, the line and the field
(`my.yaml:3: memroy_bytes: unknown field; did you mean 'memory_bytes'?`), never silently ignored.
The checks live here, beside the only reader of device files, so everything that loads a device
(replay, serve, cluster files, importers) gets them.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from functools import cache
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
    seconds, then it falls back to idle; its draw falls from `standby_peak_w` (at most what the last
    step drew) toward `standby_w` with time constant `standby_decay_s` (0: flat at `standby_w`);
    during a step, by what bounds the kernels running: compute, memory or communication (a collective:
    clocks up, the SMs mostly waiting). A step draws the time-weighted mean of those, at most `max_w`,
    the board power limit."""
    idle_w: float = 0.0
    max_w: float = 0.0
    standby_w: float | None = None        # default: idle_w (no standby state)
    standby_s: float = 0.0
    compute_w: float | None = None        # default: max_w
    memory_w: float | None = None         # default: max_w
    communication_w: float | None = None  # default: standby_w
    standby_peak_w: float | None = None   # default: standby_w (no decay)
    standby_decay_s: float = 0.0

    def __post_init__(self) -> None:
        standby = self.idle_w if self.standby_w is None else self.standby_w
        for name, default in (("standby_w", standby), ("compute_w", self.max_w), ("memory_w", self.max_w),
                              ("communication_w", standby), ("standby_peak_w", standby)):
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
    # the package's own folder (importlib.resources would load zipfile, tempfile, ... for the same path)
    return Path(__file__).parent / "data" / "hardware"


def user_hardware_dir() -> Path:
    return Path(os.environ.get("VLLM_EMULATOR_HOME", "~/.vllm-emulator")).expanduser() / "hardware"


_COMPOSER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's C parser when installed (10x faster)
_DTYPES = ("fp32", "tf32", "bf16", "fp16", "fp8", "int8", "fp4", "int4")  # what `peak_flops` is asked for
_DEVICE_KINDS = ("gpu", "tpu", "cpu")
_REQUIRED = {"": ("name", "memory_bytes", "memory_bandwidth", "flops"), "interconnect": ("bandwidth",),
             "host_link": ("bandwidth",)}


# The readers of a field's value: each returns it as a device takes it, or raises ValueError saying what it expected.
def _name(value):
    if isinstance(value, (dict, list, bool)) or value is None or str(value).strip() == "":
        raise ValueError("a name")
    return str(value)


def _choice(*choices: str):
    def read(value):
        if value not in choices:
            raise ValueError(f"one of {', '.join(choices)}")
        return value
    return read


def _number(value, positive: bool = False):
    """A finite number (>= 0; > 0 if `positive`). YAML 1.1 reads `4e10` (no dot) as a string: taken
    as the number it spells, as YAML 1.2 and JSON read it."""
    what = "a number > 0" if positive else "a number >= 0"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(what)
    try:
        number = float(value)
    except ValueError:
        raise ValueError(what) from None
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        raise ValueError(what)
    return value if isinstance(value, int) else number


def _positive(value):
    return _number(value, positive=True)


def _whole(value, positive: bool = False):
    """A whole number; `4e10` or `8.0e+10` (a byte count as one writes it) is one when it is integral."""
    what = "a whole number > 0 (e.g. 85899345920 or 8.0e+10)" if positive else "a whole number >= 0"
    try:
        number = _number(value, positive)
    except ValueError:
        raise ValueError(what) from None
    if number != int(number):
        raise ValueError(what)
    return int(number)


def _bytes(value):
    return _whole(value, positive=True)


def _flag(value):
    if not isinstance(value, bool):
        raise ValueError("true or false")
    return value


_RECORD = object()  # any value, kept as written: aliases (checked with the merged spec), the calibration record
_LINK = {"name": _name, "bandwidth": _positive, "latency": _number, "kind": _choice(*_BUS_EFFICIENCY), "p2p": _flag,
         "mesh": _whole, "bus_bandwidth": _number, "tables": _flag}
_FIELDS = {
    "name": _name, "aliases": _RECORD, "kind": _choice(*_DEVICE_KINDS), "arch": _name, "sm_count": _whole,
    "memory_bytes": _bytes, "memory_bandwidth": _positive, "flops": {dtype: _positive for dtype in _DTYPES},
    "power": {f.name: _number for f in fields(DevicePower)}, "interconnect": _LINK, "host_link": _LINK,
    "host": {f.name: _number for f in fields(HostSpec)}, "attention": {"decode_skew": _number},
    "base": _name, "calibration": _RECORD,
}


class _DeviceFile:
    """One device YAML read against the fields a device has: an unknown key (with the nearest known one),
    a key given twice (YAML would keep the last without a word) or a bad value is named with its line."""

    def __init__(self, path) -> None:
        self.path = path
        self._scalars = yaml.SafeLoader("")

    def read(self) -> dict:
        try:
            root = yaml.compose(self.path.read_text(), Loader=_COMPOSER)
        except (OSError, UnicodeDecodeError) as exc:
            raise UnknownHardwareError(f"{self.path}: cannot read the device file: {exc}") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise UnknownHardwareError(f"{self.path}{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})"
                                       ) from None
        if not isinstance(root, yaml.MappingNode):
            raise UnknownHardwareError(f"{self.path}: a device spec is a mapping of fields, starting with its `name`")
        return self._section(root, _FIELDS, "")

    def _error(self, node: yaml.Node, field: str, message: str) -> UnknownHardwareError:
        return UnknownHardwareError(f"{self.path}:{node.start_mark.line + 1}: {field}: {message}")

    def _pairs(self, node: yaml.MappingNode, field: str):
        """The mapping's keys (as names) and value nodes, each key once."""
        lines: dict[str, int] = {}
        for key, value in node.value:
            name = str(self._scalars.construct_object(key)) if isinstance(key, yaml.ScalarNode) else None
            if name is None or key.tag == "tag:yaml.org,2002:merge":
                raise self._error(key, field or "(top level)", "keys must be plain field names")
            line = key.start_mark.line + 1
            if name in lines:
                raise UnknownHardwareError(f"{self.path}:{line}: {name!r} is given twice in one mapping (first on "
                                           f"line {lines[name]}); say it once")
            lines[name] = line
            yield name, key, value

    def _section(self, node: yaml.Node, schema: dict, field: str) -> dict:
        if not isinstance(node, yaml.MappingNode):
            raise self._error(node, field, f"expected a mapping of {', '.join(schema)}")
        out = {}
        for name, key, value in self._pairs(node, field):
            inner = f"{field}.{name}" if field else name
            if name not in schema:
                import difflib  # only an error's hint needs it
                close = difflib.get_close_matches(name, list(schema), n=1, cutoff=0.6)
                raise self._error(key, inner, f"unknown field; did you mean {close[0]!r}?" if close else
                                  f"unknown field; expected one of {', '.join(schema)}")
            out[name] = self._value(value, schema[name], inner)
        return out

    def _value(self, node: yaml.Node, reader, field: str):
        if isinstance(reader, dict):
            return self._section(node, reader, field)
        if reader is _RECORD:
            return self._plain(node, field)
        # a mapping or list stands as an empty one: no reader takes it, and each says what it expected
        value = (self._scalars.construct_object(node) if isinstance(node, yaml.ScalarNode)
                 else {} if isinstance(node, yaml.MappingNode) else [])
        try:
            return reader(value)
        except ValueError as exc:
            got = {dict: "a mapping", list: "a list"}.get(type(value)) or ("nothing" if value is None else repr(value))
            raise self._error(node, field, f"expected {exc}, got {got}") from None

    def _plain(self, node: yaml.Node, field: str):
        if isinstance(node, yaml.MappingNode):
            return {name: self._plain(value, f"{field}.{name}") for name, _, value in self._pairs(node, field)}
        if isinstance(node, yaml.SequenceNode):
            return [self._plain(value, f"{field}[{i}]") for i, value in enumerate(node.value)]
        return self._scalars.construct_object(node)


def _overlay(base: dict, overlay: dict) -> dict:
    """`base` refined by an overlay: its sections merged field by field, its scalars replacing. An overlay
    that renames the device does not inherit the base's aliases: they name the base device, which stays."""
    merged = dict(base)
    if overlay.get("name", base["name"]) != base["name"]:
        merged.pop("aliases", None)
    for key, value in overlay.items():
        if key == "base":
            continue
        merged[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def _find(specs: dict[str, dict], name: str) -> dict | None:
    wanted = _normalise(name)
    for d in specs.values():
        if wanted in map(_normalise, [d["name"], *d.get("aliases", [])]):
            return d
    return None


def _read_spec(entry, specs: dict[str, dict]) -> dict:
    """One device YAML; an overlay (`base: NAME`, e.g. what `vllm-emulator calibrate` writes) is
    resolved against the devices read so far."""
    d = _DeviceFile(entry).read()
    if "base" in d:
        base = _find(specs, d["base"])
        if base is None:
            raise UnknownHardwareError(f"{entry}: overlay of unknown device {d['base']!r}")
        d = _overlay(base, d)
    for section, required in _REQUIRED.items():
        for key in required:
            if key not in (d.get(section, {key: None}) if section else d):
                field = f"{section}.{key}" if section else key
                raise UnknownHardwareError(f"{entry}: {field}: missing; a device spec needs name, memory_bytes, "
                                           "memory_bandwidth and flops, a link its bandwidth (see `vllm-emulator "
                                           "hardware show H100`)")
    if not d["flops"]:
        raise UnknownHardwareError(f"{entry}: flops: expected the dense FLOP/s of at least one dtype "
                                   f"({', '.join(_DTYPES)})")
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


@cache  # each catalogue lookup normalises every device's names again: once per distinct name is enough
def _normalise(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def load_device(name_or_path: str) -> DeviceSpec:
    """Resolve a device by name or alias (case and punctuation ignored) or from a YAML file."""
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UnknownHardwareError(f"no such file: {name_or_path!r} (a device YAML file; "
                                       "`vllm-emulator hardware show H100` prints one to copy)")
        return device_from_dict(_read_spec(path, _shipped_specs()), source=str(path))
    specs = _shipped_specs()
    d = _find(specs, name_or_path)
    if d is not None:
        return device_from_dict(d, source=d["name"])
    names = sorted(specs)
    import difflib  # only an error's hint needs it
    hint = difflib.get_close_matches(name_or_path, names, n=1, cutoff=0.4)
    hint_text = f" Did you mean {hint[0]!r}?" if hint else ""
    raise UnknownHardwareError(
        f"unknown hardware {name_or_path!r}.{hint_text} Known: {', '.join(names)}; "
        "or pass a YAML file describing the device (see `vllm-emulator hardware show H100`)."
    )
