"""The run directory's life: one run per directory (a lock), the resume point, and its checks.

    resume_path, meta = read_resume_point(cfg, engine)    # before any data or model
    with lock_run_dir(out_dir, resume_path, dist_info, device, say):
        ...                                               # the run; resume(...) calls check_resume_point

A run directory belongs to one run: `prepare_run_dir` takes a lock file (`<out_dir>/.lock`, an
flock released when the process dies), removes temp files of killed checkpoint writes, and refuses
a fresh run into a directory that already holds checkpoints. The resume point (train.resume) is
checked against the config and engine before anything is built: its format, structure and
checksum, the tensor-shaping config keys, and later its position against this run's epochs.
"""
from __future__ import annotations

import errno
import os
import re
import socket
from contextlib import contextmanager
from typing import TYPE_CHECKING

from .checkpoint import (CheckpointError, check_kind, checkpoint_dir, list_checkpoints, read_checkpoint_meta,
                         remove_stale_temps, saved_config)
from .config import Config, ConfigError
from .distributed import DistInfo, all_reduce_max

if TYPE_CHECKING:
    from .engines import Engine

LOCK_NAME = ".lock"


class RunLock:
    """`<out_dir>/.lock`: an exclusive flock for as long as a run uses the directory. The kernel
    drops it when the last descriptor of its open file closes. A forked child (a DataLoader worker)
    would share the descriptor, and with it the lock, and can outlive a killed run by seconds: so
    every forked child closes its copy (`_close_in_child`), and exec'd ones never get it (Python's
    descriptors are close-on-exec). The lock then dies with its owner."""

    # A lock whose recorded owner is dead can only be held by processes it left behind: wait this
    # long for them to go before naming them.
    dead_owner_wait_s = 10.0

    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, LOCK_NAME)
        self.fd = None

    def acquire(self) -> "RunLock":
        import fcntl
        import time
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        deadline = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                busy = e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)
                holder = _read_holder(fd)
                dead = busy and _owner_is_dead(holder)
                if dead and deadline is None:
                    deadline = time.monotonic() + self.dead_owner_wait_s
                if dead and time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                os.close(fd)
                raise self._refusal(e, busy, holder, dead) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        _held_locks.add(self)
        return self

    def _refusal(self, e: OSError, busy: bool, holder: str, dead: bool) -> ConfigError:
        where = f"train.out_dir={os.path.dirname(self.path)}"
        if not busy:
            return ConfigError(f"{where}: cannot lock {self.path}: {e.strerror or e}")
        if dead:
            others = _processes_holding(self.path)
            return ConfigError(
                f"{where}: the run that locked it (pid {holder}) has ended, but "
                + (f"process(es) {', '.join(map(str, others))} it left behind still hold {self.path}; end them "
                   f"(kill {' '.join(map(str, others))}) and start again" if others else
                   f"{self.path} is still locked after {self.dead_owner_wait_s:g} s; end what that run left "
                   f"running and start again"))
        return ConfigError(f"{where} is in use by another run (pid {holder}; lock file {self.path}); wait for "
                           f"it to end or choose another train.out_dir")

    def __enter__(self) -> "RunLock":
        return self if self.fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        _held_locks.discard(self)
        if self.fd is not None:
            import fcntl
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None


_held_locks: set = set()


def _close_in_child() -> None:
    # Closes the child's copy only: flock(LOCK_UN) here would drop the parent's lock as well
    # (both descriptors are one open file).
    for lock in list(_held_locks):
        if lock.fd is not None:
            try:
                os.close(lock.fd)
            except OSError:
                pass
            lock.fd = None
    _held_locks.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
    except OSError:
        return "unknown"


def _owner_is_dead(holder: str) -> bool:
    """Whether the lock file names a process of this machine that no longer exists."""
    m = re.fullmatch(r"(\d+) on (\S+)", holder)
    if not m or m.group(2) != socket.gethostname():
        return False
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, another user's
        return False
    return False


def _processes_holding(path: str) -> list[int]:
    """Pids of this machine's processes with `path` open (Linux /proc; best effort)."""
    try:
        target = os.stat(path)
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []
    found = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                found.append(pid)
                break
    return sorted(found)


def prepare_run_dir(out_dir: str, resume_path: str | None) -> tuple[RunLock, list[str]]:
    """Before any data or model is built: make sure `out_dir` is a usable directory, lock it,
    remove temp files of killed checkpoint writes, and refuse to mix runs. Returns (lock, removed)."""
    key = f"train.out_dir={out_dir}"
    if not str(out_dir).strip():
        raise ConfigError("train.out_dir is empty: give the run directory")
    try:
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise ConfigError(f"{key} is an existing file, not a directory; choose another train.out_dir")
        os.makedirs(checkpoint_dir(out_dir), exist_ok=True)
        probe = os.path.join(checkpoint_dir(out_dir), f".write-test-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except ConfigError:
        raise
    except OSError as e:
        what = {errno.ENOTDIR: "a part of the path is a file, not a directory",
                errno.EEXIST: "a part of the path is a file, not a directory",
                errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on the device"}.get(
            e.errno, e.strerror or str(e))
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        raise ConfigError(f"{key} cannot be used as the run directory: {what}{where}") from None
    lock = RunLock(out_dir).acquire()
    try:
        removed = remove_stale_temps(out_dir)
        existing = list_checkpoints(out_dir)
        if existing:
            if resume_path is None:
                raise ConfigError(
                    f"{key} already holds the checkpoints of another run (latest {os.path.basename(existing[-1])}); "
                    f"continue that run with --resume auto, or start this one in another train.out_dir")
            latest = os.path.realpath(existing[-1])
            if os.path.realpath(resume_path) != latest:
                inside = os.path.dirname(os.path.realpath(resume_path)) == os.path.realpath(checkpoint_dir(out_dir))
                raise ConfigError(
                    f"--resume {resume_path}: {key} already holds "
                    + (f"newer checkpoints of this run (latest {os.path.basename(existing[-1])}); resuming an "
                       f"older one would mix two histories: move the newer ones away first"
                       if inside else
                       f"the checkpoints of another run (latest {os.path.basename(existing[-1])}); resume into "
                       f"a new train.out_dir, or use --resume auto to continue that run"))
    except BaseException:
        lock.release()
        raise
    return lock, removed


def resolve_resume(resume: str, out_dir: str) -> str | None:
    """'' -> None; 'auto' -> latest checkpoint in out_dir (or None); else the path, which must exist."""
    if not resume:
        return None
    if resume == "auto":
        ckpts = list_checkpoints(out_dir)
        return ckpts[-1] if ckpts else None
    if not os.path.exists(resume):
        raise CheckpointError(f"--resume {resume}: no such checkpoint file")
    return resume


def read_resume_point(cfg: Config, engine: Engine) -> tuple[str | None, dict | None]:
    """The checkpoint train.resume names (None: a new run) and its metadata, checked against this
    config and engine; nothing of it is loaded yet (that waits for the model)."""
    t_cfg = cfg.train
    resume_path = resolve_resume(t_cfg.resume, t_cfg.out_dir)
    if not resume_path:
        return None, None
    check_kind(resume_path, engine.ckpt_kind, f"train.engine={engine.name}")
    meta = read_checkpoint_meta(resume_path)  # structure and checksum
    check_compatible(saved_config(meta, resume_path), cfg, resume_path)
    engine.check_resume(resume_path, meta)
    return resume_path, meta


def check_compatible(saved: Config, cfg: Config, path: str) -> None:
    """The parts of the config that shape tensors must match; the rest may change on resume."""
    keys = ["arch", "hid_dim", "out_dim", "queue_len"]
    diff = [f"model.{k}: checkpoint {getattr(saved.model, k)} vs now {getattr(cfg.model, k)}"
            for k in keys if getattr(saved.model, k) != getattr(cfg.model, k)]
    if diff:
        raise CheckpointError(f"checkpoint {path} is incompatible with this config: " + "; ".join(diff))


@contextmanager
def lock_run_dir(out_dir: str, resume_path: str | None, dist_info: DistInfo, device, say):
    """Rank 0 checks train.out_dir (one run per directory) and holds its lock until the with-block
    ends. Every rank raises if rank 0 could not, so none goes on alone."""
    problem, lock = None, None
    if dist_info.is_main:
        try:
            lock, removed = prepare_run_dir(out_dir, resume_path)
            if removed:
                say(f"removed {len(removed)} temp file(s) of interrupted checkpoint writes in "
                    f"{checkpoint_dir(out_dir)}")
        except (ConfigError, CheckpointError) as e:
            problem = e
    try:
        if dist_info.enabled and all_reduce_max(problem is not None, device) and problem is None:
            problem = ConfigError(f"train.out_dir={out_dir}: rank 0 cannot use the run directory (see its error)")
        if problem is not None:
            raise problem
        yield
    finally:
        if lock is not None:
            lock.release()


def check_resume_point(meta: dict, path: str, steps_per_epoch: int, total_steps: int, num_samples,
                       world_size: int, batch_size: int, warn) -> None:
    """A checkpoint's step means (epoch, step in epoch) only for the steps per epoch it was written
    with: a different count (data set size, global batch) is an error, not a silent reinterpretation."""
    step = meta["step"]
    saved_spe = meta.get("steps_per_epoch")
    if saved_spe is None and meta.get("epoch"):  # written before steps_per_epoch was stored
        saved_spe = (step - meta.get("step_in_epoch", 0)) // meta["epoch"]
    if saved_spe is not None and saved_spe != steps_per_epoch:
        raise CheckpointError(
            f"checkpoint {path} was written with {saved_spe} steps per epoch (at epoch {step // saved_spe}, "
            f"step {step % saved_spe} of {saved_spe}); this data set and optim.batch_size={batch_size} give "
            f"{steps_per_epoch}, so its position cannot be continued. Resume with the same data set and batch, "
            f"or start a new run in another train.out_dir")
    if step > total_steps:
        raise CheckpointError(
            f"checkpoint {path} is at step {step}, past the end of this run ({total_steps} steps); "
            f"raise optim.epochs, or start a new run in another train.out_dir")
    saved_n = meta.get("num_samples")
    if saved_n is not None and num_samples is not None and saved_n != num_samples:
        warn(f"checkpoint {path} was written with {saved_n} images, the data set now has {num_samples}: same "
             f"steps per epoch, but the order of the rest of the epoch differs from the interrupted run")
    saved_world = meta.get("world_size", len(meta["shuffle_rng"]))
    if saved_world != world_size:
        warn(f"checkpoint {path} was written by {saved_world} process(es), resuming on {world_size}: the "
             f"data shards and key-shuffle streams differ, so the run continues correctly but does not "
             f"reproduce the uninterrupted one")
