"""With VLLM_DISABLE_REQUEST_ID_RANDOMIZATION, a request id is in use while any engine request of a request under it
runs: with n > 1 those are vLLM's children "<c>_<id>" (ParentRequest.get_child_info), and the first of them may have
ended while the others run; and the children a new request of n choices would make must not be in use either. The
server then gives the new request vLLM's random suffix after all (as for any id in use). Virtual time."""
from __future__ import annotations

import logging

import pytest

from emulator.cluster import ClusterSpec, build_cluster
from emulator.config import EngineArgs
from emulator.instance import InstanceSpec
from emulator.request import Request
from profiles.deployment import build_deployment
from server.engine_client import EngineClient
from server.generation import OutputPlanner


def _client(*running: str, ended: tuple[str, ...] = ()):
    """A server's engine client (no id randomization) whose one pod runs requests under the ids `running`, those
    `ended` among them aborted since."""
    deployment = build_deployment("meta-llama/Llama-3.1-8B", "H100", EngineArgs(max_model_len=4096))
    sim = build_cluster(ClusterSpec((InstanceSpec("a", deployment, ("m",)),)))
    for request_id in running:
        sim.submit(Request(request_id, 100, 50, prompt_token_ids=list(range(100))))
    sim.advance(0.001)
    for request_id in ended:
        assert sim.abort(request_id)
    return EngineClient(sim, {"m": OutputPlanner([(5, " a")], None)}, 1.0, randomize_request_ids=False), sim


def _suffixed(engine_id: str, request_id: str) -> bool:
    return engine_id.startswith(f"{request_id}-") and len(engine_id) == len(request_id) + 9


@pytest.mark.parametrize("n", [1, 3])
async def test_an_id_whose_first_child_has_ended_is_in_use_while_its_other_children_run(caplog, n):
    client, sim = _client("0_x", "1_x", "2_x", ended=("0_x",))  # the first choice ended (a stop string, say)
    assert "0_x" not in sim.active and "1_x" in sim.active
    with caplog.at_level(logging.WARNING):
        engine_id = client._engine_request_id("x", n)
    assert _suffixed(engine_id, "x") and "'x' is already running" in caplog.text


async def test_a_request_of_n_choices_is_not_given_an_id_whose_children_would_clash():
    """A client named its request "1_x" (one choice); another's "x" with 2 choices would make "1_x" again."""
    client, _ = _client("1_x")
    assert _suffixed(client._engine_request_id("x", 2), "x")


async def test_ids_that_only_look_like_children_do_not_count():
    client, _ = _client("x_1", "a_x", "1a_y", "x-1")
    assert client._engine_request_id("x", 2) == "x" and client._engine_request_id("y") == "y"
