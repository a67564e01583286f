"""Query parameters read as vLLM's FastAPI routes read them (shared by the dev-mode routes of app.py and
pause_routes.py)."""
from __future__ import annotations

from aiohttp import web

from server.errors import validation_error

# a query flag as FastAPI (pydantic) reads a bool: these spellings, any case; anything else is an error
_TRUE = ("1", "on", "t", "true", "y", "yes")
_FALSE = ("0", "off", "f", "false", "n", "no")


def query_flag(request: web.Request, name: str, default: bool = False) -> bool:
    """A boolean query parameter (`default` when absent; a 400 in vLLM's shape for any other spelling)."""
    value = request.query.get(name)
    if value is None:
        return default
    if value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    raise validation_error(f"{name} must be a boolean: true or false (or 1/0, yes/no, on/off)", name, value)
