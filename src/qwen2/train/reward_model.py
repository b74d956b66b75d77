"""The reward model of Qwen2's online DPO (paper section 4.3; SPEC 4): the Qwen2 body with a scalar head.

Stored exactly as transformers' Qwen2ForSequenceClassification with num_labels=1: the body's `model.*`
tensors plus `score.weight` [1, H], config.json with architectures ["Qwen2ForSequenceClassification"],
id2label / label2id as transformers writes them and pad_token_id set, so transformers (and vLLM's
reward-model runner) load it unchanged. The score of a sequence is the head applied to the hidden state of
its last real token, found with transformers' rule: the rightmost token that is not pad_token_id (right
padding). Departure: the head runs on those B rows only, not on every position.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from qwen2.checkpoint import CheckpointError, read_headers, save_model
from qwen2.config import ModelConfig
from qwen2.model import Qwen2

ARCHITECTURE = "Qwen2ForSequenceClassification"


def reward_config(config: ModelConfig, pad_token_id: int) -> ModelConfig:
    """`config` with the sequence-classification keys transformers writes for num_labels=1."""
    extra = {
        **config.extra,
        "architectures": [ARCHITECTURE],
        "id2label": {"0": "LABEL_0"},
        "label2id": {"LABEL_0": 0},
        "pad_token_id": int(pad_token_id),
    }
    return config.replace(extra=extra)


class RewardModel(Qwen2):
    """Qwen2 body + `score` (nn.Linear(hidden, 1, bias=False)); forward(input_ids [B, T]) -> scores [B] fp32.

    The causal LM's output layer is dropped (a reward model has none); `hidden_states` is Qwen2's.
    """

    def __init__(self, config: ModelConfig, pad_token_id: int | None = None):
        pad = config.extra.get("pad_token_id") if pad_token_id is None else pad_token_id
        if pad is None:
            raise ValueError(
                "RewardModel: pad_token_id is required (config.json 'pad_token_id', or the "
                "argument); use the tokenizer's pad id, e.g. <|endoftext|> 151643"
            )
        super().__init__(reward_config(config, pad))
        self.pad_token_id = int(pad)
        self.lm_head = None
        self.score = nn.Linear(config.hidden_size, 1, bias=False)

    @classmethod
    def from_causal_lm(
        cls, lm: Qwen2, pad_token_id: int, generator: torch.Generator | None = None
    ) -> RewardModel:
        """A reward model whose body is `lm`'s (copied) and whose head is freshly initialised."""
        p = next(lm.parameters())
        with torch.device("meta"):
            rm = cls(lm.config, pad_token_id)
        rm.to_empty(device=p.device)
        rm.init_weights(generator)
        rm.model.load_state_dict(lm.model.state_dict())
        return rm.to(p.dtype)

    def last_token_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B]: index of each row's rightmost non-pad token (transformers' rule; 0 for an all-pad row)."""
        t = input_ids.shape[1]
        idx = torch.arange(t, device=input_ids.device)
        return (idx * (input_ids != self.pad_token_id)).argmax(-1)

    def forward(self, input_ids: torch.Tensor, positions=None, cache=None) -> torch.Tensor:
        h = self.hidden_states(input_ids, positions, cache)  # [B, T, H]
        last = h[torch.arange(h.shape[0], device=h.device), self.last_token_index(input_ids)]  # [B, H]
        return self.score(last).squeeze(-1).float()


def save_reward_model(model: RewardModel, path: str | os.PathLike, max_shard_size: int | str = "5GB") -> Path:
    """Write the reward model as a Qwen2ForSequenceClassification checkpoint (atomic per file)."""
    return save_model(model, path, max_shard_size)


def load_reward_model(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> RewardModel:
    """Load a Qwen2ForSequenceClassification (num_labels=1) checkpoint written by us or by transformers."""
    from safetensors import safe_open

    directory = Path(path)
    config = ModelConfig.from_json(directory)
    cfg_file = directory / "config.json"
    arch = config.extra.get("architectures") or []
    if ARCHITECTURE not in arch:
        raise CheckpointError(
            f"{cfg_file}: architectures is {arch}, not [{ARCHITECTURE!r}]; "
            "a causal LM loads with qwen2.load_model, or becomes a reward model "
            "with RewardModel.from_causal_lm"
        )
    labels = config.extra.get("id2label", {"0": "LABEL_0"})
    if len(labels) != 1:
        raise CheckpointError(
            f"{cfg_file}: id2label has {len(labels)} labels; a reward model has num_labels=1"
        )
    files = sorted({file for file, _, _ in read_headers(directory).values()})  # every header checked first
    dtype = dtype or getattr(torch, config.torch_dtype)
    state = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                state[name] = t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = RewardModel(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{directory}: tensors do not match config.json: {e}") from None
    return model.eval()
