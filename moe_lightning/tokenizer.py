"""The tokenizer of a model: its folder's, or, for the Mixtral presets (random weights at Mixtral-8x7B's
shapes, no folder), Mistral's own tokenizer, so that text prompts have their real lengths in tokens.

A folder's text prompts are encoded by transformers' `AutoTokenizer.from_pretrained(folder)` with its
default arguments, as a user of `transformers` would encode them: special tokens and all (the BOS a
Mixtral- or Llama-style tokenizer adds, none for Qwen's). tokenizer.json's post-processor alone is not
that: transformers 5.23 picks a tokenizer class by `model_type` and tokenizer_config.json, and some
classes rebuild the pipeline and its special tokens (OLMoE's GPTNeoXTokenizer adds none, whatever
tokenizer.json's template says). transformers is imported only when a prompt is text. Outputs are
decoded with tokenizer.json itself.

Mistral ships the sentencepiece model Mixtral-8x7B uses (`tokenizer.model.v1`, 32000 pieces, BPE with
byte fallback) in the `mistral-common` package (`pip install 'moe-lightning[mistral]'`). It is read with
sentencepiece and rebuilt as a `tokenizers.Tokenizer`, as transformers' Llama converter does: spaces as
"▁" with one prepended, byte fallback, and the merges ordered by piece score (transformers'
`generate_merges`; ordered by id instead, runs of spaces and digits merge differently: 551 of the
test's 1800 texts got other ids). Sentencepiece's split before each word (`split_by_whitespace`) is
kept as a pre-tokenizer; with these pieces no merge crosses it anyway. Its post-processor prepends
<s>, as the converter's does (Mixtral's tokenizer adds a BOS). `tests/test_tokenizer.py` checks the ids
against sentencepiece's own on a corpus and on random text.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
from collections.abc import Sequence
from functools import lru_cache

from moe_lightning.config import ModelSpec
from moe_lightning.errors import CheckpointError, ConfigError

MISTRAL_V1 = "tokenizer.model.v1"   # in mistral_common/data: Mistral-7B's and Mixtral-8x7B's tokenizer
MISTRAL_V1_VOCAB = 32000


class TextTokenizer:
    """A model's tokenizer: `ids(text)` for a text prompt (module docstring), `decode` for outputs.
    `backend`: tokenizer.json (or Mistral's, rebuilt); `folder`: the checkpoint folder whose transformers
    tokenizer encodes prompts (None: the backend does, its post-processor included)."""

    def __init__(self, backend, folder: str | None = None):
        self.backend, self.folder = backend, folder
        self._auto = None

    def ids(self, text: str) -> list[int]:
        if self.folder is None:
            return self.backend.encode(text).ids
        auto = self._load()
        with _quiet_transformers():
            return list(auto(text)["input_ids"])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _load(self):
        if self._auto is None:
            try:
                from transformers import AutoTokenizer

                with _quiet_transformers():
                    self._auto = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
            except Exception as exc:  # noqa: BLE001 -- any failure of transformers' loader is one line
                from moe_lightning.engine.hf_config import one_line

                raise CheckpointError(f"model.path {self.folder}: transformers' AutoTokenizer cannot load its "
                                      f"tokenizer ({one_line(exc)}); give \"input_ids\" instead of text") from None
        return self._auto


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' own warnings (a tokenizer class it swaps, a prompt past model_max_length: moe-lightning
    checks lengths itself) kept off the console while it loads or encodes."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def tokenizer_for(spec: ModelSpec) -> TextTokenizer | None:
    """`spec`'s tokenizer for text prompts and outputs, or None if it has none."""
    if spec.path:
        from moe_lightning.engine.tiny import load_tokenizer

        backend = load_tokenizer(spec.path)
        return None if backend is None else TextTokenizer(backend, str(spec.path))
    if _mistral_preset(spec):
        try:
            return TextTokenizer(mistral_v1())
        except ConfigError:   # prompts given as "input_ids" need none; a text prompt says why (`missing`)
            return None
    return None


def missing(spec: ModelSpec) -> str:
    """Why a text prompt cannot be encoded for `spec` (`tokenizer_for` gave None), with the fix."""
    if _mistral_preset(spec):
        try:
            mistral_v1()
        except ConfigError as exc:
            return str(exc)
    model = f"model.path {spec.path}" if spec.path else f"model={spec.name}"
    return f'"prompt" needs a tokenizer, and {model} has no tokenizer.json; give "input_ids" instead'


def _mistral_preset(spec: ModelSpec) -> bool:
    return not spec.path and spec.architecture == "mixtral" and spec.vocab_size == MISTRAL_V1_VOCAB


@lru_cache(maxsize=1)
def mistral_v1():
    """Mixtral-8x7B's tokenizer from mistral-common's sentencepiece model (module docstring)."""
    try:
        import sentencepiece
        from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
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
    bos = sp.id_to_piece(sp.bos_id())   # <s>, id 1: added to every prompt, as transformers' Llama converter does
    tok.post_processor = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                       special_tokens=[(bos, sp.bos_id())])
    return tok
