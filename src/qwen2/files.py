"""Writing files so that a crash never leaves a half-written one: the one way this package saves.

Every output (config.json, safetensors shards, tokenizer files, data shards, training checkpoints,
reports) is written under a temporary name beside its target, fsynced, then renamed over it, and the
folder is fsynced so the rename itself survives a power cut. Readers see the old file or the whole
new one (DESIGN.md, conventions). Every file renamed into place gets at least the permissions the
umask gives a new file (0644 under umask 022), like the JSON beside it: writers that create their file
private (safetensors' save_file, mkstemp: 0600) would otherwise leave weights unreadable to the group
that can read the config. Imports nothing of ours.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` for the caller to write; on a clean exit fsync it, rename it
    to `path` and fsync the folder; on an exception delete it and leave `path` as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")  # created by the caller: umask applies
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb"):
    """open() for writing through `atomic_path` (text modes are UTF-8)."""
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
        yield f


def _umask() -> int:
    """The process umask, read without changing it where Linux reports it (os.umask can only swap)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_permissions(path: str | os.PathLike) -> None:
    """Widen `path`'s mode to what open() gives a new file under the umask (0o666 & ~umask); bits it
    already has are kept (a compiled library stays executable), none are removed."""
    want = 0o666 & ~_umask()
    mode = os.stat(path).st_mode & 0o7777
    if mode & want != want:
        os.chmod(path, mode | want)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file and folder under `folder` (before a training checkpoint folder is renamed)."""
    for root, _dirs, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path` to fill; on success it is fsynced and renamed to `path`
    (which must be absent or an empty folder), on any error removed: a checkpoint folder appears whole
    or not at all."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{path}: exists and is not empty; choose a new output directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if path.exists():
            path.rmdir()
        tmp.rename(path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json_object(path: str | os.PathLike) -> dict:
    """A JSON file a user handed in (config.json, generation_config.json) that must hold an object;
    ValueError naming the file otherwise."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); save it as UTF-8 JSON"
        ) from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d
