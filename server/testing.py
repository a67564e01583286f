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
import fcntl
import functools
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

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


# free_port's ports: blocks of PORT_BLOCK (a caller may bind port + rank, as a DP publisher does) from
# PORT_FLOOR up to the kernel's ephemeral range, which client sockets draw their local ports from: a port the
# kernel picked (bind to port 0) could be taken by any outgoing connection between the pick and the server's
# bind, as happened on a loaded machine. A block is locked (flock on a file, released when the process exits)
# against every process that picks ports this way (pytest workers, concurrent test runs, bench scripts).
PORT_FLOOR = 20000
PORT_BLOCK = 16
_reserved: set[int] = set()  # the blocks this process has taken (by their first port)
_held: list = []  # their lock files, open (so locked) until the process exits


def _port_range() -> tuple[int, int]:
    """The widest span of [PORT_FLOOR, 65536) outside the kernel's ephemeral range."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):  # not Linux: its default (macOS's 49152-65535 lies above it)
        low, high = 32768, 60999
    below, above = (PORT_FLOOR, low), (high + 1, 65536)
    return max(below, above, key=lambda span: span[1] - span[0])


def _reserve(port: int) -> bool:
    """Lock `port`'s block for this process; False where another process holds it. Without a lock directory
    the bind check alone guards the block against other processes."""
    if port in _reserved:
        return False
    _reserved.add(port)
    folder = os.path.join(tempfile.gettempdir(), "vllm-emulator-ports")
    try:
        os.makedirs(folder, exist_ok=True)
        handle = open(os.path.join(folder, f"{port}.lock"), "a")
    except OSError:
        return True
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return False
    _held.append(handle)
    return True


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))  # every address: a listener on any of them (ZMQ's tcp://*) holds the port
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port no one listens on, with the PORT_BLOCK - 1 after it, this process's until it exits: never
    handed out again, here or to another process that picks ports this way, and outside the range the kernel
    gives client sockets, so it is still free when a server binds it later."""
    low, high = _port_range()
    blocks = (high - low) // PORT_BLOCK
    start = (os.getpid() * 7919) % blocks  # processes start apart, so they seldom contend for one block
    for k in range(blocks):
        port = low + ((start + k) % blocks) * PORT_BLOCK
        # a block reserved but in use by someone else stays reserved: no later call need look at it again
        if _reserve(port) and all(_bindable(port + i) for i in range(PORT_BLOCK)):
            return port
    raise RuntimeError(f"no free block of {PORT_BLOCK} ports in {low}-{high - 1}")


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
