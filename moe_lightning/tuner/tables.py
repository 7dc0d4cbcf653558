"""Markdown tables for the README, computed (never typed): `python -m moe_lightning.tuner.tables plans`.

- plans: the HRM-planned policy and predicted throughput for each hardware x workload with a model,
  with the simulator's end-to-end throughput of the same policy beside it.
"""

from __future__ import annotations

import argparse
import sys


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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("table", choices=["plans"])
    ap.add_argument("--model", default="mixtral-8x7b")
    ap.add_argument("--hardware", default="t4,l4")
    ap.add_argument("--workloads", default="mtbench,helm-synthetic-reasoning,helm-summarization")
    ap.add_argument("--no-simulate", action="store_true")
    args = ap.parse_args(argv)
    print(plans_table(args.model, args.hardware.split(","), args.workloads.split(","), not args.no_simulate))


if __name__ == "__main__":
    main(sys.argv[1:])
