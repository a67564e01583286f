"""The roofline: physics from the spec sheet, efficiencies learned from profiled devices."""
import numpy as np

from emulator.hardware import load_device
from emulator.cost.roofline import Roofline
from emulator.cost.work import gemm_work, generation_attention_work
from profiles.roofline_fit import fit, ideal_times, load_curves, profiled_devices


def test_work_formulas_count_flops_and_bytes():
    flops, traffic = gemm_work(np.array([1.0]), 4096, 4096, "bf16")
    assert flops[0] == 2 * 4096 * 4096 and traffic[0] == 4096 * 4096 * 2 + 4096 * 2 + 4096 * 2
    _, full = generation_attention_work(1, 1000, 8, 8, 128, 0, "bf16")
    _, windowed = generation_attention_work(1, 1000, 8, 8, 128, 128, "bf16")
    assert windowed < full  # a sliding window reads only its window of the KV cache


def test_roofline_is_monotonic_and_never_below_the_launch_floor():
    roof = Roofline(load_device("B200"), load_curves())
    small, _, _, method = roof.gemm(np.array([1.0, 64.0, 4096.0]), 4096, 4096, "bf16")
    assert method == "roofline" and small[0] <= small[1] <= small[2]
    assert small[0] >= load_curves().floor("gemm_bf16")


def test_faster_spec_gives_faster_kernels():
    curves = load_curves()
    m = np.array([4096.0])
    h100 = Roofline(load_device("H100"), curves).gemm(m, 8192, 8192, "bf16").us[0]
    b200 = Roofline(load_device("B200"), curves).gemm(m, 8192, 8192, "bf16").us[0]
    assert b200 < h100


def test_curves_learn_only_from_vllm_kernel_tables():
    """The shipped curves are what the fit script writes, from the AIConfigurator (vLLM-kernel) tables."""
    learners = profiled_devices(vllm_kernels_only=True)
    assert {"A100", "H100", "H200"} <= set(learners) < set(profiled_devices())
    assert fit(learners).to_dict() == load_curves().to_dict()


def test_leave_one_device_out_gemm_error_is_bounded():
    devices = profiled_devices(vllm_kernels_only=True)
    held_out = "H200"
    curves = fit({h: v for h, v in devices.items() if h != held_out})
    device, samples = devices[held_out]
    entry = samples["gemm_bf16"]
    pred = Roofline(device, curves).time("gemm", entry["flops"], entry["traffic"], "bf16", "bf16")
    err = np.abs(pred - entry["us"]) / entry["us"]
    assert np.median(err) < 0.3
    ideal, _ = ideal_times(device, entry)
    assert (entry["us"] >= ideal * 0.9).mean() > 0.95  # measured kernels respect the spec-sheet roof
