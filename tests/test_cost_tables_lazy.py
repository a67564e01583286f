"""Operator tables parse each grid's arrays when first read (emulator.cost.tables): the same arrays, of the same
dtypes, as parsing every grid at load, for every grid of a shipped device's tables and of tables just saved; a
copied or pickled grid is the plain Grid it stands for."""
from __future__ import annotations

import copy
import pickle

import numpy as np

from emulator.cost.tables import Grid, OperatorTables, read_yaml
from profiles.operator_tables import find_operator_tables, operator_dir


def _parsed_at_once(directory) -> dict[str, Grid]:
    grids = {}
    with np.load(directory / "tables.npz") as npz:
        for name, info in read_yaml(directory / "meta.yaml")["tables"].items():
            values = npz[f"{name}/values"].astype(np.float64)
            measured = npz[f"{name}/measured"] if f"{name}/measured" in npz.files else np.ones(values.shape, bool)
            grids[name] = Grid({axis: npz[f"{name}/axis/{axis}"] for axis in info["axes"]}, values, measured,
                               info.get("source", ""))
    return grids


def _same(a: Grid, b: Grid) -> bool:
    return (a.source == b.source and list(a.axes) == list(b.axes)
            and all(a.axes[k].dtype == b.axes[k].dtype and np.array_equal(a.axes[k], b.axes[k]) for k in a.axes)
            and a.values.dtype == b.values.dtype and np.array_equal(a.values, b.values)
            and a.measured.dtype == b.measured.dtype and np.array_equal(a.measured, b.measured))


def test_every_grid_reads_as_parsed_at_load():
    tables = OperatorTables.load(operator_dir("H100"))
    expected = _parsed_at_once(operator_dir("H100"))
    assert list(tables.grids) == list(expected) and len(expected) > 100
    assert all(_same(tables.grids[name], grid) for name, grid in expected.items())
    assert find_operator_tables("H100").grids["gemm/bf16"].values.shape == expected["gemm/bf16"].values.shape


def test_saved_tables_read_back_with_their_holes_and_a_grid_copies_as_a_plain_grid(tmp_path):
    axes = {"gpus": np.array([2.0, 4.0]), "bytes": np.array([1.0, 2.0, 4.0])}
    measured = np.array([[True, False, True], [True, True, True]])
    grids = {"all_reduce": Grid(axes, np.arange(6.0).reshape(2, 3), measured, "here"),
             "memory_bound": Grid({"bytes": np.array([8.0, 16.0])}, np.array([1.5, 2.5]), np.ones(2, bool))}
    OperatorTables({"hardware": "X"}, grids).save(tmp_path)
    loaded = OperatorTables.load(tmp_path)
    assert all(_same(loaded.grids[name], grid) for name, grid in grids.items())
    for copied in (copy.deepcopy(loaded.grids["all_reduce"]), pickle.loads(pickle.dumps(loaded.grids["all_reduce"]))):
        assert type(copied) is Grid and _same(copied, grids["all_reduce"])
