"""How `vllm serve` reads its command line before argparse sees it, so that vLLM's command lines work here.

vLLM's FlexibleArgumentParser (vllm/utils/argparse_utils.py, 0.33) rewrites argv first:

- `--model NAME` (warned of) becomes the positional model, so `serve A --model B` is refused as vLLM
  refuses it ("unrecognized arguments: A"); a `model:` from a config file stays `--model`, which the
  positional model overrides (vllm/entrypoints/cli/serve.py);
- `--config FILE.yaml`: the file's keys become flags placed before the rest of the command line
  (so the command line wins): `key: value` -> `--key value`; `true` -> `--key`, `false` -> `--no-key`
  where that flag exists; a list -> `--key item ...`; a mapping -> `--key '<its JSON>'`;
- `--max_num_seqs 8`: underscores in a flag's name are dashes;
- `-O3`, `-O=3`, `-O 3`: `--optimization-level 3`;
- `--kv-transfer-config.kv_connector NixlConnector` (and `=value`): dotted keys build the JSON of the
  flag, merged over every dotted use of it (`key+ a,b` appends to a list); a value is JSON if it
  parses, else a human-readable integer (`80g`, `1K`), else the string. Keys given twice are warned of.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
from collections import defaultdict
from pathlib import Path

import yaml

from emulator.engine_flags import human_readable_int  # vLLM's reading of 1k / 1K

log = logging.getLogger("vllm_emulator.serve")
_NAME = re.compile(r"(?<=--)[^.=]*")  # a flag's name: from the dashes to the first dot or equals sign


def config_file_args(path: str, known_flags: set[str]) -> list[str]:
    """The flags a `--config` YAML file stands for (ValueError: not a readable YAML mapping)."""
    if Path(path).suffix not in (".yaml", ".yml"):
        raise ValueError(f"Config file must be of a yaml/yml type. {Path(path).suffix.lstrip('.')} supplied")
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"Unable to read the config file at {path}: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"the config file {path} must hold a mapping of flag names to values")
    args: list[str] = []
    for key, value in config.items():
        if isinstance(value, bool):
            if value:
                args.append(f"--{key}")
            elif f"--no-{key}" in known_flags:
                args.append(f"--no-{key}")
        elif isinstance(value, list):
            if value:
                args += [f"--{key}", *map(str, value)]
        elif isinstance(value, dict):
            args += [f"--{key}", json.dumps(value)]
        else:
            args += [f"--{key}", str(value)]
    return args


def normalize_argv(argv: list[str], known_flags: set[str]) -> list[str]:
    """argv (after the sub-command) as vLLM's parser rewrites it; `known_flags`: the parser's option strings."""
    argv = _model_first(argv)
    if "--config" in argv:
        if argv.count("--config") > 1:
            raise ValueError("More than one config file specified!")
        at = argv.index("--config")
        if at == len(argv) - 1:
            raise ValueError("No config file specified! Please check your command-line arguments.")
        from_file = config_file_args(argv[at + 1], known_flags)
        model_first = bool(argv) and not argv[0].startswith("-")  # a positional model stays first
        head = argv[:1] if model_first else []
        argv = head + from_file + argv[len(head):at] + argv[at + 2:]
    spelled: list[str] = []
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            spelled.append(_NAME.sub(lambda m: m.group(0).replace("_", "-"), arg, count=1))
        elif arg.startswith("-O") and arg != "-O":
            spelled += ["--optimization-level", arg[3:] if arg[2:3] == "=" else arg[2:]]
        elif arg == "-O" and i + 1 < len(argv) and argv[i + 1] in ("0", "1", "2", "3"):
            spelled.append("--optimization-level")
        else:
            spelled.append(arg)
    return _merge_dotted(spelled)


def _model_first(argv: list[str]) -> list[str]:
    """`--model NAME` (or `--model=NAME`) moved to the front as the positional model, as vLLM moves it."""
    at = next((i for i, arg in enumerate(argv) if re.match(r"--model(=.+|$)", arg)), None)
    if at is None:
        return argv
    log.warning("With `vllm serve`, you should provide the model as a positional argument or in a config file "
                "instead of via the `--model` option. The `--model` option will be removed in a future version.")
    if argv[at] != "--model":
        return [argv[at].removeprefix("--model="), *argv[:at], *argv[at + 1:]]
    if at + 1 == len(argv):
        raise ValueError("argument --model: expected one argument")
    return [argv[at + 1], *argv[:at], *argv[at + 2:]]


def _merge_dotted(argv: list[str]) -> list[str]:
    kept: list[str] = []
    merged: defaultdict[str, dict] = defaultdict(dict)
    duplicates: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if not (arg.startswith("-") and "." in name) or (arg[1:2].isdigit()):  # not a dotted flag (or a number)
            kept.append(arg)
            i += 1
            continue
        if not eq:
            if i + 1 >= len(argv):
                raise ValueError(f"{arg} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        if name.endswith("+"):
            name, parsed = name[:-1], value.split(",")
        else:
            parsed = _value(value)
        flag, *keys = name.split(".")
        nested: object = parsed
        for key in reversed(keys):
            nested = {key: nested}
        duplicates += [f"{flag}.{d}" for d in _update(merged[flag], nested)]
    if duplicates:
        log.warning("Found duplicate keys %s", ", ".join(duplicates))
    for flag, value in merged.items():
        kept += [flag, json.dumps(value)]
    return kept


def _value(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        try:
            return human_readable_int(text)
        except (ValueError, argparse.ArgumentTypeError):
            return text


def _update(original: dict, update: dict) -> list[str]:
    """Merge `update` into `original` (lists extend); the keys overwritten."""
    overwritten = []
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(original.get(key), dict):
            overwritten += [f"{key}.{d}" for d in _update(original[key], value)]
        elif isinstance(value, list) and isinstance(original.get(key), list):
            original[key] += value
        else:
            if key in original:
                overwritten.append(key)
            original[key] = value
    return overwritten
