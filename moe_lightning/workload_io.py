"""Requests: prompts read from a JSONL file or synthesised from a `Workload`'s length statistics."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_lightning.config import ModelSpec, Workload
from moe_lightning.errors import WorkloadError


@dataclass
class Request:
    id: object
    input_ids: list[int]
    prompt: str | None = None
    max_new_tokens: int | None = None   # its own generation budget (at most workload.gen_len); None: gen_len
    line: int | None = None             # its line in the prompts file (None: synthetic)


def synthetic_lengths(workload: Workload) -> list[int]:
    """Seeded prompt lengths with mean close to `prompt_len_avg`, none above `prompt_len_max`.

    Symmetric spreads (avg near max, e.g. HELM) draw uniformly in [2*avg - max, max]; skewed ones
    (MTBench: avg 77, max 418) draw from a log-normal scaled to the mean, clipped at the max.
    """
    g = torch.Generator().manual_seed(workload.seed)
    n, avg, mx = workload.num_requests, workload.prompt_len_avg, workload.prompt_len_max
    if 2 * avg - mx >= 1:
        lengths = torch.randint(2 * avg - mx, mx + 1, (n,), generator=g)
    else:
        sigma = 0.8
        draw = torch.exp(torch.randn(n, generator=g) * sigma - sigma**2 / 2)
        scale = float(avg)
        for _ in range(30):  # rescale so that the mean after clipping is the asked-for average
            scale *= avg / float((draw * scale).round().clamp(1, mx).mean())
        lengths = (draw * scale).round().clamp(1, mx).long()
    return lengths.tolist()


def synthetic_requests(workload: Workload, spec: ModelSpec) -> list[Request]:
    g = torch.Generator().manual_seed(workload.seed + 1)
    low = 3 if spec.vocab_size > 3 else 0  # skip <unk>, <s>, </s>
    return [Request(i, torch.randint(low, spec.vocab_size, (n,), generator=g).tolist())
            for i, n in enumerate(synthetic_lengths(workload))]


# The keys a prompts file's row may hold: any other (a misspelt "max_new_token", an "extra") would be
# silently ignored, so it is refused.
ROW_KEYS = ("prompt", "input_ids", "id", "max_new_tokens")


def read_jsonl(path: str | Path, spec: ModelSpec, tokenizer=None) -> list[Request]:
    """Lines of {"prompt": "..."} or {"input_ids": [...]}, each with an optional "id" (a string or an
    integer, unique; a row without one is given its position, which must not clash with a given id) and
    an optional "max_new_tokens" (a positive integer: that request's own generation budget). Any other
    key, or a key given twice, is refused."""
    path = Path(path)
    if path.is_dir():
        raise WorkloadError(f"{path}: is a folder; workload.path names a JSONL file")
    if not path.exists():
        raise WorkloadError(f"{path}: prompts file not found")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise WorkloadError(f"{path}: cannot read ({exc.strerror or exc})") from None
    requests: list[Request] = []
    seen: dict[object, tuple[int, bool]] = {}   # id -> (line, given in the file)
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        row = _parse_line(raw, where)
        unknown = [k for k in row if k not in ROW_KEYS] if isinstance(row, dict) else []
        if unknown:
            close = difflib.get_close_matches(unknown[0], ROW_KEYS, n=1)
            hint = f'did you mean "{close[0]}"? ' if close else ""
            raise WorkloadError(f"{where}: unknown key {json.dumps(unknown[0])[:60]}; {hint}a row holds "
                                f"{', '.join(json.dumps(k) for k in ROW_KEYS)} only")
        if not isinstance(row, dict) or ("prompt" in row) == ("input_ids" in row):
            raise WorkloadError(f'{where}: expected an object with exactly one of "prompt" (text) '
                                'or "input_ids" (list of token ids)')
        given = "id" in row
        rid = row["id"] if given else len(requests)
        if isinstance(rid, bool) or not isinstance(rid, (int, str)):
            raise WorkloadError(f'{where}: "id" must be a string or an integer, got {json.dumps(rid)[:40]}')
        if rid in seen:
            line, was_given = seen[rid]
            how = (lambda g: "given" if g else "its position, given to a row without an id")
            raise WorkloadError(f"{where}: id {rid!r} ({how(given)}) is also line {line}'s id ({how(was_given)}); "
                                'ids must be unique: give every row a distinct "id"')
        seen[rid] = (lineno, given)
        own = row.get("max_new_tokens")
        if own is not None and (isinstance(own, bool) or not isinstance(own, int) or own < 1):
            raise WorkloadError(f'{where}: "max_new_tokens" must be a positive integer, got {json.dumps(own)[:40]}')
        if "input_ids" in row:
            ids = row["input_ids"]
            if (not isinstance(ids, list) or not ids or not all(
                    isinstance(t, int) and not isinstance(t, bool) and 0 <= t < spec.vocab_size for t in ids)):
                raise WorkloadError(f'{where}: "input_ids" must be a non-empty list of integers in '
                                    f"[0, {spec.vocab_size})")
            requests.append(Request(rid, ids, max_new_tokens=own, line=lineno))
        else:
            text = row["prompt"]
            if not isinstance(text, str) or not text:
                raise WorkloadError(f'{where}: "prompt" must be a non-empty string')
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise WorkloadError(f'{where}: "prompt" holds {text[exc.start]!r} at character {exc.start}, '
                                    "a lone surrogate that is not text") from None
            if tokenizer is None:
                from moe_lightning.tokenizer import missing

                raise WorkloadError(f"{where}: {missing(spec)}")
            # As transformers' tokenizer encodes it by default: its own special tokens, a BOS only where the
            # tokenizer adds one (`moe_lightning.tokenizer`).
            ids = tokenizer.ids(text)
            if not ids:
                raise WorkloadError(f'{where}: "prompt" is no tokens at all for this tokenizer; give a longer prompt')
            beyond = next((t for t in ids if not 0 <= t < spec.vocab_size), None)
            if beyond is not None:
                raise WorkloadError(f'{where}: "prompt" encodes to token id {beyond}, outside the model\'s vocabulary '
                                    f"[0, {spec.vocab_size}); give \"input_ids\" instead")
            requests.append(Request(rid, ids, text, own, lineno))
    if not requests:
        raise WorkloadError(f"{path}: no prompts (the file is empty)")
    return requests


def _parse_line(raw: bytes, where: str):
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WorkloadError(f"{where}: not UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the "
                            "line); save the file as UTF-8") from None

    def no_constant(name: str):
        raise WorkloadError(f"{where}: {name} is not a JSON value")

    def no_duplicates(pairs: list[tuple[str, object]]) -> dict:
        # json keeps the last of a key given twice: {"prompt": "a", "prompt": "b"} would run "b" unsaid.
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise WorkloadError(f"{where}: key {json.dumps(key)[:60]} is given twice; give each key once")
            seen.add(key)
        return dict(pairs)

    try:
        return json.loads(line, parse_constant=no_constant, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise WorkloadError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise WorkloadError(f"{where}: JSON nested too deeply") from None


def load_requests(workload: Workload, spec: ModelSpec, tokenizer=None) -> list[Request]:
    """The workload's requests, refused as `check_requests` refuses them."""
    requests = read_jsonl(workload.path, spec, tokenizer) if workload.path else synthetic_requests(workload, spec)
    check_requests(requests, workload, spec)
    return requests


def check_requests(requests: list[Request], workload: Workload, spec: ModelSpec) -> None:
    """What every task that generates, plans or simulates a workload refuses: a request asking for more
    tokens than workload.gen_len, a prompt that with gen_len does not fit the model's positions."""
    def where(r: Request) -> str:
        return f"{workload.path}:{r.line}: " if r.line is not None else ""

    over = next((r for r in requests if (r.max_new_tokens or 0) > workload.gen_len), None)
    if over is not None:
        raise WorkloadError(f"{where(over)}request {over.id!r} asks for max_new_tokens={over.max_new_tokens}, more "
                            f"than workload.gen_len={workload.gen_len} (the most any request generates; the memory "
                            "plan is made for it); raise workload.gen_len")
    longest = max(requests, key=lambda r: len(r.input_ids))
    named = f"{where(longest)}request {longest.id!r}: " if longest.line is not None else ""
    check_context(len(longest.input_ids), workload, spec, named)


def longest_budget(requests: list[Request], workload: Workload) -> int:
    """The most new tokens any request generates: its own max_new_tokens, or workload.gen_len for one that
    gives none. What a run of these requests sizes its KV cache for and plans (no request runs longer)."""
    return max(r.max_new_tokens or workload.gen_len for r in requests)


def check_context(prompt_len: int, workload: Workload, spec: ModelSpec, where: str = "") -> None:
    """The longest prompt plus workload.gen_len must fit model.max_position_embeddings: the positions RoPE
    was trained for (a longer sequence would generate past them, and a plan or a simulation for it
    describes no run that could happen). `where` leads the message (the file's line and the request)."""
    if prompt_len + workload.gen_len > spec.max_position_embeddings:
        raise WorkloadError(f"{where}a prompt of {prompt_len} tokens plus workload.gen_len={workload.gen_len} "
                            f"exceeds model.max_position_embeddings={spec.max_position_embeddings}")


def describe(requests: list[Request], workload: Workload | None = None) -> dict:
    """The requests' counts and prompt lengths; with `workload`, their generation budgets too."""
    lengths = [len(r.input_ids) for r in requests]
    out = {"num_requests": len(lengths), "prompt_len_avg": round(sum(lengths) / len(lengths), 2),
           "prompt_len_max": max(lengths), "prompt_tokens": sum(lengths)}
    own = budgets(requests, workload) if workload is not None else None
    return out | own if own else out


def budgets(requests: list[Request], workload: Workload) -> dict | None:
    """The rows' own max_new_tokens, where a prompts file gives some (else None): what workload.gen_len
    said, the longest and shortest budget and how many rows give their own. A run sizes its KV cache for
    the longest (`longest_budget`); plans and simulations run every request to it."""
    own = [r.max_new_tokens for r in requests if r.max_new_tokens]
    if not own:
        return None
    every = [r.max_new_tokens or workload.gen_len for r in requests]
    return {"max_new_tokens": {"workload_gen_len": workload.gen_len, "longest": max(every),
                               "shortest": min(every), "rows_with_own": len(own), "rows": len(requests)}}
