"""Every port the server listens on is bound first, as vLLM binds its port before it builds its engine: a port
another process holds fails the start at once with one clear line (vLLM's `[Errno 98] Address already in
use`, here naming the port and whose it is), exit 1, before any log file is opened or port left bound."""
from __future__ import annotations

import socket
import subprocess
import sys
from contextlib import contextmanager

import pytest

from server.serve import PortInUse
from server.testing import free_port, running_server

CLUSTER = """
instances:
  - {{name: small, model: meta-llama/Llama-3.1-8B, hardware: H100, max-model-len: 4096, port: {port_a}}}
  - {{name: other, model: meta-llama/Llama-3.1-8B, served_model_name: other, hardware: H100,
     max-model-len: 4096, port: {port_b}}}
"""


@contextmanager
def _held(port: int):
    """Another process's listener on `port` (every interface, as a server's)."""
    with socket.socket() as sock:
        sock.bind(("", port))
        sock.listen()
        yield


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError:
            return False
        return True


def test_a_cluster_instance_port_that_is_taken_fails_the_start_before_anything_starts(tmp_path):
    front, port_a, port_b = free_port(), free_port(), free_port()
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(CLUSTER.format(port_a=port_a, port_b=port_b))
    request_log = tmp_path / "requests.jsonl"
    with _held(port_b):
        done = subprocess.run([sys.executable, "-m", "vllm_emulator", "serve", "--cluster", str(cluster),
                               "--port", str(front), "--request-log", str(request_log)],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert (f"error: [Errno 98] Address already in use: cannot listen on 0.0.0.0:{port_b} (instance other's port)"
            in done.stderr)
    assert "Starting vLLM server" not in done.stdout + done.stderr
    assert not request_log.exists()  # nothing was started
    assert _bindable(front) and _bindable(port_a)  # the ports bound before it were let go


async def test_an_engine_port_that_is_taken_fails_before_the_request_log_is_opened(tmp_path):
    port = free_port()
    request_log = tmp_path / "requests.jsonl"
    with _held(port + 2), pytest.raises(PortInUse, match=rf"{port + 2} \(engine 1's port \(--port-per-engine\)\)"):
        async with running_server("--port", str(port), "--data-parallel-size", "2", "--port-per-engine",
                                  "--request-log", str(request_log)):
            pass
    assert not request_log.exists()
    assert _bindable(port) and _bindable(port + 1)


async def test_the_front_door_port_taken_is_named(tmp_path):
    port = free_port()
    with _held(port), pytest.raises(PortInUse, match=rf"Address already in use: .*:{port} \(--port\)"):
        async with running_server("--port", str(port)):
            pass
