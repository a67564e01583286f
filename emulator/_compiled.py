"""The simulation core's optional compiled build: its hot modules as Cython extensions, used only where built
from the very source on disk.

`python -m vllm_emulator.compile_core` (run by `make setup` where Cython and a C compiler are at hand) compiles
the modules of `MODULES`, unchanged (no type declarations: the same Python semantics, ~15 % less interpreter
overhead on a replay), into build/compiled/<interpreter>/ of the source checkout (one with pyproject.toml: an
installed wheel has no build), with a manifest of each module's source (size and CRC-32). `install()`, called when
the package is imported, puts a finder first on sys.meta_path that loads a module's compiled form only while its
source is byte for byte the one it was built from; an edited, checked-out or missing source, or an extension that
will not load (built on another machine), falls back to the source, module by module, as if nothing were built.
VLLM_EMULATOR_PURE_PYTHON=1 turns the compiled build off.

(Import machinery, not simulation: besides its data files, these are the only files the core package reads.)
"""
from __future__ import annotations

import json
import os
import sys
import zlib
from importlib.machinery import EXTENSION_SUFFIXES, ExtensionFileLoader, ModuleSpec, SourceFileLoader
from pathlib import Path

# The replay loop's modules: scheduling, KV cache, decode runs, pricing, listeners. Not those that only run at
# set-up (memory planning, table fitting), nor those that find data files by their own path (hardware, models).
MODULES = tuple(f"emulator.{name}" for name in (
    "batch", "block_hash", "decode_run", "disaggregation", "dp_balancer", "engine", "engine_loop", "instance",
    "kv_cache", "kv_connectors", "kv_stats", "kv_tiers", "kv_transfer", "lora", "node_power", "power",
    "request", "routing", "scheduler", "simulation", "sliding_window", "stats", "step_log",
    "cost.base", "cost.collectives", "cost.interpolate", "cost.operators", "cost.operators_decode", "cost.profiled",
    "cost.profiled_decode", "cost.roofline"))

SOURCE_ROOT = Path(__file__).resolve().parent.parent  # the folder that holds the `emulator` package
BUILD_DIR = SOURCE_ROOT / "build" / "compiled" / sys.implementation.cache_tag  # one build per interpreter
MANIFEST = "manifest.json"
DISABLE_ENV = "VLLM_EMULATOR_PURE_PYTHON"


def fingerprint(data: bytes) -> dict[str, int]:
    """What the manifest keeps of a module's source to know it again."""
    return {"size": len(data), "crc32": zlib.crc32(data)}


def source_path(module: str, root: Path = SOURCE_ROOT) -> Path:
    return root.joinpath(*module.split(".")).with_suffix(".py")


def built_from(entry: dict, source: Path) -> bool:
    """Whether a manifest entry was built from the source as it is now."""
    try:
        data = source.read_bytes()
    except OSError:
        return False
    return fingerprint(data) == {"size": entry["size"], "crc32": entry["crc32"]}


class CompiledFinder:
    """A meta path finder for the compiled modules of a manifest, each only while its source is unchanged."""

    def __init__(self, build_dir: Path, modules: dict[str, dict], root: Path = SOURCE_ROOT) -> None:
        self.build_dir, self.modules, self.root = build_dir, modules, root
        self.loaded: list[str] = []  # the modules it has loaded compiled, in import order

    def find_spec(self, name: str, path=None, target=None) -> ModuleSpec | None:
        entry = self.modules.get(name)
        if entry is None:
            return None
        compiled, source = self.build_dir / entry["file"], source_path(name, self.root)
        if not built_from(entry, source) or not compiled.is_file():
            return None  # edited since the build, or the build is gone: the source, as usual
        return ModuleSpec(name, _CompiledLoader(name, str(compiled), source, self), origin=str(compiled))


class _CompiledLoader(ExtensionFileLoader):
    """Loads the extension, or, where it will not load here, runs the module's source instead."""

    def __init__(self, name: str, path: str, source: Path, finder: CompiledFinder) -> None:
        super().__init__(name, path)
        self.source, self.finder, self.fallback = source, finder, None

    def create_module(self, spec):
        try:
            module = super().create_module(spec)
        except (ImportError, OSError):  # e.g. a build carried to a machine with another C library
            self.fallback = SourceFileLoader(self.name, str(self.source))
            return None  # a plain module, which exec_module fills from the source
        self.finder.loaded.append(self.name)
        return module

    def exec_module(self, module) -> None:
        if self.fallback is None:
            return super().exec_module(module)
        module.__file__ = str(self.source)
        module.__spec__.origin = str(self.source)
        self.fallback.exec_module(module)


def read_manifest(build_dir: Path) -> dict[str, dict]:
    """The manifest's modules built for this interpreter (none if there is no build, or one for another)."""
    try:
        manifest = json.loads((build_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    if manifest.get("extension_suffix") != EXTENSION_SUFFIXES[0]:
        return {}  # built by another Python: its extensions would not load here
    return manifest.get("modules", {})


def install(build_dir: Path = BUILD_DIR) -> CompiledFinder | None:
    """Put the finder first on sys.meta_path (once), unless turned off or nothing is built."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return None
    if not (SOURCE_ROOT / "pyproject.toml").is_file():
        return None  # an installed package, not a source checkout: nothing is built beside it
    for finder in sys.meta_path:
        if isinstance(finder, CompiledFinder):
            return finder
    modules = read_manifest(build_dir)
    if not modules:
        return None
    finder = CompiledFinder(build_dir, modules)
    sys.meta_path.insert(0, finder)
    return finder


def loaded() -> list[str]:
    """The core's modules running compiled in this process."""
    return next((list(f.loaded) for f in sys.meta_path if isinstance(f, CompiledFinder)), [])
