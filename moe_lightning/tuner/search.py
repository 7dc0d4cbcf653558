"""The Optuna search over the policy space, seeded by HRM.

- The search space is the `Policy`: batch size N, the number of micro-batches (mu is the smallest
  micro-batch size giving that count, as HRM chooses it), attention placement, resident experts per
  layer (up to what the GPU budget can ever hold: `max_resident_experts`), the GPU share of the KV
  cache, the copy worker's prefetch depth, (measured runs) the expert kernel and (simulated, several
  GPUs, no `parallel` given) the tensor degree T of the T x E split, E = GPUs / T (`searched_tensor`;
  each trial's memory plan is one rank's).
- Points the memory plan rejects are pruned before anything runs, with the reason recorded.
- The study is seeded with the HRM optimum and its feasible neighbours (`enqueue_trial`), so the first
  trial is what HRM predicts and the sampler corrects it with measurements.
- A measured trial runs the real engine in a spawned child process with a timeout and an optional
  memory cap: a crash, an out-of-memory or a hang fails that trial with its reason, never the study
  (`moe_lightning.tuner.trial_process`).
- Studies live in an RDB storage (SQLite by default, any SQLAlchemy URL such as PostgreSQL), with
  heartbeats so that a trial whose process was killed is failed on resume, with its reason, and every
  completed trial is kept; several worker processes can share one study.
- A trial lost by its process (interrupted, or the process died) is queued again with its parameters and
  seed label and does not count towards `n_trials` (`tuner.trial_states`); one that failed on its own
  merits (out of memory, a timeout) counts and stays failed.
- Worker and trial processes die with their parent, and asking for a trial is serialised so that
  `n_trials` is exact (`moe_lightning.tuner.processes`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moe_lightning.config import ModelSpec, Policy
from moe_lightning.errors import ConfigError
from moe_lightning.tuner.trial_process import TrialFailed, run_trial_process

if TYPE_CHECKING:
    from moe_lightning.run_config import RunConfig  # type hints only: it sits above the tasks

log = logging.getLogger("moe_lightning.search")
STUDIES_DIR = Path("results") / "studies"
KERNELS = ("auto", "loop", "padded", "grouped")


# ------------------------------------------------------------------------------------------------
# study


def search_space(cfg: RunConfig, spec: ModelSpec, lengths: Sequence[int] | None = None) -> dict[str, Any]:
    """The bounds `suggest` samples from (part of the study's identity). `lengths`: a prompts file's prompt
    lengths (`tasks.plan.planning_workload`; None: the workload's own), as every function of the study
    takes them."""
    space: dict[str, Any] = {"batch_size": [1, max_batch(cfg)], "num_micro_batches": [1, cfg.tuner.max_micro_batches],
                             "attn_on_gpu": [False, True],
                             "resident_experts": [0, max_resident_experts(cfg, spec, lengths)],
                             "kv_gpu_fraction": [0.0, 1.0], "prefetch_depth": [1, 3]}
    if cfg.tuner.objective == "measure":
        space["expert_kernel"] = list(KERNELS)
    if searches_dequant(cfg, spec):
        space["dequant_experts"] = [0, spec.num_experts]
    tensor = searched_tensor(cfg, spec)
    if tensor:   # several GPUs, no split given: the split is searched (`suggest`)
        space["tensor"] = tensor
    return space


def max_resident_experts(cfg: RunConfig, spec: ModelSpec, lengths: Sequence[int] | None = None) -> int:
    """The most resident experts per layer that the GPU budget holds under the least GPU memory any trial
    can ask for (one sequence, attention and the KV cache on the CPU, the smallest MXFP4 scratch, the
    searched kernel that needs least): every trial above it would be pruned (on a T4, Mixtral-8x7B cannot
    keep one expert a layer resident, and 22 of 30 trials were). Several GPUs: one rank's budget, under
    the searched layout that holds the most. It depends only on what the study's fingerprint holds."""
    from moe_lightning.memory import memory_plan
    from moe_lightning.systems import paged_kv

    E, paged = spec.num_experts, paged_kv(cfg.system)
    tensor = searched_tensor(cfg, spec)
    if tensor:
        layouts = [trial_layout({"tensor": T}, cfg) for T in tensor]
    elif cfg.parallel.world_size > 1:
        layouts = [cfg.parallel]
    elif cfg.hardware.gpu.count == 1:
        layouts = [None]
    else:   # several GPUs and no valid split: nothing fits, and the plan says why
        return E
    least = dataclasses.replace(cfg.policy, batch_size=1, micro_batch_size=1, attn_on_gpu=False, ffn_on_gpu=True,
                                kv_gpu_fraction=0.0, prefetch_depth=1,
                                dequant_experts=1 if searches_dequant(cfg, spec) else cfg.policy.dequant_experts)
    kernels = KERNELS if cfg.tuner.objective == "measure" else (cfg.policy.expert_kernel,)

    def gpu_holds(r: int) -> bool:
        for layout in layouts:
            for kernel in kernels:
                p = dataclasses.replace(least, expert_gpu_fraction=r / E, expert_kernel=kernel)
                if layout is None:
                    plan, budget = memory_plan(spec, p, cfg.workload, kv_tokens=given_kv_tokens(cfg), paged=paged,
                                               lengths=lengths), cfg.hardware
                else:
                    _, plan, budget = fits_layout(spec, cfg, p, layout, paged, lengths)
                if plan.gpu_total_bytes <= budget.gpu_budget_bytes:
                    return True
        return False

    return next((r for r in range(E, -1, -1) if gpu_holds(r)), 0)


def given_kv_tokens(cfg: RunConfig) -> int | None:
    """The KV cache's size in tokens that a trial's plan holds: system.kv_cache_tokens, as the engine allocates
    and task=simulate plans it (None: the plan's own, from N and the lengths)."""
    return getattr(cfg.system, "kv_cache_tokens", 0) or None


def searches_dequant(cfg: RunConfig, spec: ModelSpec) -> bool:
    """MXFP4 experts on one GPU (one expert group): the scratch's size (`Policy.dequant_experts`) is searched."""
    return spec.expert_format == "mxfp4" and cfg.hardware.gpu.count == 1 and cfg.parallel.expert == 1


def study_identity(cfg: RunConfig, spec: ModelSpec, lengths: Sequence[int] | None = None) -> tuple[str, dict[str, Any]]:
    """(study name, fingerprint fields). The default name ends with the fingerprint's first 10 digits."""
    from moe_lightning.tuner.identity import digest, study_fields

    fields = study_fields(cfg, spec, search_space(cfg, spec, lengths))
    if cfg.tuner.study_name:
        return cfg.tuner.study_name, fields
    name = f"{cfg.system.name}-{cfg.model.name}-{cfg.hardware.name}-{cfg.workload.name}-{cfg.tuner.objective}"
    name += ("-pareto" if cfg.tuner.multi_objective else "") + f"-{digest(fields)[:10]}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name), fields


def storage_url(cfg: RunConfig, name: str) -> str:
    if cfg.tuner.storage:
        return cfg.tuner.storage
    STUDIES_DIR.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(STUDIES_DIR / name).resolve()}.db"


JOURNAL_PREFIX = "journal:"


def journal_path(url: str) -> Path:
    """The file of a `journal:PATH` storage (relative paths from the working directory)."""
    return Path(url[len(JOURNAL_PREFIX):]).expanduser().resolve()


def journal_storage(url: str):
    """Optuna's JournalStorage on a file (`tuner.storage=journal:PATH`): for hosts that share a file
    system and no database server. Its default lock is a symlink (NFSv2 and later). It has no
    heartbeat: a trial whose process died is failed on resume by the host that ran it (its pid is gone)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = journal_path(url)
    if not url[len(JOURNAL_PREFIX):]:
        raise ValueError("journal: needs a file, e.g. journal:results/studies/my-study.log")
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def shown_url(url: str) -> str:
    """A storage URL as messages and reports show it: without its password."""
    import sqlalchemy

    if url.startswith(JOURNAL_PREFIX):
        return url
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL at all: nothing to hide
        return url


def open_study(cfg: RunConfig, spec: ModelSpec, worker: int = 0, lengths: Sequence[int] | None = None):
    """Create the study, or resume it if its fingerprint equals this config's (else one-line refusal).
    `worker`: which of the tune's processes opens it (0 the main one). Samplers of one seed draw the same
    random start-up trials, so parallel workers, a resumed tune after its first run, and two tune commands
    started on one study (machines sharing a PostgreSQL study) measured policies already measured. Each
    opening therefore samples from its own seed, drawn from `tuner.seed`, the worker, the trials the study
    holds and the opening's number, which it claims under the study's gate (the study's `openings`)."""
    import warnings

    import numpy
    import optuna

    from moe_lightning.tuner.identity import check_identity
    from moe_lightning.tuner.processes import trial_gate

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    name, fields = study_identity(cfg, spec, lengths)
    url = storage_url(cfg, name)
    heartbeat = max(1, int(cfg.tuner.heartbeat_s))
    try:
        if url.startswith(JOURNAL_PREFIX):
            storage = journal_storage(url)
        else:
            # Under the study's gate: machines started together on a fresh database would otherwise race to
            # create Optuna's tables (PostgreSQL: a unique violation in pg_type for all but one).
            with trial_gate(url, name):
                storage = optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat, grace_period=3 * heartbeat,
                                                     engine_kwargs={"connect_args": {"timeout": 60}}
                                                     if url.startswith("sqlite") else None)
    except ModuleNotFoundError as exc:   # the URL's database driver
        hint = " (pip install 'moe-lightning[postgres]')" if exc.name and exc.name.startswith("psycopg") else ""
        raise ConfigError(f"tuner.storage={shown_url(url)!r}: its driver {exc.name!r} is not installed{hint}") from None
    except Exception as exc:  # noqa: BLE001 - a bad URL or an unreachable database
        raise ConfigError(f"tuner.storage={shown_url(url)!r}: cannot open ({str(exc).splitlines()[0]})") from None
    directions = ["maximize", "minimize"] if cfg.tuner.multi_objective else ["maximize"]

    exists = name in {s.study_name for s in storage.get_all_studies()}
    if exists:
        study = optuna.load_study(study_name=name, storage=storage)
    else:
        study = optuna.create_study(storage=storage, study_name=name, directions=directions, load_if_exists=True)
    check_identity(study, fields)
    if len(study.directions) != len(directions):
        raise ConfigError(f"study {name!r} has {len(study.directions)} objective(s) but tuner.multi_objective="
                          f"{str(cfg.tuner.multi_objective).lower()} needs {len(directions)}; choose another "
                          f"tuner.study_name")
    names = METRIC_NAMES[:len(directions)]
    if study.metric_names != names:   # what optuna-dashboard and Optuna's plots call the objectives
        study.set_metric_names(names)
    with trial_gate(url, name):   # two processes opening at once must not claim one number
        opening = int(study.user_attrs.get("openings", 0))
        study.set_user_attr("openings", opening + 1)
    held = len(study.get_trials(deepcopy=False))
    entropy = [cfg.tuner.seed, worker, opening, held]
    study.sampler = optuna.samplers.TPESampler(seed=int(numpy.random.SeedSequence(entropy).generate_state(1)[0]),
                                               multivariate=True)
    return study


METRIC_NAMES = ["throughput_tok_s", "peak_gpu_bytes"]


# ------------------------------------------------------------------------------------------------
# search space


def max_batch(cfg: RunConfig) -> int:
    return cfg.tuner.max_batch_size or cfg.workload.num_requests


def policy_params(policy: Policy, spec: ModelSpec, measured: bool, dequant: bool = False) -> dict[str, Any]:
    """The trial parameters that reproduce `policy` (for enqueue_trial); `dequant`: the study searches
    `dequant_experts` (`searches_dequant`)."""
    params = {
        "batch_size": policy.batch_size,
        "num_micro_batches": policy.num_micro_batches,
        "attn_on_gpu": policy.attn_on_gpu,
        "resident_experts": round(policy.expert_gpu_fraction * spec.num_experts),
        "kv_gpu_fraction": round(policy.kv_gpu_fraction, 3),
        "prefetch_depth": policy.prefetch_depth,
    }
    if measured:
        params["expert_kernel"] = policy.expert_kernel
    if dequant:
        params["dequant_experts"] = policy.dequant_experts
    return params


def policy_from_params(params: dict[str, Any], spec: ModelSpec, base: Policy) -> Policy:
    n = int(params["batch_size"])
    m = min(int(params["num_micro_batches"]), n)
    return dataclasses.replace(
        base, batch_size=n, micro_batch_size=math.ceil(n / m), attn_on_gpu=bool(params["attn_on_gpu"]),
        ffn_on_gpu=True, expert_gpu_fraction=int(params["resident_experts"]) / spec.num_experts,
        kv_gpu_fraction=float(params["kv_gpu_fraction"]), prefetch_depth=int(params["prefetch_depth"]),
        expert_kernel=params.get("expert_kernel", base.expert_kernel),
        dequant_experts=int(params.get("dequant_experts", base.dequant_experts)))


def searched_policy_fields(cfg: RunConfig, spec: ModelSpec) -> tuple[str, ...]:
    """The Policy fields a trial sets (`suggest`, `policy_from_params`): a given value would be ignored."""
    fields = ("batch_size", "micro_batch_size", "attn_on_gpu", "ffn_on_gpu", "expert_gpu_fraction",
              "kv_gpu_fraction", "prefetch_depth")
    if cfg.tuner.objective == "measure":
        fields += ("expert_kernel",)
    if searches_dequant(cfg, spec):
        fields += ("dequant_experts",)
    return fields


def suggest(trial, cfg: RunConfig, spec: ModelSpec, space: dict[str, Any] | None = None) -> dict[str, Any]:
    """A trial's parameters, from `space` (`search_space`; computed here when not given)."""
    t = cfg.tuner
    space = space or search_space(cfg, spec)
    params = {
        "batch_size": trial.suggest_int("batch_size", 1, max_batch(cfg), log=True),
        "num_micro_batches": trial.suggest_int("num_micro_batches", 1, t.max_micro_batches),
        "attn_on_gpu": trial.suggest_categorical("attn_on_gpu", [False, True]),
        "resident_experts": trial.suggest_int("resident_experts", *space["resident_experts"]),
        "kv_gpu_fraction": trial.suggest_float("kv_gpu_fraction", 0.0, 1.0),
        "prefetch_depth": trial.suggest_int("prefetch_depth", 1, 3),
    }
    if t.objective == "measure":
        params["expert_kernel"] = trial.suggest_categorical("expert_kernel", list(KERNELS))
    if searches_dequant(cfg, spec):
        params["dequant_experts"] = trial.suggest_int("dequant_experts", 0, spec.num_experts)
    tensor = searched_tensor(cfg, spec)
    if tensor:   # several GPUs, no split given: the layout is searched with the policy (E = GPUs / T)
        params["tensor"] = trial.suggest_categorical("tensor", tensor)
    return params


def searched_tensor(cfg: RunConfig, spec: ModelSpec) -> list[int] | None:
    """Several GPUs and no `parallel` given: the tensor degrees T a study searches (each with E = GPUs / T),
    every valid split's; None where the layout is fixed (one GPU, a given split, or no valid split: the
    plan then says why)."""
    if cfg.parallel.world_size > 1 or cfg.hardware.gpu.count == 1:
        return None
    from moe_lightning.tuner.parallel import layouts

    return [p.tensor for p in layouts(spec, cfg.hardware)] or None


def trial_layout(params: dict[str, Any], cfg: RunConfig):
    """The T x E a trial's `tensor` parameter chose, or None (the study's layout)."""
    if "tensor" not in params:
        return None
    T = int(params["tensor"])
    return dataclasses.replace(cfg.parallel, tensor=T, expert=cfg.hardware.gpu.count // T)


def study_layout(cfg: RunConfig, spec: ModelSpec, lengths: Sequence[int] | None = None):
    """Several GPUs: the T x E layout a simulated study searches policies for, `parallel.tensor` x
    `parallel.expert` when given, else the HRM plan's (its policy is searched, not its layout); None on one
    GPU."""
    if cfg.parallel.world_size > 1:
        return cfg.parallel
    if cfg.hardware.gpu.count == 1:
        return None
    from moe_lightning.systems import paged_kv
    from moe_lightning.tuner.optimizer import optimize

    workload = dataclasses.replace(cfg.workload, num_requests=max_batch(cfg))
    chosen = optimize(spec, cfg.hardware, workload, paged_kv=paged_kv(cfg.system), lengths=lengths,
                      parallel=cfg.parallel).parallel
    return dataclasses.replace(cfg.parallel, tensor=chosen.tensor, expert=chosen.expert)


def fits_layout(spec: ModelSpec, cfg: RunConfig, policy: Policy, layout, paged: bool,
                lengths: Sequence[int] | None = None):
    """(the policy rounded to whole expert groups, its memory plan: one rank's, the budget it is checked
    against)."""
    from moe_lightning.memory import memory_plan
    from moe_lightning.tuner.parallel import rank_view

    view = rank_view(spec, cfg.hardware, layout)
    E = view.groups
    if E > 1:   # each expert group holds an equal share: N and mu in whole multiples of E
        n = -(-policy.batch_size // E) * E
        mu = min(n, -(-policy.micro_batch_size // E) * E)
        policy = dataclasses.replace(policy, batch_size=n, micro_batch_size=mu)
    plan = memory_plan(view.spec, view.policy(policy), view.workload(cfg.workload), kv_tokens=given_kv_tokens(cfg),
                       paged=paged, lengths=view.lengths(cfg.workload, lengths))
    return policy, plan, view.hw


def seed_policies(cfg: RunConfig, spec: ModelSpec, layout=None, lengths: Sequence[int] | None = None) -> list[Policy]:
    """The HRM optimum first, then feasible neighbours (N halved/doubled, one micro-batch more or
    fewer, one resident expert more or fewer, attention moved)."""
    from moe_lightning.memory import memory_plan
    from moe_lightning.systems import paged_kv
    from moe_lightning.tuner.optimizer import FFN_ON_GPU, optimize

    workload = dataclasses.replace(cfg.workload, num_requests=max_batch(cfg))

    layout = layout or study_layout(cfg, spec, lengths)
    top = max_resident_experts(cfg, spec, lengths)   # the search space's bound: a neighbour above it is never sampled
    # On the placements the engine runs (the MoE FFN on the GPU), as task=plan plans by default: every trial
    # runs the FFN on the GPU, and the optimum over the others would be no trial's.
    plan = optimize(spec, cfg.hardware, workload, placements=FFN_ON_GPU, paged_kv=paged_kv(cfg.system),
                    lengths=lengths, parallel=layout or cfg.parallel)
    best = dataclasses.replace(cfg.policy, **{f.name: getattr(plan.policy, f.name)
                                              for f in dataclasses.fields(Policy)
                                              if f.name in ("batch_size", "micro_batch_size", "attn_on_gpu",
                                                            "ffn_on_gpu", "expert_gpu_fraction",
                                                            "kv_gpu_fraction", "dequant_experts")})
    best = policy_from_params(policy_params(best, spec, True), spec, best)
    E, n, m = spec.num_experts, best.batch_size, best.num_micro_batches
    r = round(best.expert_gpu_fraction * E)
    candidates = [best]
    for n2, m2, r2, attn in ((n // 2, m, r, best.attn_on_gpu), (n * 2, m, r, best.attn_on_gpu),
                             (n, m + 1, r, best.attn_on_gpu), (n, m - 1, r, best.attn_on_gpu),
                             (n, m, r + 1, best.attn_on_gpu), (n, m, r - 1, best.attn_on_gpu),
                             (n, m, r, not best.attn_on_gpu)):
        if not (1 <= n2 <= max_batch(cfg) and 1 <= m2 <= min(n2, cfg.tuner.max_micro_batches) and 0 <= r2 <= top):
            continue
        p = dataclasses.replace(best, batch_size=n2, micro_batch_size=math.ceil(n2 / m2),
                                expert_gpu_fraction=r2 / E, attn_on_gpu=attn)
        if layout is not None:
            p, mem, budget = fits_layout(spec, cfg, p, layout, paged_kv(cfg.system), lengths)
            if mem.fits(budget) and p not in candidates:
                candidates.append(p)
        elif (memory_plan(spec, p, cfg.workload, kv_tokens=given_kv_tokens(cfg), paged=paged_kv(cfg.system),
                          lengths=lengths).fits(cfg.hardware) and p not in candidates):
            candidates.append(p)
    return candidates[: 1 + cfg.tuner.neighbours]


def seed_study(study, cfg: RunConfig, spec: ModelSpec, lengths: Sequence[int] | None = None) -> list[Policy]:
    measured = cfg.tuner.objective == "measure"
    layout = study_layout(cfg, spec, lengths)   # several GPUs: the HRM's T x E (or the given one)
    seeds = seed_policies(cfg, spec, layout, lengths)
    searched = {"tensor": layout.tensor} if searched_tensor(cfg, spec) else {}
    for i, p in enumerate(seeds):
        study.enqueue_trial(policy_params(p, spec, measured, searches_dequant(cfg, spec)) | searched,
                            user_attrs={"seed": "hrm" if i == 0 else "hrm-neighbour"}, skip_if_exists=True)
    return seeds


# ------------------------------------------------------------------------------------------------
# objective


def objective(cfg: RunConfig, spec: ModelSpec, on_trial: Callable[[dict], None] | None = None,
              lengths: Sequence[int] | None = None, gen_lens: Sequence[int] | None = None):
    """The function Optuna calls per trial: -> tokens/s (or tokens/s, peak GPU bytes). `gen_lens`: a prompts
    file's own budgets, at which simulated trials stop each request."""
    import optuna

    from moe_lightning.memory import memory_plan
    from moe_lightning.systems import paged_kv

    layouts: list = []   # several GPUs with no layout searched: the study's, found once per worker
    space = search_space(cfg, spec, lengths)   # its bounds, computed once per worker

    def run(trial) -> float | tuple[float, float]:
        params = suggest(trial, cfg, spec, space)
        try:
            policy = policy_from_params(params, spec, cfg.policy)
        except ConfigError as exc:
            trial.set_user_attr("reason", str(exc))
            raise optuna.TrialPruned(str(exc)) from None
        layout = trial_layout(params, cfg)
        if layout is None:
            if not layouts:
                layouts.append(study_layout(cfg, spec, lengths))
            layout = layouts[0]
        budget = cfg.hardware
        if layout is not None:
            policy, plan, budget = fits_layout(spec, cfg, policy, layout, paged_kv(cfg.system), lengths)
            trial.set_user_attr("parallel", dataclasses.asdict(layout))
        else:
            plan = memory_plan(spec, policy, cfg.workload, kv_tokens=given_kv_tokens(cfg), paged=paged_kv(cfg.system),
                               lengths=lengths)
        trial.set_user_attr("policy", dataclasses.asdict(policy))
        if not plan.fits(budget):
            reason = plan.describe(budget)
            trial.set_user_attr("reason", reason)
            _notify(on_trial, trial, "pruned", reason=reason)
            raise optuna.TrialPruned(reason)
        trial_cfg = dataclasses.replace(cfg, policy=policy)
        if cfg.tuner.objective == "simulate":
            sim = simulate_trial(trial_cfg, spec, layout, lengths, gen_lens)
            tok_s, peak = sim.throughput_tok_s, plan.gpu_total_bytes
            # the run document's metrics when this trial is the best: prefill, decode, tokens ... as simulated,
            # the memory as planned (what task=simulate reports)
            metrics = dataclasses.asdict(sim.metrics())
            trial.set_user_attr("metrics", {k: v for k, v in metrics.items() if k != "spread"}
                                | {"peak_cpu_bytes": plan.cpu_total_bytes})
            trial.set_user_attr("kind", "simulated")
            trial.set_user_attr("where", f"profile {cfg.hardware.name}")
        else:
            try:
                doc, attempts = measure_trial(trial_cfg)
            except TrialFailed as exc:
                trial.set_user_attr("reason", str(exc))
                _notify(on_trial, trial, "failed", reason=str(exc))
                raise
            m = doc["metrics"]
            tok_s, peak = m["throughput_tok_s"], m["peak_gpu_bytes"]   # the median over the repeats
            detected = doc["hardware"].get("detected") or {}
            trial.set_user_attr("kind", "measured")
            trial.set_user_attr("where", detected.get("gpu") or f"this host ({detected.get('device')})")
            trial.set_user_attr("detected", detected)   # the tune's run document names the device measured
            trial.set_user_attr("metrics", {k: v for k, v in m.items() if k != "spread"})   # prefill, decode ...
            trial.set_user_attr("spread", m["spread"])
            trial.set_user_attr("noisy", m["noisy"])
            trial.set_user_attr("noise", m["noise"])
            trial.set_user_attr("measurements", attempts)
            trial.set_user_attr("host_load", doc["environment"].get("host_load"))
            trial.set_user_attr("threads", doc["environment"].get("threads"))
            trial.set_user_attr("run", {k: doc[k] for k in ("run_id", "prediction")})
        trial.set_user_attr("throughput_tok_s", tok_s)
        trial.set_user_attr("peak_gpu_bytes", peak)
        _notify(on_trial, trial, "complete", value=tok_s)
        return (tok_s, float(peak)) if cfg.tuner.multi_objective else tok_s

    return run


def _notify(on_trial, trial, state: str, **kw) -> None:
    if on_trial is not None:
        on_trial({"number": trial.number, "state": state, "params": dict(trial.params), **kw})


def measure_trial(cfg: RunConfig) -> tuple[dict, int]:
    """Measure a trial (warm-up, `tuner.repeats` timed repeats, in a child process); a noisy result is
    measured again up to `tuner.remeasure` times and the steadiest (lowest CV) is kept.
    -> (run document, number of measurements)."""
    t = cfg.tuner
    docs = []
    for _ in range(1 + t.remeasure):
        docs.append(run_trial_process(cfg, t.trial_timeout_s, t.trial_memory_gib))
        if not docs[-1]["metrics"]["noisy"]:
            break
    def steadiness(doc: dict) -> tuple:   # a known CV first (None: one repeat), then the lowest, then not noisy
        cv = doc["metrics"]["spread"]["throughput_tok_s"]["cv"]
        return cv is None, cv or 0.0, doc["metrics"]["noisy"]

    best = min(docs, key=steadiness)
    return best, len(docs)


def simulate_trial(cfg: RunConfig, spec: ModelSpec, layout=None, lengths: Sequence[int] | None = None,
                   gen_lens: Sequence[int] | None = None):
    """The simulator's run of the trial's policy (`SimResult`) over the prompts' lengths, each request
    stopping at its own budget (`gen_lens`; None: every request at workload.gen_len), as task=simulate
    runs cfg.system (its schedule and KV settings: `tasks.simulate.simulate_policy`)."""
    from moe_lightning.tasks.simulate import simulate_policy  # the task's own run (tables.py does the same)

    return simulate_policy(cfg, spec, cfg.workload, cfg.policy, lengths, gen_lens, layout)
