"""A bare aiohttp SSE sender: the most chunks/s one Python process writes to N streams.

    python bench/bare_sse_server.py PORT

The yardstick of bench/server_throughput.py. Every POST opens a stream (the same headers and
HTTP/1.1 chunk framing as `vllm-emulator serve`); one callback writes a completion chunk of
the emulator's size to every open stream, then lets the loop turn (to accept and read), and
again, as fast as the CPU allows: no engine, no pacing, no metrics, nothing formatted per
chunk. /health answers once it listens.
"""
from __future__ import annotations

import asyncio
import sys

from aiohttp import web

CHUNK = (b'data: {"id":"cmpl-bench","object":"text_completion","created":1700000000,'
         b'"model":"meta-llama/Llama-3.1-8B","choices":[{"index":0,"text":" the","logprobs":null,'
         b'"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":null,'
         b'"weight_versions":null}],"kv_transfer_params":null}\n\n')
FRAME = b"%x\r\n%b\r\n" % (len(CHUNK), CHUNK)


class Sender:
    def __init__(self) -> None:
        self.transports: set[asyncio.Transport] = set()
        self.loop = asyncio.get_running_loop()
        self.running = False

    def round(self) -> None:
        for transport in list(self.transports):
            if transport.is_closing():
                self.transports.discard(transport)
            elif transport.get_write_buffer_size() < 256 * 1024:  # the emulator's high-water mark
                transport.write(FRAME)
        self.running = bool(self.transports)
        if self.running:
            self.loop.call_soon(self.round)

    async def stream(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        transport = request.transport
        self.transports.add(transport)
        if not self.running:
            self.running = True
            self.loop.call_soon(self.round)
        await self.loop.create_future()  # streams until the client leaves (the handler is cancelled then)
        return response


async def health(request: web.Request) -> web.Response:
    return web.Response()


async def main(port: int) -> None:
    sender = Sender()
    app = web.Application()
    app.router.add_post("/v1/completions", sender.stream)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run
    run(main(int(sys.argv[1])))
