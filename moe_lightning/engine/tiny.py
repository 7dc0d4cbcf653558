"""The tiny test models: two-layer checkpoints written by `transformers` itself (random init)
with a byte-level BPE tokenizer trained on `assets/corpus.txt`, built once and cached outside git.

Cache: $MOE_LIGHTNING_CACHE (default ~/.cache/moe-lightning)/tiny-mixtral-<hash>; the hash covers the
shapes, the seed and the corpus, so a change to any of them builds a new folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from moe_lightning.config import ModelSpec

CORPUS = Path(__file__).resolve().parent.parent / "assets" / "corpus.txt"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in Mixtral
MLA_GAIN = 4.0   # perturbed tiny MLA checkpoints: attention projections and routed experts x4


def cache_dir() -> Path:
    return Path(os.environ.get("MOE_LIGHTNING_CACHE", Path.home() / ".cache" / "moe-lightning"))


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(CORPUS)], trainer)
    return tok


def hf_config_kwargs(spec: ModelSpec) -> dict:
    """transformers config kwargs of `spec` in its family's config class."""
    from moe_lightning.models import family

    return family(spec).hf_config(spec)


def hf_classes(spec: ModelSpec):
    """(config class, causal-LM class) of `spec`'s family in transformers."""
    import transformers

    from moe_lightning.models import family

    fam = family(spec)
    return getattr(transformers, fam.hf_config_class), getattr(transformers, fam.hf_class)


def write_hf_checkpoint(spec: ModelSpec, folder: Path, seed: int = 0, max_shard_size: str | None = None,
                        perturb: bool = False) -> None:
    """Initialise the family's transformers model at `spec`'s shapes (random init, seeded) and save it
    (safetensors) to `folder`. `perturb`: norm weights and biases random too (transformers starts them
    at one and zero), so that a norm or bias a loader dropped changes the tokens."""
    import torch

    config_cls, model_cls = hf_classes(spec)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**hf_config_kwargs(spec))).eval()
    if perturb:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name.split(".")[-2]:
                    p.normal_(1.0, 0.2)
                elif name.endswith((".bias", "_bias")):   # gpt-oss's expert biases too (smaller: every layer
                    p.normal_(0.0, 0.05 if spec.attention_sinks else 0.2)   # adds two to the residual)
                elif name.endswith(".sinks"):
                    p.normal_(0.0, 1.0)
            for name, b in model.named_buffers():
                if name.endswith("e_score_correction_bias"):   # DeepSeek-V3's router, zero at init
                    b.normal_(0.0, 0.05)
            if spec.mla or spec.attention_sinks:   # sharper attention and louder experts, so that RoPE, YaRN,
                for name, p in model.named_parameters():   # the softmax scale, a window, a sink and each
                    if any(k in name for k in ("q_proj", "k_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",
                                               "experts.")):   # routing choice show in the tokens
                        p.mul_(MLA_GAIN)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()   # building a cached fixture is set-up: its "Writing model shards" bar
    try:                                # printed under task.progress=false and between a run's own lines
        model.save_pretrained(folder, **kwargs)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    if spec.expert_format == "mxfp4":
        pack_experts_mxfp4(folder, seed)


def pack_experts_mxfp4(folder: Path, seed: int) -> None:
    """Replace each fused expert tensor of a saved gpt-oss checkpoint (`mlp.experts.gate_up_proj`
    [E, H, 2F], `down_proj` [E, F, H]) by MXFP4 blocks and scales of the same matrices as the published
    checkpoints store them ([E, 2F, H/32, 16] and [E, 2F, H/32] of x W^T's weight, ...), with seeded random
    4-bit values and scales (transformers cannot quantize on a CPU; it dequantizes them as it loads)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            names = f.keys()
            tensors, metadata = {k: f.get_tensor(k) for k in names}, f.metadata()
        for name in [n for n in tensors if n.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))]:
            E, cols, rows = tensors.pop(name).shape   # stored [E, in, out]; MXFP4 packs [E, out, in]
            tensors[name + "_blocks"] = torch.randint(0, 256, (E, rows, cols // 32, 16), generator=gen,
                                                      dtype=torch.uint8)
            tensors[name + "_scales"] = torch.randint(120, 124, (E, rows, cols // 32), generator=gen,
                                                      dtype=torch.uint8)
            if index is not None:
                shard = index["weight_map"].pop(name)
                index["weight_map"] |= {name + "_blocks": shard, name + "_scales": shard}
        save_file(tensors, str(file), metadata=metadata)
    if index is not None:
        index_path.write_text(json.dumps(index, indent=2))


def ensure_tiny_mixtral(spec: ModelSpec | None = None, seed: int = 0) -> Path:
    """Path of the cached tiny-mixtral folder (config.json, safetensors, tokenizer.json), built if absent."""
    return ensure_tiny(spec or ModelSpec(), seed)


def ensure_tiny(spec: ModelSpec, seed: int = 0, max_shard_size: str | None = None, perturb: bool = False) -> Path:
    """Path of a cached tiny checkpoint of `spec`'s family and shapes (config.json, safetensors shards,
    tokenizer.json), written by transformers and built if absent."""
    key = [hf_config_kwargs(spec), seed, hashlib.sha256(CORPUS.read_bytes()).hexdigest()]
    if max_shard_size or perturb:
        key += [max_shard_size, perturb]
    if perturb and spec.mla:
        key += ["experts", MLA_GAIN]
    elif perturb and spec.attention_sinks:
        key += ["k_proj", "experts", MLA_GAIN, "bias 0.05"]
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]
    name = f"tiny-{spec.architecture.replace('_', '-')}"
    folder = cache_dir() / f"{name}-{digest}"
    if (folder / "tokenizer.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        write_hf_checkpoint(spec, tmp, seed, max_shard_size, perturb)
        build_tokenizer(spec.vocab_size).save(str(tmp / "tokenizer.json"))  # written last: marks completion
        with contextlib.suppress(OSError):  # another process finished first
            tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_tokenizer(folder: str | os.PathLike):
    """The folder's tokenizer.json as a `tokenizers.Tokenizer`, or None when the folder has none."""
    path = Path(folder) / "tokenizer.json"
    if not path.exists():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))
