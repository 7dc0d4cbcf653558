"""Shared fixtures: the tiny Mixtral (built once per session with `transformers`), its Hugging Face
model for parity checks, and CUDA-aware markers."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
from pathlib import Path

import pytest
import torch

# Tests never touch the user's cache: the tiny model is built into a per-session folder, which
# subprocesses (CLI tests) inherit.
os.environ.setdefault("MOE_LIGHTNING_CACHE", tempfile.mkdtemp(prefix="moe-lightning-test-cache-"))
torch.set_num_threads(min(2, os.cpu_count() or 1))

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request) -> torch.device:
    """Engine tests run on the CPU and, where there is one, on CUDA (streams, events, pinned memory)."""
    if request.param == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity: no TF32 in the GEMMs
        torch.backends.cudnn.allow_tf32 = False
    return torch.device(request.param)


def gpu_bytes_before(device: torch.device) -> int:
    """What the GPU holds before an engine is built, cuBLAS's workspaces included (0 on the CPU): the
    CUDA context and library workspaces are not the memory plan's (memory.py), so a test compares the
    engine's peak less this with the plan. torch keeps a workspace (32 MiB on Hopper) per (cuBLAS handle,
    stream) and a handle per thread, returned to its pool when the thread ends: a GEMM on a thread that
    has ended leaves a handle, with its workspace on the default stream, for the executor's GPU worker to
    take, so that workspace is counted here rather than in the peak."""
    if device.type != "cuda":
        return 0

    def gemm() -> None:
        torch.ones(64, 64, device=device) @ torch.ones(64, 64, device=device)
        torch.cuda.synchronize(device)

    gemm()   # this (the issuing) thread's handle
    warm = threading.Thread(target=gemm)
    warm.start()
    warm.join()
    return torch.cuda.memory_allocated(device)


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    from moe_lightning.engine.tiny import ensure_tiny_mixtral

    return ensure_tiny_mixtral()


@pytest.fixture(scope="session")
def tiny(tiny_path):
    """(spec, weight source) of the tiny checkpoint."""
    from moe_lightning.config import ModelSpec
    from moe_lightning.engine.weights import resolve_model

    return resolve_model(ModelSpec())


@pytest.fixture(scope="session")
def hf_tiny(tiny_path):
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def prompts() -> list[list[int]]:
    """Ten prompts of different lengths (1 to 40 tokens)."""
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 17, 9, 40, 1, 12, 23, 8, 31, 3)]


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos: int | None = 2) -> list[int]:
    """transformers' own greedy generate on one unpadded prompt: the ground truth."""
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt], device=device), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


PARITY_NEW_TOKENS = 16
BF16_REL_ERR = 3e-2     # bf16 against transformers' bf16: relative L2 error of the logits, teacher-forced
BF16_AGREE = 0.95       # and the share of positions whose argmax agrees


def check_bf16_teacher_forced(runner, hf, prompts, new_tokens: int) -> None:
    """Our bf16 prefill logits over transformers' own bf16 greedy continuation of each prompt (teacher-
    forced, so one near-tie cannot derail the rest) against transformers' logits of the same tokens."""
    seqs = [p + hf_greedy(hf, p, new_tokens, eos=None) for p in prompts]
    ours = runner.forward_prefill(seqs, max_new_tokens=1)
    start, agree, total = 0, 0, 0
    for s in seqs:
        with torch.no_grad():
            ref = hf(torch.tensor([s])).logits[0]
        mine = ours[start:start + len(s)]
        assert float((mine.float() - ref.float()).norm() / ref.float().norm()) < BF16_REL_ERR
        agree += int((mine.argmax(-1) == ref.argmax(-1)).sum())
        total += len(s)
        start += len(s)
    assert agree / total >= BF16_AGREE


BF16_VS_FP32 = 1.25     # where transformers' own bf16 is far from its fp32: ours at most this x its distance


def check_bf16_against_fp32(runner, hf16, hf32, prompts, new_tokens: int) -> None:
    """For a checkpoint so ill-conditioned that transformers' own bf16 logits are far from its fp32 ones
    (the tiny gpt-oss: 15%), the bound that means something: teacher-forced as above, our bf16 logits
    are no further from transformers' fp32 logits than its bf16 logits are, x BF16_VS_FP32 (summed over
    the prompts)."""
    seqs = [p + hf_greedy(hf16, p, new_tokens, eos=None) for p in prompts]
    ours = runner.forward_prefill(seqs, max_new_tokens=1)
    start, mine_err, theirs_err = 0, 0.0, 0.0
    for s in seqs:
        with torch.no_grad():
            exact, theirs = hf32(torch.tensor([s])).logits[0].float(), hf16(torch.tensor([s])).logits[0].float()
        mine = ours[start:start + len(s)].float()
        mine_err += float((mine - exact).norm() / exact.norm())
        theirs_err += float((theirs - exact).norm() / exact.norm())
        start += len(s)
    assert mine_err <= BF16_VS_FP32 * theirs_err, (mine_err, theirs_err)


@pytest.fixture(scope="session")
def hf_outputs(hf_tiny, prompts) -> list[list[int]]:
    """transformers' greedy continuation of every prompt: what each engine path must reproduce."""
    return [hf_greedy(hf_tiny, p, PARITY_NEW_TOKENS) for p in prompts]


def prompt_workload(prompts, padding: bool = False):
    """The Workload the memory plan is made for, from the prompts actually given."""
    from moe_lightning.config import Workload

    lengths = [len(p) for p in prompts]
    return Workload(prompt_len_avg=sum(lengths) // len(lengths), prompt_len_max=max(lengths),
                    gen_len=PARITY_NEW_TOKENS, num_requests=len(prompts), padding=padding)


PEAK_RSS_WRAPPER = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
                    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")


def cli_with_peak_rss(*args: str, timeout: int = 300):
    """Run the CLI through a wrapper process that prints its only child's peak RSS (KiB) last on stdout,
    so a test can tell that a run never allocated the model. -> (CompletedProcess, peak RSS in KiB)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", PEAK_RSS_WRAPPER, sys.executable, "-m", "moe_lightning.cli", *args],
                       capture_output=True, text=True, timeout=timeout)
    lines = r.stdout.strip().splitlines()
    return r, int(lines[-1]) if lines and lines[-1].isdigit() else -1


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now (a test server's, a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RANKS_TIMEOUT_S = 600


def spawn_ranks(fn, args: tuple, nprocs: int, timeout_s: float = RANKS_TIMEOUT_S) -> None:
    """`torch.multiprocessing.spawn(fn, args, nprocs)`, failing the test (the ranks killed) if they have not
    all finished after `timeout_s`: ranks whose collectives stop pairing up hang rather than fail."""
    import time

    import torch.multiprocessing as mp

    context = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"{nprocs} ranks still running after {timeout_s:.0f} s: their collectives hang")


def join_test_ranks(rank: int, world: int, port: int, tensor: int, expert: int):
    """A spawned test process as gloo rank `rank` of tensor x expert ranks on this host, one thread each."""
    from moe_lightning.config import ParallelConfig
    from moe_lightning.engine.parallel import init_ranks

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    return init_ranks(ParallelConfig(tensor=tensor, expert=expert), torch.device("cpu"))
