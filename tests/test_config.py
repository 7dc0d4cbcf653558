from __future__ import annotations

import math
from dataclasses import fields

import pytest

from moe_lightning.config import GpuSpec, HardwareSpec, ModelSpec, Policy, Sampling, Workload, check_finite
from moe_lightning.errors import ConfigError
from moe_lightning.run_config import RunConfig
from moe_lightning.systems import CGOPipeSystem
from moe_lightning.tasks import BenchTask, CompareTask, GenerateTask


@pytest.mark.parametrize("build, key", [
    (lambda: Policy(batch_size=2, micro_batch_size=4), "policy.micro_batch_size"),
    (lambda: Policy(batch_size=0), "policy.batch_size"),
    (lambda: Policy(expert_gpu_fraction=1.2), "policy.expert_gpu_fraction"),
    (lambda: Policy(kv_gpu_fraction=-0.1), "policy.kv_gpu_fraction"),
    (lambda: Policy(expert_kernel="magic"), "policy.expert_kernel"),
    (lambda: ModelSpec(num_heads=6, num_kv_heads=4), "model.num_heads"),
    (lambda: ModelSpec(top_k=9, num_experts=8), "model.top_k"),
    (lambda: ModelSpec(hidden_size=-1), "model.hidden_size"),
    (lambda: ModelSpec(hidden_size=100, intermediate_size=64, expert_format="mxfp4"), "model.expert_format"),
    (lambda: ModelSpec(sliding_window=4), "model.sliding_layers"),
    (lambda: ModelSpec(mtp_layers=-1), "model.mtp_layers"),
    (lambda: Workload(prompt_len_avg=50, prompt_len_max=10), "workload.prompt_len_avg"),
    (lambda: Workload(name="jsonl"), "workload.path"),
    (lambda: RunConfig(device="tpu"), "device"),
])
def test_validation_names_the_key(build, key):
    with pytest.raises(ConfigError) as exc:
        build()
    msg = str(exc.value)
    assert msg.startswith(key + ":") and "\n" not in msg


def test_policy_is_frozen_with_derived_values():
    p = Policy(batch_size=10, micro_batch_size=4)
    assert p.num_micro_batches == 3 and p.num_pages == 3
    assert Policy(batch_size=8, micro_batch_size=2, pages_per_layer=2).num_pages == 2
    with pytest.raises(AttributeError):
        p.batch_size = 3  # type: ignore[misc]


def test_mixtral_8x7b_sizes_match_the_paper():
    from moe_lightning.tuner.presets import load_preset

    spec = load_preset("model", "mixtral-8x7b")
    assert abs(spec.expert_bytes / 1e6 - 352) < 1  # one expert 352 MB in bf16
    assert abs(spec.num_experts * spec.expert_bytes / 1e9 - 2.8) < 0.05
    assert 46e9 < spec.total_params < 47.5e9


def test_a_several_gpu_profile_budgets_one_gpu_per_rank():
    """Four T4s are four ranks with a T4's budget each, never one pooled GPU (issue 13)."""
    from moe_lightning.tuner.presets import load_preset

    t4, t4x4 = load_preset("hardware", "t4"), load_preset("hardware", "4xt4")
    assert t4x4.gpu_budget_bytes == t4.gpu_budget_bytes and t4x4.gpu.count == 4
    assert isinstance(t4, HardwareSpec)


@pytest.mark.parametrize("key", ["kv_dtype", "weight_dtype"])
def test_a_dtype_other_than_the_model_s_is_refused_not_ignored(key):
    """Nothing reads policy.kv_dtype or policy.weight_dtype: a value other than auto would run in the
    model's dtype while the run document said otherwise."""
    assert getattr(Policy(**{key: "auto"}), key) == "auto"
    with pytest.raises(ConfigError, match=rf"policy.{key}: got 'bfloat16': .* not implemented .* model.dtype=bfloat16"):
        Policy(**{key: "bfloat16"})


def _runconfig_with(path: str, value: object) -> RunConfig:
    """A RunConfig whose field at the dotted `path` holds `value` (set after the group is built, as a
    caller of the Python API could, so that only the root's walk stands between it and the run)."""
    cfg = RunConfig(task=BenchTask(), system=CGOPipeSystem())
    *groups, name = path.split(".")
    obj = cfg
    for g in groups:
        obj = getattr(obj, g)
    object.__setattr__(obj, name, value)   # Policy is frozen
    return cfg


@pytest.mark.parametrize("path", ["sampling.temperature", "task.min_repeat_s", "hardware.gpu.memory_gib",
                                  "hardware.link.h2d_gbps", "hardware.cpu.attn_gbps", "model.yarn_mscale",
                                  "policy.kv_gpu_fraction", "tuner.trial_timeout_s"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_every_float_field_must_be_finite(path, value):
    """inf passes every `> 0` bound and then breaks what uses it (an int conversion, a JSON document): the
    root refuses a non-finite float in any group, nested ones and the task's included."""
    cfg = _runconfig_with(path, value)
    with pytest.raises(ConfigError, match=rf"^{path}: must be a finite number, got {value}$"):
        RunConfig(**{f.name: getattr(cfg, f.name) for f in fields(RunConfig)})


def test_a_non_finite_value_in_a_list_is_refused():
    hw = HardwareSpec(gpu=GpuSpec(gemm_rows=[1, 2], gemm_tflops=[1.0, math.inf]))
    with pytest.raises(ConfigError, match=r"^hardware.gpu.gemm_tflops: must be a finite number, got \[1.0, inf\]$"):
        RunConfig(hardware=hw)


def test_finite_floats_and_ints_pass():
    check_finite(RunConfig(task=BenchTask(), system=CGOPipeSystem()))
    check_finite(Sampling(temperature=1e300))


@pytest.mark.parametrize("task", [GenerateTask, BenchTask, CompareTask])
def test_negative_warmup_tokens_are_refused(task):
    assert task(warmup_tokens=0).warmup_tokens == 0
    with pytest.raises(ConfigError, match=r"^task.warmup_tokens: must be an integer >= 0"):
        task(warmup_tokens=-1)


def test_a_policy_field_given_at_its_default_is_refused_where_a_rule_replaces_it():
    """A field the command line gives is the user's even at its default value (policy.micro_batch_size=4):
    a rule that replaces it refuses it, as it refuses any other value; one not given is the rule's."""
    from moe_lightning.cli import given_policy_fields
    from moe_lightning.config import Policy, mark_given, refuse_ignored_fields, ruled_policy
    from moe_lightning.errors import ConfigError

    given = Policy()
    mark_given(given, given_policy_fields(["task=plan", "policy.micro_batch_size=4", "+policy.attn_on_gpu=false",
                                           "~policy.batch_size", "hardware=t4"]))
    with pytest.raises(ConfigError, match=r"^policy.micro_batch_size=4: the rule chooses it"):
        refuse_ignored_fields(given, "the rule chooses it", "drop it")
    with pytest.raises(ConfigError, match=r"^policy.attn_on_gpu=false: the rule chooses it"):
        refuse_ignored_fields(given, "the rule chooses it", "drop it", ("batch_size", "attn_on_gpu"))
    chosen = Policy(batch_size=64, micro_batch_size=16)
    assert ruled_policy(chosen, Policy(), "the rule", "drop it") == chosen   # nothing given: the rule's


def test_a_policy_field_the_system_does_not_read_is_refused():
    """system=reference and accelerate read only policy.batch_size: a placement given for them would be
    recorded in the run document as if it had run, so it is refused; the engine's runners read every field."""
    from moe_lightning.errors import ConfigError
    from moe_lightning.systems import refuse_unread_policy_fields

    refuse_unread_policy_fields("reference", ["batch_size"])
    for system in ("cgopipe", "flexgen", "deepspeed"):
        refuse_unread_policy_fields(system, ["attn_on_gpu", "kv_gpu_fraction", "expert_kernel"])
    with pytest.raises(ConfigError, match=r"^policy.kv_gpu_fraction: system=reference does not read it .*"
                                          "system.expert_kernel"):
        refuse_unread_policy_fields("reference", ["batch_size", "kv_gpu_fraction"])
    with pytest.raises(ConfigError, match=r"^policy.expert_kernel: system=accelerate does not read it"):
        refuse_unread_policy_fields("accelerate", ["expert_kernel"])
