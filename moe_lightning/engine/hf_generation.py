"""generation_config.json of a Hugging Face checkpoint: what transformers' `generate` takes from it, read
into `ModelSpec` fields, with every field that would change the generated tokens and that moe-lightning
does not implement refused in one line. Plain JSON: transformers is not imported.

What transformers 5.23 does with the file (`GenerationMixin._prepare_generation_config`,
`_prepare_special_tokens`, `_get_logits_processor`), and what is done here:
- `eos_token_id` (an id or a list: a sequence stops on any of them). When the folder has the file,
  `generate` takes it from the file alone (absent or null there: it never stops early); without the
  file, from config.json. -> `ModelSpec.eos_token_ids` / `eos_token_id`.
- `repetition_penalty` (RepetitionPenaltyLogitsProcessor) -> `ModelSpec.repetition_penalty`, applied
  by `engine.generation` wherever a token is picked; `sampling.repetition_penalty` overrides it.
- Sampling (`do_sample` with temperature, top_k, top_p, ...): moe-lightning decodes as `sampling.*`
  says (greedy unless sampling.temperature > 0), whatever the file says, as `generate(do_sample=False)`
  does; with `do_sample: true` in the file, a generate run says so in one warning line and in its run
  document (`sampling_not_applied`). Refusing instead would refuse nearly every chat checkpoint
  (Qwen1.5-MoE-Chat, Qwen3, DeepSeek-V2-Chat ship do_sample true).
- Lengths (`max_length`, `max_new_tokens`) are the workload's, as `generate(max_new_tokens=gen_len)`
  sets them; cache, compile, output and assisted-decoding settings (assisted decoding verifies every
  token greedily) do not change the tokens, nor do the encoder-only penalties transformers ignores for a
  decoder-only model.
- Everything else that changes the tokens (`REFUSED`) is refused unless at a value that changes nothing.
  Keys transformers does not know are kept by it as custom attributes that `generate` never reads:
  ignored here too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from moe_lightning.errors import CheckpointError

FILE = "generation_config.json"


def _never(value: object) -> bool:
    return False


def _is(*harmless: object) -> Callable[[object], bool]:
    from moe_lightning.engine.hf_config import _same

    return lambda value: any(_same(value, h) for h in harmless)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _at_most_one(value: object) -> bool:   # min_length counts the prompt, which has at least one token
    return _number(value) and value <= 1


# Fields that change the generated tokens, each with the test for a value that changes nothing (null or
# absent always passes), and the accepted values as the refusal names them.
REFUSED: dict[str, tuple[Callable[[object], bool], str]] = {
    "num_beams": (_is(1), "1"),
    "num_return_sequences": (_is(1), "1"),
    "num_beam_groups": (_is(1), "1"),
    "diversity_penalty": (_is(0.0), "0"),
    "penalty_alpha": (_is(0.0), "0"),                 # contrastive search
    "dola_layers": (_never, "null"),
    "constraints": (_never, "null"),
    "force_words_ids": (_never, "null"),
    "no_repeat_ngram_size": (_is(0), "0"),
    "bad_words_ids": (_never, "null"),
    "sequence_bias": (_is({}, []), "{}"),
    "min_length": (_at_most_one, "0 or 1"),
    "min_new_tokens": (_is(0), "0"),
    "forced_bos_token_id": (_never, "null"),
    "forced_eos_token_id": (_never, "null"),
    "exponential_decay_length_penalty": (_never, "null"),
    "suppress_tokens": (_is([]), "[]"),
    "begin_suppress_tokens": (_is([]), "[]"),
    "guidance_scale": (_is(1.0), "1"),
    "watermarking_config": (_never, "null"),
    "token_healing": (_is(False), "false"),
    "stop_strings": (_is([], ""), "[]"),
    "max_time": (_never, "null"),
}
# Applied only when sampling (transformers' warpers): what a `sampling_not_applied` note lists.
SAMPLING_FIELDS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff",
                   "eta_cutoff")


def read(folder: str | Path) -> dict | None:
    """The folder's generation_config.json as a dict, or None when it has none."""
    from moe_lightning.engine.hf_config import read_json, shown

    path = Path(folder) / FILE
    if not path.exists() and not path.is_symlink():
        return None
    data = read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: must be a JSON object {{...}}, got {shown(data)}")
    return data


def generation_fields(folder: str | Path, config_eos: list[int], vocab: int) -> dict:
    """ModelSpec's `eos_token_ids` and `repetition_penalty` from the folder's generation_config.json
    (module docstring), given config.json's eos ids; the fields it cannot honour refused. `eos_token_ids`
    is left None when generation stops on config.json's single eos_token_id, as without the file."""
    from moe_lightning.engine.hf_config import _is_number, shown

    data = read(folder)
    if data is None:
        return {"eos_token_ids": config_eos if len(config_eos) > 1 else None}
    path = Path(folder) / FILE
    for key, (harmless, accepted) in REFUSED.items():
        value = data.get(key)
        if value is not None and not harmless(value):
            also = "" if accepted == "null" else f" or {accepted}"
            raise CheckpointError(f"{path}: {key}={shown(value)} changes the generated tokens and is not "
                                  f"implemented (accepted: null{also}); remove it from the file")
    sample = data.get("do_sample")
    if sample is not None and not isinstance(sample, bool):
        raise CheckpointError(f"{path}: do_sample must be true, false or null, got {shown(sample)}")
    penalty = data.get("repetition_penalty")
    if penalty is not None and not (_is_number(penalty) and penalty > 0):
        raise CheckpointError(f"{path}: repetition_penalty must be a positive number or null, got {shown(penalty)}")
    eos = eos_ids(data.get("eos_token_id"), vocab, lambda m: CheckpointError(f"{path}: {m}"))
    return {"eos_token_ids": None if eos == config_eos and len(eos) == 1 else eos,
            "repetition_penalty": 1.0 if penalty is None else float(penalty)}


def eos_ids(value: object, vocab: int, fail: Callable[[str], Exception]) -> list[int]:
    """An eos_token_id field (null, an id, or a non-empty list of ids) as the list of ids it stops on,
    each in [0, vocab); duplicates dropped, order kept."""
    from moe_lightning.engine.hf_config import _is_int, shown

    if value is None:
        return []
    ids = value if isinstance(value, list) else [value]
    if not ids or not all(_is_int(v) and 0 <= v < vocab for v in ids):
        raise fail(f"eos_token_id must be a token id in [0, vocab_size={vocab}), a non-empty list of them, or "
                   f"null, got {shown(value)}")
    return list(dict.fromkeys(ids))


def sampling_not_applied(folder: str | Path | None) -> dict | None:
    """The sampling fields of the folder's generation_config.json when it asks for sampling
    (`do_sample: true`), which moe-lightning does not apply (module docstring); else None."""
    data = read(folder) if folder else None
    if not data or data.get("do_sample") is not True:
        return None
    return {k: data[k] for k in SAMPLING_FIELDS if data.get(k) is not None}
