"""Post-training runs end to end (train.posttrain, `qwen2 sft|reward|dpo`): the loader's epochs and rank
split, Hugging Face exports transformers loads with our logits / scores, resume after a checkpoint with
the same losses, DPO's first loss ln 2, the Online Merging Optimizer in a run, YAML recipes and errors."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain_data import make_world
from qwen2.train.examples import ExampleLoader
from qwen2.train.posttrain import run_posttrain
from qwen2.train.recipes import DPOConfig, RewardConfig, SFTConfig

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("posttrain"))


def losses(run: Path, key: str = "loss") -> list[float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in recs if key in r and not r.get("final")]


def small(cls, world, out, data="sft", **kw):
    base = dict(model=str(world["model"]), data=str(world[data]), out=str(out), batch_size=4, lr=1e-3)
    return cls(**{**base, "max_len": 128, **kw})


def test_loader_covers_each_record_once_per_epoch_and_ranks_share_the_step():
    one = ExampleLoader(10, lambda micro, whole: micro, batch_size=4, seed=3)
    seen = [i for _ in range(5) for i in next(one)]  # two epochs of 10 records: 20 = 5 x 4
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    ranks = [ExampleLoader(10, lambda m, w: m, batch_size=2, rank=r, world=2, seed=3) for r in (0, 1)]
    for step in range(5):
        assert next(ranks[0]) + next(ranks[1]) == seen[4 * step : 4 * step + 4]
    state = one.state_dict()
    after = next(one)
    one.load_state_dict(state)
    assert next(one) == after


def test_sft_exports_a_model_transformers_loads_with_our_logits(world, tmp_path):
    from qwen2.checkpoint import load_model

    summary = run_posttrain(small(SFTConfig, world, tmp_path / "sft", steps=3))
    out = Path(summary["model"])
    assert summary["steps"] == 3 and (out / "tokenizer.json").is_file()
    assert len(losses(tmp_path / "sft")) == 3 and "eval_loss" in summary["final"]
    ours = load_model(out, dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, ours.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
    before = load_model(world["model"], dtype=torch.float32)
    assert not torch.equal(before.model.norm.weight, ours.model.norm.weight)  # it trained


def test_epochs_fix_the_step_count(world, tmp_path):
    n_train = 24 - max(1, int(24 * 0.05))  # the default held-out fraction keeps one record back
    summary = run_posttrain(small(SFTConfig, world, tmp_path / "e", epochs=1.0, batch_size=8))
    assert summary["steps"] == math.ceil(n_train / 8) and summary["records"] == n_train


def test_resume_from_a_checkpoint_gives_the_same_losses(world, tmp_path):
    cfg = small(SFTConfig, world, tmp_path / "run", steps=4, ckpt_every=1, keep_last=10, packing=True)
    run_posttrain(cfg)
    straight = losses(tmp_path / "run")
    ckpts = tmp_path / "run" / "checkpoints"
    for name in ("step_0000003", "step_0000004"):  # as if killed after step 2's checkpoint
        shutil.rmtree(ckpts / name)
    (tmp_path / "run" / "summary.json").unlink()
    run_posttrain(cfg)
    resumed = losses(tmp_path / "run")
    assert len(resumed) == 4
    assert resumed == pytest.approx(straight, abs=1e-6)


def test_reward_model_run_exports_a_sequence_classifier(world, tmp_path):
    from qwen2.train.reward_model import load_reward_model

    summary = run_posttrain(
        small(RewardConfig, world, tmp_path / "rm", data="prefs", steps=2, heldout_fraction=0.2)
    )
    assert "eval_accuracy" in summary["final"]
    for folder in (
        Path(summary["model"]),
        sorted((tmp_path / "rm" / "checkpoints").glob("step_*"))[-1] / "model",
    ):
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
        ours = load_reward_model(folder, dtype=torch.float32)
        ids = torch.randint(0, 300, (3, 9), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.testing.assert_close(ours(ids), hf(ids).logits[:, 0], atol=1e-4, rtol=1e-4)


def test_dpo_starts_at_ln2_and_learns_the_preference(world, tmp_path):
    summary = run_posttrain(small(DPOConfig, world, tmp_path / "dpo", data="prefs", steps=6, lr=3e-3))
    first = losses(tmp_path / "dpo")
    assert first[0] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    assert min(first[1:]) < math.log(2)
    margins = losses(tmp_path / "dpo", "rewards/margins")  # one batch each: their mean, not the last one
    assert margins[0] == pytest.approx(0.0, abs=1e-5) and sum(margins[1:]) / len(margins[1:]) > 0
    assert "rewards/margins" in summary["final"]


@pytest.mark.parametrize("method", ["ondare", "onties"])
def test_dpo_with_the_online_merging_optimizer(world, tmp_path, method):
    with pytest.raises(ValueError, match="base_model"):
        run_posttrain(small(DPOConfig, world, tmp_path / "x", data="prefs", steps=1, optimizer=method))
    cfg = small(
        DPOConfig,
        world,
        tmp_path / method,
        data="prefs",
        steps=2,
        optimizer=method,
        base_model=str(world["base"]),
        merge_alpha=1.0,
        merge_reserve=1.0,
        weight_decay=0.0,
    )
    run_posttrain(cfg)
    # alpha 1, nothing masked: each step adds the whole task vector (SFT - base) to the weights
    from qwen2.checkpoint import load_model

    sft, base = (load_model(world[k], dtype=torch.float32) for k in ("model", "base"))
    out = load_model(tmp_path / method / "model", dtype=torch.float32)
    w = "model.layers.0.mlp.up_proj.weight"
    sd_s, sd_b, sd_o = sft.state_dict()[w], base.state_dict()[w], out.state_dict()[w]
    on_tau = (sd_o - (sd_s + 2 * (sd_s - sd_b))).abs() < 1e-5
    if method == "ondare":
        assert on_tau.all()
    else:  # OnTIES zeroes the task vector where the Adam update outvotes its sign
        assert on_tau.float().mean() > 0.9


def _cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "qwen2.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def test_cli_yaml_recipe_and_flags(world, tmp_path):
    yaml = tmp_path / "sft.yaml"
    yaml.write_text("lr: 1e-3\nwarmup_steps: 1\nepochs: 1\nbatch_size: 8\nmax_len: 128\n")
    p = _cli(
        "sft",
        "--config",
        str(yaml),
        "--model",
        str(world["model"]),
        "--data",
        str(world["sft"]),
        "--out",
        str(tmp_path / "cli"),
    )
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert (
        summary["config"]["lr"] == 1e-3 and summary["config"]["warmup_steps"] == 1 and summary["steps"] == 3
    )
    yaml.write_text("learning_rate: 1e-3\n")
    p = _cli("sft", "--config", str(yaml), "--data", str(world["sft"]))
    assert p.returncode == 2 and "unknown field 'learning_rate'" in p.stderr and "Traceback" not in p.stderr


def test_a_bad_record_names_its_file_and_line(world, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(world["sft"].read_text().splitlines()[0] + "\n" + '{"messages": "hi"}\n')
    p = _cli("sft", "--model", str(world["model"]), "--data", str(bad), "--out", str(tmp_path / "b"))
    assert p.returncode == 2 and f"{bad}:2:" in p.stderr and "Traceback" not in p.stderr
