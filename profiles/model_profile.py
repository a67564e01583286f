"""Where measured model profiles are (emulator.cost.tables.ModelProfile is the format).

Directory layout: profiles/data/<hardware>/<org>--<model>/<dtype>/tp<N>/. Beside them,
`moe_routing_imbalance.yaml`: what a real router's skewed expert loads cost the fused-MoE
kernel over the balanced routing their MoE tables were measured with.
"""
from __future__ import annotations

from pathlib import Path

from functools import cache

from emulator.cost.tables import ModelProfile, RoutingImbalance

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


@cache
def moe_routing_imbalance(root: Path = DATA_DIR) -> RoutingImbalance | None:
    path = root / "moe_routing_imbalance.yaml"
    return RoutingImbalance.load(path) if path.is_file() else None
