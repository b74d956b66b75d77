"""Post-training under torchrun (gloo, CPU): 2 processes give the same losses as 1 with the same global
batch, for SFT (the step-wide token mean: ranks hold different token counts) and DPO, with DDP; and DPO
with the Online Merging Optimizer under FSDP2 (OnDARE keeping everything is elementwise, so sharding
changes nothing)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain_data import make_world

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("dist"))


def _run(world, out: Path, stage: str, nproc: int, **fields):
    cfg = {
        "steps": 3,
        "lr": 1e-3,
        "max_len": 128,
        "batch_size": 4 // nproc,
        "heldout_fraction": 0.0,
        **fields,
    }
    yaml = out.with_suffix(".yaml")
    yaml.write_text("".join(f"{k}: {v}\n" for k, v in cfg.items()))
    data = world["sft"] if stage == "sft" else world["prefs"]
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "qwen2.cli", stage, "--config", str(yaml), "--model", str(world["model"])]
    cmd += ["--data", str(data), "--out", str(out)]
    if "optimizer" in fields:
        cmd += ["--base-model", str(world["base"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert p.returncode == 0, f"{' '.join(cmd)}:\n{p.stderr[-4000:]}"
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return torch.tensor([r["loss"] for r in recs if "loss" in r and not r.get("final")])


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, fields",
    [
        ("sft", {"packing": True}),
        ("dpo", {}),
        ("dpo", {"optimizer": "ondare", "merge_reserve": 1.0, "merge_alpha": 0.3, "parallel": "fsdp"}),
    ],
    ids=["sft-ddp", "dpo-ddp", "dpo-ondare-fsdp2"],
)
def test_two_processes_equal_one(world, tmp_path, stage, fields):
    one = _run(world, tmp_path / "one", stage, 1, **fields)
    two = _run(world, tmp_path / "two", stage, 2, **fields)
    assert len(one) == 3
    torch.testing.assert_close(two, one, atol=2e-5, rtol=1e-5)
