"""LoRA adapters over HTTP, as vLLM 0.33 serves them: `--lora-modules` cards on /v1/models, requests by
adapter name (answered under the adapter's name, on the base model, with their own prefix cache), an
unknown adapter's 404, vllm:lora_requests_info (only with --enable-lora), and the runtime load and unload
routes (only with VLLM_ALLOW_RUNTIME_LORA_UPDATING=1) with vLLM's texts and errors."""
from __future__ import annotations

import json

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.serving import frontend_switches
from server.testing import running_server, serve_args

MODEL = "meta-llama/Llama-3.1-8B"
LORA = ("--speed", "1000", "--enable-lora", "--max-loras", "2", "--enable-prompt-tokens-details",
        "--lora-modules", "sql=org/sql-lora", json.dumps({"name": "chat", "path": "org/chat-lora",
                                                           "base_model_name": MODEL}))
PROMPT = list(range(1000, 1100))


@pytest.fixture
def runtime_lora(monkeypatch):
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1")


async def complete(http: aiohttp.ClientSession, url: str, model: str, prompt=PROMPT) -> tuple[int, dict]:
    async with http.post(url + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 3,
                                                        "ignore_eos": True}) as r:
        return r.status, await r.json()


def lora_series(text: str) -> list:
    return [s for family in text_string_to_metric_families(text) if family.name == "vllm:lora_requests_info"
            for s in family.samples]


async def test_models_lists_each_adapter_after_the_base_model():
    async with running_server(*LORA) as server, aiohttp.ClientSession() as http:
        async with http.get(server.url + "/v1/models") as r:
            cards = (await r.json())["data"]
    assert [(c["id"], c["root"], c["parent"], c["max_model_len"]) for c in cards] == [
        (MODEL, MODEL, None, cards[0]["max_model_len"]), ("sql", "org/sql-lora", MODEL, None),
        ("chat", "org/chat-lora", MODEL, None)]
    assert list(cards[1]) == list(cards[0])
    assert cards[1]["permission"][0]["id"].startswith("modelperm-")


async def test_a_request_by_adapter_name_runs_on_the_base_model_with_its_own_prefix_cache():
    async with running_server(*LORA) as server, aiohttp.ClientSession() as http:
        answers = [await complete(http, server.url, model) for model in ("sql", "chat", "sql", MODEL)]
    assert [status for status, _ in answers] == [200] * 4
    assert [body["model"] for _, body in answers] == ["sql", "chat", "sql", MODEL]  # named after the adapter
    cached = [body["usage"]["prompt_tokens_details"]["cached_tokens"] for _, body in answers]
    assert cached == [0, 0, 96, 0]  # the same prompt hits only under the same adapter


async def test_an_unknown_adapter_gets_vllms_404():
    async with running_server(*LORA) as server, aiohttp.ClientSession() as http:
        status, body = await complete(http, server.url, "sql-v9")
    assert status == 404
    assert body == {"error": {"message": f"The model `sql-v9` does not exist. Valid aliases: {MODEL}.",
                              "type": "NotFoundError", "param": "model", "code": 404}}


async def test_lora_requests_info_labels_the_adapters_and_is_set_each_step():
    async with running_server(*LORA) as server, aiohttp.ClientSession() as http:
        await complete(http, server.url, "sql")
        async with http.get(server.url + "/metrics") as r:
            series = lora_series(await r.text())
    by_labels = {(s.labels["max_lora"], s.labels["waiting_lora_adapters"], s.labels["running_lora_adapters"]): s.value
                 for s in series}
    assert set(by_labels) == {("2", "sql", "sql"), ("2", "", "")}
    assert by_labels[("2", "", "")] >= by_labels[("2", "sql", "sql")] > 1.7e9  # Unix times; the latest: none left


async def test_no_lora_gauge_and_no_adapters_without_enable_lora():
    async with running_server("--speed", "1000") as server, aiohttp.ClientSession() as http:
        async with http.get(server.url + "/metrics") as r:
            text = await r.text()
        async with http.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "b"}) as r:
            assert r.status == 404 and await r.json() == {"detail": "Not Found"}  # no runtime updating either
    assert "vllm:lora_requests_info" not in text


async def test_runtime_load_and_unload_answer_as_vllm(runtime_lora, tmp_path):
    wide = tmp_path / "wide"
    wide.mkdir()
    (wide / "adapter_config.json").write_text(json.dumps({"r": 64, "bias": "none"}))
    async with running_server(*LORA) as server, aiohttp.ClientSession() as http:
        async def post(route: str, body: dict) -> tuple[int, str]:
            async with http.post(server.url + route, json=body) as r:
                return r.status, await r.text()
        assert await post("/v1/load_lora_adapter", {"lora_name": "math", "lora_path": "org/math"}) == \
            (200, "Success: LoRA adapter 'math' added successfully.")
        assert (await complete(http, server.url, "math"))[1]["model"] == "math"
        status, text = await post("/v1/load_lora_adapter", {"lora_name": "math", "lora_path": "org/math"})
        assert (status, json.loads(text)["error"]["type"]) == (400, "InvalidUserInput")
        assert json.loads(text)["error"]["message"].startswith("The lora adapter 'math' has already been loaded.")
        status, text = await post("/v1/load_lora_adapter", {"lora_name": "wide", "lora_path": str(wide)})
        assert status == 500 and json.loads(text)["error"] == {
            "message": "Call to add_lora method failed: LoRA rank 64 is greater than max_lora_rank 16.",
            "type": "InternalServerError", "param": None, "code": 500}
        status, text = await post("/v1/load_lora_adapter", {"lora_name": "gone", "lora_path": "/mnt/adapters/gone"})
        assert (status, json.loads(text)["error"]["message"]) == (
            404, "Loading lora gone failed: No adapter found for <path>")  # vLLM sanitizes paths in errors
        assert await post("/v1/unload_lora_adapter", {"lora_name": "math"}) == \
            (200, "Success: LoRA adapter 'math' removed successfully.")
        status, text = await post("/v1/unload_lora_adapter", {"lora_name": "math"})
        assert (status, json.loads(text)["error"]["message"]) == (404, "The lora adapter 'math' cannot be found.")
        assert (await complete(http, server.url, "math"))[0] == 404
        await complete(http, server.url, "not-loaded")  # vLLM's resolver attempt takes an id
        await post("/v1/load_lora_adapter", {"lora_name": "next", "lora_path": "org/next"})
        ids = {name: a.lora_id for name, a in server.running.servings[0].lora_adapters.adapters.items()}
    # as vLLM counts: math 3, the failed loads of wide and gone 4 and 5, the resolver attempts for the unknown
    # models (math once unloaded, not-loaded) 6 and 7
    assert ids == {"sql": 1, "chat": 2, "next": 8}


async def test_loading_without_enable_lora_fails_in_the_engine_as_vllms(runtime_lora):
    async with running_server("--speed", "1000") as server, aiohttp.ClientSession() as http:
        async with http.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "b"}) as r:
            assert r.status == 500
            assert (await r.json())["error"]["message"] == \
                "Call to add_lora method failed: LoRA is not enabled. Use --enable-lora to enable LoRA."


@pytest.mark.parametrize("argv,message", [
    (("--lora-modules", "sql=org/sql"),
     "Call to add_lora method failed: LoRA is not enabled. Use --enable-lora to enable LoRA."),
    (("--enable-lora", "--lora-modules", "sql=org/sql", "sql=org/other"),
     "The lora adapter 'sql' has already been loaded. If you want to load the adapter in place, set "
     "'load_inplace' to True."),
    (("--enable-lora", "--served-model-name", "m", "--lora-modules", "m=org/m"),
     "The lora adapter 'm' conflicts with a served base model."),
    (("--enable-lora", "--lora-modules", "sql"), "Invalid JSON format for --lora-modules: sql"),
    (("--cluster", "c.yaml", "--lora-modules", "sql=org/sql"),
     "--lora-modules with --cluster: give each instance its own lora-modules in the cluster file"),
])
def test_bad_static_adapters_stop_the_server_with_vllms_message(argv, message):
    with pytest.raises(ValueError) as error:
        frontend_switches(serve_args(*argv))
    assert str(error.value) == message


def test_a_preempted_requests_stale_output_counts_it_waiting_and_a_finished_one_is_dropped():
    from prometheus_client import CollectorRegistry

    from emulator.engine import StepRecord
    from emulator.lora import LoRAAdapter
    from emulator.request import Request, RequestStatus
    from server.metrics import LoRARequestStates
    states = LoRARequestStates(CollectorRegistry(), 2)
    a, b = (Request(name, 1, 1, lora=LoRAAdapter(name, i, name)) for i, name in enumerate(("sql", "chat"), 1))

    def step(end: float, got_token: list, finished: list = ()) -> None:
        states.on_step(StepRecord(0, int(end), end - 1, 1.0, {}, [], {}, 0, got_token, list(finished)))
    a.status = b.status = RequestStatus.RUNNING
    step(1.0, [a, b])
    a.status = RequestStatus.PREEMPTED  # its async step's token comes back after the preemption
    step(2.0, [a, b])
    assert {n: (len(w), len(r)) for n, (w, r) in states.requests.items()} == {"sql": (1, 0), "chat": (0, 1)}
    b.status = RequestStatus.FINISHED_LENGTH_CAPPED
    step(3.0, [b], [b])
    assert states.set_at == {("2", "sql,chat", "sql,chat"): 2.0, ("2", "sql", "sql"): 3.0}
