"""The layers point down: an import against the arrows fails the default test run.

The contracts live in pyproject.toml ([tool.importlinter]); import-linter checks them
statically, function-level imports included."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("emulator", "profiles", "server", "loadgen", "vllm_emulator")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())"],
                          cwd=root, capture_output=True, text=True, timeout=120)


def test_the_layer_contracts_are_kept():
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def _sources_only(directory: str, names: list[str]) -> list[str]:
    """copytree's ignore: skip data and caches, keep Python files and packages."""
    return [n for n in names
            if n in ("data", "__pycache__") or not (n.endswith(".py") or (Path(directory) / n).is_dir())]


def _copy_sources(dest: Path) -> None:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, dest / package, ignore=_sources_only)
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")


def test_an_upward_import_breaks_the_contract(tmp_path):
    _copy_sources(tmp_path)
    batch = tmp_path / "emulator" / "batch.py"
    batch.write_text(batch.read_text() + "\n\ndef _upward():\n    from server import metrics  # noqa: F401\n")
    done = lint_imports(tmp_path)
    assert done.returncode == 1
    assert "emulator.batch -> server.metrics" in done.stdout


def test_drivers_are_peers(tmp_path):
    _copy_sources(tmp_path)
    traces = tmp_path / "loadgen" / "traces.py"
    traces.write_text(traces.read_text() + "\n\nimport server.errors  # noqa: E402,F401\n")
    done = lint_imports(tmp_path)
    assert done.returncode == 1
    assert "loadgen.traces -> server.errors" in done.stdout


def test_the_core_runs_no_event_loop(tmp_path):
    _copy_sources(tmp_path)
    simulation = tmp_path / "emulator" / "simulation.py"
    simulation.write_text(simulation.read_text() + "\n\nimport asyncio  # noqa: E402,F401\n")
    done = lint_imports(tmp_path)
    assert done.returncode == 1
    assert "emulator.simulation -> asyncio" in done.stdout
