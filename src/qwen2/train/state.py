"""Training checkpoints that survive faults: write to a temporary folder, fsync, rename.

A checkpoint `<run>/checkpoints/step_0000123/` holds
    model/                 the Hugging Face layout (config.json + safetensors, qwen2.checkpoint.save_model):
                           it loads unchanged in transformers and in `qwen2.load_model`
    optimizer.safetensors  AdamW moments keyed by parameter name (+ optimizer.json: groups, scalars)
    ranks.safetensors      per rank: every RNG state (torch, CUDA, Python, NumPy) and the loader position
    trainer.json           step, stage, stage start, tokens seen, the run's plan, world size, and the
                           stage's TrainConfig and the model's config (what a resume is compared with)
    manifest.json          written last: every other file's relative path, size and sha256
Everything is written under `.tmp-step_...`, each file and folder fsynced, then renamed to `step_...`:
a rename is atomic, so a folder named `step_*` is always complete and a run killed at any moment
(also mid-save) resumes from the newest one; partial `.tmp-*` folders are ignored and swept. A save
that fails (a full disk) removes its `.tmp-*` folder and raises one line; the previous checkpoint is
untouched. Old checkpoints beyond `keep_last` are first renamed to `.trash-*` and only then deleted,
so a kill during cleanup never leaves a half-deleted folder under a complete-looking name.

A file damaged after its save (a flipped bit, a truncated copy) is caught by the manifest
(verify_checkpoint): latest_checkpoint skips such a checkpoint, saying which file is bad, and resumes
from the newest one that verifies. A checkpoint without manifest.json but with trainer.json was saved
before manifests existed: it is accepted, with a warning. Resuming checks the run is the same: another
model config is refused; other hyper-parameters are refused unless `allow_changed`, which records each
change in trainer.meta["changed"] (fields of BOOKKEEPING, which change no step, are not compared).

Nothing here unpickles: tensors go through safetensors, the rest through JSON (DESIGN conventions).
What is saved is `Trainer.state_dict()` (with FSDP2 / DDP the full state, gathered; rank 0 writes) plus
every rank's loader position; `load_checkpoint` hands it back through `Trainer.load_state_dict`.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from qwen2.files import fsync_dir, fsync_tree, umask_permissions

PREFIX = "step_"
MANIFEST = "manifest.json"
# TrainConfig (and recipe) fields that change what is logged, evaluated or kept, or where, not a training
# step: resuming with other values of these is not a change of hyper-parameters.
BOOKKEEPING = ("log_every", "eval_every", "ckpt_every", "keep_last", "eval_batches", "out")


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
    umask_permissions(folder / f"{name}.safetensors")  # save_file creates it 0600
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


def _say(line: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(line, file=sys.stderr, flush=True)


def _on_rank0(fn):
    """fn() run by rank 0 alone (one process reads and hashes the files), its result or its exception
    on every rank. Collective under torchrun; a plain call otherwise."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return fn()
    out = [None]
    if dist.get_rank() == 0:
        try:
            out = [(True, fn())]
        except Exception as e:
            out = [(False, e)]
    dist.broadcast_object_list(out, src=0)
    ok, value = out[0]
    if not ok:
        raise value
    return value


def latest_checkpoint(run_dir) -> Path | None:
    """The newest checkpoint that verifies (verify_checkpoint); each broken newer one is named in one
    line on stderr. None when there is none; CheckpointError when there are some and none verifies.
    Collective under torchrun (rank 0 verifies): every rank calls it."""
    return _on_rank0(lambda: _newest_verified(run_dir))


def _newest_verified(run_dir) -> Path | None:
    from qwen2.checkpoint import CheckpointError

    found = list_checkpoints(run_dir)
    for i in range(len(found) - 1, -1, -1):
        ckpt, why = found[i], _verify_cached(found[i])
        if why is None:
            if not (ckpt / MANIFEST).is_file():
                _say(
                    f"warning: {ckpt}: no {MANIFEST} (saved before checkpoints had one): resuming unverified"
                )
            return ckpt
        nxt = f"falling back to {found[i - 1].name}" if i else "no earlier checkpoint to fall back to"
        _say(f"checkpoint {ckpt.name} is broken: {why}; {nxt}")
    if found:
        raise CheckpointError(
            f"{checkpoint_root(run_dir)}: none of its {len(found)} checkpoint(s) verifies (see above); "
            "move them away or start over (--no-resume)"
        )
    return None


# ---- manifest -------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(folder: Path) -> None:
    """manifest.json: every file under `folder` (relative path, size, sha256). Written last, so a
    checkpoint's manifest describes exactly what was saved."""
    files = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name != MANIFEST:
            files[f.relative_to(folder).as_posix()] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    (folder / MANIFEST).write_text(json.dumps({"version": 1, "files": files}, indent=1) + "\n")


def verify_checkpoint(path: str | os.PathLike) -> str | None:
    """Why the checkpoint at `path` is broken (one line naming the file), or None when every file its
    manifest lists is there with its size and sha256. No manifest: None if trainer.json exists (a
    checkpoint saved before manifests; accepted), else broken (incomplete)."""
    path = Path(path)
    manifest = path / MANIFEST
    if not manifest.is_file():
        return None if (path / "trainer.json").is_file() else f"{path}: no {MANIFEST} and no trainer.json"
    try:
        files = json.loads(manifest.read_bytes().decode("utf-8"))["files"]
        if not isinstance(files, dict) or not all(
            isinstance(r, dict) and isinstance(r.get("size"), int) and isinstance(r.get("sha256"), str)
            for r in files.values()
        ):
            raise ValueError("'files' must map paths to {size, sha256}")
    except (ValueError, KeyError, TypeError) as e:
        return f"{manifest}: unreadable ({type(e).__name__}: {e})"
    for rel in ("trainer.json", "optimizer.safetensors", "ranks.safetensors"):
        if rel not in files:
            return f"{manifest}: does not list {rel}"
    for rel, rec in files.items():  # sizes first: a truncated file is found without hashing the rest
        f = path / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            return f"{manifest}: lists {rel!r}, outside the checkpoint"
        if not f.is_file():
            return f"{f}: missing (listed in {MANIFEST})"
        if f.stat().st_size != rec["size"]:
            return f"{f}: {f.stat().st_size} bytes, {MANIFEST} says {rec['size']} (truncated or rewritten)"
    for rel, rec in files.items():
        if _sha256(path / rel) != rec["sha256"]:
            return f"{path / rel}: contents differ from {MANIFEST}'s sha256 (corrupted)"
    return None


_VERIFIED: dict[str, tuple] = {}  # checkpoint -> its files' (path, size, mtime) when last verified


def _stamp(path: Path) -> tuple:
    files = [f for f in sorted(path.rglob("*")) if f.is_file()]
    return tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)


def _verify_cached(path: Path) -> str | None:
    """verify_checkpoint, once per unchanged checkpoint (latest_checkpoint then load_checkpoint hash the
    files once, not twice)."""
    key, stamp = str(Path(path).resolve()), _stamp(Path(path))
    if _VERIFIED.get(key) == stamp:
        return None
    why = verify_checkpoint(path)
    if why is None:
        _VERIFIED[key] = stamp
    return why


def _sweep(root: Path) -> None:
    """Remove what a killed save or cleanup left behind (`.tmp-*`, `.trash-*`)."""
    for p in root.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".trash-*"):
        shutil.rmtree(p, ignore_errors=True)


# ---- save / load ----------------------------------------------------------------------------------
# trainer.json: the Trainer's state_dict without its tensors and per-rank parts.
INFO_KEYS = ("step", "stage", "stage_start", "tokens", "world_size", "meta")


def _model_config(trainer) -> dict | None:
    """The trained model's config as JSON values (None for a model without a ModelConfig)."""
    config = getattr(trainer.model, "config", None)
    if not hasattr(config, "to_dict"):
        return None
    return json.loads(json.dumps(config.to_dict(), default=str))


def _train_config(trainer) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(trainer.cfg), default=str))


def save_checkpoint(trainer, loader) -> Path | None:
    """Write the trainer's complete state (Trainer.state_dict) and every rank's loader position at the
    current step, manifest.json last. Collective under torchrun; rank 0 writes. A failed save (OSError,
    e.g. a full disk) removes its temporary folder and raises one line on every rank; the checkpoints
    already there are left as they were."""
    from qwen2.checkpoint import save_model
    from qwen2.train.parallel import model_from_state

    state = trainer.state_dict()
    per_rank = {"rng": state["rng"], "loader": loader.state_dict()}
    if trainer.world > 1:
        gathered = [None] * trainer.world
        dist.all_gather_object(gathered, per_rank)
    else:
        gathered = [per_rank]
    final, failure = None, None
    if trainer.is_main:
        root = checkpoint_root(trainer.run_dir)
        root.mkdir(parents=True, exist_ok=True)
        _sweep(root)
        name = f"{PREFIX}{trainer.step:07d}"
        final = root / name
        tmp = root / f".tmp-{name}-{os.getpid()}"
        tmp.mkdir()
        info = {k: state[k] for k in INFO_KEYS}
        info.update(train_config=_train_config(trainer), model_config=_model_config(trainer))
        try:
            # The HF export: a meta-device model takes the gathered full tensors (no copy), then save_model.
            save_model(model_from_state(trainer.model, state["model"]), tmp / "model")
            _write_state(state["optimizer"], tmp, "optimizer")
            _write_state(gathered, tmp, "ranks")
            (tmp / "trainer.json").write_text(json.dumps(info, indent=2))
            _write_manifest(tmp)
            fsync_tree(tmp)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            previous = list_checkpoints(trainer.run_dir)
            kept = f"{previous[-1].name} is intact" if previous else "there is no earlier checkpoint"
            what = "no space left on device" if e.errno == errno.ENOSPC else f"{type(e).__name__}: {e}"
            failure = (
                e.errno,
                f"{root}: saving {name} failed ({what}); its partial folder was removed and {kept}; "
                + (
                    "free disk space (or lower keep_last) and resume" if e.errno == errno.ENOSPC else "resume"
                ),
            )
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if failure is None:
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
    if trainer.world > 1:  # also the barrier: the other ranks wait here until rank 0 has written
        status = [failure]
        dist.broadcast_object_list(status, src=0)
        failure = status[0]
    if failure is not None:
        raise OSError(*failure) if failure[0] is not None else OSError(failure[1])
    return final


def read_trainer_info(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / "trainer.json").read_text())


def load_model_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def _differences(old: dict, new: dict, skip=()) -> list[tuple[str, object, object]]:
    """(field, old, new) for every field both dicts have with different values."""
    return [(k, old[k], new[k]) for k in old if k in new and k not in skip and old[k] != new[k]]


def _describe(diffs) -> str:
    return ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in diffs)


def load_checkpoint(trainer, loader, ckpt: str | os.PathLike, allow_changed: bool = False) -> dict:
    """Restore model, optimizer, step, stage, RNG (Trainer.load_state_dict) and the loader position
    from `ckpt`, after verifying it (its manifest) and that it is this run's: a different model config
    is a ValueError naming the fields; so are TrainConfig fields that differ from those the checkpoint's
    stage was saved with (a stage switch is not a change), unless `allow_changed`: then each change is
    appended to trainer.meta["changed"] ({step, stage, field, old, new}) and named in one line.
    Returns the checkpoint's trainer.json. Nothing of the trainer changes when it raises. Collective
    under torchrun (rank 0 verifies the files)."""
    from qwen2.checkpoint import CheckpointError

    ckpt = Path(ckpt)
    try:
        info = read_trainer_info(ckpt)
    except (OSError, ValueError):
        info = None  # verify_checkpoint says what is wrong with it
    if info is not None and info["world_size"] != trainer.world:  # before any other file is read
        raise ValueError(
            f"{ckpt}: saved with world_size {info['world_size']}, resumed with {trainer.world}; "
            f"resume with the same number of processes (the loader position is per rank)"
        )
    why = _on_rank0(lambda: _verify_cached(ckpt))
    if why is None and info is None:
        why = f"{ckpt / 'trainer.json'}: unreadable"
    if why is not None:
        raise CheckpointError(f"checkpoint {ckpt.name} is broken: {why}; resume from an earlier one")
    model_now, model_then = _model_config(trainer), info.get("model_config")
    if model_now is not None and model_then is not None:
        if diffs := _differences(model_then, model_now):
            raise ValueError(
                f"{ckpt}: saved for another model ({_describe(diffs)}); resume with the model it was "
                "saved with, or start a new run (--no-resume or another output folder)"
            )
    changes = []
    if info.get("train_config") is not None and info["stage"] == trainer.stage:
        changes = _differences(info["train_config"], _train_config(trainer), skip=BOOKKEEPING)
        if changes and not allow_changed:
            raise ValueError(
                f"{ckpt}: stage {trainer.stage!r} was saved with other settings ({_describe(changes)}); "
                "resume with the same ones, or pass --allow-changed to continue with the new ones "
                "(recorded in trainer.json's meta.changed)"
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
    if changes:
        cfg = trainer.cfg
        if {"beta1", "beta2", "eps", "weight_decay"} & {k for k, _, _ in changes}:
            for group in trainer.optimizer.param_groups:  # the loaded groups hold the saved values
                group.update(betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
                if group.get("name") == "decay":
                    group["weight_decay"] = cfg.weight_decay
        trainer.meta.setdefault("changed", []).extend(
            {"step": trainer.step, "stage": trainer.stage, "field": k, "old": a, "new": b}
            for k, a, b in changes
        )
        _say(f"resuming {ckpt.name} (stage {trainer.stage!r}) with changed settings: {_describe(changes)}")
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
