"""List the device catalogue, or show one device's spec (a YAML a user can copy and edit)."""
from __future__ import annotations

import argparse
import sys

import yaml

from emulator.hardware import UnknownHardwareError, load_device, shipped_devices


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["list", "show"])
    parser.add_argument("name", nargs="?", default="H100", help="device name, alias or YAML file (for show)")


def main(args: argparse.Namespace) -> int:
    if args.action == "list":
        for name in shipped_devices():
            d = load_device(name)
            print(f"{d.name:<11} {d.memory_gib:7.2f} GiB  {d.memory_bandwidth / 1e12:5.2f} TB/s  "
                  f"{d.peak_flops('bf16') / 1e12:7.1f} TFLOP/s bf16  {d.interconnect.name}")
        return 0
    try:
        device = load_device(args.name)
    except UnknownHardwareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(device.raw, sort_keys=False), end="")
    return 0
