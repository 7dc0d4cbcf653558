"""The benchmark scripts refuse bad input in one line with exit 2, before any measurement, and every record
they write says what its numbers are (`kind`: measured / simulated / predicted) and where (`where`)."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # a dataclass in the script looks its module up there
    spec.loader.exec_module(module)
    return module


CASES = [   # (script, arguments, what the one line must say); each ended in a traceback (or ran on) before
    ("kernel_choice", ["--repeats", "0"], "--repeats"),                       # statistics.median([])
    ("kernel_choice", ["--requests", "2", "--micro-batch", "3", "--layers", "1"], "micro_batch_size"),  # Policy
    ("kv_layout", ["--repeats", "0"], "--repeats"),                           # UnboundLocalError
    ("batching", ["--gen-max", "1"], "--gen-max"),                            # torch.randint(2, 2)
    ("cpu_attention", ["--dtypes", "foo"], "accepted: bfloat16"),             # getattr(torch, "foo")
    ("cpu_attention", ["--fallback-repeats", "0"], "--fallback-repeats"),     # stats([])
    ("ep_pipeline", ["--ranks", "3"], "do not split"),                        # ValueError in each rank
    ("regression", ["--attempts", "0"], "--attempts"),                        # UnboundLocalError
    ("regression", ["--reference", "/nonexistent/reference.json"], "cannot read"),
    ("measurement_stability", ["--runs", "0"], "--runs"),
    ("sim_vs_measured", ["--policy", "batch_size=x"], "batch_size=x"),        # int("x") after calibrating
    ("sim_vs_measured", ["--repeats", "0"], "--repeats"),                     # ran one repeat silently
    ("tuner_seeding", ["--save"], "--overwrite"),                             # replaced the committed record
]


@pytest.mark.parametrize(("script", "args", "says"), CASES, ids=[f"{c[0]} {' '.join(c[1])}" for c in CASES])
def test_bad_input_is_one_line_and_exit_2(script, args, says):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(BENCHMARKS / f"{script}.py"), *args], capture_output=True, text=True,
                       env=env, timeout=120, cwd=ROOT)
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and says in lines[0], (r.returncode, r.stdout + r.stderr)


def test_every_benchmark_record_says_its_kind_and_where():
    """A script that writes a record (through files.write_json) names its numbers' kind and where they
    come from; the CI regression reference keeps the format CI reads (its judge, not a reader, uses it)."""
    missing = []
    for script in sorted(BENCHMARKS.glob("*.py")):
        if script.name == "regression.py":
            continue
        tree = ast.parse(script.read_text())
        writes = any(isinstance(n, ast.Call) and getattr(n.func, "id", getattr(n.func, "attr", None)) == "write_json"
                     for n in ast.walk(tree))
        keys = {k.value for n in ast.walk(tree) if isinstance(n, ast.Dict)
                for k in n.keys if isinstance(k, ast.Constant)}
        if writes and not {"kind", "where"} <= keys:
            missing.append(f"{script.name}: {sorted({'kind', 'where'} - keys)}")
    assert not missing, missing


def test_the_regression_summary_prints_a_one_round_run():
    """`--rounds 1`: a spread of one value has no stdev (null); the summary printed it with :.3f."""
    bench = load("regression")
    one = json.loads(bench.REFERENCE.read_text())
    one.setdefault("simulated_e2e_s_each_calibration", [one["simulated_e2e_s"]] * 2)   # (older reference)
    for d in one["spread"].values():
        d.update(n=1, stdev=None, cv=None)
    text = bench.show(one)
    assert "overlap (busy / wall)" in text and "± None" not in text


def test_one_run_has_no_coefficient_of_variation():
    """One fresh process measured once has no spread: its CV is unknown, not a perfect 0%."""
    stability = load("measurement_stability")
    assert stability.cv([12.5]) is None and stability.pct(None) == "-"
    assert stability.cv([1.0, 3.0]) == pytest.approx(2 ** 0.5 / 2)


def test_the_gpu_suite_refuses_an_unknown_stage_before_creating_anything(tmp_path):
    r = subprocess.run(["bash", str(BENCHMARKS / "gpu_suite.sh"), "parity-typo"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=60)
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "parity|bench" in lines[0], r.stdout + r.stderr
    assert not (tmp_path / "results").exists()   # it made results/gpu in the caller's folder first


def test_the_kernel_to_fallback_speedup_is_taken_over_the_rounds_the_fallback_ran():
    """The fallback runs in the first rounds only; the kernel's median over every round is another moment's
    (here the host slowed after round 3: over every round the kernel looks 10x slower than it was)."""
    attention = load("cpu_attention")
    kernel, fallback = [10.0, 10.0, 10.0, 1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0]
    assert attention.same_rounds_ratio(kernel, fallback) == 5.0


def test_tuner_seeding_runs_a_workload_under_32_requests(tmp_path):
    """The grid stepped batch sizes by 32 from 32: a small workload had none, and max() of nothing failed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(BENCHMARKS / "tuner_seeding.py"), "--model", "tiny-mixtral", "--hardware",
                        "cpu", "--workload", "synthetic", "--trials", "2", "--seeds", "1"], capture_output=True,
                       text=True, env=env, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-500:]
    assert "feasible points simulated" in r.stdout and "hrm_seeded: final fraction" in r.stdout


def test_the_cache_resident_ceiling_is_timed_under_the_lock_with_the_hosts_load():
    """The ceiling section timed outside the measurement lock and recorded no load: beside another busy
    process a 2-thread team measured 2.8 GB/s against 108.6 an hour before, unflagged."""
    import torch

    from moe_lightning.kernels import cpu_attention as ca

    attention = load("cpu_attention")
    p = attention.Point("float32", 1, 32, 16, 4, 2, 16)
    rec = attention.compute_ceiling(p, 3, ca.load_extension(required=True), torch.Generator().manual_seed(0))
    assert rec["cache_resident_gbps"]["n"] == 3 and isinstance(rec["unstable"], bool)
    assert "others_busy_cores" in rec["host_load"] and "lock_wait_s" in rec["host_load"]


def test_every_measuring_benchmark_records_the_hosts_load():
    """DESIGN: a measurement records the host's load; these records had none, so a ratio measured beside a
    busy process could not be told from one measured on an idle host."""
    missing = []
    for name in ("kernel_choice", "kv_layout", "batching", "sim_vs_measured", "ep_pipeline", "cpu_attention",
                 "measurement_stability"):
        tree = ast.parse((BENCHMARKS / f"{name}.py").read_text())
        keys = {k.value for n in ast.walk(tree) if isinstance(n, ast.Dict)
                for k in n.keys if isinstance(k, ast.Constant)}
        keys |= {n.slice.value for n in ast.walk(tree) if isinstance(n, ast.Subscript) and isinstance(n.ctx, ast.Store)
                 and isinstance(n.slice, ast.Constant)}
        if "host_load" not in keys:
            missing.append(name)
    assert not missing, missing


def test_a_busy_run_is_said_in_one_line():
    from moe_lightning.bench_args import busy_warning

    idle = {"others_busy_cores": 0.05, "busy": False}
    assert busy_warning([idle, idle]) is None
    line = busy_warning([idle, {"others_busy_cores": 1.3, "busy": True}])
    assert line.startswith("warning:") and "1.30 cores" in line and "1 of 2" in line


@pytest.mark.slow
def test_batching_leaves_no_scratch_folder(tmp_path):
    """Every run left its prompts file in a moe-lightning-batching-* folder under the temporary folder."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
    r = subprocess.run([sys.executable, str(BENCHMARKS / "batching.py"), "--layers", "1", "--requests", "2",
                        "--batch", "2", "--micro-batch", "1", "--prompt-max", "8", "--gen-max", "2", "--repeats", "1"],
                       capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and "outputs identical across configurations: True" in r.stdout, r.stderr[-500:]
    assert not list(tmp_path.glob("moe-lightning-batching-*"))
