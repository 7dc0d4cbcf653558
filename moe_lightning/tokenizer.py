"""The tokenizer of a model: its folder's `tokenizer.json`, or, for the Mixtral presets (random weights
at Mixtral-8x7B's shapes, no folder), Mistral's own tokenizer, so that text prompts have their real
lengths in tokens.

Mistral ships the sentencepiece model Mixtral-8x7B uses (`tokenizer.model.v1`, 32000 pieces, BPE with
byte fallback) in the `mistral-common` package (`pip install 'moe-lightning[mistral]'`). It is read with
sentencepiece and rebuilt as a `tokenizers.Tokenizer`, as transformers' Llama converter does: spaces as
"▁" with one prepended, byte fallback, and the merges ordered by piece score (transformers'
`generate_merges`; ordered by id instead, runs of spaces and digits merge differently: 551 of the
test's 1800 texts got other ids). Sentencepiece's split before each word (`split_by_whitespace`) is
kept as a pre-tokenizer; with these pieces no merge crosses it anyway. `tests/test_tokenizer.py` checks
the ids against sentencepiece's own on a corpus and on random text.
"""

from __future__ import annotations

import importlib.resources
import os
from functools import lru_cache

from moe_lightning.config import ModelSpec
from moe_lightning.errors import ConfigError

MISTRAL_V1 = "tokenizer.model.v1"   # in mistral_common/data: Mistral-7B's and Mixtral-8x7B's tokenizer
MISTRAL_V1_VOCAB = 32000


def tokenizer_for(spec: ModelSpec):
    """A `tokenizers.Tokenizer` for `spec`'s text prompts, or None if it has none."""
    if spec.path:
        from moe_lightning.engine.tiny import load_tokenizer

        return load_tokenizer(spec.path)
    if spec.architecture == "mixtral" and spec.vocab_size == MISTRAL_V1_VOCAB:
        return mistral_v1()
    return None


@lru_cache(maxsize=1)
def mistral_v1():
    """Mixtral-8x7B's tokenizer from mistral-common's sentencepiece model (module docstring)."""
    try:
        import sentencepiece
        from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
        from tokenizers.models import BPE
        from transformers.tokenization_utils_base import generate_merges

        path = importlib.resources.files("mistral_common") / "data" / MISTRAL_V1
    except ImportError as exc:
        raise ConfigError(f"text prompts on a Mixtral preset need Mistral's tokenizer ({exc.name} is not "
                          "installed): pip install 'moe-lightning[mistral]', or give \"input_ids\"") from None
    sp = sentencepiece.SentencePieceProcessor(model_file=os.fspath(path))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    merges = generate_merges(vocab, {piece: sp.get_score(i) for i, piece in enumerate(pieces)})
    tok = Tokenizer(BPE(vocab, merges, unk_token=sp.id_to_piece(sp.unk_id()), fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("▁*[^▁]+|▁+"), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok
