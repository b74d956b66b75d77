"""Recipes: Python functions that return config dataclasses; a flat YAML file may override fields.

DESIGN principles 8 and 12: no registries of components, no `_component_` strings, and configs
compose instead of copying. A recipe is a function; `load_recipe("speedrun.yaml")` reads
`recipe: <function name>` (default `pretrain`) plus any field of the recipe's config, and returns the
recipe's config with those fields replaced. Unknown keys are a one-line error that names the file,
the key and the nearest valid one.

`PretrainConfig` is a `TrainConfig` (the loop's settings, inherited: `lr: 1e-3` at the top level of
a YAML file sets TrainConfig.lr) plus the fields of pre-training alone (data, tokenizer, the time
budget, the long-context stage's `long_*` settings); `train_config(stage)` hands the loop a plain
TrainConfig for each stage. A later recipe composes the same way: `class SFTConfig(TrainConfig)` adds
only its own fields (the conversation files, the chat template, the masking choice), overrides the
defaults it needs by redeclaring them (`lr: float = 1e-5`), and its functions join RECIPES; DPO
(`beta`, the reference model) and the reward model likewise. `override` and `load_recipe` take
any such dataclass, so a flat YAML file sets loop and stage fields alike with no code per recipe.

Model shapes for training from scratch (`model:` field) are presets too: `speedrun` is a small
Qwen2 with every Qwen2 trait (GQA, q/k/v bias, tied embeddings, SwiGLU, RMSNorm, RoPE) sized for a
2-core CPU; its vocabulary comes from the tokenizer the run trains.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, fields
from pathlib import Path

from qwen2.config import PRESETS, ModelConfig
from qwen2.extras import require
from qwen2.train.loop import TrainConfig


@dataclass
class PretrainConfig(TrainConfig):
    """Everything `qwen2 pretrain` / `qwen2 speedrun` need: the loop's TrainConfig fields (stage 1's
    batch_size, lr, warmup_steps; the rest shared by both stages) and the fields below. Stage 1 is
    ordinary pre-training; stage 2 is the long-context stage (paper section 3: 4,096 -> 32,768 tokens,
    RoPE base 10,000 -> 1,000,000)."""

    # -- TrainConfig fields whose pre-training defaults differ from the loop's
    batch_size: int = 16
    eval_every: int = 50
    ckpt_every: int = 50
    # -- where the run writes
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
    # -- stage 1 (its batch_size, lr, warmup_steps are the TrainConfig fields)
    seq_len: int = 256
    rope_theta: float = 10_000.0
    steps: int = 200
    eval_batches: int = 4
    # -- stage 2: long context (replacing batch_size, lr, warmup_steps in its TrainConfig)
    long_seq_len: int = 1024
    long_rope_theta: float = 1_000_000.0
    long_steps: int = 40
    long_batch_size: int = 4
    long_lr: float = 1e-3
    long_warmup_steps: int = 5
    long_min_doc_tokens: int = 512  # the long-document mixture: documents at least this long
    long_mix: float = 0.7  # share of long documents in the stage-2 mixture (the rest: the ordinary corpus)
    # -- verifiable problems mixed into pre-training (data.tasks; 0: none): their share of the tokens of
    # each stage; the long stage's passkeys hide the key in filler up to long_seq_len tokens
    task_problems: int = 0
    task_families: str = "arithmetic,strings,passkey"
    task_share: float = 0.3
    # -- report
    samples: int = 4
    sample_tokens: int = 80

    def train_config(self, stage: str) -> TrainConfig:
        """The loop's settings for `stage` ("pretrain" or "long"): this config's TrainConfig part,
        with the long stage's batch size, peak learning rate and warmup."""
        if stage not in ("pretrain", "long"):
            raise ValueError(f"PretrainConfig.train_config: stage must be pretrain or long, got {stage!r}")
        cfg = TrainConfig(**{f.name: getattr(self, f.name) for f in fields(TrainConfig)})
        if stage == "long":
            cfg = dataclasses.replace(
                cfg, batch_size=self.long_batch_size, lr=self.long_lr, warmup_steps=self.long_warmup_steps
            )
        return cfg

    def validate(self, source: str = "PretrainConfig"):
        for stage in ("pretrain", "long"):
            self.train_config(stage).validate(source)
        if not 0.0 <= self.long_mix <= 1.0:
            raise ValueError(f"{source}: long_mix must be in [0, 1], got {self.long_mix}")
        if not 0.0 <= self.task_share < 1.0:
            raise ValueError(f"{source}: task_share must be in [0, 1), got {self.task_share}")
        if not 0.0 <= self.long_fraction < 1.0:
            raise ValueError(f"{source}: long_fraction must be in [0, 1), got {self.long_fraction}")


# ---- post-training (paper section 4; SPEC 4, 7) -----------------------------------------------------
@dataclass
class PostTrainConfig(TrainConfig):
    """What every post-training command shares: the loop's fields plus the starting checkpoint, the
    conversation file, the run folder and the length of a pass. `qwen2 sft|reward|dpo|online-dpo`."""

    model: str = "runs/speedrun/model"  # the starting Hugging Face checkpoint (its tokenizer beside it)
    data: str = ""  # a .jsonl / .parquet file of TRL's conversational records
    out: str = "runs/posttrain"
    epochs: float = 2.0
    steps: int = 0  # 0: as many optimizer steps as `epochs` passes over the data take
    max_len: int = 2048  # tokens per conversation (longer ones are cut)
    heldout_fraction: float = 0.05
    eval_batches: int = 4
    batch_size: int = 8
    warmup_steps: int = 0
    ckpt_every: int = 100

    def validate(self, source: str = "PostTrainConfig"):
        super().validate(source)
        if self.epochs <= 0 and self.steps <= 0:
            raise ValueError(f"{source}: set epochs > 0 or steps > 0")
        if self.max_len < 2:
            raise ValueError(f"{source}: max_len must be >= 2, got {self.max_len}")
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError(f"{source}: heldout_fraction must be in [0, 1), got {self.heldout_fraction}")


@dataclass
class SFTConfig(PostTrainConfig):
    """SFT as the paper (SPEC 7): 2 epochs, LR decaying from 7e-6 to 7e-7 (linear), weight decay 0.1,
    clip 1.0, 32,768-token sequences; the loss on assistant tokens only."""

    out: str = "runs/sft"
    lr: float = 7e-6
    min_lr_ratio: float = 0.1
    schedule: str = "linear"
    max_len: int = 32_768
    packing: bool = False  # several conversations per row, attention kept inside each


@dataclass
class RewardConfig(PostTrainConfig):
    """The reward model: the SFT body + a scalar head, Bradley-Terry loss on preference pairs. The paper
    gives no settings; one epoch and TRL's RewardConfig learning rate."""

    out: str = "runs/reward"
    epochs: float = 1.0
    lr: float = 1e-5
    schedule: str = "linear"
    min_lr_ratio: float = 0.0
    center_coef: float = 0.0  # TRL's center_rewards_coefficient (0: off)


@dataclass
class DPOConfig(PostTrainConfig):
    """Offline DPO: sigmoid loss, beta 0.1 and the Online Merging paper's script (LR 1e-6 cosine, 2 epochs;
    Qwen2 gives none). The reference is the starting (SFT) model unless `reference` is set; optimizer
    ondare / onties merge toward the task vector SFT - `base_model` (the pre-trained checkpoint)."""

    out: str = "runs/dpo"
    lr: float = 1e-6
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid | ipo
    reference: str | None = None
    base_model: str | None = None

    def validate(self, source: str = "DPOConfig"):
        super().validate(source)
        if self.loss_type not in ("sigmoid", "ipo"):
            raise ValueError(f"{source}: loss_type must be sigmoid or ipo, got {self.loss_type!r}")
        if self.beta <= 0:
            raise ValueError(f"{source}: beta must be > 0, got {self.beta}")


@dataclass
class OnlineDPOConfig(DPOConfig):
    """Online DPO: each step samples `samples` replies per prompt with our Engine, the reward model's best
    and worst make the pair. `steps` counts optimizer steps (episodes); `epochs` passes over the prompts."""

    out: str = "runs/online-dpo"
    epochs: float = 1.0
    reward_model: str = ""
    samples: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    max_tries: int = 4  # rounds of prompts drawn to fill a batch when replies tie
    heldout_fraction: float = 0.0

    def validate(self, source: str = "OnlineDPOConfig"):
        super().validate(source)
        if self.samples < 2:
            raise ValueError(f"{source}: samples must be >= 2 (a pair is the best and worst of them)")
        if self.temperature <= 0:
            raise ValueError(f"{source}: temperature must be > 0 (greedy samples would all tie)")


# ---- model shapes for training from scratch ------------------------------------------------------
def speedrun_model(vocab_size: int) -> ModelConfig:
    """~2.6M parameters (1.0M in the embedding at an 8k vocabulary): hidden 128, 6 layers, 4 query
    heads sharing 2 KV heads (head_dim 32), SwiGLU 384, q/k/v bias, tied embeddings. On 2 CPU cores
    a wider model sees too few tokens in 20 minutes to beat this one (measured: bench/train.py notes)."""
    return ModelConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        rope_theta=10_000.0,
        torch_dtype="float32",
        bos_token_id=None,
        eos_token_id=None,
    )


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
    raise ValueError(
        f"model {name!r}: not one of {', '.join(MODEL_SHAPES)}, a preset ({', '.join(PRESETS)}) "
        f"or a path to config.json"
    )


# ---- recipes ---------------------------------------------------------------------------------------
def pretrain() -> PretrainConfig:
    """The defaults: a fixed number of steps, no time budget."""
    return PretrainConfig()


def speedrun(minutes: float = 30.0, out: str = "runs/speedrun", corpus: str | None = None) -> PretrainConfig:
    """The laptop speedrun: tokenizer, pre-training and the long-context stage within `minutes`."""
    small = minutes < 8  # short budgets (CI) still pass through every stage, on a smaller model
    return PretrainConfig(
        out=out,
        corpus=corpus,
        minutes=minutes,
        model="test" if small else "speedrun",
        tokenizer_vocab=4096 if small else 8192,
        tokenizer_max_mb=1.0 if small else 12.0,
        max_corpus_mb=2.0 if small else 0.0,
        seq_len=128 if small else 256,
        batch_size=8 if small else 16,
        lr=3e-3,
        warmup_steps=5 if small else 30,
        eval_every=0 if small else 100,
        ckpt_every=0 if small else 200,
        long_seq_len=512 if small else 1024,
        long_batch_size=2 if small else 4,
        long_warmup_steps=2 if small else 10,
        long_min_doc_tokens=256 if small else 512,
        samples=2 if small else 4,
        sample_tokens=40 if small else 80,
        task_problems=3_000 if small else 30_000,
        task_share=0.5,  # measured: at 0.3 a 30-minute run learnt too few problems to post-train on
    )


RECIPES = {
    "pretrain": pretrain,
    "speedrun": speedrun,
    "sft": SFTConfig,
    "reward": RewardConfig,
    "dpo": DPOConfig,
    "online-dpo": OnlineDPOConfig,
}


def load_recipe(path: str | Path, default: str = "pretrain"):
    """A flat YAML file: `recipe: NAME` (optional; `default` when absent) and fields of the recipe's
    config to override."""
    yaml = require("yaml", "train", f"{path}: reading a YAML recipe")

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such recipe file")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe is a flat mapping of field: value")
    name = data.pop("recipe", default)
    if name not in RECIPES:
        raise ValueError(f"{path}: recipe {name!r} is not one of {', '.join(RECIPES)}")
    return override(RECIPES[name](), data, source=str(path))


def override(cfg, changes: dict, source: str = "overrides"):
    """`cfg` (any recipe's config dataclass) with `changes` applied, type-checked and validated."""
    valid = {f.name for f in fields(cfg)}
    clean = {}
    for key, value in changes.items():
        if key not in valid:
            near = difflib.get_close_matches(str(key), sorted(valid), n=1)
            hint = f"did you mean {near[0]!r}?" if near else f"{type(cfg).__name__} has no such field"
            raise ValueError(
                f"{source}: unknown field {key!r} ({hint}); valid fields: {', '.join(sorted(valid))}"
            )
        clean[key] = _coerce(getattr(cfg, key), value, key, source)
    cfg = dataclasses.replace(cfg, **clean)
    cfg.validate(source)
    return cfg


def _coerce(current, value, key: str, source: str):
    """`value` as the type of the field's current value. YAML 1.1 reads `1e-3` (no dot) as a string
    and `3` as an int: both are accepted for a float field."""
    if isinstance(current, float) and not isinstance(value, bool):
        if isinstance(value, int):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    if current is None or value is None:
        return value
    if isinstance(value, bool) != isinstance(current, bool) or not isinstance(value, type(current)):
        raise ValueError(f"{source}: field {key!r} must be {type(current).__name__}, got {value!r}")
    return value
