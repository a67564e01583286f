"""vLLM-shaped errors: `{"error": {"message", "type", "param", "code"}}` with vLLM's status codes.

`APIError` carries what vLLM's `create_error_response` derives from its exceptions
(`vllm/entrypoints/serve/exception_handling/`): a validation error is
("BadRequestError", 400) with " (parameter=p, value=v)" appended to the message, an
unknown model ("NotFoundError", 404), a full queue 503 with the HTTP phrase as type.
Schema failures are rendered like vLLM's `RequestValidationError` handler: the pydantic
errors listed one per line, type "Bad Request", param the first error's location. Every JSON
answer is encoded as Starlette's JSONResponse encodes it (`json_response`).
"""
from __future__ import annotations

import json
import re
from http import HTTPStatus
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from server.sse import compact_json

_MAX_REPORTED_ERRORS = 10
_MAX_ERROR_INPUT_CHARS = 200
_MAX_ERROR_CHARS = 1000


class APIError(Exception):
    """An error answered with vLLM's error body. Deliberately not a ValueError: pydantic must
    let it through a validator unchanged, as it lets vLLM's own validation errors through."""

    def __init__(self, message: str, *, status: int = 400, err_type: str = "BadRequestError",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.err_type = err_type
        self.param = param

    def body(self) -> dict:
        return error_body(self.message, self.err_type, self.param, self.status)

    def response(self) -> web.Response:
        return json_response(self.body(), status=self.status)


def validation_error(message: str, parameter: str | None = None, value: Any = None) -> APIError:
    """vLLM's VLLMValidationError: a 400 whose message names the parameter and value."""
    extras = []
    if parameter is not None:
        extras.append(f"parameter={parameter}")
    if value is not None:
        extras.append(f"value={value}")
    text = f"{message} ({', '.join(extras)})" if extras else message
    return APIError(text, param=parameter)


def not_found(message: str, param: str | None = None) -> APIError:
    return APIError(message, status=404, err_type="NotFoundError", param=param)


def service_unavailable(message: str) -> APIError:
    return APIError(message, status=503, err_type=HTTPStatus.SERVICE_UNAVAILABLE.phrase)


def internal_error() -> APIError:
    """vLLM's GenerationError: a request whose engine failed it (finish reason "error")."""
    return APIError("Internal server error", status=500, err_type="InternalServerError")


def tokenizer_unavailable() -> APIError:
    """vLLM's renderer without a tokenizer (--skip-tokenizer-init, --tokens-only) asked to tokenize or decode
    (its get_tokenizer's ValueError: a 400)."""
    return APIError("Tokenizer not available when `skip_tokenizer_init=True`")


def token_names_unavailable(prompt_first: bool) -> APIError:
    """vLLM's completion logprobs without a tokenizer and without return_tokens_as_token_ids: a token it cannot
    name. An echoed prompt's first token (no logprob) fails in _create_completion_logprobs, with the parameter;
    any other in _get_decoded_token, without."""
    message = "Unable to get tokenizer because `skip_tokenizer_init=True`"
    return validation_error(message, "skip_tokenizer_init", True) if prompt_first else APIError(message)


def structured_outputs_need_tokenizer() -> APIError:
    """vLLM's SamplingParams check of structured outputs without a tokenizer (a VLLMValidationError)."""
    return APIError("Structured outputs requires a tokenizer so it can't be used with 'skip_tokenizer_init'")


def chat_without_tokenizer() -> APIError:
    """vLLM's chat handlers without a tokenizer: `assert tokenizer is not None` first thing, an AssertionError
    with no message, which its exception handler answers as a 500."""
    return APIError("", status=500, err_type="InternalServerError")


def streaming_error(error: APIError) -> bytes:
    """The SSE event vLLM sends instead of the rest of a stream that failed (json.dumps, not compact)."""
    return f"data: {json.dumps(error.body())}\n\n".encode()


def error_body(message: str, err_type: str, param: str | None, code: int) -> dict:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def json_response(body: Any, status: int = 200) -> web.Response:
    """Starlette's JSONResponse: compact JSON, UTF-8, `application/json`.

    A lone surrogate the body echoes from the request (a model name, say) cannot be UTF-8: in vLLM
    the encoding fails inside the route, and its ValueError handler answers 400 with the codec's
    message. So here.
    """
    try:
        data = compact_json(body, allow_nan=False).encode()
    except UnicodeEncodeError as exc:
        status = 400
        data = compact_json(error_body(str(exc), "BadRequestError", None, status), allow_nan=False).encode()
    return web.Response(body=data, status=status, content_type="application/json")


def http_error(status: int, detail: str) -> web.Response:
    """vLLM's handler for HTTPException: the detail as the message, the status phrase as the type."""
    return json_response(error_body(detail, HTTPStatus(status).phrase, None, status), status)


def schema_error(errors: list[dict] | None = None, *, text: str | None = None,
                 param: str | None = None) -> APIError:
    """vLLM's answer to a request that fails schema validation (FastAPI's RequestValidationError)."""
    if text is not None:
        message = f"1 validation error:\n  {text}"
    else:
        count = len(errors)
        label = "error" if count == 1 else "errors"
        lines = "".join(f"  {_format_error(e)}\n" for e in errors[:_MAX_REPORTED_ERRORS])
        if count > _MAX_REPORTED_ERRORS:
            lines += f"  ...and {count - _MAX_REPORTED_ERRORS} more {label}\n"
        message = f"{count} validation {label}:\n{lines}".rstrip()
        if param is None and errors:
            param = _loc(errors[0]["loc"])
    return APIError(message, err_type=HTTPStatus.BAD_REQUEST.phrase, param=param)


def from_pydantic(exc: ValidationError) -> APIError:
    errors = exc.errors(include_url=False)
    return schema_error([{**e, "loc": ("body", *e["loc"])} for e in errors])


def invalid_json(message: str, position: int) -> APIError:
    """FastAPI's answer to a body that is not JSON: a validation error at the decoder's position."""
    return schema_error([{"type": "json_invalid", "loc": ("body", position), "msg": "JSON decode error",
                          "input": {}, "ctx": {"error": message}}])


def unparsable_body() -> APIError:
    """FastAPI's answer to a body json.loads fails on otherwise (invalid UTF-8, nesting past the
    recursion limit, an integer of more digits than Python converts): an HTTPException(400)."""
    return APIError("There was an error parsing the body", err_type=HTTPStatus.BAD_REQUEST.phrase)


_INTERNAL_LOC = re.compile(r"[\[\]{}()]")
_INTERNAL_MARKERS = frozenset({
    "function-wrap", "function-after", "function-before", "function-plain", "json-or-python",
    "lax-or-strict", "chain", "default", "nullable", "tagged-union", "union", "call", "arguments",
    "is-instance", "is-subclass", "callable", "str", "int", "float", "bool", "bytes", "bytearray",
    "list", "tuple", "dict", "set", "frozenset", "complex", "none", "nonetype"})


def _loc(loc: tuple) -> str:
    """A pydantic location as vLLM reports it: dotted, without pydantic's internal markers."""
    parts = [str(p) for p in loc if not (_INTERNAL_LOC.search(str(p)) or str(p).lower() in _INTERNAL_MARKERS)]
    return ".".join(parts) if parts else ".".join(str(p) for p in loc)


def _summarize(value: object) -> object:
    if isinstance(value, str):
        return value[:_MAX_ERROR_INPUT_CHARS] + "...[truncated]" if len(value) > _MAX_ERROR_INPUT_CHARS else value
    if isinstance(value, (bytes, bytearray)):
        return f"<{type(value).__name__} of {len(value)} bytes>"
    if isinstance(value, (list, tuple, set, frozenset, dict)):
        return f"<{type(value).__name__} of {len(value)} items>"
    try:
        text = str(value)
    except ValueError:  # an int past sys.get_int_max_str_digits()
        return f"<{type(value).__name__}>"
    return text[:_MAX_ERROR_INPUT_CHARS] + "...[truncated]" if len(text) > _MAX_ERROR_INPUT_CHARS else text


def _format_error(err: dict) -> str:
    err = dict(err)
    if "input" in err:
        err["input"] = _summarize(err["input"])
    err["loc"] = _loc(tuple(err["loc"]))
    text = str(err)  # (a validator's exception in ctx shows as its repr, ValueError('...'), as vLLM's does)
    return text[:_MAX_ERROR_CHARS] + "...[truncated]" if len(text) > _MAX_ERROR_CHARS else text
