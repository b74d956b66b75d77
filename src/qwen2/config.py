"""ModelConfig: one dataclass whose fields are config.json's, with a preset for every Qwen2 model.

Facts: SPEC.md section 1 (paper Table 1 and the Hugging Face config.json files). Field names and
defaults follow transformers' Qwen2Config / Qwen2MoeConfig so that a config.json moves between this
project, transformers and vLLM unchanged. Keys we do not model are kept in `extra` and written back.
`sliding_window` / `max_window_layers` are carried but inert: every Qwen2 model has
`use_sliding_window: false`, and we refuse a config that turns it on rather than silently ignoring it.
A config.json must give the shape (REQUIRED): a missing hidden_size is an error, not a default. The
weights' dtype is read from "dtype" (transformers >= 4.56 / 5) or else "torch_dtype" (older files) and
written under both names, so that old and new readers agree.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen2.files import atomic_write_text, read_json_object

ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 151643, 151644, 151645
# The fields that fix a model's shape: a config.json without one of them describes no particular model.
REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


@dataclass
class ModelConfig:
    model_type: str = "qwen2"  # "qwen2" (dense) or "qwen2_moe"
    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = (
        None  # {"type"|"rope_type": "yarn", "factor", "original_max_position_embeddings"}
    )
    attention_dropout: float = 0.0
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int | None = None
    bos_token_id: int | None = ENDOFTEXT_ID
    eos_token_id: int | list[int] | None = ENDOFTEXT_ID
    torch_dtype: str = "bfloat16"  # config.json's "dtype" (transformers 5) or "torch_dtype"
    use_cache: bool = True
    # Mixture of Experts (model_type "qwen2_moe"); 0 experts means dense.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    router_aux_loss_coef: float = 0.001
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    output_router_logits: bool = False
    # Long context (Qwen2.5-1M style): {"chunk_size", "local_size", "original_max_position_embeddings"}.
    dual_chunk_attention_config: dict | None = None
    # Weight-only quantization written by `qwen2 quantize` (quantize.py owns its meaning).
    quantization: dict | None = None
    # Keys of config.json this class does not model ("architectures", "transformers_version", ...).
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    # ---- derived ----------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, i: int) -> bool:
        """HF's rule (SPEC 2.6): sparse unless listed in mlp_only_layers or off the sparse step."""
        return self.is_moe and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    def with_dual_chunk_attention(self, context: int | None = None) -> ModelConfig:
        """This config with Dual Chunk Attention for a context of `context` tokens (default 4x the trained
        length P, P = rope_scaling's original_max_position_embeddings or max_position_embeddings). The
        defaults are ChunkLlama's for Qwen (SPEC 3.2): chunk_size C = 3P/4, local_size W = P/16, and YaRN's
        temperature from L0 = P. DCA rotates with plain RoPE: any rope_scaling is dropped (as vLLM does)."""
        p = (self.rope_scaling or {}).get("original_max_position_embeddings") or self.max_position_embeddings
        dca = {"chunk_size": 3 * p // 4, "local_size": p // 16, "original_max_position_embeddings": p}
        return self.replace(
            dual_chunk_attention_config=dca, rope_scaling=None, max_position_embeddings=context or 4 * p
        )

    # ---- checks -----------------------------------------------------------------------------
    def validate(self, source: str = "ModelConfig") -> None:
        """Type- and range-check every field; errors name the source, the field and the fix."""
        hints = typing.get_type_hints(ModelConfig)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _isinstance(value, hints[f.name]):
                raise ValueError(
                    f"{source}: field '{f.name}' must be {_type_name(hints[f.name])}, got {value!r} "
                    f"({type(value).__name__})"
                )
        if self.model_type not in ("qwen2", "qwen2_moe"):
            raise ValueError(
                f"{source}: model_type {self.model_type!r} is not a Qwen2 model "
                "(expected 'qwen2' or 'qwen2_moe')"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{source}: field '{name}' must be positive, got {getattr(self, name)}")
        if self.rope_theta <= 0:
            raise ValueError(
                f"{source}: field 'rope_theta' must be positive (RoPE's base, e.g. 1000000.0), "
                f"got {self.rope_theta}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"{source}: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"{source}: num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"{source}: head_dim {self.head_dim} must be even for rotary embeddings")
        if self.hidden_act != "silu":
            raise ValueError(
                f"{source}: field 'hidden_act' must be 'silu' (Qwen2's SwiGLU), got {self.hidden_act!r}"
            )
        if self.use_sliding_window:
            raise ValueError(
                f"{source}: use_sliding_window=true is not supported (no Qwen2 model uses it); "
                "set it to false"
            )
        if self.rope_type not in ("default", "yarn"):
            raise ValueError(
                f"{source}: rope_scaling type {self.rope_type!r} is not supported (use 'yarn' or none)"
            )
        if self.rope_type == "yarn":
            factor = self.rope_scaling.get("factor")
            if not isinstance(factor, (int, float)) or factor < 1:
                raise ValueError(f"{source}: rope_scaling.factor must be a number >= 1, got {factor!r}")
        if self.dual_chunk_attention_config is not None:
            dca = self.dual_chunk_attention_config
            c, w = dca.get("chunk_size"), dca.get("local_size")
            if not (isinstance(c, int) and isinstance(w, int) and 0 <= w < c):
                raise ValueError(
                    f"{source}: dual_chunk_attention_config needs integers 0 <= local_size < chunk_size, "
                    f"got chunk_size={c!r}, local_size={w!r}"
                )
            if not isinstance(dca.get("original_max_position_embeddings", 0), int):
                raise ValueError(
                    f"{source}: dual_chunk_attention_config.original_max_position_embeddings must be an "
                    f"integer (0: no attention temperature)"
                )
        if self.is_moe:
            if self.model_type != "qwen2_moe":
                raise ValueError(f"{source}: num_experts > 0 needs model_type 'qwen2_moe'")
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ValueError(
                    f"{source}: num_experts_per_tok must be in 1..num_experts ({self.num_experts}), "
                    f"got {self.num_experts_per_tok}"
                )
            if self.moe_intermediate_size <= 0:
                raise ValueError(f"{source}: moe_intermediate_size must be positive for a MoE model")

    # ---- config.json ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> ModelConfig:
        """A config.json's object; refuses one that lacks a REQUIRED field (naming `source` and it)."""
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        model_type = d.get("model_type", "qwen2")
        if model_type not in ("qwen2", "qwen2_moe"):  # before the fields: another model lacks ours
            raise ValueError(
                f"{source}: model_type {model_type!r} is not a Qwen2 model (expected 'qwen2' or 'qwen2_moe')"
            )
        missing = [k for k in REQUIRED if k not in d]
        if missing:
            raise ValueError(
                f"{source}: field {missing[0]!r} is missing"
                + (f" (and {', '.join(repr(k) for k in missing[1:])})" if missing[1:] else "")
                + f"; a Qwen2 config.json must give {', '.join(REQUIRED)}"
            )
        # transformers >= 4.56 writes "dtype"; older files "torch_dtype". Both present: "dtype" wins,
        # as in transformers' PretrainedConfig.
        dtype = d.pop("dtype", None)
        if dtype is not None:
            d["torch_dtype"] = dtype
        if "rope_parameters" in d and "rope_theta" not in d:
            # transformers >= 5 writes rope_theta/rope_scaling inside "rope_parameters".
            rp = dict(d.pop("rope_parameters") or {})
            d["rope_theta"] = rp.pop("rope_theta", cls.rope_theta)
            if rp.get("rope_type", "default") != "default":
                d["rope_scaling"] = rp
        if d.get("model_type") == "qwen2_moe":
            # Qwen2MoeConfig has MoE defaults (Qwen1.5-MoE-A2.7B's); a qwen2_moe config.json lists them all.
            d.setdefault("num_experts", 60)
            d.setdefault("num_experts_per_tok", 4)
            d.setdefault("moe_intermediate_size", 1408)
            d.setdefault("shared_expert_intermediate_size", 5632)
        if isinstance(d.get("rope_theta"), int):
            d["rope_theta"] = float(d["rope_theta"])
        if isinstance(d.get("rms_norm_eps"), int):
            d["rms_norm_eps"] = float(d["rms_norm_eps"])
        extra = {k: d.pop(k) for k in list(d) if k not in known}
        cfg = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            if f.name == "extra":
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            setattr(cfg, f.name, d.get(f.name, default))
        cfg.extra = extra
        cfg.validate(source)
        return cfg

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        if not self.is_moe:  # a dense config.json has no MoE keys
            for f in (
                "num_experts",
                "num_experts_per_tok",
                "moe_intermediate_size",
                "shared_expert_intermediate_size",
                "norm_topk_prob",
                "router_aux_loss_coef",
                "decoder_sparse_step",
                "mlp_only_layers",
                "output_router_logits",
            ):
                d.pop(f)
        d = {k: v for k, v in d.items() if v is not None}  # absent = the default, as in the Hub's files
        d["dtype"] = d["torch_dtype"]  # transformers 5 reads (and writes) "dtype"; older readers torch_dtype
        arch = "Qwen2MoeForCausalLM" if self.is_moe else "Qwen2ForCausalLM"
        return {"architectures": [arch], **self.extra, **d}

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json (is this a Hugging Face model directory?)")
        return cls.from_dict(read_json_object(path), source=str(path))

    def save(self, path: str | os.PathLike) -> Path:
        """Write config.json atomically (temporary file in the same folder, then rename)."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path.mkdir(parents=True, exist_ok=True)
            path = path / "config.json"
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ---- presets ----------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        key = name.removeprefix("Qwen/")
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**PRESETS[key])


def _isinstance(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_isinstance(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (inner,) = typing.get_args(hint)
        return isinstance(value, list) and all(_isinstance(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(args[0])}"
    if args:
        return " or ".join(_type_name(a) for a in args)
    return "null" if hint is type(None) else hint.__name__


# ------------------------------------------------------------------------------------------------
# Presets: the values of each model's config.json on the Hugging Face Hub (SPEC 1.1-1.2).
_YARN_X4 = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}


def _dense(hidden, inter, layers, heads, kv, vocab, tie, **kw):
    return dict(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        tie_word_embeddings=tie,
        **kw,
    )


def _base(d, window=131072, layers=None):
    return {
        **d,
        "max_position_embeddings": 131072,
        "sliding_window": window,
        "max_window_layers": layers or d["num_hidden_layers"],
        "eos_token_id": ENDOFTEXT_ID,
    }


def _instruct(d, window=32768, layers=None, eos=IM_END_ID):
    return {
        **d,
        "max_position_embeddings": 32768,
        "sliding_window": window,
        "max_window_layers": layers or d["num_hidden_layers"],
        "eos_token_id": eos,
    }


_D05 = _dense(896, 4864, 24, 14, 2, 151936, True)
_D15 = _dense(1536, 8960, 28, 12, 2, 151936, True)
_D7 = _dense(3584, 18944, 28, 28, 4, 152064, False)
_D72 = _dense(8192, 29568, 80, 64, 8, 152064, False)
_MOE = dict(
    model_type="qwen2_moe",
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=151936,
    tie_word_embeddings=False,
    num_experts=64,
    num_experts_per_tok=8,
    moe_intermediate_size=2560,
    shared_expert_intermediate_size=20480,
    norm_topk_prob=False,
    router_aux_loss_coef=0.001,
    decoder_sparse_step=1,
    mlp_only_layers=[],
)

PRESETS: dict[str, dict] = {
    "Qwen2-0.5B": _base(_D05),
    "Qwen2-0.5B-Instruct": _instruct(_D05),
    "Qwen2-1.5B": _base(_D15),
    "Qwen2-1.5B-Instruct": _instruct(_D15),
    "Qwen2-7B": _base(_D7),
    "Qwen2-7B-Instruct": _instruct(_D7, window=131072),
    "Qwen2-72B": {**_base(_D72, layers=28), "rms_norm_eps": 1e-5},
    "Qwen2-72B-Instruct": _instruct(_D72, window=131072),
    "Qwen2-57B-A14B": _base(_MOE, window=4096, layers=21),
    "Qwen2-57B-A14B-Instruct": _instruct(_MOE, eos=ENDOFTEXT_ID),
    # Long-context serving: the Instruct card's recommended static YaRN x4 (SPEC 1.3).
    "Qwen2-7B-Instruct-YaRN": {**_instruct(_D7, window=131072), "rope_scaling": _YARN_X4},
    "Qwen2-72B-Instruct-YaRN": {**_instruct(_D72, window=131072), "rope_scaling": _YARN_X4},
    # Scaled-down shapes for tests: real ratios (GQA, bias, tying), tiny sizes.
    "tiny": _dense(64, 160, 2, 4, 2, 512, True, max_position_embeddings=2048),
    "tiny-moe": dict(
        _MOE,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        max_position_embeddings=2048,
    ),
}


# ------------------------------------------------------------------------------------------------
# Parameter counts from the shapes alone (SPEC 1.1 lists them per model).
@dataclass(frozen=True)
class ParamCounts:
    total: int
    embedding: int  # input embedding (+ lm_head when untied)
    active: int  # parameters one token touches (MoE: router + top-k experts + shared expert)

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def param_counts(c: ModelConfig) -> ParamCounts:
    h, d = c.hidden_size, c.head_dim
    attn = h * c.num_attention_heads * d + c.num_attention_heads * d  # q_proj weight + bias
    attn += 2 * (h * c.num_key_value_heads * d + c.num_key_value_heads * d)  # k_proj, v_proj
    attn += c.num_attention_heads * d * h  # o_proj, no bias
    norms = 2 * h
    total = active = 0
    for i in range(c.num_hidden_layers):
        if c.is_moe_layer(i):
            expert = 3 * h * c.moe_intermediate_size
            shared = 3 * h * c.shared_expert_intermediate_size + h if c.shared_expert_intermediate_size else 0
            router = h * c.num_experts
            total += attn + norms + router + c.num_experts * expert + shared
            active += attn + norms + router + c.num_experts_per_tok * expert + shared
        else:
            mlp = 3 * h * c.intermediate_size
            total += attn + norms + mlp
            active += attn + norms + mlp
    emb = c.vocab_size * h * (1 if c.tie_word_embeddings else 2)
    total += emb + h
    active += emb + h
    return ParamCounts(total=total, embedding=emb, active=active)


def kv_cache_bytes_per_token(c: ModelConfig, dtype_bytes: int = 2) -> int:
    """K and V for every layer: 2 * layers * kv_heads * head_dim * bytes."""
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * dtype_bytes


# Counts in billions from SPEC.md 1.1: (total, non-embedding, active or None), as listed there
# (the blog truncates some of them: 0.49/0.35, 1.54/1.31, 7.6/6.5, 72.71/70.21, 57.41/56.32).
PUBLISHED = {
    "Qwen2-0.5B": (0.494, 0.358, None),
    "Qwen2-1.5B": (1.544, 1.310, None),
    "Qwen2-7B": (7.616, 6.526, None),
    "Qwen2-72B": (72.706, 70.215, None),
    "Qwen2-57B-A14B": (57.41, 56.32, 14.25),
}


def published_counts(name: str):
    """The published counts for a preset (Instruct and YaRN variants share their base model's)."""
    return PUBLISHED.get(name.removeprefix("Qwen/").split("-Instruct")[0])


def matches_published(config: ModelConfig, published) -> bool:
    """True when our counts round to the published ones (same number of decimals as printed there)."""
    c = param_counts(config)
    ours = (c.total, c.non_embedding, c.active)
    for value, ref in zip(ours, published):
        if ref is None:
            continue
        decimals = 2 if ref == round(ref, 2) and ref > 10 else 3
        if abs(value / 1e9 - ref) > 0.5 * 10**-decimals:
            return False
    return True
