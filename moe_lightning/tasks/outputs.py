"""Generate's outputs, streamed: each finished batch (static batches) or each step's finished requests
(admission mode) are appended to `<outputs>.part` and fsynced, so an interrupted or killed run keeps
every output it finished, and `resume=true` goes on from there.

The part file's first line says which run wrote it (the fields its outputs depend on: model and
checkpoint content, the checkpoint's tokenizer and generation files, prompts, sampling, system, policy,
device); a resume under any other run is refused with the fields that differ.
- Static batches: rows in input order, whole batches only: a batch half-written when the process was
  killed is dropped and generated again, with the same sampling seed (`engine.generation.
  batch_generator`), so a resumed run's outputs are identical to an uninterrupted one's.
- Admission mode: rows in the order requests finished, each complete row kept; the resumed run admits
  the others. A request samples with its own seed (`engine.generation.request_generator`), so its
  tokens do not depend on which requests share its micro-batch (greedy, and sampling alike, up to
  floating-point differences between batch shapes).
When the last output is in, the rows are written to `<outputs>` in input order, atomically, and the part
file is removed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from moe_lightning.errors import ConfigError
from moe_lightning.files import WriteError, atomic_write
from moe_lightning.interrupt import deferred

PART_FORMAT = "moe-lightning partial outputs"
PART_VERSION = 2


def part_path(outputs: str | os.PathLike) -> Path:
    outputs = Path(outputs)
    return outputs.with_name(outputs.name + ".part")


def run_fields(cfg, spec, device) -> dict:
    """The flat {field: value} that a run's output tokens depend on."""
    from moe_lightning.tuner import identity as ident

    asdict = dataclasses.asdict
    model = {k: v for k, v in asdict(spec).items() if k != "path"}
    model["name"] = ident.configured_name(cfg, spec)
    if spec.weights == "checkpoint" and spec.path:
        model["checkpoint_content"] = ident.checkpoint_fingerprint(spec.path)
        # The tokenizer encodes text prompts and decodes the outputs' text; generation_config.json stops them.
        # A folder without such files adds no field: its part files from before still resume.
        model["checkpoint_files"] = ident.checkpoint_files(spec.path)
    w = cfg.workload
    prompts = ({"prompts_sha256": ident.file_sha256(w.path)} if w.path else
               {"num_requests": w.num_requests, "prompt_len_avg": w.prompt_len_avg,
                "prompt_len_max": w.prompt_len_max, "seed": w.seed})
    tree = {"system": asdict(cfg.system), "model": model, "prompts": prompts, "gen_len": w.gen_len,
            "sampling": asdict(cfg.sampling), "policy": asdict(cfg.policy), "device": str(device)}
    flat: dict = {}
    ident.flatten("", json.loads(json.dumps(tree, default=str)), flat)
    return ident.drop_later_defaults(flat)


def output_row(request, output_ids: list[int], tokenizer) -> dict:
    row = {"id": request.id, "output_ids": output_ids}
    if tokenizer is not None:
        row["text"] = tokenizer.decode(output_ids, skip_special_tokens=True)
    return row


def dumps(row: dict) -> str:
    return json.dumps(row, allow_nan=False) + "\n"


class StreamedOutputs:
    """The outputs of one generate run, as `<outputs>.part` while it runs and `<outputs>` when done. With
    `writes=False` (a rank other than 0 of a several-rank run: rank 0 writes the outputs) it keeps and
    writes nothing, and finds nothing done (the ranks skip what rank 0's `begin` found)."""

    def __init__(self, outputs: str | os.PathLike, resume: bool, writes: bool = True):
        self.path = Path(outputs)
        self.part = part_path(self.path)
        self.resume = resume
        self.writes = writes
        self.rows: dict[int, str] = {}   # serialized rows by request index
        self.resumed = 0                 # rows kept from an earlier run
        self.total = 0
        self._file = None
        self._requests: list = []
        self._tokenizer = None

    def begin(self, fields: dict, requests: list, batch_size: int | None, tokenizer) -> list[int]:
        """Open the part file (a new one, or the earlier run's with `resume`); -> the indices of the
        requests already done: a prefix of whole batches of `batch_size`, or (admission mode, batch_size
        None) any of them."""
        if not self.writes:
            return []
        self._requests, self._tokenizer, self.total = requests, tokenizer, len(requests)
        header = {"format": PART_FORMAT, "version": PART_VERSION, "batch_size": batch_size,
                  "num_requests": len(requests), "run": fields}
        if self.resume and self.part.is_file():
            self.rows = self._read_part(header, requests, batch_size)
            self.resumed = len(self.rows)
        with deferred():
            atomic_write(self.part, dumps(header) + "".join(self.rows.values()))
            try:
                self._file = self.part.open("a", encoding="utf-8")
            except OSError as exc:
                raise WriteError(f"cannot append to {self.part}: {exc.strerror or exc}") from None
        return sorted(self.rows)

    def _read_part(self, header: dict, requests: list, batch_size: int | None) -> dict[int, str]:
        where = str(self.part)
        try:
            lines = self.part.read_bytes().split(b"\n")
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read ({exc.strerror or exc})") from None
        try:
            stored = json.loads(lines[0])
        except (UnicodeDecodeError, json.JSONDecodeError):
            stored = None
        if not isinstance(stored, dict) or stored.get("format") != PART_FORMAT:
            raise ConfigError(f"{where}: not a moe-lightning part file; remove it, or choose another outputs=")
        if stored != header:
            from moe_lightning.tuner.identity import differences

            old = {"batch_size": stored.get("batch_size"), "num_requests": stored.get("num_requests"),
                   **{f"run.{k}": v for k, v in (stored.get("run") or {}).items()}}
            new = {"batch_size": header["batch_size"], "num_requests": header["num_requests"],
                   **{f"run.{k}": v for k, v in header["run"].items()}}
            diff = differences(old, new)
            shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
            raise ConfigError(f"{where} was written by another run ({shown}); resume with the same settings, or "
                              f"pass overwrite=true (without resume) to start over")
        rows: dict[int, str] = {}
        index = {json.dumps(r.id): i for i, r in enumerate(requests)}
        # The last element is what follows the final newline: empty, or a row cut short by a kill.
        for lineno, raw in enumerate(lines[1:-1], start=2):
            if len(rows) == len(requests):
                raise ConfigError(f"{where}:{lineno}: more rows than prompts; the file is damaged")
            try:
                row = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise ConfigError(f"{where}:{lineno}: damaged row; remove the file to start over") from None
            got = row.get("id") if isinstance(row, dict) else row
            if batch_size is not None:   # static batches: input order
                i = len(rows)
                if not isinstance(row, dict) or got != json.loads(json.dumps(requests[i].id)):
                    raise ConfigError(f"{where}:{lineno}: row for id {got!r}, expected id "
                                      f"{json.loads(json.dumps(requests[i].id))!r}; the file is damaged")
            else:
                i = index.get(json.dumps(got)) if isinstance(row, dict) else None
                if i is None or i in rows:
                    why = "a second row for" if i is not None else "a row for no prompt:"
                    raise ConfigError(f"{where}:{lineno}: {why} id {got!r}; the file is damaged")
            rows[i] = raw.decode() + "\n"
        if batch_size is not None and len(rows) < len(requests):
            keep = len(rows) - len(rows) % batch_size   # whole batches only
            rows = {i: r for i, r in rows.items() if i < keep}
        return rows

    def write_batch(self, first: int, outputs: list[list[int]]) -> None:
        """Append one finished batch (rows `first`...), flushed and fsynced before returning."""
        self.write_finished([(first + i, out) for i, out in enumerate(outputs)])

    def write_finished(self, finished: list[tuple[int, list[int]]]) -> None:
        """Append the rows of these (request index, outputs), flushed and fsynced before returning."""
        if not self.writes:
            return
        batch = {i: dumps(output_row(self._requests[i], out, self._tokenizer)) for i, out in finished}
        with deferred():
            try:
                self._file.write("".join(batch.values()))
                self._file.flush()
                os.fsync(self._file.fileno())
            except OSError as exc:
                raise WriteError(f"cannot append to {self.part}: {exc.strerror or exc} ({len(self.rows)} rows "
                                 f"kept there; resume=true goes on from them)") from None
            self.rows.update(batch)

    def finish(self) -> Path:
        """All rows are in: write `<outputs>` atomically, then remove the part file."""
        self.close()
        if not self.writes:
            return self.path
        if len(self.rows) != self.total:
            raise WriteError(f"{self.part}: {len(self.rows)} of {self.total} rows; not finishing")
        with deferred():
            atomic_write(self.path, "".join(self.rows[i] for i in range(self.total)))
            self.part.unlink(missing_ok=True)
        return self.path

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
