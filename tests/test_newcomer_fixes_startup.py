"""Start-up messages a newcomer met: a missing trace told before the deployment's start-up log, the
scale-out notice once per process, and loadgen's warning when its --speedup is not the server's --speed."""
from __future__ import annotations

import asyncio
import logging

import pytest
from aiohttp import web

import loadgen.replay
from loadgen.http_replay import speed_mismatch
from loadgen.scrape import server_speed
from profiles.cluster_file import read_cluster_file
from server import scale_out
from server.testing import free_port, running_server
from vllm_emulator.cli import main


# -- replay: a missing trace is told first ----------------------------------------------------------------
def test_replay_of_a_missing_trace_says_so_before_building_the_deployment(tmp_path, monkeypatch, capsys):
    def no_build(args):
        raise AssertionError("the deployment was built for a trace that does not exist")

    monkeypatch.setattr(loadgen.replay, "load_target", no_build)
    assert main(["replay", str(tmp_path / "nosuch.csv"), "-o", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nosuch.csv'}: no such trace file\n"
    assert main(["replay", str(tmp_path), "-o", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path}: cannot read the trace file: Is a directory\n"


# -- the scale-out notice: once per process, as vLLM's API server logs it -----------------------------------
async def test_a_cluster_with_ports_logs_the_scale_out_notice_once(tmp_path, caplog):
    path = tmp_path / "c.yaml"
    path.write_text(f"instances:\n  - {{name: a, model: meta-llama/Llama-3.1-8B, hardware: H100, count: 2, "
                    f"port: {free_port()}, max-model-len: 2048}}\n")
    spec, _ = read_cluster_file(path)
    scale_out._log_disabled.cache_clear()  # as in a fresh process
    with caplog.at_level(logging.INFO, logger="vllm_emulator.server"):
        async with running_server("--speed", "100", deployment=spec) as server:
            assert len(server.urls) == 3  # the front door and two instance ports
    assert sum(scale_out.DISABLED in r.getMessage() for r in caplog.records) == 1


# -- loadgen: a --speedup that is not the server's --speed -------------------------------------------------
EXPOSITION = """# HELP vllm_emulator:speed Virtual seconds simulated per wall-clock second.
# TYPE vllm_emulator:speed gauge
vllm_emulator:speed{engine="0",model_name="m"} 10.0
vllm_emulator:speed_of_light 3
"""


def test_the_servers_speed_is_read_from_its_emulator_gauge():
    assert server_speed(EXPOSITION) == 10.0
    assert server_speed("vllm_emulator:speed 2.5\n") == 2.5
    assert server_speed("vllm:num_requests_running{engine=\"0\"} 1.0\nvllm_emulator:speed_of_light 3\n") is None


async def test_loadgen_warns_of_a_speedup_other_than_the_servers_speed():
    async with running_server("--speed", "10") as server:
        url = server.urls[0]
        warning = await asyncio.to_thread(speed_mismatch, url, {}, 1.0)
        assert warning == ("the server simulates at --speed 10 and this run sends at --speedup 1: the server sees "
                           "the trace's arrivals 10x sparser than they are, and the latencies (wall-clock times "
                           "multiplied by --speedup) come out 10x too small; pass --speedup 10")
        assert "40x denser" in await asyncio.to_thread(speed_mismatch, url, {}, 400.0)
        assert await asyncio.to_thread(speed_mismatch, url, {}, 10.0) is None


@pytest.mark.parametrize("status, body", [(200, "vllm:num_requests_running{engine=\"0\"} 0.0\n"), (404, "")])
async def test_loadgen_says_nothing_against_a_server_without_the_gauge(status, body):
    """A real vLLM exports no vllm_emulator: series; another server may have no /metrics at all."""
    app = web.Application()
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(status=status, text=body)

    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        assert await asyncio.to_thread(speed_mismatch, f"http://127.0.0.1:{port}", {}, 1.0) is None
    finally:
        await runner.cleanup()
    assert speed_mismatch(f"http://127.0.0.1:{free_port()}", {}, 1.0) is None  # nothing listening


async def test_loadgen_prints_the_warning_before_it_sends(tmp_path, monkeypatch, capsys):
    """The run itself is stubbed (no wall clock): the warning comes from the server's own gauge, at the start."""
    import loadgen.http_replay as http_replay

    class Sending(Exception):
        pass

    def no_run(planned, args, headers):  # raises as it is called: main's event loop never starts
        raise Sending

    monkeypatch.setattr(http_replay, "run", no_run)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"input_toks": 20, "output_toks": 4, "arrival_time_ns": 0}\n')
    async with running_server("--speed", "10") as server:
        with pytest.raises(Sending):
            await asyncio.to_thread(main, ["loadgen", str(trace), "--base-url", server.urls[0],
                                           "--scrape-interval", "0", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert "loadgen: warning: the server simulates at --speed 10 and this run sends at --speedup 1:" in err, err
