"""An emulated vLLM server inside the calling process, for tests and benchmarks.

    async with running_server("--speed", "50") as server:
        async with aiohttp.ClientSession(server.url) as http:
            ...

It listens on a free port of 127.0.0.1 with the access log off; `server.engine`
gives the engine client (the simulation, the pacer) for checks on the core's state.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from server.cli import build_parser
from server.serve import RunningServer, start_server


class LocalServer:
    def __init__(self, running: RunningServer) -> None:
        self.running = running
        self.engine = running.engine
        self.metrics = running.metrics
        self.url = f"http://127.0.0.1:{running.ports[0]}"
        self.urls = [f"http://127.0.0.1:{port}" for port in running.ports]


def serve_args(*argv: str):
    return build_parser("serve").parse_args(
        ["--host", "127.0.0.1", "--port", "0", "--disable-uvicorn-access-log", *argv])


@asynccontextmanager
async def running_server(*argv: str, deployment=None, tokenizer=None) -> AsyncIterator[LocalServer]:
    running = await start_server(serve_args(*argv), deployment, tokenizer)
    try:
        yield LocalServer(running)
    finally:
        await running.close()
