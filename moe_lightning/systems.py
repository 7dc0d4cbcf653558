"""One contract for every system (the engine and each baseline): a config dataclass and a factory that
returns a `BatchRunner` for the generation driver. Tasks own warm-up, timing and reports.

Each system's implementation lives in its own module and is imported only when it is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

# The baselines (FlexGen, FlexGen(c), DeepSpeed, FastDecode, accelerate): their configs live beside their
# schedules in moe_lightning.baselines, which imports only the ground floor.
from moe_lightning.baselines import BASELINE_SYSTEMS
from moe_lightning.config import (
    EXPERT_KERNELS,
    HardwareSpec,
    ModelSpec,
    Policy,
    Workload,
    _check,
    _choice,
    ruled_policy,
)
from moe_lightning.errors import ConfigError

if TYPE_CHECKING:   # torch is imported by what runs, not by the config schema (the CLI checks it first)
    import torch

    from moe_lightning.engine.generation import BatchRunner
    from moe_lightning.engine.weights import WeightSource


@dataclass
class ReferenceSystem:
    """Every weight on one device, the whole batch through each layer: the correctness anchor."""

    name: str = "reference"
    expert_kernel: str = "loop"

    def __post_init__(self) -> None:
        _choice(self.expert_kernel, "system.expert_kernel", EXPERT_KERNELS[1:])

    def build(self, spec: ModelSpec, source: WeightSource, hardware: HardwareSpec, policy: Policy,
              workload: Workload, device: torch.device, trace: bool = False,
              prompt_lengths: Sequence[int] | None = None) -> BatchRunner:
        from moe_lightning.engine.experts import KERNELS
        from moe_lightning.engine.parallel import current, eps_chunks
        from moe_lightning.engine.reference import ReferenceRunner

        ranks = current()   # tensor / expert parallel ranks (moe_lightning.launch), or None
        return ReferenceRunner(spec, source, device, KERNELS[self.expert_kernel], ranks=ranks,
                               chunks=eps_chunks(spec, hardware, ranks) if ranks else 1)


@dataclass
class CGOPipeSystem:
    """MoE-Lightning's engine: CPU attention two micro-batches ahead, paged expert weights streamed
    CPU -> pinned -> GPU, under the hardware profile's GPU memory budget. Knobs are in `policy`."""

    name: str = "cgopipe"
    policy_source: str = "given"    # given: cfg.policy as is; auto: batching and placement from the HRM plan
    kv_block_size: int = 16         # unpadded mode: the KV cache in blocks of this many tokens; 0: dense
    kv_cache_tokens: int = 0        # the KV cache's size in tokens; 0: the plan's (N x (avg prompt + gen_len))
    refill: bool = True             # unpadded mode: admit waiting requests as soon as others finish

    def __post_init__(self) -> None:
        _choice(self.policy_source, "system.policy_source", ("given", "auto"))
        _check(self.kv_block_size >= 0, "system.kv_block_size", f"must be >= 0, got {self.kv_block_size}")
        _check(self.kv_cache_tokens >= 0, "system.kv_cache_tokens", f"must be >= 0, got {self.kv_cache_tokens}")

    def resolve_policy(self, spec: ModelSpec, hardware: HardwareSpec, workload: Workload, given: Policy,
                       lengths: Sequence[int] | None = None) -> Policy:
        """`lengths`: the prompts' lengths in tokens (a prompts file's), planned as task=plan plans them."""
        if self.policy_source == "given":
            return given
        from moe_lightning.baselines.policies import cgopipe_policy
        from moe_lightning.config import ParallelConfig
        from moe_lightning.engine.parallel import current

        # On several ranks the plan is the machine's for this run's T x E (each group runs its share of it)
        ranks = current()
        split = ParallelConfig(tensor=ranks.tensor, expert=ranks.expert) if ranks is not None else None
        return ruled_policy(cgopipe_policy(spec, hardware, workload, parallel=split, lengths=lengths,
                                           paged_kv=paged_kv(self)), given,
                            "system.policy_source=auto (the HRM plan)",
                            "set system.policy_source=given to run the given policy")

    def build(self, spec: ModelSpec, source: WeightSource, hardware: HardwareSpec, policy: Policy,
              workload: Workload, device: torch.device, trace: bool = False,
              prompt_lengths: Sequence[int] | None = None) -> BatchRunner:
        from moe_lightning.engine.cgopipe import CGOPipeRunner
        from moe_lightning.engine.parallel import current, eps_chunks

        ranks = current()   # tensor / expert parallel ranks (moe_lightning.launch), or None
        return CGOPipeRunner(spec, source, hardware, policy, workload, device, trace=trace,
                             kv_block_size=self.kv_block_size, kv_tokens=self.kv_cache_tokens or None,
                             prompt_lengths=prompt_lengths, ranks=ranks,
                             chunks=eps_chunks(spec, hardware, ranks) if ranks else 1)


SYSTEM_CONFIGS: dict[str, type] = {"reference": ReferenceSystem, "cgopipe": CGOPipeSystem, **BASELINE_SYSTEMS}


# The policy fields a system's runner reads where it is not the engine's (CGOPipeRunner, which the engine
# baselines run too, reads them all): the reference runs every weight on one device with system.expert_kernel,
# accelerate places the model itself; both read only the batch size.
POLICY_FIELDS_READ = {"reference": ("batch_size",), "accelerate": ("batch_size",)}


def refuse_unread_policy_fields(system: str, given: list[str], instead: str | None = None) -> None:
    """A `policy.*` field given for a run of `system` that its runner never reads would be recorded in the run
    document as if it had run (r_w=0.5 beside the reference): refused in one line naming it, and saying
    `instead` beside dropping it (None: a run of cfg.system, whose own settings, system.*, can be given)."""
    read = POLICY_FIELDS_READ.get(system)
    unread = [f"policy.{name}" for name in given if read is not None and name not in read]
    if unread:
        kernel = "; its expert kernel is system.expert_kernel" if system == "reference" and instead is None else ""
        instead = instead or "run a placement of your own with system=cgopipe"
        it, they = ("them", "they") if len(unread) > 1 else ("it", "it")
        raise ConfigError(f"{', '.join(unread)}: system={system} does not read {it} (it reads policy."
                          f"{', policy.'.join(read)}{kernel}), so {they} would be ignored; drop {it}, or {instead}")


def paged_kv(system) -> bool:
    """Whether a system keeps the paged, admitted KV cache (CGOPipe's unpadded mode), which plans
    reserve at the average prompt (`memory.kv_cache_tokens`); every other system is planned dense."""
    return getattr(system, "name", "") == "cgopipe" and getattr(system, "kv_block_size", 0) > 0


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _check(name != "cuda" or torch.cuda.is_available(), "device", "cuda asked for but no CUDA device is visible")
    return torch.device(name)

