"""vLLM 0.33's session id of a request: the stable identity of a conversation or agent session that its KV
events publish (BlockStored.session_id), apart from the `user`/X-Session-Id key the cluster's router keeps
sessions on (Request.session).

vLLM's front end (`entrypoints/generate/base/serving.py` `_get_session_id`) takes the body's `session_id`,
else the `X-Session-ID` header, else a non-empty string `vllm_xargs["session_id"]`; an empty value is no
session id. Its /inference/v1/generate route reads the header alone (its request has neither field).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SESSION_ID_HEADER = "X-Session-ID"


def vllm_session_id(req: Any, headers: Mapping[str, str] | None) -> str | None:
    """The session id vLLM gives the engine for request `req` (a pydantic request: its `session_id` and
    `vllm_xargs` where it has them) sent with `headers` (None: none, as in a batch file)."""
    if body := getattr(req, "session_id", None):
        return body
    if headers is not None and (header := headers.get(SESSION_ID_HEADER)):
        return header
    xargs = getattr(req, "vllm_xargs", None)
    if isinstance(xargs, dict) and isinstance(xargs.get("session_id"), str) and xargs["session_id"]:
        return xargs["session_id"]
    return None
