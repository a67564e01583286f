"""From what a user names (model, hardware, vLLM engine flags) to a Deployment priced by the shipped tables."""
from __future__ import annotations

from emulator.config import EngineArgs
from emulator.deployment import Deployment, plan_deployment
from emulator.hardware import DeviceSpec, load_device
from emulator.models import load_model
from profiles.cost_selection import select_cost_model


def build_deployment(model: str, hardware: str | DeviceSpec, args: EngineArgs | None = None,
                     compile_cache: str = "cold", cost_model: str | None = None) -> Deployment:
    """`hardware`: a catalogue name, a device YAML, or a DeviceSpec; `cost_model` forces one pricing level
    ("profiled", "operators", "roofline"); default: the best one."""
    model_spec = load_model(model)
    device = hardware if isinstance(hardware, DeviceSpec) else load_device(hardware)
    return plan_deployment(
        model_spec, device, args or EngineArgs(),
        lambda config: select_cost_model(model_spec, device, config, cost_model, config.moe_backend),
        compile_cache)
