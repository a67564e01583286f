"""loadgen.json_lines writes what `json.dumps(record) + "\n"` writes, byte for byte, whatever the records hold."""
import json
import random

from loadgen.json_lines import json_lines

# values where msgspec's text and json.dumps's differ, or that json.dumps escapes
TRICKY = [0.0, -0.0, 1e-5, 9.9e-5, 1e-4, 5e-324, 1e16, 1.5e17, -2.5e-7, 1e-300, float("nan"), float("inf"),
          -float("inf"), "a,b", "a:b", "é", "\x7f", "\x01", 'q"', "back\\", "null", "", ": 1e5", "e2e", None, True,
          False, 0, -3, 2**70, 10**30, [1, 2], {"a": 1}, [], {}, ["x"], 1.0, 123.456]


def dumps(records):
    return "".join(json.dumps(record) + "\n" for record in records)


def test_replay_records_are_json_dumps_lines():
    records = [{"request_id": f"req-{i}", "arrival_time": i * 0.25, "first_token_time": None, "input_tokens": i,
                "tpot": 0.007054051666342593 * i, "finish_reason": "length", "engine": 0, "energy_j": 156.68 + i}
               for i in range(200)]
    assert json_lines(records) == dumps(records)


def test_floats_msgspec_writes_its_own_way_are_json_dumps_own():
    records = [{"t": 1.0, "e2e": 2.0}, {"t": 3.5e-05, "e2e": 2.0}, {"t": 1.0, "e2e": 1.7e16}, {"t": -4e-9}]
    text = json_lines(records)
    assert text == dumps(records)
    assert '"t": 3.5e-05' in text and '"e2e": 1.7e+16' in text and '"t": -4e-09' in text


def test_any_mix_of_values_and_keys():
    rng = random.Random(11)
    for _ in range(3000):
        records = []
        for _ in range(rng.randint(0, 5)):
            record = {}
            for k in range(rng.randint(0, 4)):
                value = rng.choice(TRICKY) if rng.random() < 0.3 else rng.random() * 10.0 ** rng.randint(-8, 20)
                record[rng.choice(["a", "b", "e2e", f"k{k}", 1, 2.5])] = value
            records.append(record)
        assert json_lines(records) == dumps(records), records
