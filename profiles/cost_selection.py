"""Which cost model prices a deployment, in the order of accuracy.

1. tables measured for this exact (hardware, model, dtype, tp): per-layer model
   profiles (profiles.model_profile), priced by emulator.cost.profiled.ProfiledCostModel;
2. the step composed from operator tables measured on this device
   (profiles.operator_tables), any model config (emulator.cost.operators);
3. the step composed from a roofline over the device's spec sheet, with
   efficiencies learned from the profiled devices (emulator.cost.roofline).

`cost_model="profiled"|"operators"|"roofline"` forces one level (for comparisons);
a forced level that has no data raises NoProfileError.
"""
from __future__ import annotations

from emulator.config import EngineConfig
from emulator.cost.base import CostModel
from emulator.cost.profiled import ProfiledCostModel
from emulator.hardware import DeviceSpec
from emulator.models import ModelSpec
from profiles.collectives import collectives_for
from profiles.model_profile import available_profiles, find_profile, moe_routing_imbalance
from profiles.operator_tables import find_operator_tables

_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
# fp16 and bf16 run the same kernels at the same speed on the GPUs we have profiles for (same tensor-core
# rate, same bytes): a profile measured in one prices the other
_SAME_SPEED = {"bf16": ("bf16", "fp16"), "fp16": ("fp16", "bf16")}
LEVELS = ("profiled", "operators", "roofline")


class NoProfileError(ValueError):
    """Nothing can price this deployment."""


def select_cost_model(model: ModelSpec, device: DeviceSpec, config: EngineConfig, cost_model: str | None = None,
                      moe_backend: str = "auto") -> CostModel:
    """`moe_backend` names the fused-MoE kernel of the deployment (see OperatorCostModel)."""
    if cost_model is not None and cost_model not in LEVELS:
        raise NoProfileError(f"unknown cost model {cost_model!r}; choose one of {', '.join(LEVELS)}")
    dtype = _DTYPE_NAMES.get(model.weight_dtype, model.weight_dtype)
    tables = find_operator_tables(device.name) if cost_model in (None, "operators") else None
    collectives = collectives_for(device, tables)
    if cost_model in (None, "profiled"):
        for measured in _SAME_SPEED.get(dtype, (dtype,)):
            profile = find_profile(device.name, model.name, measured, config.tensor_parallel_size)
            if profile is not None and (not model.is_moe or profile.moe is not None):
                # the routing correction is for vLLM's fused-MoE kernel (not a Hugging Face loop over experts)
                fused = str(profile.meta.get("measured_with", "")).startswith("vLLM")
                return ProfiledCostModel(profile, model, device, config, collectives,
                                         moe_routing_imbalance() if fused else None)
        if cost_model == "profiled":
            have = ", ".join(f"{h} {m} {d} tp{t}" for h, m, d, t in available_profiles())
            raise NoProfileError(
                f"no measured profile for {model.name} ({dtype}, tp{config.tensor_parallel_size}) on {device.name}. "
                f"Profiles shipped: {have}. Measure one with `vllm-emulator profile`.")
    # the operator and roofline models, imported only here: a profiled deployment (most replays) needs neither
    from emulator.cost.operators import OperatorCostModel
    from emulator.cost.table_pricer import TablePricer
    from profiles.roofline_fit import roofline_for
    roofline = roofline_for(device)
    if cost_model in (None, "operators"):
        if tables is not None:
            source = tables.meta.get("source", {})
            label = f"operator tables {device.name} from {source.get('repo', '?')}@{source.get('commit', '?')}"
            return OperatorCostModel(model, device, config, TablePricer(tables.grids, roofline, device.name), label,
                                     moe_backend, collectives)
        if cost_model == "operators":
            raise NoProfileError(f"no operator tables for {device.name}; run `vllm-emulator profile` on it")
    return OperatorCostModel(model, device, config, roofline,
                             f"roofline over the {device.name} spec sheet (efficiencies learned from profiled GPUs)",
                             moe_backend, collectives)
