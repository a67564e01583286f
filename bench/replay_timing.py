"""Whole-process wall time of `vllm-emulator replay`, as bench/replay_speed.py and bench/cluster_speed.py
measure it, optionally beside a baseline checkout of another commit.

Each run is a fresh interpreter (start-up included). Python's bytecode cache is used as an installed
package uses it: PYTHONDONTWRITEBYTECODE (set in some CI and agent shells) is dropped for the measured
process, since recompiling every module on each run costs 0.1-0.2 s that no user pays, and each tree's
first run of a case fills the cache and is not counted. With a baseline (a checkout of another commit:
`git worktree add /tmp/base COMMIT`), the two trees run interleaved, run by run, so that whatever else
loads the machine falls on both alike; the ratio of their medians is the result to trust on a shared
machine, the absolute medians only with the load average printed beside them. Each run's CPU time (user + system, the
process and its children) is reported beside its wall time: on a machine that other jobs share it moves much
less than the wall time does.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from emulator import _compiled

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Timings:
    """The runs of one case on one tree."""
    walls: list[float] = field(default_factory=list)  # whole process, seconds
    loops: list[float] = field(default_factory=list)  # the simulation loop alone (summary's wall_seconds)
    cpus: list[float] = field(default_factory=list)   # whole process, CPU seconds (user + system)
    summary: dict = field(default_factory=dict)       # of the last run

    @property
    def median(self) -> float:
        return statistics.median(self.walls)

    def describe(self) -> str:
        return (f"median {self.median:.2f} s (min {min(self.walls):.2f}, max {max(self.walls):.2f}, "
                f"n={len(self.walls)}; simulation loop {statistics.median(self.loops):.2f} s; "
                f"CPU {statistics.median(self.cpus):.2f} s)")


def child_cpu_seconds() -> float:
    """User + system CPU seconds of this process's waited-for children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def replay_once(tree: Path, args: list[str]) -> tuple[float, float, dict]:
    """Wall and CPU seconds of one `vllm-emulator replay ARGS` process run from `tree`, and its summary.json."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(tree)
    with tempfile.TemporaryDirectory() as out:
        cpu, start = child_cpu_seconds(), time.perf_counter()
        subprocess.run([sys.executable, "-m", "vllm_emulator", "replay", *args, "-o", out], cwd=tree, env=env,
                       check=True, capture_output=True)
        wall, cpu = time.perf_counter() - start, child_cpu_seconds() - cpu
        return wall, cpu, json.loads((Path(out) / "summary.json").read_text())


def measure(args: list[str], repeat: int, trees: list[Path]) -> list[Timings]:
    """`repeat` counted runs of one case on each tree, interleaved, after one uncounted run each."""
    for tree in trees:
        replay_once(tree, args)
    timings = [Timings() for _ in trees]
    for _ in range(repeat):
        for tree, t in zip(trees, timings):
            wall, cpu, t.summary = replay_once(tree, args)
            t.walls.append(wall)
            t.cpus.append(cpu)
            t.loops.append(t.summary["wall_seconds"])
    return timings


def core(tree: Path) -> str:
    """How a tree's simulation core runs: compiled (how many of its modules are built from the sources there,
    emulator/_compiled.py) or as plain Python."""
    if os.environ.get(_compiled.DISABLE_ENV, "") not in ("", "0"):
        return f"plain Python ({_compiled.DISABLE_ENV} is set)"
    if not (tree / "emulator" / "_compiled.py").is_file():
        return "plain Python (no compiled core at that commit)"
    modules = _compiled.read_manifest(tree / _compiled.BUILD_DIR.relative_to(_compiled.SOURCE_ROOT))
    fresh = sum(1 for name, entry in modules.items() if _compiled.built_from(entry, _compiled.source_path(name, tree)))
    return f"compiled core, {fresh} of {len(modules)} modules built from these sources" if fresh else "plain Python"


def load_average() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} CPUs"


def report(name: str, timings: list[Timings], floor: float | None) -> str:
    """One case's line(s): this tree's median against its floor, and against the baseline if there is one."""
    mine, s = timings[0], timings[0].summary
    verdict = "" if floor is None else f"; floor {floor:g} s: {'met' if mine.median <= floor else 'NOT met'}"
    lines = [f"{name}: {s['num_requests']} requests, {s['num_steps']} engine steps, {s['duration']:.0f} s virtual; "
             f"whole process {mine.describe()}{verdict}"]
    if len(timings) > 1:
        base = timings[1]
        cpu = statistics.median(mine.cpus) / statistics.median(base.cpus)
        lines.append(f"  baseline {base.describe()}; ratio of medians {mine.median / base.median:.2f} (CPU {cpu:.2f})")
    return "\n".join(lines)
