"""Training checkpoints that survive faults: write to a temporary folder, fsync, rename.

A checkpoint `<run>/checkpoints/step_0000123/` holds
    model/                 the Hugging Face layout (config.json + safetensors, qwen2.checkpoint.save_model):
                           it loads unchanged in transformers and in `qwen2.load_model`
    optimizer.safetensors  AdamW moments keyed by parameter name (+ optimizer.json: groups, scalars)
    ranks.safetensors      per rank: every RNG state (torch, CUDA, Python, NumPy) and the loader position
    trainer.json           step, stage, stage start, tokens seen, the run's plan, world size
Everything is written under `.tmp-step_...`, each file and folder fsynced, then renamed to `step_...`:
a rename is atomic, so a folder named `step_*` is always complete and a run killed at any moment
(also mid-save) resumes from the newest one; partial `.tmp-*` folders are ignored and swept. Old
checkpoints beyond `keep_last` are first renamed to `.trash-*` and only then deleted, so a kill
during cleanup never leaves a half-deleted folder under a complete-looking name.

Nothing here unpickles: tensors go through safetensors, the rest through JSON (DESIGN conventions).
What is saved is `Trainer.state_dict()` (with FSDP2 / DDP the full state, gathered; rank 0 writes) plus
every rank's loader position; `load_checkpoint` hands it back through `Trainer.load_state_dict`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from qwen2.files import fsync_dir, fsync_tree

PREFIX = "step_"


# ---- nested state <-> (JSON, tensors) -----------------------------------------------------------
def _flatten(obj, tensors: dict, key: str):
    """Replace every tensor / ndarray in a nested structure by a reference into `tensors`."""
    if torch.is_tensor(obj):
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj))
        return {"__ndarray__": key}
    if isinstance(obj, dict):
        return {
            "__dict__": [
                [_flatten(k, tensors, f"{key}/k{i}"), _flatten(v, tensors, f"{key}/{i}")]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    if isinstance(obj, (list, tuple)):
        items = [_flatten(v, tensors, f"{key}/{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    return obj


def _unflatten(obj, tensors: dict):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy()
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def _write_state(obj, folder: Path, name: str) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(obj, tensors, name)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(tree))


def _read_state(folder: Path, name: str):
    from safetensors.torch import load_file

    tensors = load_file(str(folder / f"{name}.safetensors"))
    return _unflatten(json.loads((folder / f"{name}.json").read_text()), tensors)


# ---- RNG ------------------------------------------------------------------------------------------
def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- files ----------------------------------------------------------------------------------------
def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints, oldest first (a `step_*` folder exists only after its rename)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and (p / "trainer.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(run_dir) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _sweep(root: Path) -> None:
    """Remove what a killed save or cleanup left behind (`.tmp-*`, `.trash-*`)."""
    for p in root.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".trash-*"):
        shutil.rmtree(p, ignore_errors=True)


# ---- save / load ----------------------------------------------------------------------------------
# trainer.json: the Trainer's state_dict without its tensors and per-rank parts.
INFO_KEYS = ("step", "stage", "stage_start", "tokens", "world_size", "meta")


def save_checkpoint(trainer, loader) -> Path | None:
    """Write the trainer's complete state (Trainer.state_dict) and every rank's loader position at the
    current step. Collective under torchrun; rank 0 writes."""
    from qwen2.checkpoint import save_model
    from qwen2.train.parallel import model_from_state

    state = trainer.state_dict()
    per_rank = {"rng": state["rng"], "loader": loader.state_dict()}
    if trainer.world > 1:
        gathered = [None] * trainer.world
        dist.all_gather_object(gathered, per_rank)
    else:
        gathered = [per_rank]
    final = None
    if trainer.is_main:
        root = checkpoint_root(trainer.run_dir)
        root.mkdir(parents=True, exist_ok=True)
        _sweep(root)
        name = f"{PREFIX}{trainer.step:07d}"
        final = root / name
        tmp = root / f".tmp-{name}-{os.getpid()}"
        tmp.mkdir()
        # The HF export: a meta-device model takes the gathered full tensors (no copy), then save_model.
        save_model(model_from_state(trainer.model, state["model"]), tmp / "model")
        _write_state(state["optimizer"], tmp, "optimizer")
        _write_state(gathered, tmp, "ranks")
        (tmp / "trainer.json").write_text(json.dumps({k: state[k] for k in INFO_KEYS}, indent=2))
        fsync_tree(tmp)
        if final.exists():  # the same step saved twice (end of a stage after a resume): replace it
            old = root / f".trash-{name}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fsync_dir(root)
        keep = trainer.cfg.keep_last
        for old in list_checkpoints(trainer.run_dir)[:-keep] if keep > 0 else []:
            trash = root / f".trash-{old.name}"
            os.rename(old, trash)
            shutil.rmtree(trash, ignore_errors=True)
    if trainer.world > 1:
        dist.barrier()
    return final


def read_trainer_info(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / "trainer.json").read_text())


def load_model_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def load_checkpoint(trainer, loader, ckpt: str | os.PathLike) -> dict:
    """Restore model, optimizer, step, stage, RNG (Trainer.load_state_dict) and the loader position
    from `ckpt`. Returns the checkpoint's trainer.json."""
    ckpt = Path(ckpt)
    info = read_trainer_info(ckpt)
    if info["world_size"] != trainer.world:  # checked before any file is read: the trainer stays as it is
        raise ValueError(
            f"{ckpt}: saved with world_size {info['world_size']}, resumed with {trainer.world}; "
            f"resume with the same number of processes (the loader position is per rank)"
        )
    mine = _read_state(ckpt, "ranks")[trainer.rank]
    trainer.load_state_dict(
        {
            **info,
            "model": load_model_state(ckpt / "model"),
            "optimizer": _read_state(ckpt, "optimizer"),
            "rng": mine["rng"],
        }
    )
    loader.load_state_dict(mine["loader"])
    if trainer.is_main:
        _truncate_metrics(trainer.run_dir / "metrics.jsonl", trainer.step)
    return info


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after the checkpoint (they will be logged again) and any torn last line."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("step", 0) <= step:
            keep.append(line)
    from qwen2.files import atomic_write_text

    atomic_write_text(path, "".join(k + "\n" for k in keep))
