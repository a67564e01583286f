"""`vllm-emulator calibrate` where the runs constrain none of the parameters asked for: nothing is fitted, so it
says so, writes no overlay (an existing file keeps its content) and exits 1."""
from __future__ import annotations

from test_calibrate import TRUTH, _write_run

from vllm_emulator.cli import main


def test_nothing_fitted_writes_no_overlay(tmp_path, capsys):
    run = tmp_path / "run"
    _write_run(run, TRUTH)
    overlay = tmp_path / "fitted.yaml"
    # host_per_request moves no statistic of this run by half its standard error: left alone
    assert main(["calibrate", str(run), "--fit", "host_per_request", "-o", str(overlay)]) == 1
    captured = capsys.readouterr()
    assert "host_per_request" in captured.out and "not constrained by these runs" in captured.out
    assert "nothing fitted" in captured.err and "no overlay written" in captured.err
    assert not overlay.exists()
    overlay.write_text("# a user's earlier overlay\n")
    assert main(["calibrate", str(run), "--fit", "host_per_request", "-o", str(overlay)]) == 1
    assert overlay.read_text() == "# a user's earlier overlay\n"
