"""P/D between processes: the decode pod tells the prefill pod that it has read a request's KV.

In vLLM the NIXL decode worker, once it has pulled a request's blocks, sends the prefill worker a
notification over NIXL, and the prefill side frees them at once (without it, they wait for the lease:
kv_connector_extra_config.kv_lease_duration, and count as expired). Emulated pods started as separate
processes have no NIXL between them; this is its stand-in: when a decode pod's load from a prefill in
another process ends (or it aborts the request before the load began, or its route turns the request away
before its engine: NIXL's empty read, no transfer), it
POSTs the prefill's `remote_engine_id` and `remote_request_id` to `/emulator/kv_transfer/read` at the
`remote_host`/`remote_port` its kv_transfer_params named (an emulated prefill pod answers there with the
address it advertises); the prefill pod frees the blocks at its present. A pod that is not an emulator
(404) or not reachable is left to its lease, as a lost notification would be.
"""
from __future__ import annotations

import asyncio
import logging

import aiohttp
from aiohttp import web

from emulator.kv_stats import KVMove
from emulator.simulation import Simulation

log = logging.getLogger("vllm_emulator.kv_read_notice")
ROUTE = "/emulator/kv_transfer/read"
TRANSFER_FIELDS = ("connector", "num_bytes", "seconds", "blocks", "ranks", "descriptors")


class KVReadNotices:
    """Sends a decode pod's read notices (fire and forget: a notice never holds up serving)."""

    def __init__(self, sim: Simulation) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._pending: set[asyncio.Task] = set()
        sim.transfers.remote_read_listeners.append(self._read)

    def _read(self, params: dict, move: KVMove | None) -> None:
        host, port = params.get("remote_host"), params.get("remote_port")
        if not host or not isinstance(port, int) or not 0 < port < 65536:
            return  # nowhere to tell: the prefill side's lease frees its blocks
        body = {"remote_engine_id": str(params.get("remote_engine_id")),
                "remote_request_id": str(params.get("remote_request_id")),
                # what was read, for the prefill side's own counters (bytes sent, a Mooncake push); none: freed unread
                "transfer": None if move is None else {field: getattr(move, field) for field in TRANSFER_FIELDS}}
        task = asyncio.get_running_loop().create_task(self._send(f"http://{host}:{port}{ROUTE}", body))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _send(self, url: str, body: dict) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        try:
            async with self._session.post(url, json=body) as response:
                if response.status != 200:
                    log.debug("KV read notice to %s: HTTP %d", url, response.status)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            log.debug("KV read notice to %s not delivered: %s", url, exc)

    async def close(self) -> None:
        for task in list(self._pending):
            task.cancel()
        if self._session is not None:
            await self._session.close()


async def read_notice(request: web.Request, sim: Simulation, catch_up) -> web.Response:
    """The prefill side of a notice: free the blocks held for that request (`catch_up` brings the
    simulation to the present first). Answers whether anything was held under those names."""
    try:
        body = await request.json()
        engine_id, request_id = str(body["remote_engine_id"]), str(body["remote_request_id"])
    except (ValueError, KeyError, TypeError):
        return web.json_response({"error": "expected remote_engine_id and remote_request_id"}, status=400)
    catch_up()
    return web.json_response({"released": sim.transfers.read_elsewhere(engine_id, request_id,
                                                                       _transfer(body.get("transfer")))})


def _transfer(fields) -> KVMove | None:
    """The transfer a notice describes (None: a notice without one, or one that does not parse)."""
    if not isinstance(fields, dict):
        return None
    try:
        connector = str(fields["connector"])
        num_bytes, seconds = float(fields["num_bytes"]), float(fields["seconds"])
        blocks, ranks, descriptors = (int(fields[name]) for name in ("blocks", "ranks", "descriptors"))
    except (KeyError, TypeError, ValueError, OverflowError):
        return None
    if not (0 <= num_bytes < float("inf") and 0 <= seconds < float("inf") and blocks >= 0 and ranks >= 1
            and descriptors >= 0):
        return None
    return KVMove("pd", None, None, connector, num_bytes, seconds, blocks, ranks, descriptors)
