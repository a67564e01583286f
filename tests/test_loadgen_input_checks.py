"""loadgen's checks before it sends anything: the API key a server started with --api-key wants (OPENAI_API_KEY,
as vllm bench serve reads it; the locustfile too), a --model the server does not list, a --base-url without
its scheme; `--request-rate inf` as vllm bench serve's default; and a run in which every request failed."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.testing import server_process
from vllm_emulator.cli import main as cli

KEY = "sk-loadgen-test"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server():
    with server_process("--speed", "50", "--api-key", KEY, "--max-model-len", "1024") as url:
        yield url


def trace(tmp_path: Path, rows=((0.0, 100, 4), (0.1, 50, 3))) -> str:
    path = tmp_path / "t.csv"
    path.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n" + "".join(f"{t},{i},{o}\n" for t, i, o in rows))
    return str(path)


def loadgen(tmp_path: Path, url: str, *flags: str) -> int:
    return cli(["loadgen", trace(tmp_path), "--base-url", url, "--speedup", "50", "-o", str(tmp_path / "run"), *flags])


def test_a_server_that_wants_a_key_is_told_of_before_sending(tmp_path, server, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert loadgen(tmp_path, server) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "HTTP 401" in err and "set OPENAI_API_KEY" in err and "Traceback" not in err
    monkeypatch.setenv("OPENAI_API_KEY", "wrong")
    assert loadgen(tmp_path, server) == 2
    assert "refused the key in OPENAI_API_KEY" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_key_in_openai_api_key_is_sent(tmp_path, server, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert loadgen(tmp_path, server) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["num_finished"] == 2 and summary["num_failed"] == 0


def test_a_model_the_server_does_not_serve_stops_the_run_with_the_served_names(tmp_path, server, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert loadgen(tmp_path, server, "--model", "nope") == 2
    err = capsys.readouterr().err
    assert "error: --model nope: the server does not serve it" in err
    assert "/v1/models lists: meta-llama/Llama-3.1-8B" in err
    assert not (tmp_path / "run").exists()  # nothing sent, nothing written
    assert loadgen(tmp_path, server, "--model", "meta-llama/Llama-3.1-8B") == 0


def test_a_run_in_which_every_request_failed_says_none_finished(tmp_path, server, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    too_long = ((0.0, 2000, 4), (0.1, 3000, 4))  # over the server's --max-model-len: vLLM's 400
    assert cli(["loadgen", trace(tmp_path, too_long), "--base-url", server, "--speedup", "50",
                "-o", str(tmp_path / "run")]) == 1
    captured = capsys.readouterr()
    assert "0 of 2 requests finished, 2 failed" in captured.out
    assert "no latencies: none finished" in captured.out and "mean - ms" not in captured.out
    assert "HTTP 400" in captured.err


@pytest.mark.parametrize("url, message", [
    ("127.0.0.1:18430", "--base-url 127.0.0.1:18430: not a URL; add its scheme: --base-url http://127.0.0.1:18430"),
    ("localhost", "--base-url localhost: not a URL; add its scheme: --base-url http://localhost"),
    ("ftp://127.0.0.1:1", "--base-url ftp://127.0.0.1:1: expected an http:// or https:// URL"),
])
def test_a_base_url_without_its_scheme_is_refused_with_the_fix(tmp_path, capsys, url, message):
    assert loadgen(tmp_path, url) == 2
    err = capsys.readouterr().err
    assert f"error: {message}" in err and "unknown url type" not in err


def test_request_rate_inf_sends_everything_at_once(tmp_path, server, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert cli(["loadgen", "--base-url", server, "--speedup", "50", "--request-rate", "inf", "--num-requests", "4",
                "--input-len", "50", "--output-len", "2", "-o", str(tmp_path / "run")]) == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / "run" / "requests.jsonl").read_text().splitlines()]
    assert [r["trace_arrival"] for r in rows] == [0.0] * 4
    assert cli(["loadgen", "--base-url", server, "--request-rate", "inf", "--duration", "5",
                "-o", str(tmp_path / "other")]) == 2
    assert "--duration needs a finite --request-rate" in capsys.readouterr().err


def test_replay_takes_request_rate_inf_as_vllm_bench_serve_does(tmp_path, capsys):
    rows = ((0.0, 100, 4), (3.0, 50, 3), (7.5, 80, 2))
    assert cli(["replay", trace(tmp_path, rows), "--request-rate", "inf", "-o", str(tmp_path / "run")]) == 0
    got = [json.loads(line) for line in (tmp_path / "run" / "requests.jsonl").read_text().splitlines()]
    assert [r["arrival_time"] for r in got] == [0.0, 0.0, 0.0]
    assert cli(["replay", trace(tmp_path, rows), "--request-rate", "nan", "-o", str(tmp_path / "x")]) == 2
    assert "--request-rate must be a positive number" in capsys.readouterr().err


def test_the_locustfile_sends_the_key(tmp_path, server):
    pytest.importorskip("locust")
    done = subprocess.run([sys.executable, "-m", "locust", "-f", str(ROOT / "loadgen" / "locustfile.py"),
                           "--headless", "-H", server, "-u", "2", "-r", "2", "-t", "3s", "--trace", trace(tmp_path),
                           "--csv", str(tmp_path / "stats"), "--only-summary"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), "OPENAI_API_KEY": KEY})
    assert done.returncode == 0, done.stderr[-3000:]
    with (tmp_path / "stats_stats.csv").open() as f:
        stats = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    assert int(stats[("POST", "/v1/completions")]["Request Count"]) > 0
    assert all(int(r["Failure Count"]) == 0 for r in stats.values())


NO_MODEL_LIST = """
import http.server, sys
class NotFound(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_error(404)
    do_POST = do_GET
    def log_message(self, *args):
        pass
httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
print(httpd.server_address[1], flush=True)
httpd.serve_forever()
"""


def test_a_server_without_a_model_list_gets_model_unchecked(tmp_path, capsys):
    """A server with no /v1/models (404) takes --model as given, as before: nothing to check it against."""
    child = subprocess.Popen([sys.executable, "-c", NO_MODEL_LIST], stdout=subprocess.PIPE, text=True)
    try:
        port = int(child.stdout.readline())
        code = loadgen(tmp_path, f"http://127.0.0.1:{port}", "--model", "m", "--scrape-interval", "0")
    finally:
        child.kill()
        child.wait()
    captured = capsys.readouterr()
    assert code == 1, captured.err  # sent, and every request 404s
    assert "/v1/models answered 404: --model m is sent unchecked" in captured.err
    assert "0 of 2 requests finished, 2 failed" in captured.out
