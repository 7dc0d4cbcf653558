"""Markdown tables for the README, computed (never typed): `python -m moe_lightning.tuner.tables plans`.

- plans: the HRM-planned policy and predicted throughput for each hardware x workload with a model,
  unpadded and padded, with the simulator's end-to-end throughput of the same policy beside it;
- padding: why the unpadded plan is larger, term by term (`... padding --hardware t4 --workloads mtbench`);
- sensitivity: which modelling term moves the plan, and by how much (one input changed at a time).
- comparison: simulated end-to-end tokens/s of CGOPipe and the baselines, each with the policy its
  own rule picks, timing each system's own task graphs (`python -m moe_lightning.tuner.tables comparison`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

SYSTEMS = ("cgopipe", "flexgen", "flexgen_c", "deepspeed", "fastdecode")


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f}"


def plans_table(model: str, hardware: list[str], workloads: list[str], simulate: bool = True) -> str:
    """The HRM plan of each hardware x workload, unpadded (CGOPipe's paged KV cache, Algorithm 2) and
    padded (MoE-Lightning(p)), with the memory terms that bound it and the simulator beside it."""
    from moe_lightning.tuner.optimizer import optimize
    from moe_lightning.tuner.presets import load_preset

    spec = load_preset("model", model)
    rows = ["| hardware | workload | padded | N | mu | attention | r_w | r_c | GPU activations GiB | CPU KV GiB "
            "| HRM decode tok/s | HRM e2e tok/s | simulated e2e tok/s | bottleneck |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for hw_name in hardware:
        hw = load_preset("hardware", hw_name)
        for wl_name in workloads:
            for padded in (False, True):
                wl = dataclasses.replace(load_preset("workload", wl_name), padding=padded)
                plan = optimize(spec, hw, wl)
                p, pred, mem = plan.policy, plan.prediction, plan.memory
                sim = ""
                if simulate:
                    from moe_lightning.tuner.simulator import default_max_decode_steps, simulate_run

                    run = simulate_run(spec, hw, wl, p, max_decode_steps=default_max_decode_steps(wl, p, spec),
                                       parallel=dataclasses.replace(plan.parallel, chunks=0))
                    sim = f"{run.throughput_tok_s:.1f}"
                rows.append(f"| {hw_name} | {wl_name} (gen {wl.gen_len}) | {'yes' if padded else 'no'} | "
                            f"{p.batch_size} | {p.micro_batch_size} | {'GPU' if p.attn_on_gpu else 'CPU'} | "
                            f"{p.expert_gpu_fraction:.3f} | {p.kv_gpu_fraction:.3f} | "
                            f"{_gib(mem.gpu['activations'])} | {_gib(mem.cpu['kv_cache'])} | "
                            f"{'-' if pred.decode_tok_s is None else f'{pred.decode_tok_s:.1f}'} | "
                            f"{pred.e2e_tok_s:.1f} | {sim} | {plan.bottleneck} |")
    return "\n".join(rows)


def padding_terms_table(model: str, hardware: str, workload: str) -> str:
    """Why the unpadded plan is larger, term by term: each plan's terms, and the unpadded plan's policy
    planned padded (what overflows)."""
    from moe_lightning.memory import prefill_tokens
    from moe_lightning.tuner.hrm import decode_context, predict
    from moe_lightning.tuner.optimizer import optimize
    from moe_lightning.tuner.presets import load_preset

    spec, hw = load_preset("model", model), load_preset("hardware", hardware)
    unpadded = load_preset("workload", workload)
    padded = dataclasses.replace(unpadded, padding=True)
    plans = {"unpadded": optimize(spec, hw, unpadded), "padded": optimize(spec, hw, padded)}
    cases = [("unpadded plan", unpadded, plans["unpadded"].policy), ("padded plan", padded, plans["padded"].policy),
             ("unpadded plan's policy, padded", padded, plans["unpadded"].policy)]
    rows = ["| case | N | mu | prefill tokens held (round / micro-batch) | GPU activations GiB | GPU total GiB "
            f"(budget {_gib(hw.gpu_budget_bytes)}) | CPU KV GiB | CPU total GiB (budget {_gib(hw.cpu_budget_bytes)}) "
            "| decode context | CPU attention ms/layer | HRM e2e tok/s |", "|---" * 11 + "|"]
    for name, wl, policy in cases:
        pred = predict(spec, hw, wl, policy)
        mem = pred.memory
        kv = mem.cpu["kv_cache"] + mem.gpu["kv_cache"]
        batch, micro = prefill_tokens(wl, policy.batch_size, policy.micro_batch_size,
                                      kv // spec.kv_bytes_per_token, not wl.padding)
        over = "" if mem.fits(hw) else " (does not fit)"
        rows.append(f"| {name} | {policy.batch_size} | {policy.micro_batch_size} | {batch} / {micro} | "
                    f"{_gib(mem.gpu['activations'])} | {_gib(mem.gpu_total_bytes)}{over} | "
                    f"{_gib(mem.cpu['kv_cache'])} | "
                    f"{_gib(mem.cpu_total_bytes)} | {decode_context(wl):.1f} | {pred.t_cpu * 1e3:.2f} | "
                    f"{pred.e2e_tok_s:.1f} |")
    return "\n".join(rows)


def sensitivity_table(model: str, hardware: str, workload: str) -> str:
    """Which modelling term moves the plan, and by how much: the HRM plan with one input changed."""
    from moe_lightning.tuner.optimizer import optimize
    from moe_lightning.tuner.presets import load_preset

    spec, hw, wl = load_preset("model", model), load_preset("hardware", hardware), load_preset("workload", workload)
    R = dataclasses.replace

    def scaled(group: str, field: str, k: float):
        part = getattr(hw, group)
        return R(hw, **{group: R(part, **{field: getattr(part, field) * k})})

    avg = [wl.prompt_len_avg] * wl.num_requests
    variants = [
        ("as profiled", spec, hw, wl, {}),
        ("prompts padded to the longest (KV, prefill, attention)", spec, hw, R(wl, padding=True), {}),
        ("every prompt at the average length", spec, hw, wl, {"lengths": avg}),
        ("KV planned dense (N x longest), not the paged cache_size", spec, hw, wl, {"paged_kv": False}),
        ("last partial batch prorated, not charged full", spec, hw, wl, {"last_batch": "prorated"}),
        ("link H2D bandwidth x2", spec, scaled("link", "h2d_gbps", 2.0), wl, {}),
        ("GPU memory x0.75", spec, scaled("gpu", "memory_gib", 0.75), wl, {}),
        ("GPU memory x2", spec, scaled("gpu", "memory_gib", 2.0), wl, {}),
        ("GPU bandwidth x2", spec, scaled("gpu", "bandwidth_gbps", 2.0), wl, {}),
        ("CPU bandwidth x0.5", spec, scaled("cpu", "bandwidth_gbps", 0.5), wl, {}),
        ("CPU memory x0.75", spec, scaled("cpu", "memory_gib", 0.75), wl, {}),
        ("generation of 32 tokens, not 128", spec, hw, R(wl, gen_len=32), {}),
    ]
    rows = ["| change | N | mu | r_w | HRM e2e tok/s | vs as profiled | bottleneck |", "|---|---|---|---|---|---|---|"]
    base = None
    for name, s, h, w, kw in variants:
        try:
            plan = optimize(s, h, w, **kw)
        except Exception as exc:  # noqa: BLE001 - an infeasible variant is a row that says so
            rows.append(f"| {name} | - | - | - | - | no policy fits ({type(exc).__name__}) | - |")
            continue
        p, e2e = plan.policy, plan.prediction.e2e_tok_s
        base = base or e2e
        rows.append(f"| {name} | {p.batch_size} | {p.micro_batch_size} | {p.expert_gpu_fraction:.3f} | {e2e:.1f} | "
                    f"{e2e / base:.2f}x | {plan.bottleneck} |")
    return "\n".join(rows)


def comparison_table(model: str, hardware: list[str], cases: list[tuple[str, int | None, bool]]) -> str:
    from moe_lightning.baselines.policies import choose_policy
    from moe_lightning.tasks.simulate import schedule_of
    from moe_lightning.tuner.optimizer import FFN_ON_GPU, optimize
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
                    plan = optimize(spec, hw, wl, placements=FFN_ON_GPU) if system == "cgopipe" else None
                    if plan is None and hw.gpu.count > 1:   # the baselines' schedules are one GPU's
                        raise ValueError(f"{system} has no several-GPU schedule")
                    policy = plan.policy if plan is not None else choose_policy(system, spec, hw, wl)
                    sim = simulate_run(spec, hw, wl, policy, schedule=schedule_of(system),
                                       max_decode_steps=default_max_decode_steps(wl, policy, spec),
                                       parallel=dataclasses.replace(plan.parallel, chunks=0) if plan else None)
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
    ap.add_argument("table", choices=["plans", "comparison", "padding", "sensitivity"])
    ap.add_argument("--model", default="mixtral-8x7b")
    ap.add_argument("--hardware", default="t4,l4")
    ap.add_argument("--workloads", default="mtbench,helm-synthetic-reasoning,helm-summarization")
    ap.add_argument("--no-simulate", action="store_true")
    args = ap.parse_args(argv)
    if args.table == "plans":
        print(plans_table(args.model, args.hardware.split(","), args.workloads.split(","), not args.no_simulate))
    elif args.table in ("padding", "sensitivity"):
        table = padding_terms_table if args.table == "padding" else sensitivity_table
        print(table(args.model, args.hardware.split(",")[0], args.workloads.split(",")[0]))
    else:
        print(comparison_table(args.model, args.hardware.split(","), PAPER_CASES))


if __name__ == "__main__":
    main(sys.argv[1:])
