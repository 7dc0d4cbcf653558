"""Mixtral-8x7B's tokenizer for the Mixtral presets, from mistral-common's sentencepiece model: the ids
are sentencepiece's own (mistral-common's reference) on a corpus and on random text, and text prompts
get their real lengths in tokens."""

from __future__ import annotations

import importlib.resources
import json
import random
import sys

import pytest

from moe_lightning.config import Workload
from moe_lightning.errors import WorkloadError
from moe_lightning.tuner.presets import load_preset

sentencepiece = pytest.importorskip("sentencepiece")
pytest.importorskip("mistral_common", reason="the mistral extra is not installed")

from moe_lightning.tokenizer import MISTRAL_V1, mistral_v1, tokenizer_for  # noqa: E402


@pytest.fixture(scope="module")
def reference():
    path = importlib.resources.files("mistral_common") / "data" / MISTRAL_V1
    return sentencepiece.SentencePieceProcessor(model_file=str(path))


def texts() -> list[str]:
    corpus = (importlib.resources.files("moe_lightning") / "assets" / "corpus.txt").read_text()
    rng = random.Random(0)
    alphabet = list("abcXYZ0123456789.,;:!?'\"()[]<>-_/\\@#%&*+=~|") + [" "] * 10 + list("\n\té中🤖ü\u00a0—")
    words = corpus.split()
    return (corpus.splitlines() + ["x  y   z    w", "  1", "trailing   ", "   ", "<s> not special"]
            + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(1500)]
            + [" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))) for _ in range(300)])


def test_ids_are_sentencepieces_own(reference):
    tok = mistral_v1()
    assert tok.get_vocab_size() == reference.get_piece_size() == 32000
    differ = [t for t in texts() if tok.encode(t, add_special_tokens=False).ids != reference.encode(t)]
    assert differ == []
    text = "Mixtral routes each token to 2 of 8 experts. Ünïcödé and 🤖 fall back to bytes."
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == reference.decode(reference.encode(text))


def test_mixtral_presets_use_it_and_others_do_not():
    assert tokenizer_for(load_preset("model", "mixtral-8x7b")).backend is mistral_v1()
    assert tokenizer_for(load_preset("model", "qwen3-30b-a3b")) is None      # no folder, no tokenizer


def test_text_prompts_are_planned_at_their_real_lengths(tmp_path, reference):
    from moe_lightning.tasks.plan import planning_workload

    prompts = ["Summarise the paper on offloaded MoE inference.", "x  y   z", "Hello"]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    spec = load_preset("model", "mixtral-8x7b")
    _, lengths = planning_workload(Workload(name="jsonl", path=str(path)), spec)
    assert lengths == [1 + len(reference.encode(p)) for p in prompts]      # BOS + the prompt's pieces


def test_without_mistral_common_only_a_text_prompt_is_refused(monkeypatch, tmp_path):
    """Prompts given as token ids need no tokenizer: a Mixtral preset runs them without the mistral extra
    (it refused every workload once); a text prompt is refused in one line that says what to install."""
    from moe_lightning.tasks.plan import planning_workload

    spec = load_preset("model", "mixtral-8x7b")
    ids, text = tmp_path / "ids.jsonl", tmp_path / "text.jsonl"
    ids.write_text(json.dumps({"input_ids": [1, 851, 349]}) + "\n")
    text.write_text(json.dumps({"prompt": "Hello"}) + "\n")
    mistral_v1.cache_clear()
    monkeypatch.setitem(sys.modules, "mistral_common", None)
    try:
        assert tokenizer_for(spec) is None
        assert planning_workload(Workload(name="jsonl", path=str(ids)), spec)[1] == [3]
        with pytest.raises(WorkloadError, match=r":1: text prompts on a Mixtral preset need Mistral's tokenizer "
                                              r".*pip install 'moe-lightning\[mistral\]'"):
            planning_workload(Workload(name="jsonl", path=str(text)), spec)
    finally:
        mistral_v1.cache_clear()
