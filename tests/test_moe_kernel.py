"""qwen2.kernels.moe: the grouped MoE block equals model.SparseMoeBlock in output and in every gradient
(fp32, 1e-5), with torch._grouped_mm and with the per-expert loop; the fused weights are the parameters'
storage (same names, same state dict, no second copy) and follow in-place updates and replacements;
kernels.install puts it in a MoE model."""

import copy

import pytest
import torch

from qwen2 import model as core
from qwen2.config import ModelConfig
from qwen2.kernels import install, moe, uninstall
from qwen2.model import build_model

CONFIG = ModelConfig.preset("tiny-moe")  # 8 experts, top-2, H 64, I 32


def _pair(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    ref = core.SparseMoeBlock(CONFIG)
    for p in ref.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    ours = copy.deepcopy(ref)
    ours.__class__ = moe.SparseMoeBlock
    return ref.to(dtype), ours.to(dtype)


def _grads(m):
    return {n: p.grad for n, p in m.named_parameters()}


@pytest.fixture(params=[True, False], ids=["grouped_mm", "loop"])
def grouped(request, monkeypatch):
    if request.param and not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    monkeypatch.setattr(moe, "USE_GROUPED_MM", request.param)
    return request.param


@pytest.mark.parametrize("tokens", [1, 2, 5, 40, 300])
def test_forward_and_backward_equal_the_reference_block(tokens, grouped):
    ref, ours = _pair()
    x = torch.randn(1, tokens, CONFIG.hidden_size, generator=torch.Generator().manual_seed(tokens))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ref(x1), ours(x2)
    torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y1)
    y1.backward(dy)
    y2.backward(dy)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-5)
    g1, g2 = _grads(ref), _grads(ours)
    assert g1.keys() == g2.keys()
    for k in g1:
        if g1[k] is None:  # an expert no token picked: no gradient, as in the reference
            assert g2[k] is None, k
        else:
            torch.testing.assert_close(g2[k], g1[k], rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    if tokens == 1:
        assert sum(g is None for g in g1.values()) == 3 * (CONFIG.num_experts - CONFIG.num_experts_per_tok)
    with torch.no_grad():  # the no-grad forward (grouped_mm where on) too
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_the_fast_path_runs(monkeypatch):
    """The comparisons above mean nothing if the block fell back to the parent's loop."""
    calls = []
    apply, grouped_forward = moe._Experts.apply, moe._grouped_forward
    monkeypatch.setattr(moe._Experts, "apply", lambda *a: calls.append("fn") or apply(*a))
    monkeypatch.setattr(moe, "_grouped_forward", lambda *a: calls.append("gmm") or grouped_forward(*a))
    monkeypatch.setattr(moe, "USE_GROUPED_MM", hasattr(torch, "_grouped_mm"))
    _, ours = _pair()
    x = torch.randn(2, 30, CONFIG.hidden_size, requires_grad=True)
    ours(x).sum().backward()
    with torch.no_grad():
        ours(x)
    assert calls == ["fn", "gmm" if moe.USE_GROUPED_MM else "fn"]


def test_fused_weights_are_the_parameters_storage():
    ref, ours = _pair()
    x = torch.randn(1, 7, CONFIG.hidden_size)
    ours(x)
    w13, w2 = ours.__dict__["_fused"]
    assert w13.shape == (8, 2 * 32, 64) and w2.shape == (8, 64, 32)
    for e, m in enumerate(ours.experts):
        assert m.gate_proj.weight.data_ptr() == w13[e, :32].data_ptr()
        assert m.up_proj.weight.data_ptr() == w13[e, 32:].data_ptr()
        assert m.down_proj.weight.data_ptr() == w2[e].data_ptr()
    sd, sd_ref = ours.state_dict(), ref.state_dict()
    assert list(sd) == list(sd_ref)  # Hugging Face names, nothing added
    for k in sd:
        torch.testing.assert_close(sd[k], sd_ref[k], rtol=0, atol=0)
    # an in-place update of a parameter (an optimizer step, load_state_dict) is the fused tensor's
    with torch.no_grad():
        ours.experts[3].up_proj.weight.mul_(2)
        ref.experts[3].up_proj.weight.mul_(2)
    ours.load_state_dict({k: v * 1.5 if ".down_proj." in k else v for k, v in ref.state_dict().items()})
    ref.load_state_dict(ours.state_dict())
    assert ours.__dict__["_fused"][0] is w13
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_replaced_parameters_rebuild_the_fused_weights():
    ref, ours = _pair()
    x = torch.randn(1, 9, CONFIG.hidden_size)
    ours(x)
    first = ours.__dict__["_fused"][0]
    ours.load_state_dict({k: v.clone() * 0.5 for k, v in ref.state_dict().items()}, assign=True)
    ref.load_state_dict({k: v * 0.5 for k, v in ref.state_dict().items()})
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    assert ours.__dict__["_fused"][0] is not first
    ref, ours = ref.double(), ours.double()  # a dtype change replaces every parameter
    torch.testing.assert_close(ours(x.double()), ref(x.double()), rtol=1e-10, atol=1e-10)
    assert ours.__dict__["_fused"][0].dtype == torch.float64


def test_first_call_in_inference_mode_then_training():
    ref, ours = _pair()
    x = torch.randn(1, 20, CONFIG.hidden_size)
    with torch.inference_mode():
        ours(x)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref(x1).sum().backward()
    ours(x2).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        ours.experts[0].gate_proj.weight.grad, ref.experts[0].gate_proj.weight.grad, rtol=1e-5, atol=1e-5
    )


def test_quantized_or_biased_experts_fall_back_to_the_parent():
    ref, ours = _pair()
    ours.experts[1].up_proj.bias = torch.nn.Parameter(torch.zeros(32))
    ref.experts[1].up_proj.bias = torch.nn.Parameter(torch.zeros(32))
    assert moe.fused_weights(ours) is None
    x = torch.randn(1, 6, CONFIG.hidden_size)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-6, atol=1e-6)


def test_install_puts_it_in_a_moe_model_and_training_matches():
    model = build_model(CONFIG, seed=0)
    plain = copy.deepcopy(model)
    install(model)
    blocks = [m for m in model.modules() if isinstance(m, core.SparseMoeBlock)]
    assert blocks and all(type(b) is moe.SparseMoeBlock for b in blocks)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    # SGD, not Adam: Adam turns the reduction-order noise of ~0 gradients (k_proj bias) into full steps
    opt1, opt2 = (torch.optim.SGD(m.parameters(), lr=0.5) for m in (plain, model))
    for _ in range(2):  # two steps: the second runs on weights the optimizer updated in place
        for m, opt in ((plain, opt1), (model, opt2)):
            opt.zero_grad()
            m(ids).float().logsumexp(-1).mean().backward()
            opt.step()
    for (n, p), (n2, q) in zip(plain.named_parameters(), model.named_parameters(), strict=True):
        assert n == n2
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    uninstall(model)
    assert all(type(b) is core.SparseMoeBlock for b in blocks)
    torch.testing.assert_close(model(ids), plain(ids), rtol=1e-5, atol=1e-5)


def test_an_expert_width_grouped_mm_cannot_take_runs_the_loop():
    """torch._grouped_mm needs 16-byte rows; an upcycled expert width such as 53 must still run."""
    cfg = CONFIG.replace(moe_intermediate_size=53)
    torch.manual_seed(0)
    ref = core.SparseMoeBlock(cfg)
    ours = copy.deepcopy(ref)
    ours.__class__ = moe.SparseMoeBlock
    x = torch.randn(1, 40, cfg.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_a_bf16_decode_step_runs_each_expert_through_the_gemv_kernels(monkeypatch):
    """One token picks top-k experts, more than the kernels' MAX_ROWS in all but one row each: the experts
    go through GatedMLP's GEMV path (the grouped products would take the step's k rows as a GEMM)."""
    from qwen2.kernels import layers, ops

    if not ops.usable(torch.zeros(1, 64, dtype=torch.bfloat16), torch.zeros(8, 64, dtype=torch.bfloat16)):
        pytest.skip("the CPU kernels did not build here")
    config = CONFIG.replace(num_experts_per_tok=ops.MAX_ROWS + 2)
    torch.manual_seed(0)
    block = install(build_model(config, dtype=torch.bfloat16).eval()).model.layers[0].mlp
    assert isinstance(block, moe.SparseMoeBlock)
    glu, rows = layers._glu, []
    monkeypatch.setattr(layers, "_glu", lambda g, u, x: rows.append(x.shape[0]) or glu(g, u, x))
    x = torch.randn(1, 1, config.hidden_size, dtype=torch.bfloat16)
    with torch.inference_mode():
        block(x)
    assert len(rows) == config.num_experts_per_tok + 1 and set(rows) == {1}  # each expert, and the shared one
    rows.clear()
    with torch.inference_mode():
        block(torch.randn(1, 64, config.hidden_size, dtype=torch.bfloat16))  # prefill: the grouped products
    assert rows == [64]  # only the shared expert
