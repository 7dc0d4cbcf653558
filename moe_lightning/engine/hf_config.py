"""config.json of a Hugging Face checkpoint, read into a ModelSpec with every field checked: the fields
every family shares here (`common_fields`), each family's own in its module (`moe_lightning.models`),
chosen by `model_type`.

Each failure is one `CheckpointError` line naming the file and the field: a file that is not a JSON
object, unreadable, or not UTF-8; a size or count that is not a positive integer (2.5, "4096", true, 0);
heads that do not divide; a token id outside the vocabulary; and any field set to a value that changes
the math the family does not implement (`hidden_act` other than silu, RoPE scaling, a binding
`sliding_window`, tied embeddings, biases, quantization, ...: see `NEUTRAL_VALUES`). Such fields are
refused, never ignored.

A `sliding_window` is accepted only when it is >= `max_position_embeddings`: every run is refused a
context longer than that (`workload_io.load_requests`), so such a window never binds, and the
full-attention math is exact.

The file helpers here (`read_json`, `list_folder`, `os_reason`) serve the shard checks in
`moe_lightning.engine.weights` too.
"""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path

from moe_lightning.config import DTYPES, ModelSpec
from moe_lightning.errors import CheckpointError

ACTIVATIONS = ("silu", "swish")  # the same function in transformers' ACT2FN
DEFAULT_ROPE_THETA = 1e6         # MixtralConfig.default_theta
DEFAULT_MAX_POSITIONS = 32768   # Qwen2/3-MoE's config classes'; each family gives its own

# config.json fields that change the math where set (variants, or other families' fields) and the only
# values a family implements unless it reads the field itself (`implements`); absent or null is always
# accepted. Fields that do not change inference are ignored: training-only ones (attention_dropout, router_jitter_noise,
# router_aux_loss_coef, initializer_range, output_router_logits) and generic ones (use_cache,
# pad_token_id, architectures, transformers_version). hidden_act, sliding_window, rope_parameters,
# rope_scaling and layer_types are checked on their own.
NEUTRAL_VALUES: dict[str, tuple] = {
    "tie_word_embeddings": (False,),
    "attention_bias": (False,), "qkv_bias": (False,), "mlp_bias": (False,), "clip_qkv": (),
    "partial_rotary_factor": (1.0,),
    "norm_topk_prob": (True,),                      # Mixtral renormalises its top-k router weights
    "qk_layernorm": (False,), "qk_norm": (False,), "use_qk_norm": (False,),
    "attn_logit_softcapping": (), "final_logit_softcapping": (),
    "logit_scale": (1.0,), "logits_scaling": (1.0,), "embedding_multiplier": (1.0,),
    "residual_multiplier": (1.0,), "attention_multiplier": (),
    "moe_intermediate_size": (), "shared_expert_intermediate_size": (0,), "n_shared_experts": (0,),
    "num_shared_experts": (0,), "first_k_dense_replace": (0,), "decoder_sparse_step": (1,),
    "mlp_only_layers": ([],), "routed_scaling_factor": (1.0,), "scoring_func": ("softmax",),
    "topk_method": ("greedy",),
    "quantization_config": (),
}


def os_reason(exc: OSError) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.EISDIR:
        return "it is a folder, not a file"
    if exc.errno == errno.ENOENT:
        return "no such file (a dangling symlink?)"
    return exc.strerror or type(exc).__name__


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def shown(value: object) -> str:
    """A config value as JSON writes it (true, false, null, [..]; a string quoted as Python does, as
    tensor names are), kept short."""
    try:
        text = repr(value) if isinstance(value, str) else json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def list_folder(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        raise CheckpointError(f"model.path {folder}: no such folder") from None
    except NotADirectoryError:
        raise CheckpointError(f"model.path {folder}: not a folder (give the checkpoint's folder)") from None
    except OSError as exc:
        raise CheckpointError(f"model.path {folder}: cannot list the folder ({os_reason(exc)})") from None


def read_json(path: Path, missing: str = "") -> object:
    if path.exists() and not path.is_file() and not path.is_dir():  # a FIFO would block the read
        raise CheckpointError(f"{path}: not a regular file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found{missing}") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the file ({os_reason(exc)})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: not UTF-8 text (bad byte at offset {exc.start})") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise CheckpointError(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, or an integer over Python's digit limit
        raise CheckpointError(f"{path}: not valid JSON ({one_line(exc)})") from None


_REQUIRED = object()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond a float
        return False


def _same(value: object, accepted: object) -> bool:
    """JSON equality that keeps true apart from 1."""
    if isinstance(value, bool) or isinstance(accepted, bool):
        return value is accepted
    return value == accepted


class _Config:
    """Typed access to config.json's fields: each failure names the file and the field."""

    def __init__(self, cfg: dict, path: Path):
        self.cfg, self.path = cfg, path

    def fail(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {message}")

    def get(self, key: str, default: object = _REQUIRED) -> object:
        if key in self.cfg:
            return self.cfg[key]
        if default is _REQUIRED:
            raise self.fail(f"missing key {key!r}")
        return default

    def positive_int(self, key: str, default: object = _REQUIRED, nullable: bool = False) -> int | None:
        value = self.get(key, default)
        if value is None and nullable:
            return None
        if not (_is_int(value) and value > 0):
            kind = "a positive integer or null" if nullable else "a positive integer"
            raise self.fail(f"{key} must be {kind}, got {shown(value)}")
        return value

    def count(self, key: str, default: int, minimum: int = 0) -> int:
        """An integer >= `minimum`; absent or null is `default`."""
        value = self.get(key, None)
        if value is None:
            return default
        if not (_is_int(value) and value >= minimum):
            raise self.fail(f"{key} must be an integer >= {minimum}, got {shown(value)}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        """true or false; absent or null is `default`."""
        value = self.get(key, None)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(f"{key} must be true or false, got {shown(value)}")
        return value

    def positive_number(self, key: str, value: object) -> float:
        if not (_is_number(value) and value > 0):
            raise self.fail(f"{key} must be a positive number, got {shown(value)}")
        return float(value)

    def token_id(self, key: str, value: object, vocab: int) -> int | None:
        if value is not None and not (_is_int(value) and 0 <= value < vocab):
            raise self.fail(f"{key} must be a token id in [0, vocab_size={vocab}) or null, got {shown(value)}")
        return value

    def eos(self, vocab: int, default: int | None = None) -> dict:
        """ModelSpec's eos_token_id (the first id) and eos_token_ids (all, when there are several: a
        sequence stops on any, as transformers' generate does with config.json's list). `default`: the
        family's config class's eos_token_id, which transformers' generate stops on where config.json has
        no such key (a null is no EOS); past the vocabulary it is never generated, so it is none."""
        from moe_lightning.engine.hf_generation import eos_ids

        if "eos_token_id" not in self.cfg and default is not None and default < vocab:
            return {"eos_token_id": default, "eos_token_ids": None}
        ids = eos_ids(self.get("eos_token_id", None), vocab, self.fail)
        return {"eos_token_id": ids[0] if ids else None, "eos_token_ids": ids if len(ids) > 1 else None}

    def rope_theta(self, family: str = "Mixtral", default: float = DEFAULT_ROPE_THETA,
                   types: tuple[str, ...] = ("default",)) -> float:
        rope = self.get("rope_parameters", None)
        if rope is None:
            rope = {}
        if not isinstance(rope, dict):
            raise self.fail(f"rope_parameters must be an object or null, got {shown(rope)}")
        for key, value in rope.items():
            if isinstance(value, dict):
                raise self.fail(f"rope_parameters.{key}: per-layer-type RoPE is not implemented by the "
                                f"{family} path")
        for where, params in (("rope_parameters", rope), ("rope_scaling", self.get("rope_scaling", None))):
            if params is None:
                continue
            if not isinstance(params, dict):
                raise self.fail(f"{where} must be an object or null, got {shown(params)}")
            kind = params.get("rope_type", params.get("type", "default"))
            if kind not in types:
                raise self.fail(f"{where} rope_type={shown(kind)} is not implemented by the {family} path "
                                f"({', '.join(types)} RoPE only)")
            factor = params.get("partial_rotary_factor")
            if factor is not None and not _same(factor, 1.0):
                raise self.fail(f"{where}.partial_rotary_factor={shown(factor)} is not implemented by the "
                                f"{family} path (1.0 only)")
        scaling = self.get("rope_scaling", None)
        if rope and isinstance(scaling, dict) and scaling:
            # transformers takes rope_scaling, when it is set, in place of rope_parameters (theta included)
            legacy = {("rope_type" if k == "type" else k): v for k, v in scaling.items()}
            if legacy != rope:
                raise self.fail(f"rope_scaling={shown(scaling)} and rope_parameters={shown(rope)} disagree "
                                "(transformers reads rope_scaling and drops rope_parameters); keep one")
        nested, top = rope.get("rope_theta"), self.get("rope_theta", None)
        if nested is not None and top is not None and nested != top:
            raise self.fail(f"rope_theta={shown(top)} disagrees with rope_parameters.rope_theta="
                            f"{shown(nested)}; keep one")
        key = "rope_parameters.rope_theta" if nested is not None else "rope_theta"
        return self.positive_number(key, nested if nested is not None else top if top is not None
                                    else default)

    def yarn(self, family: str) -> dict:
        """ModelSpec's RoPE-scaling fields: YaRN's parameters from `rope_parameters` or `rope_scaling`
        (the older key) where their type is yarn, else the default RoPE's."""
        found = [(where, p) for where in ("rope_parameters", "rope_scaling")
                 if isinstance(p := self.get(where, None), dict) and p.get("rope_type", p.get("type")) == "yarn"]
        if not found:
            return {"rope_type": "default"}
        where, p = found[0]
        for key, accepted in (("attention_factor", ()), ("extrapolation_factor", (1.0,)), ("attn_factor", (1.0,))):
            value = p.get(key)
            if value is not None and not any(_same(value, a) for a in accepted):
                raise self.fail(f"{where}.{key}={shown(value)} is not implemented by the {family} path")

        def number(key: str, default: object) -> float:
            value = p.get(key, default)
            if value is None:
                value = default
            if not (_is_number(value) and value >= 0):
                raise self.fail(f"{where}.{key} must be a number >= 0, got {shown(value)}")
            return float(value)

        original = p.get("original_max_position_embeddings")
        if not (_is_int(original) and original > 0):
            raise self.fail(f"{where}.original_max_position_embeddings must be a positive integer, got "
                            f"{shown(original)}")
        factor = p.get("factor")
        if not (_is_number(factor) and factor > 0):
            raise self.fail(f"{where}.factor must be a positive number, got {shown(factor)}")
        truncate = p.get("truncate", True)
        if not isinstance(truncate, bool):
            raise self.fail(f"{where}.truncate must be true or false, got {shown(truncate)}")
        out = {} if truncate else {"yarn_truncate": False}
        return out | dict(rope_type="yarn", yarn_factor=float(factor), yarn_original_max_positions=original,
                    yarn_beta_fast=number("beta_fast", 32.0) or 32.0, yarn_beta_slow=number("beta_slow", 1.0) or 1.0,
                    yarn_mscale=number("mscale", 0.0), yarn_mscale_all_dim=number("mscale_all_dim", 0.0))

    def refuse_unimplemented(self, max_positions: int, family: str = "Mixtral",
                             implements: tuple[str, ...] = ()) -> None:
        act = self.get("hidden_act", "silu")
        if "hidden_act" not in implements and (act not in ACTIVATIONS or not isinstance(act, str)):
            raise self.fail(f"hidden_act={shown(act)} is not implemented by the {family} path (silu only)")
        if "sliding_window" not in implements:
            self._refuse_window(max_positions, family)
        for key, accepted in NEUTRAL_VALUES.items():
            if key in implements:
                continue
            value = self.get(key, None)
            if value is not None and not any(_same(value, a) for a in accepted):
                allowed = ", ".join(["null", *(shown(a) for a in accepted)])
                raise self.fail(f"{key}={shown(value)} changes the math and is not implemented by the "
                                f"{family} path (accepted: {allowed})")

    def _refuse_window(self, max_positions: int, family: str) -> None:
        use_window = self.get("use_sliding_window", None)
        if use_window is not None and not isinstance(use_window, bool):
            raise self.fail(f"use_sliding_window must be true, false or null, got {shown(use_window)}")
        window = self.get("sliding_window", None)
        if use_window is False:   # Qwen's switch: the window is not applied at all
            window = None
        if window is not None:
            if not (_is_int(window) and window > 0):
                raise self.fail(f"sliding_window must be a positive integer or null, got {shown(window)}")
            if window < max_positions:
                raise self.fail(f"sliding_window={window} is smaller than max_position_embeddings="
                                f"{max_positions}, and sliding-window attention is not implemented (null, or "
                                ">= max_position_embeddings, is full attention)")
        types = self.get("layer_types", None)
        if types is not None and (not isinstance(types, list) or any(t != "full_attention" for t in types)):
            raise self.fail(f"layer_types={shown(types)} is not implemented by the {family} path "
                            "(full_attention only)")


def common_fields(cfg: _Config, architecture: str, *, experts_key: str | tuple[str, ...], expert_size_key: str,
                  family_name: str, implements: tuple[str, ...] = (), head_dim_key: bool = True,
                  default_rope_theta: float = DEFAULT_ROPE_THETA, rope_types: tuple[str, ...] = ("default",),
                  default_eps: float = 1e-5, default_eos: int | None = None,
                  default_max_positions: int = DEFAULT_MAX_POSITIONS) -> dict:
    """ModelSpec fields every family's config.json gives, each checked for type and range, after refusing
    the fields that change the math which this family does not implement (`NEUTRAL_VALUES` less
    `implements`, which the family reads itself). `experts_key`: the routed-expert count's key (or keys,
    the first present wins); `expert_size_key`: one routed expert's FFN dim; `default_eps`: the family's
    config class's rms_norm_eps, which transformers runs where config.json gives none; `default_eos`, its
    eos_token_id, and `default_max_positions`, its max_position_embeddings, likewise."""
    layers, hidden = cfg.positive_int("num_hidden_layers"), cfg.positive_int("hidden_size")
    intermediate, heads = cfg.positive_int(expert_size_key), cfg.positive_int("num_attention_heads")
    kv_heads = cfg.positive_int("num_key_value_heads", None, nullable=True) or heads
    head_dim = cfg.positive_int("head_dim", None, nullable=True) if head_dim_key else None
    keys = (experts_key,) if isinstance(experts_key, str) else experts_key
    key = next((k for k in keys if cfg.get(k, None) is not None), keys[0])
    experts, top_k = cfg.positive_int(key), cfg.positive_int("num_experts_per_tok")
    vocab = cfg.positive_int("vocab_size")
    max_positions = cfg.positive_int("max_position_embeddings", default_max_positions)
    if heads % kv_heads:
        raise cfg.fail(f"num_attention_heads={heads} must be a multiple of num_key_value_heads={kv_heads}")
    if head_dim is None:
        if hidden % heads:
            raise cfg.fail(f"hidden_size={hidden} must be a multiple of num_attention_heads={heads} "
                           "(or give head_dim)")
        head_dim = hidden // heads
    if top_k > experts:
        raise cfg.fail(f"num_experts_per_tok={top_k} must be <= {key}={experts}")
    eps = cfg.positive_number("rms_norm_eps", cfg.get("rms_norm_eps", default_eps))
    rope_theta = cfg.rope_theta(family_name, default_rope_theta, rope_types)
    bos = cfg.token_id("bos_token_id", cfg.get("bos_token_id", None), vocab)
    eos = cfg.eos(vocab, default_eos)
    cfg.refuse_unimplemented(max_positions, family_name, implements)
    dtype = cfg.get("dtype", None) or cfg.get("torch_dtype", None)
    return dict(
        architecture=architecture, num_layers=layers, hidden_size=hidden, intermediate_size=intermediate,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, num_experts=experts, top_k=top_k,
        vocab_size=vocab, rope_theta=rope_theta, rms_norm_eps=eps, max_position_embeddings=max_positions,
        dtype=dtype if isinstance(dtype, str) and dtype in DTYPES else "float32",
        bos_token_id=bos, **eos,
    )


def checkpoint_name(folder: str | os.PathLike) -> str:
    """What a model=hf run's documents call its checkpoint: the folder's name, which is usually the Hugging
    Face repo's (Mixtral-8x7B-v0.1), or for a snapshot in the Hugging Face cache
    (models--mistralai--Mixtral-8x7B-v0.1/snapshots/<commit>) the repo id, mistralai/Mixtral-8x7B-v0.1."""
    path = Path(os.path.abspath(folder))   # "." or "ckpt/" named too; symlinks not followed (the cache's are files)
    repo = path.parent.parent.name
    if path.parent.name == "snapshots" and repo.startswith("models--"):
        return repo.removeprefix("models--").replace("--", "/")
    return path.name or "hf"


def model_label(model: ModelSpec) -> str:
    """A configured model's name in titles: a preset's own, model=hf's checkpoint's (`checkpoint_name`)."""
    return checkpoint_name(model.path) if model.name == "hf" and model.path else model.name


# safetensors' dtype names -> torch's (those a checkpoint's weights could be stored in)
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def stored_dtype(folder: Path) -> tuple[str | None, Path | None]:
    """-> (the dtype transformers' dtype="auto" loads a checkpoint in when config.json names none, the file
    it read it from): the index's metadata dtype, else the first floating tensor (float8 and float4 skipped,
    as transformers skips them) of the first shard in name order. (None, None) where that cannot be read:
    the loader then gives its own one-line reason."""
    from safetensors import safe_open

    try:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            data = json.loads(index.read_text())
            declared = (data.get("metadata") or {}).get("dtype")
            if isinstance(declared, str):
                return declared, index
            first = folder / sorted(set(data["weight_map"].values()))[0]
        else:
            first = folder / "model.safetensors"
        with safe_open(str(first), framework="pt") as f:
            for name in f.keys():   # noqa: SIM118 - a safe_open handle is not iterable
                code = f.get_slice(name).get_dtype()
                if code.startswith(("F", "BF")) and not code.startswith(("F8", "F4")):
                    return SAFETENSORS_DTYPES.get(code, code.lower()), first
    except Exception:   # a missing, damaged or odd checkpoint: the loader gives its own reason
        return None, None
    return None, None


def spec_from_hf_config(folder: str | os.PathLike, name: str = "hf", run_dtype: str = "auto") -> ModelSpec:
    """ModelSpec of a Hugging Face checkpoint folder, from its config.json (type-checked). Named `name`
    (a preset's), or for model=hf (`name` "hf") after the checkpoint (`checkpoint_name`), which the run
    documents then record beside `path`. `run_dtype`: the run's model.dtype; under auto the run takes
    config.json's dtype (or, where it names none, the weights' own: `stored_dtype`), so one the engine
    cannot run is refused (as transformers' dtype="auto" would load it, not float32)."""
    folder = Path(folder)
    list_folder(folder)
    path = folder / "config.json"
    cfg = read_json(path, " (a checkpoint folder needs config.json)")
    if not isinstance(cfg, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(cfg), "a number")
        raise CheckpointError(f"{path}: must be a JSON object {{...}}, got {kind} {shown(cfg)}")
    from moe_lightning.models import families, family_for_model_type

    model_type = cfg.get("model_type", None)
    fam = family_for_model_type(model_type) if isinstance(model_type, str) else None
    if fam is None:
        supported = ", ".join(t for f in families().values() for t in f.model_types)
        raise CheckpointError(f"{path}: unsupported model_type {shown(model_type)}; supported: {supported}")
    fields = fam.spec_fields(_Config(cfg, path))
    declared = cfg.get("dtype", None) or cfg.get("torch_dtype", None)
    if run_dtype == "auto" and declared is not None and declared not in DTYPES:
        key = "dtype" if cfg.get("dtype", None) else "torch_dtype"
        raise CheckpointError(f"{path}: {key}={shown(declared)} is not a dtype the engine runs ({', '.join(DTYPES)}), "
                              "and model.dtype=auto takes it; give model.dtype=float32, bfloat16 or float16")
    if declared is None:   # transformers' dtype="auto" then takes the weights' own dtype, not float32
        stored, where = stored_dtype(folder)
        if run_dtype == "auto" and stored is not None and stored not in DTYPES:
            raise CheckpointError(f"{where}: its weights are {stored}, which the engine does not run "
                                  f"({', '.join(DTYPES)}), and model.dtype=auto with no dtype in config.json takes "
                                  "them; give model.dtype=float32, bfloat16 or float16")
        if stored in DTYPES:
            fields["dtype"] = stored
    from moe_lightning.engine.hf_generation import generation_fields

    eos = fields["eos_token_ids"] or [i for i in [fields["eos_token_id"]] if i is not None]
    fields |= generation_fields(folder, eos, fields["vocab_size"])
    try:
        return ModelSpec(name=checkpoint_name(folder) if name == "hf" else name, weights="checkpoint",
                         path=str(folder), **fields)
    except Exception as exc:  # ConfigError from ModelSpec validation: name the file
        raise CheckpointError(f"{path}: {one_line(exc)}") from None
