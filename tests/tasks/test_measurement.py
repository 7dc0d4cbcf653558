"""Measured runs: repeats with their spread, the noise verdict, the host's load and thread layout in the
run document, and a refusal before allocating a model this host cannot hold."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from moe_lightning.config import ModelSpec, Policy, Sampling, Workload
from moe_lightning.engine.generation import GenerationResult
from moe_lightning.hostload import HostLoadReport
from moe_lightning.report import RunReport, Spread
from moe_lightning.run_config import RunConfig
from moe_lightning.systems import CGOPipeSystem
from moe_lightning.tasks.generate import measured_metrics, run_generation
from tests.conftest import cli_with_peak_rss


def test_spread_by_hand():
    s = Spread.of([4.0, 1.0, 3.0, 2.0])
    assert (s.n, s.median, s.mean, s.min, s.max) == (4, 2.5, 2.5, 1.0, 4.0)
    assert math.isclose(s.stdev, math.sqrt(5 / 3)) and math.isclose(s.cv, math.sqrt(5 / 3) / 2.5)
    assert math.isclose(s.p90, 3.7)  # inclusive: position 0.9 * 3 = 2.7 between 3 and 4
    assert Spread.of([5.0]).p90 == 5.0


def test_one_value_has_no_spread_and_no_values_no_statistics():
    """One repeat has no stdev: null (n says why), never 0, which would read as a perfectly steady run;
    the coefficient of variation with it. No values: every statistic null."""
    one = Spread.of([5.0])
    assert (one.n, one.median, one.min, one.max, one.p90) == (1, 5.0, 5.0, 5.0, 5.0)
    assert one.stdev is None and one.cv is None and one.to_dict()["cv"] is None
    assert one.show(".1f") == "5.0 (n 1)"
    none = Spread.of([])
    assert none.n == 0 and none.median is None and none.stdev is None and none.cv is None
    assert none.show() == "-"
    assert Spread.of([0.0, 0.0]).cv is None   # stdev 0 over a mean of 0: no ratio


def test_a_single_repeat_is_judged_by_the_host_alone():
    """The noise guard cannot judge the spread of one repeat: it neither fails nor calls it steady by its
    CV; the host's load still marks it."""
    m = measured_metrics([_result(1.0)], max_cv=0.05)
    assert not m.noisy and m.spread["throughput_tok_s"].cv is None


def test_repeats_give_medians_with_their_spread_and_the_host_in_the_document(tiny_path, tmp_path):
    cfg = RunConfig(system=CGOPipeSystem(), workload=Workload(num_requests=6, gen_len=5),
                    policy=Policy(batch_size=6, micro_batch_size=3), sampling=Sampling(ignore_eos=True), device="cpu")
    gen = run_generation(cfg, progress=False, warmup_tokens=1, repeats=3)
    m = gen.report.metrics
    assert m.kind == "measured" and m.repeats == 3
    assert m.spread["throughput_tok_s"].n == 3 and m.spread["prefill_s"].n == 3
    steps = gen.report.extra["batching"]["decode_steps"]   # admission may run several rounds
    assert steps >= 5 - 1 and m.spread["decode_step_s"].n == 3 * steps  # every decode step of every repeat
    sp = m.spread["throughput_tok_s"]
    assert sp.min <= m.throughput_tok_s <= sp.max and m.throughput_tok_s == sp.median
    assert gen.report.extra["outputs_identical_across_repeats"] is True
    env = gen.report.environment
    assert env["threads"]["cores"] >= 1 and env["threads"]["gpu"] >= 1 and "rule" in env["threads"]
    assert env["host_load"]["wall_s"] > 0 and "others_busy_cores" in env["host_load"]
    # The typed report survives a JSON round trip, spread included.
    back = RunReport.from_json(gen.report.to_json(tmp_path / "run.json") and tmp_path / "run.json")
    assert back.metrics.spread["throughput_tok_s"].median == sp.median and back.schema_version == 2


def _result(total_s: float, tokens: int = 100) -> GenerationResult:
    per = tokens // 10
    return GenerationResult(output_ids=[[0] * per] * 10, prefill_s=total_s / 4, decode_s=3 * total_s / 4,
                            decode_step_s=[3 * total_s / 4 / (per - 1)] * (per - 1))


def test_link_bytes_are_one_pass_s_whatever_the_repeats_and_loops(tiny_path):
    """link_bytes sit beside generated_tokens (one pass over the workload): timing more passes, as repeats
    or as loops per repeat, does not multiply them."""
    cfg = RunConfig(system=CGOPipeSystem(), workload=Workload(num_requests=4, gen_len=3),
                    policy=Policy(batch_size=4, micro_batch_size=2, expert_gpu_fraction=0.25),
                    sampling=Sampling(ignore_eos=True), device="cpu")
    once = run_generation(cfg, progress=False).report
    many = run_generation(cfg, progress=False, repeats=3, min_repeat_s=0.05).report
    assert many.extra["loops_per_repeat"] > 1   # the case: 3 repeats of several passes each
    assert once.metrics.link_bytes["h2d"] > 0   # experts streamed
    assert many.metrics.link_bytes == once.metrics.link_bytes
    assert many.metrics.generated_tokens == once.metrics.generated_tokens


def test_a_run_that_varies_beyond_max_cv_is_noisy_and_says_why():
    steady = measured_metrics([_result(1.0), _result(1.01), _result(0.99)], max_cv=0.05)
    assert not steady.noisy and steady.noise == []
    shaky = measured_metrics([_result(1.0), _result(1.5), _result(0.7)], max_cv=0.05)
    assert shaky.noisy and "varies" in shaky.noise[0]
    assert shaky.throughput_tok_s == 100.0  # the median repeat, not the mean


def test_a_busy_host_makes_a_run_noisy():
    host = HostLoadReport(wall_s=2.0, loadavg_1m_start=3.0, loadavg_1m_end=3.0, others_cpu_s=1.6,
                          others_busy_cores=0.8)
    m = measured_metrics([_result(1.0)], max_cv=0.05, host=host)
    assert m.noisy and "0.80 cores" in m.noise[0]


def test_a_model_this_host_cannot_hold_is_refused_before_allocation(tmp_path):
    """Mixtral-8x7B in fp32 (187 GB) on a 24 GiB runner: one line, exit 3, and it never allocated."""
    r, peak_kib = cli_with_peak_rss("task=bench", "model=mixtral-8x7b", "workload.num_requests=2",
                                    f"hydra.run.dir={tmp_path}", timeout=120)
    assert r.returncode == 3, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "GiB of host memory" in err[0] and "Traceback" not in r.stderr
    assert 0 < peak_kib < 2 * 1024 * 1024  # KiB: the weights were never built


def test_noisy_trials_are_measured_again_and_the_steadiest_kept(monkeypatch):
    from moe_lightning.config import TunerConfig
    from moe_lightning.tuner import search

    docs = iter([{"metrics": {"noisy": True, "spread": {"throughput_tok_s": {"cv": 0.2}}, "id": 1}},
                 {"metrics": {"noisy": True, "spread": {"throughput_tok_s": {"cv": 0.08}}, "id": 2}},
                 {"metrics": {"noisy": False, "spread": {"throughput_tok_s": {"cv": 0.01}}, "id": 3}}])
    monkeypatch.setattr(search, "run_trial_process", lambda *a, **k: next(docs))
    doc, n = search.measure_trial(RunConfig(tuner=TunerConfig(remeasure=1)))
    assert n == 2 and doc["metrics"]["id"] == 2  # re-measured once, then the lower CV of the two
    doc, n = search.measure_trial(RunConfig(tuner=TunerConfig(remeasure=3)))
    assert n == 1 and doc["metrics"]["id"] == 3  # steady at once: no second measurement


def test_remeasured_single_repeat_trials_keep_a_steady_one(monkeypatch):
    """tuner.repeats=1: no CV to compare (null), so the measurement the host did not mark noisy is kept."""
    from moe_lightning.config import TunerConfig
    from moe_lightning.tuner import search

    docs = iter([{"metrics": {"noisy": True, "spread": {"throughput_tok_s": {"cv": None}}, "id": 1}},
                 {"metrics": {"noisy": False, "spread": {"throughput_tok_s": {"cv": None}}, "id": 2}}])
    monkeypatch.setattr(search, "run_trial_process", lambda *a, **k: next(docs))
    doc, n = search.measure_trial(RunConfig(tuner=TunerConfig(remeasure=2)))
    assert n == 2 and doc["metrics"]["id"] == 2


@pytest.mark.parametrize("a, b, overlap", [((10, 12), (11, 13), True), ((10, 11), (12, 13), False)])
def test_compare_flags_ratios_within_noise(a, b, overlap):
    from moe_lightning.tasks.compare import _add_ratios

    rows = [{"system": "cgopipe", "status": "ok", "throughput_tok_s": sum(b) / 2, "throughput_min": b[0],
             "throughput_max": b[1]},
            {"system": "flexgen", "status": "ok", "throughput_tok_s": sum(a) / 2, "throughput_min": a[0],
             "throughput_max": a[1]}]
    _add_ratios(rows)
    assert rows[0]["ratio_within_noise"] is overlap and rows[1]["ratio_within_noise"] is False


def test_compare_does_not_call_single_repeats_beyond_noise():
    """Systems timed once have no range: whether they differ beyond this machine's noise is unknown
    (None), not a point range that overlaps nothing; the table says so instead of naming a winner."""
    from moe_lightning.tasks.compare import _add_ratios, markdown_table

    def row(name, tok_s):
        return {"system": name, "status": "ok", "kind": "measured", "where": "this host (cpu)",
                "throughput_tok_s": tok_s, "throughput_shown": f"{tok_s:.2f}", "throughput_min": None,
                "throughput_max": None, "repeat_tok_s": [tok_s], "interleaved": {"rounds": 1}, "noisy": False,
                "noise": "", "decode_tok_s": tok_s, "policy": "N=2", "peak_gpu_bytes": 0, "peak_cpu_bytes": 0,
                "link_h2d_bytes": 0, "link_d2h_bytes": 0, "link_bytes_estimated": False}

    rows = [row("cgopipe", 90.0), row("flexgen", 100.0)]
    _add_ratios(rows)
    assert rows[0]["ratio_within_noise"] is None and rows[0]["ties_fastest"] is None
    assert rows[0]["ratio_rounds"]["ci95"] is None and rows[0]["ratio_rounds"]["stdev"] is None
    table = markdown_table(rows, "t")
    assert "0.90x (noise unknown)" in table and "beyond this machine's noise" not in table
    assert "against cgopipe this machine's noise is unknown" in table


def test_the_host_check_counts_mxfp4_experts_as_stored(monkeypatch):
    """gpt-oss-20b holds 12.8 GiB on the host with its experts as stored (MXFP4), 39 GiB dequantized (the
    reference engine's): a host with 20 GiB free runs the first and refuses the second, in one line."""
    import torch

    from moe_lightning import hostload
    from moe_lightning.errors import MemoryBudgetError
    from moe_lightning.tuner.presets import load_preset

    spec, hw = load_preset("model", "gpt-oss-20b"), load_preset("hardware", "cpu")
    monkeypatch.setattr(hostload, "available_host_bytes", lambda: 20 << 30)
    hostload.check_fits_host(spec, hw, torch.device("cpu"))
    with pytest.raises(MemoryBudgetError, match=r"needs 39\.0 GiB of host memory"):
        hostload.check_fits_host(spec, hw, torch.device("cpu"), weight_bytes=spec.total_params * spec.dtype_bytes)


def test_bench_labels_its_prediction_beside_its_measurement(tiny_path, tmp_path):
    from moe_lightning.tasks.bench import BenchTask

    cfg = RunConfig(task=BenchTask(repeats=1, min_repeat_s=0, progress=False), system=CGOPipeSystem(),
                    workload=Workload(num_requests=2, gen_len=2), policy=Policy(batch_size=2, micro_batch_size=1),
                    device="cpu", out=str(tmp_path / "bench.json"))
    cfg.task.run(cfg)
    doc = RunReport.from_json(tmp_path / "bench.json")
    assert doc.metrics.kind == "measured" and doc.hardware["detected"]
    assert doc.prediction["kind"] == "predicted" and doc.prediction["hrm_tok_s"] > 0
    # one repeat: its throughput has no spread, written as null, not 0
    raw = json.loads((tmp_path / "bench.json").read_text())["metrics"]["spread"]["throughput_tok_s"]
    assert raw["n"] == 1 and raw["stdev"] is None and raw["cv"] is None


def test_bench_with_no_decode_step_gives_no_decode_bound(tiny_path, tmp_path, capsys):
    """gen_len 1: no decode step runs, so decode tok/s is null, and so is the link bound on it: a bound
    printed beside a decode that never ran would read as a figure of this run."""
    from moe_lightning.tasks.bench import BenchTask

    cfg = RunConfig(task=BenchTask(repeats=1, min_repeat_s=0, progress=False), system=CGOPipeSystem(),
                    workload=Workload(num_requests=2, gen_len=1), policy=Policy(batch_size=2, micro_batch_size=1),
                    device="cpu", out=str(tmp_path / "bench.json"))
    cfg.task.run(cfg)
    raw = json.loads((tmp_path / "bench.json").read_text())
    assert raw["metrics"]["decode_tok_s"] is None and raw["extra"]["link_bound_decode_tok_s"] is None
    out = capsys.readouterr().out
    assert "no decode step" in out and "link bound" not in out


@pytest.mark.parametrize("own, gen_len, bound", [(1, 8, False), (3, 8, True)], ids=["rows-of-one", "rows-of-three"])
def test_bench_decode_bound_follows_the_budgets_the_rows_run(tiny_path, tmp_path, capsys, own, gen_len, bound):
    """A prompts file whose every row sets max_new_tokens 1 runs no decode step, whatever workload.gen_len
    says: no bound on it (rows of 3 decode, and are given one)."""
    from moe_lightning.tasks.bench import BenchTask

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"input_ids": [5, 6, {i + 7}], "max_new_tokens": {own}}}\n' for i in range(2)))
    cfg = RunConfig(task=BenchTask(repeats=1, min_repeat_s=0, progress=False), system=CGOPipeSystem(),
                    workload=Workload(name="jsonl", path=str(prompts), gen_len=gen_len),
                    policy=Policy(batch_size=2, micro_batch_size=1), sampling=Sampling(ignore_eos=True),
                    device="cpu", out=str(tmp_path / "bench.json"))
    cfg.task.run(cfg)
    raw = json.loads((tmp_path / "bench.json").read_text())
    assert (raw["metrics"]["decode_tok_s"] is not None) is bound
    assert (raw["extra"]["link_bound_decode_tok_s"] is not None) is bound
    assert ("link bound" in capsys.readouterr().out) is bound


def test_bench_predicts_the_policy_that_ran(tiny_path, tmp_path):
    """system.policy_source=auto replaces the given policy with the HRM plan inside the run (as a baseline's
    rule does): the prediction printed beside the measurement is that policy's, not the default one's."""
    from moe_lightning.systems import paged_kv
    from moe_lightning.tasks.bench import BenchTask, planned_workload
    from moe_lightning.tuner.hrm import predict

    system = CGOPipeSystem(policy_source="auto")
    cfg = RunConfig(task=BenchTask(repeats=1, min_repeat_s=0, progress=False), system=system,
                    workload=Workload(num_requests=3, gen_len=3), device="cpu", out=str(tmp_path / "bench.json"))
    cfg.task.run(cfg)
    doc = RunReport.from_json(tmp_path / "bench.json")
    ran = Policy(**doc.policy)
    assert ran != cfg.policy   # the plan is not the default policy, or this test shows nothing
    spec = ModelSpec(**doc.model)
    workload, lengths = planned_workload(cfg, spec)

    def hrm(policy: Policy) -> float:
        return predict(spec, cfg.hardware, workload, policy, paged_kv=paged_kv(system), lengths=lengths).e2e_tok_s

    assert hrm(ran) != hrm(cfg.policy)
    assert doc.prediction["hrm_tok_s"] == pytest.approx(hrm(ran))


def test_a_generate_pass_too_short_to_time_alone_is_noisy(tiny_path, tmp_path, capsys, monkeypatch):
    """task=generate times one pass: of the issue's tiny command (75 ms) it varied by 16.9% over fresh runs
    on an idle VM. A pass under half a second is marked noisy and says what gives a spread; a pass as
    long as the threshold is not (the threshold lowered to make this one long enough)."""
    from moe_lightning.tasks import generate as generate_task
    from moe_lightning.tasks.generate import GenerateTask

    cfg = RunConfig(task=GenerateTask(progress=False), system=CGOPipeSystem(), device="cpu",
                    workload=Workload(num_requests=4, gen_len=3), policy=Policy(batch_size=4, micro_batch_size=2),
                    sampling=Sampling(ignore_eos=True), outputs=str(tmp_path / "out.jsonl"),
                    out=str(tmp_path / "run.json"))
    m = cfg.task.run(cfg).metrics
    assert m.prefill_s + m.decode_s < 0.5   # the tiny model's pass
    short = f"one timed pass of {m.prefill_s + m.decode_s:.3f} s: too short to time alone (task=bench repeats it " \
            "and gives its spread)"
    assert m.noisy and short in m.noise   # beside, maybe, the host's load
    noisy_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("  NOISY: "))
    assert short in noisy_line
    monkeypatch.setattr(generate_task, "SHORT_PASS_S", 1e-6)
    cfg = dataclasses.replace(cfg, outputs=str(tmp_path / "out2.jsonl"), out=str(tmp_path / "run2.json"))
    assert not any(n.startswith("one timed pass") for n in cfg.task.run(cfg).metrics.noise)
