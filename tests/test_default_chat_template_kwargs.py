"""`vllm serve --default-chat-template-kwargs JSON`: the server's template kwargs, under each request's
chat_template_kwargs (vLLM 0.33's ChatParams.with_defaults: a request's value wins unless it is None or "auto";
its reasoning_effort sets enable_thinking over the default), on every route that renders a chat."""
from __future__ import annotations

import aiohttp
import pytest

from profiles.tokenizer import load_tokenizer
from server.chat import with_default_kwargs
from server.serving import SIMULATED_VLLM_FLAGS, frontend_switches
from server.testing import running_server, serve_args

FAST = ("--speed", "1000")
QWEN = "Qwen/Qwen3-30B-A3B"
USER = [{"role": "user", "content": "Hi there"}]
FLAVOURED = ("{{ flavour }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
             "{% if add_generation_prompt %}[assistant]{% endif %}")
NO_THINKING = "<|im_start|>assistant\n<think>\n\n</think>\n\n"


async def _post(server, path: str, body: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.post(server.url + path, json=body) as r:
        return r.status, await r.json()


def test_flag_is_simulated_and_read_as_json():
    assert "--default-chat-template-kwargs" in SIMULATED_VLLM_FLAGS
    read = frontend_switches(serve_args("--default-chat-template-kwargs", '{"enable_thinking": false}'))
    assert read["default_chat_template_kwargs"] == {"enable_thinking": False}
    assert frontend_switches(serve_args())["default_chat_template_kwargs"] == {}
    assert frontend_switches(serve_args("--default-chat-template-kwargs", "null"))["default_chat_template_kwargs"] == {}
    with pytest.raises(ValueError, match=r"argument --default-chat-template-kwargs: invalid loads value: '\{x'"):
        frontend_switches(serve_args("--default-chat-template-kwargs", "{x"))
    with pytest.raises(ValueError, match="expected a JSON object"):
        frontend_switches(serve_args("--default-chat-template-kwargs", "[1]"))


def test_request_values_win_unless_unset():
    defaults = {"enable_thinking": False, "flavour": "mint"}
    assert with_default_kwargs(defaults, {"enable_thinking": True, "flavour": None, "x": "auto"}) == {
        "enable_thinking": True, "flavour": "mint"}
    assert with_default_kwargs({}, {"flavour": None}) == {"flavour": None}  # no defaults: the request's unchanged


async def test_defaults_reach_the_template_under_the_requests_own():
    tokenizer = load_tokenizer(None, "qwen3")
    async with running_server(QWEN, *FAST, "--default-chat-template-kwargs", '{"enable_thinking": false}') as server:
        _, body = await _post(server, "/tokenize", {"messages": USER})
        assert tokenizer.decode(body["tokens"], skip_special_tokens=False).endswith(NO_THINKING)
        _, body = await _post(server, "/tokenize", {"messages": USER,
                                                    "chat_template_kwargs": {"enable_thinking": True}})
        assert not tokenizer.decode(body["tokens"], skip_special_tokens=False).endswith(NO_THINKING)
        # None is unset: the default stays
        _, body = await _post(server, "/tokenize", {"messages": USER,
                                                    "chat_template_kwargs": {"enable_thinking": None}})
        assert tokenizer.decode(body["tokens"], skip_special_tokens=False).endswith(NO_THINKING)
        # a reasoning effort turns thinking on over the server's default (vLLM's build_chat_params)
        _, body = await _post(server, "/v1/chat/completions", {"messages": USER, "reasoning_effort": "high",
                                                               "max_tokens": 1, "return_token_ids": True})
        assert not tokenizer.decode(body["prompt_token_ids"], skip_special_tokens=False).endswith(NO_THINKING)


async def test_every_chat_route_renders_with_the_defaults():
    tokenizer = load_tokenizer()
    expected = tokenizer.encode("mint[user]Hi there[assistant]", add_special_tokens=False)
    async with running_server(*FAST, "--enable-scale-out", "--chat-template", FLAVOURED,
                              "--default-chat-template-kwargs", '{"flavour": "mint"}') as server:
        model = server.running.servings[0].model_name
        status, body = await _post(server, "/tokenize", {"messages": USER})
        assert status == 200 and body["tokens"] == expected
        status, body = await _post(server, "/v1/chat/completions", {"messages": USER, "max_tokens": 2})
        assert status == 200 and body["usage"]["prompt_tokens"] == len(expected)
        status, body = await _post(server, "/v1/chat/completions/batch", {"messages": [USER, USER], "max_tokens": 2})
        assert status == 200 and body["usage"]["prompt_tokens"] == 2 * len(expected)
        status, body = await _post(server, "/v1/chat/completions/render", {"messages": USER})
        assert status == 200 and body["token_ids"] == expected
        assert body["parse_context"]["chat_template_kwargs"] == {
            "flavour": "mint", "add_generation_prompt": True, "continue_final_message": False}
        status, body = await _post(server, "/v1/responses", {"input": "Hi there", "max_output_tokens": 2})
        assert status == 200 and body["usage"]["input_tokens"] == len(expected) + 1  # Responses adds BOS
        status, body = await _post(server, "/v1/messages", {"model": model, "messages": USER, "max_tokens": 2})
        assert status == 200 and body["usage"]["input_tokens"] == len(expected)
        status, body = await _post(server, "/v1/messages/count_tokens", {"model": model, "messages": USER})
        assert status == 200 and body["input_tokens"] == len(expected)
        # the request's own value wins
        _, body = await _post(server, "/tokenize", {"messages": USER, "chat_template_kwargs": {"flavour": "lime"}})
        assert tokenizer.decode(body["tokens"]).startswith("lime[user]")


async def test_a_default_chat_template_is_the_servers_own_and_needs_no_trust():
    tokenizer = load_tokenizer()
    defaults = '{"chat_template": "' + FLAVOURED.replace('"', '\\"') + '", "flavour": "kiwi"}'
    async with running_server(*FAST, "--default-chat-template-kwargs", defaults) as server:
        status, body = await _post(server, "/tokenize", {"messages": USER})
        assert status == 200 and tokenizer.decode(body["tokens"]) == "kiwi[user]Hi there[assistant]"
