"""Several ranks over torch.distributed: tensor parallelism (T) and expert parallelism (E), T x E ranks.

Rank r is (e, t) = (r // T, r % T): a tensor group holds the T adjacent ranks of one e, an expert group
the E ranks of one t. Under tensor parallelism a rank holds 1/T of every layer's attention heads (and
KV heads: its share of the KV cache) and 1/T of each expert's, shared expert's and dense MLP's
intermediate dimension, column-parallel in and row-parallel out; the family's layer math sums the
row-parallel outputs with one all-reduce after the attention output projection and one after the MLP
(`Weights.reduce`). Under expert parallelism a rank holds E/num_experts of each layer's experts and
the MoE layer dispatches tokens to them (`expert_parallel.ep_moe`, EPS-MoE's pipelined all-to-all); each
expert group runs its own share of the requests (data-parallel attention, `engine.data_parallel`).
Embeddings, norms, routers and the LM head are replicated.

`init_ranks` joins the process group torchrun's (or the CLI's elastic launcher's, `moe_lightning.launch`)
environment describes; `current()` is this process's place in it, which the systems read when they
build. Both engines see their rank's share through one view of the weights (`RankSource`: its shards,
its experts, and `rank_spec`, the sizes its memory plan and pools are cut for) and run their layer
math with `local_spec` (its heads).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe_lightning.comm import CHUNK_LAUNCH_S, pipeline_chunks
from moe_lightning.config import HardwareSpec, ModelSpec, ParallelConfig
from moe_lightning.errors import ConfigError
from moe_lightning.models import Family
from moe_lightning.models.layers import split, split_halves

# A collective that waits longer than this means another rank has died: fail instead of hanging.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass
class Ranks:
    """This process's place among the T x E ranks, and the groups it belongs to."""

    tensor: int
    expert: int
    rank: int
    local_rank: int
    local_world: int
    backend: str
    chunks: int = 1              # EPS-MoE's pipeline: chunks per MoE layer (0: from the communication model)
    tp_group: object = None      # None when T = 1
    ep_group: object = None      # None when E = 1

    @property
    def world_size(self) -> int:
        return self.tensor * self.expert

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tensor

    @property
    def ep_rank(self) -> int:
        return self.rank // self.tensor

    def describe(self) -> dict:
        return {"tensor": self.tensor, "expert": self.expert, "world_size": self.world_size,
                "backend": self.backend, "layout": "rank = e * T + t"}

    def collective_device(self, device: torch.device) -> torch.device:
        """Where this backend's collectives take their tensors: the rank's GPU for NCCL, else the CPU."""
        return device if self.backend == "nccl" else torch.device("cpu")

    def broadcast(self, obj: object) -> object:
        """Rank 0's `obj`, on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: object) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


_current: Ranks | None = None


def current() -> Ranks | None:
    """This process's ranks, once `init_ranks` has joined them; None in a one-process run."""
    return _current


def backend_for(parallel: ParallelConfig, device: torch.device) -> str:
    if parallel.backend != "auto":
        return parallel.backend
    return "nccl" if device.type == "cuda" else "gloo"


def init_ranks(parallel: ParallelConfig, device: torch.device) -> Ranks:
    """Join the process group of torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT) and build
    the tensor and expert groups. Every rank calls it, with the same `parallel`."""
    global _current
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if world != parallel.world_size:
        raise ConfigError(f"parallel.tensor x parallel.expert = {parallel.world_size} ranks, but the launcher "
                          f"started {world} (torchrun --nproc-per-node x --nnodes must equal T x E)")
    backend = backend_for(parallel, device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    T, E = parallel.tensor, parallel.expert
    # Every rank creates every group, in the same order (new_group is a collective).
    tp = [dist.new_group([e * T + t for t in range(T)]) for e in range(E)] if T > 1 else [None] * E
    ep = [dist.new_group([e * T + t for e in range(E)]) for t in range(T)] if E > 1 else [None] * T
    _current = Ranks(tensor=T, expert=E, rank=rank, local_rank=int(os.environ.get("LOCAL_RANK", rank)),
                     local_world=int(os.environ.get("LOCAL_WORLD_SIZE", world)), backend=backend,
                     chunks=parallel.chunks,
                     tp_group=tp[rank // T], ep_group=ep[rank % T])
    return _current


def finish_ranks() -> None:
    global _current
    if dist.is_initialized():
        dist.destroy_process_group()
    _current = None


# ---- what a rank holds ------------------------------------------------------------------------------

def check_parallel(spec: ModelSpec, parallel: ParallelConfig, family: Family) -> None:
    """T and E against the model, one line each, before anything is loaded."""
    T = parallel.tensor
    if T > 1 and family.tensor_parallel is None:
        raise ConfigError(f"parallel.tensor={T}: the {spec.architecture} family has no tensor-parallel split; "
                          "use parallel.expert")
    problems = parallel.model_problems(spec)
    if problems:
        raise ConfigError("; ".join(problems) + ": choose a divisor")


def local_spec(spec: ModelSpec, ranks: Ranks) -> ModelSpec:
    """The spec a tensor rank's layer math runs with: its share of the attention heads."""
    if ranks.tensor == 1:
        return spec
    T = ranks.tensor
    return dataclasses.replace(spec, num_heads=spec.num_heads // T,
                               num_kv_heads=spec.num_kv_heads // T)


def shard_layer(lw, family: Family, spec: ModelSpec, ranks: Ranks):
    """This tensor rank's shards of a layer's non-expert weights (the family's rules for the whole
    model's `spec`), its row-parallel outputs summed over the tensor group."""
    if ranks.tensor == 1:
        return lw
    rules, values = family.tensor_parallel(spec), {}
    for f in dataclasses.fields(lw):
        value, rule = getattr(lw, f.name), rules.get(f.name)
        values[f.name] = value if value is None or rule is None else rule(value, ranks.tp_rank, ranks.tensor)
    out = type(lw)(**values)
    out.tp_group = ranks.tp_group
    return out


# A layer's stacked experts' shards: each expert's [gate | up] rows, and its down projection's columns.
_W13, _W2 = split_halves(1), split(2)


def eps_chunks(spec: ModelSpec, hardware: HardwareSpec, ranks: Ranks):
    """The expert pipeline's chunks per MoE layer: `parallel.chunks`, or with 0 EPS-MoE's count for each
    layer call's token count from the communication model on the profile's interconnect (latency,
    bandwidth) and its GPU peak; 1 (no pipeline) on a profile without an interconnect."""
    link = hardware.interconnect
    if ranks.chunks or ranks.expert == 1 or link.kind == "none" or link.bandwidth_gbps <= 0:
        return ranks.chunks or 1
    E, H, F = ranks.expert, spec.hidden_size, spec.intermediate_size // ranks.tensor

    def chunks_for(tokens: int) -> int:
        rows = -(-tokens // E) * spec.top_k     # (token, expert) pairs a rank sends, and about what it gets
        return pipeline_chunks(rows * H * spec.dtype_bytes * (E - 1) / E, rows * 6 * H * F,
                               latency_s=link.latency_us * 1e-6, bytes_per_s=link.bandwidth_gbps * 1e9,
                               launch_s=CHUNK_LAUNCH_S, flops_per_s=hardware.gpu.peak_tflops * 1e12)
    return chunks_for


def rank_spec(spec: ModelSpec, ranks: Ranks) -> ModelSpec:
    """The sizes of what one rank holds, for its memory plan, pools and kernel profile (its layer math
    runs with `local_spec`): 1/T of the heads and of every intermediate dimension, 1/E of the experts.
    Its routing fields only size the expert kernels' scratch, never route: one expert group, and top_k
    the router's even where it exceeds the rank's experts (the rows a rank's tokens send out, and about
    what it receives: `memory.expert_parallel_workspace`), as the plans' rank view keeps it."""
    if ranks.world_size == 1:
        return spec
    T, n = ranks.tensor, spec.num_experts // ranks.expert
    out = dataclasses.replace(local_spec(spec, ranks), intermediate_size=spec.intermediate_size // T,
                              shared_expert_size=spec.shared_expert_size // T,
                              dense_intermediate_size=spec.dense_intermediate_size // T, num_experts=n,
                              router_experts=spec.num_experts, top_k=min(spec.top_k, n), n_group=1, topk_group=1)
    out.top_k = spec.top_k   # past the spec's own check (top_k <= its experts), as `tuner.parallel` does
    return out


class RankSource:
    """A `WeightSource` as one rank sees it: `spec` is `rank_spec`'s, `layer` its tensor shards, and
    `expert(i, e)` its e-th expert (global id e + its expert group's offset) cut to its tensor share."""

    def __init__(self, source, spec: ModelSpec, ranks: Ranks):
        self.base, self.whole, self.ranks = source, spec, ranks
        self.spec, self.dtype, self.family = rank_spec(spec, ranks), source.dtype, source.family
        self.offset = ranks.ep_rank * (spec.num_experts // ranks.expert)
        problems = ParallelConfig(tensor=ranks.tensor, expert=ranks.expert).model_problems(spec)
        if problems:
            raise ConfigError("; ".join(problems))

    def embedding(self) -> torch.Tensor:
        return self.base.embedding()

    def final_norm(self) -> torch.Tensor:
        return self.base.final_norm()

    def lm_head(self) -> torch.Tensor:
        return self.base.lm_head()

    def layer(self, i: int):
        return shard_layer(self.base.layer(i), self.family, self.whole, self.ranks)

    def expert(self, i: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        w13, w2 = self.base.expert(i, self.offset + e)
        if self.ranks.tensor == 1:
            return w13, w2
        return _W13(w13[None], self.ranks.tp_rank, self.ranks.tensor)[0], \
            _W2(w2[None], self.ranks.tp_rank, self.ranks.tensor)[0]

    def expert_packed(self, i: int, e: int) -> tuple[torch.Tensor, ...]:
        return self.base.expert_packed(i, self.offset + e)

    def experts(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.expert(i, e) for e in range(self.spec.num_experts)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
