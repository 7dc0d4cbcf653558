"""Where weights come from: a local Hugging Face checkpoint (safetensors, read lazily) or seeded random
values at real shapes. Both expose the same canonical view: embedding, per-layer `LayerWeights`, and
per-expert `(w13, w2)` pairs, so an engine can stream one expert at a time.

A checkpoint is checked before any tensor is read, and every failure is one `CheckpointError` line that
names the file and the field or tensor:

- `config.json` is type-checked, and fields that change the math are refused (`engine.hf_config`).
- The shards are the files `model.safetensors.index.json` lists, or else every `*.safetensors` in the
  folder. Each is confined to the folder (no absolute path, no `..`, no symlink out of it, except into
  the sibling `blobs/` of a Hugging Face hub cache snapshot) and is a readable safetensors file. A tensor
  name held by two files is refused, naming both; so is a stray unlisted file beside an index that holds
  a listed tensor (other unlisted files are ignored with a warning, as transformers ignores them), and
  an index that disagrees with its files.
- Every expected tensor is present with the shape and dtype config.json implies; a tensor the family's
  path would not read (a quantization scale, another family's weight) is refused by name, but for the
  multi-token-prediction layers config.json declares after the last one (`ModelSpec.mtp_layers`).
- Each tensor is checked for NaN and Inf as it is read: one `aminmax` pass (which propagates NaN), about
  25x cheaper than `isfinite().all()` and cheaper than a copy; an overflow from the cast to the run's
  dtype is named as such.

Pickle files are never loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import torch

from moe_lightning.config import ModelSpec
from moe_lightning.engine.hf_config import (
    list_folder,
    one_line,
    os_reason,
    read_json,
    shown,
    spec_from_hf_config,
)
from moe_lightning.errors import CheckpointError
from moe_lightning.models import family
from moe_lightning.threads import loader_threads, set_thread_count

__all__ = ["CheckpointWeights", "RandomWeights", "WeightSource", "expected_shapes", "resolve_model",
           "spec_from_hf_config", "torch_dtype"]

log = logging.getLogger("moe_lightning.weights")

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
SHAPE_FIELDS = ("architecture", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                "num_experts", "top_k", "vocab_size", "attention_bias", "qk_norm", "norm_topk_prob",
                "shared_expert_size", "clip_qkv", "dense_layers", "dense_intermediate_size")
INDEX_NAME = "model.safetensors.index.json"
# Quantized tensors (MXFP4's 4-bit blocks and their scales): bytes, read as stored, never cast.
PACKED_SUFFIXES = ("_blocks", "_scales")


def is_packed(name: str) -> bool:
    return name.endswith(PACKED_SUFFIXES)


def torch_dtype(name: str) -> torch.dtype:
    return TORCH_DTYPES[name]


def _expected(spec: ModelSpec) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Hugging Face tensor names of the family's checkpoint and their shapes, layer by layer (lazily)."""
    return family(spec).tensors(spec)


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor names of a checkpoint of `spec`'s family (per-expert layout) and their shapes."""
    return dict(_expected(spec))


class WeightSource:
    """Canonical access to a model's weights, one tensor at a time, in `dtype` on the CPU."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype):
        self.spec, self.dtype = spec, dtype
        self.family = family(spec)
        self._embedding, self._norm, self._lm_head = self.family.global_tensors(spec)   # their names

    def tensor(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """A tensor by its checkpoint name; `rows`: only rows [start, stop) of it (one expert of a
        tensor that fuses a layer's experts, as DBRX stores them), read without the rest."""
        raise NotImplementedError

    def embedding(self) -> torch.Tensor:
        return self.tensor(self._embedding)

    def final_norm(self) -> torch.Tensor:
        return self.tensor(self._norm)

    def lm_head(self) -> torch.Tensor:
        return self.tensor(self._lm_head)

    def layer(self, i: int):
        """Layer i's non-expert weights, as its family's LayerWeights dataclass."""
        return self.family.layer(self.tensor, i, self.spec)

    def expert(self, i: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (w13 [2F, H] = gate and up projections fused, w2 [H, F])."""
        return self.family.expert(self.tensor, i, e, self.spec)

    def expert_packed(self, i: int, e: int) -> tuple[torch.Tensor, ...]:
        """Expert e of MoE layer i as a quantized checkpoint stores it (`models.mxfp4`): uint8 arrays."""
        if self.family.expert_packed is None:
            raise CheckpointError(f"the {self.spec.architecture} path reads no quantized experts")
        return self.family.expert_packed(self.tensor, i, e, self.spec, self.dtype)

    def experts(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All experts of MoE layer i stacked: -> (w13 [E, 2F, H], w2 [E, H, F])."""
        pairs = [self.expert(i, e) for e in range(self.spec.num_experts)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


class RandomWeights(WeightSource):
    """Seeded random weights at real shapes. Each tensor's values depend only on (seed, name), so
    experts can be produced in any order, one at a time, and two runs see the same model."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, seed: int = 0, std: float = 0.02):
        super().__init__(spec, dtype)
        self.shapes, self.seed, self.std = expected_shapes(spec), seed, std
        self._fused: tuple[str | None, torch.Tensor | None] = (None, None)

    def tensor(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        if rows is not None:   # one expert of a fused tensor: the whole is drawn once, its slices reused
            if self._fused[0] != name:
                self._fused = (name, self.tensor(name))
            return self._fused[1][rows[0]:rows[1]]
        shape = self.shapes[name]
        if is_packed(name):   # MXFP4: any 4-bit values; scales 2^-7 .. 2^-5 (values of the order of std)
            lo, hi = (120, 123) if name.endswith("_scales") else (0, 256)
            return torch.randint(lo, hi, shape, generator=_generator(f"{self.seed}:{name}"), dtype=torch.uint8)
        if "norm" in name.split(".")[-2]:   # norm weights (q/k norms too) start at one, as transformers does
            return torch.ones(shape, dtype=self.dtype)
        n = math.prod(shape)
        if n <= RANDOM_CHUNK:
            return (torch.randn(shape, generator=_generator(f"{self.seed}:{name}")) * self.std).to(self.dtype)
        # A large tensor is drawn in chunks, each from its own generator, on one thread per core: torch
        # draws from a CPU generator on one thread, and a real-size model took minutes to build (Mixtral-8x7B:
        # ~19 s a layer on this 2-core VM). The chunks are fixed by the size, so the values are the same
        # whatever the core count.
        out = torch.empty(n, dtype=self.dtype)
        chunks = range(-(-n // RANDOM_CHUNK))

        def draw(c: int) -> None:
            set_thread_count(1)   # the pool's threads are the cores; each op on one of them
            part = out[c * RANDOM_CHUNK:(c + 1) * RANDOM_CHUNK]
            part.copy_(torch.randn(part.numel(), generator=_generator(f"{self.seed}:{name}:{c}")).mul_(self.std))

        with ThreadPoolExecutor(min(loader_threads(), len(chunks)), thread_name_prefix="random-weights") as pool:
            list(pool.map(draw, chunks))
        return out.view(shape)


RANDOM_CHUNK = 1 << 22   # elements drawn from one generator; a larger tensor is drawn in chunks, in parallel


def _generator(key: str) -> torch.Generator:
    digest = hashlib.sha256(key.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


# ---- the shard files ----

def _allowed_roots(folder: Path) -> list[Path]:
    """Where a checkpoint's files may live once symlinks are resolved: the folder, and for a Hugging Face
    hub cache snapshot (<repo>/snapshots/<rev>/, whose files link to ../../blobs/) its repo's blobs/."""
    real = folder.resolve()
    roots = [real]
    if real.parent.name == "snapshots":
        roots.append(real.parent.parent / "blobs")
    return roots


def _confine(folder: Path, file: Path, what: str) -> None:
    real = file.resolve()
    if not any(real.is_relative_to(root) for root in _allowed_roots(folder)):
        raise CheckpointError(f"{what}: resolves to {real}, outside the checkpoint folder {folder}")


def _readable_file(file: Path) -> None:
    """A regular file we may open: a FIFO would block, and a folder or an unreadable file would get a
    misleading 'corrupt' from the safetensors reader."""
    if os.path.exists(file) and not os.path.isfile(file) and not os.path.isdir(file):
        raise CheckpointError(f"{file}: not a regular file")
    try:
        with open(file, "rb") as f:
            f.read(8)
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot read the file ({os_reason(exc)})") from None


# ---- the checkpoint ----

class CheckpointWeights(WeightSource):
    """A local Hugging Face folder of a supported family: config.json plus model.safetensors or sharded
    model-XXXXX-of-YYYYY.safetensors with model.safetensors.index.json. Tensors are memory-mapped and
    read one at a time. `checkpoint`: the folder's own spec when `spec` runs fewer layers (its later
    layers are checked, never read)."""

    def __init__(self, folder: str | os.PathLike, spec: ModelSpec, dtype: torch.dtype,
                 checkpoint: ModelSpec | None = None):
        super().__init__(spec, dtype)
        self.folder = Path(folder)
        self._handles, self._where = {}, {}
        files, weight_map, stray = self._shard_files()
        for file in files:
            for name in self._open(file):
                if name in self._where:
                    raise CheckpointError(f"{self._where[name]}: tensor {name!r} is also in {file.name}; each "
                                          "tensor must be in one shard (remove the stray or duplicate file)")
                self._where[name] = file
        for file in stray:
            self._check_stray(file)
        if weight_map is not None:
            self._check_index(weight_map)
        self._check(checkpoint or spec)

    def _shard_files(self) -> tuple[list[Path], dict[str, Path] | None, list[Path]]:
        """-> (the shards to read, the index's weight_map or None, unlisted *.safetensors beside an index)."""
        names = list_folder(self.folder)
        on_disk = sorted(self.folder / n for n in names if n.endswith(".safetensors"))
        if INDEX_NAME not in names:
            if not on_disk:
                pickles = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt")))
                hint = f" (found {', '.join(pickles)}: pickle checkpoints are refused)" if pickles else ""
                raise CheckpointError(f"{self.folder}: no *.safetensors files{hint}")
            for file in on_disk:
                _confine(self.folder, file, str(file))
            return on_disk, None, []
        weight_map = self._weight_map(self.folder / INDEX_NAME)
        listed = set(weight_map.values())
        return sorted(listed), weight_map, [f for f in on_disk if f not in listed]

    def _weight_map(self, index: Path) -> dict[str, Path]:
        doc = read_json(index)
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: has no 'weight_map' object (tensor name -> shard file)")
        out, checked = {}, {}
        for name, entry in weight_map.items():
            if entry not in checked:
                parts = PurePosixPath(entry).parts if isinstance(entry, str) else ()
                if not parts or PurePosixPath(entry).is_absolute() or ".." in parts:
                    raise CheckpointError(f"{index}: weight_map[{name!r}] = {shown(entry)} must be a relative "
                                          "file name inside the checkpoint folder (no absolute path, no '..')")
                file = self.folder / entry
                _confine(self.folder, file, f"{index}: weight_map[{name!r}] = {shown(entry)}")
                if not file.exists():
                    raise CheckpointError(f"{file}: shard listed in {INDEX_NAME} is missing")
                checked[entry] = file
            out[name] = checked[entry]
        return out

    def _open(self, file: Path) -> list[str]:
        from safetensors import safe_open

        _readable_file(file)
        try:
            handle = safe_open(str(file), framework="pt")
            names = list(handle.keys())
        except Exception as exc:
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({one_line(exc)})") from None
        self._handles[file] = handle
        return names

    def _check_stray(self, file: Path) -> None:
        """A *.safetensors the index does not list: ignored (as transformers does) unless it holds a tensor
        the index serves, which makes the checkpoint ambiguous."""
        from safetensors import safe_open

        try:
            _confine(self.folder, file, str(file))
            _readable_file(file)
            names = list(safe_open(str(file), framework="pt").keys())
        except Exception as exc:  # noqa: BLE001 - an unlisted file is never read; say why it is skipped
            log.warning("%s: not listed in %s and unreadable (%s); ignored", file, INDEX_NAME, one_line(exc))
            return
        clash = next((n for n in names if n in self._where), None)
        if clash is not None:
            raise CheckpointError(f"{file}: not listed in {INDEX_NAME} but holds tensor {clash!r}, which "
                                  f"{self._where[clash].name} also holds; remove the stray file")
        log.warning("%s: not listed in %s; ignored", file, INDEX_NAME)

    def _check_index(self, weight_map: dict[str, Path]) -> None:
        index = self.folder / INDEX_NAME
        for name, file in weight_map.items():
            if name not in self._where:
                raise CheckpointError(f"{index}: lists tensor {name!r} in {file.name}, which does not hold it")
            if self._where[name] != file:
                raise CheckpointError(f"{index}: lists tensor {name!r} in {file.name}, but it is in "
                                      f"{self._where[name].name}")
        for name, file in self._where.items():
            if name not in weight_map:
                raise CheckpointError(f"{file}: holds tensor {name!r}, which {INDEX_NAME} does not list")

    def _check(self, spec: ModelSpec) -> None:
        """Every expected tensor present with its shape and dtype; nothing else in the files."""
        seen = set()
        for name, shape in _expected(spec):
            file = self._where.get(name)
            if file is None:
                raise CheckpointError(f"{self.folder}: missing tensor {name!r}")
            sl = self._handles[file].get_slice(name)
            got = tuple(sl.get_shape())
            if got != shape:
                raise CheckpointError(f"{file.name}: tensor {name!r} has shape {list(got)}, "
                                      f"config.json implies {list(shape)}")
            dtype = sl.get_dtype()
            accepted = ("U8",) if is_packed(name) else tuple(SAFETENSORS_DTYPES)
            if dtype not in accepted:
                raise CheckpointError(f"{file.name}: tensor {name!r} has dtype {dtype}; "
                                      f"accepted: {', '.join(accepted)}")
            seen.add(name)
        mtp = tuple(f"model.layers.{i}." for i in range(spec.num_layers, spec.num_layers + spec.mtp_layers))
        unused = sorted(n for n in set(self._where) - seen if mtp and n.startswith(mtp))
        if unused:   # multi-token-prediction modules: present, never read (transformers ignores them too)
            log.info("%s: %d tensors of the multi-token-prediction layer(s) %s not read (one token a step)",
                     self.folder, len(unused), ", ".join(p.rstrip(".") for p in mtp))
        extra = sorted(set(self._where) - seen - set(unused))
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise CheckpointError(f"{self._where[extra[0]]}: unexpected tensor {extra[0]!r}{more}: the "
                                  f"{spec.architecture} path would ignore it (a quantized checkpoint, or another "
                                  "family's?)")

    def tensor(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        file = self._where.get(name)
        if file is None:
            raise CheckpointError(f"{self.folder}: no tensor {name!r}")
        try:
            handle = self._handles[file]
            t = handle.get_tensor(name) if rows is None else handle.get_slice(name)[rows[0]:rows[1]]
        except Exception as exc:
            raise CheckpointError(f"{file}: cannot read tensor {name!r} ({one_line(exc)})") from None
        if is_packed(name):
            return t
        out = t.to(self.dtype)
        if not is_finite(out):
            if is_finite(t):
                raise CheckpointError(f"{file}: tensor {name!r} overflows {str(self.dtype).removeprefix('torch.')} "
                                      "(values beyond its range); use model.dtype=auto or float32")
            raise CheckpointError(f"{file}: tensor {name!r} holds NaN or Inf values (a corrupt checkpoint)")
        return out


def is_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in t: one reduction pass, no allocation (aminmax propagates NaN)."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def resolve_model(spec: ModelSpec) -> tuple[ModelSpec, WeightSource]:
    """Turn a configured ModelSpec into the concrete spec and its weight source."""
    if spec.weights == "random":
        if spec.dtype == "auto":
            spec = dataclasses.replace(spec, dtype="float32")
        return spec, RandomWeights(spec, torch_dtype(spec.dtype), seed=spec.seed)
    path = spec.path
    if path is None and spec.name == "tiny-mixtral":
        from moe_lightning.engine.tiny import ensure_tiny_mixtral

        path = str(ensure_tiny_mixtral())
    if path is None:
        raise CheckpointError(f"model.path is required for model={spec.name} with model.weights=checkpoint "
                              "(or set model.weights=random)")
    found = spec_from_hf_config(path, name=spec.name, run_dtype=spec.dtype)
    checkpoint = found
    if spec.name != "hf":
        for key in SHAPE_FIELDS:
            if getattr(found, key) != getattr(spec, key):
                raise CheckpointError(f"{path}/config.json has {key}={getattr(found, key)} but model={spec.name} "
                                      f"says {getattr(spec, key)}; use model=hf to take the folder's shapes")
        if spec.num_layers > found.num_layers:
            raise CheckpointError(f"model.num_layers={spec.num_layers} but {path} has {found.num_layers} layers")
        # fewer layers: run a truncated model (benchmarks)
        found = dataclasses.replace(found, num_layers=spec.num_layers,
                                    dense_layers=[i for i in found.dense_layers if i < spec.num_layers])
    if spec.dtype != "auto":
        found.dtype = spec.dtype
    return found, CheckpointWeights(path, found, torch_dtype(found.dtype), checkpoint=checkpoint)
