"""task=report's reading and plotting: documents of a newer schema are read with a warning naming the
fields it ignores, and the plot tells measured from simulated runs (colour and legend), with a title
and one readable label per run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from moe_lightning.report import SCHEMA_VERSION, Metrics, RunReport
from moe_lightning.tasks.report import KIND_COLORS, load_documents, row_of, throughput_figure


def document(kind: str, tok_s: float, hardware: str) -> RunReport:
    return RunReport(system="cgopipe", task="bench" if kind == "measured" else "simulate",
                     model={"name": "mixtral-8x7b"}, hardware={"profile": {"name": hardware}},
                     workload={"name": "mtbench"}, policy={"batch_size": 64, "micro_batch_size": 8},
                     metrics=Metrics(throughput_tok_s=tok_s, kind=kind), environment={"cpu": "x86_64"})


def test_a_newer_document_is_read_with_a_warning(tmp_path, caplog):
    newer = document("simulated", 12.0, "t4").to_dict() | {"schema_version": SCHEMA_VERSION + 1, "energy_j": 3.0}
    (tmp_path / "new.json").write_text(json.dumps(newer))
    document("measured", 10.0, "cpu").to_json(tmp_path / "old.json")
    with caplog.at_level(logging.WARNING, logger="moe_lightning.report"):
        docs, skipped = load_documents([str(tmp_path / "*.json")])
    assert len(docs) == 2 and skipped == []
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "new.json" in warned[0] and "energy_j" in warned[0]


def test_the_plot_tells_measured_from_simulated(tmp_path):
    pytest.importorskip("matplotlib")
    reports = [document("measured", 10.0, "cpu"), document("simulated", 900.0, "t4"),
               document("simulated", 700.0, "l4")]
    rows = [row_of(tmp_path / f"{n}.json", r) for n, r in enumerate(reports)]
    # never the host for a profile; a measured run's host in task=compare's words
    assert [r["where"] for r in rows] == ["this host (cpu)", "profile t4", "profile l4"]
    fig = throughput_figure(rows)
    ax = fig.axes[0]
    assert "3 runs" in ax.get_title()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["measured", "simulated"]
    colours = {tuple(bar.get_facecolor()) for bar in ax.patches}
    assert len(colours) == 2
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert len(labels) == 3 and all("N=64, mu=8" in label for label in labels)
    assert set(KIND_COLORS) == {"measured", "simulated", "predicted"}


def test_the_environment_records_how_idle_cpus_wait():
    """A VM whose idle vCPUs halt at once pays a hypervisor trip per cross-core wake-up: a run document
    says so beside its numbers (the cpuidle driver, and haltpoll's polling time where it has one)."""
    from pathlib import Path

    from moe_lightning.report import environment

    driver = Path("/sys/devices/system/cpu/cpuidle/current_driver")
    if not driver.exists():
        pytest.skip("no cpuidle on this host")
    idle = environment()["cpuidle"]
    assert idle["driver"] == driver.read_text().strip()
    poll = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
    assert idle.get("guest_halt_poll_ns") == (int(poll.read_text()) if poll.exists() else None)


@pytest.mark.parametrize("suffix", [".md", ".csv"])
def test_report_writes_the_table_its_out_suffix_names(tmp_path, suffix):
    import subprocess
    import sys

    document("measured", 10.0, "cpu").to_json(tmp_path / "docs" / "a.json")
    document("simulated", 900.0, "t4").to_json(tmp_path / "docs" / "b.json")
    out = tmp_path / f"rep{suffix}"
    r = subprocess.run([sys.executable, "-m", "moe_lightning.cli", "task=report", "task.plot=false",
                        f"task.inputs=[{tmp_path / 'docs' / '*.json'}]", f"out={out}",
                        f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == (tmp_path / "run" / f"report{suffix}").read_bytes()
    assert out.read_text().count("cgopipe") == 2


@pytest.mark.parametrize(("path", "value", "named"), [
    (("metrics", "throughput_tok_s"), "abc", "metrics.throughput_tok_s is 'abc', not a number"),
    (("metrics", "peak_gpu_bytes"), "1", "metrics.peak_gpu_bytes is '1', not a number"),
    (("metrics", "kind"), "guessed", "metrics.kind is 'guessed', not one of measured, simulated, predicted"),
    (("metrics", "spread"), {"throughput_tok_s": {"n": "x"}}, "metrics.spread.throughput_tok_s.n is 'x'"),
    (("hardware",), "t4", "hardware is 't4', not an object"),
    (("policy",), [1], "policy is [1], not an object"),
    (("schema_version",), "2", "schema_version is '2', not an integer"),
])
def test_a_document_with_a_malformed_field_is_skipped_naming_it(tmp_path, path, value, named):
    """A run document with a figure of the wrong type ended task=report in a traceback (a string
    throughput, a list for the policy) or, with a kind outside the three, stood in the table unlabelled;
    it is skipped, its reason naming the field, and the well-formed documents beside it are reported."""
    data = document("measured", 10.0, "cpu").to_dict()
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    (tmp_path / "bad.json").write_text(json.dumps(data))
    document("simulated", 900.0, "t4").to_json(tmp_path / "good.json")
    docs, skipped = load_documents([str(tmp_path / "*.json")])
    assert [p.name for p, _ in docs] == ["good.json"]
    assert len(skipped) == 1 and "bad.json" in skipped[0] and named in skipped[0], skipped
    [row_of(p, r) for p, r in docs]


def test_a_document_listed_twice_is_one_row(tmp_path):
    document("measured", 10.0, "cpu").to_json(tmp_path / "a.json")
    document("simulated", 900.0, "t4").to_json(tmp_path / "b.json")
    a = str(tmp_path / "a.json")
    docs, _ = load_documents([a, a, str(tmp_path / "*.json"), str(tmp_path / "." / "a.json")])
    assert sorted(p.name for p, _ in docs) == ["a.json", "b.json"]


def test_bars_name_the_fields_that_differ_and_fit_the_figure(tmp_path):
    """Two runs that differ only in attn_on_gpu read differently; title and labels lie inside the image."""
    pytest.importorskip("matplotlib")
    reports = [document("simulated", 900.0, "t4"), document("simulated", 700.0, "t4")]
    reports[0].policy["attn_on_gpu"], reports[1].policy["attn_on_gpu"] = True, False
    rows = [row_of(tmp_path / f"{n}.json", r) for n, r in enumerate(reports)]
    fig = throughput_figure(rows)
    ax = fig.axes[0]
    labels = [t.get_text().replace("\n", " ") for t in ax.get_yticklabels()]   # long labels are wrapped
    assert len(set(labels)) == 2 and {"attn_on_gpu=True", "attn_on_gpu=False"} == {x.split(" · ")[-1] for x in labels}
    fig.canvas.draw()
    figure = fig.bbox
    renderer = fig.canvas.get_renderer()
    for text in [ax.title, *ax.get_yticklabels()]:
        box = text.get_window_extent(renderer)
        assert figure.x0 <= box.x0 and box.x1 <= figure.x1 and figure.y0 <= box.y0 and box.y1 <= figure.y1, \
            text.get_text()


def test_long_labels_leave_the_bars_title_and_axis_in_the_image(tmp_path):
    """Runs of three kinds and tasks that differ in placement too: each label names five varying fields
    (140 characters and more). On one line they pushed the bars into a sliver and the title and the axis
    label out of the image; wrapped, every text lies inside it and the bars keep half the width."""
    pytest.importorskip("matplotlib")
    reports = [document("measured", 10.0, "cpu"), document("simulated", 900.0, "cpu"),
               document("predicted", 700.0, "cpu")]
    reports[2].task = "plan"
    for n, r in enumerate(reports):
        r.policy |= {"attn_on_gpu": n == 0, "expert_gpu_fraction": n / 4}
    rows = [row_of(tmp_path / f"{n}.json", r) for n, r in enumerate(reports)]
    fig = throughput_figure(rows)
    ax = fig.axes[0]
    assert all(len(label.replace("\n", " ")) >= 140 for label in (t.get_text() for t in ax.get_yticklabels()))
    fig.canvas.draw()
    figure, renderer = fig.bbox, fig.canvas.get_renderer()
    for text in [ax.title, ax.xaxis.label, *ax.get_yticklabels()]:
        box = text.get_window_extent(renderer)
        assert figure.x0 <= box.x0 and box.x1 <= figure.x1 and figure.y0 <= box.y0 and box.y1 <= figure.y1, \
            text.get_text()
    assert ax.get_position().width >= 0.5


def test_report_and_compare_say_where_alike():
    from moe_lightning.tasks.compare import _where

    measured = document("measured", 10.0, "cpu")
    measured.hardware["detected"] = {"device": "cpu", "gpu": None}
    assert row_of(Path("m.json"), measured)["where"] == _where(measured) == "this host (cpu)"


def test_a_folder_given_is_read_for_its_run_documents(tmp_path):
    """task.inputs=[runs/c] (a comparison's or a sweep's run folder, as Hydra names it) reads every .json
    under it; it matched nothing but the folder and the report said there were no run documents."""
    (tmp_path / "c" / "0").mkdir(parents=True)
    document("measured", 10.0, "cpu").to_json(tmp_path / "c" / "cgopipe.json")
    document("simulated", 900.0, "t4").to_json(tmp_path / "c" / "0" / "run.json")
    (tmp_path / "c" / "notes.txt").write_text("not a document")
    docs, skipped = load_documents([str(tmp_path / "c")])
    assert sorted(str(p.relative_to(tmp_path)) for p, _ in docs) == ["c/0/run.json", "c/cgopipe.json"] and not skipped
