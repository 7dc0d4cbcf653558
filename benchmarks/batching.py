"""Admission, refill and padding side by side, on a workload of mixed prompt and generation lengths, under
one KV budget in tokens (`system.kv_cache_tokens`), in one run:

- unpadded + refill: the engine's default: Algorithm 2 admission against the paged KV cache; a
  finished request's blocks are refilled from the waiting queue at the next step;
- unpadded, no refill (`system.refill=false`): the paper's batches: Algorithm 2 admits a batch, and
  the next is admitted when all of it has finished;
- padded (`workload.padding=true`, MoE-Lightning(p)): every prompt padded to the longest and every
  request charged the longest generation, so the same budget holds fewer requests; static batches run
  until their last request is done.

Each request has its own `max_new_tokens` (in the prompts file), as a chat workload's answers differ in
length. The configurations run round-robin (A B C A B C ...) so the host's drift hits each alike; the
decode steps and prefill rounds are counts (identical every repeat), the times are measured medians
with their spread. Outputs must be identical across the three (greedy, fp32) and are checked.

    python benchmarks/batching.py [--requests 48] [--repeats 3] [--save]
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime as dt
import shutil
import tempfile
from pathlib import Path

import torch

from moe_lightning.bench_args import Parser, busy_warning, guard, nonnegative_int, positive_int
from moe_lightning.config import GpuSpec, HardwareSpec, Policy, Sampling, Workload
from moe_lightning.report import Spread, environment
from moe_lightning.run_config import RunConfig
from moe_lightning.tuner.presets import load_preset

RESULTS = Path(__file__).resolve().parent.parent / "results"
CONFIGS = {"unpadded+refill": (True, False), "unpadded": (False, False), "padded": (False, True)}


def write_prompts(path: Path, n: int, prompt_max: int, gen_max: int, vocab: int, seed: int) -> list[tuple[int, int]]:
    """Seeded prompts: log-normal lengths (a few long, many short, as chat prompts) and per-request
    generation budgets uniform in [2, gen_max]. -> [(prompt length, max_new_tokens)]."""
    g = torch.Generator().manual_seed(seed)
    lengths = (torch.exp(torch.randn(n, generator=g) * 0.9) * prompt_max / 6).round().clamp(1, prompt_max).long()
    budgets = torch.randint(2, gen_max + 1, (n,), generator=g)
    from moe_lightning.files import atomic_write, json_text

    rows, lines = [], []
    for i, (p, m) in enumerate(zip(lengths.tolist(), budgets.tolist())):
        ids = torch.randint(3, vocab, (p,), generator=g).tolist()
        lines.append(json_text({"id": i, "input_ids": ids, "max_new_tokens": m}) + "\n")
        rows.append((p, m))
    atomic_write(path, "".join(lines))
    return rows


def main() -> None:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mid-mixtral")
    p.add_argument("--layers", type=positive_int, default=2)
    p.add_argument("--requests", type=positive_int, default=48)
    p.add_argument("--batch", type=positive_int, default=16, help="policy.batch_size N (the most requests running)")
    p.add_argument("--micro-batch", type=positive_int, default=4)
    p.add_argument("--prompt-max", type=positive_int, default=256)
    p.add_argument("--gen-max", type=positive_int, default=48)
    p.add_argument("--kv-tokens", type=nonnegative_int, default=0,
                   help="the KV budget in tokens (default: N x (mean prompt + mean generation), rounded to blocks)")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--seed", type=nonnegative_int, default=5)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="the MoE FFN's device (attention stays on the CPU)")
    p.add_argument("--save", action="store_true")
    args = p.parse_args()
    if args.gen_max < 2:   # each request's budget is drawn from [2, gen-max]
        p.error(f"argument --gen-max: must be >= 2 (budgets are drawn from [2, gen-max]), got {args.gen_max}")

    from moe_lightning.files import write_json
    from moe_lightning.systems import CGOPipeSystem
    from moe_lightning.tasks.generate import GenerateTask, run_generation

    spec = dataclasses.replace(load_preset("model", args.model), num_layers=args.layers, dtype="float32")
    hardware = HardwareSpec(name="local", gpu=GpuSpec(memory_gib=64, shares_host=args.device == "cpu"))
    folder = Path(tempfile.mkdtemp(prefix="moe-lightning-batching-"))
    atexit.register(shutil.rmtree, folder, True)   # the prompts file is scratch: every run left one in /tmp
    prompts = folder / "prompts.jsonl"
    rows = write_prompts(prompts, args.requests, args.prompt_max, args.gen_max, spec.vocab_size, args.seed)
    mean = sum(a + b for a, b in rows) / len(rows)
    m = -(-args.batch // args.micro_batch)
    kv_tokens = args.kv_tokens or m * 16 * -(-round(args.batch * mean / m) // 16)
    longest = max(a for a, _ in rows) + args.gen_max
    kv_tokens = max(kv_tokens, m * 16 * -(-longest // 16))   # each micro-batch must hold the longest request
    policy = Policy(batch_size=args.batch, micro_batch_size=args.micro_batch, expert_gpu_fraction=0.25,
                    expert_kernel="loop")

    runs = {k: {"total_s": [], "tok_s": []} for k in CONFIGS}
    counts, outputs = {}, {}
    hosts: list[dict] = []   # each run's host load (the run report's), to say when others were busy
    for _ in range(args.repeats):
        for name, (refill, padded) in CONFIGS.items():
            workload = Workload(name="mixed", path=str(prompts), gen_len=args.gen_max, padding=padded)
            cfg = RunConfig(task=GenerateTask(progress=False),
                            system=CGOPipeSystem(kv_cache_tokens=kv_tokens, refill=refill),
                            model=spec, hardware=hardware, workload=workload, device=args.device, policy=policy,
                            sampling=Sampling(ignore_eos=True))
            gen = run_generation(cfg, progress=False, warmup_tokens=2)
            mt = gen.report.metrics
            runs[name]["total_s"].append(mt.prefill_s + mt.decode_s)
            runs[name]["tok_s"].append(mt.throughput_tok_s)
            counts[name] = gen.report.extra["batching"]
            outputs[name] = gen.output_ids
            hosts.append({"configuration": name, **gen.report.environment["host_load"]})
            threads = gen.report.environment["threads"]
    identical = all(o == outputs["unpadded+refill"] for o in outputs.values())
    spreads = {k: {m: Spread.of(v) for m, v in r.items()} for k, r in runs.items()}
    base = spreads["unpadded+refill"]["total_s"].median
    plens = [a for a, _ in rows]
    print(f"{spec.name} ({spec.num_layers} layers, fp32, 1/4 of experts resident), {args.requests} requests: prompts "
          f"{min(plens)}-{max(plens)} tokens (mean {sum(plens) / len(plens):.0f}), "
          f"max_new_tokens 2-{args.gen_max} (mean {sum(b for _, b in rows) / len(rows):.0f}); N={args.batch}, "
          f"mu={args.micro_batch}, KV budget {kv_tokens} tokens for all; measured on this host ({args.device}), "
          f"{args.repeats} round-robin repeats")
    print(f"{'configuration':<17}{'decode steps':>13}{'prefills':>9}{'running':>9}  {'time s (median ± stdev)':<34}"
          f"{'time / refill':>13}")
    for name in CONFIGS:
        c, t = counts[name], spreads[name]["total_s"]
        running = c.get("max_running", c.get("batch_size"))
        prefills = c.get("prefill_rounds", -(-args.requests // max(1, c.get("batch_size", 1))))
        print(f"{name:<17}{c['decode_steps']:>13}{prefills:>9}{running:>9}  {t.show('.2f'):<34}"
              f"{t.median / base:>13.2f}")
    print(f"outputs identical across configurations: {identical}")
    if warning := busy_warning(hosts):
        print(warning)
    steps_saved = counts["unpadded"]["decode_steps"] / counts["unpadded+refill"]["decode_steps"]
    padded_vs = spreads["padded"]["total_s"].median / spreads["unpadded"]["total_s"].median
    print(f"refill: {steps_saved:.2f}x fewer decode steps than without; padded takes {padded_vs:.2f}x the time of "
          f"unpadded (no refill) under the same budget, {spreads['padded']['total_s'].median / base:.2f}x with refill")
    if args.save:
        path = RESULTS / f"batching_{dt.datetime.now():%Y%m%d-%H%M%S}.json"
        write_json(path, {
            "benchmark": "batching", "kind": "measured", "where": f"this host ({args.device})",
            "model": dataclasses.asdict(spec),
            "args": vars(args), "kv_budget_tokens": kv_tokens, "policy": dataclasses.asdict(policy),
            "requests": [{"prompt_len": a, "max_new_tokens": b} for a, b in rows], "runs": runs, "batching": counts,
            "spread": {k: {m: s.to_dict() for m, s in v.items()} for k, v in spreads.items()},
            "outputs_identical": identical, "threads": threads, "host_load": hosts, "environment": environment()},
            indent=2)
        print(f"record: {path}")
    if not identical:
        raise SystemExit("outputs differ between configurations")


if __name__ == "__main__":
    raise SystemExit(guard(main))
