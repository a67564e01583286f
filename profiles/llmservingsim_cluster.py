"""LLMServingSim's cluster config JSON, read into an emulator.cluster.ClusterSpec (profiles.cluster_file
tells the two formats apart and lends its value readers, so errors name the file, the line and the field).

Two generations of the format are read, as LLMServingSim reads them:

- 2.0 (its `cluster_config/` examples): an instance's NPUs as `npu_num`/`npu_group`; requests routed
  round-robin (its `--request-routing-policy` default, RR); the KV cache is `npu_mem` less the weights.
- 2.x (its later `configs/cluster/`): `num_npus`/`tp_size`/`pp_size`/`ep_size`/`dp_group` and
  `npu_mem.mem_util`; requests routed to the least loaded instance (its default LOAD: vLLM's weighted
  waiting x 4 + running over max_num_seqs, ties rotating); the KV cache is `mem_size` x `mem_util` less
  the weights.

Its RR and LOAD are its own router's (emulator.routing's llmservingsim_rr and llmservingsim_load: a turn
for the requests it sends in and another for the prefills it hands to decode instances).

A file that mixes the two generations' parallelism keys is refused (each reads only its own). What maps
onto the emulator and how (deploy/clusters/README.md has the table):

- instances of one `dp_group` (named across the whole cluster) are one vLLM deployment with
  `data_parallel_size` members; they must agree on everything (LLMServingSim's own error for tp, pp and
  ep sizes) and sit on one node (data parallelism across nodes is not simulated); its router still
  counts each member as an instance of its own, in the file's order, and picks the member (the rank);
- `npu_mem.mem_util`, a calibration knob there, sizes the KV cache as LLMServingSim does
  (vLLM's `kv_cache_memory_bytes` = mem_size x mem_util - weights per rank); without it, vLLM's memory
  profiling sizes it, and a start-up note says so with LLMServingSim's figures beside;
- its per-instance overrides become the instance's vLLM engine flags (0 = "no limit": max_num_seqs the
  most vLLM accepts, max_num_batched_tokens the model's max_position_embeddings, as LLMServingSim caps it);
  an instance that sets no max_num_seqs (nor the command line) gets LLMServingSim 2.x's default, 128; a 2.0
  one vLLM's, with a note (2.0 has no limit there: _DEFAULTS says why); so do its other scheduler defaults
  where vLLM's differ (max_num_batched_tokens 2048; 2.x's memory utilisation 0.9; 2.0's prefix caching off);
  a max_num_seqs above the token budget, which vLLM refuses, is the budget, as many as its scheduler runs at
  once (seqs_within_budget), with a note; its LOAD router still divides by the file's figure;
- a node's `power` must be complete, as LLMServingSim requires, with an `npu` entry per instance hardware;
- `routing` (a key LLMServingSim does not read, so the file still runs there): RR, LOAD or any of the
  emulator's policies; LLMServingSim's RAND and CUSTOM are not simulated;
- `link_bw` is read as ASTRA-Sim reads it, in GiB/s (its bw_GBps_to_Bpns takes a GB as 2^30 bytes),
  as its hardware files label it;
- requests enter as its router sends them (its `prefill_schedulers`, every instance whose pd_type is not
  decode): the policy picks any non-decode instance of the request's model, of any model when it names
  none, and one that lands on a prefill instance goes on to a decode instance (the cluster's `entry`
  any_non_decode); so a prefill instance needs a decode one, and P/D instances serve one model;
- what a file leaves out of `npu_mem` (mem_size, mem_bw, mem_latency) and `link_bw`/`link_latency` is
  inherited as LLMServingSim 2.x inherits it, from its hardware files (profiles/data/llmservingsim_hardware.yaml:
  RTX4090, RTXPRO6000); where it has none it refuses the file, and here a note says what is simulated.

Start-up notes name what is read differently or not at all (keys LLMServingSim does not read, memory
figures within 10 % of the card's own, the NPU link within a node, expert-parallel sizes vLLM cannot
make, memory latencies).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from emulator.cluster import ClusterSpec
from emulator.config import EngineArgs, resolve
from emulator.hardware import DeviceSpec, GiB
from emulator.instance import InstanceSpec
from emulator.memory import block_bytes
from emulator.models import ModelSpec, load_model
from emulator.routing import POLICIES

if TYPE_CHECKING:
    from profiles.cluster_file import _Node, _Parser

_TOP = {"num_nodes", "link_bw", "link_latency", "nodes", "cxl_mem", "routing"}
_NODE = {"num_instances", "cpu_mem", "instances", "power"}
_MEMORY = {"host": {"mem_size", "mem_bw", "mem_latency", "pim_config"},
           "cxl": {"mem_size", "mem_bw", "mem_latency", "num_devices"},
           "npu": {"mem_size", "mem_bw", "mem_latency", "mem_util"}}
# its per-instance overrides of its command-line flags, as the vLLM engine flag each one is
_ENGINE_FLAGS = {"max_num_seqs": "max_num_seqs", "max_num_batched_tokens": "max_num_batched_tokens",
                 "long_prefill_token_threshold": "long_prefill_token_threshold", "block_size": "block_size",
                 "enable_chunked_prefill": "enable_chunked_prefill", "enable_prefix_caching": "enable_prefix_caching",
                 "kv_cache_dtype": "kv_cache_dtype", "reserve_full_isl": "scheduler_reserve_full_isl"}
_NOT_SIMULATED = {"placement", "pim_config", "dtype", "prioritize_prefill", "enable_local_offloading",
                  "enable_attn_offloading", "enable_sub_batch_interleaving", "enable_block_copy"}
_V20 = ("npu_num", "npu_group")
_V2X = ("num_npus", "tp_size", "pp_size", "ep_size", "dp_group")
_PARALLELISM = {*_V20, *_V2X}
_INSTANCE = {"model_name", "hardware", "npu_mem", "pd_type", "power", *_V20, *_V2X} | set(_ENGINE_FLAGS) \
    | _NOT_SIMULATED
# the fields its config builder requires of a node's power section (and of each npu entry)
_POWER = {"base_node_power": (), "npu": (), "cpu": ("idle_power", "active_power", "util"),
          "dram": ("dimm_size", "idle_power", "energy_per_bit"), "link": ("num_links", "idle_power", "energy_per_bit"),
          "nic": ("num_nics", "idle_power"), "storage": ("num_devices", "idle_power")}
_NPU_POWER = ("idle_power", "standby_power", "active_power", "standby_duration")
_EMULATOR_POWER = {"idle_w", "base_w", "psu_efficiency", "links", "nics", "devices"}  # the emulator's spelling
# its --request-routing-policy names, as the emulator's policies; RAND and CUSTOM have none
_ROUTING = {"RR": "llmservingsim_rr", "LOAD": "llmservingsim_load"}
_DEFAULT_ROUTING = {"2.0": "llmservingsim_rr", "2.x": "llmservingsim_load"}
# ASTRA-Sim, which takes LLMServingSim's link_bw, counts a GB as 2^30 bytes (its bw_GBps_to_Bpns)
_LINK_BW_UNIT = GiB
_UTIL_2X = 0.9  # its --npu-memory-utilization default
# Its scheduler defaults for an instance that sets a flag neither in the file nor on the command line here, where
# they differ from the emulator's (vLLM's): 2.x's are its parser's (casys-kaist/LLMServingSim @4a23e9f,
# llmservingsim/serving/__main__.py `main`), which _build_instance_runtime_configs applies per instance; 2.0's are
# its parser's (@9e3f0ec, main.py `main`), one for every instance.
# - max_num_seqs: 2.x's --max-num-seqs 128. 2.0's --max-batch defaults to 0, no limit (max_batch 0 ->
#   float('inf')): vLLM's most (its token budget) would make its memory profiling reserve room for that many
#   sequences, which can leave a config that runs there no KV cache here, so a 2.0 instance keeps vLLM's default
#   and a note says so (max_num_seqs 0 asks for it).
# - max_num_batched_tokens: --max-num-batched-tokens 2048 in both (vLLM's serve picks 8192 on an 80 GB card).
# - gpu_memory_utilization: 2.x's --npu-memory-utilization 0.9 ("corresponds to vLLM's
#   --gpu-memory-utilization"; vLLM's default is 0.92), the fraction vLLM's memory profiling sizes the KV cache
#   within when npu_mem.mem_util does not size it. 2.0 has none: its KV cache is npu_mem - weights, which a note
#   sets beside vLLM's profile (note_kv).
# - enable_prefix_caching: off in 2.0 (--enable-prefix-caching, store_true); on in 2.x (as in vLLM).
# The same in both and in vLLM: block_size 16 (--block-size), long_prefill_token_threshold 0 (2.x), reserve_full_isl
# and kv_cache_dtype auto (2.x), chunked prefill on (2.x's --enable-chunked-prefill; 2.0 does not chunk prompts: a
# start-up note says so).
_DEFAULTS = {"2.x": {"max_num_seqs": 128, "max_num_batched_tokens": 2048, "gpu_memory_utilization": _UTIL_2X},
             "2.0": {"max_num_batched_tokens": 2048, "enable_prefix_caching": False}}
_NPU_MEM_FACTS = ("mem_size", "mem_bw", "mem_latency")  # what its hardware files fill per instance
_LINK_FACTS = ("link_bw", "link_latency")  # and per cluster
_UNITS = {"mem_size": "GiB", "mem_bw": "GB/s", "mem_latency": "ns", "link_bw": "GiB/s", "link_latency": "ns"}
_SAME = 1e-3  # a config figure this close to the card's is the card's


@dataclass
class _Member:
    """One instance of the file, resolved as LLMServingSim resolves it."""
    node: _Node
    spec: dict[str, _Node]
    field: str
    node_index: int
    model: ModelSpec
    device: DeviceSpec
    tp: int
    pp: int
    ep: int
    group: str | None


class LLMServingSimReader:
    """Reads one LLMServingSim cluster config with a cluster_file parser's value readers."""

    def __init__(self, parser: _Parser) -> None:
        self.p = parser
        self.r = parser.r
        self.notes = parser.notes
        self.unlimited: list[str] = []  # the instances whose max_num_seqs is 0: LOAD scores their raw load
        self.seq_limits: dict[str, int] = {}  # a max_num_seqs above the token budget, which LOAD divides by
        self.generation = "2.x"  # the format's generation (`version`), once the instances are read
        self.members: tuple[str, ...] = ()  # its router's order of DP group members, when there is a group
        self.default_seqs_2_0: list[str] = []  # the 2.0 instances that set no max_num_seqs (_DEFAULTS)

    def keys(self, node: _Node, field: str, known: set[str]) -> dict[str, _Node]:
        """The mapping, with a note for each key LLMServingSim does not read: it ignores such keys (its
        loader reads the ones it knows by name), so they are no error here, but a misspelt one (`npu_nm`)
        is said at start-up rather than silently dropped."""
        from profiles.cluster_file import _did_you_mean
        mapping = self.p.mapping(node, field)
        for key in mapping:
            if key not in known:
                self.notes.append(f"{self.r.path}:{self.line(node, key)}: {field}.{key}: not a key LLMServingSim "
                                  f"reads; ignored, as LLMServingSim ignores it" + _did_you_mean(key, known, "; "))
        return mapping

    @staticmethod
    def line(owner: _Node, key: str) -> int:
        return (owner.key_lines or {}).get(key, owner.line)

    def at(self, owner: _Node, key: str) -> _Node:
        """The key itself (its line), for an error about it."""
        from profiles.cluster_file import _Node
        return _Node(key, self.line(owner, key))

    # -- the file -------------------------------------------------------------------------------
    def read(self, root: dict[str, _Node]) -> ClusterSpec:
        self.keys(self.r.root, "cluster", _TOP)
        nodes_list = self.p.sequence(root["nodes"], "nodes") if "nodes" in root else []
        if not nodes_list:
            raise self.r.error(self.r.root, "nodes", "an LLMServingSim cluster config lists its nodes")
        if "num_nodes" in root and self.p.integer(root["num_nodes"], "num_nodes", 1) != len(nodes_list):
            raise self.r.error(root["num_nodes"], "num_nodes", f"says {root['num_nodes'].value} but `nodes` "
                                                               f"lists {len(nodes_list)}")
        nodes: dict[str, dict] = {}
        members: list[_Member] = []
        powers: list[tuple[int, _Node]] = []
        for n, node in enumerate(nodes_list):
            settings = self.keys(node, f"nodes[{n}]", _NODE)
            nodes[f"node{n}"] = self.node(settings, f"nodes[{n}]", root, len(nodes_list))
            instances = self.p.sequence(settings["instances"], f"nodes[{n}].instances") \
                if "instances" in settings else []
            if "num_instances" in settings and self.p.integer(settings["num_instances"], f"nodes[{n}].num_instances",
                                                              0) != len(instances):
                raise self.r.error(settings["num_instances"], f"nodes[{n}].num_instances",
                                   f"says {settings['num_instances'].value} but `instances` lists {len(instances)}")
            members += [self.member(inst, f"nodes[{n}].instances[{i}]", n) for i, inst in enumerate(instances)]
            if "power" in settings:
                powers.append((n, settings["power"]))
        version = self.generation = self.version(members)
        root = self.hardware_links(root, members)
        link_bw = self.link_values(root, "link_bw", _LINK_BW_UNIT, "GiB/s")
        link_latency = self.link_values(root, "link_latency", 1e-9, "ns")
        for n, power in powers:
            self.check_power(power, f"nodes[{n}].power", [m for m in members if m.node_index == n])
        if powers and len(powers) < len(nodes_list):
            without = ", ".join(f"nodes[{n}]" for n in range(len(nodes_list)) if n not in dict(powers))
            self.notes.append(f"power: LLMServingSim models power only when every node has a `power` section and "
                              f"{without} has none: the sections given are applied, the other nodes' devices draw "
                              f"their catalogue figures")
        groups = self.groups(members)
        specs = [self.instance(group, index) for index, group in enumerate(groups)]
        if version == "2.0" and any(i.deployment.config.enable_chunked_prefill for i in specs):
            self.notes.append("LLMServingSim 2.0 does not chunk prefills (its scheduler takes a prompt whole, within "
                              "max_num_batched_tokens); here vLLM's chunked prefill")
        if self.default_seqs_2_0:
            self.notes.append(f"{', '.join(self.default_seqs_2_0)}: no max_num_seqs, which LLMServingSim 2.0 runs "
                              f"without a sequence limit (its --max-batch default 0); here vLLM's default "
                              f"(max_num_seqs 0 asks for the most vLLM accepts, whose memory profiling then "
                              f"reserves room for that many sequences)")
        # its router's schedulers: one per instance of the file, a DP group's members where the file lists them
        group_of = {id(m): f"instance{index}" for index, group in enumerate(groups) for m in group}
        self.members = tuple(group_of[id(m)] for m in members) if len(groups) < len(members) else ()
        self.check_pd(members)
        self.note_link(root, link_bw, link_latency, specs, len(nodes))
        links = ()
        if link_bw and len(nodes) > 1:  # between nodes: the outermost of its topology's dimensions
            names = list(nodes)
            links = tuple({"between": (a, b), "bandwidth": link_bw[-1],
                           "latency": link_latency[-1] if link_latency else 0.0}
                          for i, a in enumerate(names) for b in names[i + 1:])
        routing, params = self.routing(root.get("routing"), version)
        # its router: a request goes to any non-decode instance, whatever its model; a prefill one hands it on
        return ClusterSpec(tuple(specs), routing, params, (), nodes, links, entry="any_non_decode")

    def hardware_links(self, root: dict[str, _Node], members: list[_Member]) -> dict[str, _Node]:
        """`root` with `link_bw` and `link_latency` filled as LLMServingSim 2.x fills what the file leaves out
        (or null): from its hardware file for the one hardware every instance names. What it cannot fill it
        refuses the file for; here that is a note, and the link is the emulator's own."""
        from profiles.cluster_file import _Node
        missing = [key for key in _LINK_FACTS if key not in root or root[key].value is None]
        if not missing:
            return root
        root = {k: v for k, v in root.items() if k not in missing}
        names = sorted({m.device.name for m in members})
        facts = llmservingsim_hardware().get(names[0], {}) if len(names) == 1 else {}
        filled = [key for key in missing if key in facts]
        for key in filled:
            root[key] = _Node(facts[key]["value"], self.r.root.line)
        if filled:
            self.notes.append(self.inherited("cluster", names[0], {key: facts[key] for key in filled}))
        unfilled = [key for key in missing if key not in filled]
        if unfilled:
            why = (f"the cluster mixes hardware ({', '.join(names)}), so there is no one link to inherit"
                   if len(names) > 1 else f"its hardware file for {names[0]} has no link measurement"
                   if names[0] in llmservingsim_hardware() else f"it has no hardware file for {names[0]}")
            self.notes.append(f"cluster.{', '.join(unfilled)}: not given, and LLMServingSim refuses the file ({why}); "
                              f"here tensor-parallel collectives and same-node KV transfers take the device's own "
                              f"interconnect and transfers between nodes a default network")
        return root

    @staticmethod
    def inherited(field: str, hardware: str, facts: dict[str, dict]) -> str:
        values = ", ".join(f"{key} {fact['value']:g} {_UNITS[key]} ({fact['source']})" for key, fact in facts.items())
        return (f"{field}: {values}: not given, so inherited from LLMServingSim's hardware file for {hardware}, as "
                f"LLMServingSim 2.x inherits it")

    def check_pd(self, members: list[_Member]) -> None:
        """Prefill and decode instances as its router uses them: requests go to the non-decode instances, and
        every prefill from a prefill instance on to a decode instance whatever its model, so there must be a
        non-decode instance, a prefill instance needs a decode one, and P/D instances serve one model."""
        pd = [m for m in members if "pd_type" in m.spec and m.spec["pd_type"].value is not None]
        roles = {m.spec["pd_type"].value for m in pd}
        if len(pd) == len(members) and roles == {"decode"}:
            raise self.r.error(pd[0].spec["pd_type"], f"{pd[0].field}.pd_type",
                               "every instance is a decode instance: LLMServingSim sends requests to the others")
        if roles == {"prefill"}:
            raise self.r.error(pd[0].spec["pd_type"], f"{pd[0].field}.pd_type",
                               "prefill instances without a decode instance: LLMServingSim hands every prefill "
                               "from a prefill instance to a decode instance")
        if roles == {"decode"}:
            self.notes.append(f"{pd[0].field}.pd_type: decode instances without a prefill instance take no "
                              f"request, as in LLMServingSim (only a prefill instance hands requests to them)")
        for m in pd:
            if m.model.name != pd[0].model.name:
                raise self.r.error(m.spec["model_name"], f"{m.field}.model_name",
                                   f"prefill and decode instances of {pd[0].model.name} ({pd[0].field}) and "
                                   f"{m.model.name}: LLMServingSim hands a prefill to any decode instance, whatever "
                                   f"its model, so P/D instances of more than one model are not simulated")

    def link_values(self, root: dict[str, _Node], key: str, scale: float, unit: str) -> list[float]:
        """`link_bw` or `link_latency`: a number, or one per topology dimension (innermost first)."""
        if key not in root:
            return []
        node = root[key]
        items = node.value if isinstance(node.value, list) else [node]
        if not items:
            raise self.r.error(node, key, f"expected {unit}, or a list of one per topology dimension")
        return [self.p.number(item, key, {"": scale}, unit, bare=scale) for item in items]

    def note_link(self, root: dict[str, _Node], link_bw: list[float], link_latency: list[float],
                  specs: list[InstanceSpec], num_nodes: int) -> None:
        if not link_bw and not link_latency:
            return
        key = "link_bw" if link_bw else "link_latency"
        given = ", ".join(([f"{link_bw[0] / _LINK_BW_UNIT:g} GiB/s"] if link_bw else [])
                          + ([f"{link_latency[0] * 1e9:g} ns"] if link_latency else []))
        devices = {s.deployment.device.name: s.deployment.device.interconnect for s in specs}
        own = "; ".join(f"{name}: {link.name}, {link.bandwidth / 1e9:g} GB/s per direction, {link.latency * 1e6:g} µs"
                        for name, link in devices.items())
        self.notes.append(f"{self.r.path}:{self.line(self.r.root, key)}: link_bw, link_latency: LLMServingSim's "
                          f"link between NPUs ({given}) is not applied within a node: tensor-parallel collectives "
                          f"and same-node KV transfers take the device's own interconnect ({own})"
                          + ("; between nodes it is the nodes' link" if num_nodes > 1 else ""))

    def version(self, members: list[_Member]) -> str:
        """2.0 or 2.x, by the parallelism keys the instances use (neither: 2.x if one sets npu_mem.mem_util,
        else 2.0); one file uses one generation's keys."""
        def first(keys: tuple[str, ...]) -> tuple[_Member, str] | None:
            return next(((m, k) for m in members for k in keys if k in m.spec), None)
        old, new = first(_V20), first(_V2X)
        if old and new:
            (m_new, k_new), (m_old, k_old) = new, old
            raise self.r.error(self.at(m_new.node, k_new), f"{m_new.field}.{k_new}",
                               f"LLMServingSim 2.x's {k_new!r} and 2.0's {k_old!r} ({m_old.field}, line "
                               f"{self.line(m_old.node, k_old)}) in one file: 2.x no longer reads npu_num/npu_group "
                               f"and 2.0 does not read num_npus/tp_size/pp_size/ep_size/dp_group; write every "
                               f"instance in one of them")
        mem_util = any(isinstance(m.spec.get("npu_mem") and m.spec["npu_mem"].value, dict)
                       and "mem_util" in m.spec["npu_mem"].value for m in members)
        return "2.x" if new or (mem_util and not old) else "2.0"

    def routing(self, node: _Node | None, version: str) -> tuple[str, dict]:
        name = node.value if node is not None and isinstance(node.value, str) else None
        if node is None or name in _ROUTING:
            policy = _DEFAULT_ROUTING[version] if node is None else _ROUTING[name]
            # LOAD scores an instance without a sequence limit (max_num_seqs 0 there) by its raw load
            load = policy == "llmservingsim_load"
            params = {"unlimited": tuple(self.unlimited)} if load and self.unlimited else {}
            if load and self.seq_limits:  # its scheduler's max_num_seqs, not the capped one (seqs_within_budget)
                params["max_num_seqs"] = dict(self.seq_limits)
            return policy, {**params, "members": self.members} if self.members else params
        if name in ("RAND", "CUSTOM"):
            raise self.r.error(node, "routing", f"LLMServingSim's {name} routing is not simulated; choose RR, LOAD "
                                                f"or one of the emulator's: {', '.join(POLICIES)}")
        return self.p.routing(node)

    # -- a node ---------------------------------------------------------------------------------
    def node(self, settings: dict[str, _Node], field: str, root: dict[str, _Node], num_nodes: int) -> dict:
        out: dict[str, Any] = {}
        if "cpu_mem" in settings:
            out.update(self.memory(settings["cpu_mem"], f"{field}.cpu_mem", "host"))
            if "pim_config" in self.p.mapping(settings["cpu_mem"], f"{field}.cpu_mem"):
                self.notes.append(f"{field}.cpu_mem.pim_config: processing-in-memory is not simulated")
        if "cxl_mem" in root:
            out.update(self.memory(root["cxl_mem"], "cxl_mem", "cxl", note=field == "nodes[0]"))
            if num_nodes > 1 and "cxl_memory" in out:  # LLMServingSim's is one pool for the whole cluster
                out["cxl_memory"] /= num_nodes
                if field == "nodes[0]":
                    self.notes.append(f"cxl_mem: one pool of the cluster in LLMServingSim; here each of the "
                                      f"{num_nodes} nodes has an equal share of it (a node's engines do not "
                                      f"read another node's share)")
        if "power" in settings:
            out["power"] = self.p.power(settings["power"], f"{field}.power")
        return out

    def memory(self, node: _Node, field: str, prefix: str, note: bool = True) -> dict:
        mem = self.keys(node, field, _MEMORY[prefix]) if note else self.p.mapping(node, field)
        out = {}
        if "mem_size" in mem:
            out[f"{prefix}_memory"] = self.p.number(mem["mem_size"], f"{field}.mem_size", {"": GiB}, "GB", bare=GiB)
        if "mem_bw" in mem:
            out[f"{prefix}_{'memory_' if prefix == 'host' else ''}bandwidth"] = \
                self.p.number(mem["mem_bw"], f"{field}.mem_bw", {"": 1e9}, "GB/s", bare=1e9)
        if "mem_latency" in mem:
            latency = self.p.number(mem["mem_latency"], f"{field}.mem_latency", {"": 1e-9}, "ns", bare=1e-9)
            if prefix == "cxl":
                out["cxl_latency"] = latency
            elif latency and note:
                self.notes.append(f"{field}.mem_latency: {latency * 1e9:g} ns is not simulated: host-memory "
                                  f"transfers take the device's host link (its bandwidth and latency)")
        if prefix == "cxl" and "num_devices" in mem and note:
            count = self.p.integer(mem["num_devices"], f"{field}.num_devices", 1)
            if count != 1:
                self.notes.append(f"{field}.num_devices: {count} devices are not simulated: each node's CXL tier "
                                  f"is one pool, split among the engines that offload to it")
        return out

    def check_power(self, node: _Node, field: str, members: list[_Member]) -> None:
        """LLMServingSim's power section is complete or refused (its config builder raises KeyError): every
        part, and an `npu` entry named as each of the node's instances names its hardware."""
        section = self.p.mapping(node, field)
        if _EMULATOR_POWER & set(section):  # the emulator's own spelling, checked by its reader
            return
        for key, required in _POWER.items():
            if key not in section:
                raise self.r.error(node, f"{field}.{key}", f"missing; LLMServingSim requires it (its \"Missing "
                                                           f"required key '{key}' in power configuration\")")
            part = section[key]
            for sub in required:
                if sub not in self.p.mapping(part, f"{field}.{key}"):
                    raise self.r.error(part, f"{field}.{key}.{sub}", f"missing; LLMServingSim requires it in "
                                                                     f"{key} power")
        npus = self.p.mapping(section["npu"], f"{field}.npu")
        for m in members:
            hardware = m.spec["hardware"].value
            if hardware not in npus:
                named = ", ".join(map(repr, npus)) or "none"
                raise self.r.error(section["npu"], f"{field}.npu", f"no entry for {m.field}'s hardware {hardware!r} "
                                   f"(entries: {named}); LLMServingSim needs one per hardware, named as the "
                                   f"instance names it")
            for sub in _NPU_POWER:
                if sub not in self.p.mapping(npus[hardware], f"{field}.npu.{hardware}"):
                    raise self.r.error(npus[hardware], f"{field}.npu.{hardware}.{sub}",
                                       "missing; LLMServingSim requires it of every npu entry")

    # -- instances ------------------------------------------------------------------------------
    def member(self, node: _Node, field: str, node_index: int) -> _Member:
        spec = self.keys(node, field, _INSTANCE)
        for key in ("model_name", "hardware"):
            if key not in spec:
                raise self.r.error(node, f"{field}.{key}", "every LLMServingSim instance names it")
        name = self.p.string(spec["model_name"], f"{field}.model_name")
        try:
            model = load_model(name)
        except ValueError as exc:
            raise self.r.error(spec["model_name"], f"{field}.model_name", str(exc)) from None
        device = self.p.device(spec["hardware"], f"{field}.hardware")
        tp, pp = self.parallelism(node, spec, field)
        # LLMServingSim's default: a MoE model's experts are spread over its TP ranks (ep_size = tp_size)
        ep = self.p.integer(spec["ep_size"], f"{field}.ep_size", 1) if "ep_size" in spec else tp if model.is_moe else 1
        group = None
        if "dp_group" in spec and spec["dp_group"].value is not None:  # null: no group
            group = self.p.string(spec["dp_group"], f"{field}.dp_group")
        if group is None and ep > tp:
            raise self.r.error(spec["ep_size"], f"{field}.ep_size", f"ep_size ({ep}) > tp_size ({tp}) requires "
                                                                    f"dp_group to be set")
        if pp > model.num_layers:
            raise self.r.error(spec.get("pp_size", node), f"{field}.pp_size",
                               f"pp_size ({pp}) exceeds the model's transformer block count ({model.num_layers}); "
                               f"a pipeline stage cannot be empty")
        if model.is_moe and model.num_experts % ep:
            raise self.r.error(spec.get("ep_size", node), f"{field}.ep_size",
                               f"ep_size ({ep}) must divide the model's expert count ({model.num_experts})")
        return _Member(node, spec, field, node_index, model, device, tp, pp, ep, group)

    def parallelism(self, node: _Node, spec: dict[str, _Node], field: str) -> tuple[int, int]:
        """(tp, pp) from LLMServingSim's parallelism keys: `num_npus`/`tp_size`/`pp_size` (2.x; a missing one
        inferred from the others, num_npus = tp_size x pp_size, as its _resolve_parallelism does) or
        `npu_num`/`npu_group` (2.0); the two spellings together say the same thing twice."""
        new = [k for k in ("num_npus", "tp_size", "pp_size") if k in spec]
        old = [k for k in _V20 if k in spec]
        if new and old:
            raise self.r.error(self.at(node, new[0]), f"{field}.{new[0]}",
                               f"{new[0]!r} and {old[0]!r} (line {self.line(node, old[0])}) both give the instance's "
                               f"NPUs: use num_npus/tp_size/pp_size or npu_num/npu_group")
        if old:
            from profiles.cluster_file import _Node
            npus = self.p.integer(spec.get("npu_num", _Node(1, node.line)), f"{field}.npu_num", 1)
            group = self.p.integer(spec.get("npu_group", _Node(1, node.line)), f"{field}.npu_group", 1)
            if group > npus or npus % group:
                raise self.r.error(node, f"{field}.npu_group", f"npu_group ({group}) must divide npu_num ({npus})")
            return npus // group, group  # LLMServingSim's topology: npu_group groups of npu_num/npu_group NPUs
        size = {k: self.p.integer(spec[k], f"{field}.{k}", 1) for k in new}
        npus, tp, pp = size.get("num_npus"), size.get("tp_size"), size.get("pp_size", 1)

        def wrong(key: str, message: str):
            return self.r.error(spec.get(key, node), f"{field}.{key}", message)
        if npus is not None and tp is not None and npus != tp * pp:
            if npus % tp:
                raise wrong("num_npus", f"num_npus ({npus}) is not a multiple of tp_size ({tp})")
            if pp != 1:
                raise wrong("num_npus", f"num_npus ({npus}) is not tp_size ({tp}) x pp_size ({pp})")
            pp = npus // tp  # the pipeline degree follows
        elif npus is not None and tp is None:
            if npus % pp:
                raise wrong("num_npus", f"num_npus ({npus}) is not a multiple of pp_size ({pp})")
            tp = npus // pp
        elif tp is None:
            if pp != 1:
                raise wrong("pp_size", f"pp_size ({pp}) needs num_npus or tp_size: num_npus = tp_size x pp_size")
            tp = 1
        return tp, pp

    def groups(self, members: list[_Member]) -> list[list[_Member]]:
        """Instances grouped by `dp_group` (its name, across the whole cluster, as LLMServingSim groups them),
        in the order of their first member, each group checked."""
        named: dict[str, list[_Member]] = {}
        out: list[list[_Member]] = []
        for m in members:
            if m.group is None:
                out.append([m])
            elif m.group in named:
                named[m.group].append(m)
            else:
                named[m.group] = [m]
                out.append(named[m.group])
        for group in named.values():
            self.check_group(group)
        return out

    def check_group(self, group: list[_Member]) -> None:
        """LLMServingSim's checks of a DP group (tp, ep and pp sizes alike; a MoE group's expert parallelism),
        then the emulator's: its members are one vLLM deployment, so on one node with one configuration."""
        from profiles.cluster_file import _plain
        first, size = group[0], len(group)
        for m in group[1:]:
            for key, a, b in (("tp_size", first.tp, m.tp), ("ep_size", first.ep, m.ep), ("pp_size", first.pp, m.pp)):
                if a != b:
                    raise self.r.error(m.spec.get(key, m.spec["dp_group"]), f"{m.field}.{key}",
                                       f"DP group {m.group!r}: {key} mismatch ({a!r} vs {b!r})")
            if m.node_index != first.node_index:
                raise self.r.error(m.spec["dp_group"], f"{m.field}.dp_group",
                                   f"DP group {m.group!r} spans nodes[{first.node_index}] and nodes[{m.node_index}]: "
                                   f"data parallelism across nodes is not simulated (an instance lives on one "
                                   f"node); put the group's members on one node")
            for key in sorted((set(first.spec) | set(m.spec)) - _PARALLELISM):
                a, b = (_plain(x.spec[key]) if key in x.spec else None for x in (first, m))
                if a != b:
                    raise self.r.error(m.spec.get(key, m.spec["dp_group"]), f"{m.field}.{key}",
                                       f"DP group {m.group!r}: {key} mismatch ({a!r} vs {b!r}); the group is one "
                                       f"vLLM deployment of data_parallel_size {size}, whose engines share one "
                                       f"configuration")
        if first.model.is_moe:
            where = first.spec.get("ep_size", first.node)
            if first.ep % size:
                raise self.r.error(where, f"{first.field}.ep_size", f"DP group {first.group!r}: ep_size ({first.ep}) "
                                                                    f"not divisible by dp_group_size ({size})")
            if first.ep // size > first.tp:
                raise self.r.error(where, f"{first.field}.ep_size", f"DP group {first.group!r}: local_ep "
                                                                    f"({first.ep // size}) > tp_size ({first.tp})")

    def instance(self, group: list[_Member], index: int) -> InstanceSpec:
        m = group[0]
        spec, field, model, device, tp, pp, ep, dp = m.spec, m.field, m.model, m.device, m.tp, m.pp, m.ep, len(group)
        # LLMServingSim does not bound the context: unless the command line names a length, fit it to the cache
        args: dict[str, Any] = {"max_model_len": -1, **self.p.base, "tensor_parallel_size": tp,
                                "pipeline_parallel_size": pp, "data_parallel_size": dp,
                                "enable_expert_parallel": model.is_moe and ep > 1}
        if model.is_moe and ep != tp * dp:
            simulated = (f"vLLM's expert parallelism, which spreads the experts over all tp_size x DP = {tp * dp} "
                         f"ranks" if ep > 1 else
                         f"vLLM without expert parallelism: every expert sliced over the {tp * dp} ranks")
            self.notes.append(f"{field}.ep_size: {ep} is not tp_size x DP group size ({tp * dp}), which vLLM cannot "
                              f"run; simulated: {simulated}")
        unlimited_seqs = self.overrides(spec, field, args, model)
        for name, value in _DEFAULTS[self.generation].items():  # LLMServingSim's defaults, where vLLM's differ
            if name not in args and not (name == "max_num_seqs" and unlimited_seqs):
                args[name] = value
        if "max_num_seqs" not in args and not unlimited_seqs:
            self.default_seqs_2_0.append(field)
        device, mem_util, size = self.npu_memory(spec, m.node, field, device, args, model, tp, pp, ep)
        if unlimited_seqs:
            self.unlimited.append(f"instance{index}")
            args["max_num_seqs"] = self.most_seqs(args, model, device, spec["max_num_seqs"], field)
            self.notes.append(f"{field}.max_num_seqs: 0 (no limit, in LLMServingSim): {args['max_num_seqs']}, "
                              f"max_num_batched_tokens, the most vLLM accepts")
        elif "max_num_seqs" in args:
            self.seqs_within_budget(args, model, device, spec.get("max_num_seqs", m.node), field, pp,
                                    f"instance{index}")
        for key in sorted(_NOT_SIMULATED & set(spec)):
            self.notes.append(f"{field}.{key}: accepted, not simulated")
        pd_type = spec["pd_type"].value if "pd_type" in spec else None
        if pd_type not in ("prefill", "decode", None):
            raise self.r.error(spec["pd_type"], f"{field}.pd_type",
                               f"expected prefill, decode or null, got {pd_type!r}")
        deployment = self.p.deployment(model.name, device, args, m.node, field)
        if mem_util is None:
            self.note_kv(field, size, deployment, model, tp, pp, ep)
        extra = self.instance_power(spec, field)
        return InstanceSpec(f"instance{index}", deployment, (model.name,), pd_type or "mixed",
                            f"node{m.node_index}", None, None, "least_loaded", extra)

    def overrides(self, spec: dict[str, _Node], field: str, args: dict[str, Any], model: ModelSpec) -> bool:
        """Its per-instance overrides of its own command line's flags, as engine flags in `args`; True when
        max_num_seqs is 0 (no limit), which needs the final max_num_batched_tokens."""
        from profiles.cluster_file import _CHOICES, _ENGINE_FIELDS
        unlimited_seqs = False
        for key, name in _ENGINE_FLAGS.items():
            if key not in spec:
                continue
            value = self.p.engine_value(spec[key], f"{field}.{key}", name, _ENGINE_FIELDS[name].type)
            if name in _CHOICES and value not in _CHOICES[name]:
                raise self.r.error(spec[key], f"{field}.{key}", f"expected one of "
                                   f"{', '.join(map(str, _CHOICES[name]))}, got {value!r}")
            if value == 0 and key == "max_num_seqs":
                unlimited_seqs = True
                continue
            if value == 0 and key == "max_num_batched_tokens":  # min(inf, max_position_embeddings), as it caps it
                value = model.max_position_embeddings
                self.notes.append(f"{field}.max_num_batched_tokens: 0 (no limit, in LLMServingSim, which caps it at "
                                  f"the model's max_position_embeddings): {value}")
            args[name] = value
        return unlimited_seqs

    def most_seqs(self, args: dict[str, Any], model: ModelSpec, device: DeviceSpec, node: _Node, field: str) -> int:
        """The largest max_num_seqs vLLM accepts: max_num_batched_tokens (which it may not be below)."""
        try:
            return resolve(EngineArgs(**{**args, "max_num_seqs": None}), model, device).max_num_batched_tokens
        except ValueError as exc:
            raise self.r.error(node, f"{field}.max_num_seqs", str(exc)) from None

    def seqs_within_budget(self, args: dict[str, Any], model: ModelSpec, device: DeviceSpec, node: _Node, field: str,
                           pp: int, name: str) -> None:
        """A max_num_seqs above the token budget, which LLMServingSim takes and vLLM refuses ("max_num_batched_tokens
        must be greater than or equal to max_num_seqs"), becomes the budget: its scheduler (serving/core/scheduler.py)
        admits a waiting request only while the step's budget (min(max_num_batched_tokens, max_position_embeddings))
        lasts and only after serving every running request a token of it, so its running set never outgrows the
        budget (pipeline parallel aside, where requests of a batch in flight take none). Its LOAD router still
        divides by the file's figure (`seq_limits`)."""
        seqs, tokens = args["max_num_seqs"], args.get("max_num_batched_tokens")
        if tokens is None:  # vLLM's default for the card
            tokens = self.most_seqs(args, model, device, node, field)
        budget = min(tokens, model.max_position_embeddings)
        if seqs <= budget:
            return
        args["max_num_seqs"] = budget
        self.seq_limits[name] = seqs
        caveat = (f"; with pp_size {pp} its running set may outgrow the budget while a batch is in flight, not here"
                  if pp > 1 else "")
        self.notes.append(f"{field}.max_num_seqs: {seqs}, above the token budget ({budget}), which vLLM refuses: "
                          f"{budget}, as many as LLMServingSim's scheduler runs at once{caveat}; its LOAD router "
                          f"still scores the instance over {seqs}")

    def npu_memory(self, spec: dict[str, _Node], node: _Node, field: str, device: DeviceSpec, args: dict[str, Any],
                   model: ModelSpec, tp: int, pp: int, ep: int) -> tuple[DeviceSpec, float | None, float]:
        """The device with the config's NPU memory (a figure within 10 % of the card's names that card: configs
        round, "24" GB for a 23.5 GiB RTX 4090; further off it models another memory and is applied),
        `mem_util` (None when not given), whose KV cache goes into `args`, and LLMServingSim's memory size
        (bytes). What the config leaves out is LLMServingSim's hardware file's (npu_mem_facts)."""
        mem = self.npu_mem_facts(spec, node, field, device)
        given = {}
        if "mem_size" in mem:
            given["memory_bytes"] = ("mem_size", int(self.p.number(mem["mem_size"], f"{field}.npu_mem.mem_size",
                                                                    {"": GiB}, "GB", bare=GiB)), GiB, "GiB")
        if "mem_bw" in mem:
            given["memory_bandwidth"] = ("mem_bw", self.p.number(mem["mem_bw"], f"{field}.npu_mem.mem_bw", {"": 1e9},
                                                                 "GB/s", bare=1e9), 1e9, "GB/s")
        if "mem_latency" in mem:
            latency = self.p.number(mem["mem_latency"], f"{field}.npu_mem.mem_latency", {"": 1e-9}, "ns", bare=1e-9)
            if latency:
                self.notes.append(f"{field}.npu_mem.mem_latency: {latency * 1e9:g} ns is not simulated (a step's "
                                  f"memory time is its bytes over the device's bandwidth)")
        changes = {}
        for attr, (key, value, unit, unit_name) in given.items():
            own = getattr(device, attr)
            if abs(value / own - 1.0) > 0.10:
                changes[attr] = value
            elif abs(value / own - 1.0) > _SAME:
                self.notes.append(f"{field}.npu_mem.{key}: {value / unit:g} {unit_name} is within 10 % of "
                                  f"{device.name}'s {own / unit:.4g} {unit_name}, so it names that card: "
                                  f"{device.name}'s own is simulated")
        if changes:
            device = dataclasses.replace(device, **changes)
            self.notes.append(f"{field}: {device.name} with the config's memory "
                              + ", ".join(f"{k}={v:g}" for k, v in changes.items()))
        size = given["memory_bytes"][1] if "memory_bytes" in given else device.memory_bytes
        if "mem_util" not in mem:
            return device, None, size
        node, where = mem["mem_util"], f"{field}.npu_mem.mem_util"
        util = node.value
        if isinstance(util, bool) or not isinstance(util, (int, float)) or not 0 < util <= 1:
            hint = f". It is a fraction of npu_mem.mem_size, so {util / 100:g} rather than {util}" \
                if isinstance(util, (int, float)) and not isinstance(util, bool) and 1 < util <= 100 else ""
            raise self.r.error(node, where, f"must be a number in (0, 1]; got {util!r}{hint}")
        weights = llmservingsim_weight_bytes(model, tp, pp, ep)
        kv = int(size * util) - int(weights)
        try:
            block = block_bytes(model, resolve(EngineArgs(**args), model, device))
        except ValueError:
            block = 1  # the deployment reports what is wrong with the flags
        if kv < block:
            raise self.r.error(node, where, f"{util:g} of npu_mem.mem_size ({size / GiB:g} GiB) less "
                                            f"{weights / GiB:.2f} GiB of weights per rank leaves "
                                            f"{kv / 2 ** 20:.2f} MiB for the KV cache, less than one "
                                            f"{args.get('block_size', 16)}-token block ({block / 2 ** 20:.2f} MiB)")
        args["kv_cache_memory_bytes"] = kv
        self.notes.append(f"{field}: KV cache sized as LLMServingSim 2.x sizes it (npu_mem.mem_util, a calibration "
                          f"knob there): {size / GiB:g} GiB x {util:g} - {weights / GiB:.2f} GiB of weights per rank "
                          f"= {kv / GiB:.2f} GiB ({kv // block} blocks), as vLLM's kv_cache_memory_bytes")
        return device, util, size

    def npu_mem_facts(self, spec: dict[str, _Node], node: _Node, field: str, device: DeviceSpec) -> dict[str, _Node]:
        """The instance's `npu_mem`, with what it leaves out (or null) filled as LLMServingSim 2.x fills it: from
        its hardware file for the instance's hardware. What it cannot fill it refuses the file for; here that is
        a note, and the card's own figure is simulated."""
        from profiles.cluster_file import _Node
        mem = dict(self.keys(spec["npu_mem"], f"{field}.npu_mem", _MEMORY["npu"])) if "npu_mem" in spec else {}
        missing = [key for key in _NPU_MEM_FACTS if key not in mem or mem[key].value is None]
        if not missing:
            return mem
        facts = llmservingsim_hardware().get(device.name, {}).get("npu_mem", {})
        line = spec["npu_mem"].line if "npu_mem" in spec else node.line
        filled = {key: facts[key] for key in missing if key in facts}
        for key, fact in filled.items():
            mem[key] = _Node(fact["value"], line)
        if filled:
            self.notes.append(self.inherited(f"{field}.npu_mem", device.name, filled))
        unfilled = [key for key in missing if key not in filled]
        for key in unfilled:
            mem.pop(key, None)
        if unfilled:
            self.notes.append(f"{field}.npu_mem: {', '.join(unfilled)} not given, and LLMServingSim has no hardware "
                              f"file for {device.name} to inherit it from (it refuses the file); {device.name}'s own "
                              f"figures are simulated")
        return mem

    def note_kv(self, field: str, size: float, deployment, model: ModelSpec, tp: int, pp: int, ep: int) -> None:
        """Without mem_util, vLLM's memory profiling sized the KV cache; LLMServingSim's figures beside it
        (`size`: its memory size, bytes)."""
        memory = deployment.memory
        weights = llmservingsim_weight_bytes(model, tp, pp, ep)
        blocks = {u: max(int(size * u - weights) // memory.block_bytes, 0) for u in (1.0, _UTIL_2X)}
        self.notes.append(f"{field}: KV cache sized by vLLM's memory profiling ({memory.num_gpu_blocks} blocks: "
                          f"gpu_memory_utilization {deployment.config.gpu_memory_utilization:g}, less weights, "
                          f"activation peak and non-torch memory); LLMServingSim 2.0 gives it npu_mem - weights "
                          f"({blocks[1.0]} blocks), 2.x npu_mem x {_UTIL_2X:g} - weights ({blocks[_UTIL_2X]}); "
                          f"npu_mem.mem_util sizes it LLMServingSim's way")

    def instance_power(self, spec: dict[str, _Node], field: str) -> dict:
        """An instance's `power`: the emulator's device power fields apply; LLMServingSim's spelling (its README
        lists one, its code reads the node's `power.npu` instead) is noted and ignored, as there."""
        if "power" not in spec:
            return {}
        value = spec["power"].value
        if isinstance(value, dict) and value and set(value) <= {*_NPU_POWER, "num_npus"}:
            self.notes.append(f"{field}.power: LLMServingSim does not read an instance's power (its node's "
                              f"power.npu entry prices the device); ignored, as there")
            return {}
        return {"power": self.p.power(spec["power"], f"{field}.power", device=True)}


@cache
def llmservingsim_hardware() -> dict[str, dict]:
    """LLMServingSim's hardware facts by catalogue name: the `defaults` of its hardware files (profiles/SOURCES.md)."""
    return yaml.safe_load((Path(__file__).resolve().parent / "data" / "llmservingsim_hardware.yaml").read_text())


def llmservingsim_weight_bytes(model: ModelSpec, tp: int, pp: int, ep: int) -> float:
    """Weights per rank as LLMServingSim's memory model counts them: the parameters only (not vLLM's rotary
    cache), on the heaviest pipeline stage (the embedding and LM head with n_layers // pp blocks), the
    experts split over ep ranks and the rest over tp."""
    embed = model.vocab_size * model.hidden_size * (1 if model.tie_word_embeddings else 2) * model.activation_bytes
    experts = model.expert_weight_bytes()
    blocks = model.weight_bytes() - embed - experts
    per_layer = (blocks / tp + (experts / ep if experts else 0.0)) / model.num_layers
    return embed / tp + per_layer * (model.num_layers // pp)
