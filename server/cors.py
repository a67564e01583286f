"""CORS as vLLM 0.33 answers it: `vllm serve` always installs Starlette's CORSMiddleware with --allowed-origins
(default [], no cross-origin access), --allowed-methods and --allowed-headers (default ["*"]) and
--allow-credentials (default off) (vllm/entrypoints/serve/middleware/register.py), and this is what that
middleware does with them:

- a preflight (OPTIONS with Origin and Access-Control-Request-Method) is answered by the middleware itself,
  on any path: 200 "OK", or 400 "Disallowed CORS origin, method, headers" naming what is not allowed, with
  `Vary`, the allowed methods, `Access-Control-Max-Age: 600`, and the origin where it is allowed;
- every other response that passes through it gets `Vary: Origin`, and, for a request with an allowed
  Origin, `Access-Control-Allow-Origin` (`*`, or the origin itself when specific origins are listed or
  credentials are allowed) and `Access-Control-Allow-Credentials: true` with --allow-credentials.

The middleware sits inside the API-key check (whose 401 goes out without CORS headers), as in vLLM.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

ALL_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "QUERY")  # Starlette's, for "*"
SAFELISTED_HEADERS = {"Accept", "Accept-Language", "Content-Language", "Content-Type"}
MAX_AGE = 600
PREFLIGHT_VARY = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers, " \
                 "Access-Control-Request-Private-Network"
SEEN = web.RequestKey("cors_seen", bool)  # the request passed through the middleware: its response is CORS's
PREFLIGHT = web.ResponseKey("cors_preflight", bool)  # the middleware's answer: its head in Starlette's order

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class CORSPolicy:
    """vLLM's four CORS flags, as CORSMiddleware's arguments."""
    allow_origins: tuple[str, ...] = ()
    allow_methods: tuple[str, ...] = ("*",)
    allow_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    methods: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", ALL_METHODS if "*" in self.allow_methods else tuple(self.allow_methods))

    @property
    def all_origins(self) -> bool:
        return "*" in self.allow_origins

    @property
    def all_headers(self) -> bool:
        return "*" in self.allow_headers

    def allowed_origin(self, origin: str) -> bool:
        return self.all_origins or origin in self.allow_origins

    def preflight(self, request: web.Request) -> web.Response:
        """The middleware's own answer to a preflight."""
        origin = request.headers["Origin"]
        method = request.headers["Access-Control-Request-Method"]
        asked_headers = request.headers.get("Access-Control-Request-Headers")
        explicit = not self.all_origins or self.allow_credentials  # the origin echoed, not "*"
        headers = {"Vary": PREFLIGHT_VARY}
        if not explicit:
            headers["Access-Control-Allow-Origin"] = "*"
        headers["Access-Control-Allow-Methods"] = ", ".join(self.methods)
        headers["Access-Control-Max-Age"] = str(MAX_AGE)
        allowed_headers = sorted(SAFELISTED_HEADERS | set(self.allow_headers))
        if not self.all_headers:
            headers["Access-Control-Allow-Headers"] = ", ".join(allowed_headers)
        if self.allow_credentials:
            headers["Access-Control-Allow-Credentials"] = "true"
        failures = []
        if self.allowed_origin(origin):
            if explicit:
                headers["Access-Control-Allow-Origin"] = origin
        else:
            failures.append("origin")
        if method not in self.methods:
            failures.append("method")
        if self.all_headers and asked_headers is not None:
            headers["Access-Control-Allow-Headers"] = asked_headers  # any header asked for is mirrored
        elif asked_headers is not None:
            lowered = {h.lower() for h in allowed_headers}
            if any(h.strip().lower() not in lowered for h in asked_headers.split(",")):
                failures.append("headers")
        if request.headers.get("Access-Control-Request-Private-Network") is not None:
            failures.append("private-network")  # vLLM does not set allow_private_network
        text, status = ("Disallowed CORS " + ", ".join(failures), 400) if failures else ("OK", 200)
        response = web.Response(text=text, status=status, headers=headers, content_type="text/plain",
                                charset="utf-8")
        response[PREFLIGHT] = True
        return response

    def add_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        """What the middleware adds to the head of a response that passed through it."""
        headers = response.headers
        origin = request.headers.get("Origin")
        if origin is not None:
            if self.all_origins:
                headers["Access-Control-Allow-Origin"] = "*"
            if self.allow_credentials:
                headers["Access-Control-Allow-Credentials"] = "true"
        if origin is not None and (self.all_origins and self.allow_credentials or
                                   not self.all_origins and self.allowed_origin(origin)):
            headers["Access-Control-Allow-Origin"] = origin
        _vary_origin(headers)


def _vary_origin(headers) -> None:
    """Starlette appends Origin to whatever Vary the response has."""
    values = headers.getall("Vary", [])
    headers.popall("Vary", None)
    headers["Vary"] = ", ".join([*values, "Origin"])


def middleware(policy: CORSPolicy):
    """The aiohttp middleware (innermost but for the handler: inside the API-key check)."""
    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "OPTIONS" and "Origin" in request.headers \
                and "Access-Control-Request-Method" in request.headers:
            return policy.preflight(request)
        request[SEEN] = True  # its response (the handler's, or a 404 / 405 for it) gets the headers
        return await handler(request)
    return cors


def on_prepare(policy: CORSPolicy):
    """The headers go on as the head is sent: a streamed response is prepared inside its handler."""
    async def add(request: web.Request, response: web.StreamResponse) -> None:
        if request.get(SEEN) and not response.get(PREFLIGHT):
            policy.add_headers(request, response)
    return add
