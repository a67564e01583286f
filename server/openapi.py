"""The API's documentation, as FastAPI gives it to `vllm serve`: /openapi.json, /docs and /redoc.

The OpenAPI 3.1 document lists every route of vLLM's the app serves (not those vLLM registers with
include_in_schema=False: the 403 stand-ins of disabled scale-out routes; nor the emulator's own under
/emulator/, which vLLM has not: the decode pods' KV-read notices, the dev-mode fault injection), with the
JSON Schema of the request bodies taken from the same pydantic models that validate them (server/protocol.py)
and vLLM's error body for the error answers; /docs (Swagger UI, with its OAuth2 redirect page
/docs/oauth2-redirect) and /redoc (ReDoc) are the pages FastAPI serves, which load their scripts from the
jsDelivr CDN as FastAPI's do. `--disable-fastapi-docs` leaves them all out, as in vLLM.
`--enable-offline-docs` (vLLM's, for air-gapped machines) serves /docs with Swagger UI's script and style
from this server's /static and its OAuth2 redirect page, and no /redoc; the assets come from the
`swagger-ui-bundle` package (`pip install 'vllm-emulator[docs]'`), and without it there is no /docs, with
vLLM's warning.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from server.chat_batch import BatchChatCompletionRequest
from server.errors import json_response
from server.generate_protocol import (DerenderChatRequest, DerenderChatStreamRequest, DerenderCompletionRequest,
                                      DerenderCompletionStreamRequest, GenerateRequest)
from server.lora import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from server.messages_protocol import AnthropicCountTokensRequest, AnthropicMessagesRequest
from server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeChatRequest,
                             TokenizeCompletionRequest)
from server.responses_protocol import ResponsesRequest

OPENAPI_URL, DOCS_URL, REDOC_URL = "/openapi.json", "/docs", "/redoc"
OAUTH2_REDIRECT_URL = DOCS_URL + "/oauth2-redirect"
CDN = "https://cdn.jsdelivr.net/npm"
STATIC_ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css")  # what vLLM's offline docs serve under /static
log = logging.getLogger("vllm_emulator.server")


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    """vLLM's error body (server/errors.py writes it)."""
    error: ErrorInfo


# the request body of each route that takes one (several: any of them)
REQUEST_BODIES: dict[str, tuple[type[BaseModel], ...]] = {
    "/v1/completions": (CompletionRequest,),
    "/v1/chat/completions": (ChatCompletionRequest,),
    "/invocations": (ChatCompletionRequest, CompletionRequest),
    "/tokenize": (TokenizeCompletionRequest, TokenizeChatRequest),
    "/detokenize": (DetokenizeRequest,),
    "/v1/responses": (ResponsesRequest,),
    "/v1/messages": (AnthropicMessagesRequest,),
    "/v1/messages/count_tokens": (AnthropicCountTokensRequest,),
    "/v1/chat/completions/batch": (BatchChatCompletionRequest,),
    "/v1/chat/completions/render": (ChatCompletionRequest,),
    "/v1/messages/render": (AnthropicMessagesRequest,),
    "/v1/completions/render": (CompletionRequest,),
    "/v1/responses/render": (ResponsesRequest,),
    "/v1/chat/completions/derender": (DerenderChatRequest, DerenderChatStreamRequest),
    "/v1/completions/derender": (DerenderCompletionRequest, DerenderCompletionStreamRequest),
    "/inference/v1/generate": (GenerateRequest,),
    "/v1/load_lora_adapter": (LoadLoRAAdapterRequest,),
    "/v1/unload_lora_adapter": (UnloadLoRAAdapterRequest,),
}
STREAMING = {"/v1/completions", "/v1/chat/completions", "/invocations", "/v1/responses", "/v1/messages",
             "/inference/v1/generate"}
EMULATOR_ROUTES = "/emulator/"  # the emulator's own routes: not vLLM's API, so not in its document
DOCUMENTATION = {OPENAPI_URL, DOCS_URL, REDOC_URL, OAUTH2_REDIRECT_URL, *(f"/static/{name}" for name in STATIC_ASSETS)}


def hidden(handler):
    """Keep a route's handler out of the document (FastAPI's include_in_schema=False)."""
    handler.include_in_schema = False
    return handler


def openapi_document(app: web.Application) -> dict:
    """The OpenAPI 3.1 document of the app's routes, with the schemas of their request bodies."""
    paths: dict[str, dict] = {}
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else None
        if (path is None or path in DOCUMENTATION or path.startswith(EMULATOR_ROUTES) or route.method == "HEAD"
                or not getattr(route.handler, "include_in_schema", True)):
            continue
        paths.setdefault(path, {})[route.method.lower()] = _operation(path, route)
    models = [ErrorResponse] + list(dict.fromkeys(m for path in paths for m in REQUEST_BODIES.get(path, ())))
    _, schemas = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
    return {"openapi": "3.1.0", "info": {"title": "FastAPI", "version": "0.1.0"}, "paths": paths,
            "components": {"schemas": schemas.get("$defs", {})}}


def _operation(path: str, route: web.AbstractRoute) -> dict:
    name = route.handler.__name__
    operation = {"summary": name.replace("_", " ").title(),
                 "operationId": f"{name}{path.replace('/', '_')}_{route.method.lower()}"}
    if route.handler.__doc__:
        operation["description"] = " ".join(route.handler.__doc__.split())
    content: dict = {"application/json": {"schema": {}}}
    if path in STREAMING:
        content["text/event-stream"] = {"schema": {"type": "string"}}
    responses = {"200": {"description": "Successful Response", "content": content}}
    bodies = REQUEST_BODIES.get(path)
    if bodies:
        refs = [{"$ref": f"#/components/schemas/{m.__name__}"} for m in bodies]
        operation["requestBody"] = {"content": {"application/json": {"schema": refs[0] if len(refs) == 1
                                                                     else {"anyOf": refs}}}, "required": True}
        error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
        responses["400"] = {"description": "Bad Request", **error}
        responses["404"] = {"description": "Not Found", **error}
        responses["500"] = {"description": "Internal Server Error", **error}
    operation["responses"] = responses
    return operation


def swagger_ui_page(assets: str, oauth2_redirect: bool = False) -> str:
    """The /docs page, its script and style loaded from `assets` (a URL prefix)."""
    redirect = f', oauth2RedirectUrl: window.location.origin + "{OAUTH2_REDIRECT_URL}"' if oauth2_redirect else ""
    return f"""<!DOCTYPE html>
<html>
<head>
<link type="text/css" rel="stylesheet" href="{assets}/swagger-ui.css">
<title>FastAPI - Swagger UI</title>
</head>
<body>
<div id="swagger-ui"></div>
<script src="{assets}/swagger-ui-bundle.js"></script>
<script>
SwaggerUIBundle({{url: "{OPENAPI_URL}", dom_id: "#swagger-ui", layout: "BaseLayout", deepLinking: true,
                  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset]{redirect}}})
</script>
</body>
</html>
"""


SWAGGER_UI = swagger_ui_page(f"{CDN}/swagger-ui-dist@5", oauth2_redirect=True)

# FastAPI's /docs/oauth2-redirect (its docs have it whenever /docs is online): the page an OAuth2 provider sends
# the browser back to; it hands the code or token, or the error, to the Swagger UI window that opened it
OAUTH2_REDIRECT = r"""<!doctype html>
<html lang="en-US">
<head>
    <title>Swagger UI: OAuth2 Redirect</title>
</head>
<body>
<script>
    'use strict';
    function run () {
        var oauth2 = window.opener.swaggerUIRedirectOauth2;
        var sentState = oauth2.state;
        var redirectUrl = oauth2.redirectUrl;
        var query = /code|token|error/.test(window.location.hash)
            ? window.location.hash.substring(1) : location.search.substring(1);
        var params = {};
        query.replace(/\+/g, " ").split("&").forEach(function (pair) {
            var at = pair.indexOf("=");
            if (at > 0) { params[decodeURIComponent(pair.slice(0, at))] = decodeURIComponent(pair.slice(at + 1)); }
        });
        var isValid = params.state === sentState;
        var flow = oauth2.auth.schema.get("flow");
        if ((flow === "accessCode" || flow === "authorizationCode" || flow === "authorization_code")
                && !oauth2.auth.code) {
            if (!isValid) {
                oauth2.errCb({authId: oauth2.auth.name, source: "auth", level: "warning",
                              message: "Authorization may be unsafe, passed state was changed in server. "
                                       + "The passed state wasn't returned from auth server."});
            }
            if (params.code) {
                delete oauth2.state;
                oauth2.auth.code = params.code;
                oauth2.callback({auth: oauth2.auth, redirectUrl: redirectUrl});
            } else {
                var oauthErrorMsg = params.error ? "[" + params.error + "]: " + (params.error_description
                    ? params.error_description + ". " : "no accessCode received from the server. ")
                    + (params.error_uri ? "More info: " + params.error_uri : "") : "";
                oauth2.errCb({authId: oauth2.auth.name, source: "auth", level: "error", message: oauthErrorMsg
                              || "[Authorization failed]: no accessCode received from the server."});
            }
        } else {
            oauth2.callback({auth: oauth2.auth, token: params, isValid: isValid, redirectUrl: redirectUrl});
        }
        window.close();
    }
    if (document.readyState !== "loading") { run(); }
    else { document.addEventListener("DOMContentLoaded", run); }
</script>
</body>
</html>
"""

REDOC = f"""<!DOCTYPE html>
<html>
<head>
<title>FastAPI - ReDoc</title>
<meta charset="utf-8"/>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body {{ margin: 0; padding: 0; }}</style>
</head>
<body>
<noscript>ReDoc requires Javascript to function. Please enable it to browse the documentation.</noscript>
<redoc spec-url="{OPENAPI_URL}"></redoc>
<script src="{CDN}/redoc@2/bundles/redoc.standalone.js"></script>
</body>
</html>
"""


def swagger_assets() -> Path | None:
    """The folder of Swagger UI's files that the `swagger-ui-bundle` package ships, if it is installed."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    folder = Path(str(swagger_ui_path))
    return folder if all((folder / name).is_file() for name in STATIC_ASSETS) else None


def add_documentation_routes(app: web.Application, offline: bool = False) -> None:
    """/openapi.json (built once, from the routes the app has when first asked), /docs and /redoc; with
    `offline`, /docs from local assets and no /redoc, as vLLM's --enable-offline-docs."""
    document = functools.lru_cache(maxsize=1)(lambda: openapi_document(app))

    async def openapi(request: web.Request) -> web.Response:
        return json_response(document())

    app.router.add_get(OPENAPI_URL, openapi)
    if not offline:
        app.router.add_get(DOCS_URL, _page(SWAGGER_UI))
        app.router.add_get(OAUTH2_REDIRECT_URL, _page(OAUTH2_REDIRECT))
        app.router.add_get(REDOC_URL, _page(REDOC))
        return
    assets = swagger_assets()
    if assets is None:
        log.warning("Static directory not found: Swagger UI's assets come with the swagger-ui-bundle package "
                    "(pip install 'vllm-emulator[docs]'). Offline docs will not be available.")
        return
    for name in STATIC_ASSETS:
        app.router.add_get(f"/static/{name}", _file(assets / name))
    app.router.add_get(DOCS_URL, _page(swagger_ui_page("/static", oauth2_redirect=True)))
    app.router.add_get(OAUTH2_REDIRECT_URL, _file(assets / "oauth2-redirect.html"))
    log.info("Offline documentation enabled with vendored static assets")


def _page(html: str):
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=html, content_type="text/html")
    return handler


def _file(path: Path):
    async def handler(request: web.Request) -> web.FileResponse:
        return web.FileResponse(path)
    return handler
