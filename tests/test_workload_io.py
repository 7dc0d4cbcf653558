from __future__ import annotations

import json

import pytest

from moe_lightning.config import ModelSpec, Workload
from moe_lightning.errors import WorkloadError
from moe_lightning.workload_io import load_requests, read_jsonl, synthetic_lengths

SPEC = ModelSpec()


def test_missing_file(tmp_path):
    with pytest.raises(WorkloadError, match="prompts file not found"):
        read_jsonl(tmp_path / "nope.jsonl", SPEC)


def test_empty_file(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("\n\n")
    with pytest.raises(WorkloadError, match="empty"):
        read_jsonl(f, SPEC)


def test_malformed_line_names_its_number(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"input_ids": [5, 6]}\n\n{"input_ids": [5, 6\n')
    with pytest.raises(WorkloadError) as exc:
        read_jsonl(f, SPEC)
    assert f"{f}:3:" in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("row", [{"text": "x"}, {"input_ids": []}, {"input_ids": [9999]}, {"prompt": ""}, [1, 2],
                                 {"input_ids": [5], "max_new_tokens": 0}, {"input_ids": [5], "max_new_tokens": 2.5},
                                 {"input_ids": [5], "max_new_tokens": True}, {"input_ids": [5], "max_new_tokens": "4"}])
def test_bad_rows(tmp_path, row):
    f = tmp_path / "rows.jsonl"
    f.write_text(json.dumps(row) + "\n")
    with pytest.raises(WorkloadError, match=":1:"):
        read_jsonl(f, SPEC)


def test_text_prompts_need_a_tokenizer(tmp_path):
    f = tmp_path / "text.jsonl"
    f.write_text('{"prompt": "hello"}\n')
    with pytest.raises(WorkloadError, match="tokenizer"):
        read_jsonl(f, SPEC, tokenizer=None)


def test_ids_and_order_kept(tmp_path, tiny_path):
    from moe_lightning.engine.tiny import load_tokenizer
    from moe_lightning.tokenizer import TextTokenizer

    f = tmp_path / "p.jsonl"
    f.write_text('{"id": "b", "prompt": "The router picks"}\n{"input_ids": [7, 8, 9]}\n')
    reqs = read_jsonl(f, SPEC, TextTokenizer(load_tokenizer(tiny_path), str(tiny_path)))
    assert [r.id for r in reqs] == ["b", 1]
    assert len(reqs[0].input_ids) > 2 and reqs[0].prompt == "The router picks"
    assert reqs[1].input_ids == [7, 8, 9]


@pytest.mark.parametrize("avg, mx", [(77, 418), (242, 256), (1693, 1984), (16, 32)])
def test_synthetic_lengths_follow_the_workload(avg, mx):
    lengths = synthetic_lengths(Workload(prompt_len_avg=avg, prompt_len_max=mx, num_requests=2000))
    assert max(lengths) <= mx and min(lengths) >= 1
    assert abs(sum(lengths) / len(lengths) - avg) / avg < 0.05


TEXTS = ["hello there", "The router picks two of eight experts.", " leading space", "é中🤖"]


def tokenizer_folder(tmp_path, source, post_processor):
    """A copy of checkpoint `source` whose tokenizer.json has `post_processor` ("keep": the file's own)."""
    import shutil

    from tokenizers import Tokenizer

    folder = tmp_path / "ckpt"
    shutil.copytree(source, folder)
    if post_processor != "keep":
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tok.post_processor = post_processor
        tok.save(str(folder / "tokenizer.json"))
    return folder


def bos_template():   # what a Mixtral or Llama tokenizer.json holds: <s> before every text
    from tokenizers import processors

    return processors.TemplateProcessing(single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)])


def byte_level():     # what a Qwen tokenizer.json holds: no special token
    from tokenizers import processors

    return processors.ByteLevel(trim_offsets=False)


@pytest.mark.parametrize("kind, post_processor, bos", [("mixtral", bos_template, True), ("mixtral", byte_level, False),
                                                      ("mixtral", lambda: "keep", False),
                                                      # transformers' OLMoE tokenizer class adds no special
                                                      # token, whatever tokenizer.json's template says
                                                      ("olmoe", bos_template, False)])
def test_text_prompts_are_tokenized_as_transformers_autotokenizer_does(tmp_path, tiny_path, kind, post_processor,
                                                                      bos):
    """A prompt's ids are `AutoTokenizer.from_pretrained(folder)(text).input_ids`: its own BOS where the
    tokenizer adds one (once), none where it does not."""
    import transformers

    from moe_lightning.engine.tiny import ensure_tiny
    from moe_lightning.tokenizer import tokenizer_for

    source = tiny_path
    if kind == "olmoe":
        from tests.models.test_families import FAMILIES

        source = ensure_tiny(FAMILIES["olmoe"], seed=11, max_shard_size="60KB", perturb=True)
    folder = tokenizer_folder(tmp_path, source, post_processor())
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in TEXTS))
    ids = [r.input_ids for r in read_jsonl(f, SPEC, tokenizer_for(ModelSpec(name="hf", path=str(folder))))]
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    assert ids == [auto(t).input_ids for t in TEXTS]
    assert all((i[0] == 1) == bos and 1 not in i[1:] for i in ids)


def test_a_prompt_of_no_tokens_or_past_the_vocabulary_is_refused(tmp_path):
    class Fixed:   # a tokenizer that gives these ids for every text
        def __init__(self, ids):
            self.fixed = ids

        def ids(self, text):
            return self.fixed

    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "x"}\n')
    with pytest.raises(WorkloadError, match=':1: "prompt" is no tokens at all'):
        read_jsonl(f, SPEC, Fixed([]))
    with pytest.raises(WorkloadError, match=r':1: "prompt" encodes to token id 512, outside .* \[0, 512\)'):
        read_jsonl(f, SPEC, Fixed([5, 512]))


def test_per_request_generation_budgets(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"input_ids": [5, 6], "max_new_tokens": 3}\n{"input_ids": [7]}\n')
    reqs = load_requests(Workload(path=str(f), gen_len=8), SPEC)
    assert [r.max_new_tokens for r in reqs] == [3, None]
    with pytest.raises(WorkloadError, match="max_new_tokens=3, more than workload.gen_len=2"):
        load_requests(Workload(path=str(f), gen_len=2), SPEC)


@pytest.mark.parametrize("line, expect", [
    ('{"input_ids": [5], "max_new_token": 1}', 'unknown key "max_new_token"; did you mean "max_new_tokens"?'),
    ('{"input_ids": [5], "extra": 1}', 'unknown key "extra"; a row holds "prompt", "input_ids", "id", '
                                       '"max_new_tokens" only'),
    ('{"text": "a"}', 'unknown key "text"'),
    ('{"input_ids": [5], "input_ids": [6]}', 'key "input_ids" is given twice'),
    ('{"id": 1, "input_ids": [5], "id": 2}', 'key "id" is given twice'),
])
def test_unknown_and_duplicate_keys_are_refused_with_file_and_line(tmp_path, line, expect):
    """A misspelt key would be ignored (the row generating gen_len tokens), and JSON keeps the last of a
    key given twice: both are refused, naming the file and line."""
    f = tmp_path / "p.jsonl"
    f.write_text('{"id": "ok", "input_ids": [4], "max_new_tokens": 1}\n' + line + "\n")
    with pytest.raises(WorkloadError) as exc:
        read_jsonl(f, SPEC)
    assert str(exc.value).startswith(f"{f}:2: {expect}"), str(exc.value)


def test_a_prompt_beyond_the_model_s_positions_names_its_line_and_id(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"input_ids": [4]}\n\n{"id": "long", "input_ids": [4, 5, 6]}\n{"input_ids": [7, 8], '
                 '"max_new_tokens": 1}\n')
    spec = ModelSpec(max_position_embeddings=8)
    assert len(load_requests(Workload(path=str(f), gen_len=5), spec)) == 3
    with pytest.raises(WorkloadError, match=rf"^{f}:3: request 'long': a prompt of 3 tokens plus workload.gen_len=6 "
                                            "exceeds model.max_position_embeddings=8$"):
        load_requests(Workload(path=str(f), gen_len=6), spec)
    with pytest.raises(WorkloadError, match=r"^a prompt of \d+ tokens plus workload.gen_len=8 exceeds"):
        load_requests(Workload(prompt_len_avg=1, prompt_len_max=2, gen_len=8), spec)   # synthetic: no line
