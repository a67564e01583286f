"""The link model of collectives (emulator/cost/collectives.py) against the measured tables it stands in for.

    python bench/collectives_model.py [--device H200] [--device H100] ...

For every kind and GPU count a device's tables measured (AIConfigurator's, timed under vLLM: the all-reduce
the faster of vLLM's custom one and NCCL), the model's time from the device's spec-sheet link alone, at the
measured message sizes from 1 KB to 512 MB: the median and the worst ratio model/measured.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emulator.cost.collectives import KINDS, Collectives  # noqa: E402
from emulator.hardware import load_device  # noqa: E402
from profiles.collectives import collective_grids  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", action="append", default=None)
    args = parser.parse_args()
    for name in args.device or ["H200", "H100", "A100"]:
        device = load_device(name)
        grids = collective_grids(device.name)
        model = Collectives(device.interconnect, device.arch)
        measured = Collectives(device.interconnect, device.arch, grids)
        print(f"{device.name}: link {model.describe()}")
        for kind in KINDS:
            grid = grids.get(kind)
            if grid is None:
                continue
            sizes = grid.axes["bytes"][(grid.axes["bytes"] >= 1024) & (grid.axes["bytes"] <= 512 << 20)]
            for gpus in grid.axes["gpus"].astype(int):
                ratio = model.collective(kind, sizes, gpus).us / measured.collective(kind, sizes, gpus).us
                worst = ratio[np.argmax(np.abs(np.log(ratio)))]
                print(f"  {kind:<15} {gpus} GPUs: model/measured median {np.median(ratio):5.2f}, "
                      f"worst {worst:5.2f} ({len(sizes)} sizes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
