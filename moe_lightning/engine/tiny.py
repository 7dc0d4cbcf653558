"""The tiny test model: a two-layer Mixtral checkpoint written by `transformers` itself (random init)
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
    return dict(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim, num_local_experts=spec.num_experts,
        num_experts_per_tok=spec.top_k, max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=spec.rms_norm_eps, rope_theta=spec.rope_theta, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )


def write_hf_checkpoint(spec: ModelSpec, folder: Path, seed: int = 0, max_shard_size: str | None = None) -> None:
    """Initialise a MixtralForCausalLM with `transformers` and save it (safetensors) to `folder`."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(**hf_config_kwargs(spec))).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)


def ensure_tiny_mixtral(spec: ModelSpec | None = None, seed: int = 0) -> Path:
    """Path of the cached tiny-mixtral folder (config.json, safetensors, tokenizer.json), built if absent."""
    spec = spec or ModelSpec()
    key = json.dumps([hf_config_kwargs(spec), seed, hashlib.sha256(CORPUS.read_bytes()).hexdigest()])
    folder = cache_dir() / f"tiny-mixtral-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (folder / "tokenizer.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-mixtral-", dir=folder.parent))
    try:
        write_hf_checkpoint(spec, tmp, seed)
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
