"""server.testing.free_port: a port still free when a server binds it later, whatever else runs on the machine:
outside the kernel's ephemeral range (client sockets never take it), never handed out twice by one process,
and never to two processes that pick ports this way at the same time."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from server import testing
from server.testing import PORT_BLOCK, free_port

ROOT = Path(__file__).resolve().parents[1]
HOLDER = ("import sys\nfrom server.testing import free_port\n"
          "print(*[free_port() for _ in range(8)], flush=True)\nsys.stdin.read()\n")


def ephemeral() -> tuple[int, int]:
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    return low, high


def test_a_process_gets_distinct_blocks_outside_the_ephemeral_range():
    ports = [free_port() for _ in range(20)]
    assert len(set(ports)) == len(ports)
    low, high = ephemeral()
    assert all(not (low <= p + i <= high) for p in ports for i in range(PORT_BLOCK))
    blocks = sorted(ports)
    assert all(b - a >= PORT_BLOCK for a, b in zip(blocks, blocks[1:]))  # a block's ranks are its own
    for port in ports:  # free now, on every address, as a server (or a rank's publisher) will bind it
        with socket.create_server(("0.0.0.0", port + PORT_BLOCK - 1)):
            pass


def test_two_processes_never_share_a_block(monkeypatch):
    child = subprocess.Popen([sys.executable, "-c", HOLDER], cwd=ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        theirs = {int(p) for p in child.stdout.readline().split()}
        assert len(theirs) == 8
        # the same walk as the child's (it starts where the pid says): every block it holds is skipped
        monkeypatch.setattr(testing.os, "getpid", lambda: child.pid)
        ours = {free_port() for _ in range(8)}
    finally:
        child.communicate("", timeout=60)
    assert not ours & theirs


def test_a_port_in_use_is_never_handed_out():
    port = free_port()
    with socket.create_server(("127.0.0.1", port + PORT_BLOCK)) as busy:  # the start of some next block
        taken = busy.getsockname()[1]
        assert all(not (p <= taken < p + PORT_BLOCK) for p in (free_port() for _ in range(30)))
