"""Tensor and expert parallelism on real torch.distributed ranks (gloo, CPU processes): every family's
tiny checkpoint, split over T = 2 tensor ranks and over T = 2 x E = 2 ranks, gives transformers' own
greedy tokens on every rank; and the weights each rank holds are its share."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_lightning.config import ModelSpec, ParallelConfig
from moe_lightning.errors import ConfigError
from moe_lightning.models import family
from tests.conftest import free_port, join_test_ranks, spawn_ranks

FAMILY_KEYS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "dbrx", "deepseek_v2", "deepseek_v3", "gpt_oss"]


def _rank(rank: int, world: int, port: int, folder: str, tensor: int, expert: int, chunks: int) -> None:
    """One gloo rank: every checkpoint of the job through the reference engine (no policies) or CGOPipe
    under each policy; its tokens and what it holds written to rank{rank}.json."""
    from moe_lightning.config import HardwareSpec, Policy
    from moe_lightning.engine.cgopipe import CGOPipeRunner
    from moe_lightning.engine.generation import GenerationParams, generate
    from moe_lightning.engine.parallel import finish_ranks
    from moe_lightning.engine.reference import ReferenceRunner
    from moe_lightning.engine.weights import resolve_model
    from tests.conftest import PARITY_NEW_TOKENS, prompt_workload

    ranks = join_test_ranks(rank, world, port, tensor, expert)
    try:
        job = json.loads((Path(folder) / "job.json").read_text())
        params, out = GenerationParams(max_new_tokens=PARITY_NEW_TOKENS, eos_token_id=2), {}
        for key, path in job["paths"].items():
            spec, source = resolve_model(ModelSpec(name="hf", path=path, dtype="float32"))
            if not job["policies"]:
                runner = ReferenceRunner(spec, source, ranks=ranks, chunks=chunks)
                stacks = [s for s in runner.weights.experts if s is not None]
                out[key] = {"outputs": generate(runner, job["prompts"], params, 8).output_ids,
                            "experts": sorted({len(s.slot_of) for s in stacks}),
                            "expert_rows": sorted({s.w13[0].shape[1] for s in stacks}), "heads": runner.spec.num_heads}
            for name, policy in job["policies"].items():
                runner = CGOPipeRunner(spec, source, HardwareSpec(), Policy(**policy), prompt_workload(job["prompts"]),
                                       torch.device("cpu"), ranks=ranks, chunks=chunks)
                out[f"{key}/{name}"] = {"outputs": generate(runner, job["prompts"], params, 10).output_ids,
                                        "streamed": runner.experts.n_str, "resident": runner.experts.n_res}
        (Path(folder) / f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        finish_ranks()


def _run_ranks(tmp_path, prompts, tinies: dict, tensor: int, expert: int, chunks: int, policies: dict) -> list[dict]:
    world = tensor * expert
    (tmp_path / "job.json").write_text(json.dumps({"prompts": prompts, "policies": policies,
                                                   "paths": {k: str(t.path) for k, t in tinies.items()}}))
    spawn_ranks(_rank, (world, free_port(), str(tmp_path), tensor, expert, chunks), world)
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(world)]


def _tiny(key: str, prompts):
    from tests.models.test_families import _BUILT, SHAPES, Tiny

    if key == "mixtral":   # the families' tests keep Mixtral's elsewhere: the same shapes here
        from tests.models import test_families

        test_families.FAMILIES.setdefault("mixtral", ModelSpec(name="hf", architecture="mixtral", num_layers=2,
                                                              **SHAPES))
    if key not in _BUILT:
        _BUILT[key] = Tiny(key, prompts)
    return _BUILT[key]


@pytest.mark.slow
@pytest.mark.parametrize("tensor, expert, chunks, keys", [
    (2, 1, 1, FAMILY_KEYS),
    (2, 2, 2, ["qwen2_moe", "deepseek_v3", "gpt_oss"]),
])
def test_tensor_and_expert_parallel_reference_is_token_identical_to_transformers(tmp_path, prompts, tensor, expert,
                                                                                  chunks, keys):
    """T = 2: each rank holds half of every layer's heads, of each expert's rows, of the shared expert's and
    dense MLP's rows (q/k norms over all heads, MLA's absorbed heads, gpt-oss's sinks and biases split
    with them; O's bias, gpt-oss's, Qwen3-MoE's and OLMoE's, added once); T = 2 x E = 2: and half of the
    experts. Every rank's tokens are transformers'."""
    tinies = {key: _tiny(key, prompts) for key in keys}
    for rank, doc in enumerate(_run_ranks(tmp_path, prompts, tinies, tensor, expert, chunks, {})):
        for key, tiny in tinies.items():
            got = doc[key]
            assert got["heads"] == tiny.spec.num_heads // tensor
            assert got["experts"] == [tiny.spec.num_experts // expert]
            assert got["expert_rows"] == [2 * tiny.spec.intermediate_size // tensor]
            assert got["outputs"] == tiny.outputs, (key, rank)


@pytest.mark.parametrize("change, message", [
    (dict(tensor=3), "parallel.tensor=3 does not divide model.num_heads=4"),
    (dict(tensor=4), "parallel.tensor=4 does not divide model.num_kv_heads=2"),
    (dict(expert=3), "parallel.expert=3 does not divide model.num_experts=8"),
])
def test_a_split_that_does_not_divide_the_model_is_refused(change, message):
    from moe_lightning.engine.parallel import check_parallel
    from tests.models.test_families import FAMILIES

    spec = FAMILIES["qwen2_moe"]
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        check_parallel(spec, ParallelConfig(**change), family(spec))


CGOPIPE_POLICIES = {   # as the families' tests run CGOPipe: experts all resident, all streamed, mixed (the
    # machine's N and mu: each of E expert groups runs N / E sequences in micro-batches of mu / E)
    "all-resident": dict(batch_size=10, micro_batch_size=6, expert_gpu_fraction=1.0),
    "all-streamed": dict(batch_size=10, micro_batch_size=4, expert_gpu_fraction=0.0, pages_per_layer=2),
    "mixed-cpu-attention": dict(batch_size=10, micro_batch_size=2, expert_gpu_fraction=0.5, kv_gpu_fraction=0.4),
}


@pytest.mark.slow
@pytest.mark.parametrize("tensor, expert, keys", [
    (2, 1, ["olmoe", "deepseek_v2", "gpt_oss"]),
    (1, 2, ["gpt_oss_mxfp4", "deepseek_v2"]),
    (2, 2, ["qwen2_moe"]),
])
def test_cgopipe_under_tensor_and_expert_parallelism_is_token_identical(tmp_path, prompts, tensor, expert, keys):
    """CGOPipe on each rank (CPU attention on its heads, its experts' shards streamed through its own
    pinned ring and double buffer, the MoE layers across its expert group) under three policies: every
    rank's tokens are transformers'."""
    tinies = {key: _tiny(key, prompts) for key in keys}
    for rank, doc in enumerate(_run_ranks(tmp_path, prompts, tinies, tensor, expert, 2, CGOPIPE_POLICIES)):
        for key, tiny in tinies.items():
            for name in CGOPIPE_POLICIES:
                got = doc[f"{key}/{name}"]
                assert got["streamed"] + got["resident"] == tiny.spec.num_experts // expert
                assert got["outputs"] == tiny.outputs, (key, name, rank)
