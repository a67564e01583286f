"""Trace readers: every format written, read back and replayed; malformed input named by file and line."""
from __future__ import annotations

import json
from datetime import datetime, timedelta
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from emulator.config import EngineArgs
from profiles.deployment import build_deployment
from loadgen.replay import replay
from loadgen.traces import FORMATS, MAX_TOKENS, Trace, TraceError, detect_format, mooncake_tokens, read_trace
from profiles.tokenizer import load_tokenizer

# (arrival seconds, input tokens, output tokens)
RECORDS = [(0.0, 100, 20), (0.25, 300, 5), (1.5, 40, 60), (1.5, 17, 1)]


def write_llmservingsim(path: Path, records) -> None:
    path.write_text("".join(json.dumps({"input_toks": i, "output_toks": o, "arrival_time_ns": int(round(t * 1e9))})
                            + "\n" for t, i, o in records))


def write_mooncake(path: Path, records) -> None:
    path.write_text("".join(json.dumps({"timestamp": int(round(t * 1000)), "input_length": i, "output_length": o,
                                        "hash_ids": list(range(k * 10, k * 10 + -(-i // 512)))}) + "\n"
                            for k, (t, i, o) in enumerate(records)))


def write_azure(path: Path, records) -> None:
    t0 = datetime(2023, 11, 16, 18, 15, 46)
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    lines += [f"{(t0 + timedelta(seconds=t)).strftime('%Y-%m-%d %H:%M:%S.%f')}0,{i},{o}" for t, i, o in records]
    path.write_text("\n".join(lines) + "\n")


def write_vidur(path: Path, records) -> None:
    path.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n"
                    + "".join(f"{t},{i},{o}\n" for t, i, o in records))


def write_vidur_pypi(path: Path, records) -> None:
    path.write_text("Date,Time,PromptTokenCount,CompletionTokenCount\n"
                    + "".join(f"2023-08-21,{t + 30.0},{i},{o}\n" for t, i, o in records))


def write_burstgpt(path: Path, records) -> None:
    path.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                    + "".join(f"{t + 5.0},ChatGPT,{i},{o},{i + o},Conversation log\n" for t, i, o in records))


WRITERS = {"llmservingsim": (write_llmservingsim, "jsonl"), "mooncake": (write_mooncake, "jsonl"),
           "azure": (write_azure, "csv"), "vidur": (write_vidur, "csv"), "vidur-pypi": (write_vidur_pypi, "csv"),
           "burstgpt": (write_burstgpt, "csv")}
TIMED = tuple(WRITERS)  # every format but sharegpt, which has no timestamps (tested apart)


def written(tmp_path: Path, fmt: str, records=RECORDS) -> Path:
    writer, ext = WRITERS[fmt]
    path = tmp_path / f"trace.{ext}"
    writer(path, records)
    return path


@pytest.fixture(scope="module")
def deployment():
    return build_deployment("meta-llama/Llama-3.1-8B", "RTX4090", EngineArgs(max_model_len=4096))


def test_every_format_has_a_writer_here():
    assert set(WRITERS) | {"sharegpt"} == set(FORMATS)


@pytest.mark.parametrize("fmt", TIMED)
def test_format_is_detected_from_the_first_line(tmp_path, fmt):
    assert detect_format(written(tmp_path, fmt)) == fmt


@pytest.mark.parametrize("fmt", TIMED)
def test_round_trip(tmp_path, fmt):
    back = list(read_trace(written(tmp_path, fmt)))
    assert [(r.input_len, r.output_len) for r in back] == [(i, o) for _, i, o in RECORDS]
    assert [r.arrival for r in back] == pytest.approx([t for t, _, _ in RECORDS], abs=1e-6)
    first_line = 1 if WRITERS[fmt][1] == "jsonl" else 2
    assert [r.line for r in back] == list(range(first_line, first_line + len(RECORDS)))


@pytest.mark.parametrize("fmt", TIMED)
def test_a_byte_order_mark_at_the_start_is_not_part_of_the_first_line(tmp_path, fmt):
    path = written(tmp_path, fmt)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # as Excel's and PowerShell's UTF-8 exports write
    assert detect_format(path) == fmt
    back = list(read_trace(path, fmt))
    assert [(r.input_len, r.output_len) for r in back] == [(i, o) for _, i, o in RECORDS]
    assert [(r.arrival, r.line) for r in back] == [(r.arrival, r.line) for r in read_trace(written(tmp_path, fmt))]


@pytest.mark.parametrize("fmt", TIMED)
def test_round_trip_replays(tmp_path, fmt, deployment):
    summary = replay(str(written(tmp_path, fmt)), deployment, tmp_path / "out", trace_format=fmt)
    rows = [json.loads(line) for line in (tmp_path / "out" / "requests.jsonl").read_text().splitlines()]
    assert [(r["input_tokens"], r["output_tokens"]) for r in rows] == [(i, o) for _, i, o in RECORDS]
    assert [r["arrival_time"] for r in rows] == pytest.approx([t for t, _, _ in RECORDS], abs=1e-6)
    assert summary["num_finished"] == len(RECORDS)


def test_arrivals_are_relative_to_the_first_request(tmp_path):
    path = tmp_path / "t.csv"
    write_vidur(path, [(100.0, 10, 1), (102.5, 10, 1)])
    assert [r.arrival for r in read_trace(path)] == [0.0, 2.5]


def test_llmservingsim_keeps_token_ids_and_request_id(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"input_toks": 3, "output_toks": 2, "arrival_time_ns": 0, "input_tok_ids": [5, 6, 7],
                                "output_tok_ids": [8, 9], "request_id": "chat-42"}) + "\n")
    record = next(read_trace(path))
    assert record.token_ids.tolist() == [5, 6, 7] and record.output_token_ids.tolist() == [8, 9]
    assert record.request_id == "chat-42"


def test_mooncake_hash_ids_become_token_prefixes_shared_exactly_as_the_hashes_say():
    a = mooncake_tokens([0, 1, 2], 1500)
    b = mooncake_tokens([0, 1, 3], 1500)
    c = mooncake_tokens([7, 1, 2], 1500)
    assert len(a) == 1500
    assert np.array_equal(a[:1024], b[:1024]) and not np.array_equal(a[1024:], b[1024:])
    assert not np.array_equal(a[:512], c[:512])


def test_mooncake_shared_prefix_hits_the_prefix_cache(tmp_path, deployment):
    """Two 1500-token prompts sharing two 512-token hash blocks: the second hits 1024 tokens (64 blocks of 16)."""
    path = tmp_path / "mooncake.jsonl"
    path.write_text(json.dumps({"timestamp": 0, "input_length": 1500, "output_length": 4, "hash_ids": [0, 1, 2]})
                    + "\n" + json.dumps({"timestamp": 10000, "input_length": 1500, "output_length": 4,
                                         "hash_ids": [0, 1, 3]}) + "\n")
    replay(str(path), deployment, tmp_path / "out")
    rows = [json.loads(line) for line in (tmp_path / "out" / "requests.jsonl").read_text().splitlines()]
    assert [r["cached_tokens"] for r in rows] == [0, 1024]


def test_llmservingsim_token_ids_hit_the_prefix_cache(tmp_path, deployment):
    shared = list(range(1000, 1100))
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"input_toks": 120, "output_toks": 3, "arrival_time_ns": k * 10**9,
                                        "input_tok_ids": shared + list(range(5000 + 100 * k, 5020 + 100 * k))}) + "\n"
                            for k in range(2)))
    replay(str(path), deployment, tmp_path / "out")
    rows = [json.loads(line) for line in (tmp_path / "out" / "requests.jsonl").read_text().splitlines()]
    assert [r["cached_tokens"] for r in rows] == [0, 96]  # 100 shared tokens: 6 full blocks


# -- malformed input ------------------------------------------------------------------------------
def error_of(path: Path, fmt: str | None = None) -> str:
    with pytest.raises(TraceError) as err:
        list(read_trace(path, fmt))
    return str(err.value)


def test_malformed_json_line_is_named(test_data):
    path = test_data / "bad" / "malformed_json.jsonl"
    assert error_of(path).startswith(f"{path}:3: not valid JSON")


def test_missing_field_is_named(test_data):
    path = test_data / "bad" / "missing_field.jsonl"
    assert error_of(path) == f"{path}:2: missing field 'output_toks'"


def test_non_numeric_field_is_named(test_data):
    path = test_data / "bad" / "non_numeric.csv"
    assert error_of(path) == f"{path}:3: field 'ContextTokens' is not a number ('many')"


def test_fractional_token_count_is_refused(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0,10.5,3\n")
    assert error_of(path) == f"{path}:2: field 'num_prefill_tokens' must be a whole number ('10.5')"


def test_zero_token_lines_are_read_for_replay_to_judge(tmp_path):
    """A request with no output is vLLM's to reject (replay does, and --skip-invalid can drop it), not the file's."""
    path = tmp_path / "t.csv"
    path.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0,10,3\n1,10,0\n")
    assert [r.output_len for r in read_trace(path)] == [3, 0]


def test_missing_csv_column_is_named(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("arrived_at,num_prefill_tokens\n0,10\n")
    assert "missing column 'num_decode_tokens'" in error_of(path, "vidur")


def test_token_ids_that_disagree_with_the_length_are_refused(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"input_toks": 4, "output_toks": 2, "arrival_time_ns": 0,
                                "input_tok_ids": [1, 2]}) + "\n")
    assert error_of(path) == f"{path}:1: input_tok_ids has 2 ids but input_toks says 4"


def test_bad_mooncake_hash_ids_are_refused(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": ["x"]}) + "\n")
    assert error_of(path) == f"{path}:1: 'hash_ids' must be a list of integers in [0, 2^63)"


def test_empty_trace_is_refused(test_data):
    assert error_of(test_data / "bad" / "empty.jsonl").endswith("the trace is empty")


def test_trace_with_a_header_and_no_request_is_refused(test_data):
    path = test_data / "bad" / "header_only.csv"
    assert error_of(path) == f"{path}: the trace holds no request"


def test_leading_blank_line_does_not_hide_the_trace(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n" + json.dumps({"input_toks": 20, "output_toks": 2, "arrival_time_ns": 0}) + "\n")
    assert [r.input_len for r in read_trace(path)] == [20]


def test_unknown_layout_asks_for_a_format_and_says_what_each_looks_like(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("when,prompt,answer\n0,1,2\n")
    message = error_of(path)
    assert "cannot tell the trace format" in message
    assert all(fmt in message for fmt in FORMATS) and "Date,Time,PromptTokenCount" in message


def test_unknown_format_name_is_refused(tmp_path):
    assert "unknown trace format 'alpaca'" in error_of(written(tmp_path, "vidur"), "alpaca")


def test_missing_file_is_named(tmp_path):
    assert error_of(tmp_path / "nope.jsonl") == f"{tmp_path / 'nope.jsonl'}: no such trace file"


# -- the real traces ---------------------------------------------------------------------------------
@pytest.mark.parametrize("relative, fmt", [
    ("traces/sharegpt/sharegpt-llama-3.1-8b-300-sps10.jsonl", "llmservingsim"),
    ("traces/azure2023/AzureLLMInferenceTrace_conv.csv", "azure"),
    ("traces/azure2023/AzureLLMInferenceTrace_code.csv", "azure"),
    ("traces/mooncake/conversation_trace.jsonl", "mooncake"),
    ("traces/vidur/splitwise_code.csv", "vidur"),
])
def test_real_traces_are_read(shared_data, relative, fmt):
    path = shared_data / relative
    assert detect_format(path) == fmt
    head = list(islice(read_trace(path), 200))
    assert len(head) == 200 and head[0].arrival == 0.0
    assert all(b.arrival >= a.arrival for a, b in zip(head, head[1:]))
    assert all(r.input_len >= 1 and r.output_len >= 1 for r in head)


def test_real_sharegpt_trace_carries_token_ids(shared_data):
    record = next(read_trace(shared_data / "traces/sharegpt/sharegpt-llama-3.1-8b-300-sps10.jsonl"))
    assert (record.input_len, record.output_len, len(record.token_ids)) == (2358, 531, 2358)


def test_azure_and_vidur_copies_of_one_trace_agree(shared_data):
    azure = list(islice(read_trace(shared_data / "traces/azure2023/AzureLLMInferenceTrace_code.csv"), 100))
    vidur = list(islice(read_trace(shared_data / "traces/vidur/splitwise_code.csv"), 100))
    assert [(r.input_len, r.output_len) for r in azure] == [(r.input_len, r.output_len) for r in vidur]
    assert [r.arrival for r in azure] == pytest.approx([r.arrival for r in vidur], abs=1e-3)


# -- formats as people have them -----------------------------------------------------------------------
def test_vidur_pypi_csv_counts_later_dates_as_whole_days(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("Date,Time,PromptTokenCount,CompletionTokenCount\n2023-08-21,10.5,100,20\n"
                    "2023-08-21,12,10,2\n2023-08-22,1,5,5\n")
    assert [(r.arrival, r.input_len, r.output_len) for r in read_trace(path)] == [
        (0.0, 100, 20), (1.5, 10, 2), (86400 - 9.5, 5, 5)]


def test_vidur_pypi_bad_date_is_named(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("Date,Time,PromptTokenCount,CompletionTokenCount\n2023-08-21,0,1,1\nMonday,1,1,1\n")
    assert error_of(path) == f"{path}:3: bad Date 'Monday' (expected YYYY-MM-DD)"


def test_burstgpt_failed_requests_are_skipped_and_counted(tmp_path):
    path = written(tmp_path, "burstgpt", [(0.0, 100, 20), (1.0, 80, 0), (2.0, 8, 9), (3.0, 5, 0)])
    trace = Trace(path)
    assert [(r.input_len, r.output_len, r.line) for r in trace] == [(100, 20, 2), (8, 9, 4)]
    assert trace.skipped == {"failed request (0 response tokens)": 2}


SHAREGPT = [
    {"id": "a1", "conversations": [{"from": "human", "value": "Tell me about the sea."},
                                   {"from": "gpt", "value": "The sea is wide and deep."},
                                   {"from": "human", "value": "And the sky?"}]},
    {"id": "b2", "conversations": [{"from": "human", "value": "Only one turn"}]},
    {"id": "c3", "conversations": [{"from": "human", "value": "Count to three"},
                                   {"from": "gpt", "value": "one, two, three"}]},
]


def test_raw_sharegpt_lengths_come_from_the_tokenizer(tmp_path):
    path = tmp_path / "sg.json"
    text = json.dumps(SHAREGPT, indent=2)
    path.write_text(text)
    starts = [text.splitlines().index(f'    "id": "{key}",') for key in ("a1", "c3")]  # 0-based: the "{" above
    tokenizer = load_tokenizer(None)
    assert detect_format(path) == "sharegpt"
    trace = Trace(path, tokenizer=tokenizer)
    records = list(trace)
    assert [r.prompt for r in records] == ["Tell me about the sea.", "Count to three"]
    for record, item in zip(records, (SHAREGPT[0], SHAREGPT[2])):
        prompt, reply = (turn["value"] for turn in item["conversations"][:2])
        assert record.token_ids.tolist() == tokenizer.encode(prompt, True)
        assert (record.input_len, record.output_len) == (len(tokenizer.encode(prompt, True)),
                                                         len(tokenizer.encode(reply, False)))
        assert record.arrival == 0.0
    assert [r.line for r in records] == starts  # the line where each conversation starts
    assert trace.skipped == {"conversation of fewer than two turns": 1}


def test_raw_sharegpt_errors_name_the_line(tmp_path):
    path = tmp_path / "sg.json"
    path.write_text('[\n{"conversations": [{"value": "a"}, {"value": "b"}]},\n{"conversations": 3}\n]')
    assert error_of(path, "sharegpt") == f"{path}:3: expected an object with a 'conversations' list"
    path.write_text('[\n{"conversations": [{"value": "a"}, {"value": "b"}]}\n{"conversations": []}]')
    assert error_of(path, "sharegpt") == f"{path}:3: expected ',' or ']' after a conversation"


# -- bad numbers and bad files: `file:line: what is wrong`, never a traceback or a hang ---------------
VIDUR_HEAD = "arrived_at,num_prefill_tokens,num_decode_tokens\n0,10,3\n"
LINE = {"input_toks": 10, "output_toks": 2, "arrival_time_ns": 0}
BAD_NUMBERS = [
    ("nan arrival", "t.csv", VIDUR_HEAD + "nan,10,3\n", "3: field 'arrived_at' is not a finite number ('nan')"),
    ("inf arrival", "t.csv", VIDUR_HEAD + "inf,10,3\n", "3: field 'arrived_at' is not a finite number ('inf')"),
    ("inf tokens", "t.csv", VIDUR_HEAD + "1,inf,3\n", "3: field 'num_prefill_tokens' is not a finite number ('inf')"),
    ("nan tokens", "t.jsonl", '{"input_toks": NaN, "output_toks": 2, "arrival_time_ns": 0}\n',
     "1: field 'input_toks' is not a finite number (nan)"),
    ("negative tokens", "t.csv", VIDUR_HEAD + "1,-4,3\n",
     f"3: field 'num_prefill_tokens' is -4: a token count must lie in [0, {MAX_TOKENS}]"),
    ("absurd tokens", "t.csv", VIDUR_HEAD + "1,1e12,3\n",
     f"3: field 'num_prefill_tokens' is 1000000000000: a token count must lie in [0, {MAX_TOKENS}]"),
    ("absurd arrival", "t.csv", VIDUR_HEAD + "1e12,10,3\n",
     "3: arrives 1e+12 s after the first request, more than a year later: is the time unit right?"),
    ("boolean", "t.jsonl", json.dumps({**LINE, "output_toks": True}) + "\n",
     "1: field 'output_toks' is not a finite number (True)"),
    ("2^70 token id", "t.jsonl", json.dumps({**LINE, "input_toks": 1, "input_tok_ids": [2 ** 70]}) + "\n",
     f"1: 'input_tok_ids' holds {2 ** 70}: a token id must lie in [0, 2^63)"),
    ("negative token id", "t.jsonl", json.dumps({**LINE, "input_toks": 1, "input_tok_ids": [-3]}) + "\n",
     "1: 'input_tok_ids' holds -3: a token id must lie in [0, 2^63)"),
    ("fractional token id", "t.jsonl", json.dumps({**LINE, "input_toks": 1, "input_tok_ids": [1.5]}) + "\n",
     "1: 'input_tok_ids' must be a flat list of integers"),
    ("nested token ids", "t.jsonl", json.dumps({**LINE, "input_toks": 1, "input_tok_ids": [[1]]}) + "\n",
     "1: 'input_tok_ids' must be a flat list of integers"),
    ("2^70 hash id", "t.jsonl", json.dumps({"timestamp": 0, "input_length": 9, "output_length": 2,
                                            "hash_ids": [2 ** 70]}) + "\n",
     "1: 'hash_ids' must be a list of integers in [0, 2^63)"),
    ("deep nesting", "t.jsonl", json.dumps(LINE) + '\n{"x": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
     "2: JSON nested too deeply"),
    ("deep first line", "t.jsonl", '{"x": ' + "[" * 100_000 + "]" * 100_000 + "}\n", "1: JSON nested too deeply"),
    ("5000 digits", "t.jsonl", json.dumps(LINE) + '\n{"input_toks": ' + "9" * 5000 + "}\n", "2: not valid JSON"),
    ("short row", "t.csv", VIDUR_HEAD + "1,10\n", "3: 2 values for 3 columns"),
    ("long row", "t.csv", VIDUR_HEAD + "1,10,3,4\n", "3: 4 values for 3 columns"),
]


@pytest.mark.parametrize("name, file, content, message", BAD_NUMBERS, ids=[b[0] for b in BAD_NUMBERS])
def test_bad_numbers_are_named_by_file_and_line(tmp_path, name, file, content, message):
    path = tmp_path / file
    path.write_text(content)
    assert error_of(path).startswith(f"{path}:{message}")


def test_binary_file_is_refused(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(bytes(range(256)) * 4)
    assert error_of(path) == f"{path}: not a text trace (a NUL byte at byte 0)"


def test_text_that_is_not_utf8_is_named_by_line(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(VIDUR_HEAD.encode() + "\u00e9,1,1\n".encode("latin-1"))
    assert error_of(path).startswith(f"{path}:3: not UTF-8 text")
