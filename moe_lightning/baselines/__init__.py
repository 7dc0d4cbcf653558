"""Baselines on the same kernels and runtime as CGOPipe, plus Hugging Face accelerate as a real peer.

Each system is a config dataclass with the systems contract (`name`, `build(...) -> BatchRunner`, see
`moe_lightning.systems`) and `resolve_policy(spec, hardware, workload, given) -> Policy`:
with `policy_source=auto` (the default) the system picks its batching and placement the way its authors
do (`moe_lightning.baselines.policies`; the expert kernel stays `cfg.policy`'s, and a given batching or
placement is refused rather than ignored); with `given` it runs `cfg.policy` as is (the paper's ablation:
FlexGen's schedule with CGOPipe's policy).

The engine baselines run `CGOPipeRunner` with another `Schedule`
(`moe_lightning.baselines.schedules`): their differences from CGOPipe are the order and dependencies of
the same tasks, and the policy.
This module imports no torch; the heavy modules load in `build`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from moe_lightning.config import RULE_FIELDS, HardwareSpec, ModelSpec, Policy, Workload, _choice, ruled_policy
from moe_lightning.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from moe_lightning.engine.generation import BatchRunner
    from moe_lightning.engine.weights import WeightSource

POLICY_SOURCES = ("auto", "given")


class _Baseline:
    """Shared behaviour: policy resolution and the guard against running an unresolved `auto` policy."""

    name: str
    policy_source: str

    def __post_init__(self) -> None:
        _choice(self.policy_source, "system.policy_source", POLICY_SOURCES)

    def resolve_policy(self, spec: ModelSpec, hardware: HardwareSpec, workload: Workload, given: Policy,
                       lengths: Sequence[int] | None = None) -> Policy:
        """The policy this system runs: `given` with its batching and placement chosen by the system's own
        rule (`auto`; a given batching or placement is refused, not ignored), or `given` as is. `lengths`
        is not read: the baselines' rules plan every prompt at the workload's longest, as they pad."""
        if self.policy_source == "given":
            return given
        return ruled_policy(self._own_policy(spec, hardware, workload), given,
                            f"system.policy_source=auto ({self.name}'s own rule)",
                            "set system.policy_source=given to run the given policy")

    def _own_policy(self, spec: ModelSpec, hardware: HardwareSpec, workload: Workload) -> Policy:
        from moe_lightning.baselines.policies import choose_policy

        return choose_policy(self.name, spec, hardware, workload)

    def _check_resolved(self, spec: ModelSpec, hardware: HardwareSpec, workload: Workload, policy: Policy) -> None:
        if self.policy_source != "auto":
            return
        chosen = self._own_policy(spec, hardware, workload)
        if any(getattr(chosen, n) != getattr(policy, n) for n in RULE_FIELDS):
            from moe_lightning.baselines.policies import policy_summary

            raise ConfigError(
                f"system.policy_source=auto: {self.name} chooses its own policy ({policy_summary(chosen)}) but was "
                f"handed {policy_summary(policy)}; run it through task=compare (which resolves each system's "
                f"policy), or set system.policy_source=given to run the given policy")


@dataclass
class _EngineBaseline(_Baseline):
    def build(self, spec: ModelSpec, source: WeightSource, hardware: HardwareSpec, policy: Policy,
              workload: Workload, device: torch.device, trace: bool = False,
              prompt_lengths: Sequence[int] | None = None) -> BatchRunner:
        from moe_lightning.baselines.schedules import SCHEDULES
        from moe_lightning.engine.cgopipe import CGOPipeRunner

        self._check_resolved(spec, hardware, workload, policy)
        self._check_policy(policy)
        # The baselines keep their authors' dense KV cache (one tensor per micro-batch, padded as they pad).
        return CGOPipeRunner(spec, source, hardware, policy, workload, device, trace=trace,
                             schedule=SCHEDULES[self.name], kv_block_size=0, prompt_lengths=prompt_lengths)

    def _check_policy(self, policy: Policy) -> None:
        pass


@dataclass
class FlexGenSystem(_EngineBaseline):
    """FlexGen-style (S4): zig-zag block schedule, whole-layer weight loads, attention on the GPU with the
    KV cache streamed, synchronised after every step; policy from FlexGen's cost model and LP. A given
    policy with attention on the CPU runs FlexGen(c)'s schedule."""

    name: str = "flexgen"
    policy_source: str = "auto"


@dataclass
class FlexGenCSystem(_EngineBaseline):
    """FlexGen(c) (S3): FlexGen with attention on the CPU and serial dependencies (no look-ahead)."""

    name: str = "flexgen_c"
    policy_source: str = "auto"


@dataclass
class DeepSpeedSystem(_EngineBaseline):
    """DeepSpeed-ZeRO-Inference-style: every expert streamed layer by layer with one layer of prefetch,
    one micro-batch, the largest batch that fits, attention on the GPU."""

    name: str = "deepspeed"
    policy_source: str = "auto"

    def _check_policy(self, policy: Policy) -> None:
        if not policy.attn_on_gpu:
            raise ConfigError("policy.attn_on_gpu: system=deepspeed runs attention on the GPU (ZeRO-Inference has "
                              "no CPU attention); set policy.attn_on_gpu=true or system.policy_source=auto")


@dataclass
class FastDecodeSystem(_EngineBaseline):
    """FastDecode-like (S2): CPU attention overlapped with GPU compute (CGOPipe's order), weights not
    paged (the next layer loaded whole at the start of each layer)."""

    name: str = "fastdecode"
    policy_source: str = "auto"


@dataclass
class AccelerateSystem(_Baseline):
    """transformers + accelerate, `device_map="auto"` with `max_memory` from the same budget."""

    name: str = "accelerate"
    policy_source: str = "auto"

    def build(self, spec: ModelSpec, source: WeightSource, hardware: HardwareSpec, policy: Policy,
              workload: Workload, device: torch.device, trace: bool = False,
              prompt_lengths: Sequence[int] | None = None) -> BatchRunner:
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise ConfigError("system=accelerate needs accelerate: pip install 'moe-lightning[peers]'") from None
        from moe_lightning.baselines.accelerate_peer import AccelerateRunner

        self._check_resolved(spec, hardware, workload, policy)
        return AccelerateRunner(spec, source, hardware, policy, workload, device, trace=trace)


BASELINE_SYSTEMS: dict[str, type] = {"flexgen": FlexGenSystem, "flexgen_c": FlexGenCSystem,
                                     "deepspeed": DeepSpeedSystem, "fastdecode": FastDecodeSystem,
                                     "accelerate": AccelerateSystem}
