"""Shared fixtures: small engines on a fixed step cost, and the shared data folder.

`../shared/data` (real traces and calibration runs) sits beside the repository in
CI; tests that read it ask for the `shared_data` fixture and skip when it is absent.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from emulator.config import EngineArgs, resolve
from emulator.cluster import build_simulation
from emulator.deployment import Deployment
from emulator.hardware import load_device
from emulator.kv_cache import KVCacheManager
from emulator.memory import plan_memory
from emulator.models import load_model
from emulator.scheduler import Scheduler
from emulator.simulation import Simulation

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TEST_DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(autouse=True)
def _tokens_unmerged(request, monkeypatch):
    """In-process servers send a chunk per token however late a delivery is: a busy machine stalls the
    event loop past the 20 ms after which a server merges a stream's due tokens (as vLLM does for a
    consumer that lags), and a test of a stream's chunks must not depend on the machine's load. Tests
    of the merging itself are marked `merging`."""
    if request.node.get_closest_marker("merging") is None:
        monkeypatch.setattr("server.engine_client.MERGE_AFTER", float("inf"))


@pytest.fixture
def dev_mode(monkeypatch):
    """vLLM's dev-mode routes (/sleep, /wake_up, /reset_prefix_cache, ...) on."""
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture
def test_data() -> Path:
    return TEST_DATA


class FixedStepCost:
    """Every non-empty step takes `seconds`, so timing tests can assert exact times."""
    pipeline_stages = 1

    def __init__(self, seconds: float = 1.0) -> None:
        self.seconds = seconds

    def step_time(self, shape) -> float:
        return self.seconds if shape.num_tokens else 0.0

    def decode_pricer(self, num_decode: int):
        return lambda context, context_max: self.seconds

    def describe(self) -> str:
        return f"fixed {self.seconds} s per step"

    def extrapolation_counts(self) -> dict[str, int]:
        return {}


@pytest.fixture(scope="session")
def engine_config():
    """Factory: a small engine (block 16, 64-token budget, 16 sequences, max_model_len 1024, sync)."""
    base = resolve(EngineArgs(max_num_seqs=16, max_num_batched_tokens=64, max_model_len=1024,
                              async_scheduling=False),
                   load_model("meta-llama/Llama-3.1-8B"), load_device("RTX4090"))
    return lambda **changes: replace(base, **changes)


@pytest.fixture(scope="session")
def make_scheduler(engine_config):
    """Factory: a Scheduler over its own KV cache of `num_blocks` blocks (block 0 is the null block)."""
    def make(num_blocks: int = 64, **changes) -> Scheduler:
        config = engine_config(**changes)
        kv = KVCacheManager(num_blocks, config.block_size, enable_caching=config.enable_prefix_caching,
                            max_model_len=config.max_model_len, watermark=config.watermark)
        return Scheduler(config, kv)
    return make


@pytest.fixture(scope="session")
def make_simulation(engine_config):
    """Factory: a one-engine simulation (Llama-3.1-8B on RTX4090 shapes) with `num_blocks` KV blocks
    and every step lasting `step_seconds` of virtual time."""
    model, device = load_model("meta-llama/Llama-3.1-8B"), load_device("RTX4090")
    plan = plan_memory(model, device, engine_config())

    def make(num_blocks: int = 64, step_seconds: float = 1.0, **changes) -> Simulation:
        deployment = Deployment(model=model, device=device, config=engine_config(**changes),
                                memory=replace(plan, num_gpu_blocks=num_blocks), cost_model=FixedStepCost(step_seconds))
        return build_simulation(deployment)
    return make
