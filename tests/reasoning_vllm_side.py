"""vLLM's side of test_reasoning_vllm.py, run with the CPU venv's python (it imports vLLM 0.33).

Reads one JSON job on stdin: {"cases": [...]}, each {"parser", "chat_template_kwargs", "include_reasoning",
"token_ids", "pieces" (the text each token adds), "chunkings" (lists of chunk sizes)}; prints one JSON answer:
the --reasoning-parser names vLLM registers ("registered") and ("cases") for each case vLLM's parser's
(reasoning, content) of the whole output (after include_reasoning, as assemble_chat_message_fields applies
it), its count_reasoning_tokens, and for each chunking the deltas
ChatStreamProcessor.step makes of the chunks (None where vLLM sends no chunk), dumped as vLLM writes them
(exclude_unset).

The tokenizer is a stand-in that knows exactly the case's tokens: vLLM's parsers look up their markers in
get_vocab() and decode token ids one by one, which is all they ask of it here.
"""
from __future__ import annotations

import json
import sys

from tool_parsers_vllm_side import _AnyToken  # (also installs the stand-ins for the parser engines' imports)

MARKERS = {"<think>": 151667, "</think>": 151668}


class _CaseTokenizer:
    """A tokenizer whose vocabulary is the case's tokens (and every marker a parser asks for)."""

    def __init__(self, texts: dict[int, str]) -> None:
        self.texts = texts
        self.vocab = _AnyToken({**{t: i for i, t in texts.items() if t}, **MARKERS})
        self.all_special_ids: list[int] = []

    def get_vocab(self) -> dict[str, int]:
        return self.vocab

    def decode(self, ids, skip_special_tokens: bool = False, **kwargs) -> str:
        return "".join(self.texts.get(i, "") for i in ids)

    def convert_ids_to_tokens(self, ids, **kwargs) -> list[str]:
        return [self.texts.get(i, "") for i in ids]


def run(case: dict) -> dict:
    from vllm.entrypoints.openai.chat_completion.message_assembly import assemble_chat_message_fields
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.chat_completion.stream_processor import ChatStreamProcessor
    from vllm.parser.parser_manager import ParserManager

    ids, pieces = case["token_ids"], case["pieces"]
    tokenizer = _CaseTokenizer(dict(zip(ids, pieces)))
    request = ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "include_reasoning": case["include_reasoning"],
        "chat_template_kwargs": case["chat_template_kwargs"]})
    cls = ParserManager.get_parser(tool_parser_name=None, reasoning_parser_name=case["parser"],
                                   enable_auto_tools=False)
    prompt = [151644, 77091, 198]  # "<|im_start|>assistant\n": the reasoning is open at the prompt's end

    def parser():
        made = cls(tokenizer, None, chat_template_kwargs=case["chat_template_kwargs"])
        made.set_prompt_token_ids(prompt)
        return made

    whole = parser()
    reasoning, content, calls = whole.parse("".join(pieces), request, enable_auto_tools=False,
                                            model_output_token_ids=ids)
    fields = assemble_chat_message_fields(request, reasoning, content, calls, enable_auto_tools=False,
                                          parser_cls=cls)
    streams = []
    for sizes in case["chunkings"]:
        processor = ChatStreamProcessor(request, parser(), enable_auto_tools=False, parser_cls=cls)
        deltas, at = [], 0
        for k, size in enumerate(sizes):
            last = k == len(sizes) - 1
            step = processor.step("".join(pieces[at:at + size]), ids[at:at + size], "stop" if last else None,
                                  prompt)
            deltas.append(None if step.delta is None else step.delta.model_dump(exclude_unset=True))
            at += size
        streams.append(deltas)
    return {"reasoning": fields.reasoning, "content": fields.content,
            "reasoning_tokens": whole.count_reasoning_tokens(ids), "streams": streams}


def main() -> None:
    from vllm.reasoning import ReasoningParserManager

    job = json.loads(sys.stdin.read())
    print(json.dumps({"registered": sorted(ReasoningParserManager.list_registered()),
                      "cases": [run(case) for case in job["cases"]]}))


if __name__ == "__main__":
    main()
