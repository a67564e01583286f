"""Operator tables: the format round-trips, shipped tables load with numpy, lookups hit measured cells."""
import numpy as np
import pytest

from emulator.cost.interpolate import GridTable, fill_holes
from emulator.hardware import load_device
from emulator.cost.tables import Grid, OperatorTables
from profiles.operator_tables import find_operator_tables


def test_grid_table_returns_measured_values_at_grid_points_and_flags_extrapolation():
    axes = [np.array([1.0, 2.0, 4.0]), np.array([8.0, 16.0])]
    values = np.array([[1.0, 2.0], [2.0, 4.0], [4.0, 8.0]])
    table = GridTable(axes, values, proportional=(True, True))
    us, extrapolated = table([1, 2, 4], [8, 16, 16])
    assert us.tolist() == [1.0, 4.0, 8.0] and not extrapolated.any()
    us, extrapolated = table([8], [16])  # twice the largest measured size: proportional
    assert us[0] == pytest.approx(16.0) and extrapolated[0]
    us, _ = table([0.5], [4])  # below the grid: the smallest measured kernel
    assert us[0] == 1.0


def test_fill_holes_scales_along_proportional_axes_and_remembers_what_was_measured():
    axes = [np.array([1.0, 2.0, 4.0])]
    filled, measured = fill_holes(axes, np.array([1.0, 2.0, np.nan]), (0,))
    assert filled.tolist() == [1.0, 2.0, 4.0] and measured.tolist() == [True, True, False]
    table = GridTable(axes, filled, measured)
    _, extrapolated = table([3.0])
    assert extrapolated[0]  # touches the unmeasured cell


def test_operator_tables_round_trip(tmp_path):
    grid = Grid({"gpus": np.array([2.0, 4.0]), "bytes": np.array([1e3, 1e6])}, np.array([[5.0, 20.0], [6.0, 30.0]]),
                np.array([[True, True], [True, False]]), "test")
    OperatorTables({"hardware": "X", "source": {"repo": "r"}}, {"all_reduce": grid}).save(tmp_path)
    loaded = OperatorTables.load(tmp_path)
    assert loaded.hardware == "X" and "tables" not in loaded.meta
    g = loaded.grids["all_reduce"]
    assert list(g.axes) == ["gpus", "bytes"] and g.values.tolist() == [[5.0, 20.0], [6.0, 30.0]]
    assert g.measured.tolist() == [[True, True], [True, False]] and g.source == "test"


@pytest.mark.parametrize("hardware", ["H100", "H200", "A100"])
def test_shipped_aiconfigurator_tables_cover_the_serving_ops(hardware):
    tables = find_operator_tables(hardware)
    assert tables is not None and tables.meta["source"]["repo"] == "ai-dynamo/aiconfigurator"
    names = set(tables.grids)
    assert "gemm/bf16" in names and "all_reduce" in names
    assert any(n.startswith("context_attention/") for n in names)
    assert any(n.startswith("generation_attention/") for n in names)
    assert any(n.startswith("moe/") for n in names)
    for grid in tables.grids.values():
        assert np.isfinite(grid.values).all() and (grid.values > 0).all()


def test_h200_gemm_lookup_reproduces_a_measured_cell():
    grid = find_operator_tables("H200").grids["gemm/fp8"]
    i, j, k = 5, 7, 9
    m, n, kk = (grid.axes[a][x] for a, x in zip(("m", "n", "k"), (i, j, k)))
    table = GridTable(list(grid.axes.values()), grid.values, grid.measured)
    us, _ = table([m], [n], [kk])
    assert us[0] == pytest.approx(grid.values[i, j, k])


@pytest.mark.parametrize("hardware", ["H100", "H200", "A100"])
def test_collective_tables_are_keyed_by_bytes(hardware):
    """AIConfigurator logs message sizes in elements; once converted to bytes, a large all-reduce on 8 GPUs
    reaches a bus bandwidth near the NVLink's (NVSwitch reduction lets Hopper pass it a little); read as
    bytes, the elements would halve it."""
    grid = find_operator_tables(hardware).grids["all_reduce"]
    gpus, sizes = grid.axes["gpus"], grid.axes["bytes"]
    i, j = list(gpus).index(8.0), len(sizes) - 1
    bus = 2 * (gpus[i] - 1) / gpus[i] * sizes[j] / (grid.values[i, j] * 1e-6)
    link = load_device(hardware).interconnect.bandwidth
    assert 0.6 * link < bus < 1.25 * link
