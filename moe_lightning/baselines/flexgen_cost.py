"""FlexGen's cost model, term by term, with MoE-Lightning's Mixtral adaptation.

Sources (read, then rewritten here): `FMInference/FlexGen@19753bc:experimental/cost_model.py` (`solve_lp`)
and MoE-Lightning's port to Mixtral, `caoshiyi/artifacts@0e2dd65:benchmarks/flexgen/cost_models/
cost_model_8x7b_moe_{t4,l4}.py` and `cost_model_moe_t4_22b.py`. Symbols are FlexGen's: per layer `l`
layers, hidden `h1`, FFN `h2`, `nh` heads, prompt `s`, `n` generated tokens, `gbs` the GPU batch size,
`bls = gbs * num_gb` the block size; the placement percentages `wg, wc, wn` (weights), `cg, cc, cn` (KV
cache), `hg, hc, hn` (hidden states) on the GPU, the CPU and the disk ("n"). Every term is a latency
in seconds for one layer; bandwidths are bytes/s and FLOP rates FLOP/s.

Modelled, as the sources write it (MoE-Lightning's version where it differs from FlexGen's):
- layer weights `wi = 4 h1^2 + 4 h1^2 // g + 6 h1 h2 ne` bytes (q/o, k/v with GQA group `g = nh // nkvh`,
  and ALL `ne` experts: FlexGen's runtime moves the whole layer); `h_kv = h1 // g` replaces `h1` in the
  KV-cache transfer, home and CPU-peak terms; attention FLOPs keep `h1`;
- linear FLOPs per token `4 h1^2 + 4 h1 h_kv + 6 h1 h2` (one expert's `6 h1 h2`: the source's count,
  kept; the fitted constants absorb it);
- prefill `T_pre >= ctog + dtoc`, `>= gtoc + ctod`, `>= comp`; decode `T_gen >= ctog + max(gtoc, dtoc,
  ctod, comp)` (the code's form; the paper's max-of-all is commented out there);
  `T = l T_pre + (n - 1) l T_gen`, throughput `bls n / T` (prefill included);
- KV on the CPU is attended by the CPU (`cpu_flops_real`, corrected for small `gbs` and `h1`); no term
  moves CPU-resident KV to the GPU (FlexGen's policy hard-codes `cpu_cache_compute=True`);
- MoE-Lightning also applies the `gbs` correction to `mm_flops_p/g` (`Constants.correct_mm`);
- memory: FlexGen's peak GPU (prefill, decode), CPU (prefill, decode) and disk bytes, each against
  `alpha = 0.8` of the device (FlexGen's relaxation), the working sets summed as in the code.

Deliberate differences from the sources:
- every byte count carries `B = dtype_bytes / 2` (FlexGen writes fp16's 2 bytes into its literals), so
  a float32 model is sized as float32; at fp16/bf16 `B = 1` and the terms are the sources' exactly;
- capacities are the hardware profile's (GiB, as FlexGen's own `GB = 2**30` CLI sizes) times `alpha`;
- experts stored as MXFP4 (gpt-oss) are counted at the bytes they are held in on the CPU and cross the
  link at, 4.25 bits a weight (`ModelSpec.expert_stream_bytes`; `Shape.expert_b`): FlexGen has no
  quantized weights of this kind. The GPU holds resident experts dequantized, which this undercounts;
  the policy search then checks every placement against the engine's own pools.
Not modelled (as in FlexGen's model): kernel launches and per-task overheads, the CPU->pinned staging
copy, router and norm weights, embeddings and the LM head, expert load imbalance, KV growth beyond
its average `s + n / 2`, and (for attention on the GPU) streaming CPU-resident KV to the GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from moe_lightning.config import GiB, HardwareSpec, ModelSpec, Workload

FLEXGEN_GB = 2 ** 30   # FlexGen's `flexgen.utils.GB`: its fitted bandwidths are in GiB/s
FLEXGEN_T = 1e12       # `flexgen.utils.T`
ALPHA = 0.8            # FlexGen's alpha_g = alpha_c = alpha_n


@dataclass(frozen=True)
class Shape:
    """FlexGen's `CostModelConfig` model/workload fields, plus the batch of one LP."""

    s: int
    n: int
    l: int  # noqa: E741 (FlexGen's name)
    h1: int
    h2: int
    nh: int
    nkvh: int
    ne: int
    gbs: int
    bls: int
    dtype_bytes: int = 2
    expert_b: float | None = None   # an expert's bytes per weight over 2, where not the dtype's (MXFP4)

    @property
    def g(self) -> int:
        return self.nh // self.nkvh

    @property
    def h_kv(self) -> int:
        return self.h1 // self.g

    @property
    def b(self) -> float:
        """Bytes per element over FlexGen's 2 (fp16)."""
        return self.dtype_bytes / 2

    @cached_property
    def wi(self) -> float:
        """One layer's weights in bytes: attention and every expert."""
        expert_b = self.b if self.expert_b is None else self.expert_b
        return self.b * (4 * self.h1 ** 2 + 4 * self.h1 ** 2 // self.g) + expert_b * 6 * self.h1 * self.h2 * self.ne


def shape_of(spec: ModelSpec, workload: Workload, gbs: int, bls: int) -> Shape:
    """`s` is the longest prompt when the workload pads (FlexGen pads a block to it), else the average."""
    s = workload.prompt_len_max if workload.padding else workload.prompt_len_avg
    return Shape(s=s, n=workload.gen_len, l=spec.num_layers, h1=spec.hidden_size, h2=spec.intermediate_size,
                 nh=spec.num_heads, nkvh=spec.num_kv_heads, ne=spec.num_experts, gbs=gbs, bls=bls,
                 dtype_bytes=spec.dtype_bytes,
                 expert_b=spec.expert_stream_bytes / (2 * spec.expert_params)
                 if spec.expert_stream_bytes != spec.expert_bytes else None)


@dataclass(frozen=True)
class Percents:
    """FlexGen's placement (fractions, not percent); the disk share is what GPU and CPU leave."""

    wg: float
    wc: float
    cg: float
    cc: float
    hg: float
    hc: float

    @classmethod
    def gpu_cpu(cls, wg: float, cg: float, hg: float) -> Percents:
        """No disk tier: the CPU holds the rest."""
        return cls(wg=wg, wc=1 - wg, cg=cg, cc=1 - cg, hg=hg, hc=1 - hg)

    @property
    def wn(self) -> float:
        return 1 - self.wg - self.wc

    @property
    def cn(self) -> float:
        return 1 - self.cg - self.cc

    @property
    def hn(self) -> float:
        return 1 - self.hg - self.hc


@dataclass(frozen=True)
class Constants:
    """FlexGen's hardware constants (`CostModelConfig`): bandwidths in bytes/s, FLOP rates in FLOP/s."""

    name: str
    ctog_bdw: float
    gtoc_bdw_cache: float
    gtoc_bdw_hidden: float
    dtoc_bdw: float
    ctod_bdw_cache_p: float
    ctod_bdw_hidden_p: float
    ctod_bdw_g: float
    mm_flops_p: float
    mm_flops_g: float
    bmm_flops_p: float
    bmm_flops_g: float
    cpu_flops: float
    c1: float = 0.0
    c2: float = 0.0
    c3: float = 0.0
    correct_mm: bool = False   # MoE-Lightning: the gbs correction also scales mm_flops_p/g


def gbs_factor(k: Constants, gbs: int, h1: int) -> float:
    """FlexGen's `cpu_flops_real / cpu_flops`: small GPU batches and narrow models run slower."""
    a = max(0.0, math.log2(64 / gbs))
    bh = max(0.0, math.log2(4096 / h1))
    return max(0.1, 1 + k.c1 * a * bh - k.c2 * a - k.c3 * bh)


def cpu_flops_real(x: Shape, k: Constants) -> float:
    return k.cpu_flops * gbs_factor(k, x.gbs, x.h1)


def _mm(x: Shape, k: Constants, flops: float) -> float:
    return flops * gbs_factor(k, x.gbs, x.h1) if k.correct_mm else flops


# ---- prefill, per layer -----------------------------------------------------------------------------

def ctog_p(x: Shape, k: Constants, p: Percents) -> float:
    return (x.wi * (p.wc + p.wn) + x.b * 2 * x.s * x.h1 * x.bls * (p.hc + p.hn)) / k.ctog_bdw


def gtoc_p(x: Shape, k: Constants, p: Percents) -> float:
    return (x.b * 4 * (x.s + 1) * x.h_kv * x.bls * (p.cc + p.cn) / k.gtoc_bdw_cache
            + x.b * 2 * x.s * x.h1 * x.bls * (p.hc + p.hn) / k.gtoc_bdw_hidden)


def dtoc_p(x: Shape, k: Constants, p: Percents) -> float:
    return (x.wi * p.wn + x.b * 2 * x.s * x.h1 * x.bls * p.hn) / k.dtoc_bdw


def ctod_p(x: Shape, k: Constants, p: Percents) -> float:
    return (x.b * 4 * x.bls * (x.s + 1) * x.h_kv * p.cn / k.ctod_bdw_cache_p
            + x.b * 2 * x.s * x.h1 * x.bls * p.hn / k.ctod_bdw_hidden_p)


def comp_p(x: Shape, k: Constants, p: Percents) -> float:
    s, h1 = x.s, x.h1
    linear = x.bls * (4 * s * h1 ** 2 + 4 * s * h1 * x.h_kv + 6 * s * h1 * x.h2)
    return linear / _mm(x, k, k.mm_flops_p) + 4 * x.bls * s ** 2 * h1 / k.bmm_flops_p


# ---- decode, per layer and token --------------------------------------------------------------------

def ctog_g(x: Shape, k: Constants, p: Percents) -> float:
    return (x.wi * (p.wc + p.wn) + x.b * 2 * x.h1 * x.bls * (p.hc + p.hn)) / k.ctog_bdw


def gtoc_g(x: Shape, k: Constants, p: Percents) -> float:
    return x.b * 2 * x.h1 * x.bls * (p.hc + p.hn) / k.gtoc_bdw_hidden


def dtoc_g(x: Shape, k: Constants, p: Percents) -> float:
    return ((x.b * 4 * x.bls * (x.s + x.n / 2) * x.h_kv * p.cn + x.b * 2 * x.h1 * x.bls * p.hn) / k.dtoc_bdw
            + x.wi * p.wn / (k.dtoc_bdw * 0.95))


def ctod_g(x: Shape, k: Constants, p: Percents) -> float:
    return (x.b * 4 * x.bls * x.h_kv * p.cn + x.b * 2 * x.h1 * x.bls * p.hn) / k.ctod_bdw_g


def comp_g(x: Shape, k: Constants, p: Percents) -> float:
    h1, ctx = x.h1, x.s + x.n / 2
    linear = x.bls * (4 * h1 ** 2 + 4 * h1 * x.h_kv + 6 * h1 * x.h2)
    return (linear / _mm(x, k, k.mm_flops_g)
            + 4 * x.bls * ctx * h1 * p.cg / k.bmm_flops_g
            + 4 * x.bls * ctx * h1 * (p.cc + p.cn) / cpu_flops_real(x, k))


# The combination, once for the LP and the evaluation: T_pre >= the sum of each group; T_gen >= ctog_g
# plus each of the rest (I/O of the next layer is issued at k = 0 and waited for within the step).
PREFILL_GROUPS = ((ctog_p, dtoc_p), (gtoc_p, ctod_p), (comp_p,))
DECODE_LOAD = ctog_g
DECODE_REST = (gtoc_g, dtoc_g, ctod_g, comp_g)


def t_pre(x: Shape, k: Constants, p: Percents) -> float:
    return max(sum(f(x, k, p) for f in group) for group in PREFILL_GROUPS)


def t_gen(x: Shape, k: Constants, p: Percents) -> float:
    return DECODE_LOAD(x, k, p) + max(f(x, k, p) for f in DECODE_REST)


def latency_s(x: Shape, k: Constants, p: Percents) -> float:
    """FlexGen's `T = Tpre * l + Tgen * (n - 1) * l`."""
    return t_pre(x, k, p) * x.l + t_gen(x, k, p) * (x.n - 1) * x.l


def throughput_tok_s(x: Shape, k: Constants, p: Percents) -> float:
    return x.bls * x.n / latency_s(x, k, p)


# ---- peak memory, bytes -----------------------------------------------------------------------------

def gpu_peak_p(x: Shape, p: Percents) -> float:
    s, h1, gbs, b = x.s, x.h1, x.gbs, x.b
    home = x.wi * x.l * p.wg + b * 2 * s * h1 * x.bls * p.hg + b * 4 * (s + x.n) * x.h_kv * x.bls * x.l * p.cg
    inter = b * (8 * gbs * s * h1 + gbs * (2 * s * h1 + 2 * x.nh * s ** 2) + gbs * 2 * s * h1
                 + 4 * gbs * s * h1 + 2 * gbs * s * x.h2 + 2 * gbs * s * h1)
    working = 2 * x.wi * (1 - p.wg) + b * 2 * s * h1 * gbs * (1 - p.hg) + inter
    return home + working


def gpu_peak_g(x: Shape, p: Percents) -> float:
    h1, gbs, b, sn = x.h1, x.gbs, x.b, x.s + x.n
    home = x.wi * x.l * p.wg + b * 2 * h1 * x.bls * p.hg + b * 4 * sn * x.h_kv * x.bls * x.l * p.cg
    inter = b * (8 * gbs * h1 + gbs * (2 * h1 + 2 * sn * h1 + 2 * x.nh * sn) * p.cg
                 + gbs * (2 * sn * h1 + 2 * h1) * p.cg + 4 * gbs * h1 + 2 * gbs * x.h2 + 2 * gbs * h1)
    working = 2 * x.wi * (1 - p.wg) + b * 2 * h1 * gbs * (1 - p.hg) + b * 2 * 2 * gbs * sn * h1 * p.cg + inter
    return home + working


def cpu_peak_p(x: Shape, p: Percents) -> float:
    s, h1, b = x.s, x.h1, x.b
    home = x.wi * x.l * p.wc + b * 2 * s * h1 * x.bls * p.hc + b * 4 * s * x.h_kv * x.bls * x.l * p.cc
    return home + x.wi * (1 - p.wg) + b * 2 * s * h1 * x.gbs * (1 - p.hg)


def cpu_peak_g(x: Shape, p: Percents) -> float:
    h1, gbs, b, sn = x.h1, x.gbs, x.b, x.s + x.n
    home = x.wi * x.l * p.wc + b * 2 * h1 * x.bls * p.hc + b * 4 * sn * x.h_kv * x.bls * x.l * p.cc
    working = (x.wi * p.wn + b * 4 * h1 * gbs * p.hn + b * 8 * sn * x.h_kv * gbs * p.cn
               + b * 2 * x.nh * sn * gbs + b * 2 * h1 * gbs)
    return home + working


def disk_peak(x: Shape, p: Percents) -> float:
    return (x.wi * x.l * p.wn + x.b * 2 * x.s * x.h1 * x.bls * p.hn
            + x.b * 4 * (x.s + x.n) * x.h_kv * x.bls * x.l * p.cn)


def capacities(hw: HardwareSpec) -> tuple[float, float]:
    """(GPU, CPU) bytes FlexGen's constraints allow: `alpha` of the profile's memory (over all GPUs)."""
    return ALPHA * hw.gpu.memory_gib * GiB * hw.gpu.count, ALPHA * hw.cpu.memory_gib * GiB
