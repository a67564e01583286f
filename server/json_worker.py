"""The child process that decodes large request bodies (see request_body.py).

    python -I server/json_worker.py

Reads requests from stdin and answers on stdout until stdin closes. A request is the length
(`!I`) of a JSON list of the top-level fields to keep (or null: all), that list, then the body
in chunks, each preceded by its length (`!I`), ended by an empty chunk; the answer is its
length (`!Q`) and the pickled result of `decode`. Imports nothing of the server: it starts in
tens of milliseconds.
"""
from __future__ import annotations

import json
import pickle
import struct
import sys

CHUNK = struct.Struct("!I")
ANSWER = struct.Struct("!Q")


def decode(body: bytes, keep: frozenset[str] | None = None) -> tuple:
    """("ok", value) with only the `keep` fields of a top-level object, or ("error", message,
    position, text): position and text are the JSONDecodeError's when the body is not JSON,
    None when it is refused otherwise (invalid UTF-8, too deep, an integer of too many digits)."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError as exc:
        return "error", exc.msg, exc.pos, str(exc)
    except (ValueError, RecursionError) as exc:
        return "error", str(exc), None, None
    if keep is not None and isinstance(value, dict):
        value = {k: v for k, v in value.items() if k in keep}
    return "ok", value


def _read_framed(stdin) -> bytes | None:
    header = stdin.read(CHUNK.size)
    if len(header) < CHUNK.size:
        return None
    size, = CHUNK.unpack(header)
    return stdin.read(size)


def serve(stdin, stdout) -> None:
    while True:
        fields = _read_framed(stdin)
        if fields is None:
            return
        chunks = []
        while chunk := _read_framed(stdin):
            chunks.append(chunk)
        names = json.loads(fields)
        result = decode(b"".join(chunks), None if names is None else frozenset(names))
        del chunks
        try:
            answer = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
        except RecursionError:  # nested too deep to send back
            answer = pickle.dumps(("error", "the body is nested too deeply", None, None))
        stdout.write(ANSWER.pack(len(answer)))
        stdout.write(answer)
        stdout.flush()


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
