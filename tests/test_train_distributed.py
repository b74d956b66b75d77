"""Scale-out: 2 processes under torchrun (gloo, CPU) give the same losses and weights as 1 process with
the same global batch, with DDP and with FSDP2 (`fully_shard`). The loader splits each global batch
into contiguous per-rank rows, so both runs see the same rows; only the order of the gradient
reduction differs (hence allclose, not equality).

This file is also the worker: `python test_train_distributed.py RUN DATA STEPS MODE GLOBAL_BATCH`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve()
STEPS, GLOBAL_BATCH = 6, 4


def _launch(run_dir, data_dir, mode: str, nproc: int):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [str(HERE), str(run_dir), str(data_dir), str(STEPS), mode, str(GLOBAL_BATCH)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"


def _losses(run_dir: Path) -> list[float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


def _weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    from qwen2.train.state import latest_checkpoint

    return load_file(str(latest_checkpoint(run_dir) / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from qwen2.data.shards import write_shards

    data = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(1)
    docs = [rng.integers(1, 512, rng.integers(5, 80)).tolist() for _ in range(100)]
    write_shards(docs, data, meta={"endoftext_id": 0})
    single = tmp_path_factory.mktemp("single")
    _launch(single, data, "ddp", 1)
    return data, single


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, setup, mode):
    data, single = setup
    _launch(tmp_path, data, mode, 2)
    one, two = _losses(single), _losses(tmp_path)
    assert len(one) == len(two) == STEPS
    np.testing.assert_allclose(two, one, rtol=2e-5, atol=2e-5)
    w1, w2 = _weights(single), _weights(tmp_path)
    assert w1.keys() == w2.keys()
    for k in w1:
        # Adam divides by sqrt(v): near-zero gradients (biases) amplify reduction-order noise; the
        # weights moved by up to lr * steps = 0.06, so 2e-4 is still a tight match.
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=2e-4)
    info = json.loads((tmp_path / "checkpoints" / f"step_{STEPS:07d}" / "trainer.json").read_text())
    assert info["world_size"] == 2 and info["tokens"] == STEPS * GLOBAL_BATCH * 2 * 24


def _worker(run_dir, data_dir, steps, mode, global_batch):
    from qwen2.config import ModelConfig
    from qwen2.data import PackedLoader
    from qwen2.data.shards import ShardSet
    from qwen2.model import build_model
    from qwen2.train.loop import TrainConfig, Trainer
    from qwen2.train.objectives import next_token_loss

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    model = build_model(ModelConfig.preset("tiny"), seed=0)
    cfg = TrainConfig(batch_size=global_batch // world, grad_accum=2, lr=1e-2, warmup_steps=2, parallel=mode)
    trainer = Trainer(model, cfg, run_dir)
    loader = PackedLoader(ShardSet(data_dir), 24, global_batch // world, rank, world, seed=0)
    trainer.fit(next_token_loss, loader, end_step=steps)
    trainer.close()
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
