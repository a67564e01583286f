"""Cluster files: what `--cluster FILE` reads, into an emulator.cluster.ClusterSpec.

Two formats, told apart by their keys:

- the emulator's YAML (documented with examples in deploy/clusters/README.md): `instances`
  (model, hardware, parallelism, engine flags, role, port, count, node), `nodes` (host memory),
  `links`, `routing`, `faults`, `engine` (flags every instance starts from);
- LLMServingSim's cluster config JSON, 2.0's (`npu_num`/`npu_group`) or 2.x's (`num_npus`/`tp_size`/
  `pp_size`/`ep_size`/`dp_group`, `npu_mem.mem_util`), read as LLMServingSim reads it by
  profiles.llmservingsim_cluster with this module's value readers. A key it does not read is
  ignored, as LLMServingSim ignores it, with a start-up note naming it.

Every error names the file, the line and the field. A key given twice, or one setting given under two
spellings (`tp` and `tensor-parallel-size`), is an error, not the last one winning. Instances with the
same model, device and flags share one Deployment (replicas price their steps alike), so a large
cluster starts fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from emulator.cluster import ClusterSpec, FaultSpec
from emulator.config import EngineArgs
from emulator.deployment import Deployment
from emulator.engine_flags import add_engine_args
from emulator.hardware import DeviceSpec, GiB, load_device
from emulator.instance import ROLES, InstanceSpec
from emulator.lora import LORA_MODULES, LORA_NOT_ENABLED, LoRAModulePath, ServedAdapters, parse_lora_modules
from emulator.node_power import device_power_changes, node_power_from_dict
from emulator.power import devices_idle_w, nodes_power
from emulator.routing import POLICIES
from profiles import lora_adapter_files
from profiles.deployment import build_deployment

_ENGINE_FIELDS = {f.name: f for f in dataclasses.fields(EngineArgs)}
# `vllm serve` flags of the front end an instance takes beside its engine flags: the adapters it serves
_SERVE_FLAGS = {LORA_MODULES}
_ALIASES = {"tp": "tensor_parallel_size", "pp": "pipeline_parallel_size", "dp": "data_parallel_size",
            "ep": "enable_expert_parallel"}
_INSTANCE_KEYS = {"name", "model", "served_model_name", "hardware", "role", "count", "port", "node", "capacity",
                  "engine", "dp_routing", "power"}
MAX_PORT = 65535
_COMPOSER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser where PyYAML has it: large files


def _flag_choices() -> dict[str, list]:
    """The values `vllm serve` accepts for the engine flags that take a fixed set (kv_cache_dtype, ...)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_engine_args(parser)
    return {a.dest: list(a.choices) for a in parser._actions if a.choices and a.dest in _ENGINE_FIELDS}


_CHOICES = _flag_choices()
# vLLM's kv_role as the instance's role in the cluster's own P/D proxy
_ROLE_OF_KV_ROLE = {"kv_producer": "prefill", "kv_consumer": "decode", "kv_both": "mixed"}
_UNITS = {"": 1.0, "b": 1.0, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 1024.0, "mib": 1024.0 ** 2, "gib": 1024.0 ** 3, "tib": 1024.0 ** 4}
_TIMES = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9, "min": 60.0, "h": 3600.0}


class ClusterFileError(ValueError):
    """A cluster file that cannot be read as written."""


@dataclass
class _Node:
    """A YAML value with the line it starts on (and, for a mapping, the line of each key)."""
    value: Any
    line: int
    key_lines: dict[str, int] | None = None


class _Reader:
    """Reads one cluster file, remembering where each value came from for error messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ClusterFileError(f"{path}: cannot read the cluster file: {exc}") from None
        try:
            root = yaml.compose(text, Loader=_COMPOSER)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise ClusterFileError(f"{path}{where}: not valid YAML or JSON: "
                                   f"{getattr(exc, 'problem', None) or exc}") from None
        if root is None:
            raise ClusterFileError(f"{path}: the cluster file is empty")
        self._loader = yaml.SafeLoader("")
        self.root = self._convert(root, "")

    def _convert(self, node: yaml.Node, field: str) -> _Node:
        """`field`: where the node sits ("instances[0].engine"), for the errors of a key given twice."""
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            out, key_lines = {}, {}
            for key, value in node.value:
                if not isinstance(key, yaml.ScalarNode):
                    raise ClusterFileError(f"{self.path}:{key.start_mark.line + 1}: keys must be plain names")
                name, key_line = str(key.value), key.start_mark.line + 1
                inner = f"{field}.{name}" if field else name
                if name in out:  # YAML's loaders keep the last silently; a file that says two things is wrong
                    raise ClusterFileError(f"{self.path}:{key_line}: {inner}: given twice (first on line "
                                           f"{key_lines[name]}); keep one")
                out[name] = self._convert(value, inner)
                key_lines[name] = key_line
            return _Node(out, line, key_lines)
        if isinstance(node, yaml.SequenceNode):
            return _Node([self._convert(v, f"{field}[{i}]") for i, v in enumerate(node.value)], line)
        return _Node(self._loader.construct_object(node, deep=True), line)

    def error(self, node: _Node | None, field: str, message: str) -> ClusterFileError:
        line = f":{node.line}" if node is not None else ""
        return ClusterFileError(f"{self.path}{line}: {field}: {message}")


def _plain(node: _Node) -> Any:
    """The value with its line marks stripped."""
    v = node.value
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


def _scalar(node: _Node) -> Any:
    value = node.value
    if isinstance(value, str):
        try:
            loaded = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        return loaded if not isinstance(loaded, (dict, list)) else value
    return value


class _Parser:
    def __init__(self, reader: _Reader, compile_cache: str, base: dict[str, Any],
                 front_door_port: int | None = None, check_adapter_files: bool = False) -> None:
        self.r = reader
        self.compile_cache = compile_cache
        self.base = base
        self.front_door_port = front_door_port
        self.notes: list[str] = []
        self._deployments: dict[tuple, Deployment] = {}
        self.check_adapter_files = check_adapter_files
        self._module_at: dict[int, tuple[_Node, str]] = {}  # id of a LoRAModulePath -> its entry and field

    # -- values ---------------------------------------------------------------------------
    def mapping(self, node: _Node, field: str) -> dict[str, _Node]:
        if not isinstance(node.value, dict):
            raise self.r.error(node, field, f"expected a mapping of keys to values, got {_kind(node.value)}")
        return node.value

    def sequence(self, node: _Node, field: str) -> list[_Node]:
        if not isinstance(node.value, list):
            raise self.r.error(node, field, f"expected a list, got {_kind(node.value)}")
        return node.value

    def string(self, node: _Node, field: str) -> str:
        value = node.value
        if not isinstance(value, (str, int, float)) or isinstance(value, bool) or value == "":
            raise self.r.error(node, field, f"expected a name, got {_kind(value)}")
        return str(value)

    def integer(self, node: _Node, field: str, minimum: int = 0) -> int:
        value = _scalar(node)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.r.error(node, field, f"expected an integer >= {minimum}, got {value!r}")
        return value

    def number(self, node: _Node, field: str, units: dict[str, float], what: str, bare: float = 1.0) -> float:
        """A non-negative number, bare (in units of `bare`: 1 = bytes, seconds) or with a unit suffix
        (512GiB, 25GB/s, 5us)."""
        value = _scalar(node)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number, scale = float(value), bare
        elif isinstance(value, str):
            m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([a-zA-Zµ]*)(?:/s|ps)?\s*", value)
            unit = m.group(2).lower() if m else None
            if m is None or unit not in units:
                raise self.r.error(node, field, f"expected {what}, got {value!r}")
            try:
                number = float(m.group(1))
            except ValueError:
                raise self.r.error(node, field, f"expected {what}, got {value!r}") from None
            scale = units[unit]
        else:
            raise self.r.error(node, field, f"expected {what}, got {_kind(value)}")
        if not number >= 0 or number == float("inf"):
            raise self.r.error(node, field, f"expected {what}, got {value!r}")
        return number * scale

    def boolean(self, node: _Node, field: str) -> bool:
        value = _scalar(node)
        if not isinstance(value, bool):
            raise self.r.error(node, field, f"expected true or false, got {value!r}")
        return value

    def check_keys(self, mapping: dict[str, _Node], allowed: set[str], owner: _Node, field: str,
                   expected: str | None = None) -> None:
        """Every key is one of `allowed`; an unknown one is named with the closest allowed key, else with
        `expected` (default: the allowed keys)."""
        for key, node in mapping.items():
            if key not in allowed:
                line = (owner.key_lines or {}).get(key, node.line)
                raise self.r.error(_Node(key, line), f"{field}.{key}", _unknown(key, allowed, expected))

    # -- engine flags -------------------------------------------------------------------------
    def engine_args(self, node: _Node | None, field: str, base: dict[str, Any],
                    seen: dict[str, tuple[str, int]] | None = None) -> dict[str, Any]:
        """vLLM engine flags by name (dashes or underscores, as `vllm serve` spells them). `seen`: the
        flags already set at this level (name -> (spelling, line)), where one flag may not be set twice,
        whatever the spelling (`tp` and `tensor-parallel-size`)."""
        args = dict(base)
        if node is None:
            return args
        seen = {} if seen is None else seen
        for key, value_node in self.mapping(node, field).items():
            name = _ALIASES.get(key, key.replace("-", "_").lstrip("_"))
            f = _ENGINE_FIELDS.get(name)
            if f is None and name not in _SERVE_FLAGS:
                raise self.r.error(value_node, f"{field}.{key}", "not a vLLM engine flag the emulator simulates"
                                   + _did_you_mean(key, _ENGINE_SPELLINGS, "; "))
            line = (node.key_lines or {}).get(key, value_node.line)
            if name in seen:
                other, other_line = seen[name]
                raise self.r.error(_Node(key, line), f"{field}.{key}",
                                   f"{key!r} and {other!r} (line {other_line}) both set {name}; keep one")
            seen[name] = (key, line)
            if name == LORA_MODULES:
                args[name] = self.lora_modules(value_node, f"{field}.{key}")
                continue
            args[name] = self.engine_value(value_node, f"{field}.{key}", name, f.type)
            if name in _CHOICES and args[name] not in _CHOICES[name]:
                raise self.r.error(value_node, f"{field}.{key}", f"expected one of "
                                   f"{', '.join(map(str, _CHOICES[name]))}, got {_plain(value_node)!r}")
        return args

    def engine_value(self, node: _Node, field: str, name: str, type_name: str) -> Any:
        if name == "kv_transfer_config" and isinstance(node.value, dict):  # written as YAML, not a JSON string
            return json.dumps(_plain(node))
        value = _scalar(node)
        if name == "max_model_len" and isinstance(value, str) and value.strip().lower() == "auto":
            return -1
        if "bool" in type_name:
            return self.boolean(node, field)
        if "int" in type_name:
            if isinstance(value, str):
                value = self.number(node, field, {"": 1, "k": 1000, "m": 1000 ** 2}, "an integer")
                if value != int(value):
                    raise self.r.error(node, field, "expected an integer")
                return int(value)
            if value is None and "None" in type_name:
                return None
            return self.integer(node, field, 0)
        if "float" in type_name:
            return self.number(node, field, {"": 1.0}, "a number")
        return self.string(node, field)

    def lora_modules(self, node: _Node, field: str) -> tuple[LoRAModulePath, ...]:
        """`--lora-modules` as a list (or one entry): `name=path` strings, or mappings of name, path and
        optionally base_model_name, as vLLM reads the flag's JSON form. Each entry's line is kept for the
        errors of loading it (check_lora)."""
        entries = []
        items = node.value if isinstance(node.value, list) else [node]
        for item in items:
            value = _plain(item)
            if isinstance(value, dict):
                entries.append(json.dumps(value))
            elif isinstance(value, str) and value:
                entries.append(value)
            else:
                raise self.r.error(item, field, f"expected name=path, or a mapping of name, path (and "
                                                f"base_model_name); got {_kind(value)}")
        try:
            modules = tuple(parse_lora_modules(entries))
        except ValueError as exc:
            raise self.r.error(node, field, str(exc)) from None
        for i, (item, module) in enumerate(zip(items, modules)):
            self._module_at[id(module)] = (item, f"{field}[{i}]" if isinstance(node.value, list) else field)
        return modules

    def check_lora(self, modules: tuple[LoRAModulePath, ...], deployment: Deployment, node: _Node,
                   field: str) -> None:
        """An instance's adapters, as its `vllm serve` loads them at start-up (vLLM's messages)."""
        if deployment.config.lora is None:
            raise self.r.error(node, field, f"Call to add_lora method failed: {LORA_NOT_ENABLED}")
        names = [m.name for m in modules]
        for name in names:
            if names.count(name) > 1:
                raise self.r.error(node, field, f"The lora adapter '{name}' has already been loaded. If you want "
                                                "to load the adapter in place, set 'load_inplace' to True.")
        if not self.check_adapter_files:
            return
        for module in modules:  # as the instance's `vllm serve` loads each (serving; a replay reads no adapter)
            try:
                lora_adapter_files.check_adapter_files(module.name, module.path, deployment.config.lora.max_lora_rank)
            except lora_adapter_files.AdapterLoadError as exc:
                raise self.r.error(*self._module_at.get(id(module), (node, field)), exc.message) from None

    # -- deployments --------------------------------------------------------------------------
    def device(self, node: _Node, field: str) -> DeviceSpec:
        name = self.string(node, field)
        path = Path(name)
        if not path.is_absolute() and (self.r.path.parent / path).suffix in (".yaml", ".yml") \
                and (self.r.path.parent / path).is_file():
            name = str(self.r.path.parent / path)  # a device YAML beside the cluster file
        try:
            return load_device(name)
        except ValueError as exc:
            raise self.r.error(node, field, str(exc)) from None

    def deployment(self, model: str, device: DeviceSpec, args: dict[str, Any], node: _Node, field: str) -> Deployment:
        key = (model, repr(device), tuple(sorted(args.items())))
        if key not in self._deployments:
            try:
                self._deployments[key] = build_deployment(model, device, EngineArgs(**args), self.compile_cache)
            except ValueError as exc:
                raise self.r.error(node, field, str(exc)) from None
        return self._deployments[key]

    # -- the emulator's format ----------------------------------------------------------------
    def parse(self) -> tuple[ClusterSpec, list[str]]:
        root = self.mapping(self.r.root, "cluster")
        # LLMServingSim's config lists its nodes; the emulator's names them in a mapping
        if "num_nodes" in root or ("nodes" in root and isinstance(root["nodes"].value, list)):
            from profiles.llmservingsim_cluster import LLMServingSimReader
            return LLMServingSimReader(self).read(root), self.notes
        self.check_keys(root, {"instances", "nodes", "links", "routing", "faults", "engine"}, self.r.root, "cluster")
        if "instances" not in root:
            raise self.r.error(self.r.root, "instances", "a cluster file needs a list of instances")
        if not self.sequence(root["instances"], "instances"):
            raise self.r.error(root["instances"], "instances", "lists no instance; a cluster needs at least one")
        base = self.engine_args(root.get("engine"), "engine", self.base)
        nodes = {}
        for name, node in self.mapping(root["nodes"], "nodes").items() if "nodes" in root else ():
            nodes[name] = self.node_settings(node, f"nodes.{name}")
        instances = []
        used_ports: dict[int, str] = {}
        engine_ids: dict[str, str] = {}  # kv-transfer-config engine_id -> the instance it names
        for i, node in enumerate(self.sequence(root["instances"], "instances")):
            for spec in self.instance(node, f"instances[{i}]", base, nodes):
                if spec.port is not None:
                    field = f"instances[{i}].port"
                    where = self.mapping(node, f"instances[{i}]")["port"]
                    if spec.port > MAX_PORT:
                        raise self.r.error(where, field, f"replica {spec.name} would answer on port {spec.port}; "
                                                         f"ports go up to {MAX_PORT}")
                    if spec.port == self.front_door_port:
                        raise self.r.error(where, field, f"port {spec.port} (replica {spec.name}) is the front "
                                                         f"door's (--port)")
                    if spec.port in used_ports:
                        raise self.r.error(where, field, f"port {spec.port} is already {used_ports[spec.port]}'s")
                    used_ports[spec.port] = spec.name
                engine_id = spec.deployment.config.kv_transfer.get("engine_id")
                if engine_id is not None:  # vLLM's NIXL tells engines apart by it: each pod needs its own
                    if engine_id in engine_ids:
                        raise self.r.error(node, f"instances[{i}].kv-transfer-config",
                                           f"engine_id {engine_id!r} is already {engine_ids[engine_id]}'s; every "
                                           f"instance (and replica) needs its own")
                    engine_ids[engine_id] = spec.name
                instances.append(spec)
        names = [s.name for s in instances]
        for name in names:
            if names.count(name) > 1:
                raise self.r.error(root["instances"], "instances", f"instance name {name!r} is used twice")
        self.check_host_memory(root, nodes, instances)
        self.check_adapters(root, instances)
        self.check_node_power(root, nodes, instances)
        routing, params = self.routing(root.get("routing"))
        faults = tuple(self.fault(n, f"faults[{i}]", names)
                       for i, n in enumerate(self.sequence(root["faults"], "faults"))) if "faults" in root else ()
        links = tuple(self.link(n, f"links[{i}]", nodes)
                      for i, n in enumerate(self.sequence(root["links"], "links"))) if "links" in root else ()
        return ClusterSpec(tuple(instances), routing, params, faults, nodes, links), self.notes

    def check_adapters(self, root: dict, instances: list[InstanceSpec]) -> None:
        """The cluster's adapters as its front door serves them (emulator.lora.ServedAdapters): one adapter
        per name, none named as a served model, and one on a model the P/D proxy serves served by a prefill and
        a decode instance (vLLM's P/D proxies send the request's `model`, the adapter's name, to both pods)."""
        try:
            served = ServedAdapters.of(instances)
        except ValueError as exc:
            raise self.r.error(root["instances"], "instances", str(exc)) from None
        models = {name: [i for i in instances if name in i.served_model_names]
                  for i in instances for name in i.served_model_names}
        for name, adapter in served.adapters.items():
            if name in models:
                raise self.r.error(root["instances"], "instances",
                                   f"The lora adapter '{name}' conflicts with a served base model.")
            pool = models[adapter.base_model_name]
            if not {"prefill", "decode"} <= {i.role for i in pool}:
                continue
            serving = {i.role for i in pool if any(m.name == name for m in i.extra.get(LORA_MODULES, ()))}
            for role in ("prefill", "decode"):
                if role not in serving:
                    module = next(m for i in instances for m in i.extra.get(LORA_MODULES, ()) if m.name == name)
                    node, field = self._module_at.get(id(module), (root["instances"], "instances"))
                    raise self.r.error(node, field, f"LoRA adapter {name!r} runs on {adapter.base_model_name}, "
                                                    f"which the cluster's P/D proxy serves, but no {role} instance "
                                                    f"serves the adapter: a request naming it would have no {role} "
                                                    f"pod to go to")

    def check_node_power(self, root: dict, nodes: dict, instances: list[InstanceSpec]) -> None:
        """A node's measured idle power (power.idle_w) must cover what its parts and devices draw idle."""
        powers = nodes_power(nodes)
        for name, idle in devices_idle_w(instances, powers).items():
            if name in powers:
                try:
                    powers[name].static_dc_w(idle)
                except ValueError as exc:
                    where = self.mapping(self.mapping(root["nodes"], "nodes")[name], f"nodes.{name}")["power"]
                    field, _, message = str(exc).partition(": ")
                    raise self.r.error(self.mapping(where, f"nodes.{name}.power").get("idle_w", where),
                                       f"nodes.{name}.{field}", message + " (its devices included)") from None

    def check_host_memory(self, root: dict, nodes: dict, instances: list[InstanceSpec]) -> None:
        """What a node's instances offload must fit its host memory: a CPU tier per engine (vLLM's
        --kv-offloading-size), one per pool for the lmcache backend (shared by the node's instances)."""
        used: dict[str, float] = {}
        pools: set[tuple] = set()
        for spec in instances:
            config, offload = spec.deployment.config, spec.deployment.config.kv_connectors.offload
            if spec.node is None or offload is None:
                continue
            if offload.backend == "lmcache":
                key = (spec.node, spec.deployment.model.name, config.block_size)
                if key in pools:
                    continue
                pools.add(key)
                engines = 1
            else:
                engines = config.data_parallel_size
            used[spec.node] = used.get(spec.node, 0.0) + engines * offload.capacity_bytes
        for name, need in used.items():
            have = nodes[name].get("host_memory")
            if have is not None and need > have:
                field = f"nodes.{name}.host_memory"
                raise self.r.error(self.mapping(root["nodes"], "nodes")[name], field,
                                   f"its instances offload {need / GiB:g} GiB of KV (--kv-offloading-size), more "
                                   f"than its {have / GiB:g} GiB of host memory")

    def node_settings(self, node: _Node, field: str) -> dict:
        settings = self.mapping(node, field)
        self.check_keys(settings, {"host_memory", "host_memory_bandwidth", "cxl_memory", "cxl_bandwidth",
                                   "cxl_latency", "power"}, node, field)
        out: dict[str, Any] = {}
        for key, value in settings.items():
            if key in ("host_memory", "cxl_memory"):
                out[key] = self.number(value, f"{field}.{key}", _UNITS, "a size (bytes, or 512GiB)")
            elif key in ("host_memory_bandwidth", "cxl_bandwidth"):
                out[key] = self.number(value, f"{field}.{key}", _UNITS, "a bandwidth (bytes/s, or 64GB/s)")
            elif key == "cxl_latency":
                out[key] = self.number(value, f"{field}.{key}", _TIMES, "a time (seconds, or 250ns)")
            else:
                out[key] = self.power(value, f"{field}.power")
        return out

    def power(self, node: _Node, field: str, device: bool = False) -> dict:
        """A node's `power` section (or, `device`, an instance's device power fields), checked as
        emulator.node_power reads it."""
        value = _plain(node)
        try:
            device_power_changes(value) if device else node_power_from_dict(value)
        except ValueError as exc:  # "power.cpu.util: expected ...": the field, then what is wrong
            where, _, message = str(exc).partition(": ")
            raise self.r.error(node, field + where.removeprefix("power"), message) from None
        return value

    def instance(self, node: _Node, field: str, base: dict, nodes: dict) -> list[InstanceSpec]:
        # an instance's own fields take dashes or underscores, as its engine flags do
        spec: dict[str, _Node] = {}
        key_lines: dict[str, int] = {}
        for key, value in self.mapping(node, field).items():
            name = _INSTANCE_SPELLINGS.get(key, key)
            line = (node.key_lines or {}).get(key, value.line)
            if name in spec:
                other = next(k for k in node.value if _INSTANCE_SPELLINGS.get(k, k) == name)
                raise self.r.error(_Node(key, line), f"{field}.{key}",
                                   f"{key!r} and {other!r} (line {key_lines[name]}) both set {name}; keep one")
            spec[name], key_lines[name] = value, line
        self.check_keys(spec, _INSTANCE_KEYS | _ENGINE_SPELLINGS, _Node(spec, node.line, key_lines), field,
                        f"expected an instance field ({', '.join(sorted(_INSTANCE_KEYS))}) or a vLLM engine flag "
                        f"the emulator simulates (deploy/clusters/README.md)")
        if "model" not in spec:
            raise self.r.error(node, f"{field}.model", "every instance needs a model")
        if "hardware" not in spec:
            raise self.r.error(node, f"{field}.hardware", "every instance needs a hardware (device name or YAML)")
        model = self.string(spec["model"], f"{field}.model")
        device = self.device(spec["hardware"], f"{field}.hardware")
        flags = {k: v for k, v in spec.items() if k not in _INSTANCE_KEYS}
        seen: dict[str, tuple[str, int]] = {}  # a flag beside the instance's fields and under its `engine`: once
        args = self.engine_args(_Node(flags, node.line, key_lines), field, base, seen) if flags else dict(base)
        args = self.engine_args(spec.get("engine"), f"{field}.engine", args, seen)
        lora_modules = args.pop(LORA_MODULES, ())
        deployment = self.deployment(model, device, args, node, field)
        served = spec.get("served_model_name")
        if served is None:
            names = (model,)
        elif isinstance(served.value, list):
            names = tuple(self.string(n, f"{field}.served_model_name") for n in served.value)
        else:
            names = (self.string(served, f"{field}.served_model_name"),)
        role = self.role(spec, field, deployment)
        count = self.integer(spec["count"], f"{field}.count", 1) if "count" in spec else 1
        name = self.string(spec["name"], f"{field}.name") if "name" in spec else None
        port = self.integer(spec["port"], f"{field}.port", 1) if "port" in spec else None
        if port is not None and port > MAX_PORT:
            raise self.r.error(spec["port"], f"{field}.port", f"expected a port from 1 to {MAX_PORT}, got {port}")
        node_name = self.string(spec["node"], f"{field}.node") if "node" in spec else None
        if node_name is not None and node_name not in nodes:
            raise self.r.error(spec["node"], f"{field}.node", f"no node {node_name!r} in `nodes`")
        capacity = (self.number(spec["capacity"], f"{field}.capacity", {"": 1.0}, "tokens per second")
                    if "capacity" in spec else None)
        if capacity == 0:
            raise self.r.error(spec["capacity"], f"{field}.capacity", "must be positive")
        dp_routing = self.string(spec["dp_routing"], f"{field}.dp_routing") if "dp_routing" in spec else "least_loaded"
        if dp_routing not in ("least_loaded", "round_robin"):
            raise self.r.error(spec["dp_routing"], f"{field}.dp_routing", "expected least_loaded or round_robin")
        extra = {}
        if "power" in spec:
            extra["power"] = self.power(spec["power"], f"{field}.power", device=True)
        if lora_modules:
            self.check_lora(lora_modules, deployment, node, f"{field}.lora-modules")
            extra[LORA_MODULES] = lora_modules
        stem = name or f"{device.name.lower()}-{model.rsplit('/', 1)[-1].lower()}"
        out = []
        for replica in range(count):
            replica_name = stem if count == 1 and name else f"{stem}-{replica}"
            out.append(InstanceSpec(replica_name, deployment, names, role, node_name,
                                    None if port is None else port + replica, capacity, dp_routing, extra))
        return out

    def role(self, spec: dict, field: str, deployment) -> str:
        """The instance's P/D role: `role`, else what its kv-transfer-config's kv_role says (a kv_producer
        prefills, a kv_consumer decodes), else mixed; the two must agree when both are given."""
        kv_role = deployment.config.kv_transfer.get("kv_role")
        implied = _ROLE_OF_KV_ROLE.get(kv_role, "mixed")
        if "role" not in spec:
            return implied
        role = self.string(spec["role"], f"{field}.role")
        if role not in ROLES:
            raise self.r.error(spec["role"], f"{field}.role", f"expected one of {', '.join(ROLES)}, got {role!r}")
        if kv_role is not None and role != implied:
            raise self.r.error(spec["role"], f"{field}.role",
                               f"role {role} contradicts kv-transfer-config's kv_role {kv_role!r} ({implied})")
        connectors = deployment.config.kv_connectors
        if role != "mixed" and connectors.transfer and not connectors.pd:  # role alone stands for NixlConnector
            raise self.r.error(spec["role"], f"{field}.role", f"role {role} needs a P/D connector, and the instance "
                               f"runs {connectors.connector} alone (--kv-offloading-size replaces kv-transfer-config's "
                               "connector, as in vLLM): for P/D with offloading, make it a MultiConnector of both")
        return role

    def routing(self, node: _Node | None) -> tuple[str, dict]:
        if node is None:
            return "least_loaded", {}
        if not isinstance(node.value, dict):
            policy, params = self.string(node, "routing"), {}
        else:
            settings = self.mapping(node, "routing")
            if "policy" not in settings:
                raise self.r.error(node, "routing.policy", f"name a policy: {', '.join(POLICIES)}")
            policy = self.string(settings["policy"], "routing.policy")
            params = {k: self.number(v, f"routing.{k}", {"": 1.0}, "a number")
                      for k, v in settings.items() if k != "policy"}
        if policy not in POLICIES:
            raise self.r.error(node, "routing.policy",
                               f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
        known = [p for p in inspect.signature(POLICIES[policy]).parameters]
        for key in params:
            if key not in known:
                takes = (f"it takes {', '.join(known)}" + _did_you_mean(key, known, "; ") if known
                         else "it takes none")
                raise self.r.error(settings[key], f"routing.{key}",
                                   f"not a parameter of policy {policy!r}; {takes}")
        return policy, params

    def fault(self, node: _Node, field: str, names: list[str]) -> FaultSpec:
        spec = self.mapping(node, field)
        self.check_keys(spec, {"instance", "at", "restore_at", "reroute"}, node, field)
        for key in ("instance", "at"):
            if key not in spec:
                raise self.r.error(node, f"{field}.{key}", "every fault names an instance and a time `at`")
        instance = self.string(spec["instance"], f"{field}.instance")
        if instance not in names:
            raise self.r.error(spec["instance"], f"{field}.instance",
                               f"no instance {instance!r}; instances: {', '.join(names)}")
        at = self.number(spec["at"], f"{field}.at", _TIMES, "a virtual time (seconds, or 10min)")
        restore = (self.number(spec["restore_at"], f"{field}.restore_at", _TIMES, "a virtual time")
                   if "restore_at" in spec else None)
        reroute = self.boolean(spec["reroute"], f"{field}.reroute") if "reroute" in spec else False
        try:
            return FaultSpec(instance, at, restore, reroute)
        except ValueError as exc:
            raise self.r.error(node, field, str(exc)) from None

    def link(self, node: _Node, field: str, nodes: dict) -> dict:
        spec = self.mapping(node, field)
        self.check_keys(spec, {"between", "bandwidth", "latency"}, node, field)
        for key in ("between", "bandwidth"):
            if key not in spec:
                raise self.r.error(node, f"{field}.{key}", "a link needs `between` (two nodes) and a bandwidth")
        ends = [self.string(n, f"{field}.between") for n in self.sequence(spec["between"], f"{field}.between")]
        if len(ends) != 2:
            raise self.r.error(spec["between"], f"{field}.between", "a link joins exactly two nodes")
        for end in ends:
            if end not in nodes:
                raise self.r.error(spec["between"], f"{field}.between", f"no node {end!r} in `nodes`")
        return {"between": tuple(ends),
                "bandwidth": self.number(spec["bandwidth"], f"{field}.bandwidth", _UNITS, "a bandwidth (25GB/s)"),
                "latency": (self.number(spec["latency"], f"{field}.latency", _TIMES, "a time (5us)")
                            if "latency" in spec else 0.0)}


_ENGINE_SPELLINGS = ({*_ENGINE_FIELDS, *_SERVE_FLAGS} | {k.replace("_", "-") for k in (*_ENGINE_FIELDS, *_SERVE_FLAGS)}
                     | set(_ALIASES))
_INSTANCE_SPELLINGS = {k.replace("_", "-"): k for k in _INSTANCE_KEYS if "_" in k}


def _did_you_mean(key: str, allowed, prefix: str = "") -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.75)
    return f"{prefix}did you mean {close[0]!r}?" if close else ""


def _unknown(key: str, allowed: set[str], expected: str | None) -> str:
    hint = _did_you_mean(key, allowed)
    return f"unknown field; {hint}" if hint else \
        f"unknown field; {expected or 'expected one of ' + ', '.join(sorted(allowed))}"


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def read_cluster_file(path: str | Path, compile_cache: str = "cold", base_args: dict[str, Any] | None = None,
                      front_door_port: int | None = None,
                      check_adapter_files: bool = False) -> tuple[ClusterSpec, list[str]]:
    """The cluster a file describes, and notes worth a start-up line (what is accepted but not simulated).
    `base_args`: EngineArgs fields every instance starts from (the engine flags given on the command
    line); the file's own flags override them. `front_door_port`: the port a server's front door takes,
    which no instance may also claim. `check_adapter_files`: check each lora-modules entry's adapter as
    its `vllm serve` would load it (profiles/lora_adapter_files.py: an absolute path must exist, its
    adapter_config.json's rank fit max-lora-rank), as `serve` does; a replay reads no adapter."""
    return _Parser(_Reader(Path(path)), compile_cache, dict(base_args or {}), front_door_port,
                   check_adapter_files).parse()


def cluster_startup_lines(path: str | Path, spec: ClusterSpec, notes: list[str]) -> list[str]:
    """What a driver logs at start-up about a cluster: its instances and how each prices a step."""
    lines = [f"Cluster {path}: {len(spec.instances)} instances, routing {spec.routing}", *notes]
    for instance in spec.instances:
        d = instance.deployment
        adapters = [m.name for m in instance.extra.get(LORA_MODULES, ())]
        lines.append(f"  {instance.name}: {d.model.name} on {d.device.name} (tp{d.config.tensor_parallel_size}"
                     f" pp{d.config.pipeline_parallel_size} dp{d.config.data_parallel_size}), {instance.role}, "
                     f"{d.num_gpu_blocks * d.config.block_size:,} KV tokens"
                     f"{f', port {instance.port}' if instance.port else ''}"
                     f"{', LoRA adapters ' + ', '.join(adapters) if adapters else ''}"
                     f"; step cost: {d.cost_model.describe()}")
    return lines
