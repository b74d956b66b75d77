"""Post-training losses: SFT, DPO (sigmoid / IPO) and the Bradley-Terry reward-model loss (paper section 4).

SPEC 7: SFT trains on the assistant's tokens only; SPEC 4: offline and online DPO with the sigmoid loss and
beta = 0.1 (the Qwen2 paper gives no beta; the Online Merging paper uses 0.1). The formulas are TRL's
(DPOTrainer._compute_loss with loss_type "sigmoid" / "ipo", RewardTrainer.compute_loss), which the tests
check on the same weights and batches.

Batches (qwen2.data.conversations): `input_ids` [B, T] and `labels` [B, T] already aligned (labels[:, i] is
the target of input_ids[:, i], IGNORE_INDEX where no loss), and optionally `position_ids` [B, T] for packed
rows: positions restart at 0 at each conversation, and `DocumentMask` turns the restarts into a block-causal
mask that the model reads through its KV-cache interface (attention.CacheView), so packed conversations do
not see each other. Neither loss ever holds [tokens, vocab] fp32 logits for the whole batch: SFT goes through
losses.linear_cross_entropy, log-probs are computed a chunk of rows at a time under activation checkpointing.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from qwen2.attention import CacheView
from qwen2.train.losses import IGNORE_INDEX, chunk_rows_for, linear_cross_entropy


class DocumentMask:
    """A stand-in KV cache that adds no keys but masks attention to each token's own document.

    positions [B, T] restart at 0 where a packed conversation begins; token i may attend to j when j <= i and
    both lie in the same document. Implements the two methods of attention.KVCache.
    """

    def __init__(self, positions: torch.Tensor):
        doc = (positions == 0).cumsum(dim=1)  # [B, T] document index within the row
        t = positions.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=positions.device).tril()
        self.mask = (doc[:, :, None] == doc[:, None, :]) & causal  # [B, T, T]

    def view(self, positions: torch.Tensor) -> CacheView:
        return CacheView(positions=positions, mask=self.mask[:, None])

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, view: CacheView):
        return k, v


def body(model, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Final hidden states [B, T, H]; with `positions` (packed rows) attention stays inside each document."""
    if positions is None:
        return model.hidden_states(input_ids)
    return model.hidden_states(input_ids, positions, cache=DocumentMask(positions))


def sft_loss(model, batch: dict, chunk_rows: int | None = None):
    """SFT objective: mean next-token cross-entropy over the micro-batch's labelled (assistant) tokens."""
    h = body(model, batch["input_ids"], batch.get("position_ids"))
    labels = batch["labels"]
    keep = labels != IGNORE_INDEX
    # Only labelled rows reach the output layer: prompt and padding rows never make [V] logits.
    loss = (
        linear_cross_entropy(h[keep], model.output_weight, labels[keep], chunk_rows)
        if keep.any()
        else h.sum() * 0
    )
    return loss, {"loss": loss.detach(), "tokens": keep.sum().float()}


def _chunk_logps(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = (h @ w.T).float()  # [c, V]: one chunk's logits, recomputed in backward
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def label_logps(
    model,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    positions: torch.Tensor | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """[B] fp32: each row's sum of log p(labels[:, i] | input_ids[:, :i+1]) where labels != IGNORE_INDEX."""
    h = body(model, input_ids, positions)
    keep = labels != IGNORE_INDEX
    rows = keep.nonzero(as_tuple=True)
    hs, ts = h[rows], labels[rows]  # only the completion's rows reach the output layer
    w = model.output_weight.to(h.dtype)
    step = chunk_rows or chunk_rows_for(w.shape[0])
    parts = []
    for s in range(0, hs.shape[0], step):
        args = (hs[s : s + step], w, ts[s : s + step])
        grad = torch.is_grad_enabled() and (hs.requires_grad or w.requires_grad)
        parts.append(checkpoint(_chunk_logps, *args, use_reentrant=False) if grad else _chunk_logps(*args))
    per_token = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
    out = torch.zeros(labels.shape[0], dtype=torch.float32, device=h.device)
    return out.index_add(0, rows[0], per_token)


def sequence_logps(
    model, ids: torch.Tensor, mask: torch.Tensor, chunk_rows: int | None = None
) -> torch.Tensor:
    """ids [B, T], mask [B, T] (1 on the completion's tokens) -> [B]: sum of log p(ids[t] | ids[:t])
    over the masked t (the first token has no prediction and never counts)."""
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
    return label_logps(model, ids[:, :-1], labels, chunk_rows=chunk_rows)


class DPOOutput(NamedTuple):
    loss: torch.Tensor  # scalar
    chosen_rewards: torch.Tensor  # [B] beta * (log pi(y_c) - log ref(y_c)), detached
    rejected_rewards: torch.Tensor  # [B]
    margins: torch.Tensor  # [B] chosen - rejected
    accuracy: torch.Tensor  # scalar: fraction with chosen reward > rejected reward


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> DPOOutput:
    """DPO on sequence log-probs [B] (TRL DPOTrainer, reverse KL).

    sigmoid: -log sigmoid(beta * (chosen log-ratio - rejected log-ratio)), mean over pairs.
    ipo: (delta - 1 / (2 beta))^2 with each log-ratio divided by its completion's token count (TRL's
    length normalisation; pass chosen_tokens / rejected_tokens [B]).
    """
    chosen_lr, rejected_lr = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if loss_type == "sigmoid":
        per_pair = -F.logsigmoid(beta * (chosen_lr - rejected_lr))
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError(
                "dpo_loss: loss_type 'ipo' needs chosen_tokens and rejected_tokens "
                "(the completions' token counts)"
            )
        delta = chosen_lr / chosen_tokens.clamp(min=1) - rejected_lr / rejected_tokens.clamp(min=1)
        per_pair = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"dpo_loss: loss_type {loss_type!r} is not supported; use 'sigmoid' or 'ipo'")
    chosen_r, rejected_r = beta * chosen_lr.detach(), beta * rejected_lr.detach()
    accuracy = (chosen_r > rejected_r).float().mean()
    return DPOOutput(per_pair.mean(), chosen_r, rejected_r, chosen_r - rejected_r, accuracy)


def dpo_objective(reference=None, beta: float = 0.1, loss_type: str = "sigmoid"):
    """A DPO objective `(model, batch) -> (loss, metrics)` for train.loop.Trainer.

    batch: input_ids / labels [2B, T] with the B chosen rows first, then the B rejected ones (TRL's
    concatenated layout); `ref_logps` [2B] when the reference log-probs were precomputed once, else
    `reference` (the frozen SFT model) scores the batch under no_grad.
    One sequence a row (conversations.preference_batch pads): log-probs are summed per row.
    """

    def objective(model, batch):
        ids, labels, pos = batch["input_ids"], batch["labels"], batch.get("position_ids")
        logps = label_logps(model, ids, labels, pos)
        ref = batch.get("ref_logps")
        if ref is None:
            if reference is None:
                raise ValueError("dpo_objective: the batch has no ref_logps and no reference model was given")
            with torch.no_grad():
                ref = label_logps(reference, ids, labels, pos)
        tokens = (labels != IGNORE_INDEX).sum(dim=1).float()
        pc, pr = logps.chunk(2)
        rc, rr = ref.chunk(2)
        tc, tr = tokens.chunk(2)
        out = dpo_loss(pc, pr, rc, rr, beta, loss_type, tc, tr)
        metrics = {
            "loss": out.loss.detach(),
            "rewards/chosen": out.chosen_rewards.mean(),
            "rewards/rejected": out.rejected_rewards.mean(),
            "rewards/margins": out.margins.mean(),
            "rewards/accuracies": out.accuracy,
            "logps/chosen": pc.detach().mean(),
            "logps/rejected": pr.detach().mean(),
        }
        return out.loss, metrics

    return objective


def reward_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float | None = None,
) -> torch.Tensor:
    """Bradley-Terry loss -log sigmoid(r_c - r_r [- margin]) (TRL RewardTrainer), mean over pairs; optional
    `center_coef * mean((r_c + r_r)^2)` keeps the rewards centred (TRL's center_rewards_coefficient)."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * torch.mean((r_chosen + r_rejected) ** 2)
    return loss


def reward_objective(center_coef: float | None = None):
    """Reward-model objective: input_ids [2B, T] (chosen rows first, right-padded), optional margin [B]."""

    def objective(model, batch):
        r_c, r_r = model(batch["input_ids"]).chunk(2)
        loss = reward_loss(r_c, r_r, batch.get("margin"), center_coef)
        diff = (r_c - r_r).detach()
        return loss, {"loss": loss.detach(), "accuracy": (diff > 0).float().mean(), "margin": diff.mean()}

    return objective
