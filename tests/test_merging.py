"""Online Merging Optimizer (SPEC 4): AdamW at p = 1, alpha = 0; alpha = 1 moves onto the masked task vector;
OnDARE / OnTIES equal the equations written out here, over several steps, on random tensors."""

import math

import pytest
import torch
from torch import nn

from qwen2.train.merging import OnlineMergingOptimizer, task_vectors

STEPS = 5


def params_and_grads(seed=0, shapes=((6, 5), (7,), (3, 4))):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(STEPS)]
    taus = [0.3 * torch.randn(s, generator=g) for s in shapes]
    return ps, grads, taus


def run(opt_factory, ps, grads):
    params = [nn.Parameter(p.clone()) for p in ps]
    opt = opt_factory(params)
    for step in grads:
        for p, g in zip(params, step, strict=True):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params]


def tau_map(params, taus):
    return dict(zip(params, taus, strict=True))


def omo(method, taus, **kw):
    return lambda params: OnlineMergingOptimizer(params, tau_map(params, taus), method=method, **kw)


def test_ondare_with_keep_all_and_alpha_0_is_adamw():
    ps, grads, taus = params_and_grads()
    # eps 0: the reference code adds eps to the un-bias-corrected sqrt(v), torch to the corrected one.
    ours = run(omo("ondare", taus, lr=1e-2, eps=0.0, reserve_p=1.0, alpha=0.0), ps, grads)
    ref = run(lambda p: torch.optim.AdamW(p, lr=1e-2, eps=0.0, weight_decay=0.0), ps, grads)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_onties_with_keep_all_alpha_0_and_no_task_vector_is_adamw():
    ps, grads, taus = params_and_grads(1)
    zeros = [torch.zeros_like(t) for t in taus]
    ours = run(omo("onties", zeros, lr=1e-2, eps=0.0, reserve_p=1.0, alpha=0.0), ps, grads)
    ref = run(lambda p: torch.optim.AdamW(p, lr=1e-2, eps=0.0, weight_decay=0.0), ps, grads)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_alpha_1_moves_onto_the_masked_task_vector():
    ps, grads, taus = params_and_grads(2)
    gen = torch.Generator().manual_seed(7)
    params = [nn.Parameter(p.clone()) for p in ps]
    opt = OnlineMergingOptimizer(
        params, tau_map(params, taus), method="ondare", lr=1e-2, reserve_p=0.5, alpha=1.0, generator=gen
    )
    masked = [opt.state[p]["tau"] for p in params]
    kept = sum(int((m != 0).sum()) for m in masked)
    assert 0 < kept < sum(t.numel() for t in taus)  # the mask dropped some entries and kept others
    for m, t in zip(masked, taus, strict=True):  # survivors rescaled by 1/p, then clamped to +-1
        torch.testing.assert_close(m, torch.where(m != 0, (t / 0.5).clamp(-1, 1), torch.zeros_like(t)))
    for p, g in zip(params, grads[0], strict=True):
        p.grad = g
    opt.step()
    for p, p0, m in zip(params, ps, masked, strict=True):
        torch.testing.assert_close(p.detach(), p0 + m)


def dare(x, keep, gen):
    if keep >= 1:
        return x
    return x * (torch.rand(x.shape, generator=gen) < keep) / keep


def topk_mask(x, density):
    k = int(density * x.numel())
    if density >= 1 or k < 1:
        return x
    out = torch.zeros(x.numel())
    out[x.abs().flatten().argsort(descending=True)[:k]] = 1
    return out.view_as(x) * x


def direct(method, ps, grads, taus, lr, wd, p_keep, alpha, seed, b1=0.9, b2=0.999, eps=1e-6):
    """SPEC 4 written out: Adam delta (eps on the uncorrected sqrt v), masks, merge, then decoupled decay."""
    gen = torch.Generator().manual_seed(seed)
    theta = [p.clone() for p in ps]
    if method == "ondare":
        tau = [dare(t, p_keep, gen).clamp(-1, 1) for t in taus]
    else:
        tau = [topk_mask(t, p_keep) for t in taus]
    m = [torch.zeros_like(p) for p in ps]
    v = [torch.zeros_like(p) for p in ps]
    for t, step in enumerate(grads, 1):
        for i, g in enumerate(step):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            delta = -lr * math.sqrt(1 - b2**t) / (1 - b1**t) * m[i] / (v[i].sqrt() + eps)
            if method == "ondare":
                theta[i] = theta[i] + (1 - alpha) * dare(delta, p_keep, gen) + alpha * tau[i]
            else:
                d = topk_mask(delta, p_keep)
                sign = torch.where(tau[i] + d >= 0, 1.0, -1.0)
                merged = alpha * tau[i] * (tau[i].sign() == sign) + (1 - alpha) * d * (d.sign() == sign)
                theta[i] = theta[i] + merged
            theta[i] = theta[i] - lr * wd * theta[i]
    return theta


@pytest.mark.parametrize("method", ["ondare", "onties"])
@pytest.mark.parametrize("p_keep,alpha", [(0.3, 0.2), (0.7, 0.5)])
def test_equals_direct_equations(method, p_keep, alpha):
    ps, grads, taus = params_and_grads(3)
    gen = torch.Generator().manual_seed(11)
    ours = run(
        lambda params: OnlineMergingOptimizer(
            params,
            tau_map(params, taus),
            method=method,
            lr=0.05,
            weight_decay=0.1,
            reserve_p=p_keep,
            alpha=alpha,
            generator=gen,
        ),
        ps,
        grads,
    )
    ref = direct(method, ps, grads, taus, lr=0.05, wd=0.1, p_keep=p_keep, alpha=alpha, seed=11)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_task_vectors_from_state_dicts_and_param_groups():
    torch.manual_seed(0)
    base, ref, policy = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(4, 3)
    tau = task_vectors(policy, base.state_dict(), ref.state_dict())
    torch.testing.assert_close(tau[policy.weight], ref.weight.detach() - base.weight.detach())
    groups = [
        {"params": [policy.weight], "weight_decay": 0.1},
        {"params": [policy.bias], "weight_decay": 0.0},
    ]
    opt = OnlineMergingOptimizer(groups, tau, method="onties", lr=1e-3, reserve_p=0.5, alpha=1e-3)
    policy(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert set(opt.state[policy.weight]) == {"tau", "step", "exp_avg", "exp_avg_sq"}
    with pytest.raises(KeyError, match="task vector"):
        OnlineMergingOptimizer(nn.Linear(2, 2).parameters(), tau)
