"""Markdown tables for the README, computed (never typed): `python -m moe_lightning.tuner.tables plans`.

- plans: the HRM-planned policy and predicted throughput for each hardware x workload with a model,
  with the simulator's end-to-end throughput of the same policy beside it.
- comparison: simulated end-to-end tokens/s of CGOPipe and the baselines, each with the policy its
  own rule picks, timing each system's own task graphs (`python -m moe_lightning.tuner.tables comparison`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

SYSTEMS = ("cgopipe", "flexgen", "flexgen_c", "deepspeed", "fastdecode")


def plans_table(model: str, hardware: list[str], workloads: list[str], simulate: bool = True) -> str:
    from moe_lightning.tuner.optimizer import optimize
    from moe_lightning.tuner.presets import load_preset

    spec = load_preset("model", model)
    rows = ["| hardware | workload | N | mu | attention | FFN | r_w | r_c | HRM decode tok/s | HRM e2e tok/s "
            "| simulated e2e tok/s | bottleneck |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for hw_name in hardware:
        hw = load_preset("hardware", hw_name)
        for wl_name in workloads:
            wl = load_preset("workload", wl_name)
            plan = optimize(spec, hw, wl)
            p, pred = plan.policy, plan.prediction
            sim = ""
            if simulate:
                from moe_lightning.tuner.simulator import simulate_run

                sim = f"{simulate_run(spec, hw, wl, p).throughput_tok_s:.1f}"
            rows.append(f"| {hw_name} | {wl_name} (gen {wl.gen_len}) | {p.batch_size} | {p.micro_batch_size} | "
                        f"{'GPU' if p.attn_on_gpu else 'CPU'} | {'GPU' if p.ffn_on_gpu else 'CPU'} | "
                        f"{p.expert_gpu_fraction:.3f} | {p.kv_gpu_fraction:.3f} | {pred.decode_tok_s:.1f} | "
                        f"{pred.e2e_tok_s:.1f} | {sim} | {plan.bottleneck} |")
    return "\n".join(rows)


def comparison_table(model: str, hardware: list[str], cases: list[tuple[str, int | None, bool]]) -> str:
    from moe_lightning.baselines.policies import choose_policy
    from moe_lightning.tasks.simulate import FFN_ON_GPU, schedule_of
    from moe_lightning.tuner.optimizer import optimize
    from moe_lightning.tuner.presets import load_preset
    from moe_lightning.tuner.simulator import default_max_decode_steps, simulate_run

    spec = load_preset("model", model)
    rows = ["| hardware | workload | gen | padded | " + " | ".join(SYSTEMS) + " | CGOPipe / best baseline |",
            "|---|---|---|---|" + "---|" * (len(SYSTEMS) + 1)]
    for hw_name in hardware:
        hw = load_preset("hardware", hw_name)
        for wl_name, gen, padded in cases:
            wl = load_preset("workload", wl_name)
            wl = dataclasses.replace(wl, gen_len=gen or wl.gen_len, padding=padded)
            tok_s = {}
            for system in SYSTEMS:
                try:
                    policy = (optimize(spec, hw, wl, placements=FFN_ON_GPU).policy if system == "cgopipe"
                              else choose_policy(system, spec, hw, wl))
                    sim = simulate_run(spec, hw, wl, policy, schedule=schedule_of(system),
                                       max_decode_steps=default_max_decode_steps(wl, policy, spec))
                    tok_s[system] = sim.throughput_tok_s
                except Exception:  # noqa: BLE001 - a system with no feasible policy is a blank cell
                    tok_s[system] = None
            best_base = max((v for k, v in tok_s.items() if k != "cgopipe" and v), default=None)
            ratio = f"{tok_s['cgopipe'] / best_base:.2f}x" if best_base and tok_s["cgopipe"] else ""
            cells = " | ".join(f"{tok_s[s]:.1f}" if tok_s[s] else "-" for s in SYSTEMS)
            rows.append(f"| {hw_name} | {wl_name} | {wl.gen_len} | {'yes' if padded else 'no'} | {cells} | {ratio} |")
    return "\n".join(rows)


PAPER_CASES = [("mtbench", g, p) for g in (32, 64, 128, 256) for p in (False, True)] + [
    ("helm-synthetic-reasoning", None, False), ("helm-summarization", None, False)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("table", choices=["plans", "comparison"])
    ap.add_argument("--model", default="mixtral-8x7b")
    ap.add_argument("--hardware", default="t4,l4")
    ap.add_argument("--workloads", default="mtbench,helm-synthetic-reasoning,helm-summarization")
    ap.add_argument("--no-simulate", action="store_true")
    args = ap.parse_args(argv)
    if args.table == "plans":
        print(plans_table(args.model, args.hardware.split(","), args.workloads.split(","), not args.no_simulate))
    else:
        print(comparison_table(args.model, args.hardware.split(","), PAPER_CASES))


if __name__ == "__main__":
    main(sys.argv[1:])
