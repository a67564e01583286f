"""Logging as `vllm serve` logs (vllm/logger.py DEFAULT_LOGGING_CONFIG, uvicorn's LOGGING_CONFIG as vLLM runs
it): vLLM's lines on stdout as `(APIServer pid=N) INFO 12-07 04:16:14 [serve.py:123] message`, uvicorn's server
lines on stderr and its access lines on stdout (`INFO:     127.0.0.1:PORT - "POST /v1/completions HTTP/1.1" 200
OK`); --disable-uvicorn-access-log, --disable-access-log-for-endpoints, --logging-config (formatter json),
$VLLM_LOGGING_CONFIG_PATH (vLLM's and uvicorn's formatter classes named in it) and VLLM_CONFIGURE_LOGGING=0."""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import aiohttp
import pytest

from server import vllm_logging
from server.testing import free_port, running_server
from vllm_emulator.cli import build_parser

VLLM_LINE = re.compile(r"^\((APIServer|EngineCore) pid=(\d+)\) (INFO|WARNING|DEBUG|ERROR) \d\d-\d\d \d\d:\d\d:\d\d "
                       r"\[[\w/.]+\.py:\d+\] (.*)$")


def _serve(tmp_path, *argv: str, env: dict | None = None, requests=("/v1/completions",)) -> tuple[str, str]:
    """Run `serve`, send a completion (and GET the other paths in `requests`), stop it: (stdout, stderr)."""
    port = free_port()
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with out.open("w") as o, err.open("w") as e:
        child = subprocess.Popen([sys.executable, "-m", "vllm_emulator", "serve", "--host", "127.0.0.1",
                                  "--port", str(port), "--speed", "1000", *argv],
                                 stdout=o, stderr=e, env={**os.environ, **(env or {})})
        try:
            deadline = time.monotonic() + 120
            while True:
                assert child.poll() is None, err.read_text()
                assert time.monotonic() < deadline, "the server did not start within 120 s"
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                        break
                except OSError:
                    time.sleep(0.1)
            for path in requests:  # (after /health, whose access line comes first)
                if path == "/v1/completions":
                    body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
                    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", body,
                                                     {"Content-Type": "application/json"})
                else:
                    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
                with urllib.request.urlopen(request) as resp:
                    assert resp.status == 200
            time.sleep(0.3)  # the access line follows the response
        finally:
            child.send_signal(signal.SIGINT)
            assert child.wait(timeout=60) == 0
    return out.read_text(), err.read_text()


def test_vllms_lines_on_stdout_uvicorns_server_lines_on_stderr_access_lines_on_stdout(tmp_path):
    out, err = _serve(tmp_path)
    vllm_lines = [line.removesuffix("\r") for line in out.split("\n")[:-1] if not line.startswith("INFO:     ")]
    assert vllm_lines and all(VLLM_LINE.match(line) for line in vllm_lines), vllm_lines
    # vLLM's banner first (monochrome: not a terminal), each of its lines with the prefix
    banner = [VLLM_LINE.match(line).group(4) for line in vllm_lines[:6]]
    assert banner[0] == "" and banner[5] == "" and banner[2].endswith("  version 0.33.0")
    assert banner[3].endswith("  model   meta-llama/Llama-3.1-8B") and "█" in banner[1]
    assert {VLLM_LINE.match(line).group(2) for line in vllm_lines} == {str(_pid(err))}
    said = {VLLM_LINE.match(line).group(4): VLLM_LINE.match(line).group(1) for line in vllm_lines}
    kv_line = next(text for text in said if text.startswith("GPU KV cache size: "))
    assert said[kv_line] == "EngineCore"  # the engine core's line, as vLLM's engine core process logs it
    routes = [text for text in said if text.startswith("Route: ")]  # vLLM's list, before it serves
    assert "Available routes are:" in said and routes[0] == "Route: /openapi.json, Methods: GET, HEAD"
    assert "Route: /v1/completions, Methods: POST" in routes and not [r for r in routes if "/emulator/" in r]
    assert any(line.endswith(f"Starting vLLM server on http://127.0.0.1:{_port(out)}") for line in vllm_lines)
    assert re.search(r'^INFO:     127\.0\.0\.1:\d+ - "POST /v1/completions HTTP/1\.1" 200 OK$', out, re.M), out
    assert err.splitlines() == [f"INFO:     Started server process [{_pid(err)}]",
                                "INFO:     Waiting for application startup.", "INFO:     Application startup complete.",
                                "INFO:     Shutting down", "INFO:     Waiting for application shutdown.",
                                "INFO:     Application shutdown complete."]


def _pid(err: str) -> int:
    return int(re.search(r"Started server process \[(\d+)\]", err).group(1))


def _port(out: str) -> int:
    return int(re.search(r"Starting vLLM server on http://127\.0\.0\.1:(\d+)", out).group(1))


def test_access_log_switches_and_json_lines(tmp_path):
    out, _ = _serve(tmp_path, "--disable-uvicorn-access-log", requests=("/v1/completions", "/v1/models"))
    assert "INFO:     127.0.0.1" not in out and "Starting vLLM server" in out
    out, err = _serve(tmp_path, "--logging-config.formatter", "json", "--disable-access-log-for-endpoints",
                      "/v1/models,/health", requests=("/v1/completions", "/v1/models"))
    records = [json.loads(line) for line in out.splitlines()]
    assert all(set(r) == {"asctime", "levelname", "name", "processName", "process", "message"} for r in records)
    access = [r["message"] for r in records if r["name"] == "uvicorn.access"]
    assert len(access) == 1 and re.fullmatch(r'127\.0\.0\.1:\d+ - "POST /v1/completions HTTP/1\.1" 200', access[0])
    assert "Application startup complete." in [json.loads(line)["message"] for line in err.splitlines()]


def test_a_logging_config_file_replaces_vllms_and_uvicorns(tmp_path):
    config = tmp_path / "logging.json"
    config.write_text(json.dumps({
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"plain": {"class": "vllm.logging_utils.NewLineFormatter", "format": "MINE %(message)s"},
                       "access": {"()": "uvicorn.logging.AccessFormatter",
                                  "fmt": "HIT %(request_line)s %(status_code)s", "use_colors": False}},
        "handlers": {"out": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"},
                     "hits": {"class": "logging.StreamHandler", "formatter": "access", "stream": "ext://sys.stderr"}},
        "loggers": {"vllm": {"handlers": ["out"], "level": "INFO", "propagate": False},
                    "uvicorn.access": {"handlers": ["hits"], "level": "INFO", "propagate": False}}}))
    out, err = _serve(tmp_path, env={"VLLM_LOGGING_CONFIG_PATH": str(config)})
    assert out == ""
    assert "MINE Starting vLLM server on http://127.0.0.1:" in err  # the emulator's loggers log as vLLM's
    assert "HIT POST /v1/completions HTTP/1.1 200 OK" in err
    assert "MINE vLLM server version 0.33.0, serving model meta-llama/Llama-3.1-8B\n" in err  # no banner
    done = subprocess.run([sys.executable, "-m", "vllm_emulator", "serve"], capture_output=True, text=True,
                          env={**os.environ, "VLLM_CONFIGURE_LOGGING": "0", "VLLM_LOGGING_CONFIG_PATH": str(config)})
    assert done.returncode == 2 and "Logging configuration is disabled, but a Python logging config file" in done.stderr


def _args(*argv: str):
    return build_parser("serve").parse_args(list(argv))


def test_formats_in_process_and_logging_is_given_back(capsys, monkeypatch):
    monkeypatch.setenv("VLLM_LOGGING_COLOR", "0")
    before = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).propagate)
              for name in ("vllm", "vllm_emulator", "uvicorn.access")}
    from server.serve import configure_logging
    restore = configure_logging(_args("--disable-access-log-for-endpoints", "/metrics"))
    try:
        logging.getLogger("vllm_emulator.test").info("first line\nsecond line")
        logging.getLogger("vllm.entrypoints.test").warning("from %s", "vllm")
        access = logging.getLogger("uvicorn.access")
        access.info('%s - "%s %s HTTP/%s" %d', "10.0.0.1:5", "GET", "/metrics?x=1", "1.1", 200)  # filtered
        access.info('%s - "%s %s HTTP/%s" %d', "10.0.0.1:5", "GET", "/v1/models", "1.1", 404)
        logging.getLogger("uvicorn.error").info("Application startup complete.")
    finally:
        restore()
    out, err = capsys.readouterr()
    lines = out.split("\n")[:-1]  # (splitlines would also split at the \r)
    first = re.fullmatch(r"(\(APIServer pid=\d+\) INFO \d\d-\d\d \d\d:\d\d:\d\d \[test_cli_logging_s9\.py:\d+\] )"
                         r"first line\r", lines[0])
    assert first and lines[1] == first.group(1) + "second line"  # vLLM's NewLineFormatter: the prefix again
    assert re.fullmatch(r"\(APIServer pid=\d+\) WARNING .* from vllm", lines[2])
    assert lines[3:] == ['INFO:     10.0.0.1:5 - "GET /v1/models HTTP/1.1" 404 Not Found']
    assert err == "INFO:     Application startup complete.\n"
    after = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).propagate) for name in before}
    assert after == before


def test_debug_names_the_file_by_its_path_and_refusals_are_vllms(monkeypatch):
    record = logging.LogRecord("vllm_emulator.x", logging.DEBUG, vllm_logging.__file__, 7, "m", None, None)
    formatter = vllm_logging.VllmFormatter("[%(fileinfo)s:%(lineno)d] %(message)s", log_level="DEBUG")
    assert formatter.format(record) == "[server/vllm_logging.py:7] m"
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "loud")
    with pytest.raises(ValueError, match="VLLM_LOGGING_LEVEL: unknown level 'LOUD'"):
        vllm_logging.logging_config(_args())
    monkeypatch.delenv("VLLM_LOGGING_LEVEL")
    with pytest.raises(ValueError, match="formatter: 'yaml' is not one of text, json"):
        vllm_logging.logging_config(_args(), '{"formatter": "yaml"}')
    config = vllm_logging.logging_config(_args("--log-level", "WARNING"), '{"log_level": "DEBUG"}', "/x.json")
    assert (config.log_level, config.pylogging_config_file) == ("WARNING", "/x.json")  # the flags win
    with pytest.raises(ValueError, match="File does not exist: /no/such.json"):
        vllm_logging.read_config_file("/no/such.json")


async def test_a_streams_access_line_comes_as_its_head_goes_out(caplog):
    caplog.set_level(logging.INFO, logger="uvicorn.access")
    body = {"prompt": "hi", "max_tokens": 400, "ignore_eos": True, "stream": True}
    async with running_server("--enable-uvicorn-access-log") as server, aiohttp.ClientSession() as http:
        async with http.post(server.url + "/v1/completions", json=body) as r:
            await r.content.readline()  # the first event: the stream has begun, far from its end
            lines = [rec.getMessage() for rec in caplog.records if rec.name == "uvicorn.access"]
            assert len(lines) == 1
            assert re.fullmatch(r'127\.0\.0\.1:\d+ - "POST /v1/completions HTTP/1\.1" 200', lines[0])
            assert b"[DONE]" not in await r.content.readline()


def test_enable_log_requests_says_once_what_the_log_level_leaves(caplog, monkeypatch):
    from server import request_log
    monkeypatch.setattr(request_log, "_NOTICED", set())
    caplog.set_level(logging.INFO, logger=request_log.log.name)
    request_log.RequestLogger(None)
    request_log.RequestLogger(None)  # vLLM's info_once: one line a process
    notices = [r for r in caplog.records if "`--enable-log-requests` is set" in r.getMessage()]
    assert [(r.levelname, r.getMessage()) for r in notices] == [(
        "INFO", "`--enable-log-requests` is set but the minimum log level is higher than DEBUG. Only limited "
                "information will be logged to minimize overhead. To view more details, set `--log-level DEBUG`.")]
    caplog.clear()
    caplog.set_level(logging.WARNING, logger=request_log.log.name)
    request_log.RequestLogger(None)
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "No request information" in caplog.text


def test_the_stats_line_is_vllms_logger_at_vllms_interval(monkeypatch):
    from server import periodic_log
    assert periodic_log.log.name == "vllm.v1.metrics.loggers"  # a logging config that names vLLM's logger holds
    monkeypatch.setenv("VLLM_LOG_STATS_INTERVAL", "2.5")
    assert periodic_log.interval() == 2.5
    monkeypatch.setenv("VLLM_LOG_STATS_INTERVAL", "0")
    assert periodic_log.interval() == 10.0  # vLLM's: not above 0, its default
    monkeypatch.setenv("VLLM_LOG_STATS_INTERVAL", "often")
    with pytest.raises(ValueError, match="VLLM_LOG_STATS_INTERVAL"):
        periodic_log.interval()


def test_vllm_configure_logging_0_leaves_vllms_loggers_but_uvicorn_logs_as_ever(tmp_path):
    out, err = _serve(tmp_path, env={"VLLM_CONFIGURE_LOGGING": "0"})
    assert "APIServer" not in out + err and "Starting vLLM server" not in out + err  # INFO: Python's defaults drop it
    assert re.search(r'^INFO:     127\.0\.0\.1:\d+ - "POST /v1/completions HTTP/1\.1" 200 OK$', out, re.M), out
    assert "INFO:     Application startup complete." in err.splitlines()
