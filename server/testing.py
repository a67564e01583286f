"""An emulated vLLM server for tests and benchmarks: in the calling process, or in a child.

    async with running_server("--speed", "50") as server:
        async with aiohttp.ClientSession() as http:
            await http.get(server.url + "/health")

    with server_process("--speed", "60") as url:   # when the client must not share the CPU
        ...

Both listen on a free port of 127.0.0.1 with the access log off; an in-process
`server.engine` gives the engine client (the simulation, the pacer) for checks on the
core's state. In-process servers of the same model, device and engine flags share one
deployment (its tables are loaded once per process, not once per test).
"""
from __future__ import annotations

import argparse
import functools
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from emulator.config import EngineArgs
from emulator.engine_flags import engine_args_from
from profiles.deployment import build_deployment
from server.serve import RunningServer, add_arguments, load_target, resolve_defaults, start_server


class LocalServer:
    def __init__(self, running: RunningServer) -> None:
        self.running = running
        self.engine = running.engine
        self.metrics = running.metrics
        self.url = f"http://127.0.0.1:{running.ports[0]}"
        self.urls = [f"http://127.0.0.1:{port}" for port in running.ports]


def serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(
        ["--host", "127.0.0.1", "--port", "0", "--disable-uvicorn-access-log", *argv])


@functools.lru_cache(maxsize=16)
def _deployment(model: str, hardware: str, engine_args: EngineArgs, compile_cache: bool):
    return build_deployment(model, hardware, engine_args, compile_cache)


@asynccontextmanager
async def running_server(*argv: str, deployment=None, tokenizer=None) -> AsyncIterator[LocalServer]:
    args = serve_args(*argv)
    if deployment is None and args.cluster:
        deployment = load_target(args)[0]
    elif deployment is None:
        model = resolve_defaults(args)
        deployment = _deployment(model, args.hardware, engine_args_from(args), args.compile_cache)
    running = await start_server(args, deployment, tokenizer)
    try:
        yield LocalServer(running)
    finally:
        await running.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_process(*argv: str, timeout: float = 120.0, log=None, program: list[str] | None = None) -> Iterator[str]:
    """`vllm-emulator serve ARGV` in a child process; yields its base URL once /health answers.

    `program` replaces `python -m vllm_emulator serve` (e.g. a benchmark's instrumented server)."""
    port = free_port()
    program = program or [sys.executable, "-m", "vllm_emulator", "serve"]
    command = [*program, "--host", "127.0.0.1", "--port", str(port), "--disable-uvicorn-access-log", *argv]
    child = subprocess.Popen(command, stdout=log or subprocess.DEVNULL, stderr=log or subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if child.poll() is not None:
                raise RuntimeError(f"the server exited with {child.returncode}: {' '.join(command)}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the server did not answer /health within {timeout} s") from None
                time.sleep(0.1)
        yield url
    finally:
        child.terminate()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
