"""The benchmarks write their JSON as the package does (`moe_lightning.files.write_json`): strict JSON, a
NaN or infinity refused by name, and atomic, so a refused or failed write leaves the previous file whole."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from tests.benchmarks.test_regression import load

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_the_regression_reference_refuses_a_nan_and_keeps_the_old_one(tmp_path):
    bench = load()
    good = json.loads(bench.REFERENCE.read_text())
    path = tmp_path / "reference.json"
    assert bench.save_reference(good, path) is None
    assert json.loads(path.read_text()) == good
    old = path.read_text()
    bad = json.loads(old)
    bad["spread"]["sim_relative_error"]["median"] = float("nan")   # a statistic gone wrong upstream
    why = bench.save_reference(bad, path)
    assert why and "spread.sim_relative_error.median is nan" in why
    assert path.read_text() == old and sorted(p.name for p in tmp_path.iterdir()) == ["reference.json"]


def test_every_json_under_benchmarks_goes_through_the_package_writer():
    """json.dump(s) writes NaN as a bare `NaN` that most readers refuse, and a plain write_text leaves a
    half-written record on a crash; `write_json` (or `json_text` with `atomic_write`) does neither."""
    direct = []
    for script in sorted(BENCHMARKS.glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("dump", "dumps") and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "json"):
                direct.append(f"{script.name}:{node.lineno}")
    assert not direct, f"JSON written past the strict, atomic writer: {direct}"
