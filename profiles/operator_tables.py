"""Where a device's operator tables are (emulator.cost.tables.OperatorTables is the format).

A directory `<root>/<hardware>/operators/`. Roots searched, first hit wins:
$VLLM_EMULATOR_HOME/profiles (default ~/.vllm-emulator/profiles: where `vllm-emulator
profile` writes), then the tables shipped in this package.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

from emulator.cost.tables import OperatorTables
from profiles.model_profile import DATA_DIR


def user_home() -> Path:
    return Path(os.environ.get("VLLM_EMULATOR_HOME", "~/.vllm-emulator")).expanduser()


def search_roots() -> list[Path]:
    return [user_home() / "profiles", DATA_DIR]


def operator_dir(hardware: str, root: Path = DATA_DIR) -> Path:
    return root / hardware / "operators"


def available_operator_tables() -> list[tuple[str, Path]]:
    found = []
    for root in search_roots():
        found.extend((p.parent.parent.name, p.parent) for p in sorted(root.glob("*/operators/meta.yaml")))
    return found


def find_operator_tables(hardware: str) -> OperatorTables | None:
    """The device's tables, read once per process while their files are unchanged: the instances of a
    cluster on one device type share them (read-only), each read costing ~0.3 s."""
    for root in search_roots():
        directory = operator_dir(hardware, root)
        meta = directory / "meta.yaml"
        if meta.is_file():
            return _load(directory, meta.stat().st_mtime_ns, (directory / "tables.npz").stat().st_mtime_ns)
    return None


@functools.lru_cache(maxsize=16)
def _load(directory: Path, *_file_versions: int) -> OperatorTables:
    return OperatorTables.load(directory)
