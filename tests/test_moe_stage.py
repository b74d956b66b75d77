"""The speedrun's MoE stage (train.moe_stage) on a tiny pre-trained run: the exported Qwen2-MoE loads in
transformers with our logits, the held-out losses say what upcycling costs (nothing when the recipe is
function preserving), the expert-load plot is written, a finished stage is read back, and a stage killed
with SIGKILL mid-run continues from its newest checkpoint."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_train_pretrain import _write_corpus

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 30-step pre-training run of the test model (vocabulary ~400), checkpoints every 2 steps (the
    MoE stage takes the base run's loop settings)."""
    from qwen2.train import recipes
    from qwen2.train.pretrain import run_pretrain

    tmp = tmp_path_factory.mktemp("moe-base")
    fields = dict(
        model="test",
        tokenizer_vocab=400,
        tokenizer_max_mb=1.0,
        seq_len=32,
        batch_size=2,
        steps=30,
        warmup_steps=2,
        eval_every=0,
        eval_batches=1,
        ckpt_every=2,
        long_seq_len=64,
        long_batch_size=2,
        long_steps=2,
        long_warmup_steps=1,
        long_min_doc_tokens=64,
        corpus=str(_write_corpus(tmp / "corpus")),
        out=str(tmp / "base"),
    )
    torch.set_num_threads(1)
    run_pretrain(recipes.override(recipes.PretrainConfig(), fields))
    return tmp / "base"


def _losses(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def _steps(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_upcycled_model_trains_exports_and_is_read_back(base, tmp_path, capsys):
    from qwen2.checkpoint import load_model
    from qwen2.config import ModelConfig, param_counts
    from qwen2.train.moe_stage import run_moe_stage

    out = tmp_path / "moe"
    s = run_moe_stage(base, out, steps=5)  # 8 experts, top-2, one shared expert, half re-initialised
    cfg = ModelConfig.from_json(out / "model" / "config.json")
    assert cfg.model_type == "qwen2_moe" and (cfg.num_experts, cfg.num_experts_per_tok) == (8, 2)
    # (2 routed + 1 shared) x 56 ~ the dense FFN's 160: 160 / 3 to the nearest multiple of 8
    assert cfg.moe_intermediate_size == cfg.shared_expert_intermediate_size == 56
    assert s["params"]["total"] == param_counts(cfg).total > s["params"]["active"] == param_counts(cfg).active
    assert 0 < s["params"]["active"] - s["params"]["dense"] < 0.05 * s["params"]["dense"]
    assert s["steps"] == 5 and s["tokens"] == 5 * 2 * 32 and s["seconds"] > 0
    png = out / "expert_load_moe.png"
    assert png.is_file() and s["expert_load_png"] == str(png)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / "model" / name).is_file(), name
    assert json.loads((out / "summary.json").read_text())["heldout_loss"] == s["heldout_loss"]

    ids = torch.tensor([[1, 5, 9, 2, 7, 3, 11, 4, 8, 6]])
    ours = load_model(out / "model", dtype=torch.float32)
    hf = transformers.Qwen2MoeForCausalLM.from_pretrained(out / "model", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)

    # Upcycling keeps most of what the dense model learned (uniform guessing: ln V), re-initialising half
    # of each expert costs more than keeping them whole, and the continuation lowers the loss.
    loss, uniform = s["heldout_loss"], math.log(cfg.vocab_size)
    whole = run_moe_stage(base, tmp_path / "whole", steps=5, reinit=0.0)["heldout_loss"]
    assert whole["dense"] == loss["dense"]
    assert (
        loss["dense"]
        < whole["upcycled"]
        < loss["upcycled"]
        < loss["dense"] + 0.25 * (uniform - loss["dense"])
    )
    assert all(math.isfinite(v) for v in loss.values()) and loss["trained"] < loss["upcycled"]

    capsys.readouterr()
    again = run_moe_stage(base, out, steps=5)  # finished: read back, nothing trained
    assert again["finished_before"] and "holds a finished MoE stage" in capsys.readouterr().out
    assert _steps(out) == [1, 2, 3, 4, 5, 5]  # five steps and the final evaluation, logged once
    with pytest.raises(ValueError, match="another recipe"):
        run_moe_stage(base, out, steps=5, top_k=1)


def test_function_preserving_recipe_keeps_the_dense_loss(base, tmp_path):
    """One expert as wide as the dense FFN, always routed (softmax over one expert = 1), no shared expert,
    nothing re-initialised: the MoE computes the dense model, so its held-out loss is the parent's."""
    from qwen2.train.moe_stage import run_moe_stage

    s = run_moe_stage(base, tmp_path / "one", steps=1, num_experts=1, top_k=1, shared_experts=0, reinit=0.0)
    assert s["heldout_loss"]["upcycled"] == pytest.approx(s["heldout_loss"]["dense"], abs=1e-5)


def test_killed_stage_resumes_from_its_newest_checkpoint(base, tmp_path):
    from qwen2.train.moe_stage import run_moe_stage

    out, steps = tmp_path / "killed", 60
    code = (
        "import sys; from pathlib import Path; import torch; torch.set_num_threads(1)\n"
        "from qwen2.train.moe_stage import run_moe_stage\n"
        f"run_moe_stage(Path({str(base)!r}), Path({str(out)!r}), steps={steps})\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "killed.log", "w")  # a file, not a pipe: the progress bar would fill a pipe
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while not list((out / "checkpoints").glob("step_*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    ended = proc.poll() is not None
    assert not ended, f"the stage ended before it was killed: {(tmp_path / 'killed.log').read_text()[-500:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    assert not (out / "summary.json").exists()
    killed_at = max(int(p.name.removeprefix("step_")) for p in (out / "checkpoints").glob("step_*"))
    assert 0 < killed_at < steps
    s = run_moe_stage(base, out, steps=steps)
    assert s["steps"] == steps and not s.get("finished_before")
    assert _steps(out) == [*range(1, steps + 1), steps]  # every step once: resumed, not restarted
    ref = run_moe_stage(base, tmp_path / "uninterrupted", steps=steps)  # the same stage, never killed
    assert _losses(out) == pytest.approx(_losses(tmp_path / "uninterrupted"), rel=1e-5)
    assert s["heldout_loss"] == pytest.approx(ref["heldout_loss"], rel=1e-5)
