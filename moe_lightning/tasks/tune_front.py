"""What a tune reports as its result: the best trial, or with `tuner.multi_objective=true` every trial on
the Pareto front (throughput against peak GPU memory), each with its policy and each objective with its
unit and kind.

The kinds: a simulated study's throughput is the simulator's on the hardware profile and its peak GPU
memory the memory plan's (`planned`: nothing was allocated); a measured study's throughput is the median
of the trial's timed repeats and its peak GPU memory what the run allocated (`measured`).
"""

from __future__ import annotations

from typing import Any

from moe_lightning.config import GiB, ModelSpec, Policy
from moe_lightning.report import Spread, as_dict

# (throughput kind, peak GPU memory kind) per tuner.objective
KINDS = {"simulate": ("simulated", "planned"), "measure": ("measured", "measured")}


def objectives(objective: str, multi: bool) -> list[dict[str, str]]:
    """What each entry of a trial's `values` is: its name (the study's metric name), unit, kind and
    direction."""
    tok, mem = KINDS[objective]
    out = [{"name": "throughput_tok_s", "unit": "tokens/s", "kind": tok, "direction": "maximize"}]
    if multi:
        out.append({"name": "peak_gpu_bytes", "unit": "bytes", "kind": mem, "direction": "minimize"})
    return out


def ranked_front(trials: list) -> list:
    """The best trials, fastest first: the first is the one the tune compares with the baselines."""
    return sorted(trials, key=lambda t: (-t.values[0], t.number))


def trial_policy(t, spec: ModelSpec, base: Policy) -> Policy:
    """The policy a completed trial ran: as its objective recorded it (rounded to whole expert groups on
    several GPUs), else rebuilt from its parameters."""
    from moe_lightning.tuner.search import policy_from_params

    recorded = t.user_attrs.get("policy")
    return Policy(**recorded) if recorded else policy_from_params(t.params, spec, base)


def front_entry(t, spec: ModelSpec, base: Policy, objective: str) -> dict[str, Any]:
    """One trial of the front for the run document. `number`, `values` and `params` are the keys the
    document has always had; the policy and the objectives by name, unit and kind are beside them."""
    tok, mem = KINDS[objective]
    entry = {"number": t.number, "values": list(t.values), "params": dict(t.params),
             "seed": t.user_attrs.get("seed") or "sampled", "policy": as_dict(trial_policy(t, spec, base)),
             "throughput_tok_s": t.values[0], "throughput_kind": tok}
    if len(t.values) > 1:
        entry |= {"peak_gpu_bytes": int(t.values[1]), "peak_gpu_kind": mem}
    if t.user_attrs.get("parallel"):
        entry["parallel"] = t.user_attrs["parallel"]
    return entry


def policy_words(p: Policy, layout: dict | None = None) -> str:
    return (f"N={p.batch_size} mu={p.micro_batch_size} attn_on_gpu={p.attn_on_gpu} r_w={p.expert_gpu_fraction:.3f} "
            f"r_c={p.kv_gpu_fraction:.3f} kernel={p.expert_kernel}"
            + (f" parallel.tensor={layout['tensor']} parallel.expert={layout['expert']}" if layout else ""))


def throughput_words(t, objective: str) -> str:
    """`1234.56 tok/s simulated`, or a measured trial's median with its spread."""
    tok = KINDS[objective][0]
    spread = (t.user_attrs.get("spread") or {}).get("throughput_tok_s")
    shown = Spread.from_dict(spread).show(".2f") if spread else f"{t.values[0]:.2f}"
    return f"{shown} tok/s {tok}" + (", median of repeats" if spread else "")


def front_lines(front: list, spec: ModelSpec, base: Policy, objective: str) -> list[str]:
    """The Pareto front as printed: one line per trial, fastest first, each objective with its unit and kind."""
    mem = KINDS[objective][1]
    lines = [f"Pareto front: {len(front)} trial{'s' if len(front) != 1 else ''} (no other trial has both more "
             "tokens/s and less peak GPU memory), fastest first:"]
    for t in front:
        lines.append(f"  trial {t.number} ({t.user_attrs.get('seed') or 'sampled'}): {throughput_words(t, objective)}, "
                     f"peak GPU memory {t.values[1] / GiB:.4g} GiB {mem}; "
                     f"{policy_words(trial_policy(t, spec, base), t.user_attrs.get('parallel'))}")
    return lines
