"""Distributed tuning on a real PostgreSQL server: the tests start their own cluster (the Debian package's
binaries, a temporary data folder, trust authentication on 127.0.0.1 and a free port) and tune against it
through a `postgresql+psycopg://` URL, as N machines would.

Skipped when no PostgreSQL server binaries are installed, unless MOE_LIGHTNING_REQUIRE_POSTGRES is set
(CI sets it after installing the package): then a missing server fails."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest

from tests.conftest import free_port

pytest.importorskip("psycopg", reason="the postgres extra (psycopg) is not installed")


def _server_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).resolve().parent if pg_ctl else None


@pytest.fixture(scope="module")
def pg_url():
    """A fresh PostgreSQL cluster for this module; yields its SQLAlchemy URL (database `postgres`)."""
    bindir = _server_bin()
    if bindir is None:
        if os.environ.get("MOE_LIGHTNING_REQUIRE_POSTGRES"):
            pytest.fail("MOE_LIGHTNING_REQUIRE_POSTGRES is set but no PostgreSQL server binaries are installed")
        pytest.skip("no PostgreSQL server installed (Debian: apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="moe-lightning-pg-"))
    # initdb refuses to run as root: the cluster then belongs to the postgres account.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(root, "postgres")
    data, port = root / "data", free_port()

    def run(*args: str) -> None:
        r = subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{args[0]}: {r.stderr or r.stdout}"

    run(str(bindir / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres", "-E", "UTF8")
    run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-o",
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def _tune(url: str, tmp_path: Path, tag: str, n_trials: int, study: str = "shared") -> subprocess.Popen:
    args = [sys.executable, "-m", "moe_lightning.cli", "task=tune", "system=cgopipe", "task.compare=false",
            "task.progress=false", "tuner.objective=simulate", f"tuner.n_trials={n_trials}", "tuner.workers=2",
            f"tuner.storage={url}", f"tuner.study_name={study}", f"hydra.run.dir={tmp_path / tag}"]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_tune_commands_with_two_workers_each_share_one_study_exactly(pg_url, tmp_path, tiny_path):
    """Two `task=tune` commands at once (two "machines"), two worker processes each, one study on the
    server: exactly `n_trials` trials started in all (the gate is the server's advisory lock, not a
    host's file), each finished, none lost or run twice; every queued HRM seed ran once."""
    procs = [_tune(pg_url, tmp_path, tag, n_trials=8) for tag in ("a", "b")]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    study = optuna.load_study(study_name="shared", storage=pg_url)
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == list(range(8))
    assert all(t.state.is_finished() for t in study.trials)
    seeded = [tuple(sorted(t.params.items())) for t in study.trials if t.user_attrs.get("seed")]
    assert len(seeded) == len(set(seeded)) >= 2
    # Each command's report names the storage without a password, and counts the study's trials.
    report = (tmp_path / "a" / "run.json").read_text()
    assert "postgresql+psycopg://postgres@127.0.0.1" in report


def test_a_resumed_study_on_the_server_keeps_its_trials(pg_url, tmp_path, tiny_path):
    """A second command on the same study adds trials up to its `n_trials`; the finished ones are kept as
    they were (queued HRM seeds not yet run wait in the study and count only once started)."""
    def finished() -> dict:
        study = optuna.load_study(study_name="resumed", storage=pg_url)
        return {t.number: t.values for t in study.trials if t.state.is_finished()}

    assert _tune(pg_url, tmp_path, "first", n_trials=2, study="resumed").wait(timeout=300) == 0
    before = finished()
    assert len(before) == 2
    assert _tune(pg_url, tmp_path, "second", n_trials=3, study="resumed").wait(timeout=300) == 0
    after = finished()
    assert len(after) == 3 and all(after[n] == v for n, v in before.items())


def test_an_unreachable_server_is_one_line(tmp_path, tiny_path):
    url = f"postgresql+psycopg://postgres:secret@127.0.0.1:{free_port()}/postgres"
    r = subprocess.run([sys.executable, "-m", "moe_lightning.cli", "task=tune", "tuner.objective=simulate",
                        f"tuner.storage={url}", f"hydra.run.dir={tmp_path / 'h'}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "error: tuner.storage=" in lines[0] and "Traceback" not in r.stderr
    assert "secret" not in r.stderr   # the password is not echoed
