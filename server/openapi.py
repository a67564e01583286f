"""The API's documentation, as FastAPI gives it to `vllm serve`: /openapi.json, /docs and /redoc.

The OpenAPI 3.1 document lists every route the app serves, with the JSON Schema of the request
bodies taken from the same pydantic models that validate them (server/protocol.py) and vLLM's
error body for the error answers; /docs (Swagger UI) and /redoc (ReDoc) are the pages FastAPI
serves, which load their scripts from the jsDelivr CDN as FastAPI's do. `--disable-fastapi-docs`
leaves all three out, as in vLLM.
"""
from __future__ import annotations

import functools

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from server.errors import json_response
from server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeChatRequest,
                             TokenizeCompletionRequest)

OPENAPI_URL, DOCS_URL, REDOC_URL = "/openapi.json", "/docs", "/redoc"
CDN = "https://cdn.jsdelivr.net/npm"


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
}
STREAMING = {"/v1/completions", "/v1/chat/completions", "/invocations"}
DOCUMENTATION = {OPENAPI_URL, DOCS_URL, REDOC_URL}


def openapi_document(app: web.Application) -> dict:
    """The OpenAPI 3.1 document of the app's routes."""
    models = [ErrorResponse] + list(dict.fromkeys(m for ms in REQUEST_BODIES.values() for m in ms))
    _, schemas = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
    paths: dict[str, dict] = {}
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else None
        if path is None or path in DOCUMENTATION or route.method == "HEAD":
            continue
        paths.setdefault(path, {})[route.method.lower()] = _operation(path, route)
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


SWAGGER_UI = f"""<!DOCTYPE html>
<html>
<head>
<link type="text/css" rel="stylesheet" href="{CDN}/swagger-ui-dist@5/swagger-ui.css">
<title>FastAPI - Swagger UI</title>
</head>
<body>
<div id="swagger-ui"></div>
<script src="{CDN}/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>
SwaggerUIBundle({{url: "{OPENAPI_URL}", dom_id: "#swagger-ui", layout: "BaseLayout", deepLinking: true,
                  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset]}})
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


def add_documentation_routes(app: web.Application) -> None:
    """/openapi.json (built once, from the routes the app has when first asked), /docs and /redoc."""
    document = functools.lru_cache(maxsize=1)(lambda: openapi_document(app))

    async def openapi(request: web.Request) -> web.Response:
        return json_response(document())

    async def swagger_ui(request: web.Request) -> web.Response:
        return web.Response(text=SWAGGER_UI, content_type="text/html")

    async def redoc(request: web.Request) -> web.Response:
        return web.Response(text=REDOC, content_type="text/html")

    app.router.add_get(OPENAPI_URL, openapi)
    app.router.add_get(DOCS_URL, swagger_ui)
    app.router.add_get(REDOC_URL, redoc)
