"""A tune's report is Optuna's own: the objectives named in the study (what optuna-dashboard shows), its
trials as `trials_dataframe()` CSV, and Optuna's matplotlib plots with titles."""

from __future__ import annotations

import csv
import subprocess

import optuna

from tests.tuner.test_tune_processes import load, tune_args


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
