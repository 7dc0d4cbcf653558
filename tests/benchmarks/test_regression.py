"""The CI regression benchmark can fail: a serial executor (nothing overlaps) is caught by its overlap
signal, whatever the runner's speed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "regression.py"


def load():
    spec = importlib.util.spec_from_file_location("regression_benchmark", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_a_serial_executor_fails_the_regression_benchmark():
    from moe_lightning.tuner.presets import load_preset

    bench = load()
    cpu = load_preset("hardware", "cpu")   # the overlap signal needs no calibration of this host
    result = bench.measure(rounds=1, serial=True, profiles=(cpu, cpu), warm=False)
    assert result["tokens_identical"] and result["spread"]["overlap"]["median"] <= 1.01
    problems, _ = bench.judge(result, json.loads(bench.REFERENCE.read_text()))
    assert any(p.startswith("overlap") for p in problems), problems


def test_the_judge_passes_the_committed_reference_itself_and_flags_each_signal():
    bench = load()
    ref = json.loads(bench.REFERENCE.read_text())
    assert bench.judge(ref, ref) == ([], [])
    broken = json.loads(json.dumps(ref))
    broken["tokens_identical"] = False
    broken["spread"]["sim_relative_error"]["median"] = ref["spread"]["sim_relative_error"]["median"] + 0.5
    problems, _ = bench.judge(broken, ref)
    assert [p.split()[0] for p in problems] == ["CGOPipe", "simulated-vs-measured"]
    broken["noise"] = ["other processes kept 1.00 cores busy"]
    problems, inconclusive = bench.judge(broken, ref)
    assert len(problems) == 1 and inconclusive and "not judged" in inconclusive[0]
