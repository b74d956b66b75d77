"""Online DPO (train.online_dpo): the pair is the reward's best and worst of k (a scripted reward checks it),
ties give no pair, the engine samples with the policy's weights as they are after each update, and a run
killed with SIGKILL mid-episode resumes to the same losses as an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from posttrain_data import make_world
from qwen2.checkpoint import load_model
from qwen2.data.conversations import load_prompts
from qwen2.tokenizer.bpe import load_tokenizer
from qwen2.train.loop import Trainer
from qwen2.train.online_dpo import OnlinePairs, best_and_worst
from qwen2.train.posttrain_losses import dpo_objective
from qwen2.train.recipes import OnlineDPOConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = make_world(tmp_path_factory.mktemp("online"))
    rm = w["model"].parent / "rm"
    if not (rm / "model" / "config.json").is_file():
        from qwen2.train.posttrain import run_posttrain
        from qwen2.train.recipes import RewardConfig

        run_posttrain(
            RewardConfig(model=str(w["model"]), data=str(w["prefs"]), out=str(rm), steps=1, max_len=128)
        )
    return {**w, "rm": rm / "model"}


def make_pairs(world, score, **kw):
    cfg = OnlineDPOConfig(
        model=str(world["model"]), data="", batch_size=3, samples=4, max_new_tokens=8, max_len=128, **kw
    )
    tok = load_tokenizer(world["model"])
    policy = load_model(world["model"], dtype=torch.float32)
    reference = load_model(world["model"], dtype=torch.float32)
    return OnlinePairs(load_prompts(world["prompts"]), tok, policy, reference, score, cfg), tok, policy


def test_best_and_worst_of_k():
    scores = torch.tensor([[0.1, 0.9, -0.3, 0.2], [0.5, 0.5, 0.5, 0.5], [2.0, 1.0, 1.0, 3.0]])
    assert best_and_worst(scores) == [(1, 2), None, (3, 1)]


def test_pairs_are_the_scripted_rewards_best_and_worst(world):
    seen = []

    def score(prompts, replies):  # longer reply = better; remember what was scored
        seen.append(replies)
        return torch.tensor([float(len(r)) + 0.001 * i for i, r in enumerate(replies)])

    pairs, tok, _ = make_pairs(world, score)
    batch = next(pairs)
    replies = seen[0]
    b = batch["input_ids"].shape[0] // 2
    assert b == 3
    for i in range(b):
        group = replies[4 * i : 4 * i + 4]
        keys = [len(r) + 0.001 * (4 * i + j) for j, r in enumerate(group)]
        best, worst = group[keys.index(max(keys))], group[keys.index(min(keys))]
        pad = tok.decode([tok.endoftext_id])
        text = [tok.decode(batch["input_ids"][r].tolist()).replace(pad, "") for r in (i, b + i)]
        assert text[0].endswith(best + "<|im_end|>") and text[1].endswith(worst + "<|im_end|>")
    assert batch["episode"]["pairs"] == 3 and batch["ref_logps"].shape == (6,)


def test_ties_give_no_pair_and_all_ties_are_an_error(world):
    calls = []

    def first_prompt_ties(prompts, replies):
        calls.append(1)
        s = torch.arange(len(replies), dtype=torch.float32)
        s[:4] = 1.0  # the first prompt's four samples tie
        return s

    pairs, _, _ = make_pairs(world, first_prompt_ties)
    batch = next(pairs)
    assert batch["episode"]["ties"] >= 1 and batch["input_ids"].shape[0] == 6 and len(calls) == 2
    pairs, _, _ = make_pairs(world, lambda p, r: torch.zeros(len(r)), max_tries=2)
    with pytest.raises(RuntimeError, match="scored all 4 samples"):
        next(pairs)


def test_the_engine_samples_with_the_weights_after_each_update(world, tmp_path):
    from qwen2.generation import generate

    pairs, tok, policy = make_pairs(world, lambda p, r: torch.tensor([float(len(x)) for x in r]), lr=0.05)
    trainer = Trainer(policy, pairs.cfg, tmp_path, stage="online-dpo")
    assert pairs.engine.model is trainer.model  # no copy: the same parameters
    pairs.params = pairs.params.replace(temperature=0.0)  # greedy, to compare with generate
    prompt = load_prompts(world["prompts"])[0]
    from qwen2.tokenizer.chat import encode_chat

    ids = encode_chat(tok, prompt, add_generation_prompt=True)[0]
    for _ in range(2):
        before = policy.model.norm.weight.detach().clone()
        got = pairs.sample([ids], seed=0)[0][0]
        want = list(generate(policy, ids, 8, temperature=0.0, stop_token_ids=pairs.params.stop_token_ids))
        want = tok.decode([t for t in want if t not in pairs.params.stop_token_ids])
        assert got == want
        pairs.params = pairs.params.replace(temperature=1.0)
        trainer.train_step(dpo_objective(), [next(pairs)], total_steps=10)
        pairs.params = pairs.params.replace(temperature=0.0)
        assert not torch.equal(before, policy.model.norm.weight)  # the update landed in the engine's model


def _run(world, out, steps=4, kill_at=None):
    cmd = [
        sys.executable,
        "-m",
        "qwen2.cli",
        "online-dpo",
        "--model",
        str(world["model"]),
        "--data",
        str(world["prompts"]),
        "--reward-model",
        str(world["rm"]),
        "--out",
        str(out),
        "--config",
        str(out.parent / f"{out.name}.yaml"),
    ]
    (out.parent / f"{out.name}.yaml").write_text(
        f"steps: {steps}\nbatch_size: 2\nsamples: 3\nmax_new_tokens: 12\nmax_len: 128\nlr: 1e-3\n"
        "ckpt_every: 1\nkeep_last: 10\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if kill_at is None:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
        assert p.returncode == 0, p.stderr[-3000:]
        return
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=env)
    deadline = time.time() + 240
    while not (out / "checkpoints" / f"step_{kill_at:07d}").is_dir():
        assert p.poll() is None and time.time() < deadline, "the run ended before its checkpoint"
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)  # mid-episode: the next step's sampling is under way
    p.wait()


def _losses(out):
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [[r["step"], r["loss"], r["reward/mean"]] for r in recs if "loss" in r]


def test_sigkill_mid_episode_resumes_to_the_same_losses(world, tmp_path):
    _run(world, tmp_path / "straight")
    _run(world, tmp_path / "killed", kill_at=2)
    assert not (tmp_path / "killed" / "summary.json").exists()
    _run(world, tmp_path / "killed")
    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "killed")
    assert [s for s, _, _ in b] == [1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=1e-5, rtol=0)
