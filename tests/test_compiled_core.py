"""The compiled core (emulator/_compiled.py): a compiled module runs only while its source is the one it was built
from, and a replay gives the same outputs compiled and as plain Python."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES, ExtensionFileLoader
from pathlib import Path

import pytest

from emulator import _compiled
from emulator._compiled import CompiledFinder, fingerprint, read_manifest

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT.parent / "shared" / "data" / "traces"


def _built(tmp_path: Path, source: bytes = b"x = 1\n") -> CompiledFinder:
    """A source root with pkg/mod.py and a build holding a (stand-in) extension built from `source`."""
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "pkg" / "mod.py").write_bytes(source)
    extension = Path("pkg") / ("mod" + EXTENSION_SUFFIXES[0])
    (tmp_path / "build" / "pkg").mkdir(parents=True)
    (tmp_path / "build" / extension).write_bytes(b"\x7fELF")
    modules = {"pkg.mod": {"file": str(extension), **fingerprint(source)}}
    return CompiledFinder(tmp_path / "build", modules, root=tmp_path / "src")


def test_an_unchanged_source_loads_its_extension(tmp_path):
    finder = _built(tmp_path)
    spec = finder.find_spec("pkg.mod")
    assert isinstance(spec.loader, ExtensionFileLoader)
    assert spec.origin == str(tmp_path / "build" / "pkg" / ("mod" + EXTENSION_SUFFIXES[0]))
    assert finder.find_spec("pkg.other") is None  # not built: the usual finders


def test_an_edited_or_missing_source_or_build_falls_back_to_the_source(tmp_path):
    finder = _built(tmp_path)
    source = tmp_path / "src" / "pkg" / "mod.py"
    source.write_bytes(b"x = 2\n")  # the same size, another content
    assert finder.find_spec("pkg.mod") is None
    source.write_bytes(b"x = 1\n")
    (tmp_path / "build" / "pkg" / ("mod" + EXTENSION_SUFFIXES[0])).unlink()
    assert finder.find_spec("pkg.mod") is None
    source.unlink()
    assert finder.find_spec("pkg.mod") is None
    assert finder.loaded == []


def test_a_manifest_of_another_interpreter_or_unreadable_is_no_build(tmp_path):
    assert read_manifest(tmp_path) == {}
    (tmp_path / _compiled.MANIFEST).write_text("{not json")
    assert read_manifest(tmp_path) == {}
    modules = {"emulator.batch": {"file": "x.so", "size": 1, "crc32": 2}}
    (tmp_path / _compiled.MANIFEST).write_text(json.dumps({"extension_suffix": ".cpython-39-x.so", "modules": modules}))
    assert read_manifest(tmp_path) == {}
    (tmp_path / _compiled.MANIFEST).write_text(json.dumps({"extension_suffix": EXTENSION_SUFFIXES[0],
                                                             "modules": modules}))
    assert read_manifest(tmp_path) == modules


def test_an_extension_that_will_not_load_here_runs_the_source(tmp_path, monkeypatch):
    finder = _built(tmp_path)  # its "extension" is four bytes: no shared object at all
    (tmp_path / "src" / "pkg" / "__init__.py").write_text("")
    (tmp_path / "src" / "pkg").rename(tmp_path / "src" / "pkg_s11_fallback")
    (tmp_path / "build" / "pkg").rename(tmp_path / "build" / "pkg_s11_fallback")
    entry = finder.modules.pop("pkg.mod")
    entry["file"] = entry["file"].replace("pkg", "pkg_s11_fallback", 1)
    finder.modules["pkg_s11_fallback.mod"] = entry
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    import pkg_s11_fallback.mod as mod
    assert mod.x == 1 and mod.__file__ == str(tmp_path / "src" / "pkg_s11_fallback" / "mod.py")
    assert finder.loaded == []
    monkeypatch.delitem(sys.modules, "pkg_s11_fallback.mod")
    monkeypatch.delitem(sys.modules, "pkg_s11_fallback")


def test_turned_off_by_the_environment(tmp_path, monkeypatch):
    finder = _built(tmp_path)
    monkeypatch.setenv(_compiled.DISABLE_ENV, "1")
    assert _compiled.install(finder.build_dir) is None


def _fresh_modules() -> list[str]:
    """Modules whose build matches their source now (an edited one runs as source until rebuilt)."""
    modules = read_manifest(_compiled.BUILD_DIR)
    return [name for name, entry in modules.items() if _compiled.built_from(entry, _compiled.source_path(name))]


def _replay(tmp_path: Path, name: str, args: list[str], pure: bool) -> dict[str, object]:
    out = tmp_path / f"{name}-{'pure' if pure else 'compiled'}"
    steps = out.with_name(out.name + "-steps.jsonl")
    env = {**os.environ, _compiled.DISABLE_ENV: "1" if pure else ""}
    subprocess.run([sys.executable, "-m", "vllm_emulator", "replay", *args, "-o", str(out), "--step-log", str(steps)],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    outputs: dict[str, object] = {"steps.jsonl": steps.read_bytes()}
    for path in sorted(out.iterdir()):
        if path.name == "summary.json":  # all but its wall-clock fields
            outputs[path.name] = {k: v for k, v in json.loads(path.read_text()).items() if "wall" not in k}
        else:
            outputs[path.name] = path.read_bytes()
    return outputs


@pytest.mark.skipif(not _fresh_modules(), reason="no compiled core built for these sources (make compiled)")
def test_replays_give_the_same_outputs_compiled_and_as_source(tmp_path):
    fresh = _fresh_modules()
    probe = subprocess.run([sys.executable, "-c", f"import {fresh[0]} as m; print(m.__file__)"], cwd=ROOT,
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip().endswith(EXTENSION_SUFFIXES[0])
    azure = tmp_path / "azure400.csv"
    lines = (TRACES / "azure2023" / "AzureLLMInferenceTrace_conv.csv").read_text().splitlines()[:401]
    azure.write_text("\n".join(lines) + "\n")
    cases = {
        "sharegpt_rtx4090": [str(TRACES / "sharegpt" / "sharegpt-llama-3.1-8b-300-sps10.jsonl"), "--model",
                             "meta-llama/Llama-3.1-8B", "--hardware", "RTX4090", "--max-model-len", "32768"],
        "pd_offload": [str(azure), "--cluster", str(ROOT / "bench" / "clusters" / "azure-4p4d-h100.yaml")],
    }
    for name, args in cases.items():
        compiled, pure = _replay(tmp_path, name, args, pure=False), _replay(tmp_path, name, args, pure=True)
        assert compiled.keys() == pure.keys() and "requests.jsonl" in compiled
        for file in compiled:
            assert compiled[file] == pure[file], f"{name}: {file} differs"


def test_compile_core_rebuilds_only_edited_modules_and_never_fails_the_set_up(tmp_path, monkeypatch, capsys):
    from vllm_emulator import compile_core

    build = tmp_path / "cpython-3x"
    build.mkdir()
    monkeypatch.setattr(compile_core, "BUILD_DIR", build)
    suffix = EXTENSION_SUFFIXES[0]
    batch = _compiled.source_path("emulator.batch").read_bytes()
    modules = {"emulator.batch": {"file": "emulator/batch" + suffix, **fingerprint(batch)},
               "emulator.engine": {"file": "emulator/engine" + suffix, "size": 1, "crc32": 0}}  # edited since
    (build / "emulator").mkdir()
    for entry in modules.values():
        (build / entry["file"]).write_bytes(b"\x7fELF")
    compile_core.write_manifest(modules, None)
    assert compile_core.up_to_date(read_manifest(build)) == {"emulator.batch": modules["emulator.batch"]}

    asked: list[list[str]] = []

    def no_cython(todo, jobs):
        asked.append(todo)
        raise ModuleNotFoundError("No module named 'Cython'")

    monkeypatch.setattr(compile_core, "cython_version", lambda: None)
    monkeypatch.setattr(compile_core, "compile_modules", no_cython)
    assert compile_core.main([]) == 0
    assert asked == [[m for m in _compiled.MODULES if m != "emulator.batch"]]
    message = capsys.readouterr().err
    assert "plain Python (ModuleNotFoundError: No module named 'Cython')" in message
    assert message.rstrip().endswith("; 1 others run compiled")
    assert read_manifest(build) == {"emulator.batch": modules["emulator.batch"]}  # the stale entry is gone
