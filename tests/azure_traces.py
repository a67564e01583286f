"""Small Azure-2023 trace files (TIMESTAMP,ContextTokens,GeneratedTokens) for replay and loadgen tests."""
from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path


def azure_trace(path: Path, n: int = 40, gap: float = 0.25, prompt: int = 300, output: int = 40) -> Path:
    """`n` requests `gap` seconds apart (gap 0: all at once), prompts and outputs of a few sizes from `prompt`
    and `output` on."""
    start = datetime(2023, 11, 16, 18, 15, 46, 680590)
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for i in range(n):
        stamp = (start + timedelta(seconds=i * gap)).strftime("%Y-%m-%d %H:%M:%S.%f0")
        lines.append(f"{stamp},{prompt + 37 * (i % 11)},{output + 7 * (i % 5)}")
    path.write_text("\n".join(lines) + "\n")
    return path
