"""--enable-log-requests / --enable-log-outputs: simulated (tests/test_request_log.py: vLLM's "Received request
..." / "Generated response ..." lines), so not listed as not simulated, with vLLM 0.33's start-up check of the
pair (entrypoints/common/cli_args.py validate_parsed_serve_args)."""
from __future__ import annotations

import pytest

from server.serving import SIMULATED_VLLM_FLAGS, frontend_switches
from server.testing import serve_args


def test_log_outputs_needs_log_requests_as_in_vllm():
    with pytest.raises(ValueError, match="^Error: --enable-log-outputs requires --enable-log-requests$"):
        frontend_switches(serve_args("--enable-log-outputs"))
    with pytest.raises(ValueError):
        frontend_switches(serve_args("--enable-log-outputs", "--disable-log-requests"))
    frontend_switches(serve_args("--enable-log-requests", "--enable-log-outputs"))
    frontend_switches(serve_args("--disable-log-outputs"))


def test_request_logging_flags_are_simulated():
    assert {"--enable-log-requests", "--enable-log-outputs", "--enable-log-deltas", "--max-log-len"} <= \
        SIMULATED_VLLM_FLAGS
