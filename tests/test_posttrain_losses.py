"""SFT / DPO / reward losses against TRL's on the same weights and batches (fp32, tiny shapes), and
relations: DPO at init = ln 2, SFT ignores masked tokens, packed rows = the conversations one by one."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from qwen2.config import ModelConfig
from qwen2.data.conversations import _example, pack, pad
from qwen2.model import build_model
from qwen2.train.losses import IGNORE_INDEX
from qwen2.train.posttrain_losses import (
    dpo_loss,
    dpo_objective,
    label_logps,
    reward_loss,
    sequence_logps,
    sft_loss,
)

trl = pytest.importorskip("trl")
from hf_reference import hf_twin  # noqa: E402

PAD = 0


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig.preset("tiny").replace(tie_word_embeddings=False), seed=1).eval()


def conversations(n=4, seed=0, vocab=512):
    """n random (ids, mask) conversations: a prompt, then alternating completion / unmasked spans."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        t = 9 + 5 * i
        ids = torch.randint(1, vocab, (t,), generator=g).tolist()
        mask = [0] * t
        for s in range(3, t, 6):  # several assistant turns with unmasked turns between
            mask[s : s + 3] = [1] * len(mask[s : s + 3])
        out.append((ids, mask))
    return out


def test_sft_loss_equals_trl(model):
    convs = conversations()
    batch = pad([_example(ids, m, None) for ids, m in convs], PAD)
    loss, metrics = sft_loss(model, batch)
    collator = trl.trainer.sft_trainer.DataCollatorForLanguageModeling(pad_token_id=PAD)
    labelled = [[t if k else -100 for t, k in zip(ids, m, strict=True)] for ids, m in convs]
    pairs = zip(convs, labelled, strict=True)
    trl_batch = collator([{"input_ids": ids, "labels": lab} for (ids, _), lab in pairs])
    ref = hf_twin(model)(**trl_batch).loss  # the loss SFTTrainer.compute_loss returns for this batch
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert metrics["tokens"] == sum(sum(m[1:]) for _, m in convs)


def masked_mean_reference(model, ids, mask):
    """The SFT loss computed independently: full fp32 logits, CE per position, mean over the trained ones."""
    x, y, keep = torch.tensor([ids[:-1]]), torch.tensor(ids[1:]), torch.tensor(mask[1:]).bool()
    with torch.no_grad():
        per_token = F.cross_entropy(model(x).float()[0], y, reduction="none")
    return per_token[keep].mean()


def test_sft_loss_is_the_masked_mean_and_ignores_masked_tokens(model):
    ids, mask = conversations(1, seed=3)[0]  # 9 tokens, loss on 3..5, trailing 6..8 masked out
    assert mask[-3:] == [0, 0, 0] and mask[:3] == [0, 0, 0]
    loss = sft_loss(model, pad([_example(ids, mask, None)], PAD))[0]
    torch.testing.assert_close(loss, masked_mean_reference(model, ids, mask), rtol=1e-5, atol=1e-6)
    # Tokens after the last trained token are masked targets and context only of masked targets: changing
    # them leaves the loss exactly unchanged.
    tail = ids[:6] + [(t + 11) % 511 + 1 for t in ids[6:]]
    assert tail != ids
    changed_tail = sft_loss(model, pad([_example(tail, mask, None)], PAD))[0]
    torch.testing.assert_close(changed_tail, loss, rtol=0, atol=0)
    # Prompt tokens also condition the completion, so changing them changes the loss, but it stays the
    # masked mean: prompt positions never contribute a term.
    prompt = [(t + 5) % 511 + 1 for t in ids[:3]] + ids[3:]
    changed = sft_loss(model, pad([_example(prompt, mask, None)], PAD))[0]
    torch.testing.assert_close(changed, masked_mean_reference(model, prompt, mask), rtol=1e-5, atol=1e-6)


def test_packing_equals_one_by_one(model):
    examples = [_example(ids, m, None) for ids, m in conversations(5, seed=5)]
    packed = pack(examples, seq_len=40, pad_id=PAD)
    assert packed["input_ids"].shape[0] < len(examples)  # several conversations share a row
    with torch.no_grad():
        loss_packed = sft_loss(model, packed)[0]
        total = n = 0
        for e in examples:
            b = pad([e], PAD)
            k = int((b["labels"] != IGNORE_INDEX).sum())
            total, n = total + sft_loss(model, b)[0] * k, n + k
        torch.testing.assert_close(loss_packed, total / n, rtol=1e-5, atol=1e-6)
        # and the per-sequence log-probs of a packed row split back into the conversations' own
        lp = label_logps(model, packed["input_ids"], packed["labels"], packed["position_ids"])
        singles = torch.stack([label_logps(model, **pad([e], PAD))[0] for e in examples])
        torch.testing.assert_close(lp.sum(), singles.sum(), rtol=1e-5, atol=1e-4)


def trl_dpo_stub(hf_policy, hf_ref, beta):
    """The attributes DPOTrainer._compute_loss reads, with TRL's own fused log-prob head on both models."""
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(hf_policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    add_fused_lm_head(hf_ref)
    acc = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    return SimpleNamespace(
        model=hf_policy,
        ref_model=hf_ref,
        accelerator=acc,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=False,
        f_divergence_type="reverse_kl",
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        beta=beta,
        use_weighting=False,
        label_smoothing=0.0,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
    )


def test_dpo_equals_trl(model):
    from trl.trainer.dpo_trainer import DPOTrainer

    policy = model
    reference = build_model(model.config, seed=2).eval()
    convs = conversations(6, seed=7)
    chosen, rejected = convs[:3], convs[3:]
    batch = pad([_example(i, m, None) for i, m in chosen + rejected], PAD)
    with torch.no_grad():
        loss, metrics = dpo_objective(reference, beta=0.1)(policy, batch)
    # TRL: the same rows, unshifted ids, completion_mask, right padding
    t = max(len(i) for i, _ in convs)
    ids = torch.full((6, t), PAD)
    cmask = torch.zeros(6, t, dtype=torch.long)
    att = torch.zeros(6, t, dtype=torch.long)
    for r, (i, m) in enumerate(chosen + rejected):
        ids[r, : len(i)], cmask[r, : len(i)], att[r, : len(i)] = torch.tensor(i), torch.tensor(m), 1
    stub = trl_dpo_stub(hf_twin(policy).train(), hf_twin(reference), beta=0.1)
    with torch.no_grad():
        ref_loss = DPOTrainer._compute_loss(
            stub, stub.model, {"input_ids": ids, "attention_mask": att, "completion_mask": cmask}, False
        )
    m = stub._metrics["train"]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert metrics[k].item() == pytest.approx(m[k][0], rel=1e-4, abs=1e-5), k
    # our sequence_logps (ids + completion mask) = TRL's summed per-token log-probs
    with torch.no_grad():
        ours = sequence_logps(policy, ids, cmask)
        trl_lp = stub.model(
            input_ids=ids, attention_mask=att, labels=ids.masked_fill(cmask == 0, -100), fused_lm_head=True
        ).log_probs.sum(1)
    torch.testing.assert_close(ours, trl_lp, rtol=1e-5, atol=1e-4)


def test_dpo_loss_at_init_is_ln2_and_gradients_flow(model):
    batch = pad([_example(i, m, None) for i, m in conversations(4, seed=9)], PAD)
    loss, metrics = dpo_objective(model)(model, batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards/margins"].item() == 0
    loss.backward()
    g = model.output_weight.grad
    assert g is not None and torch.isfinite(g).all()
    model.zero_grad(set_to_none=True)


def test_sequence_logps_gradient_matches_full_logits(model):
    ids, mask = conversations(1, seed=11)[0]
    ids_t, mask_t = torch.tensor([ids]), torch.tensor([mask])
    w = model.output_weight
    lp = sequence_logps(model, ids_t, mask_t, chunk_rows=2)
    (g_ours,) = torch.autograd.grad(lp.sum(), w)
    logp = model(ids_t[:, :-1]).float().log_softmax(-1).gather(-1, ids_t[:, 1:, None]).squeeze(-1)
    full = (logp * mask_t[:, 1:]).sum(1)
    (g_ref,) = torch.autograd.grad(full.sum(), w)
    torch.testing.assert_close(lp, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-6)


def test_ipo_matches_trl_formula():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(5, generator=g) * 3 for _ in range(4))
    tc, tr = torch.tensor([3.0, 4, 5, 6, 7]), torch.tensor([2.0, 2, 9, 1, 4])
    out = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo", chosen_tokens=tc, rejected_tokens=tr)
    ref = ((((pc - rc) / tc - (pr - rr) / tr) - 1 / (2 * 0.1)) ** 2).mean()
    torch.testing.assert_close(out.loss, ref)


def test_reward_loss_equals_trl_reward_trainer():
    from trl.trainer.reward_trainer import RewardTrainer

    g = torch.Generator().manual_seed(0)
    r = torch.randn(8, 1, generator=g)
    margin = torch.rand(4, generator=g)
    for extra, coef in (({}, None), ({"margin": margin}, None), ({}, 0.01)):
        stub = SimpleNamespace(
            model=SimpleNamespace(training=True),
            args=SimpleNamespace(center_rewards_coefficient=coef),
            accelerator=SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x),
            _total_train_tokens=0,
            _tp_size=1,
            _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        )
        inputs = {
            "input_ids": torch.zeros(8, 3, dtype=torch.long),
            "attention_mask": torch.ones(8, 3),
            **extra,
        }
        ref = RewardTrainer.compute_loss(stub, lambda **kw: SimpleNamespace(logits=r), inputs)
        ours = reward_loss(r[:4, 0], r[4:, 0], extra.get("margin"), coef)
        torch.testing.assert_close(ours, ref)
