"""`qwen2 pretrain --config recipe.yaml` end to end at tiny shapes: tokenizer, data, stage 1, the
long-context stage, the Hugging Face export (its logits equal in transformers), the report, rerunning a
finished run and starting over; and `qwen2 speedrun` on a tiny corpus and budget."""

import json
import random

import pytest
import torch

from qwen2.cli import main

WORDS = (
    "the value of each item is returned by the function when called with a list of numbers and a key "
    "import os sys path self return None True False def class for in if else while try except"
).split()


def _write_corpus(root, n_files=40, seed=0):
    """Python-like files and prose, a few of them long (for the long-context stage's mixture)."""
    rng = random.Random(seed)
    root.mkdir()
    for i in range(n_files):
        lines = []
        for j in range(rng.randint(8, 30) * (12 if i % 8 == 0 else 1)):
            name = rng.choice(WORDS)
            comment = " ".join(rng.choices(WORDS, k=8))
            lines.append(f"def {name}_{j}(x, y):\n    return x + {j} * y  # {comment}\n")
        (root / f"f{i}.py").write_text("\n".join(lines))
    return root


RECIPE = """\
model: test
tokenizer_vocab: 400
tokenizer_max_mb: 1.0
seq_len: 32
batch_size: 2
steps: 4
warmup_steps: 2
eval_every: 2
eval_batches: 1
ckpt_every: 2
long_seq_len: 64
long_batch_size: 2
long_steps: 3
long_warmup_steps: 1
long_min_doc_tokens: 64
samples: 1
sample_tokens: 4
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrain")
    corpus = _write_corpus(tmp / "corpus")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(RECIPE + f"corpus: {corpus}\nout: {tmp / 'run'}\n")
    torch.set_num_threads(1)
    assert main(["pretrain", "--config", str(recipe)]) == 0
    return tmp / "run", recipe


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_both_stages_run_and_every_output_is_written(run):
    run_dir, _ = run
    for name in (
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
        "model/tokenizer_config.json",
        "report.md",
        "report.json",
        "loss.png",
        "long_context.png",
        "summary.json",
        "metrics.jsonl",
    ):
        assert (run_dir / name).is_file(), name
    steps = {(r["stage"], r["step"]) for r in _records(run_dir) if "loss" in r}
    assert steps == {("pretrain", s) for s in range(1, 5)} | {("long", s) for s in range(5, 8)}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["plan"] == {"pretrain": 4, "long": 7} and summary["steps"] == 7
    before = json.loads((run_dir / "long_context_before.json").read_text())
    after = json.loads((run_dir / "long_context_after.json").read_text())
    assert before["seq_len"] == after["seq_len"] == 64
    assert (before["rope_theta"], after["rope_theta"]) == (10_000.0, 1_000_000.0)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["samples"] and report["samples"][0]["prompt"] in (run_dir / "report.md").read_text()


def test_exported_model_loads_and_its_logits_equal_transformers(run):
    transformers = pytest.importorskip("transformers")
    from qwen2.checkpoint import load_model
    from qwen2.tokenizer.bpe import load_tokenizer

    model_dir = run[0] / "model"
    ours = load_model(model_dir, dtype=torch.float32).eval()
    assert ours.config.rope_theta == 1_000_000.0 and ours.config.tie_word_embeddings
    assert ours.config.num_key_value_heads < ours.config.num_attention_heads  # GQA
    assert ours.model.layers[0].self_attn.q_proj.bias is not None
    tok = load_tokenizer(model_dir)
    ids = torch.tensor([tok.encode("def value(x, y):\n    return x + y")])
    hf = transformers.Qwen2ForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_exported_model_samples_by_default_and_stops_at_endoftext(run):
    transformers = pytest.importorskip("transformers")
    from qwen2.checkpoint import load_model
    from qwen2.sampling import SamplingParams
    from qwen2.tokenizer.bpe import load_tokenizer
    from qwen2.train.pretrain import GENERATION_DEFAULTS

    model_dir = run[0] / "model"
    tok = load_tokenizer(model_dir)
    params = SamplingParams.from_generation_config(model_dir)
    assert not params.greedy and params.temperature == GENERATION_DEFAULTS["temperature"]
    assert params.top_k == GENERATION_DEFAULTS["top_k"] and params.stop_token_ids == [tok.endoftext_id]
    hf = transformers.GenerationConfig.from_pretrained(model_dir)  # transformers reads it the same way
    assert hf.do_sample and hf.temperature == params.temperature and hf.eos_token_id == tok.endoftext_id
    model = load_model(model_dir)
    assert getattr(model, "generation_config", None) is not None  # what qwen2.generate defaults to


def test_rerunning_a_finished_run_says_so_and_trains_nothing(run, capsys):
    run_dir, recipe = run
    before = (run_dir / "metrics.jsonl").read_text()
    report = json.loads((run_dir / "report.json").read_text())
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert main(["pretrain", "--config", str(recipe)]) == 0
    assert "holds a finished run" in capsys.readouterr().out
    assert (run_dir / "metrics.jsonl").read_text() == before
    # the run's own wall time and peak, not the rerun's
    again = json.loads((run_dir / "report.json").read_text())
    for key in ("wall_seconds", "peak_flops", "mfu"):
        assert again[key] == report[key], key
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ckpts


def test_no_resume_starts_over(run, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(run[0], run_dir)
    # a later checkpoint of the old run must not survive (nor outrank the new run's checkpoints)
    shutil.copytree(run_dir / "checkpoints" / "step_0000007", run_dir / "checkpoints" / "step_0000099")
    assert main(["pretrain", "--config", str(run[1]), "--out", str(run_dir), "--no-resume"]) == 0
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_0000006", "step_0000007"]

    def losses(d):
        return [(r["stage"], r["step"], r.get("loss"), r.get("eval_loss")) for r in _records(d)]

    assert losses(run_dir) == losses(run[0])  # the same run again, from scratch, logged once


def test_bad_recipe_is_one_line_error(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("seq_lenn: 3\n")
    assert main(["pretrain", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "unknown field 'seq_lenn'" in err and str(recipe) in err and "Traceback" not in err


def test_speedrun_on_a_tiny_corpus_and_budget(tmp_path, capsys):
    corpus = _write_corpus(tmp_path / "corpus", n_files=60, seed=1)
    torch.set_num_threads(1)
    args = ["speedrun", "--minutes", "0.4", "--corpus", str(corpus), "--out", str(tmp_path / "sr")]
    assert main([*args, "--stages", "pretrain"]) == 0  # the post-training chain: test_speedrun_chain.py
    out = capsys.readouterr().out
    # the hint names the model when it is not the default
    assert f"--model {tmp_path / 'sr' / 'model'}" in out
    report = json.loads((tmp_path / "sr" / "report.json").read_text())
    stages = {r["stage"] for r in _records(tmp_path / "sr") if "loss" in r}
    assert stages == {"pretrain", "long"} and set(report["steps"]) == {"pretrain", "long"}
    for key in ("loss_png", "long_context_png"):
        assert (tmp_path / "sr" / report[key].rsplit("/", 1)[-1]).is_file()
    assert (tmp_path / "sr" / "model" / "tokenizer.json").is_file()


def test_missing_plot_dependency_is_reported_before_training(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert main(["speedrun", "--minutes", "1", "--out", str(tmp_path / "sr")]) == 2
    assert "pip install 'qwen2[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "sr").exists()


def test_a_flat_recipe_sets_train_config_and_pretrain_fields_alike(tmp_path):
    from qwen2.train.loop import TrainConfig
    from qwen2.train.recipes import PretrainConfig, load_recipe

    recipe = tmp_path / "r.yaml"
    # lr and beta2 are TrainConfig's, long_lr and seq_len PretrainConfig's own; YAML 1.1 reads 1e-3 as a str
    recipe.write_text("recipe: speedrun\nlr: 1e-3\nbeta2: 0.99\nlong_lr: 2.0e-4\nseq_len: 64\nsteps: 7\n")
    cfg = load_recipe(recipe)
    assert isinstance(cfg, TrainConfig) and type(cfg) is PretrainConfig
    assert (cfg.lr, cfg.beta2, cfg.long_lr, cfg.seq_len, cfg.steps) == (1e-3, 0.99, 2e-4, 64, 7)
    stage1, long = cfg.train_config("pretrain"), cfg.train_config("long")
    assert type(stage1) is TrainConfig and (stage1.lr, stage1.beta2) == (1e-3, 0.99)
    assert (long.lr, long.beta2, long.batch_size) == (2e-4, 0.99, cfg.long_batch_size)
    assert cfg.minutes == 30.0  # the rest is the speedrun recipe's


def test_unknown_or_mistyped_recipe_keys_are_one_line_errors_naming_the_key(tmp_path):
    from qwen2.train.recipes import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("warmup_step: 3\n")
    with pytest.raises(ValueError) as e:
        load_recipe(recipe)
    msg = str(e.value)
    assert "\n" not in msg and str(recipe) in msg
    assert "unknown field 'warmup_step'" in msg and "did you mean 'warmup_steps'?" in msg
    recipe.write_text("batch_size: two\n")
    with pytest.raises(ValueError, match="field 'batch_size' must be int, got 'two'"):
        load_recipe(recipe)
    recipe.write_text("long_mix: 1.5\n")
    with pytest.raises(ValueError, match="long_mix must be in"):
        load_recipe(recipe)


def test_a_fresh_run_clears_the_stages_built_on_the_old_model(tmp_path):
    """--no-resume: the speedrun's post-training and MoE folders were made from the old model, so they go
    too (else the chain reads back finished stages of another model); the data and tokenizer stay."""
    from qwen2.train.pretrain import clear_run

    for d in ("posttrain/sft/model", "moe/model", "tokenizer", "data"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "passkey.png").write_bytes(b"png")
    clear_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "tokenizer"]
