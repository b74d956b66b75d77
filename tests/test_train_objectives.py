"""Chunked cross-entropy = the plain one; AdamW groups; the schedule; the pre-training objective."""

import math

import pytest
import torch
import torch.nn.functional as F

from qwen2.config import ModelConfig
from qwen2.model import build_model
from qwen2.train.loop import TrainConfig, lr_at, param_groups
from qwen2.train.objectives import (
    IGNORE_INDEX,
    linear_cross_entropy,
    next_token_loss,
    split_batch,
    token_losses,
)


def _inputs(n=37, h=24, v=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.3
    t = torch.randint(0, v, (n,), generator=g)
    t[::5] = IGNORE_INDEX
    return hid, w, t


@pytest.mark.parametrize("chunk_rows", [1, 7, 16, 1000])
def test_chunked_cross_entropy_equals_plain_value_and_gradient(chunk_rows):
    hid, w, t = _inputs()
    h1, w1 = hid.clone().requires_grad_(), w.clone().requires_grad_()
    ref = F.cross_entropy(h1 @ w1.T, t, ignore_index=IGNORE_INDEX)
    ref.backward()
    h2, w2 = hid.clone().requires_grad_(), w.clone().requires_grad_()
    ours = linear_cross_entropy(h2, w2, t, chunk_rows=chunk_rows)
    (ours * 3.0).backward()  # a non-unit upstream gradient scales both gradients
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12, check_dtype=False)
    torch.testing.assert_close(h2.grad, 3.0 * h1.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w2.grad, 3.0 * w1.grad, rtol=1e-10, atol=1e-12)


def test_chunked_cross_entropy_fp32_and_shapes():
    hid, w, t = _inputs(n=2 * 9, h=16, v=300)
    h3 = hid.float().view(2, 9, 16).requires_grad_()
    wf = w.float().requires_grad_()
    loss = linear_cross_entropy(h3, wf, t.view(2, 9), chunk_rows=4)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    ref = F.cross_entropy((hid @ w.T), t, ignore_index=IGNORE_INDEX)
    assert abs(loss.item() - ref.item()) < 1e-5
    loss.backward()
    assert h3.grad.shape == h3.shape and wf.grad.shape == wf.shape


def test_chunked_cross_entropy_under_bf16_autocast_is_fp32_and_close():
    hid, w, t = _inputs(n=64, h=32, v=500)
    h, wf = hid.float().requires_grad_(), w.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, wf, t)
    loss.backward()
    ref = F.cross_entropy(hid @ w.T, t, ignore_index=IGNORE_INDEX)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 0.05  # bf16 matmul, fp32 softmax
    assert wf.grad.dtype == torch.float32 and h.grad.dtype == torch.float32


def test_all_targets_ignored_gives_zero_loss_and_gradient():
    hid, w, t = _inputs(n=8)
    h = hid.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, torch.full_like(t, IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().max().item() == 0.0


def test_next_token_loss_equals_plain_cross_entropy_of_forward():
    model = build_model(ModelConfig.preset("tiny"), seed=0)
    ids = torch.randint(0, model.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(1))
    loss, metrics = next_token_loss(model, {"input_ids": ids})
    logits = model(ids[:, :-1])
    ref = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    assert metrics["loss"] == loss.detach()
    per_tok = token_losses(model, ids[:, :-1], ids[:, 1:])
    torch.testing.assert_close(per_tok.mean(), ref, rtol=1e-6, atol=1e-6)


def test_moe_objective_adds_the_aux_loss():
    model = build_model(ModelConfig.preset("tiny-moe"), seed=0)
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(2))
    loss, metrics = next_token_loss(model, ids)
    expected = metrics["loss"] + model.config.router_aux_loss_coef * metrics["aux_loss"]
    torch.testing.assert_close(loss.detach(), expected)


def test_split_batch_forms():
    x = torch.arange(12).view(2, 6)
    for form in (x, {"input_ids": x}):
        i, t = split_batch(form)
        assert torch.equal(i, x[:, :-1]) and torch.equal(t, x[:, 1:])
    i, t = split_batch({"input_ids": x, "labels": x})
    assert torch.equal(i, t)
    with pytest.raises(TypeError):
        split_batch("nope")


def test_param_groups_no_decay_on_norms_biases_embeddings():
    for tie in (True, False):
        model = build_model(ModelConfig.preset("tiny").replace(tie_word_embeddings=tie), seed=0)
        decay, no_decay = param_groups(model, 0.1)
        names = {id(p): n for n, p in model.named_parameters()}
        dn, nn_ = {names[id(p)] for p in decay["params"]}, {names[id(p)] for p in no_decay["params"]}
        assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
        assert dn.isdisjoint(nn_) and dn | nn_ == set(names.values())  # every parameter exactly once
        for n in nn_:
            assert n.endswith(("bias", "norm.weight", "layernorm.weight", "embed_tokens.weight")), n
        for n in dn:
            assert n.endswith(("proj.weight", "lm_head.weight")), n
        assert any(n.endswith("q_proj.bias") for n in nn_) and "model.norm.weight" in nn_
        assert ("lm_head.weight" in dn) == (not tie)


def test_adamw_decoupled_decay_leaves_no_decay_group_untouched_without_gradient():
    model = build_model(ModelConfig.preset("tiny"), seed=0)
    opt = torch.optim.AdamW(param_groups(model, 0.5), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        if n.endswith(("bias", "layernorm.weight", "norm.weight", "embed_tokens.weight")):
            assert torch.equal(p, before[n]), n  # zero gradient and no decay: unchanged
        else:
            torch.testing.assert_close(p, before[n] * (1 - 0.1 * 0.5))  # decoupled: p -= lr * wd * p


def test_schedule_warmup_then_cosine_to_floor():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg, 110) for s in range(110)]
    # linear warmup to the peak
    assert lrs[9] == 1.0 and all(a < b for a, b in zip(lrs[:9], lrs[1:10], strict=True))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))  # then non-increasing
    assert math.isclose(lr_at(60, cfg, 110), 0.55)  # halfway down the cosine: (peak + floor) / 2
    assert math.isclose(lr_at(110, cfg, 110), 0.1)
    lin = TrainConfig(lr=1.0, warmup_steps=0, min_lr_ratio=0.0, schedule="linear")
    assert math.isclose(lr_at(25, lin, 100), 0.75)


def test_train_config_errors_name_the_field():
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="step").validate()
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8").validate()
