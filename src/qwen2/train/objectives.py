"""Training objectives: functions `(model, batch) -> (loss, metrics)` (DESIGN principle 7).

Next-token prediction (paper section 3: pre-training and the long-context stage) through
losses.linear_cross_entropy. Departure: the loss is the mean over the micro-batch's target tokens; the
loop averages micro-batches and ranks with equal weight (exact for packed pre-training, where every
row has T targets). The MoE auxiliary load-balancing loss (SPEC 2.7) is added when the model is a
Qwen2-MoE, computed per micro-batch on each rank (as transformers does), and the experts' load is logged
(moe_stats: `moe/max_load`, `moe/min_load`, `moe/load_cv`; the run's per-layer load summed on the model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwen2.train import moe_stats
from qwen2.train.losses import IGNORE_INDEX, chunk_rows_for, linear_cross_entropy, load_balancing_loss


def token_losses(
    model, input_ids: torch.Tensor, targets: torch.Tensor, chunk_rows: int | None = None
) -> torch.Tensor:
    """Per-token next-token losses [B, T] fp32 (0 where ignored), chunked over rows like the loss above."""
    h = model.hidden_states(input_ids)
    b, t, hd = h.shape
    h2, tg = h.reshape(-1, hd), targets.reshape(-1)
    w = model.output_weight.to(h.dtype)
    rows = chunk_rows or chunk_rows_for(w.shape[0])
    out = torch.empty(h2.shape[0], dtype=torch.float32, device=h.device)
    for s in range(0, h2.shape[0], rows):
        logits = (h2[s : s + rows] @ w.T).float()
        out[s : s + rows] = F.cross_entropy(
            logits, tg[s : s + rows], ignore_index=IGNORE_INDEX, reduction="none"
        )
    return out.view(b, t)


def split_batch(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed batch -> (input_ids [B, T], targets [B, T]).

    Accepts a tensor [B, T+1] of token ids (targets are the ids shifted by one), PackedLoader's
    `{"input_ids": [B, T+1]}`, or a dict with `input_ids` and `labels` (already aligned:
    labels[:, i] is the target of input_ids[:, i], IGNORE_INDEX where no loss).
    """
    if isinstance(batch, dict):
        if "labels" in batch:
            return batch["input_ids"], batch["labels"]
        batch = batch["input_ids"]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if torch.is_tensor(batch) and batch.dim() == 2:
        batch = batch.long()
        return batch[:, :-1], batch[:, 1:]
    raise TypeError(
        f"a batch must be a [B, T+1] tensor, an (inputs, targets) pair or a dict, got {type(batch).__name__}"
    )


def next_token_loss(model, batch, chunk_rows: int | None = None):
    """Pre-training objective: fp32 next-token cross-entropy (+ the MoE aux loss when the model has
    experts)."""
    input_ids, targets = split_batch(batch)
    router_logits = [] if model.config.is_moe else None
    h = model.hidden_states(input_ids, router_logits=router_logits)
    loss = linear_cross_entropy(h, model.output_weight, targets, chunk_rows)
    metrics = {"loss": loss.detach()}
    if router_logits:
        top_k = model.config.num_experts_per_tok
        aux = load_balancing_loss(router_logits, top_k)
        metrics["aux_loss"] = aux.detach()
        load = moe_stats.expert_load(router_logits, top_k)
        metrics.update(moe_stats.load_summary(load))
        if model.training:  # the run's histogram: training steps only, not evaluation
            moe_stats.accumulate(model, load)
        loss = loss + model.config.router_aux_loss_coef * aux
    return loss, metrics
