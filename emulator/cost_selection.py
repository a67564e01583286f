"""Which cost model prices a deployment: measured model tables when they exist.

The order of preference is the accuracy order: tables measured for this exact
(hardware, model, dtype, tp); then composition from operator tables of the
device; then a roofline for devices that were never profiled.
"""
from __future__ import annotations

from emulator.config import EngineConfig
from emulator.costmodel import ProfiledCostModel
from emulator.hardware import DeviceSpec
from emulator.models import ModelSpec
from profiles.model_profile import available_profiles, find_profile

_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


class NoProfileError(ValueError):
    """Nothing can price this deployment."""


def select_cost_model(model: ModelSpec, device: DeviceSpec, config: EngineConfig):
    dtype = _DTYPE_NAMES.get(model.dtype, model.dtype)
    profile = find_profile(device.name, model.name, dtype, config.tensor_parallel_size)
    if profile is not None:
        return ProfiledCostModel(profile, model, device, config)
    have = ", ".join(f"{h} {m} {d} tp{t}" for h, m, d, t in available_profiles())
    raise NoProfileError(
        f"no measured profile for {model.name} ({dtype}, tp{config.tensor_parallel_size}) on {device.name}. "
        f"Profiles shipped: {have}. Measure one with `vllm-emulator profile`.")
