from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from moe_lightning.loggers import NoLogger, WandbLogger


def test_wandb_logs_offline_without_network(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_API_KEY", "")  # no account
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(dir=str(tmp_path))
    logger.start("test-run", {"policy": {"batch_size": 8}}, str(tmp_path))
    logger.log({"throughput_tok_s": 12.5, "trial": 0})
    logger.log_table("comparison", [{"system": "cgopipe", "tok_s": 12.5}])
    logger.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_no_logger_accepts_everything(tmp_path):
    logger = NoLogger()
    logger.start("x", {}, str(tmp_path))
    logger.log({"a": 1})
    logger.finish()


def wandb_records(path: Path):
    """The records of an offline run's .wandb file, decoded with wandb's own protobuf schema (the file
    is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of records with 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:       # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):                # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def offline_run(folder: Path) -> dict:
    """What wandb recorded of one offline run: its group, job type, name and summary keys."""
    run, summary = {}, set()
    for r in wandb_records(next(folder.glob("run-*.wandb"))):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run = {"group": r.run.run_group, "job_type": r.run.job_type, "name": r.run.display_name}
        elif kind == "summary":
            summary |= {item.key or ".".join(item.nested_key) for item in r.summary.update}
    return {**run, "summary": summary}


def test_a_multirun_is_one_wandb_group_with_one_run_per_job(tmp_path):
    pytest.importorskip("wandb")
    r = subprocess.run([sys.executable, "-m", "moe_lightning.cli", "-m", "task=simulate", "task.use_plan=false",
                        "logger=wandb", "policy.batch_size=4,8", "policy.micro_batch_size=2",
                        "workload.num_requests=8", "workload.gen_len=2", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    runs = [offline_run(f) for f in sorted((tmp_path / "sweep").glob("*/wandb/offline-run-*"))]
    assert len(runs) == 2
    assert {run["group"] for run in runs} == {"sweep"} and {run["job_type"] for run in runs} == {"simulate"}
    assert {run["name"] for run in runs} == {"simulate-0", "simulate-1"}
    assert all("metrics.throughput_tok_s" in run["summary"] for run in runs)


def test_a_wandb_run_leaves_its_files_in_its_run_folder_and_none_in_home(tmp_path):
    """Offline, under an empty HOME with no WANDB_* or XDG_* variables of the user's, a two-job multirun
    (one process, a wandb run per job) writes nothing outside its sweep folder but the temp folder:
    wandb-core's own debug log is in each job's folder (wandb/logs), not in ~/.cache/wandb/logs."""
    pytest.importorskip("wandb")
    import os

    for name in ("home", "tmp", "cwd"):
        (tmp_path / name).mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "XDG_"))}
    env |= {"HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path / "tmp")}
    r = subprocess.run([sys.executable, "-m", "moe_lightning.cli", "-m", "task=simulate", "task.use_plan=false",
                        "logger=wandb", "policy.batch_size=4,8", "policy.micro_batch_size=2",
                        "workload.num_requests=8", "workload.gen_len=2", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path / "cwd", env=env)
    assert r.returncode == 0, r.stderr
    outside = [p for p in tmp_path.rglob("*") if p.parts[len(tmp_path.parts)] not in ("sweep", "tmp")
               and p not in (tmp_path / "home", tmp_path / "cwd")]
    assert outside == []   # HOME and the working folder untouched
    for job in ("0", "1"):
        assert len(list((tmp_path / "sweep" / job / "wandb" / "logs").glob("core-debug-*.log"))) == 1


def test_a_wandb_cache_dir_of_the_users_is_kept(tmp_path):
    """WANDB_CACHE_DIR set by the user: wandb-core's debug log goes there, as they configured."""
    pytest.importorskip("wandb")
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env |= {"HOME": str(tmp_path / "home"), "WANDB_CACHE_DIR": str(tmp_path / "mine")}
    r = subprocess.run([sys.executable, "-m", "moe_lightning.cli", "task=simulate", "task.use_plan=false",
                        "logger=wandb", "policy.batch_size=4", "policy.micro_batch_size=2", "workload.num_requests=8",
                        "workload.gen_len=2", f"hydra.run.dir={tmp_path / 'run'}"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert any((tmp_path / "mine" / "wandb" / "logs").glob("core-debug-*.log"))
    assert not (tmp_path / "run" / "wandb" / "logs").exists()


def test_a_two_worker_tune_logs_every_trial(tmp_path, tiny_path):
    pytest.importorskip("wandb")
    from tests.tuner.test_tune_processes import load, tune_args

    r = subprocess.run(tune_args(tmp_path, "logged", "tuner.objective=simulate", "tuner.n_trials=6",
                                 "tuner.workers=2", "tuner.multi_objective=true", "logger=wandb"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    study = load(tmp_path, "logged")
    run = next((tmp_path / "h" / "wandb").glob("offline-run-*"))
    tables = list(run.rglob("trials_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert sorted(row["number"] for row in rows) == [t.number for t in study.trials]   # both workers' trials
    assert all(row["peak_gpu_bytes"] for row in rows if row["state"] == "COMPLETE")   # the second objective
    summary = offline_run(run)["summary"]
    assert "metrics.throughput_tok_s" in summary


GUARD = '''
import os, socket

_log = os.environ["MOE_LIGHTNING_NET_GUARD"]
_getaddrinfo, _connect, _connect_ex = socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex


def _local(host):
    host = host.decode() if isinstance(host, bytes) else host
    return host in (None, "", "localhost", "::1") or str(host).startswith("127.")


def _refuse(what):
    with open(_log, "a") as f:
        f.write(what + "\\n")
    raise OSError("non-loopback network access blocked by the test")


def getaddrinfo(host, *args, **kwargs):
    return _getaddrinfo(host, *args, **kwargs) if _local(host) else _refuse(f"getaddrinfo {host}")


def _inet(sock, address):
    return sock.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0])


def connect(self, address):
    return _refuse(f"connect {address}") if _inet(self, address) else _connect(self, address)


def connect_ex(self, address):
    return _refuse(f"connect {address}") if _inet(self, address) else _connect_ex(self, address)


socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex = getaddrinfo, connect, connect_ex
'''


def test_logger_wandb_attempts_no_connection_beyond_loopback(tmp_path):
    """A run with `logger=wandb` and no WANDB_* variables of the user's: every Python process of it (the
    CLI and wandb's own threads; wandb-core talks to it over a local socket) resolves and connects to
    loopback only. A guard in `sitecustomize` records and refuses any other attempt."""
    pytest.importorskip("wandb")
    import os

    (tmp_path / "guard").mkdir()
    (tmp_path / "guard" / "sitecustomize.py").write_text(GUARD)
    attempts = tmp_path / "attempts.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env |= {"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path / "guard"), env.get("PYTHONPATH")])),
            "MOE_LIGHTNING_NET_GUARD": str(attempts), "HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable, "-m", "moe_lightning.cli", "task=simulate", "task.use_plan=false",
                        "logger=wandb", "policy.batch_size=4", "policy.micro_batch_size=2", "workload.num_requests=8",
                        "workload.gen_len=2", f"hydra.run.dir={tmp_path / 'run'}"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert any((tmp_path / "run" / "wandb").glob("offline-run-*"))   # it did log
    assert not attempts.exists(), attempts.read_text()


def test_a_wandb_mode_it_does_not_take_is_refused_by_name():
    from moe_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match="logger.mode=bogus: expected one of offline, online, disabled"):
        WandbLogger(mode="bogus")


def test_an_unwritable_logger_dir_is_refused_before_the_run(tmp_path):
    from moe_lightning.errors import ConfigError

    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="not a folder this run can write in"):
        WandbLogger(dir=str(tmp_path / "file" / "wandb")).check()
    WandbLogger(dir=str(tmp_path / "new")).check()   # a folder it may create is fine


def offline_config(folder: Path) -> dict:
    """The config an offline run ends with: each key's last value (later updates replace earlier ones)."""
    config = {}
    for r in wandb_records(next(folder.glob("run-*.wandb"))):
        kind = r.WhichOneof("record_type")
        if kind in ("run", "config"):   # the config given at start is in the run record
            updates = r.run.config.update if kind == "run" else r.config.update
            config |= {item.key: json.loads(item.value_json) for item in updates}
    return config


def test_wandb_records_the_policy_the_task_ran_not_the_configs_default(tmp_path):
    """task=simulate runs HRM's plan (task.use_plan=true), not cfg.policy's default: the plan's policy is
    what the run's config and summary hold, as the run document does."""
    pytest.importorskip("wandb")
    r = subprocess.run([sys.executable, "-m", "moe_lightning.cli", "task=simulate", "logger=wandb",
                        "hardware=t4", "model=mixtral-8x7b", "workload=mtbench", f"hydra.run.dir={tmp_path / 'run'}"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ran = json.loads((tmp_path / "run" / "run.json").read_text())["policy"]
    run = next((tmp_path / "run" / "wandb").glob("offline-run-*"))
    config = offline_config(run)
    assert config["policy"] == ran and config["policy_source"] == "hrm plan"
    assert "policy.batch_size" in offline_run(run)["summary"]
