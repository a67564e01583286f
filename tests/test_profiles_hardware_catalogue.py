"""The hardware catalogue takes a user's own device files."""
import pytest

from emulator.hardware import UnknownHardwareError, load_device, shipped_devices
from profiles import hardware_cmd


def test_user_device_joins_the_catalogue_and_is_priced_by_the_roofline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLLM_EMULATOR_HOME", str(tmp_path))
    (tmp_path / "hardware").mkdir()
    (tmp_path / "hardware" / "my-gpu.yaml").write_text(
        "name: MyGPU\naliases: [my-gpu]\nmemory_bytes: 103079215104\nmemory_bandwidth: 3.0e+12\n"
        "flops: {bf16: 8.0e+14, fp8: 1.6e+15}\ninterconnect: {name: nvlink, bandwidth: 4.0e+11, latency: 3.0e-6}\n")
    assert "MyGPU" in shipped_devices()
    assert load_device("my-gpu").memory_bandwidth == 3.0e12
    hardware_cmd.main(type("A", (), {"action": "list", "name": None})())
    assert "MyGPU" in capsys.readouterr().out


def test_a_broken_user_file_is_named_in_the_error(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_EMULATOR_HOME", str(tmp_path))
    (tmp_path / "hardware").mkdir()
    (tmp_path / "hardware" / "bad.yaml").write_text("memory_bytes: 1\n")
    with pytest.raises(UnknownHardwareError, match="bad.yaml"):
        load_device("H100")


def test_a_renaming_overlay_in_the_catalogue_leaves_the_base_its_aliases(tmp_path, monkeypatch):
    """`base: H100` + a new name is a second device: H100's aliases keep naming H100, not both."""
    monkeypatch.setenv("VLLM_EMULATOR_HOME", str(tmp_path))
    (tmp_path / "hardware").mkdir()
    (tmp_path / "hardware" / "my-h100.yaml").write_text("base: H100\nname: MyH100\nmemory_bytes: 40000000000\n")
    assert "MyH100" in shipped_devices()
    assert load_device("MyH100").memory_bytes == 40_000_000_000
    assert load_device("MyH100").aliases == ()
    h100 = load_device("H100")
    assert h100.name == "H100" and h100.memory_bytes != 40_000_000_000
    assert all(load_device(alias).name == "H100" for alias in h100.aliases)
