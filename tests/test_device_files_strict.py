"""Device YAMLs (full and `base:` overlays) are read strictly: a typo or a bad value is named with its file,
line and field, never silently ignored (a typo'd `memroy_bytes` would leave the base device's memory)."""
import pytest

from emulator.hardware import GiB, UnknownHardwareError, load_device, shipped_devices
from profiles import hardware_cmd
from vllm_emulator.cli import main

FULL = "name: MyGPU\nmemory_bytes: 25769803776\nmemory_bandwidth: 1.0e+12\nflops: {bf16: 1.0e+14}\n"


def _error(tmp_path, text: str) -> str:
    path = tmp_path / "dev.yaml"
    path.write_text(text)
    with pytest.raises(UnknownHardwareError) as err:
        load_device(str(path))
    message = str(err.value)
    assert message.startswith(f"{path}:")
    return message[len(str(path)):]


@pytest.mark.parametrize("text, message", [
    # an overlay: the typo would otherwise keep the H100's 79 GiB
    ("base: H100\nname: myh100\nmemroy_bytes: 40000000000\n",
     ":3: memroy_bytes: unknown field; did you mean 'memory_bytes'?"),
    (FULL + "power:\n  idel_w: 60\n", ":6: power.idel_w: unknown field; did you mean 'idle_w'?"),
    (FULL + "interconnect:\n  bandwith: 4.0e+11\n", ":6: interconnect.bandwith: unknown field; did you mean "
                                                    "'bandwidth'?"),
    (FULL.replace("bf16", "bf61"), ":4: flops.bf61: unknown field; did you mean 'bf16'?"),
    (FULL + "colour: green\n", ":5: colour: unknown field; expected one of name, aliases, kind, arch, sm_count, "
                               "memory_bytes, memory_bandwidth, flops, power, interconnect, host_link, host, "
                               "attention, base, calibration"),
    (FULL.replace("25769803776", "24GiB"), ":2: memory_bytes: expected a whole number > 0 (e.g. 85899345920 or "
                                           "8.0e+10), got '24GiB'"),
    (FULL.replace("25769803776", "2.5e-1"), ":2: memory_bytes: expected a whole number > 0 (e.g. 85899345920 or "
                                            "8.0e+10), got 0.25"),
    (FULL + "power: {idle_w: -5}\n", ":5: power.idle_w: expected a number >= 0, got -5"),
    (FULL + "interconnect: {bandwidth: 4.0e+11, p2p: maybe}\n", ":5: interconnect.p2p: expected true or false, "
                                                                "got 'maybe'"),
    (FULL + "interconnect: {bandwidth: 4.0e+11, kind: nvswitch}\n",
     ":5: interconnect.kind: expected one of nvlink, pcie, xgmi, ici, got 'nvswitch'"),
    (FULL + "host: 5\n", ":5: host: expected a mapping of step_us, per_request_us, per_worker_us"),
    (FULL + "sm_count: [1, 2]\n", ":5: sm_count: expected a whole number >= 0, got a list"),
    (FULL + "memory_bandwidth: 2.0e+12\n", ":5: 'memory_bandwidth' is given twice in one mapping (first on "
                                           "line 3); say it once"),
    ("base: H100\nname: x\nflops:\n  fp8: 1.0e+15\n  fp8: 2.0e+15\n", ":5: 'fp8' is given twice in one mapping "
                                                                     "(first on line 4); say it once"),
])
def test_a_device_file_names_the_line_and_field_of_what_is_wrong(tmp_path, text, message):
    assert _error(tmp_path, text) == message


def test_a_missing_field_is_named(tmp_path):
    path = tmp_path / "dev.yaml"
    path.write_text(FULL + "host_link: {latency: 1.0e-05}\n")
    with pytest.raises(UnknownHardwareError, match=r"dev\.yaml: host_link\.bandwidth: missing"):
        load_device(str(path))
    path.write_text(FULL.replace("flops: {bf16: 1.0e+14}", "flops: {}"))
    with pytest.raises(UnknownHardwareError, match=r"dev\.yaml: flops: expected the dense FLOP/s of at least one"):
        load_device(str(path))


def test_a_byte_count_in_exponent_notation_is_taken_when_whole(tmp_path):
    """PyYAML reads `4e10` (no dot) as a string, YAML 1.2 and JSON as a number: it is the number it spells."""
    path = tmp_path / "dev.yaml"
    path.write_text("base: H100\nname: myh100\nmemory_bytes: 4e10\ninterconnect: {latency: 2e-6}\n")
    d = load_device(str(path))
    assert (d.name, d.memory_bytes, d.interconnect.latency, d.interconnect.bandwidth) == ("myh100", 40_000_000_000,
                                                                                          2e-6, 4.5e11)
    assert isinstance(d.memory_bytes, int)


def test_an_overlay_with_a_calibration_record_loads_as_calibrate_writes_it(tmp_path):
    path = tmp_path / "cal.yaml"
    path.write_text("base: H100\ninterconnect: {bus_bandwidth: 3.0e+11, tables: false}\nhost: {step_us: 900.0}\n"
                    "attention: {decode_skew: 0.3}\ncalibration:\n  runs: [a]\n  anything: {goes: here}\n")
    d = load_device(str(path))
    assert (d.interconnect.bus_bandwidth, d.interconnect.tables, d.host.step_us, d.attention_skew) == \
        (3.0e11, False, 900.0, 0.3)


def test_every_shipped_device_still_loads_and_shows_numbers_as_numbers(capsys):
    for name in shipped_devices():
        assert load_device(name).memory_bytes > GiB
    hardware_cmd.main(type("A", (), {"action": "show", "name": "H100"})())
    shown = capsys.readouterr().out
    assert "latency: 3.0e-06" in shown  # PyYAML 1.1 read `3e-06` as a string; it is shown as the number


def test_replay_with_a_typo_in_its_device_file_stops_with_the_line(tmp_path, capsys):
    device = tmp_path / "h5.yaml"
    device.write_text("base: H100\nname: myh100\nmemroy_bytes: 40000000000\n")
    assert main(["replay", "tests/data/llmservingsim_small.jsonl", "--hardware", str(device),
                 "-o", str(tmp_path / "o")]) == 2
    assert f"error: {device}:3: memroy_bytes: unknown field; did you mean 'memory_bytes'?" in capsys.readouterr().err


def test_a_user_catalogue_file_with_a_typo_is_named(tmp_path, monkeypatch, capsys):
    (tmp_path / "hardware").mkdir()
    (tmp_path / "hardware" / "mine.yaml").write_text(FULL + "memory_bandwith: 1.0e+12\n")
    monkeypatch.setenv("VLLM_EMULATOR_HOME", str(tmp_path))
    assert main(["hardware", "list"]) == 2
    assert "mine.yaml:5: memory_bandwith: unknown field; did you mean 'memory_bandwidth'?" in capsys.readouterr().err
