"""EPS-MoE kernel selection: the chooser runs the kernel fastest on the call's own routing (per-expert
counts, interpolated between profiled loads), and the profile it reads is the one measured and cached
on this machine."""

from __future__ import annotations

import math

import pytest
import torch

from moe_lightning.config import ModelSpec
from moe_lightning.engine.experts import KERNELS
from moe_lightning.engine.kernel_table import KernelChooser, cached_profile, fastest, interpolated_time
from moe_lightning.errors import ConfigError
from moe_lightning.models.layers import ExpertStack

SPEC = ModelSpec(hidden_size=64, intermediate_size=128, num_experts=8, top_k=2, dtype="float32")
CPU = torch.device("cpu")
# A profile (seconds for 4 experts at each uniform load) where "loop" wins at 1 token per expert and
# "padded" from 4 on; "dense" only at the first two rungs.
TIMES = {1: {"loop": 1.0, "padded": 4.0, "dense": 2.0}, 4: {"loop": 8.0, "padded": 2.0, "dense": 6.0},
         16: {"loop": 16.0, "padded": 4.0}}


def test_interpolation_is_log_log_and_clamped():
    assert interpolated_time(TIMES, "loop", 2) == pytest.approx(math.sqrt(1.0 * 8.0))  # halfway in log load
    assert interpolated_time(TIMES, "padded", 8) == pytest.approx(math.sqrt(2.0 * 4.0))
    assert interpolated_time(TIMES, "loop", 0.25) == 1.0 and interpolated_time(TIMES, "loop", 64) == 16.0
    assert interpolated_time(TIMES, "grouped", 2) == math.inf  # never profiled: never chosen
    assert interpolated_time(TIMES, "dense", 8) == math.inf    # not profiled above this load


def test_the_chooser_estimates_each_kernel_on_the_calls_routing():
    chooser = KernelChooser("auto", SPEC, torch.float32, CPU, times=TIMES)
    per = {k: {load: t / 4 for load, t in ((1, TIMES[1][k]), (4, TIMES[4][k]))} for k in ("loop", "padded")}
    uniform = [4] * 8
    assert chooser.estimated_s("loop", uniform) == pytest.approx(8 * per["loop"][4])
    assert chooser.estimated_s("padded", uniform) == pytest.approx(8 * per["padded"][4])
    # dense: 8 tokens (16 routings) through all 8 experts; profiled load 4 ran 4 experts on 4 * 4 / 2 = 8 tokens
    assert chooser.estimated_s("dense", [2] * 8) == pytest.approx(8 * interpolated_time(TIMES, "dense", 4) / 4)
    assert chooser.name_for([1] * 8) == "loop" and chooser.name_for(uniform) == "padded"
    # The same 23 routings, one expert busy: padding every expert to 16 costs 8 x 1.0 = 8.0 s, while the
    # loop pays 4.0 for the busy expert and 0.25 for each of the others: 5.75 s.
    skewed = [16, 1, 1, 1, 1, 1, 1, 1]
    assert chooser.estimated_s("padded", skewed) == pytest.approx(8.0)
    assert chooser.estimated_s("loop", skewed) == pytest.approx(5.75)
    assert chooser.name_for(skewed) == "loop"
    assert chooser.name_for([0] * 8) in ("loop", "padded", "dense")  # nothing routed: any kernel, no error
    assert fastest(TIMES) == {1: "loop", 4: "padded", 16: "padded"}


def test_the_chooser_runs_the_chosen_kernel_and_counts_it():
    g = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(8, 256, 64, generator=g) * 0.1, torch.randn(8, 64, 128, generator=g) * 0.1
    stack = ExpertStack.single(w13, w2)
    h = torch.randn(5, 64, generator=g)
    weights, ids = torch.full((5, 2), 0.5), torch.tensor([[0, 1]] * 5)  # everything on experts 0 and 1
    chooser = KernelChooser("auto", SPEC, torch.float32, CPU, times=TIMES)
    out = chooser(h, weights, ids, stack)
    name = chooser.name_for([5, 5, 0, 0, 0, 0, 0, 0])
    assert chooser.used == {name: 1}
    torch.testing.assert_close(out, KERNELS["loop"](h, weights, ids, stack))


def test_a_fixed_choice_ignores_the_profile_and_unknown_ones_are_refused():
    assert KernelChooser("loop", SPEC, torch.float32, CPU).name_for([10_000] * 8) == "loop"
    with pytest.raises(ConfigError, match="accepted here: auto"):
        KernelChooser("magic", SPEC, torch.float32, CPU)


def test_the_profile_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_LIGHTNING_CACHE", str(tmp_path))
    times = cached_profile(SPEC, torch.float32, CPU)
    assert set(times) == {1, 2, 4, 8, 16, 32, 64, 128, 256}
    assert all(set(by_kernel) <= set(KERNELS) and min(by_kernel.values()) > 0 for by_kernel in times.values())
    (cached,) = (tmp_path / "kernel-tables").iterdir()
    assert cached_profile(SPEC, torch.float32, CPU) == times  # read back, not measured again
    assert KernelChooser("auto", SPEC, torch.float32, CPU).times == times


def test_padded_and_dense_pay_every_expert_of_a_region_they_touch():
    """`moe_padded` and `moe_dense` run a bmm over a region's whole stack: with one busy expert of eight in
    one region they compute all eight (padded: 8 x 0.5 s at load 4, the loop's 2.0 s wins); with that
    expert alone in its own region (CGOPipe's resident region beside the streamed one) only one (0.5 s)."""
    chooser = KernelChooser("auto", SPEC, torch.float32, CPU, times=TIMES)
    no_dense = KernelChooser("auto", SPEC, torch.float32, CPU,
                             times={load: {k: t for k, t in by.items() if k != "dense"} for load, by in TIMES.items()})
    one_busy = [4, 0, 0, 0, 0, 0, 0, 0]
    assert chooser.estimated_s("padded", one_busy) == pytest.approx(8 * 2.0 / 4)
    assert chooser.estimated_s("loop", one_busy) == pytest.approx(8.0 / 4)
    assert no_dense.name_for(one_busy) == "loop"
    split = [[0], [1, 2, 3, 4, 5, 6, 7]]
    assert chooser.estimated_s("padded", one_busy, split) == pytest.approx(2.0 / 4)
    assert no_dense.name_for(one_busy, split) == "padded"
    # dense: every expert of each region with a token, on all T = 4 / 2 = 2 tokens (profiled load 1)
    assert chooser.estimated_s("dense", one_busy, split) == pytest.approx(1 * TIMES[1]["dense"] / 4)
    # A call reads the regions from the stack it is given.
    g = torch.Generator().manual_seed(0)
    resident = (torch.randn(1, 256, 64, generator=g) * 0.1, torch.randn(1, 64, 128, generator=g) * 0.1)
    streamed = (torch.randn(7, 256, 64, generator=g) * 0.1, torch.randn(7, 64, 128, generator=g) * 0.1)
    stack = ExpertStack([resident[0], streamed[0]], [resident[1], streamed[1]],
                        [(0, 0)] + [(1, i) for i in range(7)])
    h = torch.randn(2, 64, generator=g)
    no_dense(h, torch.full((2, 2), 0.5), torch.tensor([[0, 0], [0, 0]]), stack)
    assert no_dense.used == {"padded": 1}


def test_the_profile_uses_the_kernel_workers_thread_count(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_LIGHTNING_CACHE", str(tmp_path))
    before = torch.get_num_threads()
    cached_profile(SPEC, torch.float32, CPU, threads=1)
    (cached,) = (tmp_path / "kernel-tables").iterdir()
    assert cached.name.startswith("cpu1-") and torch.get_num_threads() == before
