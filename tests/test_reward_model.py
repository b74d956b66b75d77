"""The reward model (paper 4.3): saved as transformers' Qwen2ForSequenceClassification (num_labels=1), loaded
by transformers with the same scores on right-padded batches; our load round-trips; one forward per batch."""

import json

import pytest
import torch

from qwen2.config import ModelConfig
from qwen2.model import build_model
from qwen2.train.posttrain_losses import reward_objective
from qwen2.train.reward_model import RewardModel, load_reward_model, save_reward_model

transformers = pytest.importorskip("transformers")
PAD = 511


@pytest.fixture(scope="module")
def rm():
    lm = build_model(ModelConfig.preset("tiny").replace(tie_word_embeddings=False), seed=3)
    return RewardModel.from_causal_lm(lm, pad_token_id=PAD, generator=torch.Generator().manual_seed(0)).eval()


def right_padded(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), PAD)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(0, PAD, (n,), generator=g)
    return ids


def test_transformers_loads_it_and_gives_the_same_scores(rm, tmp_path):
    save_reward_model(rm, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForSequenceClassification"] and cfg["pad_token_id"] == PAD
    assert cfg["id2label"] == {"0": "LABEL_0"} and cfg["label2id"] == {"LABEL_0": 0}
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path, torch_dtype=torch.float32)
    assert type(hf).__name__ == "Qwen2ForSequenceClassification" and hf.config.num_labels == 1
    ids = right_padded([5, 9, 2, 12])
    with torch.no_grad():
        ours = rm(ids)
        theirs = hf(input_ids=ids, attention_mask=(ids != PAD).long()).logits.squeeze(-1)
    assert ours.shape == (4,)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # transformers' save -> our load gives the same scores too
    hf.save_pretrained(tmp_path / "hf")
    back = load_reward_model(tmp_path / "hf", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(back(ids), ours, rtol=1e-5, atol=1e-5)


def test_score_is_read_at_the_last_real_token(rm):
    ids = right_padded([4, 7])
    with torch.no_grad():
        batch = rm(ids)
        alone = torch.stack([rm(ids[i : i + 1, :n])[0] for i, n in enumerate([4, 7])])
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-5)


def test_load_round_trip_and_errors(rm, tmp_path):
    save_reward_model(rm, tmp_path / "rm")
    back = load_reward_model(tmp_path / "rm")
    for (k, a), (k2, b) in zip(rm.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    assert "score.weight" in back.state_dict() and "lm_head.weight" not in back.state_dict()
    lm_dir = tmp_path / "lm"
    from qwen2.checkpoint import save_model

    save_model(build_model(ModelConfig.preset("tiny"), seed=0), lm_dir)
    with pytest.raises(ValueError, match="Qwen2ForSequenceClassification"):
        load_reward_model(lm_dir)


def test_reward_objective_trains(rm):
    ids = torch.cat([right_padded([6, 8], seed=1), right_padded([5, 8], seed=2)])  # 2 chosen, then 2 rejected
    loss, metrics = reward_objective()(rm, {"input_ids": ids})
    with torch.no_grad():
        r = rm(ids)
    expected = -torch.nn.functional.logsigmoid(r[:2] - r[2:]).mean()
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert rm.score.weight.grad is not None and set(metrics) == {"loss", "accuracy", "margin"}
    rm.zero_grad(set_to_none=True)
