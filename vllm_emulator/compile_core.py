"""Compile the simulation core's hot modules with Cython (emulator/_compiled.py says what and why).

    python -m vllm_emulator.compile_core [--jobs N]

`make setup` runs it. It never fails the set-up: without Cython, a C compiler or Python's headers it says so in
one line and the core runs as plain Python. The extensions go to build/compiled/ (the sources stay untouched),
with a manifest naming each module's source, so an edited module is not shadowed by a stale build.
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

from emulator._compiled import BUILD_DIR, MANIFEST, MODULES, SOURCE_ROOT, fingerprint, source_path


def build(jobs: int) -> dict[str, dict]:
    """Compile MODULES into a fresh build folder; return the manifest's modules."""
    from Cython.Build import cythonize  # the `compiled` extra; absent: ImportError, reported by main
    from setuptools import Distribution, Extension

    sources = {module: source_path(module).read_bytes() for module in MODULES}
    work = Path(tempfile.mkdtemp(prefix="compile_core-"))
    try:
        extensions = [Extension(module, [str(source_path(module))], extra_compile_args=["-g0"]) for module in MODULES]
        # Plain Python semantics: annotations are not C types (an `int` stays a Python int, of any size).
        extensions = cythonize(extensions, build_dir=str(work / "c"), nthreads=jobs, quiet=True,
                               compiler_directives={"language_level": 3, "annotation_typing": False,
                                                    "binding": True})
        dist = Distribution({"ext_modules": extensions, "script_args": ["-q", "build_ext"]})
        dist.parse_command_line()
        command = dist.get_command_obj("build_ext")
        command.build_lib, command.build_temp, command.parallel = str(work / "lib"), str(work / "tmp"), jobs
        dist.run_commands()
        staged = work / "lib"
        modules = {}
        for module in MODULES:
            file = Path(*module.split(".")).with_suffix(EXTENSION_SUFFIXES[0])
            if not (staged / file).is_file():
                raise RuntimeError(f"{module}: no extension was built")
            modules[module] = {"file": str(file), **fingerprint(sources[module])}
        shutil.rmtree(BUILD_DIR, ignore_errors=True)
        BUILD_DIR.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staged), str(BUILD_DIR))
        manifest = {"extension_suffix": EXTENSION_SUFFIXES[0], "modules": modules}
        (BUILD_DIR / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        return modules
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compilations")
    args = parser.parse_args(argv)
    try:
        modules = build(max(1, args.jobs))
    except (Exception, SystemExit) as e:  # no Cython, no compiler, a failed compilation: the source still runs
        print(f"compile_core: the core runs as plain Python ({type(e).__name__}: {e})", file=sys.stderr)
        return 0
    print(f"compile_core: {len(modules)} modules compiled into {BUILD_DIR.relative_to(SOURCE_ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
