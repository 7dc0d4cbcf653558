"""CPU paged decode attention: the C++ kernel and the PyTorch fallback against a plain dense reference.

The reference gathers each sequence's tokens to a dense [kv heads, tokens, head_dim] tensor in float64
and runs an ordinary softmax attention. Tolerances:
- fp32 output (fp32 q; fp32, bf16 or fp16 pools): 1e-5 absolute and relative. The kernel reads the
  stored values exactly (bf16/fp16 -> fp32 is exact) and accumulates in fp32.
- bf16 / fp16 output (q in the pool's dtype): the output's own rounding, 2^-8 (bf16) or 2^-11 (fp16)
  relative, plus 1e-5 absolute for the fp32 accumulation.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch

from moe_lightning.engine.tiny import cache_dir
from moe_lightning.kernels import cpu_attention as ca

HAS_COMPILER = shutil.which("c++") is not None or shutil.which("g++") is not None
# "gathered": the fallback as a GPU runs it, a chunk of sequences gathered at once with the padding masked
BACKENDS = [pytest.param("cpp", marks=pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler")), "torch",
            "gathered"]
ROUNDING = {torch.float32: 1e-5, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def reference(q, k_pool, v_pool, block_table, context_lens, scale, sinks=None, window=None) -> torch.Tensor:
    """In float64, token by token: softmax(q.k * scale) over the last `window` tokens (all by default), with
    exp(sink) added to each head's denominator where `sinks` are given."""
    B, Hq, D = q.shape
    _, Hkv, BS, _ = k_pool.shape
    out = torch.empty(B, Hq, v_pool.shape[3], dtype=torch.float64)
    for b in range(B):
        n = int(context_lens[b])
        t = torch.arange(0 if window is None else max(0, n - window), n)
        blocks, rows = block_table[b, t // BS].long(), t % BS
        k = k_pool[blocks, :, rows].double().transpose(0, 1)            # [Hkv, n, D]
        v = v_pool[blocks, :, rows].double().transpose(0, 1)
        qb = q[b].double().view(Hkv, Hq // Hkv, D)
        e = torch.exp(qb @ k.transpose(1, 2) * scale)                   # [Hkv, G, n]
        denominator = e.sum(-1, keepdim=True)
        if sinks is not None:
            denominator = denominator + torch.exp(sinks.double()).view(Hkv, Hq // Hkv, 1)
        out[b] = (e / denominator @ v).reshape(Hq, -1)
    return out


def make_case(B, Hkv, group, D, block_size, kv_dtype, q_dtype, lens, seed=0):
    """Pools with spare blocks, a shuffled (non-contiguous) block table, and garbage past each
    sequence's last block (a kernel that reads it fails: -1 is out of range)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lens, dtype=torch.int32)
    max_blocks = -(-int(lens.max()) // block_size) + 1
    need = [-(-int(n) // block_size) for n in lens]
    num_blocks = sum(need) + 7
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.full((B, max_blocks), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[used:used + n].int()
        used += n
    k_pool = torch.randn(num_blocks, Hkv, block_size, D, generator=g).to(kv_dtype)
    v_pool = torch.randn(num_blocks, Hkv, block_size, D, generator=g).to(kv_dtype)
    q = torch.randn(B, Hkv * group, D, generator=g).to(q_dtype)
    return q, k_pool, v_pool, table, lens


def run(backend, *args):
    if backend == "cpp":
        return ca.load_extension(required=True).paged_decode_attention(*args)
    return ca.paged_decode_attention_torch(*args, gathered=backend == "gathered")


MIXED = [1, 300, 17, 128, 5, 255, 64, 33, 2]   # 1 to 300 tokens: partial tiles, whole tiles, one token


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_matches_dense_reference(backend, dtype, block_size, group):
    D, scale = 128, 128**-0.5
    # q in the pool's dtype (the engine's case; bf16 q and K take the vdpbf16ps path where compiled)
    args = make_case(len(MIXED), 2, group, D, block_size, dtype, dtype, MIXED, seed=block_size * 10 + group)
    out = run(backend, *args, scale)
    assert out.shape == args[0].shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), reference(*args, scale), rtol=ROUNDING[dtype] * 1.01, atol=1e-5)
    if dtype != torch.float32:   # fp32 q over reduced pools: fp32 accuracy, nothing lost to the storage
        q32 = args[0].float()
        out = run(backend, q32, *args[1:], scale)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), reference(q32, *args[1:], scale), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler")
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_p_bf16_within_its_bound(block_size, group):
    """Opt-in bf16 softmax weights for P @ V: each weight is off by at most 2^-9 relative, the
    denominator sums the same rounded weights, so the output moves by at most 2^-8 * max|V| before
    its own bf16 rounding. On a CPU without AVX512-BF16 the flag is ignored (exact path)."""
    args = make_case(len(MIXED), 2, group, 128, block_size, torch.bfloat16, torch.bfloat16, MIXED, seed=group)
    ext = ca.load_extension(required=True)
    out = ext.paged_decode_attention(*args, 0.1, True)
    ref = reference(*args, 0.1)
    bound = 2.0**-8 * args[2].abs().max().item()
    torch.testing.assert_close(out.double(), ref, rtol=2.0**-8 * 1.01, atol=bound)
    exact = ext.paged_decode_attention(*args, 0.1, False)
    torch.testing.assert_close(exact.double(), ref, rtol=2.0**-8 * 1.01, atol=1e-5)
    if ext.has_dpbf16():   # the flag does change the arithmetic (else this test checks nothing new)
        assert not torch.equal(out, exact)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head_dim,group",
                         [(64, 8), (64, 1), (16, 4), (128, 6), (128, 3), (128, 2), (96, 4), (128, 16)])
def test_other_head_dims_and_groups(backend, head_dim, group):
    """head_dim 64 and 16 (the tiny model); groups with no kernel of their own (2, 3, 6) run padded to
    the next one; shapes with no kernel at all (head_dim 96, group 16) run the fallback."""
    for dtype in (torch.float32, torch.bfloat16):
        args = make_case(4, 2, group, head_dim, 16, dtype, torch.float32, [40, 1, 77, 16])
        if backend == "cpp" and not ca.load_extension(required=True).supported(2 * group, 2, head_dim):
            assert (head_dim, group) in ((96, 4), (128, 16))
            out = ca.paged_decode_attention(*args, 0.3)
        else:
            out = run(backend, *args, 0.3)
        torch.testing.assert_close(out.double(), reference(*args, 0.3), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler")
@pytest.mark.parametrize("threads", [1, 3])
def test_split_contexts_merge_exactly(threads):
    """A long context beside short ones is split into several work units (flash-decoding) when there
    are threads to spread it over; the merged result is the same as one pass."""
    lens = [3000, 7, 1500]
    split = ca.load_extension(required=True).split_tokens(lens, 2, threads)
    assert (split == 0) == (threads == 1) and (threads == 1 or split < 1500)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        args = make_case(3, 2, 4, 128, 16, torch.bfloat16, torch.float32, lens, seed=3)
        out = run("cpp", *args, 0.1)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out.double(), reference(*args, 0.1), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler")
def test_threads_follow_the_calling_thread():
    """The kernel's OpenMP team is the calling thread's torch thread count (the engine sets it per
    worker): the extension shares torch's OpenMP runtime and never sets threads itself."""
    ext = ca.load_extension(required=True)
    before = torch.get_num_threads()
    seen = {}

    def worker():
        torch.set_num_threads(1)
        seen["worker"] = ext.omp_threads()

    try:
        torch.set_num_threads(2)
        t = threading.Thread(target=worker)
        t.start()
        t.join()
        assert seen["worker"] == 1
        assert ext.omp_threads() == 2 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler")
def test_releases_the_gil():
    """The engine runs CPU attention on a worker thread beside Python threads: the kernel must not hold
    the GIL while it runs (torch.ops calls release it; a plain pybind11 binding would not)."""
    ext = ca.load_extension(required=True)
    # Long calls on little memory: 64 contexts of 4096 tokens over a pool of 16 blocks (cache-resident).
    q, k_pool, v_pool, _, _ = make_case(1, 8, 4, 128, 16, torch.float32, torch.float32, [256])
    table = torch.randint(0, k_pool.shape[0], (64, 256), dtype=torch.int32)
    args = (q.expand(64, -1, -1).contiguous(), k_pool, v_pool, table, torch.full((64,), 4096, dtype=torch.int32))
    spans, done = [], threading.Event()

    def worker():
        while sum(t1 - t0 for t0, t1 in spans) < 0.2:
            t0 = time.perf_counter()
            ext.paged_decode_attention(*args, 0.1)
            spans.append((t0, time.perf_counter()))
        done.set()

    stamps, n = [], 0
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t = threading.Thread(target=worker)
        t.start()
        while not done.is_set():
            n += 1
            if n % 1000 == 0:
                stamps.append(time.perf_counter())
        t.join()
    finally:
        torch.set_num_threads(before)
    # The first half of each call, past 8 ms: a span also holds the main thread's turns with the GIL
    # (5 ms switch interval) before the call starts and, mostly, after it returns.
    assert min(t1 - t0 for t0, t1 in spans) > 0.03, "calls too short to tell"
    inside = [s for s in stamps if any(t0 + 0.008 < s < (t0 + t1) / 2 for t0, t1 in spans)]
    assert len(inside) >= 5, f"the main thread ran {len(inside)}k iterations during {len(spans)} kernel calls"


@pytest.mark.parametrize("backend", BACKENDS)
def test_rejects_what_it_cannot_read(backend):
    q, k_pool, v_pool, table, lens = make_case(2, 2, 4, 128, 16, torch.float32, torch.float32, [20, 5])
    bad_lens = lens.clone()
    bad_lens[1] = 0
    with pytest.raises((RuntimeError, ValueError), match="context_lens"):
        run(backend, q, k_pool, v_pool, table, bad_lens, 1.0)
    bad_table = table.clone()
    bad_table[0, 1] = k_pool.shape[0]
    with pytest.raises((RuntimeError, ValueError), match="block"):
        run(backend, q, k_pool, v_pool, bad_table, lens, 1.0)
    with pytest.raises((RuntimeError, ValueError), match="int32"):
        run(backend, q, k_pool, v_pool, table.long(), lens, 1.0)


def test_env_forces_the_fallback(monkeypatch):
    args = make_case(3, 2, 4, 128, 16, torch.bfloat16, torch.bfloat16, [9, 30, 1])
    monkeypatch.setenv(ca.ENV, "torch")
    assert ca.backend() == "torch"
    assert torch.equal(ca.paged_decode_attention(*args, 0.2), ca.paged_decode_attention_torch(*args, 0.2))
    monkeypatch.setenv(ca.ENV, "bogus")
    with pytest.raises(ValueError, match=ca.ENV):
        ca.backend()


def test_failed_build_warns_once_and_falls_back(monkeypatch, caplog):
    def broken():
        raise RuntimeError("Error building extension: c++: not found")

    monkeypatch.setattr(ca, "_state", {})
    monkeypatch.setattr(ca, "_build", broken)
    monkeypatch.delenv(ca.ENV, raising=False)
    args = make_case(2, 2, 4, 128, 16, torch.float32, torch.float32, [9, 30])
    with caplog.at_level(logging.WARNING, logger="moe_lightning.kernels"):
        for _ in range(3):
            out = ca.paged_decode_attention(*args, 0.2)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "fallback" in caplog.records[0].getMessage()
    assert ca.backend() == "torch"
    torch.testing.assert_close(out.double(), reference(*args, 0.2), rtol=1e-5, atol=1e-5)
    monkeypatch.setenv(ca.ENV, "cpp")
    with pytest.raises(RuntimeError, match="did not build"):
        ca.backend()


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler")
def test_built_once_per_process_under_concurrent_first_use(monkeypatch):
    """Several threads asking for the kernel at once: one build, the same module for all."""
    monkeypatch.setattr(ca, "_state", {})
    calls, real = [], ca._build

    def counted():
        calls.append(1)
        return real()

    monkeypatch.setattr(ca, "_build", counted)
    got = []
    threads = [threading.Thread(target=lambda: got.append(ca.load_extension(required=True))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(got) == 4 and all(m is got[0] for m in got)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler")
def test_a_process_killed_while_loading_the_kernel_does_not_hang_the_next(tmp_path):
    """torch's build guard is a `lock` file in the build folder; one left by a killed process made every
    later process wait for it forever (seen: a test run's killed trial hung every run after it)."""
    ca.load_extension(required=True)   # built, in this run's cache
    folders = [f for f in (cache_dir() / "torch_extensions").glob("moe_lightning_paged_attention_*") if f.is_dir()]
    assert folders
    stale = [f / "lock" for f in folders]
    for f in stale:
        f.touch()
    try:
        code = ("from moe_lightning.kernels import cpu_attention as ca; "
                "print(ca.backend(32, 8, 128), ca._state['ext'] is not None)")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={**os.environ, ca.ENV: "cpp"})
        assert r.returncode == 0 and r.stdout.split() == ["cpp", "True"], r.stderr
    finally:
        for f in stale:
            f.unlink(missing_ok=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_latent_attention_reads_v_from_k(dtype):
    """Multi-head latent attention's shape: one KV head serving every query head, K = [latent | RoPE key]
    and V a view of K's latent (`ModelSpec.v_in_k`): the fallback runs it (the compiled kernel takes V's dim
    equal to K's), gathering K once."""
    q, k_pool, _, table, lens = make_case(len(MIXED), 1, 16, 40, 16, dtype, dtype, MIXED, seed=7)
    v_pool = k_pool[..., :32]
    assert ca.backend(16, 1, 40, 32) == "torch"
    for gathered in (False, True):   # a sequence at a time (the CPU), a chunk at a time (a GPU)
        out = ca.paged_decode_attention_torch(q, k_pool, v_pool, table, lens, 0.2, gathered=gathered)
        assert out.shape == (len(MIXED), 16, 32)
        torch.testing.assert_close(out.double(), reference(q, k_pool, v_pool, table, lens, 0.2),
                                   rtol=ROUNDING[dtype] * 1.01, atol=1e-5)


def run_gpt_oss(backend, q, k_pool, v_pool, table, lens, scale, sinks, window):
    if backend == "cpp":
        return ca.load_extension(required=True).paged_decode_attention(q, k_pool, v_pool, table, lens, scale, False,
                                                                       window or 0, sinks)
    return ca.paged_decode_attention_torch(q, k_pool, v_pool, table, lens, scale, sinks, window,
                                           gathered=backend == "gathered")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("window", [None, 1, 20], ids=["full", "window1", "window20"])
@pytest.mark.parametrize("sinks", [False, True], ids=["", "sinks"])
def test_sinks_and_sliding_window(backend, dtype, block_size, window, sinks):
    """gpt-oss: a sink logit per head in the softmax's denominator, and a window over the last tokens
    (shorter contexts than the window see everything)."""
    D, group, scale = 64, 4, 64**-0.5
    q, k_pool, v_pool, table, lens = make_case(len(MIXED), 2, group, D, block_size, dtype, dtype, MIXED,
                                               seed=block_size + 3)
    s = torch.randn(2 * group, generator=torch.Generator().manual_seed(5)) * 2 if sinks else None
    out = run_gpt_oss(backend, q, k_pool, v_pool, table, lens, scale, s, window)
    torch.testing.assert_close(out.double(), reference(q, k_pool, v_pool, table, lens, scale, s, window),
                               rtol=ROUNDING[dtype] * 1.01, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_never_reads_blocks_before_it(backend):
    """The blocks before a sequence's window may hold anything, even ids outside the pool: they are not
    read (a sliding layer costs its window). Beside them, a sink larger than every score."""
    D, group, BS = 64, 4, 16
    q, k_pool, v_pool, table, lens = make_case(3, 2, group, D, BS, torch.float32, torch.float32, [200, 40, 70], seed=9)
    window = 33
    expected = reference(q, k_pool, v_pool, table, lens, 0.125, torch.full((2 * group,), 30.0), window)
    for b, n in enumerate(lens.tolist()):
        table[b, :max(0, n - window) // BS] = -1
    out = run_gpt_oss(backend, q, k_pool, v_pool, table, lens, 0.125, torch.full((2 * group,), 30.0), window)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler")
@pytest.mark.parametrize("window", [None, 1500], ids=["full", "window1500"])
def test_sinks_with_a_split_context(window):
    """A context long enough to be split over two threads (flash-decoding): the window's first token is
    where the first part starts, and the sink joins the denominator once, after the parts merge."""
    ext = ca.load_extension(required=True)
    lens_list = [3000, 3]
    q, k_pool, v_pool, table, lens = make_case(2, 1, 4, 64, 16, torch.float32, torch.float32, lens_list, seed=11)
    s = torch.randn(4, generator=torch.Generator().manual_seed(2))
    read = [min(n, window or n) for n in lens_list]
    assert ext.split_tokens(read, 1, 2) > 0          # the long context is split at 2 threads
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = run_gpt_oss("cpp", q, k_pool, v_pool, table, lens, 0.125, s, window)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out.double(), reference(q, k_pool, v_pool, table, lens, 0.125, s, window),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, 100], ids=["one-sequence", "four-sequences", "all"])
@pytest.mark.parametrize("window", [None, 20], ids=["full", "window20"])
@pytest.mark.parametrize("table_on_device", [False, True], ids=["host-table", "device-table"])
def test_gathered_in_chunks_on_the_device(device, chunk, window, table_on_device, monkeypatch):
    """On a GPU the fallback gathers a chunk of sequences at once (as many as
    `memory.PAGED_ATTENTION_CHUNK_BYTES` holds); chunks of one sequence, of four (the last one short) and of
    all of them give the reference's output, on the CPU and, where there is one, on CUDA (what
    `paged_decode_attention` runs there by default)."""
    monkeypatch.setattr(ca, "paged_attention_chunk", lambda *shape: chunk)
    D, group = 128, 4
    q, k_pool, v_pool, table, lens = make_case(len(MIXED), 2, group, D, 16, torch.bfloat16, torch.float32, MIXED,
                                               seed=13)
    s = torch.randn(2 * group, generator=torch.Generator().manual_seed(3))
    expected = reference(q, k_pool, v_pool, table, lens, 0.1, s, window)
    # the engine keeps block tables in host memory (the pools on the device); either is read
    args = [t.to(device) for t in (q, k_pool, v_pool)] + [t.to(device) if table_on_device else t for t in (table, lens)]
    out = ca.paged_decode_attention(*args, 0.1, sinks=s.to(device), window=window) if device.type == "cuda" else \
        ca.paged_decode_attention_torch(*args, 0.1, s, window, gathered=True)
    torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-5, atol=1e-5)
