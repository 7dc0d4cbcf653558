"""Calibration on the CPU (quick): the profile it writes loads like a shipped preset, with positive
numbers, and the CPU plays the GPU's role."""

from __future__ import annotations

import dataclasses
import json

import pytest

from moe_lightning.config import GpuSpec, HardwareSpec
from moe_lightning.run_config import RunConfig
from moe_lightning.tasks.calibrate import CalibrateTask
from moe_lightning.tuner import presets
from moe_lightning.tuner.calibrate import load_hardware_yaml, override_args


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("calibrate")
    task = CalibrateTask(out_yaml=str(tmp / "mybox.yaml"), quick=True)
    report = task.run(RunConfig(task=task, device="cpu", out=str(tmp / "run.json"), run_dir=str(tmp)))
    return tmp, report


def test_quick_calibration_writes_a_loadable_profile(calibrated, tmp_path, monkeypatch):
    tmp, report = calibrated
    hw = load_hardware_yaml(tmp / "mybox.yaml")
    assert isinstance(hw, HardwareSpec) and hw.name == "mybox"
    for value in (hw.gpu.peak_tflops, hw.gpu.bandwidth_gbps, hw.gpu.memory_gib, hw.cpu.peak_tflops,
                  hw.cpu.bandwidth_gbps, hw.cpu.memory_gib, hw.link.h2d_gbps, hw.link.d2h_gbps):
        assert value > 0
    assert hw.gpu.name == "cpu-as-gpu" and hw.gpu.peak_tflops == hw.cpu.peak_tflops  # the CPU plays the GPU
    # The simulator's measured rates: a one-row GEMM streams its weight and cannot reach the rate of a
    # thousand-row one; an expert kernel fed one token per expert cannot either.
    assert len(hw.gpu.gemm_rows) == len(hw.gpu.gemm_tflops) >= 4 and hw.gpu.gemm_rows[-1] >= 1024
    assert hw.gpu.gemm_tflops[0] < hw.gpu.gemm_tflops[-1] / 4
    assert hw.gpu.expert_loads[0] == 1 and hw.gpu.expert_tflops[0] < hw.gpu.expert_tflops[-1] / 4
    assert hw.gpu.peak_tflops >= max(hw.gpu.gemm_tflops + hw.gpu.expert_tflops) * 0.999   # a peak, not below
    assert hw.cpu.attn_gbps > 0 and hw.task_overhead_us > 0 and hw.step_overhead_us >= 0
    # Dropped into a conf/hardware folder, it loads like any shipped preset.
    (tmp_path / "hardware").mkdir()
    (tmp_path / "hardware" / "mybox.yaml").write_text((tmp / "mybox.yaml").read_text())
    monkeypatch.setattr(presets, "CONF_DIR", tmp_path)
    assert presets.load_preset("hardware", "mybox") == hw


def test_calibration_report_holds_the_measurements(calibrated):
    tmp, report = calibrated
    doc = json.loads((tmp / "run.json").read_text())
    m = doc["extra"]["measurements"]
    assert doc["task"] == "calibrate" and m["device"] == "cpu" and m["quick"] is True
    # (no bound on `seconds`: a wall-clock bound in a test judges the host's load, not the code; the quick
    # sizes are what keep it short)
    assert m["cpu_attn_gbps"] > 0 and m["seconds"] > 0
    # On a host where the GPU role gets more threads alone than beside CPU attention, both curves are
    # measured at both thread counts (the 2-core CI runner: one thread, then two).
    from moe_lightning.tuner.calibrate import CPU_EXPERT_SHAPE, _gpu_role_threads

    split, every = _gpu_role_threads(CPU_EXPERT_SHAPE[0] * CPU_EXPERT_SHAPE[1])
    lengths = (len(m["gemm_tflops_all_cores"]), len(m["expert_tflops_all_cores"]))
    assert lengths == ((len(m["gemm_rows"]), len(m["expert_loads"])) if every > split else (0, 0))
    assert all(r > 0 for r in m["gemm_tflops_all_cores"] + m["expert_tflops_all_cores"])
    # The host costs: a task issued in microseconds at most; a barrier (two thread wake-ups) costs more.
    assert 0 < m["issue_overhead_s"] < 1e-4 and m["sync_overhead_s"] > m["issue_overhead_s"]
    assert doc["hardware"]["profile"]["name"] == "mybox"
    assert report.extra["hardware_yaml"] == str(tmp / "mybox.yaml")
    # Measured here, under the host's load: a busy host marks the profile's measurements noisy
    assert doc["metrics"]["kind"] == "measured" and doc["hardware"]["detected"]["device"] == "cpu"
    load = doc["environment"]["host_load"]
    assert load["wall_s"] > 0 and doc["metrics"]["noisy"] is load["busy"]


def test_calibration_writes_the_host_costs(calibrated):
    """Into the profile (`hardware.issue_overhead_us` / `sync_overhead_us`); the simulator's costs
    then read them."""
    from moe_lightning.config import Policy
    from moe_lightning.tuner.costs import TaskCosts

    tmp, report = calibrated
    m = json.loads((tmp / "run.json").read_text())["extra"]["measurements"]
    keys = {line.split(":")[0] for line in (tmp / "mybox.yaml").read_text().splitlines() if not line.startswith("#")}
    assert {"issue_overhead_us", "sync_overhead_us"} <= keys
    hw = load_hardware_yaml(tmp / "mybox.yaml")
    costs = TaskCosts.for_policy(presets.load_preset("model", "tiny-mixtral"), hw, Policy())
    assert costs.sync_s == pytest.approx(m["sync_overhead_s"], rel=0.01)
    assert costs.issue_s == pytest.approx(m["issue_overhead_s"], rel=0.01)


def test_override_args_spell_the_profile():
    args = override_args(HardwareSpec(name="box", gpu=GpuSpec(gemm_rows=[1, 64], gemm_tflops=[0.01, 0.2])))
    assert args[0] == "hardware=cpu" and "\"hardware.name='box'\"" in args
    assert "hardware.link.h2d_gbps=5.0" in args
    assert "'hardware.gpu.gemm_rows=[1,64]'" in args and "'hardware.gpu.gemm_tflops=[0.01,0.2]'" in args


def test_a_barrier_too_cheap_to_measure_is_not_read_back_as_the_default(monkeypatch):
    """A profile's sync_overhead_us of 0 means "not calibrated" (the simulator then takes its default): a
    barrier that the host measures at nothing (a loaded host once gave 0) is kept at the floor instead."""
    import statistics

    from moe_lightning.config import Policy
    from moe_lightning.tuner import calibrate
    from moe_lightning.tuner.costs import TaskCosts

    monkeypatch.setattr(statistics, "median", lambda values: 0.0)   # every difference measured as nothing
    issue, sync = calibrate.measure_host("cpu", tasks=4, repeats=1)
    assert issue == sync == calibrate.FLOOR_S
    hw = HardwareSpec(sync_overhead_us=sync * 1e6, issue_overhead_us=issue * 1e6)
    costs = TaskCosts.for_policy(presets.load_preset("model", "tiny-mixtral"), hw, Policy())
    assert costs.sync_s == pytest.approx(calibrate.FLOOR_S) and costs.issue_s == pytest.approx(calibrate.FLOOR_S)


def test_the_table_lists_the_gpu_roles_curves_under_the_gpu_role():
    """The GEMM and expert curves are measured on the GPU role (`gpu.*` in the profile): the table shows
    them in its section, not under the CPU's."""
    from moe_lightning.tasks.calibrate import table
    from moe_lightning.tuner.calibrate import Measurements

    given = {"device": "cpu", "gpu_name": "cpu-as-gpu", "cpu_name": "x86_64", "cpu_cores": 2, "quick": True,
             "gemm_rows": [1, 4], "gemm_tflops": [0.01, 0.02], "expert_loads": [1], "expert_tflops": [0.01]}
    required = [f.name for f in dataclasses.fields(Measurements)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    m = Measurements(**{name: 1.0 for name in required} | given)
    lines = [line.strip() for line in table(m).splitlines()]
    sections = [i for i, line in enumerate(lines) if line.startswith(("GPU", "link", "CPU"))]
    gemm = next(i for i, line in enumerate(lines) if line.startswith("GEMM by rows"))
    experts = next(i for i, line in enumerate(lines) if line.startswith("experts by tokens"))
    assert lines[sections[0]].startswith("GPU") and sections[0] < gemm < experts < sections[1], lines


def test_the_memory_a_cpu_only_calibration_sets_says_it_is_a_share():
    """Without CUDA the GPU role's and the CPU's memory_gib are a third and two thirds of the host's RAM,
    set, not measured: the table and the profile's comments say so (the table printed "7.8 GiB" and
    "15.7 GiB" bare, which read as a device and this host's memory); a CUDA run's are the device's own."""
    from moe_lightning.tasks.calibrate import table
    from moe_lightning.tuner.calibrate import Measurements, hardware_spec, hardware_yaml

    required = [f.name for f in dataclasses.fields(Measurements)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    given = {"device": "cpu", "gpu_name": "cpu-as-gpu", "cpu_name": "x86_64", "cpu_cores": 2, "quick": True,
             "gemm_rows": [1], "gemm_tflops": [0.01], "expert_loads": [1], "expert_tflops": [0.01],
             "gpu_memory_gib": 8.0, "cpu_memory_gib": 16.0}
    m = Measurements(**{name: 1.0 for name in required} | given)
    lines = [line.strip() for line in table(m).splitlines()]
    memory = next(line for line in lines if line.split()[:2] == ["memory", "8.0"])
    assert "8.0 GiB (a third of this host's 24.0 GiB" in memory and "not measured" in memory, lines
    assert next(line for line in lines if line.startswith("CPU")).endswith("16.0 GiB (the other two thirds)")
    assert "this host's 24.0 GiB of RAM split" in hardware_yaml(hardware_spec(m), m)
    cuda = dataclasses.replace(m, device="cuda", gpu_name="H200")
    assert "third" not in table(cuda) and "third" not in hardware_yaml(hardware_spec(cuda), cuda)
