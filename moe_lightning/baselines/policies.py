"""How each system picks its policy when the user gives none, the way its authors do.

- cgopipe: the HRM optimizer (`moe_lightning.tuner.optimizer.optimize`), restricted to the placements
  the engine runs (the MoE FFN on the GPU);
- flexgen: FlexGen's own cost model, LP and search (`flexgen_policy`, a port of FlexGen's
  `cost_model.py` with MoE-Lightning's Mixtral adaptation), mapped onto the runtime with attention on
  the GPU (S4: CPU-resident KV streamed to the GPU);
- flexgen_c: the same search, mapped with attention on the CPU (FlexGen's `cpu_cache_compute`, S3);
- flexgen_moe, flexgen_moe_c: an MoE-aware variant of FlexGen's LP (`flexgen_moe_policy`: roofline
  terms on the profile's peaks, this engine's memory pools as constraints); not FlexGen's choice, kept
  to show how far a model of this runtime moves it;
- deepspeed: ZeRO-Inference: every expert streamed (r_w = 0), one layer of prefetch, one micro-batch
  (mu = N), attention on the GPU with the KV cache on the GPU if it fits, else streamed; the largest N
  (up to the number of requests) whose memory plan fits;
- fastdecode: the HRM optimizer restricted to CPU attention with unpaged weights (`pages_per_layer=1`):
  FastDecode sizes its batch to balance CPU attention against GPU compute, which is what HRM models;
- accelerate: `device_map="auto"` places weights itself; the one knob left to the user is the batch
  size: the largest N (up to the number of requests) whose KV cache and activations fit on the GPU
  beside the non-expert weights, the rest of the GPU budget going to `max_memory` for weights.

The FlexGen searches take seconds (thousands of small LPs), and a baseline resolves its policy more than
once per run, so their results are memoised on the inputs' values.
"""

from __future__ import annotations

from collections.abc import Sequence

from moe_lightning.baselines.flexgen_policy import last_true
from moe_lightning.config import HardwareSpec, ModelSpec, ParallelConfig, Policy, Workload
from moe_lightning.errors import ConfigError, MemoryBudgetError
from moe_lightning.memory import memory_plan


def choose_policy(system_name: str, spec: ModelSpec, hw: HardwareSpec, workload: Workload) -> Policy:
    chooser = CHOOSERS.get(system_name)
    if chooser is None:
        raise ConfigError(f"no automatic policy for system {system_name!r}; known: {', '.join(CHOOSERS)}")
    return chooser(spec, hw, workload)


def cgopipe_policy(spec: ModelSpec, hw: HardwareSpec, workload: Workload,
                   parallel: ParallelConfig | None = None, lengths: Sequence[int] | None = None,
                   paged_kv: bool = True) -> Policy:
    """The HRM plan on the placements CGOPipe runs; `parallel`: the T x E layout the run has (the
    machine's policy for it), None: the best layout for `hw`; `lengths`: the prompts' own lengths (a
    prompts file's: its KV cache and prefill as task=plan plans them), None: the workload's synthetic ones."""
    from moe_lightning.tuner.optimizer import FFN_ON_GPU, optimize

    return optimize(spec, hw, workload, placements=FFN_ON_GPU, parallel=parallel, lengths=lengths,
                    paged_kv=paged_kv).policy


def fastdecode_policy(spec: ModelSpec, hw: HardwareSpec, workload: Workload) -> Policy:
    from moe_lightning.tuner.optimizer import optimize

    return optimize(spec, hw, workload, placements=((False, True),), pages_per_layer=1, prefetch_depth=1,
                    paged_kv=False).policy


def flexgen_s4_policy(spec: ModelSpec, hw: HardwareSpec, workload: Workload) -> Policy:
    return _memo("flexgen", spec, hw, workload, attn_on_gpu=True)


def flexgen_c_policy(spec: ModelSpec, hw: HardwareSpec, workload: Workload) -> Policy:
    return _memo("flexgen", spec, hw, workload, attn_on_gpu=False)


def flexgen_moe_s4_policy(spec: ModelSpec, hw: HardwareSpec, workload: Workload) -> Policy:
    return _memo("flexgen_moe", spec, hw, workload, attn_on_gpu=True)


def flexgen_moe_c_policy(spec: ModelSpec, hw: HardwareSpec, workload: Workload) -> Policy:
    return _memo("flexgen_moe", spec, hw, workload, attn_on_gpu=False)


_SEARCHED: dict[str, Policy] = {}


def _memo(search: str, spec: ModelSpec, hw: HardwareSpec, workload: Workload, *, attn_on_gpu: bool) -> Policy:
    """The search's policy, memoised on the values of its inputs (the dataclasses are mutable, so their
    repr is the key, not their identity)."""
    key = repr((search, spec, hw, workload, attn_on_gpu))
    if key not in _SEARCHED:
        if search == "flexgen":
            from moe_lightning.baselines.flexgen_policy import flexgen_policy as run
        else:
            from moe_lightning.baselines.flexgen_moe_policy import flexgen_moe_policy as run
        _SEARCHED[key] = run(spec, hw, workload, attn_on_gpu=attn_on_gpu).policy
    return _SEARCHED[key]


def deepspeed_policy(spec: ModelSpec, hw: HardwareSpec, workload: Workload) -> Policy:
    def policy(n: int, r_c: float) -> Policy:
        return Policy(batch_size=n, micro_batch_size=n, attn_on_gpu=True, ffn_on_gpu=True, expert_gpu_fraction=0.0,
                      kv_gpu_fraction=r_c, pages_per_layer=1, prefetch_depth=1)

    def fits(n: int) -> Policy | None:
        for r_c in (1.0, 0.0):  # one micro-batch: its KV is on the GPU or it streams
            p = policy(n, r_c)
            if memory_plan(spec, p, workload).fits(hw):
                return p
        return None

    best = last_true(1, workload.num_requests, lambda n: fits(n) is not None)
    if best == 0:
        raise MemoryBudgetError("deepspeed: not even one sequence fits: "
                                + memory_plan(spec, policy(1, 0.0), workload).describe(hw))
    return fits(best)


def accelerate_reserve_bytes(spec: ModelSpec, workload: Workload, n: int) -> int:
    """GPU bytes accelerate's run needs beside the weights `max_memory` places: the KV cache of the whole
    batch (transformers keeps it on the execution device) and the activations (as the memory plan)."""
    p = Policy(batch_size=n, micro_batch_size=n, attn_on_gpu=True, kv_gpu_fraction=1.0)
    plan = memory_plan(spec, p, workload)
    kv = n * (workload.prompt_len_max + workload.gen_len) * spec.kv_bytes_per_token
    return kv + plan.gpu["activations"]


def accelerate_policy(spec: ModelSpec, hw: HardwareSpec, workload: Workload) -> Policy:
    room = hw.gpu_budget_bytes - spec.non_expert_params * spec.dtype_bytes
    best = last_true(1, workload.num_requests, lambda n: accelerate_reserve_bytes(spec, workload, n) <= room)
    if best == 0:
        raise MemoryBudgetError(f"accelerate: the KV cache and activations of one sequence "
                                f"({accelerate_reserve_bytes(spec, workload, 1)} B) and the non-expert weights "
                                f"do not fit the GPU budget ({hw.gpu_budget_bytes} B)")
    return Policy(batch_size=best, micro_batch_size=best, attn_on_gpu=True, kv_gpu_fraction=1.0)




CHOOSERS = {"cgopipe": cgopipe_policy, "flexgen": flexgen_s4_policy, "flexgen_c": flexgen_c_policy,
            "flexgen_moe": flexgen_moe_s4_policy, "flexgen_moe_c": flexgen_moe_c_policy,
            "deepspeed": deepspeed_policy, "fastdecode": fastdecode_policy, "accelerate": accelerate_policy}


def policy_summary(p: Policy) -> str:
    """One short line: N, mu, placement, r_w, r_c, pages."""
    return (f"N={p.batch_size} mu={p.micro_batch_size} attn={'gpu' if p.attn_on_gpu else 'cpu'} "
            f"r_w={p.expert_gpu_fraction:.3g} r_c={p.kv_gpu_fraction:.3g} pages={p.num_pages}")
