"""Recipes: Python functions that return config dataclasses; a flat YAML file may override fields.

DESIGN principle 8: no registries of components, no `_component_` strings. A recipe is a function;
`load_recipe("speedrun.yaml")` reads `recipe: <function name>` (default `pretrain`) plus any
`PretrainConfig` field, and returns the recipe's config with those fields replaced. Unknown keys are
an error that names the file, the key and the valid keys.

Model shapes for training from scratch (`model:` field) are presets too: `speedrun` is a small
Qwen2 with every Qwen2 trait (GQA, q/k/v bias, tied embeddings, SwiGLU, RMSNorm, RoPE) sized for a
2-core CPU; its vocabulary comes from the tokenizer the run trains.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path

from qwen2.config import PRESETS, ModelConfig
from qwen2.train.loop import TrainConfig


@dataclass
class PretrainConfig:
    """Everything `qwen2 pretrain` / `qwen2 speedrun` need. Stage 1 is ordinary pre-training; stage 2 is
    the long-context stage (paper section 3: 4,096 -> 32,768 tokens, RoPE base 10,000 -> 1,000,000)."""

    out: str = "runs/pretrain"
    # -- model: a name in MODEL_SHAPES, a Qwen2 preset name, or a config.json path
    model: str = "speedrun"
    # -- tokenizer: an existing tokenizer folder, or None to train one (byte-level BPE) on the corpus
    tokenizer: str | None = None
    tokenizer_vocab: int = 8192
    tokenizer_max_mb: float = 12.0  # text the tokenizer trainer reads (MB), a slice of the corpus
    # -- data: a folder of text / JSONL / parquet, or None for the Python standard library's source
    corpus: str | None = None
    heldout_fraction: float = 0.01
    spread: int = 64  # loader: a step's rows lie this many rows apart in the stream (data.loader)
    max_corpus_mb: float = 0.0  # 0: all of it
    # -- time budget (minutes, the whole run); 0: use `steps` / `long_steps`
    minutes: float = 0.0
    long_fraction: float = 0.15  # of the training time spent in the long-context stage
    # -- stage 1
    seq_len: int = 256
    rope_theta: float = 10_000.0
    steps: int = 200
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    schedule: str = "cosine"
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    precision: str = "fp32"
    activation_checkpointing: bool = False
    parallel: str = "ddp"
    eval_every: int = 50
    eval_batches: int = 4
    ckpt_every: int = 50
    keep_last: int = 2
    seed: int = 0
    # -- stage 2: long context
    long_seq_len: int = 1024
    long_rope_theta: float = 1_000_000.0
    long_steps: int = 40
    long_batch_size: int = 4
    long_lr: float = 1e-3
    long_warmup_steps: int = 5
    long_min_doc_tokens: int = 512  # the long-document mixture: documents at least this long
    long_mix: float = 0.7  # share of long documents in the stage-2 mixture (the rest: the ordinary corpus)
    # -- report
    samples: int = 4
    sample_tokens: int = 80

    def train_config(self, stage: str) -> TrainConfig:
        """The loop's settings for `stage` ("pretrain" or "long")."""
        common = dict(grad_accum=self.grad_accum, min_lr_ratio=self.min_lr_ratio, schedule=self.schedule,
                      weight_decay=self.weight_decay, grad_clip=self.grad_clip, precision=self.precision,
                      activation_checkpointing=self.activation_checkpointing, parallel=self.parallel,
                      eval_every=self.eval_every, ckpt_every=self.ckpt_every, keep_last=self.keep_last, seed=self.seed)
        if stage == "long":
            return TrainConfig(batch_size=self.long_batch_size, lr=self.long_lr, warmup_steps=self.long_warmup_steps, **common)
        return TrainConfig(batch_size=self.batch_size, lr=self.lr, warmup_steps=self.warmup_steps, **common)


# ---- model shapes for training from scratch ------------------------------------------------------
def speedrun_model(vocab_size: int) -> ModelConfig:
    """~2.6M parameters (1.0M in the embedding at an 8k vocabulary): hidden 128, 6 layers, 4 query
    heads sharing 2 KV heads (head_dim 32), SwiGLU 384, q/k/v bias, tied embeddings. On 2 CPU cores
    a wider model sees too few tokens in 20 minutes to beat this one (measured: bench/train.py notes)."""
    return ModelConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=6,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                       max_position_embeddings=4096, rope_theta=10_000.0, torch_dtype="float32",
                       bos_token_id=None, eos_token_id=None)


def test_model(vocab_size: int) -> ModelConfig:
    """The smallest useful shape, for tests and `--minutes 2`."""
    return speedrun_model(vocab_size).replace(hidden_size=64, intermediate_size=160, num_hidden_layers=2)


MODEL_SHAPES = {"speedrun": speedrun_model, "test": test_model}


def model_config(name: str, vocab_size: int) -> ModelConfig:
    """`name` -> ModelConfig: a shape above (vocabulary from the tokenizer), a preset, or a config.json."""
    if name in MODEL_SHAPES:
        return MODEL_SHAPES[name](vocab_size)
    if name.removeprefix("Qwen/") in PRESETS:
        return ModelConfig.preset(name)
    if Path(name).exists():
        return ModelConfig.from_json(name)
    raise ValueError(f"model {name!r}: not one of {', '.join(MODEL_SHAPES)}, a preset ({', '.join(PRESETS)}) "
                     f"or a path to config.json")


# ---- recipes ---------------------------------------------------------------------------------------
def pretrain() -> PretrainConfig:
    """The defaults: a fixed number of steps, no time budget."""
    return PretrainConfig()


def speedrun(minutes: float = 30.0, out: str = "runs/speedrun", corpus: str | None = None) -> PretrainConfig:
    """The laptop speedrun: tokenizer, pre-training and the long-context stage within `minutes`."""
    small = minutes < 8  # short budgets (CI) still pass through every stage, on a smaller model
    return PretrainConfig(
        out=out, corpus=corpus, minutes=minutes, model="test" if small else "speedrun",
        tokenizer_vocab=4096 if small else 8192, tokenizer_max_mb=1.0 if small else 12.0,
        max_corpus_mb=2.0 if small else 0.0, seq_len=128 if small else 256,
        batch_size=8 if small else 16, lr=3e-3, warmup_steps=5 if small else 30,
        eval_every=0 if small else 100, ckpt_every=0 if small else 200,
        long_seq_len=512 if small else 1024, long_batch_size=2 if small else 4,
        long_warmup_steps=2 if small else 10, long_min_doc_tokens=256 if small else 512,
        samples=2 if small else 4, sample_tokens=40 if small else 80)


RECIPES = {"pretrain": pretrain, "speedrun": speedrun}


def load_recipe(path: str | Path) -> PretrainConfig:
    """A flat YAML file: `recipe: speedrun` (optional) and PretrainConfig fields to override."""
    try:
        import yaml
    except ImportError:
        raise ValueError(f"{path}: reading a YAML recipe needs PyYAML: pip install pyyaml") from None

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such recipe file")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe is a flat mapping of field: value")
    name = data.pop("recipe", "pretrain")
    if name not in RECIPES:
        raise ValueError(f"{path}: recipe {name!r} is not one of {', '.join(RECIPES)}")
    return override(RECIPES[name](), data, source=str(path))


def override(cfg: PretrainConfig, changes: dict, source: str = "overrides") -> PretrainConfig:
    valid = {f.name: f for f in fields(PretrainConfig)}
    for key, value in changes.items():
        if key not in valid:
            raise ValueError(f"{source}: unknown field {key!r}; valid fields: {', '.join(valid)}")
        current = getattr(cfg, key)
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if current is not None and value is not None and not isinstance(value, type(current)):
            raise ValueError(f"{source}: field {key!r} must be {type(current).__name__}, got {value!r}")
    cfg = dataclasses.replace(cfg, **changes)
    cfg.train_config("pretrain").validate(source)
    return cfg
