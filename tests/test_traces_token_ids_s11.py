"""Token-id lists of a JSONL trace are parsed by numpy from their text on the msgspec path: the records and errors
are still those of the text reader (json.loads on each line), whatever the lists hold."""
from __future__ import annotations

import random

import numpy as np
import pytest

from loadgen import traces
from tests.test_traces_fast_jsonl import read

LINE = '{{"input_toks": {n}, "output_toks": 2, "arrival_time_ns": 5, "input_tok_ids": {ids}}}\n'
LISTS = {
    "spaced": "[1, 2, 3]",
    "compact": "[1,2,3]",
    "blanks": "[ 1 ,\t2 ,3 ]",
    "empty": "[]",
    "empty_spaced": "[ \t]",
    "largest_id": "[9223372036854775806, 9223372036854775807]",
    "past_63_bits": "[1, 9223372036854775808]",
    "past_64_bits": "[1, 18446744073709551616]",
    "many_digits": "[1, " + "9" * 40 + "]",
    "negative": "[1, -2]",
    "float": "[1, 2.0]",
    "exponent": "[1, 2e3]",
    "leading_zero": "[1, 02]",
    "nested": "[[1], [2]]",
    "strings": '["1", "2"]',
    "trailing_comma": "[1, 2,]",
    "true": "[1, true]",
    "false": "[false, 2]",
    "null_id": "[1, null]",
    "capital_exponent": "[1, 2E3]",
    "string_id": '[1, "2"]',
    "object_id": "[1, {}]",
    "not_a_list": "7",
    "null": "null",
    "object": '{"a": 1}',
}


@pytest.mark.parametrize("name", list(LISTS))
def test_a_token_id_list_reads_as_the_text_reader_reads_it(tmp_path, monkeypatch, name):
    ids = LISTS[name]
    text = LINE.format(n=3, ids=ids) + LINE.format(n=2, ids=ids).replace("input_tok_ids", "output_tok_ids")
    path = tmp_path / f"{name}.jsonl"
    path.write_text(text)
    assert read(path, False, monkeypatch) == read(path, True, monkeypatch)


def test_random_id_lists(tmp_path, monkeypatch):
    rng = random.Random(5)
    lines = []
    for _ in range(300):
        ids = [rng.choice([0, 1, 7, 128000, 2**31, 2**62, 2**63 - 1]) for _ in range(rng.randint(0, 6))]
        text = rng.choice([", ", ",", " , ", ",\t"]).join(map(str, ids))
        lines.append(LINE.format(n=len(ids), ids=f"[{rng.choice(['', ' '])}{text}]"))
    path = tmp_path / "random.jsonl"
    path.write_text("".join(lines))
    fast = read(path, False, monkeypatch)
    assert fast == read(path, True, monkeypatch)
    assert len(fast) == 300


def test_the_arrays_are_numpy_s_parse(tmp_path):
    """The msgspec path does take numpy's parse for a plain list (not the json.loads fallback)."""
    path = tmp_path / "t.jsonl"
    path.write_text(LINE.format(n=3, ids="[5, 6, 7]"))
    raw = next(traces._json_lines(path, ("input_tok_ids",)))[1]["input_tok_ids"]
    assert isinstance(raw, np.ndarray) and raw.dtype == np.int64 and raw.tolist() == [5, 6, 7]


@pytest.mark.parametrize("extra", ['"x": ' + "[" * 300 + "]" * 300 + ', "y": ' + "[" * 300 + "]" * 300,
                                   '"' + "[" * 600 + '": 1', '"s": "' + "{" * 700 + '"',
                                   '"x": ' + "[" * 499 + "]" * 499, '"x": ' + "[" * 497 + "]" * 497])
def test_many_brackets_beside_the_id_lists(tmp_path, monkeypatch, extra):
    """A line's brackets outside its id lists still send it to json.loads past the depth bound, as before."""
    path = tmp_path / "brackets.jsonl"
    path.write_text(LINE.format(n=3, ids="[1, 2, 3]").replace("}\n", ", " + extra + "}\n"))
    assert read(path, False, monkeypatch) == read(path, True, monkeypatch)
