"""Checkpoint files: names, checksums, atomic writes, keep-last-N, the writing of a file checkpoint.

Integrity: every checkpoint stores a SHA-256 over all its tensors' bytes (and the other values),
verified on load (reading.py), so a file damaged after it was written is refused instead of silently
loaded. Names (one format per engine family, named by the suffix): `ckpt_<step>.pt`, one file
(single, ddp); `ckpt_<step>.dcp/` (fsdp) and `ckpt_<step>.ds/` (deepspeed), folders that hold
`meta.pt` beside the engine's own files. Every write goes to a temp name first and is renamed into
place; temps of killed writes are removed when the run directory is taken (run_dir.py).
"""
from __future__ import annotations

import errno
import glob
import hashlib
import os
import re
import shutil

import torch

FORMAT_VERSION = 2
_NAME = re.compile(r"ckpt_(\d{9})\.(pt|dcp|ds)$")
_TEMP_GLOB = ".ckpt_*.tmp*"
META_NAME = "meta.pt"


class CheckpointError(RuntimeError):
    pass


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, I/O error); the earlier ones are intact."""


def checkpoint_dir(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def _digest(obj, h) -> None:
    """Feed a checkpoint's content into `h`: tensors by dtype, shape and raw bytes; containers in
    order (pickle keeps dict order); other leaves (ints, floats, strings, None) by repr."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(b"D%d" % len(obj))
        for k, v in obj.items():
            h.update(repr(k).encode("utf-8", "surrogateescape") + b"=")
            _digest(v, h)
    elif isinstance(obj, (list, tuple)):
        h.update(b"L%d" % len(obj))
        for v in obj:
            _digest(v, h)
    else:
        h.update(b"V" + repr(obj).encode("utf-8", "surrogateescape") + b";")


def checksum(state: dict) -> str:
    """SHA-256 (hex) of a checkpoint's content, without its own 'checksum' entry."""
    h = hashlib.sha256()
    _digest({k: v for k, v in state.items() if k != "checksum"}, h)
    return h.hexdigest()


def atomic_save(obj, path: str, dump=None) -> None:
    """Write to a temp file in the same folder, fsync, rename: a crash never leaves half a file.
    `dump(obj, file)` serialises (default torch.save, looked up at call time)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            (dump or torch.save)(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(d)
    finally:
        try:
            if os.path.exists(tmp):
                os.remove(tmp)
        except OSError:
            pass  # removed at the next start (remove_stale_temps)


def list_checkpoints(out_dir: str) -> list[str]:
    """Every checkpoint of the run, of any engine's format, oldest first."""
    paths = [p for p in glob.glob(os.path.join(checkpoint_dir(out_dir), "ckpt_*")) if _NAME.search(p)]
    return sorted(paths, key=lambda p: int(_NAME.search(p).group(1)))


def checkpoint_step(path: str) -> int:
    """The step in the name of a checkpoint `list_checkpoints` lists (any format)."""
    return int(_NAME.search(os.path.normpath(path)).group(1))


def checkpoint_kind(path: str) -> str:
    """'pt' | 'dcp' | 'ds' by the name (a file given by the user with another name: 'pt')."""
    m = _NAME.search(os.path.normpath(path))
    return m.group(2) if m else ("pt" if not os.path.isdir(path) else "unknown")


def remove_path(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def prune(out_dir: str, keep_last: int, keep: str) -> None:
    """Keep the newest `keep_last` checkpoints (never `keep`, the one just written)."""
    for old in list_checkpoints(out_dir)[:-keep_last]:
        if os.path.realpath(old) != os.path.realpath(keep):
            remove_path(old)


def fsync_dir(d: str) -> None:
    dfd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def temp_dir_for(out_dir: str, step: int, kind: str) -> str:
    """Where a folder checkpoint is written before its rename (removed at the next start if killed)."""
    return os.path.join(checkpoint_dir(out_dir), f".ckpt_{step:09d}.{kind}.tmp")


def final_dir_for(out_dir: str, step: int, kind: str) -> str:
    return os.path.join(checkpoint_dir(out_dir), f"ckpt_{step:09d}.{kind}")


def write_meta(folder: str, extra: dict) -> None:
    """meta.pt of a folder checkpoint: the file format's non-tensor-state entries, checksummed."""
    meta = {"format_version": FORMAT_VERSION, **extra}
    meta["checksum"] = checksum(meta)
    atomic_save(meta, os.path.join(folder, META_NAME))


def commit_dir(tmp: str, final: str) -> None:
    """Rename a completely written folder checkpoint into place (rank 0, after every rank wrote)."""
    if os.path.exists(final):
        remove_path(final)
    os.replace(tmp, final)
    fsync_dir(os.path.dirname(final))


def remove_stale_temps(out_dir: str) -> list[str]:
    """Delete temp files left by checkpoint writes that were killed (call with the run lock held)."""
    removed = []
    for p in glob.glob(os.path.join(checkpoint_dir(out_dir), _TEMP_GLOB)):
        try:
            remove_path(p)
        except OSError:
            continue
        if not os.path.lexists(p):
            removed.append(p)
    return removed


def io_error_text(e: BaseException) -> str:
    if isinstance(e, OSError):
        name = errno.errorcode.get(e.errno, "")
        why = e.strerror or str(e) or type(e).__name__
        return f"{why} ({name}; is the disk full?)" if e.errno == errno.ENOSPC else (f"{why} ({name})" if name else why)
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def refusal_detail(msg: str) -> str:
    """What PyTorch's weights-only unpickler objected to, without its advice to load the file
    unsafely (never to be given for a file we refuse)."""
    keep = []
    for line in msg.splitlines():
        line = line.split("Please ", 1)[0].strip()
        line = re.sub(r"^.*WeightsUnpickler error:\s*", "", line)
        if line and not re.search(r"weights.only|Weights only|Check the documentation", line, re.I):
            keep.append(line.rstrip("."))
    return "; ".join(keep) or "it holds objects other than tensors and plain containers"


def first_line(e: BaseException, with_type: bool = False) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text}" if with_type else text


def save_checkpoint(state: dict, out_dir: str, step: int, keep_last: int) -> str:
    """Write ckpt_<step>.pt atomically, then keep the newest `keep_last`. A failed write raises
    CheckpointWriteError naming the last good checkpoint; the earlier ones are left intact."""
    path = os.path.join(checkpoint_dir(out_dir), f"ckpt_{step:09d}.pt")
    full = {"format_version": FORMAT_VERSION, **state}
    full["checksum"] = checksum(full)
    try:
        atomic_save(full, path)
    except (OSError, RuntimeError) as e:  # torch.save may wrap a failed write in a RuntimeError
        good = [p for p in list_checkpoints(out_dir) if p != path]
        raise CheckpointWriteError(
            f"cannot write checkpoint {path}: {io_error_text(e)}. The last good checkpoint is "
            f"{good[-1] if good else 'none (no checkpoint was written yet)'}; free some space and "
            f"continue with --resume auto") from e
    prune(out_dir, keep_last, path)
    return path
