"""Hugging Face `transformers` + `accelerate` as a real peer: the family's causal LM (`MixtralForCausalLM`,
`Qwen3MoeForCausalLM`, ...) `.from_pretrained` with
`device_map="auto"` and `max_memory` from the same budget as every other system, driven through the
shared generation driver (`BatchRunner`), so sampling, stopping and timing are identical.

- Weights: `model.weights=checkpoint` loads the checkpoint folder itself. `model.weights=random` first
  writes the same seeded random weights the engine sees (`RandomWeights`) to a temporary Hugging Face
  folder (config.json + one safetensors shard per layer), loads it with `from_pretrained` exactly as a
  checkpoint, and deletes it; writing and loading are not timed (as for every system).
- Memory: GPU 0 gets `hardware.gpu_budget_bytes` minus what the run needs beside the weights (the KV
  cache of the batch, which transformers keeps on the execution device, and the activations:
  `policies.accelerate_reserve_bytes`); the CPU gets `hardware.cpu_budget_bytes`. What does not fit on
  the GPU is offloaded by accelerate's hooks (weights copied to the GPU at every forward); beyond the CPU
  budget, to an offload folder on disk. Without CUDA everything runs on the CPU.
- Generation: a batch is left-padded with an attention mask and position ids from the mask (what
  `model.generate` builds), prefilled once into a `DynamicCache`, then decoded one token per step with
  the same model forward `generate` calls. The step loop is the shared driver's rather than
  `model.generate`'s, so that every system is sampled, stopped and timed by the same code.
- Link bytes (CUDA only) are an estimate: the bytes of the weights accelerate placed off the GPU times
  the forward calls (its hooks move them to the GPU on every forward); flagged in `extra`.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch

from moe_lightning.config import HardwareSpec, ModelSpec, Policy, Workload
from moe_lightning.engine.weights import WeightSource, expected_shapes, torch_dtype

log = logging.getLogger("moe_lightning.accelerate")


def write_random_checkpoint(spec: ModelSpec, source: WeightSource, folder: Path) -> Path:
    """Write `source`'s tensors as a Hugging Face folder of its family (one safetensors shard per layer)."""
    from safetensors.torch import save_file

    from moe_lightning.engine.tiny import hf_classes, hf_config_kwargs

    folder.mkdir(parents=True, exist_ok=True)
    cfg = hf_classes(spec)[0](**hf_config_kwargs(spec))
    cfg.dtype = spec.dtype
    cfg.save_pretrained(folder)
    names = list(expected_shapes(spec))
    groups: dict[str, list[str]] = {}
    for n in names:
        layer = re.search(r"\.(?:layers|blocks)\.(\d+)\.", n)
        groups.setdefault(layer.group(1) if layer else "other", []).append(n)
    weight_map = {}
    for s, group in enumerate(groups.values()):
        file = f"model-{s + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: source.tensor(n).contiguous() for n in group}, str(folder / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(group, file)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def _check_finite(model, folder: Path) -> None:
    """NaN or Inf in a loaded weight is an error naming it, as the engine's own loader does (weights that
    accelerate left on disk, on the meta device here, are not read: accelerate loads them per forward)."""
    from moe_lightning.engine.weights import is_finite
    from moe_lightning.errors import CheckpointError

    for name, p in model.named_parameters():
        if p.device.type != "meta" and not is_finite(p.detach()):
            raise CheckpointError(f"{folder}: tensor {name!r} holds NaN or Inf values (a corrupt checkpoint)")


class AccelerateRunner:
    """`BatchRunner` over a transformers model dispatched by accelerate."""

    def __init__(self, spec: ModelSpec, source: WeightSource, hardware: HardwareSpec, policy: Policy,
                 workload: Workload, device: torch.device, trace: bool = False):
        from transformers.utils import logging as hf_logging

        from moe_lightning.baselines.policies import accelerate_reserve_bytes
        from moe_lightning.engine.tiny import hf_classes

        self.spec, self.policy, self.device = spec, policy, device
        self.cuda = device.type == "cuda"
        tmp = None
        if spec.weights == "random":
            from moe_lightning.engine.tiny import cache_dir

            cache_dir().mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix="accelerate-random-", dir=cache_dir()))
            folder = write_random_checkpoint(spec, source, tmp)
        else:
            folder = Path(spec.path)
        self.offload_dir = Path(tempfile.mkdtemp(prefix="accelerate-offload-"))
        weakref.finalize(self, shutil.rmtree, self.offload_dir, True)
        try:
            self.max_memory: dict = {"cpu": hardware.cpu_budget_bytes}
            if self.cuda:
                reserve = accelerate_reserve_bytes(spec, workload, policy.batch_size)
                self.max_memory = {device.index or 0: max(0, hardware.gpu_budget_bytes - reserve), **self.max_memory}
            hf_logging.disable_progress_bar()   # the run's own progress bar (task.progress) is the one shown
            config_cls, model_cls = hf_classes(spec)
            config = config_cls.from_pretrained(folder)
            config.num_hidden_layers = spec.num_layers  # a truncated model reads the first layers only
            self.model = model_cls.from_pretrained(
                folder, config=config, dtype=torch_dtype(spec.dtype), device_map="auto",
                max_memory=self.max_memory, offload_folder=str(self.offload_dir)).eval()
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        if spec.weights == "checkpoint":
            _check_finite(self.model, folder)
        # What the peer computes in, as transformers loaded it: transformers 5.17 dequantizes gpt-oss's MXFP4
        # experts to bf16 under model.dtype=float32, and its run is then not the fp32 run the document names.
        self.weight_dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in self.model.parameters()
                                     if p.is_floating_point()})
        if self.weight_dtypes != [spec.dtype]:
            log.warning("accelerate: transformers loaded this checkpoint's weights as %s under model.dtype=%s; "
                        "the peer runs them as transformers does", ", ".join(self.weight_dtypes), spec.dtype)
        # transformers leaves hf_device_map unset when everything landed on one device.
        self.device_map = dict(getattr(self.model, "hf_device_map", None) or
                               {"": str(next(self.model.parameters()).device)})
        self.offloaded_bytes = self._offloaded_bytes() if self.cuda else 0
        self.forwards = 0
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        log.info("accelerate: device_map %s", _summarise(self.device_map))

    def _offloaded_bytes(self) -> int:
        off = {k for k, v in self.device_map.items() if v in ("cpu", "disk")}
        total = 0
        for name, p in self.model.named_parameters():
            if any(name == k or name.startswith(k + ".") for k in off):
                total += p.numel() * p.element_size()
        return total

    # BatchRunner ------------------------------------------------------------------------------------

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions,
                             past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    def prefill(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> torch.Tensor:
        from transformers import DynamicCache

        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        self.mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, width - len(p):] = torch.tensor(p, dtype=torch.long)
            self.mask[b, width - len(p):] = 1
        positions = (self.mask.cumsum(-1) - 1).masked_fill(self.mask == 0, 0)
        ids, self.mask, positions = ids.to(self.device), self.mask.to(self.device), positions.to(self.device)
        self.last_pos = positions[:, -1]
        self.cache = DynamicCache(config=self.model.config)
        return self._forward(ids, positions)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], dim=1)
        self.last_pos = self.last_pos + 1
        return self._forward(tokens[:, None], self.last_pos[:, None])

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_stats(self) -> None:
        self.forwards = 0

    def stats(self) -> dict:
        h2d = self.offloaded_bytes * self.forwards
        return {
            "peak_gpu_bytes": int(torch.cuda.max_memory_allocated(self.device)) if self.cuda else 0,
            "link_bytes": {"h2d": h2d, "d2h": 0},
            "utilisation": {},
            "extra": {"device_map": _summarise(self.device_map), "max_memory": {str(k): v for k, v in
                                                                                self.max_memory.items()},
                      "offloaded_weight_bytes": self.offloaded_bytes, "link_bytes_estimated": True,
                      "weight_dtypes": self.weight_dtypes},
        }


def _summarise(device_map: dict) -> dict[str, int]:
    """Modules per device, e.g. {"0": 12, "cpu": 20}."""
    out: dict[str, int] = {}
    for v in device_map.values():
        out[str(v)] = out.get(str(v), 0) + 1
    return out
