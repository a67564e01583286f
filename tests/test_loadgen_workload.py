"""What loadgen sends, before any HTTP: prompts of exact token counts, shared Mooncake prefixes, synthetic
arrivals and lengths, ServeGen clients, goodput rules, and the progress line of a long run."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

from loadgen.goodput import goodput, is_good, parse_slos
from loadgen.progress import Progress
from loadgen.prompts import PromptBuilder
from loadgen.synthetic import arrival_times, parse_length, retime, servegen, synthetic, window
from loadgen.traces import TraceRecord
from profiles.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("length", [1, 2, 17, 300, 2048])
def test_prompts_have_exactly_the_trace_length_for_the_server(tokenizer, chat, length):
    builder = PromptBuilder(tokenizer, chat=chat)
    record = TraceRecord(0.0, max(length, builder.overhead), 5, 1)
    text = builder.text(record, 3)
    if chat:
        counted = len(tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": text}], True), False))
    else:
        counted = len(tokenizer.encode(text, True))
    assert counted == record.input_len


def test_prompts_of_different_requests_share_no_prefix(tokenizer):
    builder = PromptBuilder(tokenizer)
    a, b = (tokenizer.encode(builder.text(TraceRecord(0.0, 500, 5, 1), i), True) for i in (0, 1))
    assert a[1:17] != b[1:17]  # not even the first KV block (after BOS)


def test_mooncake_hash_ids_become_text_that_shares_exactly_the_equal_leading_blocks(tokenizer):
    builder = PromptBuilder(tokenizer)
    ids = {name: tokenizer.encode(builder.text(TraceRecord(0.0, 1500, 5, 1, hash_ids=h), i), True)
           for i, (name, h) in enumerate({"a": [0, 1, 2], "b": [0, 1, 3], "c": [7, 1, 2]}.items())}
    assert all(len(v) == 1500 for v in ids.values())
    assert ids["a"][:1024] == ids["b"][:1024] and ids["a"][1024:1040] != ids["b"][1024:1040]
    assert ids["a"][1:17] != ids["c"][1:17]


def test_a_prompt_the_trace_carries_is_sent_as_is(tokenizer):
    record = TraceRecord(0.0, 9, 5, 1, prompt="What is the capital of France?")
    assert PromptBuilder(tokenizer).text(record, 0) == "What is the capital of France?"


def test_gamma_arrivals_have_the_rate_and_cv_asked_for():
    gaps = np.diff(arrival_times(np.random.default_rng(1), 50_000, rate=20.0, cv=3.0))
    assert gaps.mean() == pytest.approx(1 / 20, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.05)


def test_bursts_send_size_requests_every_period():
    assert arrival_times(np.random.default_rng(0), 7, burst=(3, 60.0)).tolist() == [0, 0, 0, 60, 60, 60, 120]


@pytest.mark.parametrize("spec, check", [
    ("128", lambda v: set(v) == {128}),
    ("uniform:10:20", lambda v: v.min() >= 10 and v.max() <= 20),
    ("lognormal:1000:0.5", lambda v: abs(v.mean() - 1000) < 30 and abs(v.std() / v.mean() - 0.5) < 0.05),
    ("normal:50:0", lambda v: set(v) == {50}),
    ("exponential:200", lambda v: abs(v.mean() - 200) < 10 and v.min() >= 1),
])
def test_length_distributions(spec, check):
    assert check(parse_length(spec)(np.random.default_rng(0), 20_000))


@pytest.mark.parametrize("spec", ["0", "lognormal:1000", "zipf:2", "uniform:a:b", "normal:nan:1", "-5"])
def test_bad_length_specs_are_refused(spec):
    with pytest.raises(ValueError, match="bad length"):
        parse_length(spec)


def test_synthetic_workloads_are_reproducible():
    first = [(r.arrival, r.input_len, r.output_len) for r in synthetic(50, "lognormal:500:1", "64", rate=5, seed=3)]
    again = [(r.arrival, r.input_len, r.output_len) for r in synthetic(50, "lognormal:500:1", "64", rate=5, seed=3)]
    # vLLM bench's arrivals: the first request waits its own gap too, the last goes at n / rate exactly
    assert first == again and first[0][0] > 0.0 and first[-1][0] == pytest.approx(50 / 5, rel=1e-12)


def test_window_rebases_and_scales_the_rate():
    records = [TraceRecord(float(t), 10, 2, t + 1) for t in range(10)]
    kept = list(window(records, 2.0, 6.0, rate_scale=2.0))
    assert [(r.line, r.arrival) for r in kept] == [(3, 0.0), (4, 0.5), (5, 1.0), (6, 1.5)]


def test_retime_keeps_lengths_and_order():
    records = [TraceRecord(0.0, 10 + i, 2, i + 1) for i in range(100)]
    out = list(retime(records, rate=10.0, seed=0))
    assert [r.input_len for r in out] == list(range(10, 110))
    assert out[0].arrival > 0 and all(b.arrival >= a.arrival for a, b in zip(out, out[1:]))
    assert out[-1].arrival == pytest.approx(100 / 10, rel=1e-12)  # vLLM bench rescales to N / rate


def test_servegen_clients_become_requests_in_arrival_order(shared_data):
    folder = shared_data / "traces/servegen/reason/deepseek-r1"
    records = list(servegen(folder, 600.0, start=36000.0, seed=0))
    assert len(records) > 100
    assert all(0 <= r.arrival < 600 for r in records)
    assert all(b.arrival >= a.arrival for a, b in zip(records, records[1:]))
    assert len({r.request_id.rsplit("-", 1)[0] for r in records}) > 5  # many clients, merged
    assert all(r.input_len >= 1 and r.output_len >= 1 for r in records)


def test_slos_and_goodput_follow_vllm_bench():
    slos = parse_slos(["ttft:100", "tpot:20"])
    assert slos == {"ttft": 0.1, "tpot": 0.02}
    good = {"finish_reason": "length", "ttft": 0.05, "tpot": 0.01, "e2e": 1.0}
    one_token = {"finish_reason": "length", "ttft": 0.05, "tpot": None, "e2e": 0.05}
    slow = {**good, "ttft": 0.2}
    failed = {**good, "finish_reason": "error"}
    assert [is_good(r, slos) for r in (good, one_token, slow, failed)] == [True, True, False, False]
    assert goodput([good, slow], slos, 2.0)["requests_per_s"] == 0.5
    for bad in (["ttft"], ["ttft:-1"], ["speed:5"], ["tpot:abc"]):
        with pytest.raises(ValueError, match="bad SLO"):
            parse_slos(bad)


def test_progress_logs_a_plain_line_with_total_and_eta_when_not_on_a_terminal():
    out = io.StringIO()
    progress = Progress(200, "replay", stream=out, interval=0.0, terminal=False)
    progress.update(50, "120 s virtual")
    line = out.getvalue().strip()
    assert line.startswith("replay: 50/200 requests (25.0%), 120 s virtual, ") and "ETA" in line


def test_progress_without_a_total_counts_without_eta():
    out = io.StringIO()
    progress = Progress(None, "loadgen", stream=out, interval=0.0, terminal=False)
    progress.update(3)
    assert out.getvalue().startswith("loadgen: 3 requests, ") and "ETA" not in out.getvalue()


def test_progress_on_a_terminal_is_a_bar_with_the_total():
    out = io.StringIO()
    with Progress(10, "replay", stream=out, terminal=True) as progress:
        progress.update(10)
    assert "10/10" in out.getvalue()


def test_trace_expected_count_is_the_lines_less_the_header(tmp_path):
    from loadgen.traces import Trace
    path = tmp_path / "t.csv"
    path.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0,1,1\n1,1,1\n2,1,1")
    assert Trace(path).expected_count() == 3
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"input_toks": 1, "output_toks": 1, "arrival_time_ns": k}) + "\n"
                            for k in range(4)))
    assert Trace(path).expected_count() == 4
