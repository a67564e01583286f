"""Where measured model profiles are (emulator.cost.tables.ModelProfile is the format).

Directory layout: profiles/data/<hardware>/<org>--<model>/<dtype>/tp<N>/.
"""
from __future__ import annotations

from pathlib import Path

from emulator.cost.tables import ModelProfile

DATA_DIR = Path(__file__).resolve().parent / "data"


def profile_dir(hardware: str, model: str, dtype: str, tp: int, root: Path = DATA_DIR) -> Path:
    return root / hardware / model.replace("/", "--") / dtype / f"tp{tp}"


def available_profiles(root: Path = DATA_DIR) -> list[tuple[str, str, str, int]]:
    """(hardware, model, dtype, tp) of every shipped model profile."""
    found = []
    for meta in sorted(root.glob("*/*/*/tp*/meta.yaml")):
        tp_dir = meta.parent
        found.append((tp_dir.parents[2].name, tp_dir.parents[1].name.replace("--", "/"),
                      tp_dir.parent.name, int(tp_dir.name[2:])))
    return found


def find_profile(hardware: str, model: str, dtype: str = "bf16", tp: int = 1,
                 root: Path = DATA_DIR) -> ModelProfile | None:
    directory = profile_dir(hardware, model, dtype, tp, root)
    if (directory / "meta.yaml").is_file():
        return ModelProfile.load(directory)
    return None
