"""CPU GQA decode attention over a token-granular paged KV cache, read in place.

    out = paged_decode_attention(q, k_pool, v_pool, block_table, context_lens, scale, sinks=None, window=None)

- q [B, n_heads, head_dim] fp32/bf16/fp16 -> out [B, n_heads, v_dim], q's dtype.
- k_pool [num_blocks, n_kv_heads, block_size, head_dim], v_pool the same with v_dim (= head_dim but
  under multi-head latent attention, whose V is a view of K's first v_dim values), fp32/bf16/fp16.
  The compiled kernel takes v_dim = head_dim and contiguous pools; the rest runs the fallback.
- block_table int32 [B, max_blocks_per_seq]: token t of sequence b is row t % block_size of block
  block_table[b, t // block_size]. context_lens int32 [B], each >= 1: the query attends to all of its
  sequence's tokens, the new token's K/V already appended. Entries past a sequence's last block are
  never read (any value).
- gpt-oss: `window` (a sliding layer) reads only each sequence's last `window` tokens: the entries
  before the window's first block are never read either; `sinks` [Hq] fp32 adds exp(sink - max) to each
  head's softmax denominator (an extra key column with no value), once, after a split context's parts
  merge.
- GQA: n_heads = group * n_kv_heads; query head h*group + g reads kv head h.

Layout. The pool keeps one (block, kv head) chunk contiguous: block_size rows of head_dim (4 KiB at
block_size 16, bf16, head_dim 128); K and V are separate pools. A (sequence, kv head) pass reads its
chunks in table order, each a unit-stride run. K stays row-major (not transposed as in vLLM's
[D/x, block, x] layout): a transposed K needs block_size to be a multiple of the vector width and a
strided store on every decode append; the scores' horizontal sums are instead folded into one
transposing add tree per tile (below), and any block size, 1 included, runs the same code.

Kernel (C++, `csrc/paged_attention.cpp`, at::vec::Vectorized<float> plus AVX-512 intrinsics where
compiled):
- Work unit = one (sequence, kv head) with all `group` query heads, so each K/V row is read once and
  used `group` times. Groups 1, 4 and 8 have compiled kernels; 2-3 run as 4 and 5-7 as 8, with zero
  query heads whose outputs are discarded. head_dim 16 (the tiny test model), 64 and 128 are
  compiled; other shapes run the fallback. (Each combination costs build time.)
- Tiles of VL tokens (VL = fp32 lanes: 16 with AVX-512, 8 with AVX2), their rows found through the
  block table. Scores: each K row is loaded once and dotted with every query head: bf16 q and bf16 K
  by vdpbf16ps (exact bf16 products, fp32 sums; AVX512-BF16 CPUs), otherwise FMAs on K widened to fp32
  (bf16: even/odd halves by a shift and a mask, no shuffle; fp16: vcvtph2ps; scale folded into q). The
  VL x group partial dot vectors are summed by a transposing add tree into one score vector per head.
  Online softmax: per head the tile's max, one vector exp (at::vec exp_u20) for every head's rescale
  factor, running sums kept lane-wise. Then acc = alpha * acc + P @ V, one load of columns at a time
  with its accumulators in registers (compile-time unrolled). fp32 accumulation throughout; the output
  is rounded once to q's dtype. Opt-in `p_bf16=True` (bf16 q and pools): P rounded to bf16 and P @ V
  by vdpbf16ps too (FlashAttention's trade; bound stated on `paged_decode_attention`).
- Memory: the rows four tiles ahead are prefetched into L2, every line, spread over the whole tile
  (K's lines during the scores, V's during P @ V, one future row per row computed) and on into the
  next unit the thread has already claimed. The blocks lie anywhere in the pool, so without it each
  4 KiB chunk starts cold; prefetching in bursts (all during the scores) left the memory idle during
  P @ V. (2 threads, bf16, side by side: no prefetch 7-10 GB/s; spreading the prefetches +55% over
  bursts; carrying them into the next unit +5-40%, most for short contexts.)
- Parallel split: units are sorted longest first and handed out by an atomic counter inside one
  at::parallel_for, with the calling thread's torch intra-op thread count (set per worker by
  `moe_lightning.threads`; the kernel never sets it). When a context is longer than a target share of
  the work (total tokens x kv heads / (4 x threads), at least 512 tokens), it is split into several
  units (flash-decoding) whose fp32 partials (acc, max, sum) are merged afterwards; so a small batch
  still keeps every thread busy.
- Nothing is allocated per call except the output, the unit list and (only when a context is split)
  the partials: scratch lives on each thread's stack. The call releases the GIL (a torch op, not a
  pybind11 binding).

What bounds it on 2 shared Zen 4 vCPUs (`benchmarks/cpu_attention.py`, results/cpu_attention_*.json):
the arithmetic per byte, on too few cores. Mixtral's group of 4 needs 2 x 4 x 128 multiply-adds per
K+V row pair (512 bytes in bf16): 64 cycles of a core that does one 16-lane FMA per cycle, i.e. at most
27 GB/s per core at 3.4 GHz before the softmax. One core runs the cache-resident kernel at 15-28 GB/s
(fp16 slowest, fp32 fastest: half the arithmetic per byte), about what one core can read from memory
(21-26 GB/s), and in memory it reaches 9-15 GB/s: the memory waits and the arithmetic still partly add
up. Two cores give 15-25 GB/s, while this VM's memcpy drifted between 22 and 37 GB/s from one minute
to the next (shared DRAM), so the ratio came out between 0.45 and 0.97, around 0.7. With more cores
per memory channel (the 16-core GPU host) the same kernel should be memory-bound.

Build: JIT (torch.utils.cpp_extension.load with ninja) on first use, once per process under a lock,
into `<MOE_LIGHTNING_CACHE>/torch_extensions/<name>`; the name hashes the source, the flags, torch's
version and this CPU's instruction set, so a cache shared between machines never loads a binary built
for another CPU. Flags: -O3 -march=native (x86) -fopenmp, and CPU_CAPABILITY_AVX512/AVX2 matching
torch's own detected capability so at::vec uses the same vector width as torch. The ops register with
TORCH_LIBRARY (torch.ops.<name>.*), so the build compiles ATen's headers only (torch/extension.h alone
took 25 s of it); about 20-35 s on 2 vCPUs. If the build fails (no compiler), a pure-PyTorch fallback
with the same semantics runs, with one warning.
`MOE_LIGHTNING_CPU_ATTENTION=torch` forces the fallback; `=cpp` makes a failed build an error.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import torch

from moe_lightning.memory import paged_attention_chunk

log = logging.getLogger("moe_lightning.kernels")

ENV = "MOE_LIGHTNING_CPU_ATTENTION"   # auto (default) | cpp | torch
SOURCE = Path(__file__).resolve().parent / "csrc" / "paged_attention.cpp"
_lock = threading.Lock()
_state: dict[str, object] = {}        # "ext": module or None, "error": str, "build_s": float


def _mode() -> str:
    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "cpp", "torch"):
        raise ValueError(f"{ENV}={mode!r}: expected auto, cpp or torch")
    return mode


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build_flags() -> tuple[list[str], str]:
    cap = torch.backends.cpu.get_cpu_capability()
    flags = ["-O3", "-fopenmp", "-ffp-contract=fast"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-march=native")
        if cap == "AVX512":
            flags += ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
                      "-mavx512dq", "-mfma", "-mf16c"]
        elif cap == "AVX2":
            flags += ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"]
    return flags, cap


def _ensure_ninja() -> None:
    """torch runs `ninja` from PATH; a venv used without activation has it only in its bin folder."""
    if shutil.which("ninja"):
        return
    try:
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass


def _build() -> Any:
    """Load this machine's build of the kernel, building it first when there is none. torch's own build
    guard (`cpp_extension.load`'s FileBaton) is a `lock` file that every loading process creates and
    deletes, even with the library already built; a process killed in that window (Ctrl-C during start-up,
    a killed trial) leaves the file behind, and every later process waits for it forever. So a built
    library is loaded directly (its folder's name hashes the source, flags, torch and CPU), and a build
    runs under an fcntl lock of ours, which the kernel releases when its holder dies; under it, any `lock`
    file left in the folder is stale and removed."""
    import fcntl

    from torch.utils import cpp_extension

    from moe_lightning.engine.tiny import cache_dir

    flags, cap = _build_flags()
    key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(flags), torch.__version__, cap,
                                    _cpu_flags()]).encode()).hexdigest()[:12]
    name = f"moe_lightning_paged_attention_{key}"
    folder = cache_dir() / "torch_extensions" / name
    library = folder / f"{name}.so"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{name}.build-lock", "a+") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)   # released by close, or by the kernel if this process dies
        for attempt in (0, 1):
            folder.mkdir(parents=True, exist_ok=True)
            try:
                if library.is_file():
                    torch.ops.load_library(str(library))
                else:
                    (folder / "lock").unlink(missing_ok=True)   # torch's, from a process killed mid-load
                    _ensure_ninja()
                    cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=flags,
                                       extra_ldflags=["-fopenmp"], build_directory=str(folder),
                                       is_python_module=False, verbose=False)
                return getattr(torch.ops, name)   # the ops the library registered (torch.ops.<name>.<op>)
            except OSError:   # a corrupt or half-written binary from an earlier run: build it again, once
                if attempt:
                    raise
                log.warning("CPU attention extension in %s would not load: rebuilding it", folder)
                shutil.rmtree(folder, ignore_errors=True)
    raise AssertionError("unreachable")


def load_extension(required: bool = False) -> Any:
    """The compiled kernel's ops (`.paged_decode_attention(...)`, `.supported(...)`, ...), built on first
    use, at most once per process; None when it cannot be built (one warning). `required` raises instead."""
    if "ext" not in _state:
        with _lock:
            if "ext" not in _state:
                ext, error, t0 = None, None, time.perf_counter()
                try:
                    ext = _build()
                except Exception as exc:   # no compiler, no ninja, a compile error: the fallback runs
                    error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
                _state.update(ext=ext, error=error, build_s=time.perf_counter() - t0)
                if ext is None:
                    log.warning("CPU paged attention: the C++ extension did not build (%s); using the PyTorch "
                                "fallback (slower)", error)
                elif _state["build_s"] > 1:   # built now, not loaded from the cache: say why start-up took long
                    log.info("CPU paged attention kernel built in %.1f s (once per machine)", _state["build_s"])
    if _state["ext"] is None and required:
        raise RuntimeError(f"the CPU attention extension did not build: {_state['error']}")
    return _state["ext"]   # type: ignore[return-value]


def backend(n_heads: int = 32, n_kv_heads: int = 8, head_dim: int = 128, v_dim: int | None = None) -> str:
    """'cpp' or 'torch': what `paged_decode_attention` runs for these heads in this process."""
    mode = _mode()
    if mode == "torch" or (v_dim is not None and v_dim != head_dim):
        return "torch"
    ext = load_extension(required=mode == "cpp")
    return "cpp" if ext is not None and ext.supported(n_heads, n_kv_heads, head_dim) else "torch"


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, *, p_bf16: bool = False,
                           sinks: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
    """Decode attention of one new token per sequence over its paged context (see the module docstring).

    `p_bf16` (opt-in, bf16 q and pools on a CPU with AVX512-BF16, else ignored): the softmax weights are
    rounded to bf16 for P @ V (as FlashAttention does on GPUs), halving that product's instructions; the
    output then differs from exact by at most 2^-8 * max|V| more (measured on N(0, 1) data: about a
    tenth of that bound beyond the output's own bf16 rounding). In exchange, 15-20% more GB/s when
    measured side by side on 2 Zen 4 vCPUs.

    `sinks` [Hq] (attention-sink logits in the scaled scores' units: an extra key column per head that
    takes probability mass and carries no value) and `window` (attend only the last `window` tokens; the
    blocks before them are never read, so a sliding layer costs its window, not its context) run in both
    the compiled kernel and the fallback."""
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 (None: no window), got {window}")
    if (q.device.type == "cpu" and backend(q.shape[1], k_pool.shape[1], q.shape[2], v_pool.shape[3]) == "cpp"
            and k_pool.is_contiguous() and v_pool.is_contiguous()):
        return load_extension().paged_decode_attention(q, k_pool, v_pool, block_table, context_lens, float(scale),
                                                       p_bf16, window or 0, sinks)
    return paged_decode_attention_torch(q, k_pool, v_pool, block_table, context_lens, scale, sinks, window)


def _check(q, k_pool, v_pool, block_table, context_lens, window: int | None = None) -> list[int]:
    """The shapes, and the block ids each sequence reads: two host syncs whatever the batch (one per
    sequence made a CUDA decode step wait on the device hundreds of times)."""
    if (q.dim() != 3 or k_pool.dim() != 4 or v_pool.dim() != 4 or k_pool.shape[:3] != v_pool.shape[:3]
            or k_pool.dtype != v_pool.dtype):
        raise ValueError("q [B, Hq, D]; k_pool [num_blocks, Hkv, block_size, D] and v_pool [.., Dv] of one dtype")
    B, Hq, D = q.shape
    NB, Hkv, BS, _ = k_pool.shape
    if k_pool.shape[3] != D or Hq % Hkv:
        raise ValueError(f"heads {Hq} / kv heads {Hkv} / head_dim {D} vs pool {tuple(k_pool.shape)}")
    if block_table.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError("block_table and context_lens must be int32")
    if block_table.dim() != 2 or block_table.shape[0] != B or context_lens.numel() != B:
        raise ValueError("block_table [B, max_blocks] and context_lens [B]")
    lens = context_lens.tolist()
    cap = block_table.shape[1] * BS
    for b, n in enumerate(lens):
        if not 1 <= n <= cap:
            raise ValueError(f"context_lens[{b}]={n} outside [1, {cap}]")
    if B:
        first, last = _block_span(lens, window, BS)
        dev = block_table.device
        col = torch.arange(block_table.shape[1], device=dev)
        read = (col >= torch.tensor(first, device=dev)[:, None]) & (col < torch.tensor(last, device=dev)[:, None])
        bad = read & ((block_table < 0) | (block_table >= NB))
        if bool(bad.any()):
            raise ValueError(f"block_table[{int(bad.any(dim=1).nonzero()[0])}] names a block outside [0, {NB})")
    return lens


def _block_span(lens: list[int], window: int | None, block_size: int) -> tuple[list[int], list[int]]:
    """Per sequence, the first block it reads (its window's) and one past its last."""
    first = [(0 if window is None else max(0, n - window)) // block_size for n in lens]
    return first, [-(-n // block_size) for n in lens]


def paged_decode_attention_torch(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                                 block_table: torch.Tensor, context_lens: torch.Tensor, scale: float,
                                 sinks: torch.Tensor | None = None, window: int | None = None, *,
                                 gathered: bool | None = None) -> torch.Tensor:
    """The same semantics in plain PyTorch, fp32 softmax attention over each sequence's gathered blocks.
    Where V is a view of K's first values (multi-head latent attention), K is gathered once for both.

    On a GPU, sequences are gathered a chunk at a time (`_gathered`), the padding masked: a sequence at a
    time launched about a dozen kernels each, and a Mixtral layer of 256 sequences took 80 ms on an H200. On the CPU,
    a sequence at a time (gathering a whole group and masking the padding was 1.3x faster for
    DeepSeek-V2-Lite's one KV head and 2.9x slower for Mixtral's eight, measured side by side on 2 vCPUs).
    `gathered` forces one or the other (tests)."""
    lens = _check(q, k_pool, v_pool, block_table, context_lens, window)
    B, Hq, D = q.shape
    _, Hkv, BS, _ = k_pool.shape
    G, Dv = Hq // Hkv, v_pool.shape[3]
    v_in_k = v_pool.data_ptr() == k_pool.data_ptr() and v_pool.stride() == k_pool.stride() and Dv <= D
    out = q.new_empty(B, Hq, Dv)
    if gathered if gathered is not None else q.device.type != "cpu":
        chunk = paged_attention_chunk(Hq, Hkv, D, Dv, v_in_k, k_pool.element_size(),
                                      _gathered_tokens(lens, window, BS))
        for a in range(0, B, chunk):
            _gathered(q[a:a + chunk], k_pool, v_pool, block_table[a:a + chunk], lens[a:a + chunk], scale, sinks,
                      window, v_in_k, out[a:a + chunk])
        return out
    sink = None if sinks is None else sinks.float().view(Hkv, G, 1)
    for b, n in enumerate(lens):
        first = 0 if window is None else max(0, n - window)                     # the window's first token
        ids = block_table[b, first // BS: -(-n // BS)].long()
        lo, hi = first % BS, first % BS + n - first
        k = k_pool[ids].transpose(0, 1).reshape(Hkv, -1, D)[:, lo:hi].float()   # [Hkv, n, D]
        v = k[..., :Dv] if v_in_k else v_pool[ids].transpose(0, 1).reshape(Hkv, -1, Dv)[:, lo:hi].float()
        qb = q[b].float().view(Hkv, G, D) * scale                                 # [Hkv, G, D]
        scores = torch.bmm(qb, k.transpose(1, 2))                                 # [Hkv, G, n]
        if sink is None:
            p = torch.softmax(scores, dim=-1)
        else:
            p = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        out[b] = torch.bmm(p, v).reshape(Hq, Dv).to(q.dtype)
    return out


def _gathered_tokens(lens: list[int], window: int | None, block_size: int) -> int:
    """Tokens each sequence's gather is padded to: the most blocks any one reads, whole."""
    first, last = _block_span(lens, window, block_size)
    return max((b - a for a, b in zip(first, last)), default=0) * block_size


def _gathered(q, k_pool, v_pool, block_table, lens: list[int], scale: float, sinks, window: int | None,
              v_in_k: bool, out: torch.Tensor) -> None:
    """Attention of a chunk of sequences at once: each one's blocks gathered into [c, Hkv, T, D] (T its
    padded length), the positions outside its context (or window) masked to -inf before the softmax."""
    c, Hq, D = q.shape
    NB, Hkv, BS, _ = k_pool.shape
    G, Dv = Hq // Hkv, v_pool.shape[3]
    first, last = _block_span(lens, window, BS)
    m = max(b - a for a, b in zip(first, last))
    dev = q.device   # the pools' and q's; the block table may be host memory (the engine keeps it there)
    # The indices and the mask come from host lists: built on the host, each crosses once.
    start = torch.tensor(first)
    cols = (start[:, None] + torch.arange(m)).clamp_(max=block_table.shape[1] - 1)
    ids = block_table.gather(1, cols.to(block_table.device)).long().clamp_(0, NB - 1).to(dev)   # past a
    # sequence's blocks: any block, masked
    pos = start[:, None] * BS + torch.arange(m * BS)   # each gathered row's token position
    lo = torch.tensor([0 if window is None else max(0, n - window) for n in lens])
    outside = ((pos < lo[:, None]) | (pos >= torch.tensor(lens)[:, None])).to(dev)   # [c, T]
    del cols, pos, lo, start

    def rows(pool: torch.Tensor, dim: int) -> torch.Tensor:   # [c, Hkv, T, dim] in fp32
        return pool[ids].transpose(1, 2).reshape(c, Hkv, m * BS, pool.shape[3])[..., :dim].float()

    k = rows(k_pool, D)
    v = k[..., :Dv] if v_in_k else rows(v_pool, Dv)
    scores = torch.matmul(q.float().view(c, Hkv, G, D) * scale, k.transpose(2, 3))   # [c, Hkv, G, T]
    del k
    scores.masked_fill_(outside[:, None, None, :], float("-inf"))
    if sinks is not None:
        sink = sinks.float().view(1, Hkv, G, 1).expand(c, Hkv, G, 1)
        p = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        p = torch.softmax(scores, dim=-1)
    del scores
    out.copy_(torch.matmul(p, v).reshape(c, Hq, Dv))
