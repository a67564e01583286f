"""List the device catalogue, or show one device's spec (a YAML a user can copy and edit).

A user's own devices live in $VLLM_EMULATOR_HOME/hardware/*.yaml (default
~/.vllm-emulator/hardware/) and are listed with the shipped ones. `list` says how
each device is priced: measured operator tables, or the roofline over its spec.
"""
from __future__ import annotations

import argparse
import sys

import yaml

from emulator.hardware import UnknownHardwareError, load_device, shipped_devices
from profiles.operator_tables import available_operator_tables


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["list", "show"])
    parser.add_argument("name", nargs="?", default="H100", help="device name, alias or YAML file (for show)")


def main(args: argparse.Namespace) -> int:
    if args.action == "list":
        profiled = {hardware for hardware, _ in available_operator_tables()}
        try:
            names = shipped_devices()
            for name in names:
                d = load_device(name)
                priced = "operator tables" if d.name in profiled else "roofline"
                print(f"{d.name:<11} {d.memory_gib:7.2f} GiB  {d.memory_bandwidth / 1e12:5.2f} TB/s  "
                      f"{d.peak_flops('bf16') / 1e12:7.1f} TFLOP/s bf16  {d.interconnect.name:<14} {priced}")
        except UnknownHardwareError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        device = load_device(args.name)
    except UnknownHardwareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(device.raw, sort_keys=False), end="")
    return 0
