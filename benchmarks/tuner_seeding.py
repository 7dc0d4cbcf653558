"""Does seeding the Optuna search with HRM pay? On the simulator objective (no GPU needed):

1. an exhaustive grid over the policy space (batch size x micro-batches x resident experts x attention
   placement), every feasible point simulated;
2. the HRM-seeded study (the tune task's default) for --trials trials;
3. unseeded TPE for --trials trials, beside it;
and reports both best-so-far curves as a fraction of the grid's best (goal: seeded >= 97% within 20).
Every number is simulated on the hardware profile named (not measured on this host).

    python benchmarks/tuner_seeding.py [--hardware t4] [--model mixtral-8x7b] [--workload mtbench] [--save]

--save writes results/tuner_seeding/<case>.json and .png; a record already there (committed ones are)
is replaced only with --overwrite.
"""

from __future__ import annotations

import dataclasses
import itertools
import tempfile
import time
from pathlib import Path

from moe_lightning.bench_args import Parser, guard, positive_int

RESULTS = Path(__file__).resolve().parent.parent / "results" / "tuner_seeding"


def main() -> None:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--hardware", default="t4")
    ap.add_argument("--model", default="mixtral-8x7b")
    ap.add_argument("--workload", default="mtbench")
    ap.add_argument("--trials", type=positive_int, default=20)
    ap.add_argument("--seeds", type=positive_int, default=3, help="sampler seeds per arm")
    ap.add_argument("--save", action="store_true", help=f"write {RESULTS}/<case>.json and .png")
    ap.add_argument("--overwrite", action="store_true", help="with --save: replace a record already there")
    args = ap.parse_args()
    case = f"{args.model}-{args.hardware}-{args.workload}"
    if args.save and not args.overwrite:   # refused before the grid and the studies, not after
        taken = [p for p in (RESULTS / f"{case}.json", RESULTS / f"{case}.png") if p.exists()]
        if taken:
            ap.error(f"--save: {taken[0]} exists (a committed record?); pass --overwrite to replace it")

    import optuna

    from moe_lightning.config import Policy, TunerConfig
    from moe_lightning.memory import memory_plan
    from moe_lightning.run_config import RunConfig
    from moe_lightning.systems import CGOPipeSystem
    from moe_lightning.tuner.presets import load_preset
    from moe_lightning.tuner.search import TrialFailed, objective, open_study, seed_study
    from moe_lightning.tuner.simulator import simulate_run

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec, hw = load_preset("model", args.model), load_preset("hardware", args.hardware)
    wl = load_preset("workload", args.workload)

    t0 = time.perf_counter()
    grid = []
    # Batch sizes in steps of 32, and the whole workload (a workload under 32 requests had an empty grid).
    sizes = sorted(set(range(32, wl.num_requests + 1, 32)) | {wl.num_requests})
    for n, m, r, attn in itertools.product(sizes, (1, 2, 4, 8, 12, 16, 24, 32, 48, 64),
                                           (0, 1, 2), (False, True)):
        if m > n:
            continue
        p = Policy(batch_size=n, micro_batch_size=-(-n // m), attn_on_gpu=attn,
                   expert_gpu_fraction=r / spec.num_experts)
        if memory_plan(spec, p, wl).fits(hw):
            grid.append((simulate_run(spec, hw, wl, p).throughput_tok_s, p))
    if not grid:
        from moe_lightning.errors import ConfigError

        raise ConfigError(f"no policy of the grid fits {args.hardware} for {args.model} on {args.workload}: "
                          "nothing to compare the studies with; choose larger hardware or a smaller model")
    grid_best, grid_policy = max(grid, key=lambda x: x[0])
    print(f"grid: {len(grid)} feasible points simulated on hardware profile {args.hardware} (every tok/s below is "
          f"simulated) in {time.perf_counter() - t0:.0f} s; "
          f"best {grid_best:.2f} tok/s at N={grid_policy.batch_size} mu={grid_policy.micro_batch_size} "
          f"attn_on_gpu={grid_policy.attn_on_gpu} r_w={grid_policy.expert_gpu_fraction}")

    curves: dict[str, list[list[float]]] = {"hrm_seeded": [], "unseeded_tpe": []}
    with tempfile.TemporaryDirectory() as tmp:
        for arm, seeded in (("hrm_seeded", True), ("unseeded_tpe", False)):
            for seed in range(args.seeds):
                tuner = TunerConfig(objective="simulate", n_trials=args.trials, seed=seed, seed_with_hrm=seeded,
                                    storage=f"sqlite:///{tmp}/{arm}-{seed}.db", study_name=f"{arm}-{seed}")
                cfg = RunConfig(system=CGOPipeSystem(), model=spec, hardware=hw, workload=wl, tuner=tuner)
                study = open_study(cfg, spec)
                if seeded:
                    seed_study(study, cfg, spec)
                study.optimize(objective(cfg, spec), n_trials=args.trials, catch=(TrialFailed,))
                best, curve = 0.0, []
                for t in study.trials:
                    best = max(best, t.values[0] if t.values else 0.0)
                    curve.append(round(best / grid_best, 4))
                curves[arm].append(curve)
                print(f"{arm} seed {seed}: best {best:.2f} tok/s = {best / grid_best:.1%} of the grid's best; "
                      f"reaches 97% at trial {next((i for i, c in enumerate(curve) if c >= 0.97), None)}")
    result = {"case": case, "kind": "simulated", "where": f"hardware profile {args.hardware} (simulator objective)",
              "grid_points": len(grid),
              "grid_best_tok_s": grid_best, "grid_best_policy": dataclasses.asdict(grid_policy),
              "trials": args.trials, "curves_fraction_of_grid_best": curves}
    for arm, cs in curves.items():
        final = [c[-1] for c in cs]
        print(f"{arm}: final fraction of grid best over {len(cs)} seeds: min {min(final):.3f}, "
              f"mean {sum(final) / len(final):.3f}")
    if args.save:
        import io

        from moe_lightning.files import atomic_write, write_json

        out = RESULTS   # beside the other records, whatever the working folder

        write_json(out / f"{result['case']}.json", result, indent=2)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for arm, colour in (("hrm_seeded", "tab:red"), ("unseeded_tpe", "tab:blue")):
            for i, c in enumerate(curves[arm]):
                ax.step(range(1, len(c) + 1), c, where="post", color=colour, alpha=0.7, label=arm if i == 0 else None)
        ax.axhline(0.97, ls="--", color="grey", lw=1)
        ax.set_xlabel("trial")
        ax.set_ylabel("best so far / grid best")
        ax.set_title(f"{result['case']} (simulated)")
        ax.legend()
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=120)
        atomic_write(out / f"{result['case']}.png", png.getvalue())
        print(f"saved {out / result['case']}.json and .png")


if __name__ == "__main__":
    raise SystemExit(guard(main))
