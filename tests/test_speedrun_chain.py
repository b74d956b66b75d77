"""The speedrun end to end at a tiny budget (issue: the whole recipe in miniature): every stage runs
(pretrain with problems mixed in, the optional MoE upcycling, synth, SFT, reward model, DPO with AdamW /
OnDARE / OnTIES, online DPO with OnDARE, eval, passkey retrieval with and without YaRN + DCA), every
stage's checkpoint loads in transformers and in our loader, the report card names every stage, and a
rerun resumes instead of training again."""

import json

import pytest
import torch

from test_train_pretrain import _write_corpus

transformers = pytest.importorskip("transformers")


@pytest.mark.slow
def test_every_stage_runs_and_every_checkpoint_loads(tmp_path, capsys):
    from qwen2.checkpoint import load_model
    from qwen2.cli import main
    from qwen2.train.reward_model import load_reward_model

    corpus = _write_corpus(tmp_path / "corpus", n_files=60, seed=2)
    torch.set_num_threads(2)
    args = ["speedrun", "--minutes", "1.5", "--corpus", str(corpus), "--out", str(tmp_path / "sr")]
    assert main([*args, "--moe"]) == 0
    run = tmp_path / "sr"
    report = json.loads((run / "report.json").read_text())
    chain = report["recipe"]["chain"]
    assert set(chain["seconds"]) >= {
        "synth",
        "sft",
        "reward",
        "dpo-adamw",
        "dpo-ondare",
        "online-dpo",
        "eval",
    }
    assert {r["model"] for r in chain["eval"]} == {
        "base",
        "SFT",
        "DPO adamw",
        "DPO ondare",
        "DPO onties",
        "online DPO",
    }
    grid = report["recipe"]["needle"]
    assert set(grid["accuracy"]) == {"plain RoPE", "YaRN + DCA"} and (run / "passkey.png").is_file()
    md = (run / "report.md").read_text()
    for stage in (
        "| pretrain |",
        "| synth |",
        "| sft |",
        "| reward |",
        "| dpo (ondare) |",
        "| online dpo |",
        "| needle |",
        "| moe (upcycled) |",
    ):
        assert stage in md
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert report["recipe"]["moe"]["steps"] > 0 and (run / "moe" / "expert_load_moe.png").is_file()
    lms = [run / "model", run / "moe" / "model"] + [
        run / "posttrain" / s / "model" for s in ("sft", "dpo-adamw", "dpo-ondare", "online-dpo")
    ]
    for d in lms:
        ours, hf = load_model(d, dtype=torch.float32), transformers.AutoModelForCausalLM.from_pretrained(d)
        with torch.no_grad():
            torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
    rm = run / "posttrain" / "reward" / "model"
    hf_rm = transformers.AutoModelForSequenceClassification.from_pretrained(rm)
    with torch.no_grad():
        torch.testing.assert_close(load_reward_model(rm)(ids), hf_rm(ids).logits[:, 0], atol=1e-4, rtol=1e-4)
    capsys.readouterr()
    assert main([*args, "--stages", "sft,dpo"]) == 0  # finished stages are read back, not trained again
    assert "holds a finished sft run" in capsys.readouterr().out
