"""Learn the roofline's efficiency curves from the measured operator tables of profiled devices.

Every measured cell of every table becomes a sample: its FLOPs and bytes (from
emulator.cost.work's formulas), the ideal time on that device's spec sheet,
and the measured time. Per op class and regime (compute- or memory-bound) the
efficiency ideal/measured is summarised by its median in bins of log2(ideal µs);
each device weighs the same. The floor of an op class is the median over
devices of the fastest measured kernel of that class (launch and sync latency).

    python -m profiles.roofline_fit            # rewrite profiles/data/roofline_efficiency.yaml
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import yaml

from emulator.cost.roofline import EfficiencyCurves, Roofline, op_class
from emulator.cost.tables import OperatorTables, read_yaml
from emulator.cost.work import (PRECISIONS, collective_traffic, context_attention_work, gemm_work,
                                generation_attention_work, moe_work)
from emulator.hardware import DeviceSpec, load_device
from profiles.model_profile import DATA_DIR
from profiles.operator_tables import available_operator_tables

CURVES_PATH = DATA_DIR / "roofline_efficiency.yaml"
BINS = tuple(float(x) for x in range(-4, 18))
_MOE = re.compile(r"moe/(\w+)/h(\d+)_i(\d+)_k(\d+)_e(\d+)/tp(\d+)_ep(\d+)")
_ATTN = re.compile(r"(context|generation)_attention/(\w+)/hd(\d+)/w(\d+)")


def samples(tables: OperatorTables) -> dict[str, dict[str, np.ndarray]]:
    """op class -> {kind, flops, traffic, compute_dtype, dtype, measured_us} over measured cells."""
    out: dict[str, dict[str, list]] = {}

    def add(kind, dtype, flops, traffic, us):
        cls = op_class(kind, dtype)
        compute = PRECISIONS[dtype][0] if dtype in PRECISIONS else "bf16"
        entry = out.setdefault(cls, {"kind": kind, "dtype": dtype, "compute": compute, "flops": [], "traffic": [],
                                     "us": []})
        entry["flops"].append(np.ravel(flops))
        entry["traffic"].append(np.ravel(traffic))
        entry["us"].append(np.ravel(us))

    for name, grid in tables.grids.items():
        mask = grid.measured
        cells = np.meshgrid(*grid.axes.values(), indexing="ij")
        cells = [c[mask] for c in cells]
        us = grid.values[mask]
        if name.startswith("gemm/"):
            dtype = name.split("/")[1]
            add("gemm", dtype, *gemm_work(cells[0], cells[1], cells[2], dtype), us)
        elif m := _ATTN.fullmatch(name):
            phase, kv, hd, w = m.group(1), m.group(2), int(m.group(3)), int(m.group(4))
            work = context_attention_work if phase == "context" else generation_attention_work
            add(f"{phase}_attention", "bf16", *work(cells[0], cells[1], cells[2], cells[3], hd, w, kv), us)
        elif m := _MOE.fullmatch(name):
            dtype, shape = m.group(1), [int(x) for x in m.groups()[1:]]
            add("moe", dtype, *moe_work(cells[0], *shape, dtype), us)
        elif name in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv"):
            add(name, "", np.zeros_like(us), collective_traffic(name, cells[1], cells[0]), us)
        elif name == "memory_bound":
            add("memory_bound", "", np.zeros_like(us), cells[0], us)
    return {cls: {k: (np.concatenate(v) if isinstance(v, list) else v) for k, v in e.items()} for cls, e in out.items()}


def ideal_times(device: DeviceSpec, entry: dict) -> tuple[np.ndarray, np.ndarray]:
    """(ideal µs, compute-bound?) of samples on a device's spec."""
    if entry["kind"] in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv"):
        memory = entry["traffic"] / device.interconnect.bandwidth * 1e6
        return memory, np.zeros(memory.shape, bool)
    compute = entry["flops"] / device.peak_flops(entry["compute"]) * 1e6
    memory = entry["traffic"] / device.memory_bandwidth * 1e6
    return np.maximum(compute, memory), compute >= memory


def fit(per_device: dict[str, tuple[DeviceSpec, dict]]) -> EfficiencyCurves:
    """Efficiency curves from {hardware: (spec, samples)}; every device weighs the same."""
    edges = np.array(BINS)
    collected: dict[str, dict[str, list[np.ndarray]]] = {}
    floors: dict[str, list[float]] = {}
    for device, device_samples in per_device.values():
        for cls, entry in device_samples.items():
            ideal, compute_bound = ideal_times(device, entry)
            eff = ideal / np.maximum(entry["us"], 1e-9)
            floors.setdefault(cls, []).append(float(entry["us"].min()))
            for regime, sel in (("compute", compute_bound), ("memory", ~compute_bound)):
                if sel.sum() < 5:
                    continue
                per_bin = np.full(len(edges), np.nan)
                bins = np.clip(np.rint(np.log2(np.maximum(ideal[sel], 1e-9))), edges[0], edges[-1])
                for i, edge in enumerate(edges):
                    values = eff[sel][bins == edge]
                    if len(values) >= 3:
                        per_bin[i] = np.median(values)
                collected.setdefault(cls, {}).setdefault(regime, []).append(per_bin)
    curves: dict[str, dict[str, tuple[float, ...]]] = {}
    for cls, regimes in collected.items():
        for regime, rows in regimes.items():
            stacked = np.vstack(rows)
            curve = np.full(stacked.shape[1], np.nan)
            seen = ~np.isnan(stacked).all(axis=0)
            curve[seen] = np.nanmedian(stacked[:, seen], axis=0)
            known = ~np.isnan(curve)
            if not known.any():
                continue
            curve = np.interp(edges, edges[known], curve[known])
            curves.setdefault(cls, {})[regime] = tuple(np.clip(curve, 1e-3, 1.0).tolist())
    curves["default"] = curves.get("gemm_bf16", next(iter(curves.values())))
    floor_values = {cls: float(np.median(v)) for cls, v in floors.items()}
    floor_values["default"] = float(np.median(list(floor_values.values())))
    if "memory_bound" not in curves and "gemm_bf16" in curves:
        # An elementwise kernel (norm, rope, activation) streams memory the way a one-row GEMM streams its
        # weights, and is no slower to launch than the smallest GEMM.
        curves["memory_bound"] = {"memory": curves["gemm_bf16"]["memory"]}
        floor_values["memory_bound"] = floor_values["gemm_bf16"]
    return EfficiencyCurves(BINS, curves, floor_values)


def profiled_devices(exclude: tuple[str, ...] = (), vllm_kernels_only: bool = False
                     ) -> dict[str, tuple[DeviceSpec, dict]]:
    """Devices with operator tables. `vllm_kernels_only` keeps the tables that time vLLM's own kernels
    under CUDA graphs (AIConfigurator's collectors: `vllm_versions` in their meta), the ones the curves
    are learned from. Tables timed inside one-layer Hugging Face models or Vidur's fp16 blocks run other
    kernels (eager attention, unfused norms: their elementwise ops reach under 1 % of the memory roof,
    which would price every norm of a spec-sheet device ten times too slow), so they are only held out."""
    out = {}
    for hardware, directory in available_operator_tables():
        if hardware in exclude or hardware in out:
            continue
        tables = OperatorTables.load(directory)
        if vllm_kernels_only and not tables.meta.get("vllm_versions"):
            continue
        out[hardware] = (load_device(hardware), samples(tables))
    return out


def load_curves(path: Path = CURVES_PATH) -> EfficiencyCurves:
    return EfficiencyCurves.from_dict(read_yaml(path))  # (libyaml's parser: ~20 ms less at every start-up)


def roofline_for(device: DeviceSpec, curves: EfficiencyCurves | None = None) -> Roofline:
    return Roofline(device, curves or load_curves())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=CURVES_PATH)
    args = parser.parse_args(argv)
    devices = profiled_devices(vllm_kernels_only=True)
    if not devices:
        print("no operator tables to learn from (run the importers first)", file=sys.stderr)
        return 2
    curves = fit(devices)
    header = (f"# Roofline efficiency curves learned by profiles/roofline_fit.py from the operator tables of "
              f"{', '.join(sorted(devices))}.\n# efficiency = ideal time on the spec sheet / measured time, median "
              f"per op class, regime and log2(ideal us); floors in us.\n")
    args.out.write_text(header + yaml.safe_dump(curves.to_dict(), sort_keys=False, width=200,
                                                          default_flow_style=None))
    print(f"{args.out}: curves for {', '.join(sorted(c for c in curves.curves if c != 'default'))} "
          f"from {', '.join(sorted(devices))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
