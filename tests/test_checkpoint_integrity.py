"""Training checkpoints that are damaged after their save, or resumed with other settings.

Every checkpoint ends with manifest.json (each file's size and sha256): a flipped byte or a truncated
file makes the resume fall back to the previous checkpoint, and the run continues exactly as one resumed
from that checkpoint would. A save that hits a full disk removes its partial folder and says so in one
line. Resuming with another model or other hyper-parameters is refused, or recorded when allowed.
The runs are in-process (CPU, fp32, tiny model): resuming is deterministic.
"""

import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen2.checkpoint import CheckpointError
from qwen2.config import ModelConfig
from qwen2.data import PackedLoader
from qwen2.data.shards import ShardSet, write_shards
from qwen2.model import build_model
from qwen2.train import state
from qwen2.train.loop import TrainConfig, Trainer
from qwen2.train.objectives import next_token_loss

CFG = TrainConfig(batch_size=4, grad_accum=1, lr=1e-2, warmup_steps=2, ckpt_every=2, keep_last=5, log_every=1)


HERE = Path(__file__).resolve()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(100):  # arithmetic runs (learnable), ids < 512 (the tiny vocab)
        start, step, n = rng.integers(1, 500), rng.integers(1, 5), rng.integers(5, 60)
        docs.append([(start + step * i) % 511 + 1 for i in range(n)])
    write_shards(docs, d, meta={"endoftext_id": 0})
    return d


@pytest.fixture(scope="module")
def data(data_dir):
    return ShardSet(data_dir)


def make(run, cfg=CFG, model_config=None, stage="train"):
    torch.manual_seed(0)
    model = build_model(model_config or ModelConfig.preset("tiny"), dtype=torch.float32, seed=0)
    return Trainer(model, cfg, run, stage=stage)


def loader(data):
    return PackedLoader(data, 32, 4, seed=0)


def train(run, data, end, cfg=CFG, resume=True, allow_changed=False, **kw):
    """Build a trainer, resume from the newest checkpoint that verifies, train to `end`."""
    trainer = make(run, cfg, **kw)
    ld = loader(data)
    ckpt = state.latest_checkpoint(run) if resume else None
    if ckpt is not None:
        state.load_checkpoint(trainer, ld, ckpt, allow_changed=allow_changed)
    trainer.fit(next_token_loss, ld, end_step=end)
    trainer.close()
    return trainer, ckpt


def losses(run) -> dict[int, float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


@pytest.fixture(scope="module")
def base(tmp_path_factory, data):
    """A run of 6 steps: checkpoints at steps 2, 4 and 6."""
    run = tmp_path_factory.mktemp("base")
    train(run, data, 6)
    assert [p.name for p in state.list_checkpoints(run)] == ["step_0000002", "step_0000004", "step_0000006"]
    return run


@pytest.fixture(scope="module")
def from_step_4(tmp_path_factory, base, data):
    """The losses of steps 5..8 of the base run resumed from step 4 (step 6 deleted)."""
    run = tmp_path_factory.mktemp("from4")
    shutil.copytree(base, run, dirs_exist_ok=True)
    shutil.rmtree(run / "checkpoints" / "step_0000006")
    _, ckpt = train(run, data, 8)
    assert ckpt.name == "step_0000004"
    ours = losses(run)
    assert sorted(ours) == list(range(1, 9))
    return {s: ours[s] for s in range(5, 9)}


def copy(base, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base, run)
    return run


def test_manifest_lists_every_file_and_verifies(base):
    ckpt = state.latest_checkpoint(base)
    manifest = json.loads((ckpt / "manifest.json").read_text())["files"]
    on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest) == on_disk and "model/model.safetensors" in on_disk
    assert manifest["trainer.json"]["size"] == (ckpt / "trainer.json").stat().st_size
    assert state.verify_checkpoint(ckpt) is None


def test_flipped_byte_in_weights_falls_back_and_resumes_like_the_previous(
    base, data, from_step_4, tmp_path, capsys
):
    run = copy(base, tmp_path)
    weights = run / "checkpoints" / "step_0000006" / "model" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0x01  # one bit of the last tensor: the header still parses, the size is unchanged
    weights.write_bytes(bytes(raw))
    why = state.verify_checkpoint(weights.parent.parent)
    assert why == f"{weights}: contents differ from manifest.json's sha256 (corrupted)"
    _, ckpt = train(run, data, 8)
    assert ckpt.name == "step_0000004"
    line = capsys.readouterr().err.strip().splitlines()
    assert f"checkpoint step_0000006 is broken: {weights}: contents differ" in line[0]
    assert line[0].endswith("falling back to step_0000004")
    ours = losses(run)
    assert {s: ours[s] for s in range(5, 9)} == from_step_4  # bit-identical to resuming from step 4


def test_truncated_optimizer_file_falls_back(base, data, tmp_path, capsys):
    run = copy(base, tmp_path)
    opt = run / "checkpoints" / "step_0000006" / "optimizer.safetensors"
    size = opt.stat().st_size
    opt.write_bytes(opt.read_bytes()[:-100])
    assert state.latest_checkpoint(run).name == "step_0000004"
    err = capsys.readouterr().err
    assert f"{opt}: {size - 100} bytes, manifest.json says {size} (truncated or rewritten)" in err
    assert "falling back to step_0000004" in err
    with pytest.raises(CheckpointError, match=r"checkpoint step_0000006 is broken: .*optimizer.safetensors"):
        state.load_checkpoint(make(run), loader(data), opt.parent)


def test_missing_file_and_bad_manifest_are_broken(base, tmp_path):
    run = copy(base, tmp_path)
    ckpt = run / "checkpoints" / "step_0000006"
    (ckpt / "ranks.json").unlink()
    assert state.verify_checkpoint(ckpt) == f"{ckpt / 'ranks.json'}: missing (listed in manifest.json)"
    (ckpt / "manifest.json").write_text("{")
    assert state.verify_checkpoint(ckpt).startswith(f"{ckpt / 'manifest.json'}: unreadable")


def test_every_checkpoint_broken_is_an_error(base, tmp_path):
    run = copy(base, tmp_path)
    for ckpt in state.list_checkpoints(run):
        (ckpt / "trainer.json").write_text((ckpt / "trainer.json").read_text() + " ")
    with pytest.raises(CheckpointError, match=r"none of its 3 checkpoint\(s\) verifies"):
        state.latest_checkpoint(run)


def test_legacy_checkpoint_without_manifest_is_accepted_with_a_warning(base, data, tmp_path, capsys):
    run = copy(base, tmp_path)
    newest = run / "checkpoints" / "step_0000006"
    (newest / "manifest.json").unlink()
    assert state.verify_checkpoint(newest) is None
    assert state.latest_checkpoint(run) == newest
    assert f"warning: {newest}: no manifest.json" in capsys.readouterr().err
    (newest / "trainer.json").unlink()  # neither: not a checkpoint at all
    assert state.verify_checkpoint(newest) == f"{newest}: no manifest.json and no trainer.json"


def test_disk_full_during_save_removes_the_partial_folder_and_keeps_the_previous(
    base, data, tmp_path, monkeypatch
):
    run = copy(base, tmp_path)

    def full(obj, folder, name):
        (folder / f"{name}.safetensors").write_bytes(b"\0" * 10)  # part of a file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(state, "_write_state", full)
    with pytest.raises(OSError) as e:
        train(run, data, 8)
    msg = str(e.value)
    assert e.value.errno == errno.ENOSPC and "\n" not in msg
    assert "saving step_0000008 failed (no space left on device)" in msg and "step_0000006 is intact" in msg
    root = state.checkpoint_root(run)
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]  # no .tmp-* left
    assert [p.name for p in state.list_checkpoints(run)][-1] == "step_0000006"
    assert state.verify_checkpoint(root / "step_0000006") is None


def test_changed_learning_rate_is_refused(base, data, tmp_path):
    run = copy(base, tmp_path)
    trainer = make(run, dataclasses.replace(CFG, lr=2e-2, warmup_steps=3))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(
        ValueError,
        match=r"stage 'train' was saved with other settings \(lr 0.01 -> 0.02, warmup_steps 2 -> 3\)"
        r".*--allow-changed",
    ):
        state.load_checkpoint(trainer, loader(data), state.latest_checkpoint(run))
    assert trainer.step == 0 and all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_bookkeeping_fields_may_change(base, data, tmp_path):
    run = copy(base, tmp_path)
    trainer = make(run, dataclasses.replace(CFG, ckpt_every=3, keep_last=1, eval_every=5, log_every=2))
    state.load_checkpoint(trainer, loader(data), state.latest_checkpoint(run))
    assert trainer.step == 6 and "changed" not in trainer.meta


def test_allow_changed_records_the_change(base, data, tmp_path, capsys):
    run = copy(base, tmp_path)
    new = dataclasses.replace(CFG, lr=2e-2, weight_decay=0.0)
    trainer, ld = make(run, new), loader(data)
    state.load_checkpoint(trainer, ld, state.latest_checkpoint(run), allow_changed=True)
    changed = [
        {"step": 6, "stage": "train", "field": "lr", "old": 0.01, "new": 0.02},
        {"step": 6, "stage": "train", "field": "weight_decay", "old": 0.1, "new": 0.0},
    ]
    assert trainer.meta["changed"] == changed
    assert (
        "resuming step_0000006 (stage 'train') with changed settings: lr 0.01 -> 0.02"
        in capsys.readouterr().err
    )
    assert {g["name"]: g["weight_decay"] for g in trainer.optimizer.param_groups}["decay"] == 0.0  # in effect
    trainer.fit(next_token_loss, ld, end_step=8)
    trainer.close()
    info = state.read_trainer_info(state.latest_checkpoint(run))
    assert info["meta"]["changed"] == changed and info["train_config"]["lr"] == 0.02
    again = make(run, new)  # the new settings are now the recorded ones: no flag needed
    state.load_checkpoint(again, loader(data), state.latest_checkpoint(run))
    assert again.step == 8 and again.meta["changed"] == changed


@pytest.mark.parametrize(
    "change,fields",
    [
        ({"rope_theta": 10000.0}, "rope_theta 1000000.0 -> 10000.0"),
        ({"num_hidden_layers": 3}, "num_hidden_layers 2 -> 3"),
    ],
)
def test_different_model_is_refused(base, data, tmp_path, change, fields):
    run = copy(base, tmp_path)
    trainer = make(run, model_config=ModelConfig.preset("tiny").replace(**change))
    with pytest.raises(ValueError, match=rf"saved for another model \({fields}\)"):
        state.load_checkpoint(trainer, loader(data), state.latest_checkpoint(run), allow_changed=True)
    assert trainer.step == 0


def test_stage_switch_is_not_a_change(data, tmp_path):
    """As run_pretrain does: a checkpoint of stage "long" is resumed after begin_stage("long", ...)."""
    run = tmp_path / "staged"
    long_cfg = dataclasses.replace(CFG, lr=5e-3, batch_size=2)
    trainer = make(run, stage="pretrain")
    trainer.fit(next_token_loss, loader(data), end_step=2)
    trainer.begin_stage("long", long_cfg)
    trainer.fit(next_token_loss, PackedLoader(data, 32, 2, seed=0), end_step=4)
    trainer.close()
    resumed = make(run, stage="pretrain")
    resumed.begin_stage("long", long_cfg)
    state.load_checkpoint(resumed, PackedLoader(data, 32, 2, seed=0), state.latest_checkpoint(run))
    assert (resumed.step, resumed.stage, resumed.stage_start) == (
        4,
        "long",
        2,
    ) and "changed" not in resumed.meta
    wrong = make(run, stage="pretrain")
    wrong.begin_stage("long", dataclasses.replace(long_cfg, lr=1e-3))
    with pytest.raises(ValueError, match=r"stage 'long' was saved with other settings \(lr 0.005 -> 0.001\)"):
        state.load_checkpoint(wrong, PackedLoader(data, 32, 2, seed=0), state.latest_checkpoint(run))
    first = make(run, stage="pretrain")  # the stage-1 checkpoint against stage 1's settings
    state.load_checkpoint(first, loader(data), state.checkpoint_root(run) / "step_0000002")
    assert first.stage == "pretrain"


def test_checkpoint_files_have_the_permissions_of_trainer_json(base):
    ckpt = state.latest_checkpoint(base)
    want = (ckpt / "trainer.json").stat().st_mode & 0o777
    for p in ckpt.rglob("*"):
        if p.is_file():
            assert p.stat().st_mode & 0o777 == want, p


def _torchrun(run, data_dir, end):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(HERE), str(run), str(data_dir), str(end)]
    p = subprocess.run(
        cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240
    )
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return p.stderr


def test_under_torchrun_every_rank_falls_back_together(data_dir, tmp_path):
    """Rank 0 verifies and tells the others: both resume from the same checkpoint, one line is printed."""
    run = tmp_path / "ddp"
    _torchrun(run, data_dir, 4)
    weights = run / "checkpoints" / "step_0000004" / "model" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0x01
    weights.write_bytes(bytes(raw))
    err = _torchrun(run, data_dir, 6)
    assert err.count("checkpoint step_0000004 is broken") == 1 and "falling back to step_0000002" in err
    assert sorted(losses(run)) == list(range(1, 7))
    assert [p.name for p in state.list_checkpoints(run)] == ["step_0000002", "step_0000004", "step_0000006"]
    assert all(state.verify_checkpoint(p) is None for p in state.list_checkpoints(run))  # step 4 saved anew


def _worker(run: str, data_dir: str, end: int):
    from qwen2.train.parallel import init_distributed

    torch.set_num_threads(1)
    rank, world, _ = init_distributed()
    trainer = make(Path(run))
    ld = PackedLoader(ShardSet(data_dir), 32, 4 // world, rank, world, seed=0)
    ckpt = state.latest_checkpoint(run)
    if ckpt is not None:
        state.load_checkpoint(trainer, ld, ckpt)
    trainer.fit(next_token_loss, ld, end_step=end)
    trainer.close()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], int(sys.argv[3]))
