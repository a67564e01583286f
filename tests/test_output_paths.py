"""An output path that cannot be written is refused up front, in one `error:` line with exit 2, by every command
that writes results (loadgen, replay, report, calibrate): never a traceback after the work was done."""
from __future__ import annotations

from pathlib import Path

import pytest

from loadgen.output_paths import output_dir_problem, output_file_problem
from vllm_emulator.cli import main as cli

UNREACHABLE = "http://127.0.0.1:9"  # nothing listens: a command that got past its checks would fail on it


def trace(tmp_path: Path) -> str:
    path = tmp_path / "t.csv"
    path.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0,10,2\n0.5,20,3\n")
    return str(path)


def refused(capsys, argv: list[str], message: str) -> None:
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err


def test_loadgen_refuses_a_file_as_its_run_folder_before_sending(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    # the server is unreachable: had the check come after sending, the error would be another
    refused(capsys, ["loadgen", trace(tmp_path), "--base-url", UNREACHABLE, "-o", str(tmp_path / "file")],
            f"--output {tmp_path / 'file'}: exists and is not a directory")
    refused(capsys, ["loadgen", trace(tmp_path), "--base-url", UNREACHABLE, "-o", str(tmp_path / "file" / "run")],
            f"{tmp_path / 'file'} is not a directory")
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize("flags, message", [
    (["-o", "/proc/x"], "--output /proc/x: cannot write in /proc"),
    (["-o", "{tmp}/run", "--step-log", "/nonexist/s.jsonl"], "--step-log /nonexist/s.jsonl: no such directory"),
    (["-o", "{tmp}/run", "--step-log", "{tmp}"], "is a directory; name a file"),
])
def test_replay_checks_its_outputs_before_replaying(tmp_path, capsys, flags, message):
    refused(capsys, ["replay", trace(tmp_path), *(f.format(tmp=tmp_path) for f in flags)], message)
    assert not (tmp_path / "run").exists()  # nothing left behind by a refused command


def test_report_refuses_a_file_in_a_missing_folder(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(["replay", trace(tmp_path), "-o", str(run)]) == 0
    capsys.readouterr()
    refused(capsys, ["report", str(run), "-o", "/nonexist/r.html"], "--output /nonexist/r.html: no such directory")


def test_calibrate_refuses_its_overlay_path_before_fitting(tmp_path, capsys):
    from test_calibrate import _write_run  # a run as vLLM records it, made by the emulator
    _write_run(tmp_path / "run", {})
    refused(capsys, ["calibrate", str(tmp_path / "run"), "-o", "/nonexist/c.yaml"],
            "--output /nonexist/c.yaml: no such directory")
    assert "chi2" not in capsys.readouterr().out


def test_the_checks_leave_writable_paths_as_they_are(tmp_path):
    existing = tmp_path / "keep.txt"
    existing.write_text("content")
    assert output_file_problem(existing) is None and existing.read_text() == "content"
    assert output_file_problem(tmp_path / "new.html") is None and not (tmp_path / "new.html").exists()
    assert output_dir_problem(tmp_path / "a" / "b") is None and not (tmp_path / "a").exists()
    assert list(tmp_path.iterdir()) == [existing]  # no probe file left
