"""The `vllm-emulator` command. Each subcommand lives in its own module, which
provides `add_arguments(parser)`, `main(args) -> int` and a docstring; it is
imported only when used, so `replay` never loads the HTTP server."""
from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys

# Commands that run the simulation: their arrays are small, and OpenBLAS's worker threads (one per core, started
# when numpy loads) would only spin. Not `profile`, whose torch may measure CPU operators with that BLAS.
SINGLE_THREADED_BLAS = ("serve", "replay")

COMMANDS = {
    "serve": ("server.serve", "serve vLLM's OpenAI-compatible API over the simulated engine"),
    "replay": ("loadgen.replay", "replay a request trace offline, as fast as the CPU allows"),
    "loadgen": ("loadgen.http_replay", "replay a trace (or a synthetic load) over HTTP against any OpenAI server"),
    "report": ("loadgen.report", "an HTML report (latency CDFs, throughput, server metrics) of one or more runs"),
    "calibrate": ("loadgen.calibrate", "fit the device's link, host and attention figures to your own vLLM runs"),
    "profile": ("profiles.profiler", "measure operator tables with torch on this machine's device"),
    "hardware": ("profiles.hardware_cmd", "list or show the device catalogue"),
}
# vLLM's words when a help search finds nothing (FlexibleArgumentParser.format_help)
NO_MATCH = ("No group or arguments matching '{}'.\nUse '--help' to see available groups or "
            "'--help=all' to see all available parameters.")


class CommandParser(argparse.ArgumentParser):
    """argparse with vLLM's help search (vllm/utils/argparse_utils.py FlexibleArgumentParser):
    `--help=all` shows every flag, also the groups a plain `--help` only names (`full_help_only`);
    `--help=<group>` one group (a title of this parser's, or of vLLM's in `vllm_groups`: ModelConfig,
    Frontend, ...); `--help=<keyword>` the flags whose names hold it."""

    help_keyword: str | None = None
    vllm_groups: dict[str, list[argparse.Action]] = {}

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        for i, arg in enumerate(args):
            if arg.startswith("--help="):
                self.help_keyword, args[i] = arg.split("=", 1)[1].lower().replace("_", "-"), "--help"
        return super().parse_known_args(args, namespace)

    def explicit_dests(self, argv: list[str]) -> set[str]:
        """The dests a command line sets itself, whatever the value (vLLM's "non-default args" line lists
        `--block-size 16`: its own default is None)."""
        saved = [(action, action.default) for action in self._actions]
        defaults = dict(self._defaults)
        try:
            for action, _ in saved:
                action.default = argparse.SUPPRESS
            self._defaults.clear()
            return set(vars(self.parse_known_args(argv)[0]))
        finally:
            for action, default in saved:
                action.default = default
            self._defaults.update(defaults)

    def format_help(self) -> str:
        keyword = self.help_keyword
        if keyword == "all":
            return self._format(self._action_groups)
        if keyword is None:
            return self._format(self._action_groups, shown_only=True)
        formatter = self._get_formatter()
        titled = {g.title.lower(): (g.title, g.description, g._group_actions) for g in self._action_groups if g.title}
        for title, actions in self.vllm_groups.items():
            titled.setdefault(title.lower(), (title, None, actions))
        if keyword in titled:
            title, description, actions = titled[keyword]
            formatter.start_section(title)
            formatter.add_text(description)
            formatter.add_arguments(actions)
            formatter.end_section()
            return formatter.format_help()
        matched = [a for g in self._action_groups for a in g._group_actions
                   if any(keyword in option.lower() for option in a.option_strings)]
        if matched:
            formatter.start_section(f"Arguments matching '{keyword}'")
            formatter.add_arguments(matched)
            formatter.end_section()
        else:
            formatter.add_text(NO_MATCH.format(keyword))
        return formatter.format_help()

    def _format(self, groups: list, shown_only: bool = False) -> str:
        formatter = self._get_formatter()
        formatter.add_usage(self.usage, self._actions, self._mutually_exclusive_groups)
        formatter.add_text(self.description)
        for group in groups:
            formatter.start_section(group.title)
            formatter.add_text(group.description)
            if not (shown_only and getattr(group, "full_help_only", False)):
                formatter.add_arguments(group._group_actions)
            formatter.end_section()
        formatter.add_text(self.epilog)
        return formatter.format_help()


def build_parser(command: str) -> argparse.ArgumentParser:
    module_name, help_text = COMMANDS[command]
    module = importlib.import_module(module_name)
    parser = CommandParser(prog=f"vllm-emulator {command}", description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    parser.set_defaults(func=module.main)
    return parser


def version() -> str:
    """The package's version, as `vllm --version` prints vLLM's (from pyproject.toml where not installed)."""
    import importlib.metadata  # here, not at the top: loading it (email, zipfile, ...) would slow every command
    import tomllib
    from pathlib import Path
    try:
        return importlib.metadata.version("vllm-emulator")
    except importlib.metadata.PackageNotFoundError:
        with open(Path(__file__).resolve().parents[1] / "pyproject.toml", "rb") as f:
            return tomllib.load(f)["project"]["version"]


def main(argv: list[str] | None = None) -> int:
    whole_process = argv is None  # the process is this command (not a test calling it among others)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-v"], ["--version"]):
        print(version())
        return 0
    if not argv or argv[0] not in COMMANDS:
        commands = "\n".join(f"  {name:<9} {text}" for name, (_, text) in COMMANDS.items())
        usage = f"usage: vllm-emulator [-h] [-v] {{{','.join(COMMANDS)}}} ...\n"
        if argv and argv[0] in ("-h", "--help"):  # help asked for goes to stdout, as argparse's
            print(f"{usage}\n{commands}\n\noptions:\n  -h, --help     show this help message and exit\n"
                  "  -v, --version  show the version and exit")
            return 0
        if not argv:
            print(f"{usage}\n{commands}", file=sys.stderr)
            return 2
        import difflib
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"{usage}vllm-emulator: error: unknown command '{argv[0]}' (choose from {', '.join(COMMANDS)}){hint}",
              file=sys.stderr)
        return 2
    if whole_process and argv[0] in SINGLE_THREADED_BLAS:  # before numpy loads; a user's own setting stands
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    if whole_process:  # importing the command's modules makes only objects that live as long as the process:
        gc.disable()   # the collector's passes over them while importing find nothing (~5 ms of a replay's start)
    try:
        parser, rest = build_parser(argv[0]), argv[1:]
    finally:
        if whole_process:
            gc.freeze()  # ... and later passes (a long run makes many) need not walk them again
            gc.enable()
    normalize = getattr(importlib.import_module(COMMANDS[argv[0]][0]), "normalize_argv", None)
    if normalize is not None:  # a command that reads its command line as vLLM's does (serve)
        try:
            rest = normalize(rest, parser)
        except ValueError as exc:
            parser.error(str(exc))
    args = parser.parse_args(rest)
    if hasattr(importlib.import_module(COMMANDS[argv[0]][0]), "non_default_args"):  # serve's vLLM line of them
        args.explicit_dests = parser.explicit_dests(rest)  # which flags it set, whatever their values
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
