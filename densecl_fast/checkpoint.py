"""Checkpoints: atomic writes, keep-last-N, safe loading.

A checkpoint holds everything a run needs to continue as if it never stopped: both encoders,
both queues and their pointer (a resumed run must not restart with random negatives), the
optimizer and grad scaler, step/epoch/position in the epoch, RNG states and the config.

Integrity: every checkpoint stores a SHA-256 over all its tensors' bytes (and the other values),
verified on load, so a file damaged after it was written is refused instead of silently loaded.
Formats (one per engine family, named by the suffix): `ckpt_<step>.pt`, one file (single, ddp);
`ckpt_<step>.dcp/`, a torch.distributed.checkpoint folder (fsdp); `ckpt_<step>.ds/`, a DeepSpeed
checkpoint folder (deepspeed). A folder holds `meta.pt`: the same step/RNG/config entries as a file
checkpoint, checksummed, so the trainer reads any checkpoint's position before building a model.
A .dcp folder is checked whenever it is read (`read_checkpoint_meta`): its pickled `.metadata`
through an allow-list (nothing in it runs), and every shard file it names present and complete.

A run directory belongs to one run: `prepare_run_dir` takes a lock file (`<out_dir>/.lock`, an
flock released when the process dies), removes temp files of killed writes, and refuses a fresh
run into a directory that already holds checkpoints.
"""
from __future__ import annotations

import errno
import functools
import glob
import hashlib
import os
import pickle
import random
import re
import shutil
import socket
import warnings

import numpy as np
import torch

from . import safe_pickle
from .config import ConfigError

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)  # 1: before checksums (loaded without verification)
REQUIRED_KEYS = ("model", "optimizer", "scaler", "step", "rng", "shuffle_rng", "config")
META_REQUIRED_KEYS = ("step", "rng", "shuffle_rng", "config")
_NAME = re.compile(r"ckpt_(\d{9})\.(pt|dcp|ds)$")
KINDS = {"pt": "train.engine=single or ddp", "dcp": "train.engine=fsdp", "ds": "train.engine=deepspeed"}
_TEMP_GLOB = ".ckpt_*.tmp*"
META_NAME = "meta.pt"
DS_CLIENT_KEY = "densecl_outside_engine"  # DeepSpeed client state: the DenseCL tensors outside its engine
DS_MODEL_FILE = "mp_rank_00_model_states.pt"
LOCK_NAME = ".lock"


class CheckpointError(RuntimeError):
    pass


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, I/O error); the earlier ones are intact."""


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
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
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


def check_kind(path: str, kind: str, engine: str) -> None:
    """A checkpoint of another engine's format is a one-line error naming the engine that reads it."""
    found = checkpoint_kind(path)
    if found != kind:
        hint = f"resume with {KINDS[found]}" if found in KINDS else "not a checkpoint written by densecl_fast"
        raise CheckpointError(f"checkpoint {path} was written in the {found!r} format, which {engine} does not "
                              f"read ({KINDS.get(kind, kind)} writes {kind!r}); {hint}, or start a new run in "
                              f"another train.out_dir")


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


# ---- torch.distributed.checkpoint folders (fsdp): read without running code ---------------------
# DCP pickles its `.metadata`, and its own loader unpickles it (and the non-tensor values of the
# state, e.g. the optimizer's lr) with plain pickle: a doctored folder would run code. We read the
# metadata through an allow-list of DCP's own data classes and hand DCP that object; non-tensor
# values are checked with torch.load(weights_only=True) before DCP reads them.
DCP_METADATA = ".metadata"
_DCP_MD = "torch.distributed.checkpoint.metadata"
_DCP_GLOBALS = frozenset(
    {(_DCP_MD, n) for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                           "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")}
    | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
       ("torch.serialization", "_get_layout"),  # looks a layout up by name in a dict of torch.layout objects
       ("collections", "OrderedDict"),
       ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib._local", "PosixPath")})  # checkpoint_id


def _dcp_global_allowed(module: str, name: str) -> bool:
    # torch.__dict__, not getattr: torch's module __getattr__ would import submodules by name
    return (module, name) in _DCP_GLOBALS or (module == "torch" and isinstance(torch.__dict__.get(name), torch.dtype))


def read_dcp_metadata(path: str):
    """The DCP Metadata of the folder `path`, unpickled through the allow-list, after checking that
    every shard file it names is in the folder with at least the bytes it points into.
    Every problem is a one-line CheckpointError naming the folder and the file."""
    from torch.distributed.checkpoint.metadata import Metadata
    md_path = os.path.join(path, DCP_METADATA)
    try:
        with open(md_path, "rb") as f:
            md = safe_pickle.load(f, _dcp_global_allowed, "torch.distributed.checkpoint metadata classes")
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete: it has no {DCP_METADATA} (the write was "
                              f"interrupted, or it is not a torch.distributed.checkpoint folder)") from None
    except safe_pickle.RefusedGlobal as e:
        raise CheckpointError(f"refusing checkpoint {path}: its {DCP_METADATA} holds objects that could run code "
                              f"when loaded ({e})") from None
    except Exception as e:
        raise CheckpointError(f"cannot read {md_path}: {io_error_text(e)} (truncated, or not "
                              f"torch.distributed.checkpoint metadata)") from None
    if not (isinstance(md, Metadata) and isinstance(getattr(md, "state_dict_metadata", None), dict)
            and isinstance(getattr(md, "storage_data", None), dict)):
        raise CheckpointError(f"{md_path} is not torch.distributed.checkpoint metadata")
    need: dict = {}  # shard file -> bytes the metadata reads from it
    for info in md.storage_data.values():
        rel, off, length = (getattr(info, a, None) for a in ("relative_path", "offset", "length"))
        if not (isinstance(rel, str) and rel == os.path.basename(rel) and rel not in ("", ".", "..")
                and isinstance(off, int) and isinstance(length, int) and off >= 0 and length >= 0):
            raise CheckpointError(f"checkpoint {path} is malformed: its {DCP_METADATA} names the shard {rel!r} "
                                  f"(bytes {off!r}+{length!r}), not a file in the folder")
        need[rel] = max(need.get(rel, 0), off + length)
    for rel in sorted(need):
        try:
            size = os.path.getsize(os.path.join(path, rel))
        except OSError as e:
            what = "is missing" if isinstance(e, FileNotFoundError) else f"cannot be read ({io_error_text(e)})"
            raise CheckpointError(f"checkpoint {path} is incomplete: its shard {rel} {what} (a rank's write was "
                                  f"lost, or the folder was copied in part); move the folder away: --resume "
                                  f"auto then continues from the previous checkpoint") from None
        if size < need[rel]:
            state = "is empty" if size == 0 else f"is truncated ({size} of at least {need[rel]} bytes)"
            raise CheckpointError(f"checkpoint {path} is damaged: its shard {rel} {state}; move the folder "
                                  f"away: --resume auto then continues from the previous checkpoint")
    return md


def dcp_loader(path: str, metadata) -> tuple:
    """(storage_reader, planner) for torch.distributed.checkpoint.load of the folder `path` whose
    metadata `read_dcp_metadata` returned: nothing in the folder is unpickled by plain pickle."""
    reader_cls, planner_cls = _dcp_loader_classes()
    return reader_cls(path, metadata), planner_cls(path)


@functools.lru_cache(maxsize=None)
def _dcp_loader_classes():
    import io
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class CheckedReader(FileSystemReader):
        """Serves the metadata read through the allow-list instead of unpickling `.metadata`."""

        def __init__(self, path, metadata):
            super().__init__(path)
            self._metadata = metadata

        def read_metadata(self, *args, **kwargs):
            if getattr(self._metadata, "storage_meta", None) is None:
                self._metadata.storage_meta = StorageMeta()
            self._metadata.storage_meta.load_id = self.load_id
            return self._metadata

    class CheckedPlanner(DefaultLoadPlanner):
        """DCP reads non-tensor values with torch.load(weights_only=False): check them with
        weights_only=True first (the same bytes, so a value that passes holds no code)."""

        def __init__(self, path):
            super().__init__()
            self._path = path

        def load_bytes(self, read_item, value):
            raw, fqn = value.read(), read_item.dest_index.fqn
            try:
                torch.load(io.BytesIO(raw), weights_only=True)
            except pickle.UnpicklingError as e:
                raise CheckpointError(f"refusing checkpoint {self._path}: its value {fqn} holds objects that could "
                                      f"run code when loaded ({_refusal_detail(str(e))})") from None
            except Exception as e:
                raise CheckpointError(f"cannot read checkpoint {self._path}: its value {fqn}: "
                                      f"{_first_line(e, True)}") from None
            super().load_bytes(read_item, io.BytesIO(raw))

    return CheckedReader, CheckedPlanner


def folder_model_state(path: str) -> dict:
    """The whole DenseCL state dict (both encoders, queues, pointer) of a folder checkpoint, on the
    CPU, without a process group: for export and inspection (weights.read_weights)."""
    kind = checkpoint_kind(path)
    try:
        if kind == "ds":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ms = torch.load(os.path.join(path, DS_MODEL_FILE), map_location="cpu", weights_only=True)
            state = {f"encoder_q.{k}": v for k, v in ms["module"].items()}
            state.update(ms[DS_CLIENT_KEY])
            return state
        if kind == "dcp":
            return _dcp_model_state(path)
    except CheckpointError:
        raise
    except (Exception, dcp_exception()) as e:
        raise dcp_error(path, e, "cannot be read") from None
    raise CheckpointError(f"{path} is not a folder checkpoint of densecl_fast (ckpt_<step>.dcp or .ds)")


def _dcp_model_state(path: str) -> dict:
    """The "model" entries of a DCP folder (the optimizer's are not read), as full CPU tensors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    md = read_dcp_metadata(path)
    state = {}
    for fqn, item in md.state_dict_metadata.items():
        if fqn.startswith("model."):
            if not (isinstance(item, TensorStorageMetadata) and isinstance(item.properties.dtype, torch.dtype)):
                raise CheckpointError(f"checkpoint {path}: model entry {fqn} is not a tensor")
            state[fqn[len("model."):]] = torch.empty(tuple(item.size), dtype=item.properties.dtype)
    if not state:
        raise CheckpointError(f"checkpoint {path} holds no model (no 'model.' entries in its {DCP_METADATA})")
    reader, planner = dcp_loader(path, md)
    wrapped = {"model": state}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process": it is
        dcp.load(wrapped, storage_reader=reader, planner=planner, no_dist=True)
    return wrapped["model"]


def dcp_exception() -> type:
    """DCP's CheckpointException: a BaseException, which `except Exception` does not catch."""
    from torch.distributed.checkpoint.api import CheckpointException
    return CheckpointException


def dcp_error(path: str, e: BaseException, what: str) -> CheckpointError:
    """One line for a failed DCP load: a CheckpointException carries each rank's exception with its
    traceback in its text; the first rank's exception is the message (ours as it is)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        e = inner[0] if isinstance(inner, tuple) and inner and isinstance(inner[0], BaseException) else e
    if isinstance(e, CheckpointError):
        return CheckpointError(_first_line(e))
    return CheckpointError(f"checkpoint {path} {what}: {io_error_text(e) if isinstance(e, OSError) else _first_line(e, True)}")


def _first_line(e: BaseException, with_type: bool = False) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text}" if with_type else text


def read_checkpoint_meta(path: str) -> dict:
    """What the trainer needs before it builds a model (step, RNGs, config, ...), for any format:
    the whole file of a file checkpoint, meta.pt of a folder one. One-line CheckpointError otherwise."""
    if not os.path.isdir(path):
        return load_checkpoint(path)
    meta_path = os.path.join(path, META_NAME)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"checkpoint {path} is incomplete: it has no {META_NAME} (the write was "
                              f"interrupted, or it is not a densecl_fast checkpoint)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meta = torch.load(meta_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {meta_path}: {io_error_text(e)}") from None
    if not isinstance(meta, dict) or meta.get("format_version") not in READABLE_FORMATS:
        raise CheckpointError(f"{meta_path} is not a densecl_fast checkpoint's meta.pt")
    missing = [k for k in META_REQUIRED_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: its {META_NAME} has no "
                              f"{', '.join(repr(k) for k in missing)}")
    if checksum(meta) != meta.get("checksum"):
        raise CheckpointError(f"checkpoint {path} is corrupt: {META_NAME} does not match its checksum")
    if checkpoint_kind(path) == "dcp":  # every reader of a .dcp folder comes here first (resume, export, init_from, eval)
        read_dcp_metadata(path)
    return meta


def io_error_text(e: BaseException) -> str:
    if isinstance(e, OSError):
        name = errno.errorcode.get(e.errno, "")
        why = e.strerror or str(e) or type(e).__name__
        return f"{why} ({name}; is the disk full?)" if e.errno == errno.ENOSPC else (f"{why} ({name})" if name else why)
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


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


def remove_stale_temps(out_dir: str) -> list[str]:
    """Delete temp files left by checkpoint writes that were killed (call with the run lock held)."""
    removed = []
    for p in glob.glob(os.path.join(checkpoint_dir(out_dir), _TEMP_GLOB)):
        try:
            if os.path.isdir(p):
                shutil.rmtree(p)
            else:
                os.remove(p)
            removed.append(p)
        except OSError:
            pass
    return removed


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


def _refusal_detail(msg: str) -> str:
    """What PyTorch's weights-only unpickler objected to, without its advice to load the file
    unsafely (never to be given for a file we refuse)."""
    keep = []
    for line in msg.splitlines():
        line = line.split("Please ", 1)[0].strip()
        line = re.sub(r"^.*WeightsUnpickler error:\s*", "", line)
        if line and not re.search(r"weights.only|Weights only|Check the documentation", line, re.I):
            keep.append(line.rstrip("."))
    return "; ".join(keep) or "it holds objects other than tensors and plain containers"


def load_checkpoint(path: str, verify: bool = True) -> dict:
    """Read a checkpoint safely (weights_only=True), check its structure and its checksum;
    every problem is a one-line CheckpointError."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    if size == 0:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": noise for a file we refuse
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "eights only" in str(e) or "WeightsUnpickler" in str(e):
            detail = _refusal_detail(str(e))
            if re.search(r"global", detail, re.I):  # a class or function to import: could run code
                raise CheckpointError(f"refusing checkpoint {path}: it holds objects that could run code when "
                                      f"loaded, not only tensors and plain data ({detail})") from None
            raise CheckpointError(f"cannot read checkpoint {path}: not a checkpoint written by torch.save, or "
                                  f"not one that can be read safely ({detail})") from None
        raise CheckpointError(f"cannot read checkpoint {path}: {io_error_text(e)}") from None
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {io_error_text(e)} "
                              f"(truncated or not a checkpoint)") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a densecl_fast checkpoint (no 'model' entry)")
    if ckpt.get("format_version") not in READABLE_FORMATS:
        raise CheckpointError(f"{path} has checkpoint format {ckpt.get('format_version')}, "
                              f"this version reads formats {', '.join(map(str, READABLE_FORMATS))}")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: it has no {', '.join(repr(k) for k in missing)} "
                              f"entr{'y' if len(missing) == 1 else 'ies'}")
    if not isinstance(ckpt["step"], int) or ckpt["step"] < 0 or not isinstance(ckpt["config"], dict):
        raise CheckpointError(f"checkpoint {path} is malformed: 'step' must be a non-negative int and "
                              f"'config' a mapping")
    if verify and ckpt["format_version"] >= 2:
        stored = ckpt.get("checksum")
        if not isinstance(stored, str):
            raise CheckpointError(f"checkpoint {path} has no checksum (format {ckpt['format_version']} requires one)")
        if checksum(ckpt) != stored:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: its content does not match the checksum stored when it was "
                f"written (the file was damaged afterwards). Move it away; --resume auto then continues from "
                f"the previous checkpoint")
    return ckpt


def saved_config(ckpt: dict, path: str):
    """The checkpoint's config as a Config, or a one-line CheckpointError."""
    from .config import config_from_dict, one_line
    try:
        return config_from_dict(ckpt["config"])
    except Exception as e:  # OmegaConf key/type errors, ConfigError from validate
        raise CheckpointError(f"checkpoint {path} holds a config this version cannot use: {one_line(e)}") from None
