"""Does this host slow down on its own? `hostload.probe_s` timed back to back on one core, with what the
host's own counters say each second.

Each second: the probe's median speed against the host's usual (the fast end, 10%, of this run's
probes), the CPU other processes took (cores), and the steal time the guest kernel counted (cores). A
stretch of seconds under `hostload.SLOWED` that neither counter explains is the slowdown a measured run
waits out (`hostload.HostSpeed`): on a shared VM, another tenant of the physical core.

    python benchmarks/host_speed.py --seconds 240 --save     # writes results/host_speed_<time>.json
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "results"


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy, steal) clock ticks of the whole host since boot."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = f
    return user + nice + system + irq + softirq, steal


def main() -> int:
    from moe_lightning.bench_args import Parser, positive_int

    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=positive_int, default=240, help="how long to probe")
    ap.add_argument("--save", action="store_true", help=f"write the record under {RESULTS}")
    args = ap.parse_args()
    import torch

    from moe_lightning.files import write_json
    from moe_lightning.hostload import SLOWED, probe_s
    from moe_lightning.report import environment

    torch.set_num_threads(1)
    core = None
    if hasattr(os, "sched_setaffinity"):   # one core, as a bound engine run
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
    tick = os.sysconf("SC_CLK_TCK")
    seconds, start = [], time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        t0, ticks0, own0 = time.perf_counter(), _cpu_ticks(), sum(os.times()[:2])
        probes = []
        while time.perf_counter() - t0 < 1.0:
            probes.append(probe_s())
        wall, ticks1, own1 = time.perf_counter() - t0, _cpu_ticks(), sum(os.times()[:2])
        others = steal = None
        if ticks0 and ticks1:
            others = max(0.0, (ticks1[0] - ticks0[0]) / tick - (own1 - own0)) / wall
            steal = (ticks1[1] - ticks0[1]) / tick / wall
        seconds.append({"t_s": round(t0 - start, 1), "probe_s": statistics.median(probes), "others_cores": others,
                        "steal_cores": steal})
    usual = sorted(s["probe_s"] for s in seconds)[len(seconds) // 10]
    for s in seconds:
        s["speed"] = round(usual / s["probe_s"], 3)
    slow = [s for s in seconds if s["speed"] < SLOWED]
    unexplained = [s for s in slow if (s["others_cores"] or 0) <= 0.25 and (s["steal_cores"] or 0) <= 0.05]
    stretches, run = [], []
    for s in seconds:   # consecutive slowed seconds
        if s["speed"] < SLOWED:
            run.append(s)
        elif run:
            stretches.append(run)
            run = []
    if run:
        stretches.append(run)
    print(f"measured on this host (core {core}): {len(seconds)} s of back-to-back probes, usual probe "
          f"{usual * 1e3:.2f} ms; {len(slow)} s slowed (speed < {SLOWED}), {len(unexplained)} of them with no "
          f"other process busy and no steal counted")
    for st in stretches:
        print(f"  slowed from {st[0]['t_s']:.0f} s for {len(st)} s: speed {min(s['speed'] for s in st):.2f}-"
              f"{max(s['speed'] for s in st):.2f}, others {max(s['others_cores'] or 0 for s in st):.2f} cores, "
              f"steal {max(s['steal_cores'] or 0 for s in st):.2f} cores at most")
    speeds = [s["speed"] for s in seconds]
    print("speed by second: " + " ".join(f"{v:.2f}" for v in speeds))
    if args.save:
        record = {"kind": "measured", "where": "this host", "environment": environment(), "core": core,
                  "usual_probe_s": usual, "slowed_below": SLOWED, "seconds": seconds,
                  "slowed_s": len(slow), "slowed_unexplained_s": len(unexplained),
                  "stretches": [{"from_s": st[0]["t_s"], "length_s": len(st),
                                 "min_speed": min(s["speed"] for s in st)} for st in stretches],
                  "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        path = RESULTS / f"host_speed_{time.strftime('%Y%m%d-%H%M%S')}.json"
        write_json(path, record, indent=2)
        print(f"record: {path}")
    return 0


if __name__ == "__main__":
    from moe_lightning.bench_args import guard

    sys.exit(guard(main))
