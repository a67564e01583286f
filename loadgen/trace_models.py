"""Which served model each trace request goes to, for replay and loadgen alike.

A trace may record the model each request asked for (`TraceRecord.model`: a JSONL "model" key,
BurstGPT's Model column). A line whose name (renamed by `--model-map TRACE_NAME=SERVED_NAME` where
the trace's names are not the served ones, as BurstGPT's "ChatGPT"/"GPT-4") is served asks for it;
a line that names no model asks for the target's first. A name nobody serves is an error when the
target serves several models (a cluster file with several, or a server whose /v1/models roots
differ); a target that serves one model, under however many names, takes it under its first name,
as `vllm bench serve --model` sends one name whatever the trace says.
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping


def parse_model_map(items: list[str] | None) -> dict[str, str]:
    """`--model-map` values (`TRACE_NAME=SERVED_NAME`, repeatable) as a dict."""
    mapping: dict[str, str] = {}
    for item in items or ():
        name, sep, served = item.partition("=")
        if not sep or not name.strip() or not served.strip():
            raise ValueError(f"--model-map {item!r}: expected TRACE_NAME=SERVED_NAME")
        mapping[name.strip()] = served.strip()
    return mapping


class ModelResolver:
    """The served name for a trace line's model.

    `served` maps every served name to the model behind it (names with the same value are aliases:
    a target whose names all share one value serves one model); `default` is the name a line without
    a model, or with an unknown one on a one-model target, is sent under."""

    def __init__(self, served: Mapping[str, Hashable], default: str, mapping: Mapping[str, str] | None = None) -> None:
        self.served = dict(served)
        self.default = default
        self.mapping = dict(mapping or {})
        self.one_model = len(set(self.served.values())) <= 1
        for name, target in self.mapping.items():
            if target not in self.served:
                raise ValueError(f"--model-map {name}={target}: {target!r} is not served; served: {self._names()}")

    def resolve(self, asked: str | None) -> str:
        """The served name for a line that asked for `asked`; ValueError says why none fits."""
        if asked is None:
            return self.default
        name = self.mapping.get(asked, asked)
        if name in self.served:
            return name
        if self.one_model:
            return self.default
        raise ValueError(f"model {asked!r} is not served (served: {self._names()}); map it with "
                         f"--model-map {asked}=SERVED_NAME")

    def _names(self) -> str:
        return ", ".join(self.served)
