"""The `vllm-emulator` command: serve, replay, hardware."""
from __future__ import annotations

import argparse
import sys

from loadgen import replay as replay_cmd


def _hardware(args: argparse.Namespace) -> int:
    from emulator.hardware import UnknownHardwareError, load_device, shipped_devices
    if args.action == "list":
        for name in shipped_devices():
            d = load_device(name)
            print(f"{d.name:<11} {d.memory_gib:7.2f} GiB  {d.memory_bandwidth / 1e12:5.2f} TB/s  "
                  f"{d.peak_flops('bf16') / 1e12:7.1f} TFLOP/s bf16  {d.interconnect.name}")
        return 0
    try:
        d = load_device(args.name)
    except UnknownHardwareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import yaml
    print(yaml.safe_dump(d.raw, sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-emulator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    replay = sub.add_parser("replay", help="replay a request trace offline, as fast as possible",
                            description=replay_cmd.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    replay_cmd.add_arguments(replay)
    replay.set_defaults(func=replay_cmd.main)
    hardware = sub.add_parser("hardware", help="list or show the device catalogue")
    hardware.add_argument("action", choices=["list", "show"])
    hardware.add_argument("name", nargs="?", default="H100")
    hardware.set_defaults(func=_hardware)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
