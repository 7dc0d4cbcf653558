"""task=calibrate: measure this machine and write a hardware profile YAML that `hardware=` accepts.

The YAML goes to `out_yaml`, or `hardware.yaml` in the run folder; the run document (measurements in
`extra`) to cfg.out or the run folder's run.json. `quick=true` uses small sizes (seconds, not minutes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from moe_lightning.engine.hf_config import model_label
from moe_lightning.files import atomic_write
from moe_lightning.report import Metrics, RunReport, as_dict, environment
from moe_lightning.tasks.plan import out_path

if TYPE_CHECKING:
    from moe_lightning.run_config import RunConfig  # type hints only: it sits above the tasks

PACKAGE_HARDWARE_DIR = Path(__file__).resolve().parent.parent / "conf" / "hardware"


@dataclass
class CalibrateTask:
    name: str = "calibrate"
    out_yaml: str | None = None
    quick: bool = False

    def yaml_path(self, cfg: RunConfig) -> Path:
        """Where the profile goes: out_yaml, else hardware.yaml beside the run document (the CLI checks it
        before measuring, as it does out=)."""
        return Path(self.out_yaml) if self.out_yaml else out_path(cfg).parent / "hardware.yaml"

    def run(self, cfg: RunConfig) -> RunReport:
        from moe_lightning.tuner.calibrate import hardware_spec, hardware_yaml, measure, override_args

        out = out_path(cfg)
        yaml_path = self.yaml_path(cfg)
        profile = yaml_path.stem if yaml_path.stem != "hardware" else "calibrated"
        from moe_lightning.hostload import HostLoad, measurement_lock
        from moe_lightning.systems import resolve_device
        from moe_lightning.tasks.generate import _detected

        load = HostLoad()   # the probes time the host: another process's load would be in the profile
        with measurement_lock() as lock_wait_s, load:
            m = measure(quick=self.quick, device=cfg.device)
        host = load.report
        host.lock_wait_s = lock_wait_s
        noise = ([f"other processes kept {host.others_busy_cores:.2f} cores busy while it measured: calibrate "
                  "again on a quiet host"] if host.busy else [])
        hw = hardware_spec(m, name=profile)
        atomic_write(yaml_path, hardware_yaml(hw, m))
        kernels = expert_kernel_crossover(cfg)
        report = RunReport(
            system="none", task=self.name, model={},
            hardware={"profile": as_dict(hw), "detected": _detected(resolve_device(cfg.device))}, workload={},
            policy={}, metrics=Metrics(kind="measured", noisy=bool(noise), noise=noise),
            environment={**environment(), "host_load": host.to_dict()},
            extra={"measurements": m.as_dict(), "hardware_yaml": str(yaml_path),
                   "expert_kernel_by_tokens_per_expert": kernels})
        report.to_json(out)
        print(table(m))
        for reason in noise:
            print(f"NOISY: {reason}")
        print(f"expert kernel by tokens per expert ({model_label(cfg.model)} shapes): "
              + ", ".join(f"{load}: {name}" for load, name in kernels.items()))
        print(f"\nhardware profile: {yaml_path}\nrun document: {out}\n")
        print("use it by copying it into the package's hardware presets:\n"
              f"  cp {yaml_path} {PACKAGE_HARDWARE_DIR / (profile + '.yaml')}\n"
              f"  moe-lightning hardware={profile} ...\n"
              "or, without copying, as overrides:\n"
              f"  moe-lightning {' '.join(override_args(hw))} ...")
        return report


def expert_kernel_crossover(cfg: RunConfig) -> dict[int, str]:
    """The EPS-MoE crossover for the configured model's expert shapes on this machine, profiled (and
    cached, so the engine's `expert_kernel=auto` uses the same table)."""
    import dataclasses

    from moe_lightning.engine.kernel_table import cached_profile, fastest
    from moe_lightning.engine.weights import torch_dtype
    from moe_lightning.systems import resolve_device

    spec = cfg.model
    dtype = "bfloat16" if spec.dtype == "auto" else spec.dtype
    device = resolve_device(cfg.device)
    if device.type != "cuda" and dtype != "float32":
        dtype = "float32"  # the CPU plays the GPU in fp32
    threads = None
    if device.type != "cuda":   # the GPU role's threads beside CPU attention (the common layout)
        from moe_lightning.threads import gpu_role_threads, op_elements

        threads = gpu_role_threads(None, op_elements(spec))[0]
    return fastest(cached_profile(dataclasses.replace(spec, dtype=dtype), torch_dtype(dtype), device, threads))


def table(m) -> str:
    from moe_lightning.tuner.calibrate import format_curve

    role = "GPU" if m.device == "cuda" else "GPU role (played by the CPU)"
    # Without CUDA, measure() splits the host's RAM between the roles: shares it sets, which printed bare
    # read as this host's memory
    host_gib = m.gpu_memory_gib + m.cpu_memory_gib
    rows = [
        (f"{role}", m.gpu_name),
        ("  peak", f"{m.gpu_peak_tflops:.3f} TFLOP/s ({'bf16' if m.device == 'cuda' else 'fp32'} matmul)"),
        ("  memory bandwidth", f"{m.gpu_bandwidth_gbps:.1f} GB/s (copy, read + write)"),
        ("  memory", f"{m.gpu_memory_gib:.1f} GiB" + ("" if m.device == "cuda" else
                     f" (a third of this host's {host_gib:.1f} GiB, the GPU role's share: set, not measured)")),
        ("  GEMM by rows", format_curve(m.gemm_rows, m.gemm_tflops)),
        ("  experts by tokens/expert", format_curve(m.expert_loads, m.expert_tflops)),
        ("link H2D / D2H", f"{m.h2d_gbps:.1f} / {m.d2h_gbps:.1f} GB/s"
         + (" (pinned)" if m.device == "cuda" else " (thread memcpy)")),
        ("CPU", f"{m.cpu_name}, {m.cpu_cores} cores, {m.cpu_memory_gib:.1f} GiB"
         + ("" if m.device == "cuda" else " (the other two thirds)")),
        ("  peak", f"{m.cpu_peak_tflops:.3f} TFLOP/s (fp32 matmul)"),
        ("  memory bandwidth", f"{m.cpu_bandwidth_gbps:.1f} GB/s (copy, read + write)"),
        ("  decode attention", f"{m.cpu_attn_gbps:.1f} GB/s of K/V read"),
        ("executor overhead", f"{m.task_overhead_s * 1e6:.0f} us per task, "
                              f"{m.step_overhead_s * 1e6:.0f} us per graph"),
        ("host", f"{m.issue_overhead_s * 1e6:.1f} us per task issued, {m.sync_overhead_s * 1e6:.0f} us per barrier"),
    ]
    title = f"calibration{' (quick)' if m.quick else ''}: {m.seconds:.1f} s"
    return "\n".join([title] + [f"  {k:<32}{v}" for k, v in rows])
