"""Checkpoints: atomic writes, keep-last-N, safe loading.

A checkpoint holds everything a run needs to continue as if it never stopped: both encoders,
both queues and their pointer (a resumed run must not restart with random negatives), the
optimizer and grad scaler, step/epoch/position in the epoch, RNG states and the config.
"""
from __future__ import annotations

import glob
import os
import random
import re

import numpy as np
import torch

FORMAT_VERSION = 1
_NAME = re.compile(r"ckpt_(\d{9})\.pt$")


class CheckpointError(RuntimeError):
    pass


def checkpoint_dir(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]) + [random.getstate()[2] if random.getstate()[2] is not None else -1],
        "python_version": random.getstate()[0],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((state["python_version"], tuple(py[:-1]), None if py[-1] == -1 else py[-1]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj, path: str) -> None:
    """Write to a temp file in the same folder, fsync, rename: a crash never leaves half a file."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def list_checkpoints(out_dir: str) -> list[str]:
    paths = [p for p in glob.glob(os.path.join(checkpoint_dir(out_dir), "ckpt_*.pt")) if _NAME.search(p)]
    return sorted(paths, key=lambda p: int(_NAME.search(p).group(1)))


def save_checkpoint(state: dict, out_dir: str, step: int, keep_last: int) -> str:
    path = os.path.join(checkpoint_dir(out_dir), f"ckpt_{step:09d}.pt")
    atomic_save({"format_version": FORMAT_VERSION, **state}, path)
    for old in list_checkpoints(out_dir)[:-keep_last]:
        os.remove(old)
    return path


def resolve_resume(resume: str, out_dir: str) -> str | None:
    """'' -> None; 'auto' -> latest checkpoint in out_dir (or None); else the path, which must exist."""
    if not resume:
        return None
    if resume == "auto":
        ckpts = list_checkpoints(out_dir)
        return ckpts[-1] if ckpts else None
    if not os.path.isfile(resume):
        raise CheckpointError(f"--resume {resume}: no such checkpoint file")
    return resume


def load_checkpoint(path: str) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a densecl_fast checkpoint (no 'model' entry)")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {ckpt.get('format_version')}, "
                              f"this version reads format {FORMAT_VERSION}")
    return ckpt
