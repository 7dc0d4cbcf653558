"""Expert parallelism on real torch.distributed ranks (gloo, CPU processes): EPS-MoE's pipelined
all-to-all gives every rank's tokens what one process running all the experts gives them, and its
trace shows chunk c+1's dispatch in flight across chunk c's expert GEMMs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moe_lightning.engine.expert_parallel import Trace, ep_moe, expert_slice, pipeline_chunks
from moe_lightning.engine.experts import moe_loop
from moe_lightning.models.layers import ExpertStack
from tests.conftest import free_port, spawn_ranks

E, H, F, K = 8, 32, 24, 2


def _layer(rank: int, tokens: int):
    g = torch.Generator().manual_seed(0)   # the same experts on every rank
    w13, w2 = torch.randn(E, 2 * F, H, generator=g) * 0.2, torch.randn(E, H, F, generator=g) * 0.2
    g = torch.Generator().manual_seed(100 + rank)   # each rank's own tokens and routing
    h = torch.randn(tokens, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, K, generator=g), dim=-1)
    return w13, w2, h, weights, ids


def _rank(rank: int, world: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)   # the ranks share this machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        w13, w2, h, weights, ids = _layer(rank, tokens=13 + 5 * rank)   # ranks hold different token counts
        want = moe_loop(h, weights, ids, ExpertStack.single(w13, w2))
        mine = expert_slice(w13, w2, rank, world)
        errors = {}
        for chunks, kernel in ((1, None), (3, None), (4, "grouped"), (20, "loop")):   # 20 > tokens: empty chunks
            got = ep_moe(h, weights, ids, mine, E, chunks=chunks, kernel=kernel)
            errors[f"{chunks}-{kernel}"] = float((got - want).abs().max())
        trace = Trace()
        ep_moe(h, weights, ids, mine, E, chunks=4, trace=trace)
        spans = {f"{stage}/{c}": v for (stage, c), v in trace.spans.items()}
        with open(f"{folder}/rank{rank}.json", "w") as f:
            json.dump({"errors": errors, "spans": spans, "scale": float(want.abs().max())}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_layer_matches_one_process_and_pipelines(tmp_path, world):
    spawn_ranks(_rank, (world, free_port(), str(tmp_path)), world)
    for rank in range(world):
        doc = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for case, err in doc["errors"].items():
            assert err <= 1e-5 * doc["scale"], (rank, case, err)
        spans = doc["spans"]
        for c in range(3):
            d_issue, d_waited = spans[f"dispatch/{c + 1}"]
            g_start, g_end = spans[f"gemm/{c}"]
            # chunk c+1's rows were sent before chunk c's GEMMs began and were not waited for until they
            # ended: the all-to-all of c+1 spans the GEMM of c.
            assert d_issue <= g_start and d_waited >= g_end, (rank, c, spans)
            assert spans[f"combine/{c}"][0] >= g_end   # c's results go back once computed


def test_the_chunk_count_grows_with_what_communication_can_hide():
    link = dict(latency_s=50e-6, bytes_per_s=10e9, launch_s=20e-6, flops_per_s=1e12)
    # Communication negligible against compute: nothing to hide, one chunk.
    assert pipeline_chunks(1e3, 1e10, **link) == 1
    # Comparable: several chunks; a hundredfold fixed cost per chunk: fewer.
    balanced = pipeline_chunks(1e8, 1e11, **link)
    assert balanced > 1
    assert pipeline_chunks(1e8, 1e11, **(link | dict(latency_s=5e-3, launch_s=2e-3))) < balanced


def _reference_rank(rank: int, world: int, port: int, folder: str, path: str, chunks: int) -> None:
    from moe_lightning.config import ModelSpec
    from moe_lightning.engine.expert_parallel import ExpertParallelKernel
    from moe_lightning.engine.generation import GenerationParams, generate
    from moe_lightning.engine.reference import ReferenceRunner
    from moe_lightning.engine.weights import resolve_model
    from tests.conftest import PARITY_NEW_TOKENS

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        spec, source = resolve_model(ModelSpec(name="hf", path=path, dtype="float32"))
        kernel = ExpertParallelKernel(spec.num_experts, chunks=chunks)
        runner = ReferenceRunner(spec, source, moe_kernel=kernel)
        held = {len(s.slot_of) for s in runner.weights.experts if s is not None}
        prompts = json.loads((Path(folder) / "prompts.json").read_text())
        result = generate(runner, prompts, GenerationParams(max_new_tokens=PARITY_NEW_TOKENS, eos_token_id=2), 8)
        (Path(folder) / f"ref{rank}.json").write_text(json.dumps({"outputs": result.output_ids, "held": sorted(held)}))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world, chunks, family", [(2, 1, "qwen2_moe"), (4, 3, "qwen2_moe"), (2, 2, "gpt_oss")])
def test_reference_engine_under_expert_parallelism_is_token_identical_to_transformers(tmp_path, prompts, world,
                                                                                      chunks, family):
    """A Hugging Face checkpoint folder (a family with dense and MoE layers; one whose experts have
    biases), every rank holding 8 / R experts of each MoE layer: every rank's greedy tokens are
    transformers' own."""
    from tests.models.test_families import Tiny

    tiny = Tiny(family, prompts)
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    spawn_ranks(_reference_rank, (world, free_port(), str(tmp_path), str(tiny.path), chunks), world)
    for rank in range(world):
        doc = json.loads((tmp_path / f"ref{rank}.json").read_text())
        assert doc["held"] == [8 // world]
        assert doc["outputs"] == tiny.outputs, rank


def _one_rank(rank: int, world: int, port: int, folder: str, backend: str) -> None:
    """One rank (NCCL on the GPU, or gloo on the CPU): `ep_moe`, and the data-parallel kernel in step
    (`Lockstep`'s collectives on the backend's device), against one process running every expert."""
    from moe_lightning.engine.data_parallel import DataParallelMoE, Lockstep

    device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        w13, w2, h, weights, ids = (t.to(device) for t in _layer(rank, tokens=21))
        want = moe_loop(h, weights, ids, ExpertStack.single(w13, w2))
        mine = expert_slice(w13, w2, rank, world)
        errors = {f"ep_moe/{c}": float((ep_moe(h, weights, ids, mine, E, chunks=c) - want).abs().max()) for c in (1, 3)}
        lock = Lockstep(None, 2, lambda tokens: 2, device)
        moe = DataParallelMoE(E, lock)
        lock.begin([13, 8])   # two micro-batches of this rank's tokens
        halves = (slice(0, 13), slice(13, 21))
        parts = [moe.at(j)(h[rows], weights[rows], ids[rows], mine) for j, rows in enumerate(halves)]
        errors["data_parallel"] = float((torch.cat(parts) - want).abs().max())
        per_slot = lock.per_slot
        ghosts = lock.drain(lambda: None)   # the only rank: nothing to wait for
        with open(f"{folder}/one.json", "w") as f:
            json.dump({"errors": errors, "scale": float(want.abs().max()), "ghosts": ghosts, "per_slot": per_slot,
                       "after": lock.per_slot}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["gloo", pytest.param("nccl", marks=pytest.mark.gpu)])
def test_one_rank_matches_one_process(tmp_path, backend):
    """The several-rank code on one rank; with NCCL its CUDA path (all-to-all, all-reduce on CUDA tensors)."""
    spawn_ranks(_one_rank, (1, free_port(), str(tmp_path), backend), 1)
    doc = json.loads((tmp_path / "one.json").read_text())
    for case, err in doc["errors"].items():
        assert err <= 1e-5 * doc["scale"], (case, err)
    assert doc["per_slot"] == [2, 2] and doc["ghosts"] == 0 and doc["after"] == []
