"""The one loop's features: accumulation = one big batch, clipping, bf16 autocast, activation
checkpointing, held-out evaluation, metrics to JSONL and TensorBoard, and time budgets."""

import json

import numpy as np
import pytest
import torch

from qwen2.config import ModelConfig
from qwen2.model import build_model
from qwen2.train.loop import TrainConfig, Trainer
from qwen2.train.objectives import next_token_loss


def _batch(rows=8, t=16, seed=0, vocab=256):
    return torch.randint(1, vocab, (rows, t + 1), generator=torch.Generator().manual_seed(seed))


def _trainer(tmp_path, dtype=torch.float32, **cfg):
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("tiny"), seed=0, dtype=dtype)
    return Trainer(model, TrainConfig(**{"warmup_steps": 0, "lr": 1e-2, **cfg}), tmp_path)


def _params(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_grad_accumulation_equals_one_large_batch(tmp_path):
    # float64, so that Adam's division by tiny second moments does not amplify summation-order noise
    big = _trainer(tmp_path / "a", torch.float64, batch_size=8)
    acc = _trainer(tmp_path / "b", torch.float64, batch_size=4, grad_accum=2)
    for step in range(3):
        b = _batch(seed=step)
        m1 = big.train_step(next_token_loss, [b], 10)
        m2 = acc.train_step(next_token_loss, [b[:4], b[4:]], 10)
        assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-6)  # metrics are reported in fp32
        assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-10)
    p1, p2 = _params(big), _params(acc)
    for n in p1:
        torch.testing.assert_close(p1[n], p2[n], rtol=1e-9, atol=1e-12)


def test_clipping_scales_the_global_norm_to_the_limit(tmp_path):
    for clip in (0.05, 0.0):
        t = _trainer(tmp_path / str(clip), grad_clip=clip)
        loss, _ = next_token_loss(t.model, _batch())
        loss.backward()
        grads = [p.grad.clone() for p in t.model.parameters()]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        assert t._clip() == pytest.approx(float(norm), rel=1e-5)  # reports the norm before clipping
        after = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad) for p in t.model.parameters()])
        )
        if clip:
            assert norm > clip and float(after) == pytest.approx(clip, rel=1e-4)
        else:  # 0 disables clipping
            assert all(torch.equal(p.grad, g) for p, g in zip(t.model.parameters(), grads, strict=True))


def test_bf16_autocast_keeps_fp32_weights_and_matches_fp32_closely(tmp_path):
    f32, bf16 = _trainer(tmp_path / "a"), _trainer(tmp_path / "b", precision="bf16")
    b = _batch()
    m32, m16 = f32.train_step(next_token_loss, [b], 10), bf16.train_step(next_token_loss, [b], 10)
    assert m16["loss"] != m32["loss"]  # the matmuls really ran in bf16 ...
    assert m16["loss"] == pytest.approx(m32["loss"], abs=0.05)  # ... and the loss is close
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    assert all(s["exp_avg"].dtype == torch.float32 for s in bf16.optimizer.state.values())


def test_activation_checkpointing_recomputes_layers_and_gives_the_same_step(tmp_path):
    plain, ckpt = _trainer(tmp_path / "a"), _trainer(tmp_path / "b", activation_checkpointing=True)
    calls = {"plain": 0, "ckpt": 0}
    for key, t in (("plain", plain), ("ckpt", ckpt)):
        t.model.model.layers[0].self_attn.register_forward_hook(
            lambda *a, k=key: calls.__setitem__(k, calls[k] + 1)
        )
    b = _batch()
    m1, m2 = plain.train_step(next_token_loss, [b], 10), ckpt.train_step(next_token_loss, [b], 10)
    assert calls == {"plain": 1, "ckpt": 2}  # the checkpointed layer ran again in backward
    assert m1["loss"] == m2["loss"]
    p1, p2 = _params(plain), _params(ckpt)
    for n in p1:
        torch.testing.assert_close(p1[n], p2[n], rtol=1e-5, atol=1e-7)


def test_evaluate_is_the_mean_held_out_loss_and_changes_nothing(tmp_path):
    t = _trainer(tmp_path)
    batches = [_batch(seed=10), _batch(seed=11)]
    before = _params(t)
    ev = t.evaluate(next_token_loss, batches)
    with torch.no_grad():
        expect = sum(float(next_token_loss(t.model, b)[0]) for b in batches) / 2
    assert ev["eval_loss"] == pytest.approx(expect, rel=1e-6)
    assert t.model.training and all(torch.equal(p, before[n]) for n, p in t.model.named_parameters())


@pytest.fixture
def shards(tmp_path):
    from qwen2.data.shards import write_shards

    rng = np.random.default_rng(0)
    write_shards(
        [rng.integers(1, 256, rng.integers(10, 80)).tolist() for _ in range(60)],
        tmp_path / "data",
        meta={"endoftext_id": 0},
    )
    return tmp_path / "data"


def _fit(run, shards, steps=4, **cfg):
    from qwen2.data import PackedLoader

    t = _trainer(run, batch_size=2, eval_every=2, **cfg)
    t.fit(
        next_token_loss,
        PackedLoader(shards, 16, 2, seed=0),
        end_step=steps,
        desc="test",
        eval_batches=lambda: [next(PackedLoader(shards, 16, 2, seed=0, shuffle=False))],
    )
    t.close()
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_metrics_jsonl_and_tensorboard(tmp_path, shards):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recs = _fit(tmp_path / "run", shards)
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert {"lr", "grad_norm", "tokens", "tokens_per_s", "step_time_s"} <= set(r)
    assert [r["step"] for r in recs if "eval_loss" in r] == [2, 4, 4]  # every 2 steps, and at the end
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in steps])
    assert [e.step for e in events.Scalars("train/eval_loss")] == [2, 4, 4]


def test_without_tensorboard_metrics_still_go_to_jsonl(tmp_path, shards, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("no tensorboard")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    recs = _fit(tmp_path / "run", shards, steps=2)
    assert [r["step"] for r in recs if "loss" in r] == [1, 2]
    assert "pip install 'qwen2[train]'" in capsys.readouterr().out
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_time_budget_fixes_the_plan_then_ends_the_stage_at_the_deadline(monkeypatch):
    from qwen2.train import pretrain

    clock = [100.0]
    monkeypatch.setattr(pretrain.time, "perf_counter", lambda: clock[0])

    class T:
        step, rank, meta = 0, 0, {}

    budget = pretrain._Budget("pretrain", seconds=100.0, calib=3)
    ends = []
    for dt in [5.0] + [1.0] * 6:  # the first step pays one-off costs; then 1 s a step
        clock[0] += dt
        T.step += 1
        ends.append(budget(T, {}))
    # measured until a tenth of the budget had passed (step 6), then placed the end to fill the budget
    assert ends == [None] * 5 + [6 + int(0.97 * (100 - 10) / 1.0), None]
    assert T.meta["plan"]["pretrain"] == ends[5]
    clock[0] += 90.0  # the machine slowed down: past the deadline the stage ends now
    T.step += 1
    assert budget(T, {}) is False and T.meta["plan"]["pretrain"] == T.step


def test_state_dict_round_trip_resumes_with_identical_next_step_losses(tmp_path):
    import copy

    a = _trainer(tmp_path / "a", warmup_steps=2)
    for step in range(3):
        a.train_step(next_token_loss, [_batch(seed=step)], 10)
    a.meta["plan"] = {"train": 10}
    state = copy.deepcopy(a.state_dict())  # a goes on training in place; the saved state must not follow
    draws = torch.rand(4)  # the RNG right after the save
    ahead = [a.train_step(next_token_loss, [_batch(seed=s)], 10) for s in (3, 4)]
    torch.manual_seed(123)
    other = build_model(ModelConfig.preset("tiny"), seed=7)  # other weights: all of them must be restored
    b = Trainer(other, TrainConfig(warmup_steps=2, lr=1e-2), tmp_path / "b")
    plan = b.meta
    b.load_state_dict(state)
    assert torch.equal(torch.rand(4), draws)  # the RNG is restored
    assert (b.step, b.stage, b.stage_start, plan) == (3, "train", 0, {"plan": {"train": 10}})
    again = [b.train_step(next_token_loss, [_batch(seed=s)], 10) for s in (3, 4)]
    # the first step checks model and schedule, the second the optimizer's moments after the first
    assert [m["loss"] for m in again] == [m["loss"] for m in ahead]
    assert [m["lr"] for m in again] == [m["lr"] for m in ahead]
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_begin_stage_restarts_the_schedule_and_keeps_what_the_trainer_was_built_with(tmp_path):
    t = _trainer(tmp_path, warmup_steps=2)
    for step in range(3):
        t.train_step(next_token_loss, [_batch(seed=step)], 10)
    moments = {id(p): s["exp_avg"].clone() for p, s in t.optimizer.state.items()}
    t.begin_stage("long", TrainConfig(lr=1e-3, warmup_steps=4, weight_decay=0.0, beta2=0.99))
    assert (t.stage, t.stage_start, t.step) == ("long", 3, 3)
    groups = {g["name"]: g for g in t.optimizer.param_groups}
    assert groups["decay"]["weight_decay"] == 0.0 and groups["decay"]["betas"] == (0.9, 0.99)
    # the moments carry over into the new stage
    assert all(torch.equal(s["exp_avg"], moments[id(p)]) for p, s in t.optimizer.state.items())
    m = t.train_step(next_token_loss, [_batch(seed=3)], 10)
    assert m["lr"] == pytest.approx(1e-3 / 4)  # the new stage's warmup, from its first step
    with pytest.raises(ValueError, match="parallel is fixed"):
        t.begin_stage("sft", TrainConfig(parallel="fsdp"))
    with pytest.raises(ValueError, match="stage 'sft': schedule"):
        t.begin_stage("sft", TrainConfig(schedule="step"))
