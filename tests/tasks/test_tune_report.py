"""A tune's report is Optuna's own: the objectives named in the study (what optuna-dashboard shows), its
trials as `trials_dataframe()` CSV, and Optuna's matplotlib plots with titles."""

from __future__ import annotations

import csv
import json
import subprocess

import optuna

from tests.tuner.test_tune_processes import cli_env, load, tune_args


def test_a_study_is_reported_with_optunas_names_dataframe_and_plots(tmp_path, tiny_path):
    r = subprocess.run(tune_args(tmp_path, "plots", "tuner.objective=simulate", "tuner.n_trials=6",
                                 "tuner.multi_objective=true"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    study = load(tmp_path, "plots")
    assert study.metric_names == ["throughput_tok_s", "peak_gpu_bytes"]
    run_dir = tmp_path / "h"
    rows = list(csv.DictReader((run_dir / "trials.csv").open()))
    assert [int(row["number"]) for row in rows] == [t.number for t in study.trials]
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sum(row["state"] == "COMPLETE" for row in rows) == len(done) >= 2
    assert {"values_throughput_tok_s", "values_peak_gpu_bytes"} <= set(rows[0])
    for png in ("tuning_progress", "pareto", "param_importances"):
        assert (run_dir / f"{png}.png").read_bytes()[:4] == b"\x89PNG", png


def test_a_measured_tune_documents_its_best_trials_measurement(tmp_path, tiny_path):
    """The run document of a measured tune names the device measured, and its metrics are the best trial's
    measurement (prefill, decode, tokens: medians beside their spread); a noisy best trial says NOISY."""
    r = subprocess.run(tune_args(tmp_path, "measured", "tuner.n_trials=1", "tuner.remeasure=0", "tuner.min_repeat_s=0",
                                 "tuner.max_cv=0.0001"),   # a spread no 3 repeats stay within: noisy
                       capture_output=True, text=True, timeout=300, env=cli_env(tmp_path))
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "h" / "run.json").read_text())
    assert doc["hardware"]["detected"] == {"device": "cpu", "gpu": None}
    m = doc["metrics"]
    assert m["kind"] == "measured" and m["repeats"] == 3 and m["noisy"]
    assert m["throughput_tok_s"] == m["spread"]["throughput_tok_s"]["median"] > 0
    assert m["prefill_s"] == m["spread"]["prefill_s"]["median"] > 0
    assert m["decode_s"] > 0 and m["generated_tokens"] > 0 and m["decode_step_median_s"] > 0
    hrm = next(line for line in r.stdout.splitlines() if line.startswith("HRM plan:"))
    assert "neighbours queued; tuner.n_trials=1 runs the first 1 of the" in hrm, hrm   # not all the seeds
    best = r.stdout.splitlines().index(next(line for line in r.stdout.splitlines() if line.startswith("best: trial")))
    assert r.stdout.splitlines()[best + 1].startswith("  NOISY: throughput varies"), r.stdout


def test_a_pruned_trials_reason_is_printed_whole(tmp_path, tiny_path):
    """A memory plan's reason ends with what the user acts on (the budget, "[OVER]"): the summary prints the
    reason's line whole, as trials.jsonl records it."""
    r = subprocess.run(tune_args(tmp_path, "pruned", "tuner.objective=simulate", "tuner.n_trials=6",
                                 "tuner.seed_with_hrm=false", "workload.num_requests=512",
                                 "hardware.gpu.memory_gib=0.003"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (tmp_path / "h" / "trials.jsonl").read_text().splitlines()]
    pruned = [row for row in rows if row["state"] == "PRUNED"]
    assert pruned, r.stdout
    for row in pruned:
        assert len(row["reason"]) > 140 and row["reason"].endswith("[ok]") and "[OVER]" in row["reason"]
        assert f"  trial {row['number']} pruned: {row['reason']}\n" in r.stdout


def test_a_reason_of_several_lines_is_kept_whole_and_printed_as_its_first(tmp_path):
    """A trial failed by an unexpected exception keeps its whole text in the study (and so in
    trials.jsonl); the printed line is its first, saying that more is recorded."""
    from moe_lightning.tasks.tune import _tell, shown_reason, trial_records

    study = optuna.create_study()
    trial = study.ask()
    reason = "ValueError: the first line\nthe second\nthe third"
    _tell(study, trial, optuna.trial.TrialState.FAIL, None, reason)
    assert study.trials[0].user_attrs["reason"] == reason
    assert trial_records(study)[0]["reason"] == reason
    assert shown_reason(reason) == "ValueError: the first line (+2 more lines in trials.jsonl)"


def test_a_multi_objective_tune_reports_every_pareto_optimal_trial(tmp_path, tiny_path):
    """Throughput against peak GPU memory has a front, not one best: every trial on it is printed with its
    policy and both objectives (unit and kind) and is in the run document; the best, compared with the
    baselines, is the fastest of them. A simulated best trial's metrics are the simulator's, not zeros."""
    r = subprocess.run(tune_args(tmp_path, "front", "tuner.objective=simulate", "tuner.n_trials=10",
                                 "tuner.multi_objective=true"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    front = load(tmp_path, "front").best_trials
    assert len(front) >= 2
    doc = json.loads((tmp_path / "h" / "run.json").read_text())
    entries = {e["number"]: e for e in doc["extra"]["pareto"]}
    assert set(entries) == {t.number for t in front}
    fastest = max(front, key=lambda t: t.values[0])
    assert doc["extra"]["best_trial"] == fastest.number and doc["metrics"]["throughput_tok_s"] == fastest.values[0]
    assert [o["kind"] for o in doc["extra"]["objectives"]] == ["simulated", "planned"]
    for t in front:
        e = entries[t.number]
        assert e["values"] == t.values and e["params"] == t.params   # the keys the document always had
        assert e["policy"]["batch_size"] == t.params["batch_size"] and e["peak_gpu_bytes"] == int(t.values[1])
        line = next(line for line in r.stdout.splitlines() if line.startswith(f"  trial {t.number} ("))
        assert f"{t.values[0]:.2f} tok/s simulated, peak GPU memory {t.values[1] / 2**30:.4g} GiB planned" in line
        assert f"N={t.params['batch_size']} " in line
    assert r.stdout.count("best: trial") == 1
    m = doc["metrics"]
    assert m["kind"] == "simulated" and m["prefill_s"] > 0 and m["decode_s"] > 0 and m["generated_tokens"] > 0


def test_the_tuned_policy_is_compared_under_the_system_settings_it_was_tuned_with(tmp_path):
    """system.refill=false and a KV cache of two requests per micro-batch change the run: the comparison's
    row for the tuned system is the best trial's own figure (it was CGOPipe's defaults')."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"input_ids": [5] * (20 + i), "max_new_tokens": g}) + "\n"
                               for i, g in enumerate([2, 30] * 6)))
    args = [a for a in tune_args(tmp_path, "settings", "tuner.objective=simulate", "tuner.n_trials=1",
                                 "model=mixtral-8x7b", "hardware=t4", "workload=jsonl", f"workload.path={prompts}",
                                 "workload.gen_len=32", "system.refill=false", "system.kv_cache_tokens=256",
                                 "task.baselines=[flexgen]") if a != "task.compare=false"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "h" / "run.json").read_text())
    rows = {row["system"]: row for row in doc["extra"]["comparison"]}
    assert rows["cgopipe"]["status"] == "ok" and rows["cgopipe"]["kind"] == "simulated"
    assert rows["cgopipe"]["throughput_tok_s"] == doc["metrics"]["throughput_tok_s"]
