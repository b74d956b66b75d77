"""Fault tolerance: a run SIGKILLed at any moment (also in the middle of a checkpoint save) resumes and
its loss curve continues bit-identically to the run that was never interrupted (CPU, fp32).

The training runs in subprocesses (this file is also the worker:
`python test_train_resume.py RUN DATA STEPS`).
Kills are real SIGKILLs: from the parent at a random moment, or by the worker to itself at a chosen
point inside `state.py`'s save (mid-write, or all written but not yet renamed).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve()
STEPS = 10


def _make_data(path: Path):
    from qwen2.data.shards import write_shards

    rng = np.random.default_rng(0)
    # documents with a learnable pattern (arithmetic runs) and random lengths, ids < 512 (the tiny vocab)
    docs = []
    for _ in range(200):
        start, step, n = rng.integers(1, 500), rng.integers(1, 5), rng.integers(5, 60)
        docs.append([(start + step * i) % 511 + 1 for i in range(n)])
    write_shards(docs, path, meta={"endoftext_id": 0})


def _run(run_dir, data_dir, kill_at: str | None = None, timeout=120) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("QWEN2_TEST_KILL", None)
    if kill_at:
        env["QWEN2_TEST_KILL"] = kill_at
    p = subprocess.run(
        [sys.executable, str(HERE), str(run_dir), str(data_dir), str(STEPS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if p.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"worker failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p.returncode


def _losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    _make_data(d)
    return d


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    run = tmp_path_factory.mktemp("reference")
    assert _run(run, data_dir) == 0
    losses = _losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return run, losses


def test_sigkill_during_saves_and_at_random_moments_resumes_bit_identically(tmp_path, data_dir, reference):
    from qwen2.train.state import checkpoint_root, list_checkpoints

    run = tmp_path / "run"
    # 1. killed in the middle of writing the 2nd checkpoint (its optimizer file): a partial .tmp folder stays
    assert _run(run, data_dir, kill_at="_write_state:3") == -signal.SIGKILL
    leftovers = [p.name for p in checkpoint_root(run).iterdir()]
    assert any(n.startswith(".tmp-") for n in leftovers), leftovers
    assert [p.name for p in list_checkpoints(run)] == ["step_0000002"]  # the partial one is not a checkpoint
    # 2. resumed from step 2, killed after everything of a save is written and fsynced but before the rename
    assert _run(run, data_dir, kill_at="fsync_tree:2") == -signal.SIGKILL
    assert [p.name for p in list_checkpoints(run)] == ["step_0000002", "step_0000004"]
    # 3. resumed, then killed by the parent at random moments until a run completes
    rnd = random.Random(0)
    for _ in range(6):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("QWEN2_TEST_KILL", None)
        p = subprocess.Popen(
            [sys.executable, str(HERE), str(run), str(data_dir), str(STEPS)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(rnd.uniform(3.0, 6.0))
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
        if p.returncode == 0:
            break
    else:
        assert _run(run, data_dir) == 0
    ref_run, ref = reference
    ours = _losses(run)
    assert sorted(ours) == list(range(1, STEPS + 1))
    assert ours == ref  # bit-identical: the same float32 values, step by step
    assert len(list_checkpoints(run)) == 2  # keep_last
    assert not [p for p in checkpoint_root(run).iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    assert (list_checkpoints(run)[-1] / "model" / "model.safetensors").read_bytes() == (
        list_checkpoints(ref_run)[-1] / "model" / "model.safetensors"
    ).read_bytes()


def test_resume_refuses_another_world_size_and_ignores_partial_folders(tmp_path, reference):
    import shutil

    import torch

    from qwen2.config import ModelConfig
    from qwen2.model import build_model
    from qwen2.train.loop import TrainConfig, Trainer
    from qwen2.train.state import latest_checkpoint, load_checkpoint

    ref_run, _ = reference
    run = tmp_path / "copy"
    shutil.copytree(ref_run / "checkpoints", run / "checkpoints")
    newest = latest_checkpoint(run)
    # a folder that looks newer but never got its rename is not a checkpoint
    (run / "checkpoints" / ".tmp-step_0000099-1").mkdir()
    (run / "checkpoints" / "step_0000100").mkdir()  # no trainer.json: incomplete
    assert latest_checkpoint(run) == newest
    info_path = newest / "trainer.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "world_size": 2}))
    trainer = Trainer(build_model(ModelConfig.preset("tiny"), seed=1), TrainConfig(), run)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(ValueError, match="world_size 2"):
        load_checkpoint(trainer, None, newest)
    # untouched
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))


def _worker(run_dir: str, data_dir: str, steps: int):
    import torch

    from qwen2.config import ModelConfig
    from qwen2.data import PackedLoader
    from qwen2.data.shards import ShardSet
    from qwen2.model import build_model
    from qwen2.train import state
    from qwen2.train.loop import TrainConfig, Trainer
    from qwen2.train.objectives import next_token_loss

    kill = os.environ.get("QWEN2_TEST_KILL")
    if kill:  # SIGKILL this process on the n-th call of a function inside the checkpoint save
        name, n = kill.split(":")
        original, calls = getattr(state, name), [0]

        def deadly(*args, **kwargs):
            calls[0] += 1
            if calls[0] == int(n):
                if name == "_write_state":  # die halfway through the file
                    Path(args[1], f"{args[2]}.safetensors").write_bytes(b"\0" * 100)
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)

        setattr(state, name, deadly)
    torch.set_num_threads(1)
    train, val = ShardSet(data_dir).split(0.1, seed=0)
    model = build_model(ModelConfig.preset("tiny"), seed=0)
    trainer = Trainer(
        model,
        TrainConfig(
            batch_size=4, grad_accum=2, lr=1e-2, warmup_steps=3, eval_every=5, ckpt_every=2, keep_last=2
        ),
        run_dir,
    )
    loader = PackedLoader(train, 32, 4, seed=0)
    ckpt = state.latest_checkpoint(run_dir)
    if ckpt is not None:
        state.load_checkpoint(trainer, loader, ckpt)

    def eval_batches():
        held_out = PackedLoader(val, 32, 4, seed=0, shuffle=False)
        return [next(held_out) for _ in range(2)]

    trainer.fit(next_token_loss, loader, end_step=steps, eval_batches=eval_batches)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], int(sys.argv[3]))
