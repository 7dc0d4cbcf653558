"""CI regression benchmark: fixed, small, and judged by ratios measured side by side in one run.

It runs the reference engine and CGOPipe alternately (A B A B ...) on the same random mid-size model
and workload, checks that their tokens are identical, and compares the median throughput ratio
CGOPipe / reference (and the simulator's error against the measured CGOPipe run) with the values
committed in `results/ci/regression_reference.json`. Absolute tokens/s are recorded but never judged:
CI machines are noisy and shared; a ratio taken in one run is not.

    python benchmarks/regression.py            # compare with the committed reference, exit 1 on regression
    python benchmarks/regression.py --update   # rewrite the reference from this machine's run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

REFERENCE = Path(__file__).resolve().parent.parent / "results" / "ci" / "regression_reference.json"
TOLERANCE = 0.40   # a ratio may drop this much below the reference before it is a regression


def run(repeats: int) -> dict:
    import torch

    from moe_lightning.config import Policy, RunConfig, Sampling, Workload
    from moe_lightning.report import environment
    from moe_lightning.systems import CGOPipeSystem, ReferenceSystem
    from moe_lightning.tasks.generate import run_generation
    from moe_lightning.tuner.presets import load_preset
    from moe_lightning.tuner.simulator import simulate_run

    torch.set_num_threads(2)
    model = dataclasses.replace(load_preset("model", "mid-mixtral"), num_layers=2)
    workload = Workload(name="ci", prompt_len_avg=24, prompt_len_max=48, gen_len=8, num_requests=8, seed=3)
    policy = Policy(batch_size=8, micro_batch_size=2, expert_gpu_fraction=0.25, expert_kernel="loop")
    hardware = load_preset("hardware", "cpu")
    base = RunConfig(model=model, workload=workload, policy=policy, hardware=hardware, device="cpu",
                     sampling=Sampling(ignore_eos=True))
    tok_s: dict[str, list[float]] = {"reference": [], "cgopipe": []}
    outputs = {}
    for _ in range(repeats):
        for name, system in (("reference", ReferenceSystem()), ("cgopipe", CGOPipeSystem())):
            gen = run_generation(dataclasses.replace(base, system=system), progress=False, warmup_tokens=2)
            tok_s[name].append(gen.report.metrics.throughput_tok_s)
            outputs[name] = gen.output_ids
    sim = simulate_run(model, hardware, workload, policy)
    measured = statistics.median(tok_s["cgopipe"])
    return {
        "tokens_identical": outputs["reference"] == outputs["cgopipe"],
        "tok_s": {k: [round(x, 3) for x in v] for k, v in tok_s.items()},
        "ratio_cgopipe_over_reference": round(measured / statistics.median(tok_s["reference"]), 4),
        "sim_relative_error": round(abs(sim.throughput_tok_s - measured) / measured, 4),
        "environment": environment(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--update", action="store_true", help="write this run as the new reference")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    result = run(args.repeats)
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}, indent=1))
    if args.update:
        REFERENCE.parent.mkdir(parents=True, exist_ok=True)
        REFERENCE.write_text(json.dumps(result, indent=2) + "\n")
        print(f"reference written: {REFERENCE}")
        return 0
    ref = json.loads(REFERENCE.read_text())
    problems = []
    if not result["tokens_identical"]:
        problems.append("CGOPipe tokens differ from the reference engine")
    floor = ref["ratio_cgopipe_over_reference"] * (1 - TOLERANCE)
    if result["ratio_cgopipe_over_reference"] < floor:
        problems.append(f"CGOPipe/reference throughput ratio {result['ratio_cgopipe_over_reference']:.3f} < "
                        f"{floor:.3f} (reference {ref['ratio_cgopipe_over_reference']:.3f} - {TOLERANCE:.0%})")
    ceiling = max(ref["sim_relative_error"] * (1 + TOLERANCE), ref["sim_relative_error"] + 0.15)
    if result["sim_relative_error"] > ceiling:
        problems.append(f"simulated-vs-measured error {result['sim_relative_error']:.3f} > {ceiling:.3f}")
    for p in problems:
        print(f"REGRESSION: {p}")
    print("regression benchmark:", "FAILED" if problems else "ok",
          f"(ratio {result['ratio_cgopipe_over_reference']:.3f} vs reference "
          f"{ref['ratio_cgopipe_over_reference']:.3f}; "
          f"sim error {result['sim_relative_error']:.3f} vs {ref['sim_relative_error']:.3f})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
