"""Several ranks from one command (`parallel.tensor` x `parallel.expert` > 1).

`moe-lightning task=generate parallel.tensor=2 ...` starts its ranks itself with torch.distributed's
elastic launcher (one node, a local c10d rendezvous on a free port): each rank is a spawned process
running the task with the same config. Under `torchrun` (WORLD_SIZE set) the CLI runs as the rank
torchrun started, so several nodes work as torchrun makes them:

    torchrun --nnodes=2 --nproc-per-node=4 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        -m moe_lightning task=generate parallel.tensor=4 parallel.expert=2 ...

Rank 0 writes the outputs and the run document, with every rank's timings in it; the other ranks write
nothing (their artefacts go to a private temporary folder, removed at the end) and print nothing but
warnings. Threads: the ranks of one host share its cores, `cores // ranks` each (`threads.cores`
divided when given), so T x E ranks never oversubscribe the host. Under torchrun, each rank takes
`threads.cores` or what it detects (torchrun sets OMP_NUM_THREADS=1 unless you set it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import tempfile
import uuid
from pathlib import Path

from moe_lightning.errors import ConfigError, MoELightningError
from moe_lightning.interrupt import quiet_semaphore_warnings

RANK_TASKS = ("generate", "bench")
SHUTDOWN_S = 10   # after SIGINT/SIGTERM, how long the ranks have to stop before the agent kills them
RANK_SYSTEMS = ("reference", "cgopipe")
log = logging.getLogger("moe_lightning.launch")


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


# Under torchrun every rank is a whole CLI process: a refusal that every rank hits (a bad override, a
# policy that fits no rank's budget) would be printed once per rank. Each failing rank posts its line in
# torchrun's agent store (hosted by the agent, so it outlives the ranks) and prints it only if no lower
# rank failed: rank 0 at once, another rank after waiting up to FAIL_GRACE_S for a lower one to post.
FAIL_GRACE_S = 5.0


def _agent_store():
    """A client of torchrun's agent store, or None (not under torchrun, or the store cannot be reached)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_PORT" not in os.environ:
        return None
    try:
        from datetime import timedelta

        from torch.distributed import TCPStore

        return TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"]), is_master=False,
                        timeout=timedelta(seconds=5))
    except Exception:  # noqa: BLE001 - no store: every rank says its own line, as before
        return None


def _failed_key(rank: int) -> str:
    return (f"moe_lightning/failed/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/"
            f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{rank}")


def _lower_rank_failed(store, rank: int) -> bool:
    try:
        return any(store.check([_failed_key(q)]) for q in range(rank))
    except Exception:  # noqa: BLE001 - the agent is gone: nobody else will say it
        return False


def post_failure(line: str):
    """Under torchrun with several ranks: post this rank's error `line` in the agent store, so that the
    other ranks take their broken collective for the consequence it is. Returns the store (None: none)."""
    store = _agent_store() if under_torchrun() and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    if store is not None:
        with contextlib.suppress(Exception):
            store.set(_failed_key(int(os.environ["RANK"])), line)
    return store


def fail_once(line: str, code: int) -> None:
    """Print a torchrun rank's error `line` unless a lower rank failed too (that one's line is shown), then
    exit with `code`."""
    rank = int(os.environ.get("RANK", "0"))
    store = post_failure(line)
    if store is None or rank == 0:
        print(line, file=sys.stderr)
        sys.exit(code)
    import signal
    import time

    def finish(*_) -> None:   # also on the agent's SIGTERM: it stops the ranks once one has exited
        if not _lower_rank_failed(store, rank):
            print(line, file=sys.stderr)
        sys.stderr.flush()
        os._exit(code)

    signal.signal(signal.SIGTERM, finish)
    signal.signal(signal.SIGINT, finish)
    deadline = time.monotonic() + FAIL_GRACE_S
    while time.monotonic() < deadline and not _lower_rank_failed(store, rank):
        time.sleep(0.1)
    finish()


def another_rank_failed() -> bool:
    """Under torchrun: has another rank posted its error line? (Then this rank's own trouble, a collective
    that broke as that rank exited or the agent's SIGTERM, is a consequence, not news.)"""
    if not under_torchrun() or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return False
    store, rank = _agent_store(), int(os.environ["RANK"])
    if store is None:
        return False
    try:
        return any(store.check([_failed_key(q)]) for q in range(int(os.environ["WORLD_SIZE"])) if q != rank)
    except Exception:  # noqa: BLE001 - the agent is gone
        return False


def interrupted_is_said_here() -> bool:
    """Under torchrun, whether this rank says that the run was interrupted: rank 0 (it says what was kept),
    unless another rank failed first (the agent then stopped rank 0: that rank's line is the one shown)."""
    if not under_torchrun() or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return True
    return os.environ["RANK"] == "0" and not another_rank_failed()


def check_parallel_run(cfg) -> None:
    """Everything a several-rank run can be refused for, one line each, before any weight is loaded:
    the task and system, the split against the model, the ranks against the devices and the profile."""
    import torch

    from moe_lightning.engine.parallel import check_parallel
    from moe_lightning.engine.weights import resolve_model
    from moe_lightning.models import family
    from moe_lightning.systems import resolve_device
    from moe_lightning.threads import detect_cores

    p, hw = cfg.parallel, cfg.hardware
    W = p.world_size
    split = f"parallel.tensor={p.tensor} x parallel.expert={p.expert}"
    if cfg.task.name not in RANK_TASKS:
        raise ConfigError(f"{split}: task={cfg.task.name} runs in one process; task=generate and task=bench run "
                          "several ranks")
    if cfg.system.name not in RANK_SYSTEMS:
        raise ConfigError(f"{split}: system={cfg.system.name} runs on one rank (its several-rank schedule is not "
                          "built yet); system=cgopipe and system=reference run tensor and expert parallel")
    spec, _ = resolve_model(cfg.model)
    check_parallel(spec, p, family(spec))
    if getattr(cfg.task, "plan", False) or getattr(cfg.system, "policy_source", "given") == "auto":
        from moe_lightning.tuner.parallel import check_parallel as check_plannable

        check_plannable(spec, cfg.hardware, p)   # the ranks will plan the machine's policy for T x E
    elif cfg.system.name == "cgopipe":
        p.group_policy(cfg.policy)   # each expert group's share of N and mu
    device = resolve_device(cfg.device)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", W)) if under_torchrun() else W
    if device.type == "cuda":
        if local > torch.cuda.device_count():
            raise ConfigError(f"{split} puts {local} ranks on this host but it has {torch.cuda.device_count()} "
                              "CUDA devices: one rank per GPU")
        if p.backend == "gloo":
            raise ConfigError("parallel.backend=gloo with device=cuda: NCCL carries CUDA tensors (backend=auto)")
    elif p.backend == "nccl":
        raise ConfigError("parallel.backend=nccl needs device=cuda; the CPU's ranks talk over gloo (backend=auto)")
    elif not under_torchrun() and detect_cores(cfg.threads.cores).count < W:
        log.warning("%s = %d ranks share %d cores: each rank runs one thread, and they take turns; the timings "
                    "are not the split's speed", split, W, detect_cores(cfg.threads.cores).count)
    if hw.gpu.count > 1 and hw.gpu.count != W:
        raise ConfigError(f"hardware={hw.name} has {hw.gpu.count} GPUs but {split} = {W} ranks: one rank per GPU "
                          f"(task=plan hardware={hw.name} chooses T and E)")
    if hw.gpu.count == 1 and device.type == "cuda":
        raise ConfigError(f"hardware={hw.name} describes one GPU but {split} = {W} ranks: give a profile of {W} "
                          "GPUs")


def run_ranks(cfg):
    """Run the task on T x E ranks: as this torchrun rank, or by launching them here. Returns rank 0's
    report (read back from its run document when launched here; None in another rank)."""
    check_parallel_run(cfg)
    if under_torchrun():
        return rank_main(cfg)
    return _launch(cfg)


def _launch(cfg):
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from moe_lightning.threads import detect_cores

    W = cfg.parallel.world_size
    share = max(1, detect_cores(cfg.threads.cores).count // W)
    cfg = dataclasses.replace(cfg, threads=dataclasses.replace(cfg.threads, cores=share))
    with tempfile.TemporaryDirectory(prefix="moe-lightning-ranks-") as errors:
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=W, run_id=uuid.uuid4().hex,
                              rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
                              monitor_interval=0.1, start_method="spawn", shutdown_timeout=SHUTDOWN_S)
        log.info("starting %d ranks (tensor %d x expert %d), %d cores each", W, cfg.parallel.tensor,
                 cfg.parallel.expert, share)
        try:
            with _quiet_agent():
                elastic_launch(config, _rank_entry)(cfg, errors)
        except (ChildFailedError, SignalException) as exc:
            # A rank's own failure first (the others were then stopped by the agent: interrupted), else
            # rank 0's: it says what it kept.
            said = [f.read_text().rpartition("\n") for f in sorted(Path(errors).glob("rank*.error"),
                                                                     key=lambda f: int(f.stem[4:]))]   # rank order
            said.sort(key=lambda s: int(s[2]) in (130, 143))
            if said:
                message, _, code = said[0]
                raise _RankError(message, int(code)) from None
            if isinstance(exc, SignalException):   # the agent stopped the ranks before rank 0 could say
                raise _interrupted(cfg, exc.sigval) from None
            rank, failure = exc.get_first_failure()
            raise MoELightningError(f"rank {rank} failed (exit code {failure.exitcode}); its error is printed "
                                    "above") from None
    from moe_lightning.report import RunReport

    document = Path(cfg.out) if cfg.out else Path(cfg.run_dir or "runs/latest") / "run.json"   # rank 0's
    return RunReport.from_json(document) if document.is_file() else None


def _interrupted(cfg, signum: int):
    """SIGINT/SIGTERM reached the launcher: what rank 0's streamed outputs kept (each row is fsynced)."""
    from moe_lightning.interrupt import interrupted
    from moe_lightning.tasks.outputs import part_path

    exc = interrupted(signum)
    part = part_path(cfg.outputs or Path(cfg.run_dir or "runs/latest") / "outputs.jsonl")
    if cfg.task.name == "generate" and part.is_file():
        rows = max(0, part.read_bytes().count(b"\n") - 1)
        exc = type(exc)(f"{exc}: {rows} outputs are kept in {part}; run again with resume=true to finish",
                        exc.exit_code)
    return exc


class _RankError(MoELightningError):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@contextlib.contextmanager
def _quiet_agent():
    """torchelastic's agent logs every rendezvous, worker state, failure and signal (each module's logger
    at its own level): the CLI says what failed itself. Ranks stopped by a signal exit at once, so the
    semaphores tqdm's lock holds in them are left to multiprocessing's resource tracker, which would warn
    about them when the launcher exits."""
    prefixes = ("torch.distributed.elastic", "torch.distributed.launcher", "torch.multiprocessing")
    names = [n for n in list(logging.root.manager.loggerDict) if n.startswith(prefixes)]
    loggers = [logging.getLogger(n) for n in {*prefixes, *names}]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with quiet_semaphore_warnings():
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _rank_entry(cfg, errors: str) -> None:
    """A launched rank: run the task; a refusal becomes one line in `errors` and a failed rank (the agent
    then stops the others). SIGINT/SIGTERM (the agent passes the launcher's on) stop it as they stop a
    one-process run: rank 0 keeps its finished outputs and says so, within the agent's `SHUTDOWN_S`."""
    from moe_lightning.errors import Interrupted
    from moe_lightning.interrupt import install

    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s rank {os.environ.get('RANK')} %(name)s: "
                        "%(message)s")
    install()
    said = Path(errors, f"rank{os.environ['RANK']}.error")
    try:
        rank_main(cfg)
    except MoELightningError as exc:
        said.write_text(f"{exc}\n{exc.exit_code}")
        sys.exit(exc.exit_code)
    except Interrupted as exc:   # no interpreter shutdown: it can abort inside a worker thread's torch op
        said.write_text(f"{exc}\n{exc.exit_code}")
        os._exit(exc.exit_code)


def rank_main(cfg):
    """This process as one rank: join the group, run the task (rank 0 writes, the others write into a
    temporary folder), leave the group."""
    from moe_lightning.engine.parallel import finish_ranks, init_ranks
    from moe_lightning.systems import resolve_device

    device = resolve_device(cfg.device)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        import torch

        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    ranks = init_ranks(cfg.parallel, device)
    try:
        if ranks.rank == 0:
            return cfg.task.run(cfg)
        with tempfile.TemporaryDirectory(prefix=f"moe-lightning-rank{ranks.rank}-") as scratch, \
                open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            logging.getLogger("moe_lightning").setLevel(logging.WARNING)
            quiet = dataclasses.replace(cfg, run_dir=scratch, out=None, outputs=None, trace=False, overwrite=False,
                                        resume=False)
            quiet.task = dataclasses.replace(cfg.task, progress=False) if hasattr(cfg.task, "progress") else cfg.task
            quiet.task.run(quiet)
        return None
    except MoELightningError as exc:
        # Posted before leaving the group: leaving breaks the peers' collectives at once, and a peer that
        # looked before this rank's line reached the store would print its own traceback beside it.
        post_failure(f"moe-lightning: error: {exc}")
        raise
    finally:
        finish_ranks()
