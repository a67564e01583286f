"""The CSV traces are read by position (csv.reader) and give what reading them with csv.DictReader gave: the same
values, the same line numbers, the same errors, for any rows (blank, short, long, quoted across lines, a column
named twice, a broken quote)."""
import csv
import random
from pathlib import Path

import pytest

from loadgen.traces import TEXT, TraceError, _csv_rows

COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def dict_rows(path: Path, columns: tuple[str, ...], optional: tuple[str, ...] = ()):
    """The reading by csv.DictReader that _csv_rows replaces (the oracle)."""
    with path.open(newline="", encoding=TEXT) as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in columns if c not in header]
        if missing:
            raise TraceError(f"{path}:1: missing column {missing[0]!r}")
        reader.fieldnames = header
        width = len(header)
        try:
            for line, row in enumerate(reader, 2):
                if len(row) != width or None in row.values():
                    values = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None, ()))
                    raise TraceError(f"{path}:{line}: {values} values for {width} columns")
                yield line, tuple(row[c] for c in columns) + tuple(row.get(c) for c in optional)
        except csv.Error as exc:
            raise TraceError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from None


def outcome(rows):
    out = []
    try:
        for item in rows:
            out.append(item)
    except TraceError as exc:
        out.append(("error", str(exc)))
    return out


def random_csv(rng: random.Random) -> str:
    header = rng.choice([list(COLUMNS), list(COLUMNS) + ["Model"], ["Model"] + list(COLUMNS),
                         list(COLUMNS) + ["ContextTokens"], ["TIMESTAMP", "ContextTokens"],
                         [" TIMESTAMP ", "ContextTokens", "GeneratedTokens", "x", "x"]])
    lines = [",".join(header)]
    for _ in range(rng.randint(0, 8)):
        kind = rng.random()
        if kind < 0.1:
            lines.append("")
        elif kind < 0.15:
            lines.append('"2023-11-16 18:15:46","1\n2",3')  # a quoted newline: one row over two lines
        elif kind < 0.18:
            lines.append('"unterminated,1,2')
        elif kind < 0.2:
            lines.append("A," + "9" * 140_000 + ",1")  # past csv's field size limit: csv.Error
        else:
            width = len(header) + rng.choice([0, 0, 0, 0, -1, 1, -2])
            lines.append(",".join(str(rng.randint(0, 999)) for _ in range(max(width, 1))))
    return "\n".join(lines) + rng.choice(["", "\n", "\n\n"])


def test_any_csv_reads_as_dict_reader_read_it(tmp_path):
    rng = random.Random(13)
    path = tmp_path / "trace.csv"
    for _ in range(1500):
        path.write_text(random_csv(rng))
        for optional in ((), ("Model",)):
            assert outcome(_csv_rows(path, COLUMNS, optional)) == outcome(dict_rows(path, COLUMNS, optional)), \
                path.read_text()


@pytest.mark.parametrize("text, expected", [
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n\n\nA,1,2\n", [(2, ("A", "1", "2"))]),  # blank rows: not counted
    ("TIMESTAMP,ContextTokens,GeneratedTokens\nA,1\n", [("error", "{}:2: 2 values for 3 columns")]),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\nA,1,2\n\"B,1,2\n", [(2, ("A", "1", "2")),
                                                                    ("error", "{}:3: 1 values for 3 columns")]),
    # csv.Error names DictReader's line_num: its last row's, or the first blank's after it while skipping blanks
    ("TIMESTAMP,ContextTokens,GeneratedTokens\nA,1,2\nB," + "9" * 140_000 + ",1\n",
     [(2, ("A", "1", "2")), ("error", "{}:2: not valid CSV (field larger than field limit (131072))")]),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\nA,1,2\n\n\nB," + "9" * 140_000 + ",1\n",
     [(2, ("A", "1", "2")), ("error", "{}:3: not valid CSV (field larger than field limit (131072))")]),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n\nA,1,2\nB," + "9" * 140_000 + ",1\n",
     [(2, ("A", "1", "2")), ("error", "{}:3: not valid CSV (field larger than field limit (131072))")]),
])
def test_lines_and_errors(tmp_path, text, expected):
    path = tmp_path / "trace.csv"
    path.write_text(text)
    expected = [(a, b.format(path) if a == "error" else b) for a, b in expected]
    assert outcome(_csv_rows(path, COLUMNS)) == expected == outcome(dict_rows(path, COLUMNS))
