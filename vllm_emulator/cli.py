"""The `vllm-emulator` command. Each subcommand lives in its own module, which
provides `add_arguments(parser)`, `main(args) -> int` and a docstring; it is
imported only when used, so `replay` never loads the HTTP server."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "serve": ("server.serve", "serve vLLM's OpenAI-compatible API over the simulated engine"),
    "replay": ("loadgen.replay", "replay a request trace offline, as fast as the CPU allows"),
    "loadgen": ("loadgen.http_replay", "replay a trace (or a synthetic load) over HTTP against any OpenAI server"),
    "report": ("loadgen.report", "an HTML report (latency CDFs, throughput, server metrics) of one or more runs"),
    "calibrate": ("loadgen.calibrate", "fit the device's link, host and attention figures to your own vLLM runs"),
    "profile": ("profiles.profiler", "measure operator tables with torch on this machine's device"),
    "hardware": ("profiles.hardware_cmd", "list or show the device catalogue"),
}


def build_parser(command: str) -> argparse.ArgumentParser:
    module_name, help_text = COMMANDS[command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"vllm-emulator {command}", description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    parser.set_defaults(func=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        usage = "\n".join(f"  {name:<9} {text}" for name, (_, text) in COMMANDS.items())
        asked = bool(argv) and argv[0] in ("-h", "--help")  # help asked for goes to stdout, as argparse's
        print(f"usage: vllm-emulator {{{','.join(COMMANDS)}}} ...\n\n{usage}", file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    parser, rest = build_parser(argv[0]), argv[1:]
    normalize = getattr(importlib.import_module(COMMANDS[argv[0]][0]), "normalize_argv", None)
    if normalize is not None:  # a command that reads its command line as vLLM's does (serve)
        try:
            rest = normalize(rest, parser)
        except ValueError as exc:
            parser.error(str(exc))
    args = parser.parse_args(rest)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
