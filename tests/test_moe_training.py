"""MoE training in the loop: the expert load (moe_stats) equals a direct count, its summaries reach the
loop's metrics, the plot is written, and 2 processes under torchrun (gloo, CPU) with DDP and FSDP2 give
the same loss, aux loss, expert load and gradients as 1 process over the same rows.

The aux loss is per micro-batch (as in transformers), so "the same global batch" means the same row
groups: 2 ranks x 2 micro-batches of 2 rows against 1 process x 4 micro-batches of the same 2 rows.

This file is also the worker: `python test_moe_training.py OUT MODE`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qwen2.config import ModelConfig
from qwen2.model import build_model
from qwen2.train import moe_stats
from qwen2.train.objectives import next_token_loss

HERE = Path(__file__).resolve()
WORLD, ACCUM, ROWS, SEQ = 2, 2, 2, 16  # ranks, micro-batches per rank, rows per micro-batch, tokens per row


def _logits(layers=3, tokens=50, experts=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(tokens, experts, generator=g) * 2 for _ in range(layers)]


# ---- expert_load -----------------------------------------------------------------------------------
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_expert_load_is_the_fraction_of_routed_pairs_per_expert(top_k):
    logits = _logits()
    load = moe_stats.expert_load(logits, top_k)
    assert load.shape == (3, 8)
    torch.testing.assert_close(load.sum(1), torch.ones(3))
    for layer, r in enumerate(logits):  # a direct count: for each token, its k most probable experts
        probs = F.softmax(r, dim=-1)
        count = torch.zeros(8)
        for row in probs:
            for e in sorted(range(8), key=lambda e: -row[e].item())[:top_k]:
                count[e] += 1
        torch.testing.assert_close(load[layer], count / (len(r) * top_k))


def test_expert_load_mask_drops_padding_tokens():
    logits = _logits(tokens=10)
    mask = torch.tensor([1] * 6 + [0] * 4)
    torch.testing.assert_close(
        moe_stats.expert_load(logits, 2, mask), moe_stats.expert_load([r[:6] for r in logits], 2)
    )


def test_load_summary_of_a_balanced_and_a_collapsed_router():
    balanced = moe_stats.load_summary(torch.full((2, 4), 0.25))
    assert balanced["moe/max_load"] == balanced["moe/min_load"] == 1.0 and balanced["moe/load_cv"] == 0
    collapsed = moe_stats.load_summary(torch.tensor([[1.0, 0, 0, 0], [0.25] * 4]))
    assert collapsed["moe/max_load"] == 4.0 and collapsed["moe/min_load"] == 0.0
    assert all(v.dim() == 0 for v in collapsed.values())  # the loop's metrics are scalar tensors


def test_plot_expert_load_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = moe_stats.plot_expert_load(moe_stats.expert_load(_logits(), 2), tmp_path / "sub" / "load.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_objective_logs_the_load_and_accumulates_it_in_training_only():
    model = build_model(ModelConfig.preset("tiny-moe"), seed=0)
    batch = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    _, metrics = next_token_loss(model, batch)
    assert {"moe/max_load", "moe/min_load", "moe/load_cv", "aux_loss"} <= metrics.keys()
    assert all(v.dim() == 0 for v in metrics.values())
    assert 0 <= metrics["moe/min_load"] <= 1 <= metrics["moe/max_load"] <= model.config.num_experts
    _, again = next_token_loss(model, batch)
    load = moe_stats.accumulated_load(model)
    assert load.shape == (2, 8)  # tiny-moe: 2 MoE layers of 8 experts
    torch.testing.assert_close(load.sum(1), torch.ones(2))
    assert metrics["moe/max_load"] == pytest.approx(float(load.max() * 8))  # two equal calls: their mean
    assert moe_stats.accumulated_load(model) is None  # reset on read
    model.eval()
    next_token_loss(model, batch)
    assert moe_stats.accumulated_load(model) is None


def test_a_fit_of_an_moe_model_ends_with_its_expert_load_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from qwen2.train.loop import TrainConfig, Trainer

    model = build_model(ModelConfig.preset("tiny-moe"), seed=0)
    rows = torch.randint(0, 512, (3, 2, 9), generator=torch.Generator().manual_seed(0))

    class Rows(list):  # the loop's loader protocol: iterable with a state
        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    trainer = Trainer(model, TrainConfig(batch_size=2, lr=1e-3, warmup_steps=1, ckpt_every=0), tmp_path)
    trainer.fit(next_token_loss, Rows(rows), end_step=3)
    trainer.close()
    png = tmp_path / f"expert_load_{trainer.stage}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert moe_stats.accumulated_load(model) is None  # read (and reset) by the plot


def test_aux_loss_trains_the_router():
    model = build_model(ModelConfig.preset("tiny-moe"), seed=0)
    batch = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    loss, _ = next_token_loss(model, batch)
    g_total = torch.autograd.grad(loss, model.model.layers[0].mlp.gate.weight)[0]
    model.config = model.config.replace(router_aux_loss_coef=0.0)
    loss0, _ = next_token_loss(model, batch)
    g_ce = torch.autograd.grad(loss0, model.model.layers[0].mlp.gate.weight)[0]
    assert not torch.allclose(g_total, g_ce)


# ---- 2 processes = 1 process -----------------------------------------------------------------------
def _launch(out: Path, mode: str, nproc: int) -> tuple[dict, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [str(HERE), str(out), mode]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    from safetensors.torch import load_file

    return json.loads((out / "metrics.json").read_text()), load_file(str(out / "grads.safetensors"))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("single"), "ddp", 1)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one_process_over_the_same_rows(tmp_path, single, mode):
    (m1, g1), (m2, g2) = single, _launch(tmp_path, mode, WORLD)
    keys = {"loss", "aux_loss", "moe/max_load", "moe/min_load", "moe/load_cv", "grad_norm"}
    assert keys <= m1.keys() and keys <= m2.keys()
    for k in keys:
        assert m2[k] == pytest.approx(m1[k], rel=1e-5, abs=1e-6), k
    assert m1["aux_loss"] > 0 and m1["moe/max_load"] > 1
    torch.testing.assert_close(torch.tensor(m2["load"]), torch.tensor(m1["load"]), rtol=1e-6, atol=1e-7)
    assert g1.keys() == g2.keys()
    assert any(".mlp.experts." in k for k in g1) and any(k.endswith("mlp.gate.weight") for k in g1)
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-5, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")


def _worker(out: str, mode: str):
    from safetensors.torch import save_file

    from qwen2.train.loop import TrainConfig, Trainer

    torch.set_num_threads(1)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    model = build_model(ModelConfig.preset("tiny-moe"), seed=0)
    # every rank builds the same rows; (micro-batch m, rank r) gets rows[m, r]
    rows = torch.randint(0, 512, (ACCUM, WORLD, ROWS, SEQ + 1), generator=torch.Generator().manual_seed(1))
    chunks = [rows[m, r] for m in range(ACCUM) for r in range(WORLD)]  # 1 process: all, in this order
    mine = chunks if world == 1 else [rows[m, rank] for m in range(ACCUM)]
    cfg = TrainConfig(
        batch_size=ROWS, grad_accum=len(mine), lr=1e-3, warmup_steps=1, grad_clip=0, parallel=mode
    )
    trainer = Trainer(model, cfg, out)
    grads = {}
    step = trainer.optimizer.step

    def capture_then_step(*a, **k):  # the gradients the loop hands the optimizer (collective under FSDP)
        for name, p in trainer.model.named_parameters():
            if p.grad is not None:
                g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                grads[name] = g.detach().clone().contiguous()
        return step(*a, **k)

    trainer.optimizer.step = capture_then_step
    metrics = trainer.train_step(next_token_loss, mine, total_steps=1)
    metrics["load"] = moe_stats.accumulated_load(trainer.model).tolist()  # collective
    if rank == 0:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "metrics.json").write_text(json.dumps(metrics))
        save_file(grads, str(Path(out) / "grads.safetensors"))
    trainer.close()
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
