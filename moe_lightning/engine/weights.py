"""Where weights come from: a local Hugging Face checkpoint (safetensors, read lazily) or seeded random
values at real shapes. Both expose the same canonical view: embedding, per-layer `LayerWeights`, and
per-expert `(w13, w2)` pairs, so an engine can stream one expert at a time.

Checkpoints are checked against their config before any tensor is read: every expected name present,
every shape and dtype right, every shard a readable safetensors file. Pickle files are never loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from moe_lightning.config import ModelSpec
from moe_lightning.engine.model import LayerWeights
from moe_lightning.errors import CheckpointError

log = logging.getLogger("moe_lightning.weights")

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
SUPPORTED_MODEL_TYPES = ("mixtral",)
SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                "num_experts", "top_k", "vocab_size")


def torch_dtype(name: str) -> torch.dtype:
    return TORCH_DTYPES[name]


def _layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor names of a Mixtral checkpoint (per-expert layout) and their shapes."""
    H, F, V = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(spec.num_layers):
        p = _layer_prefix(i)
        shapes |= {
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (q, H), p + "self_attn.k_proj.weight": (kv, H),
            p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, q),
            p + "block_sparse_moe.gate.weight": (spec.num_experts, H),
        }
        for e in range(spec.num_experts):
            pe = f"{p}block_sparse_moe.experts.{e}."
            shapes |= {pe + "w1.weight": (F, H), pe + "w3.weight": (F, H), pe + "w2.weight": (H, F)}
    return shapes


class WeightSource:
    """Canonical access to a model's weights, one tensor at a time, in `dtype` on the CPU."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype):
        self.spec, self.dtype = spec, dtype

    def tensor(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def embedding(self) -> torch.Tensor:
        return self.tensor("model.embed_tokens.weight")

    def final_norm(self) -> torch.Tensor:
        return self.tensor("model.norm.weight")

    def lm_head(self) -> torch.Tensor:
        return self.tensor("lm_head.weight")

    def layer(self, i: int) -> LayerWeights:
        p = _layer_prefix(i)
        return LayerWeights(
            attn_norm=self.tensor(p + "input_layernorm.weight"),
            wq=self.tensor(p + "self_attn.q_proj.weight"), wk=self.tensor(p + "self_attn.k_proj.weight"),
            wv=self.tensor(p + "self_attn.v_proj.weight"), wo=self.tensor(p + "self_attn.o_proj.weight"),
            ffn_norm=self.tensor(p + "post_attention_layernorm.weight"),
            router=self.tensor(p + "block_sparse_moe.gate.weight"),
        )

    def expert(self, i: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (w13 [2F, H] = gate and up projections fused, w2 [H, F])."""
        p = f"{_layer_prefix(i)}block_sparse_moe.experts.{e}."
        w13 = torch.cat([self.tensor(p + "w1.weight"), self.tensor(p + "w3.weight")], dim=0)
        return w13, self.tensor(p + "w2.weight")

    def experts(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All experts of layer i stacked: -> (w13 [E, 2F, H], w2 [E, H, F])."""
        pairs = [self.expert(i, e) for e in range(self.spec.num_experts)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


class RandomWeights(WeightSource):
    """Seeded random weights at real shapes. Each tensor's values depend only on (seed, name), so
    experts can be produced in any order, one at a time, and two runs see the same model."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, seed: int = 0, std: float = 0.02):
        super().__init__(spec, dtype)
        self.shapes, self.seed, self.std = expected_shapes(spec), seed, std

    def tensor(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=self.dtype)
        digest = hashlib.sha256(f"{self.seed}:{name}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        return (torch.randn(shape, generator=gen) * self.std).to(self.dtype)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (a checkpoint folder needs config.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


def spec_from_hf_config(folder: str | os.PathLike, name: str = "hf") -> ModelSpec:
    """ModelSpec of a Hugging Face checkpoint folder, from its config.json."""
    path = Path(folder) / "config.json"
    if not Path(folder).is_dir():
        raise CheckpointError(f"model.path {folder}: no such folder")
    cfg = _read_json(path)
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{path}: unsupported model_type {model_type!r}; "
                              f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if cfg.get("tie_word_embeddings"):
        raise CheckpointError(f"{path}: tie_word_embeddings=true is not a Mixtral checkpoint")
    rope = cfg.get("rope_parameters") or {}
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    try:
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        return ModelSpec(
            name=name, architecture="mixtral", num_layers=cfg["num_hidden_layers"],
            hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
            num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            num_experts=cfg["num_local_experts"], top_k=cfg["num_experts_per_tok"],
            vocab_size=cfg["vocab_size"],
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 1e6))),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=cfg.get("max_position_embeddings", 32768),
            dtype=dtype if dtype in TORCH_DTYPES else "float32",
            weights="checkpoint", path=str(folder),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
        )
    except KeyError as exc:
        raise CheckpointError(f"{path}: missing key {exc.args[0]!r}") from None
    except Exception as exc:  # ConfigError from ModelSpec validation: name the file
        raise CheckpointError(f"{path}: {exc}") from None


class CheckpointWeights(WeightSource):
    """A local Hugging Face Mixtral folder: config.json plus model.safetensors or sharded
    model-XXXXX-of-YYYYY.safetensors with model.safetensors.index.json. Tensors are memory-mapped and
    read one at a time."""

    def __init__(self, folder: str | os.PathLike, spec: ModelSpec, dtype: torch.dtype):
        super().__init__(spec, dtype)
        from safetensors import safe_open

        self.folder = Path(folder)
        files = self._shard_files()
        self._handles, self._where = {}, {}
        for file in files:
            try:
                handle = safe_open(str(file), framework="pt")
                names = list(handle.keys())
            except Exception as exc:
                raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({exc})") from None
            self._handles[file] = handle
            for n in names:
                self._where[n] = file
        self._check()

    def _shard_files(self) -> list[Path]:
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: has no 'weight_map'")
            files = sorted({self.folder / f for f in weight_map.values()})
            for f in files:
                if not f.exists():
                    raise CheckpointError(f"{f}: shard listed in {index.name} is missing")
            return files
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in self.folder.glob("*.bin")) + sorted(
                p.name for p in self.folder.glob("*.pt"))
            hint = f" (found {', '.join(pickles)}: pickle checkpoints are refused)" if pickles else ""
            raise CheckpointError(f"{self.folder}: no *.safetensors files{hint}")
        return files

    def _check(self) -> None:
        for name, shape in expected_shapes(self.spec).items():
            file = self._where.get(name)
            if file is None:
                raise CheckpointError(f"{self.folder}: missing tensor {name!r}")
            sl = self._handles[file].get_slice(name)
            got = tuple(sl.get_shape())
            if got != shape:
                raise CheckpointError(f"{file.name}: tensor {name!r} has shape {list(got)}, "
                                      f"config.json implies {list(shape)}")
            dtype = sl.get_dtype()
            if dtype not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{file.name}: tensor {name!r} has dtype {dtype}; "
                                      f"accepted: {', '.join(SAFETENSORS_DTYPES)}")

    def tensor(self, name: str) -> torch.Tensor:
        try:
            t = self._handles[self._where[name]].get_tensor(name)
        except Exception as exc:
            raise CheckpointError(f"{self._where.get(name)}: cannot read tensor {name!r} ({exc})") from None
        return t.to(self.dtype)


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
    found = spec_from_hf_config(path, name=spec.name)
    if spec.name != "hf":
        for key in SHAPE_FIELDS:
            if getattr(found, key) != getattr(spec, key):
                raise CheckpointError(f"{path}/config.json has {key}={getattr(found, key)} but model={spec.name} "
                                      f"says {getattr(spec, key)}; use model=hf to take the folder's shapes")
        if spec.num_layers > found.num_layers:
            raise CheckpointError(f"model.num_layers={spec.num_layers} but {path} has {found.num_layers} layers")
        found.num_layers = spec.num_layers  # fewer layers: run a truncated model (benchmarks)
    if spec.dtype != "auto":
        found.dtype = spec.dtype
    return found, CheckpointWeights(path, found, torch_dtype(found.dtype))
