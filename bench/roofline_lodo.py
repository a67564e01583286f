"""Leave-one-device-out error of the roofline on the profiled devices.

    python bench/roofline_lodo.py [--json OUT]

For each device with operator tables, the efficiency curves are learned from the
*other* devices whose tables time vLLM's own kernels (profiles.roofline_fit.profiled_devices;
the others are only held out), then the roofline prices (a) every measured cell of the
held-out device's tables and (b) whole engine steps of a few models, which are
compared with the same steps composed from the device's measured tables. This is
how far a spec-sheet-only device (B200, MI300X, a user's YAML) can be expected to
land. Printed: median and p90 |error| per op class, and per model step.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emulator.config import EngineArgs, resolve  # noqa: E402
from emulator.batch import BatchShape  # noqa: E402
from emulator.models import load_model  # noqa: E402
from emulator.cost.operators import OperatorCostModel  # noqa: E402
from emulator.cost.table_pricer import TablePricer  # noqa: E402
from emulator.cost.roofline import Roofline  # noqa: E402
from profiles.operator_tables import find_operator_tables  # noqa: E402
from profiles.roofline_fit import fit, ideal_times, profiled_devices  # noqa: E402

MODELS = [("meta-llama/Llama-3.1-8B", 1, "bfloat16"), ("meta-llama/Llama-3.1-70B", 4, "fp8"),
          ("Qwen/Qwen3-30B-A3B", 1, "bfloat16"), ("mistralai/Mixtral-8x7B-v0.1", 2, "bfloat16")]
STEPS = {"decode b1 ctx1k": [(1, 1024)], "decode b32 ctx2k": [(1, 2048)] * 32, "decode b256 ctx1k": [(1, 1024)] * 256,
         "prefill 2048": [(2048, 0)], "mixed 1024+64 decodes": [(1024, 0)] + [(1, 2048)] * 64}


def op_errors(device, samples, curves) -> dict[str, dict]:
    roof = Roofline(device, curves)
    out = {}
    for cls, entry in sorted(samples.items()):
        ideal, _ = ideal_times(device, entry)
        pred = roof.time(entry["kind"], entry["flops"], entry["traffic"], entry["compute"], entry["dtype"])
        err = np.abs(pred - entry["us"]) / entry["us"] * 100
        out[cls] = {"cells": int(len(err)), "median_abs_err_pct": float(np.median(err)),
                    "p90_abs_err_pct": float(np.percentile(err, 90))}
    return out


def step_errors(device, curves) -> dict[str, dict]:
    tables = find_operator_tables(device.name)
    out = {}
    for name, tp, dtype in MODELS:
        model = load_model(name)
        if dtype != model.weight_dtype:
            model = dataclasses.replace(model, weight_dtype=dtype)
        if "fp8" in dtype and "fp8" not in device.flops:
            continue  # the device has no FP8 GEMMs (A100)
        config = resolve(EngineArgs(tensor_parallel_size=tp, max_model_len=8192, max_num_seqs=256,
                                    max_num_batched_tokens=4096), model, device)
        roofline = Roofline(device, curves)
        measured = OperatorCostModel(model, device, config, TablePricer(tables.grids, roofline, device.name), "tables")
        predicted = OperatorCostModel(model, device, config, roofline, "roofline")
        errs = {}
        for step, chunks in STEPS.items():
            shape = BatchShape.from_chunks(chunks)
            t_meas, t_pred = measured.step_time(shape), predicted.step_time(shape)
            errs[step] = 100 * (t_pred - t_meas) / t_meas
        out[f"{name} tp{tp} {dtype}"] = errs
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    devices = profiled_devices()
    learners = profiled_devices(vllm_kernels_only=True)
    if len(learners) < 2:
        print("need vLLM-kernel operator tables of at least two devices", file=sys.stderr)
        return 2
    report = {}
    for held_out, (device, samples) in sorted(devices.items()):
        others = {h: v for h, v in learners.items() if h != held_out}
        curves = fit(others)
        ops, steps = op_errors(device, samples, curves), step_errors(device, curves)
        report[held_out] = {"learned_from": sorted(others), "ops": ops, "steps": steps}
        print(f"\n{held_out} (curves learned from {', '.join(sorted(others))})")
        for cls, e in ops.items():
            print(f"  op {cls:<22} {e['cells']:>6} cells  median |err| {e['median_abs_err_pct']:5.1f}%  "
                  f"p90 {e['p90_abs_err_pct']:6.1f}%")
        for model, errs in steps.items():
            cells = "  ".join(f"{k}: {v:+5.1f}%" for k, v in errs.items())
            print(f"  step {model:<40} {cells}")
    for group, names in (("vLLM-kernel tables, each left out in turn", sorted(learners)),
                         ("other tables (never learned from)", sorted(set(devices) - set(learners)))):
        errs = [abs(v) for h in names for m in report[h]["steps"].values() for v in m.values()]
        if errs:
            print(f"\nwhole-step |error| of the roofline vs the device's own tables, {group}: median "
                  f"{np.median(errs):.1f}%, p90 {np.percentile(errs, 90):.1f}% over {len(errs)} steps")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
