"""task=compare: one run document per system, the table (markdown, CSV) and the chart, and a failing
system recorded with its reason instead of a crash."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

from moe_lightning.config import Policy, Workload
from moe_lightning.run_config import RunConfig
from moe_lightning.tasks.compare import CompareTask


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_lightning.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_compare_cli_writes_documents_table_and_chart(tmp_path, tiny_path):
    r = cli("task=compare", "task.systems=[cgopipe,flexgen]", "model=tiny-mixtral", "workload.num_requests=6",
            "workload.gen_len=4", "task.progress=false", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert "| cgopipe |" in r.stdout and "| flexgen |" in r.stdout and "vs best baseline" in r.stdout
    for name in ("cgopipe", "flexgen"):
        doc = json.loads((tmp_path / f"{name}.json").read_text())
        assert doc["system"] == name and doc["task"] == "compare" and doc["metrics"]["throughput_tok_s"] > 0
        assert doc["extra"]["policy_source"] == "auto"
    flexgen = json.loads((tmp_path / "flexgen.json").read_text())
    assert flexgen["policy"]["attn_on_gpu"] is True and flexgen["policy"]["pages_per_layer"] == 1
    rows = list(csv.DictReader((tmp_path / "comparison.csv").open()))
    assert [r["system"] for r in rows] == ["cgopipe", "flexgen"] and all(r["status"] == "ok" for r in rows)
    assert float(rows[1]["ratio_to_best_baseline"]) == 1.0
    assert rows[0]["generated_tokens"] == rows[1]["generated_tokens"]  # same greedy outputs, same stops
    assert "| cgopipe |" in (tmp_path / "comparison.md").read_text()
    assert (tmp_path / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Interleaved (the default): the systems took turns, one timed repeat each per round, the first
    # to go rotating by round; a system's repeats are never timed beside the other's.
    docs = {n: json.loads((tmp_path / f"{n}.json").read_text()) for n in ("cgopipe", "flexgen")}
    assert all(d["extra"]["interleaved"] == {"rounds": 5, "systems": ["cgopipe", "flexgen"]} for d in docs.values())
    starts = sorted((t, n) for n, d in docs.items() for t in d["extra"]["repeat_started_unix_s"])
    assert [n for _, n in starts] == ["cgopipe", "flexgen", "flexgen", "cgopipe", "cgopipe", "flexgen", "flexgen",
                                      "cgopipe", "cgopipe", "flexgen"]
    assert all(len(d["extra"]["repeat_throughput_tok_s"]) == 5 for d in docs.values())
    assert "took turns" in r.stdout and "Fastest here: " in r.stdout


def test_a_failing_system_is_a_row_with_its_reason(tmp_path, tiny_path):
    """Given a CPU-attention policy, DeepSpeed (GPU attention only) fails; the comparison goes on."""
    cfg = RunConfig(task=CompareTask(systems=["cgopipe", "deepspeed"], isolate=False, policy_source="given",
                                     progress=False, warmup_tokens=0),
                    workload=Workload(num_requests=4, gen_len=3),
                    policy=Policy(batch_size=4, micro_batch_size=2), run_dir=str(tmp_path))
    report = cfg.task.run(cfg)
    rows = {r["system"]: r for r in report.extra["comparison"]}
    assert rows["cgopipe"]["status"] == "ok" and rows["deepspeed"]["status"] == "failed"
    assert "attention on the GPU" in rows["deepspeed"]["error"]
    assert rows["cgopipe"]["ratio_to_best_baseline"] is None  # no baseline succeeded
    assert "failed" in (tmp_path / "comparison.md").read_text()
    assert not (tmp_path / "deepspeed.json").exists()


def test_a_system_failing_in_an_interleaved_comparison_is_a_row_and_the_others_take_their_turns(tmp_path, tiny_path):
    cfg = RunConfig(task=CompareTask(systems=["deepspeed", "cgopipe", "flexgen_c"], policy_source="given",
                                     progress=False, warmup_tokens=0, repeats=3),
                    workload=Workload(num_requests=4, gen_len=3),
                    policy=Policy(batch_size=4, micro_batch_size=2), run_dir=str(tmp_path))
    report = cfg.task.run(cfg)
    rows = {r["system"]: r for r in report.extra["comparison"]}
    assert rows["deepspeed"]["status"] == "failed" and "attention on the GPU" in rows["deepspeed"]["error"]
    assert rows["cgopipe"]["status"] == rows["flexgen_c"]["status"] == "ok"
    assert rows["cgopipe"]["repeats"] == rows["flexgen_c"]["repeats"] == 3
    assert rows["cgopipe"]["ratio_rounds"]["n"] == 3   # paired with flexgen_c, round by round


def _row(name: str, tok_s: list[float], interleaved: bool = True) -> dict:
    return {"system": name, "status": "ok", "throughput_tok_s": sorted(tok_s)[len(tok_s) // 2],
            "throughput_min": min(tok_s), "throughput_max": max(tok_s), "repeat_tok_s": tok_s,
            "interleaved": {"rounds": len(tok_s), "systems": ["a"]} if interleaved else None}


def test_interleaved_ratios_are_paired_by_round():
    """The host's speed drifts 3x over the rounds: the ranges overlap, but in every round ours is 0.9 of the
    baseline's, which pairing sees and the ranges cannot."""
    from moe_lightning.tasks.compare import _add_ratios

    base = [100.0, 200.0, 300.0]
    rows = [_row("cgopipe", [0.9 * x for x in base]), _row("flexgen", base)]
    _add_ratios(rows)
    assert abs(rows[0]["ratio_to_best_baseline"] - 0.9) < 1e-12 and rows[0]["ratio_within_noise"] is False
    assert rows[1]["fastest"] and not rows[0]["ties_fastest"]
    one_after_another = [_row("cgopipe", [0.9 * x for x in base], False), _row("flexgen", base, False)]
    _add_ratios(one_after_another)
    assert one_after_another[0]["ratio_within_noise"] is True   # only the ranges to go by


def test_systems_a_machine_cannot_tell_apart_are_ties_not_a_winner():
    from moe_lightning.tasks.compare import _add_ratios, markdown_table

    rows = [_row("cgopipe", [50.0, 60.0, 55.0]), _row("flexgen", [100.0, 90.0, 95.0]),
            _row("accelerate", [98.0, 92.0, 96.0]), _row("deepspeed", [80.0, 70.0, 75.0])]
    _add_ratios(rows)
    assert [r["system"] for r in rows if r["fastest"]] == ["accelerate"]
    assert [r["system"] for r in rows if r["ties_fastest"]] == ["flexgen"]   # 1.02, 0.98, 0.99 of it
    for r in rows:
        r.update(kind="measured", where="here", throughput_shown="x", noisy=False, decode_tok_s=1.0, policy="p",
                 peak_gpu_bytes=0, peak_cpu_bytes=0, link_h2d_bytes=0, link_d2h_bytes=0,
                 link_bytes_estimated=False)
    table = markdown_table(rows, "t")
    assert "Fastest here: accelerate; flexgen within this machine's noise of it (no winner among them)" in table


def test_systems_that_cannot_all_be_resident_run_one_after_another(monkeypatch):
    from moe_lightning import hostload
    from moe_lightning.tasks.compare import _not_resident_together

    cfg = RunConfig()
    monkeypatch.setattr(hostload, "available_host_bytes", lambda: 64 << 30)
    assert _not_resident_together(cfg, 6) is None
    monkeypatch.setattr(hostload, "available_host_bytes", lambda: 1 << 20)
    assert "copies of tiny-mixtral's weights need" in _not_resident_together(cfg, 6)


def test_the_paired_interval_is_a_t_interval_on_the_logs():
    """Worked by hand: logs -0.10536, 0, 0.09531; mean -0.00335, stdev 0.10036, t(2) = 4.303."""
    from moe_lightning.tasks.compare import paired_interval

    mean, lo, hi = paired_interval([0.9, 1.0, 1.1])
    assert abs(mean - 0.99666) < 1e-4 and abs(lo - 0.7767) < 1e-3 and abs(hi - 1.2789) < 1e-3
    assert all(abs(x - 0.8) < 1e-12 for x in paired_interval([0.8]))   # one round: no interval


def test_a_simulated_comparison_runs_the_given_policy_and_claims_no_measurement(tmp_path):
    """mode=simulate: nothing is measured, so the table says nothing about measured ranges or turns; with
    policy_source=given every simulated system, CGOPipe included, runs cfg.policy (CGOPipe ran the HRM
    plan instead), and accelerate, a real library, is skipped with its reason, as is the reference, which
    has no schedule of its own (it was CGOPipe's schedule ranked as a baseline)."""
    policy = Policy(batch_size=4, micro_batch_size=2)
    cfg = RunConfig(task=CompareTask(systems=["cgopipe", "flexgen_c", "accelerate", "reference"], mode="simulate",
                                     policy_source="given", progress=False),
                    workload=Workload(num_requests=8, gen_len=4), policy=policy, run_dir=str(tmp_path))
    report = cfg.task.run(cfg)
    rows = {r["system"]: r for r in report.extra["comparison"]}
    assert rows["cgopipe"]["kind"] == rows["flexgen_c"]["kind"] == "simulated"
    assert rows["accelerate"]["status"] == "skipped"
    assert rows["accelerate"]["error"].startswith("accelerate is a real library")
    assert rows["reference"]["status"] == "skipped" and "no schedule of its own" in rows["reference"]["error"]
    for name in ("cgopipe", "flexgen_c"):
        doc = json.loads((tmp_path / f"{name}.json").read_text())
        assert (doc["policy"]["batch_size"], doc["policy"]["micro_batch_size"]) == (4, 2)
        assert doc["task"] == "compare" and doc["metrics"]["kind"] == "simulated"   # it said simulate
    table = (tmp_path / "comparison.md").read_text()
    assert "measured" not in table.split("tokens/s = ")[1] and "took turns" not in table
    assert "warm-up" not in table   # a simulation runs none
    assert table.startswith("### Throughput: tiny-mixtral on profile cpu, workload synthetic")


def test_a_measured_comparisons_title_names_where_it_was_measured():
    """The title said "tiny-mixtral on t4" above runs timed on this host's CPU under t4's budgets; it
    names the detected device and the profile's part."""
    from moe_lightning.config import HardwareSpec
    from moe_lightning.tasks.compare import _title

    rows = [{"status": "ok", "kind": "measured", "where": "this host (cpu)"},
            {"status": "failed", "error": "x"}]
    cfg = RunConfig(hardware=HardwareSpec(name="t4"))
    assert _title(rows, cfg).startswith("tiny-mixtral measured on this host (cpu) under profile t4's budgets, ")
    assert " on t4" not in _title(rows, cfg)


def test_a_policy_field_a_listed_system_does_not_read_is_refused_before_any_run(tmp_path):
    """One policy for every system: reference and accelerate read only the batch size, so a placement or
    kernel given beside them (at its default too) would be ignored for them while their rows stood beside
    the others': refused, naming the system and the list without it, before any system runs."""
    import pytest

    from moe_lightning.config import mark_given
    from moe_lightning.errors import ConfigError

    def refused(systems: list[str], policy: Policy, source: str = "given") -> str:
        cfg = RunConfig(task=CompareTask(systems=systems, policy_source=source, progress=False),
                        workload=Workload(num_requests=4, gen_len=3), policy=policy, run_dir=str(tmp_path))
        with pytest.raises(ConfigError) as refusal:
            cfg.task.run(cfg)
        return str(refusal.value)

    given = Policy(batch_size=4)
    mark_given(given, ["batch_size", "micro_batch_size"])   # micro_batch_size=4 given, its default
    assert refused(["cgopipe", "flexgen", "accelerate"], given) == (
        "policy.micro_batch_size: system=accelerate does not read it (it reads policy.batch_size), so it would be "
        "ignored; drop it, or drop accelerate from task.systems ('task.systems=[cgopipe,flexgen]')")
    assert refused(["reference", "cgopipe"], Policy(expert_kernel="loop"), source="auto").startswith(
        "policy.expert_kernel: system=reference does not read it")
    assert not any(tmp_path.iterdir())


def test_compare_writes_its_comparison_document_to_out(tmp_path):
    out = tmp_path / "x" / "c.json"
    r = cli("task=compare", "task.mode=simulate", "task.systems=[cgopipe,flexgen]", "hardware=t4",
            "model=mixtral-8x7b", "workload=mtbench", f"out={out}", f"hydra.run.dir={tmp_path / 'run'}")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == (tmp_path / "run" / "comparison.json").read_bytes()
    assert [row["system"] for row in json.loads(out.read_text())] == ["cgopipe", "flexgen"]


def test_every_system_failing_names_the_first_reason_and_the_table(tmp_path):
    """DeepSpeed refuses CPU attention, accelerate has no schedule to simulate: the one error line says
    why the first failed and where the table with every reason is."""
    import pytest

    from moe_lightning.errors import MoELightningError

    cfg = RunConfig(task=CompareTask(systems=["deepspeed", "accelerate"], mode="simulate", policy_source="given",
                                     progress=False),
                    workload=Workload(num_requests=4, gen_len=3),
                    policy=Policy(batch_size=4, micro_batch_size=2), run_dir=str(tmp_path))
    with pytest.raises(MoELightningError) as failed:
        cfg.task.run(cfg)
    assert str(failed.value).startswith("task=compare: every system failed; deepspeed: system=deepspeed runs "
                                        "attention on the GPU")
    assert str(tmp_path / "comparison.md") in str(failed.value)
