"""Compile the simulation core's hot modules with Cython (emulator/_compiled.py says what and why).

    python -m vllm_emulator.compile_core [--jobs N] [--all]

`make setup` runs it, and `make compiled` after an edit. It compiles the modules whose source differs from what
the build holds (`--all`: every one). It never fails the set-up: without Cython, a C compiler or Python's headers
it says so in one line, and the core runs as plain Python (but for modules a previous build still matches). The
extensions go to build/compiled/ (the sources stay untouched), each replaced whole, with a manifest naming each
module's source, so an edited module is never shadowed by a stale build.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

try:
    import fcntl
except ImportError:  # (Windows: builds are not serialized)
    fcntl = None

from emulator._compiled import BUILD_DIR, MANIFEST, MODULES, SOURCE_ROOT, built_from, fingerprint, read_manifest, \
    source_path


# How every module is compiled: a build made otherwise (other settings, another Cython) is made again whole.
DIRECTIVES = {"language_level": 3, "annotation_typing": False, "binding": True}  # Python's semantics: no C types
FLAGS = ["-g0"]


def build_key(cython_version: str) -> str:
    return f"Cython {cython_version}; {json.dumps(DIRECTIVES, sort_keys=True)}; {' '.join(FLAGS)}"


def up_to_date(manifest: dict[str, dict]) -> dict[str, dict]:
    """The entries of MODULES the build holds for their sources as they are now."""
    return {module: entry for module, entry in manifest.items() if module in MODULES
            and built_from(entry, source_path(module)) and (BUILD_DIR / entry["file"]).is_file()}


def cython_version() -> str | None:
    try:
        from Cython import __version__
    except ImportError:
        return None
    return __version__


def read_build_key() -> str | None:
    try:
        return json.loads((BUILD_DIR / MANIFEST).read_text()).get("build")
    except (OSError, ValueError):
        return None


def compile_modules(modules: list[str], jobs: int) -> dict[str, dict]:
    """Compile `modules` and move each extension into the build; return their manifest entries."""
    from Cython.Build import cythonize  # the `compiled` extra; absent: ImportError, reported by main
    from setuptools import Distribution, Extension

    sources = {module: source_path(module).read_bytes() for module in modules}
    work = Path(tempfile.mkdtemp(prefix="compile_core-"))
    try:
        extensions = [Extension(module, [str(source_path(module))], extra_compile_args=FLAGS) for module in modules]
        extensions = cythonize(extensions, build_dir=str(work / "c"), nthreads=jobs, quiet=True,
                               compiler_directives=DIRECTIVES)
        dist = Distribution({"ext_modules": extensions, "script_args": ["-q", "build_ext"]})
        dist.parse_command_line()
        command = dist.get_command_obj("build_ext")
        command.build_lib, command.build_temp, command.parallel = str(work / "lib"), str(work / "tmp"), jobs
        dist.run_commands()
        entries = {}
        for module in modules:
            if source_path(module).read_bytes() != sources[module]:
                continue  # edited while it compiled: it runs as source (the build may hold either text)
            file = Path(*module.split(".")).with_suffix(EXTENSION_SUFFIXES[0])
            built = work / "lib" / file
            if not built.is_file():
                raise RuntimeError(f"{module}: no extension was built")
            (BUILD_DIR / file).parent.mkdir(parents=True, exist_ok=True)
            # a new file, not one rewritten in place: a process that has the old one loaded keeps it intact
            shutil.move(str(built), str(BUILD_DIR / file.with_name(file.name + ".new")))
            os.replace(BUILD_DIR / file.with_name(file.name + ".new"), BUILD_DIR / file)
            entries[module] = {"file": str(file), **fingerprint(sources[module])}
        return entries
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_manifest(modules: dict[str, dict], build: str | None) -> None:
    manifest = {"extension_suffix": EXTENSION_SUFFIXES[0], "build": build, "modules": dict(sorted(modules.items()))}
    staged = BUILD_DIR / (MANIFEST + ".new")
    staged.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(staged, BUILD_DIR / MANIFEST)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compilations")
    parser.add_argument("--all", action="store_true", help="compile every module, not only those edited since")
    args = parser.parse_args(argv)
    where = f"{os.path.relpath(BUILD_DIR, SOURCE_ROOT)}/"
    kept: dict[str, dict] = {}
    todo = list(MODULES)
    try:
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        with open(BUILD_DIR.parent / "build.lock", "w") as lock:
            if fcntl is not None:  # two builds at once (`make compiled` twice) take turns
                fcntl.flock(lock, fcntl.LOCK_EX)
            version = cython_version()
            key, old_key = build_key(version) if version else None, read_build_key()
            if not args.all and (key is None or old_key == key):
                kept = up_to_date(read_manifest(BUILD_DIR))
            todo = [module for module in MODULES if module not in kept]
            if not todo:
                print(f"compile_core: all {len(kept)} modules in {where} are built from their sources as they are")
                return 0
            write_manifest(kept, old_key)  # the stale entries go first: their extensions get replaced
            built = compile_modules(todo, max(1, args.jobs))
            write_manifest({**kept, **built}, key)
            if len(built) < len(todo):
                kept, todo = {**kept, **built}, [module for module in todo if module not in built]
                raise RuntimeError(f"{', '.join(todo)} changed while compiling")
    except (Exception, SystemExit) as e:  # no Cython, no compiler, a failed compilation: the source still runs
        still = f"; {len(kept)} others run compiled" if kept else ""
        print(f"compile_core: {len(todo)} modules run as plain Python ({type(e).__name__}: {e}){still}",
              file=sys.stderr)
        return 0
    print(f"compile_core: {len(built)} modules compiled into {where}"
          + (f" ({len(kept)} others were up to date)" if kept else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
