"""Dense-to-MoE upcycling (paper 2.2.3, SPEC 5): the slices are the shuffled dense FFN, the re-initialised
share is the asked one, the pieces reassemble the dense FFN, and the checkpoint reads in transformers."""

import argparse
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
import transformers

from hf_reference import scaled_config
from qwen2.checkpoint import load_model, save_model
from qwen2.config import ModelConfig, matches_published, published_counts
from qwen2.model import build_model
from qwen2.train.upcycle import (
    Recipe,
    layer_generator,
    make_recipe,
    plan,
    preset_recipe,
    upcycle,
    upcycle_checkpoint,
    upcycle_layer,
)

H = 32


def dense_ffn(h_ffn, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g) for shape in ((h_ffn, H), (h_ffn, H), (H, h_ffn)))


def recipe(**kw):
    return Recipe(**{"reinit_std": 0.02, "router_std": 0.02, **kw})


def swiglu(x, gate, up, down):
    return F.silu(x @ gate.T) * (x @ up.T) @ down.T


def hoeffding(n: int, delta: float = 1e-9) -> float:
    """|mean of n Bernoulli(p) - p| stays below this with probability >= 1 - delta (Hoeffding)."""
    return math.sqrt(math.log(2 / delta) / (2 * n))


def test_57b_preset_copy_count_and_counts():
    dense = ModelConfig.preset("Qwen2-7B")
    r = make_recipe(dense, **preset_recipe("Qwen2-57B-A14B"))
    assert (r.num_experts, r.top_k, r.expert_size, r.shared_expert_size) == (64, 8, 2560, 20480)
    assert r.copies(dense.intermediate_size) == 9 == math.ceil(64 * 2560 / 18944)
    p = plan(dense, r)
    assert p["dropped_per_layer"] == 9 * 18944 - 64 * 2560
    # Only the vocabulary differs from the released model (7B pads to 152,064, the 57B to 151,936).
    assert matches_published(p["config"], published_counts("Qwen2-57B-A14B"))


@pytest.mark.parametrize("mode", ["element", "neuron"])
def test_kept_entries_are_the_shuffled_dense_ffn_and_half_is_redrawn(mode):
    gate, up, down = dense_ffn(96)
    r = recipe(num_experts=10, top_k=2, expert_size=24, shared_expert_size=40, reinit=0.5, reinit_mode=mode)
    layer = upcycle_layer(gate, up, down, r, torch.Generator().manual_seed(0))
    assert layer.perms.shape == (r.copies(96), 96) == (3, 96)  # 240 of 288 neurons used, 48 dropped
    for p in layer.perms:
        assert torch.equal(p.sort().values, torch.arange(96))
    assert not torch.equal(layer.perms[0], layer.perms[1])  # each copy its own shuffle
    assert torch.equal(layer.index, layer.perms.flatten()[:240].view(10, 24))
    slices = [(f"experts.{e}.", layer.index[e]) for e in range(10)] + [("shared_expert.", layer.shared_index)]
    drawn, total, redrawn = 0, 0, []
    for prefix, idx in slices:
        expect = {"gate_proj": gate[idx], "up_proj": up[idx], "down_proj": down[:, idx]}
        n_entries, n_drawn = 0, 0
        for name, ref in expect.items():
            w, m = layer.tensors[f"{prefix}{name}.weight"], layer.reinit_masks[f"{prefix}{name}.weight"]
            assert torch.equal(w[~m], ref[~m])  # not re-initialised: exactly the permuted dense entry
            assert not (w[m] == ref[m]).any()  # re-initialised: a fresh draw
            redrawn.append(w[m])
            n_entries, n_drawn = n_entries + m.numel(), n_drawn + int(m.sum())
        if mode == "neuron":  # a neuron is re-drawn whole: gate row, up row and down column together
            mg, mu, md = (layer.reinit_masks[f"{prefix}{k}.weight"] for k in expect)
            assert torch.equal(mg, mu) and torch.equal(mg[:, 0], md[0]) and bool((mg == mg[:, :1]).all())
            n_entries, n_drawn = len(idx), int(mg[:, 0].sum())
        # union bound over the 11 experts: each fraction within Hoeffding's bound at 1e-9 / 11
        assert abs(n_drawn / n_entries - 0.5) <= hoeffding(n_entries, 1e-9 / 11)
        drawn, total = drawn + n_drawn, total + n_entries
    assert abs(drawn / total - 0.5) <= hoeffding(total)
    fresh = torch.cat(redrawn)  # N(0, 0.02^2): its sample std within 6 standard errors (~0.02 / sqrt(2M))
    assert abs(fresh.std().item() / 0.02 - 1) < 6 / math.sqrt(2 * fresh.numel())


@pytest.mark.parametrize("h_ffn,h_e,n", [(64, 16, 8), (48, 32, 3)])  # the second cuts experts across copies
def test_reinit_zero_reassembles_the_dense_ffn(h_ffn, h_e, n):
    gate, up, down = dense_ffn(h_ffn, seed=1)
    r = recipe(num_experts=n, top_k=1, expert_size=h_e, shared_expert_size=h_ffn, reinit=0.0)
    copies = r.copies(h_ffn)
    assert n * h_e == copies * h_ffn
    layer = upcycle_layer(gate, up, down, r, torch.Generator().manual_seed(2))
    t = layer.tensors
    cat = {
        k: torch.cat([t[f"experts.{e}.{k}.weight"] for e in range(n)], dim=1 if k == "down_proj" else 0)
        for k in ("gate_proj", "up_proj", "down_proj")
    }
    for c in range(copies):
        undo = layer.perms[c].argsort()
        rows = slice(c * h_ffn, (c + 1) * h_ffn)
        assert torch.equal(cat["gate_proj"][rows][undo], gate)
        assert torch.equal(cat["up_proj"][rows][undo], up)
        assert torch.equal(cat["down_proj"][:, rows][:, undo], down)
    undo = layer.shared_perms[0].argsort()  # shared size = h_FFN: the whole dense FFN, shuffled
    assert torch.equal(t["shared_expert.gate_proj.weight"][undo], gate)
    assert torch.equal(t["shared_expert.down_proj.weight"][:, undo], down)
    # Each slice is a valid sub-MLP: the experts together compute `copies` times the dense FFN.
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(3))
    total = sum(
        swiglu(x, *(t[f"experts.{e}.{k}.weight"] for k in ("gate_proj", "up_proj", "down_proj")))
        for e in range(n)
    )
    torch.testing.assert_close(total, copies * swiglu(x, gate, up, down), rtol=1e-5, atol=1e-4)


def tiny_dense(**kw):
    tiny = ModelConfig.preset("tiny")
    return tiny.replace(intermediate_size=64, torch_dtype="float32", initializer_range=0.08, **kw)


def test_upcycle_is_layerwise_reproducible_and_copies_the_rest():
    dense = build_model(tiny_dense(), seed=0)
    opts = dict(num_experts=6, top_k=2, expert_size=16, shared_experts=2, seed=5)
    config, state = upcycle(dense, **opts)
    record = config.extra["upcycling"]  # the recipe, in config.json
    assert config.is_moe and record["copies"] == 2 and record["reinit"] == 0.5 and record["seed"] == 5
    dstate = dense.state_dict()
    for k, v in dstate.items():
        if ".mlp." not in k:
            assert torch.equal(state[k], v), k
    r = make_recipe(dense.config, **{k: v for k, v in opts.items()})
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        layer = upcycle_layer(
            dstate[p + "gate_proj.weight"],
            dstate[p + "up_proj.weight"],
            dstate[p + "down_proj.weight"],
            r,
            layer_generator(5, i),
        )
        for k, v in layer.tensors.items():
            assert torch.equal(state[p + k], v), p + k
        assert not layer.tensors["shared_expert_gate.weight"].any()  # sigmoid(0) = 1/2 at the start
    with torch.device("meta"):
        from qwen2.model import Qwen2

        Qwen2(config).load_state_dict(state, strict=True, assign=True)
    _, other = upcycle(dense, **{**opts, "seed": 6})
    assert not torch.equal(
        other["model.layers.0.mlp.experts.0.gate_proj.weight"],
        state["model.layers.0.mlp.experts.0.gate_proj.weight"],
    )


def test_function_preserving_choice_gives_the_dense_logits():
    """Re-init 0, top_k = n, norm_topk_prob, a zero router (weights 1/n), h_E = h_FFN / 2 so n = 2 * copies,
    the shared expert = the whole FFN under sigmoid(0) = 1/2: routed (copies / n = 1/2) + shared (1/2) = dense
    End to end: slicing, permutations, config and the MoE block agree with the dense model."""
    dense = build_model(tiny_dense(), seed=1)
    config, state = upcycle(
        dense,
        num_experts=4,
        top_k=4,
        expert_size=32,
        shared_expert_size=64,
        reinit=0.0,
        router_std=0.0,
        norm_topk_prob=True,
    )
    from qwen2.model import Qwen2

    with torch.device("meta"):
        moe = Qwen2(config)
    moe.load_state_dict(state, strict=True, assign=True)
    x = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense(x), rtol=1e-5, atol=1e-5)


def test_checkpoint_reads_in_transformers_and_ours(tmp_path, tokenizer_dir):
    config = scaled_config("7B").replace(num_hidden_layers=2, torch_dtype="float32", initializer_range=0.08)
    save_model(build_model(config, seed=2), tmp_path / "dense")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(tokenizer_dir / name, tmp_path / "dense" / name)
    out = upcycle_checkpoint(
        tmp_path / "dense",
        tmp_path / "moe",
        num_experts=16,
        top_k=4,
        expert_size=64,
        shared_experts=4,
        seed=3,
    )
    assert (out / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == ["Qwen2MoeForCausalLM"] and written["upcycling"]["copies"] == 2
    ours = load_model(out, dtype=torch.float32)
    hf = transformers.Qwen2MoeForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager"
    )
    x = torch.randint(0, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref, got = hf.eval()(x).logits, ours(x)
    assert ref.abs().max() > 0.1  # not a vanishing signal
    assert (got - ref).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="not empty"):
        upcycle_checkpoint(tmp_path / "dense", out, num_experts=16, top_k=4, expert_size=64)
    with pytest.raises(ValueError, match="not a dense Qwen2"):
        upcycle_checkpoint(out, tmp_path / "again", num_experts=16, top_k=4, expert_size=64)


def cli(argv):
    from qwen2.cli.upcycle import add_parser

    p = argparse.ArgumentParser(prog="qwen2")
    add_parser(p.add_subparsers(dest="command", required=True))
    a = p.parse_args(argv)
    return a.func(a)


def test_cli_plan_and_write(tmp_path, capsys):
    assert cli(["upcycle", "--preset", "Qwen2-57B-A14B"]) == 0
    text = capsys.readouterr().out
    assert "ceil(64 * 2560 / 18944) = 9" in text and "57.410B total" in text and "14.250B active" in text
    save_model(build_model(tiny_dense(), seed=0), tmp_path / "dense")
    paths = ["--model", str(tmp_path / "dense"), "--out", str(tmp_path / "moe")]
    assert (
        cli(
            [
                "upcycle",
                *paths,
                "--num-experts",
                "8",
                "--top-k",
                "2",
                "--expert-size",
                "16",
                "--shared-experts",
                "2",
                "--reinit-mode",
                "neuron",
            ]
        )
        == 0
    )
    c = ModelConfig.from_json(tmp_path / "moe")
    shape = (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.shared_expert_intermediate_size)
    assert shape == (8, 2, 16, 32)
    assert c.extra["upcycling"]["reinit_mode"] == "neuron"
    with pytest.raises(ValueError, match="--top-k"):
        cli(["upcycle", "--model", str(tmp_path / "dense"), "--num-experts", "8", "--expert-size", "16"])
