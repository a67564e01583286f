"""List the device catalogue (`list [NAME]`: one device's row), or show one device's spec (`show NAME`: a YAML a user
can copy and edit).

A user's own devices live in $VLLM_EMULATOR_HOME/hardware/*.yaml (default
~/.vllm-emulator/hardware/) and are listed with the shipped ones. `list` says how a step is
priced on each: from profiles measured for a model on that device (when one matches the
deployment), else from the device's measured operator tables, else from the roofline over its
spec sheet (`--cost-model` forces one).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import yaml

from emulator.hardware import UnknownHardwareError, load_device, shipped_devices
from profiles.model_profile import available_profiles
from profiles.operator_tables import available_operator_tables

HEADER = ("DEVICE", "MEMORY", "BANDWIDTH", "BF16 DENSE", "INTERCONNECT", "STEPS PRICED FROM")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["list", "show"])
    parser.add_argument("name", nargs="?", default=None,
                        help="device name, alias or YAML file (show: the one to show; list: only its row)")


def pricing(device: str, operator_tables: set[str], profiles: dict[str, list[str]]) -> str:
    """How a step is priced on `device`, in the order the cost model picks a source."""
    general = "operator tables" if device in operator_tables else "roofline"
    if device not in profiles:
        return general
    return f"model profiles ({', '.join(profiles[device])}), else {general}"


def device_table(only: str | None = None) -> str:
    """The catalogue's table; `only`: just the row of that device (a name, alias or YAML file)."""
    operator_tables = {hardware for hardware, _ in available_operator_tables()}
    tps: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for hardware, model, dtype, tp in available_profiles():
        tps[hardware, model.split("/")[-1], dtype].append(str(tp))
    profiles: dict[str, list[str]] = defaultdict(list)
    for (hardware, model, dtype), sizes in tps.items():
        profiles[hardware].append(f"{model} {dtype} tp{','.join(sizes)}")
    rows = [HEADER]
    for d in [load_device(only)] if only else map(load_device, shipped_devices()):
        rows.append((d.name, f"{d.memory_gib:.2f} GiB", f"{d.memory_bandwidth / 1e12:.2f} TB/s",
                     f"{d.peak_flops('bf16') / 1e12:.1f} TFLOP/s", d.interconnect.name,
                     pricing(d.name, operator_tables, profiles)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER) - 1)]
    right = {1, 2, 3}  # numbers align right
    lines = []
    for row in rows:
        cells = [cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells + [row[-1]]))
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    if args.action == "show" and args.name is None:
        print("error: hardware show needs a device: a name or alias (`vllm-emulator hardware list`) or a YAML file",
              file=sys.stderr)
        return 2
    try:
        text = device_table(args.name) if args.action == "list" else \
            yaml.safe_dump(load_device(args.name).raw, sort_keys=False)
    except UnknownHardwareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `hardware list | head`: the reader had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit is quiet too
    return 0
