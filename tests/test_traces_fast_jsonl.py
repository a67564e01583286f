"""JSONL traces are read as bytes by msgspec when the file allows (UTF-8, \\n line ends): the records, and
the errors, must be those of the text reader (json.loads on each line of text), whatever the lines hold."""
from __future__ import annotations

import numpy as np
import pytest

from loadgen import traces
from loadgen.traces import Trace, TraceError

GOOD = '{"input_toks": 3, "output_toks": 2, "arrival_time_ns": 1000, "input_tok_ids": [1, 2, 3]}'
LINE = '{"input_toks": 3, "output_toks": 2, "arrival_time_ns": 5, '
CASES = {
    "plain": GOOD + "\n" + GOOD,
    "crlf": (GOOD + "\r\n") * 3,
    "lone_cr": GOOD + "\r" + GOOD + "\n" + GOOD,
    "bom": "\ufeff" + GOOD + "\n" + GOOD + "\n",
    "blank_lines": GOOD + "\n\n   \n\xa0\n\x1c\n" + GOOD + "\n",
    "nan": GOOD + "\n" + LINE.replace("5", "NaN") + '"model": "m"}\n',
    "overflowing_float": GOOD + "\n" + LINE.replace("5", "1e400") + '"model": "m"}\n',
    "lone_surrogate": GOOD + "\n" + LINE + '"request_id": "\\ud800"}\n',
    "trailing_comma": GOOD + "\n" + '{"input_toks": 3, "output_toks": 2,}\n',
    "array": GOOD + "\n[1, 2]\n",
    "null": GOOD + "\nnull\n",
    "too_deep": GOOD + "\n" + LINE + '"x": ' + "[" * 995 + "]" * 995 + "}\n",
    "deep": GOOD + "\n" + LINE + '"x": ' + "[" * 400 + "]" * 400 + "}\n",
    "id_past_64_bits": GOOD + "\n" + LINE + '"input_toks": 3, "input_tok_ids": [1, 2, 18446744073709551616]}\n',
    "integer_of_5000_digits": GOOD + "\n" + LINE + '"x": ' + "1" * 5000 + "}\n",
    "control_character": GOOD + "\n" + LINE + '"request_id": "a\tb"}\n',
    "non_ascii": GOOD + "\n" + LINE + '"request_id": "é✓"}\n',
    "duplicate_key": LINE + '"input_toks": 4, "input_tok_ids": [1, 2, 3, 4]}\n',
    "no_final_newline": GOOD + "\n" + GOOD,
    "numbers_as_text": '{"input_toks": 3.0, "output_toks": "2", "arrival_time_ns": 1.5e3, '
                       '"input_tok_ids": [1, 2, 3]}\n',
    "float_id": '{"input_toks": 3, "output_toks": 2, "arrival_time_ns": 1, "input_tok_ids": [1, 2.0, 3]}\n',
    "form_feed": GOOD + "\n\x0c" + GOOD + "\n",
    "vertical_tab": GOOD + "\x0b" + GOOD + "\n",
}


def read(path, text_only: bool, monkeypatch) -> list:
    """Every record's fields (arrays as lists and dtype), then the error if reading stopped on one."""
    with monkeypatch.context() as m:
        if text_only:
            m.setattr(traces, "_plain_lines", lambda path: False)
        out = []
        try:
            for record in Trace(path, "llmservingsim"):
                out.append([(v.tolist(), str(v.dtype)) if isinstance(v, np.ndarray) else v
                            for v in (getattr(record, k) for k in record.__slots__)])
        except TraceError as exc:
            out.append(str(exc))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_a_jsonl_trace_reads_as_the_text_reader_reads_it(tmp_path, monkeypatch, name):
    path = tmp_path / f"{name}.jsonl"
    path.write_text(CASES[name], encoding="utf-8", errors="surrogatepass", newline="")
    assert traces._plain_lines(path) == ("\r" not in CASES[name])
    assert read(path, False, monkeypatch) == read(path, True, monkeypatch)


@pytest.mark.parametrize("lines", [3, 5000])
def test_bytes_that_are_not_utf8_are_told_as_the_text_reader_tells_them(tmp_path, monkeypatch, lines):
    path = tmp_path / "latin.jsonl"
    path.write_bytes((GOOD + "\n").encode() * lines + b'{"request_id": "\xe9"}\n')
    assert not traces._plain_lines(path)
    fast = read(path, False, monkeypatch)
    assert fast == read(path, True, monkeypatch) and "not UTF-8 text" in fast[-1]
