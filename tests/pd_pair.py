"""The cluster file of one P/D pair (NIXL producer and consumer on H100s, each on its own port), as
several server tests serve it."""
from __future__ import annotations

from pathlib import Path


def pd_pair_text(port_p: int, port_d: int, model: str = "meta-llama/Llama-3.1-8B", prefill: str = "prefill",
                 decode: str = "decode") -> str:
    return f"""
engine: {{max-model-len: 8192}}
instances:
  - {{name: {prefill}, model: {model}, hardware: H100, port: {port_p},
     kv-transfer-config: {{kv_connector: NixlConnector, kv_role: kv_producer}}}}
  - {{name: {decode}, model: {model}, hardware: H100, port: {port_d},
     kv-transfer-config: {{kv_connector: NixlConnector, kv_role: kv_consumer}}}}
"""


def pd_pair_file(tmp_path: Path, port_p: int, port_d: int, **names: str) -> Path:
    path = tmp_path / "pd.yaml"
    path.write_text(pd_pair_text(port_p, port_d, **names))
    return path
