"""Collectives between GPUs as vLLM issues them: measured where there are tables, modelled otherwise.

Which implementation vLLM picks (vllm/distributed/device_communicators/cuda_communicator.py):
- all-reduce (tensor parallelism): its custom all-reduce (custom_all_reduce.py: CUDA-IPC buffers,
  every GPU reads its peers' data) when the GPUs can read each other's memory (P2P) and are two,
  or all pairwise joined by NVLink, and the message is under its size limit; NCCL otherwise;
- all-gather and reduce-scatter (the dispatch and combine of data-parallel MoE layers, vLLM's
  default `allgather_reducescatter` all2all backend), all-to-all, send/recv (between pipeline
  stages): NCCL.

Measured grids (the operator-table format, µs by (gpus, bytes)): AIConfigurator's collectives timed
under vLLM, where the all-reduce is the faster of vLLM's custom one and NCCL, as vLLM picks;
Vidur's NCCL tables. Read within their GPU counts and sizes; beyond the largest size the time grows
with the bytes; both count as extrapolated.

Modelled (a kind without a table): NCCL's ring algorithm under its three protocols, the cheapest
winning, as NCCL's tuner picks (nccl src/graph/tuning.cc):

    t = base(protocol) + hops x hop(protocol) + traffic / (bus bandwidth x share(protocol))

with NCCL's base latencies (LL 6.6, LL128 14, Simple 8.4 µs), per-hop latencies in NCCL's ratio to
the link's bulk (Simple) hop latency, `LinkSpec.latency` (NVLink 0.6 : 1.9 : 3.4, PCIe 1.0 : 2.5 : 5.7),
and bandwidth shares (LL moves 8 bytes per 16-byte line and NCCL credits it a quarter of the bus for an
all-reduce, a third otherwise; LL128 120 of 128 bytes, and only over NVLink; Simple all of it). A ring
all-reduce takes 2(p-1) hops and moves 2(p-1)/p of the message per GPU; all-gather and reduce-scatter
(of a message of all ranks' data) (p-1) hops and (p-1)/p; all-to-all sends (p-1)/p to p-1 peers at once;
send/recv one hop. vLLM's custom all-reduce: a launch and two barriers (flag writes across the link),
then one-shot (each GPU reads the whole message from every peer) for two GPUs or small messages,
two-shot (reduce-scatter then all-gather through the peers' buffers) above.
"""
from __future__ import annotations

import numpy as np

from emulator.cost.interpolate import GridTable
from emulator.cost.roofline import Priced
from emulator.cost.tables import Grid
from emulator.hardware import LinkSpec

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")
# NCCL's ring base latencies (µs) and the share of the bulk hop latency each protocol pays per hop
_BASE_US = {"LL": 6.6, "LL128": 14.0, "Simple": 8.4}
_HOP_SHARE = {"nvlink": {"LL": 0.6 / 3.4, "LL128": 1.9 / 3.4, "Simple": 1.0},
              "pcie": {"LL": 1.0 / 5.7, "LL128": 2.5 / 5.7, "Simple": 1.0}}
# vLLM's custom all-reduce: a kernel launch (the smallest all-reduce the H100/H200 tables time under
# CUDA graphs takes 4.4 µs on two GPUs, of which two barriers over NVLink are ~1 µs) ...
_CUSTOM_AR_LAUNCH_US = 3.4
# ... its default size limit, lowered per GPU generation and count (all_reduce_utils.py)
_CUSTOM_AR_MAX_BYTES = 8 << 20
_CUSTOM_AR_CAPS = {"sm90": {2: 64 << 20, 4: 32 << 20, 6: 512 << 10, 8: 256 << 10},
                   "sm100": {2: 2 << 20, 4: 2 << 20, 6: 1 << 20, 8: 1 << 20}}
_CUSTOM_AR_WORLD_SIZES = (2, 4, 6, 8)
# one-shot below these sizes (custom_all_reduce.cuh: always for two GPUs)
_ONE_SHOT_BYTES = {4: 512 << 10, 6: 256 << 10, 8: 256 << 10}


class Collectives:
    """Microseconds of the collectives of one link, by kind, message bytes and GPUs."""

    def __init__(self, link: LinkSpec, arch: str = "", grids: dict[str, Grid] | None = None) -> None:
        self.link = link
        self.arch = arch
        self._grids = {k: g for k, g in (grids or {}).items() if k in KINDS}
        self._tables: dict[str, GridTable] = {}

    # -- the pricer interface (shared with TablePricer and Roofline) ------------------------------
    def collective(self, kind: str, num_bytes, gpus: int) -> Priced:
        """Times of one collective over an array of message sizes (the whole message: all ranks' data
        for an all-gather or reduce-scatter) among `gpus` GPUs."""
        num_bytes = np.asarray(num_bytes, dtype=np.float64)
        if gpus <= 1:
            return Priced(np.zeros(num_bytes.shape), np.zeros(num_bytes.shape, bool), "none", "interpolated")
        grid = self._grids.get(kind)
        if grid is not None:
            table = self._tables.get(kind)
            if table is None:
                table = self._tables[kind] = GridTable(list(grid.axes.values()), grid.values, grid.measured,
                                                       proportional=(False, True))
            us, extrapolated = table(gpus, num_bytes)
            return Priced(us, extrapolated | (gpus > grid.axes["gpus"].max()), grid.source or kind, "interpolated")
        us = self.modelled_us(kind, num_bytes, gpus)
        return Priced(us, np.zeros(us.shape, bool), f"{self.link.name} link model", "modelled")

    def seconds(self, kind: str, num_bytes: float, gpus: int) -> float:
        """One collective, scalar (a step's exchange)."""
        return float(self.collective(kind, np.array([num_bytes]), gpus).us[0]) * 1e-6

    # -- the model ---------------------------------------------------------------------------------
    def modelled_us(self, kind: str, num_bytes: np.ndarray, gpus: int) -> np.ndarray:
        nccl = self.nccl_us(kind, num_bytes, gpus)
        if kind == "all_reduce" and self.uses_custom_all_reduce(gpus):
            limit = self.custom_all_reduce_limit(gpus)
            return np.where(num_bytes < limit, self.custom_all_reduce_us(num_bytes, gpus), nccl)
        return nccl

    def uses_custom_all_reduce(self, gpus: int) -> bool:
        """vLLM's rule: peer access, a supported GPU count, and two GPUs or an NVLink mesh over all."""
        link = self.link
        return (link.p2p and gpus in _CUSTOM_AR_WORLD_SIZES
                and (gpus == 2 or (link.kind in ("nvlink", "xgmi") and gpus <= link.mesh)))

    def custom_all_reduce_limit(self, gpus: int) -> float:
        caps = _CUSTOM_AR_CAPS.get("sm100" if self.arch.startswith("sm10") else self.arch, {})
        return float(min(_CUSTOM_AR_MAX_BYTES, caps.get(gpus, _CUSTOM_AR_MAX_BYTES)))

    def custom_all_reduce_us(self, num_bytes: np.ndarray, gpus: int) -> np.ndarray:
        link = self.link
        barrier = _HOP_SHARE.get(link.kind, _HOP_SHARE["pcie"])["LL"] * link.latency * 1e6
        one_shot = (num_bytes < _ONE_SHOT_BYTES.get(gpus, 0)) | (gpus == 2)
        traffic = np.where(one_shot, (gpus - 1) * num_bytes, 2.0 * (gpus - 1) / gpus * num_bytes)
        return _CUSTOM_AR_LAUNCH_US + 2.0 * barrier + traffic / link.bus_bandwidth * 1e6

    def nccl_us(self, kind: str, num_bytes: np.ndarray, gpus: int) -> np.ndarray:
        link = self.link
        share = _HOP_SHARE["nvlink" if link.kind in ("nvlink", "xgmi") else "pcie"]
        if kind == "all_reduce":
            hops, traffic, ll_share = 2 * (gpus - 1), 2.0 * (gpus - 1) / gpus * num_bytes, 0.25
        elif kind in ("all_gather", "reduce_scatter"):
            hops, traffic, ll_share = gpus - 1, (gpus - 1) / gpus * num_bytes, 1.0 / 3.0
        elif kind == "all_to_all":
            hops, traffic, ll_share = 1, (gpus - 1) / gpus * num_bytes, 1.0 / 3.0
        elif kind == "send_recv":
            hops, traffic, ll_share = 1, num_bytes, 1.0 / 3.0
        else:
            raise ValueError(f"unknown collective {kind!r}")
        bandwidths = {"LL": ll_share, "LL128": 120.0 / 128.0, "Simple": 1.0}
        protocols = ("LL", "LL128", "Simple") if link.kind == "nvlink" else ("LL", "Simple")
        hop_us = link.latency * 1e6
        return np.min([_BASE_US[p] + hops * share[p] * hop_us + traffic / (link.bus_bandwidth * bandwidths[p]) * 1e6
                       for p in protocols], axis=0)

    def describe(self) -> str:
        link = self.link
        measured = ", ".join(sorted(self._grids)) or "none"
        return (f"{link.name} ({link.kind}{'' if link.p2p else ', no P2P'}, bus {link.bus_bandwidth / 1e9:.0f} GB/s, "
                f"hop {link.latency * 1e6:.1f} µs); measured: {measured}")
