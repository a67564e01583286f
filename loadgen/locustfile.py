"""A locustfile for vLLM's OpenAI API (the emulator, or a real vLLM): streamed requests, with TTFT,
ITL and E2E as metrics of their own beside Locust's request row.

    pip install 'vllm-emulator[locust]'
    locust -f loadgen/locustfile.py --headless -H http://127.0.0.1:8000 -u 32 -r 8 -t 60s \\
        [--trace TRACE [--trace-format FMT]] [--input-len lognormal:1000:0.5 --output-len 128] \\
        [--endpoint completions|chat] [--model NAME] [--tokenizer DIR] [--wait 0]

Each user sends one request after another (a closed loop; `--wait S` adds think time).
Requests come in turn from a trace (any format `vllm-emulator replay` reads: its prompt
and output lengths, cycled; Locust sets the pace, not the trace's timestamps) or from the
length distributions given (synthetic.LENGTH_FORMS), with prompts sized for the server's
tokenizer and `ignore_eos`, as `vllm-emulator loadgen` sends them. Locust's table then
shows, besides `POST /v1/completions` (time to the response headers), rows of type TTFT
(time to the first content chunk), ITL (each gap between content chunks) and E2E (time to
the last one), in milliseconds, measured as `vllm bench serve` measures them. Every request
carries `Authorization: Bearer $OPENAI_API_KEY` when that is set (a server started with --api-key).
"""
from __future__ import annotations

import itertools
import json
import time
import urllib.error
import urllib.request

from locust import FastHttpUser, events, task

from loadgen.http_replay import ENDPOINTS, api_headers, plan, unauthorized_hint
from loadgen.prompts import PromptBuilder
from loadgen.synthetic import LENGTH_FORMS, synthetic
from loadgen.traces import FORMATS, read_trace

POOL_SIZE = 2000  # distinct requests prepared before the test starts, then cycled
_pool: list = []
_next = itertools.count()


@events.init_command_line_parser.add_listener
def _arguments(parser) -> None:
    parser.add_argument("--trace", default="", help="a request trace for prompt and output lengths")
    parser.add_argument("--trace-format", default="", choices=["", *FORMATS], help="default: detected")
    parser.add_argument("--input-len", default="1024",
                        help=f"prompt lengths without a trace: {', '.join(LENGTH_FORMS)}")
    parser.add_argument("--output-len", default="128", help="output lengths without a trace, same forms")
    parser.add_argument("--endpoint", default="completions", choices=list(ENDPOINTS))
    parser.add_argument("--model", default="", help="default: the server's first model in /v1/models")
    parser.add_argument("--tokenizer", default="", help="the server's tokenizer directory (default: the emulator's)")
    parser.add_argument("--wait", type=float, default=0.0, help="seconds each user waits between requests")
    parser.add_argument("--seed", type=int, default=0)


@events.test_start.add_listener
def _prepare(environment, **_kwargs) -> None:
    """Build every request body once, before the first user starts."""
    from profiles.tokenizer import load_tokenizer
    options = environment.parsed_options
    tokenizer = load_tokenizer(options.tokenizer or None)
    if options.trace:
        records = list(itertools.islice(read_trace(options.trace, options.trace_format or None, tokenizer), POOL_SIZE))
    else:
        records = list(synthetic(POOL_SIZE, options.input_len, options.output_len, seed=options.seed))
    model = options.model
    if not model:
        request = urllib.request.Request(environment.host.rstrip("/") + "/v1/models", headers=api_headers())
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                model = json.loads(resp.read())["data"][0]["id"]
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                raise RuntimeError(f"{exc.url} answered HTTP 401: {unauthorized_hint()}") from None
            raise
    builder = PromptBuilder(tokenizer, chat=options.endpoint == "chat", seed=options.seed)
    _pool[:] = plan(records, builder, model, options.endpoint, True, "locust-")


class OpenAIUser(FastHttpUser):
    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.headers = api_headers()
        self.path = ENDPOINTS[options.endpoint]
        self.chat = options.endpoint == "chat"

    def wait_time(self) -> float:
        return self.environment.parsed_options.wait

    def _metric(self, kind: str, seconds: float) -> None:
        self.environment.events.request.fire(request_type=kind, name=self.path, response_time=seconds * 1000,
                                             response_length=0, exception=None, context={})

    @task
    def generate(self) -> None:
        item = _pool[next(_next) % len(_pool)]
        start = time.perf_counter()
        chunks: list[float] = []
        with self.client.post(self.path, data=item.body, headers=self.headers, stream=True,
                              catch_response=True) as response:
            if response.status_code != 200:
                hint = f" ({unauthorized_hint()})" if response.status_code == 401 else ""
                response.failure(f"HTTP {response.status_code}: {(response.text or '')[:200]}{hint}")
                return
            raw = response._response  # geventhttpclient's response: readline() hands each SSE line as it arrives
            while True:
                line = raw.readline(b"\n")
                if not line:
                    break
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                data = json.loads(line[6:])
                choices = data.get("choices") or []
                if not choices:
                    continue
                delta = choices[0].get("delta")
                if (not self.chat and "text" in choices[0]) or (
                        self.chat and isinstance(delta, dict) and ("role" not in delta or delta.get("content"))):
                    chunks.append(time.perf_counter())
            if not chunks:
                response.failure("the stream ended without a content chunk")
                return
            response.success()
        self._metric("TTFT", chunks[0] - start)
        for before, after in zip(chunks, chunks[1:]):
            self._metric("ITL", after - before)
        self._metric("E2E", chunks[-1] - start)
