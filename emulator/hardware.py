"""Device and link specifications: the physical facts a cost model starts from.

Shipped as YAML files (one device each) inside the package; a user adds a device
with their own YAML of the same shape, either by path (`load_device("my_gpu.yaml")`)
or by dropping it in $VLLM_EMULATOR_HOME/hardware/ (default ~/.vllm-emulator/hardware/),
where it joins the catalogue by name (and replaces a shipped device of the same name).
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


@dataclass(frozen=True)
class LinkSpec:
    name: str
    bandwidth: float  # bytes/s, per direction
    latency: float  # seconds

    def transfer_time(self, num_bytes: float) -> float:
        return self.latency + num_bytes / self.bandwidth


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


def _link(d: dict, default_name: str) -> LinkSpec:
    return LinkSpec(name=str(d.get("name", default_name)), bandwidth=float(d["bandwidth"]),
                    latency=float(d.get("latency", 0.0)))


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


def _parse(text: str):
    """YAML through libyaml's C parser when installed (10x faster start-up)."""
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _shipped_specs() -> dict[str, dict]:
    """The catalogue: shipped specs, then the user's (a user file wins on a name clash)."""
    specs = {}
    user = user_hardware_dir()
    entries = list(_shipped().iterdir()) + (sorted(user.glob("*.yaml")) if user.is_dir() else [])
    for entry in entries:
        if entry.name.endswith(".yaml"):
            try:
                d = _parse(entry.read_text())
            except yaml.YAMLError as exc:
                raise UnknownHardwareError(f"{entry}: not valid YAML ({exc})") from None
            if not isinstance(d, dict) or "name" not in d:
                raise UnknownHardwareError(f"{entry}: a device spec needs at least a `name`")
            specs[str(d["name"])] = d
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
        try:
            return device_from_dict(_parse(path.read_text()), source=str(path))
        except yaml.YAMLError as exc:
            raise UnknownHardwareError(f"{path}: not valid YAML ({exc})") from None
    specs = _shipped_specs()
    wanted = _normalise(name_or_path)
    for d in specs.values():
        if wanted in {_normalise(n) for n in [d["name"], *d.get("aliases", [])]}:
            return device_from_dict(d, source=d["name"])
    names = sorted(specs)
    hint = difflib.get_close_matches(name_or_path, names, n=1, cutoff=0.4)
    hint_text = f" Did you mean {hint[0]!r}?" if hint else ""
    raise UnknownHardwareError(
        f"unknown hardware {name_or_path!r}.{hint_text} Known: {', '.join(names)}; "
        "or pass a YAML file describing the device (see `vllm-emulator hardware show H100`)."
    )
