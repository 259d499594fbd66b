"""Generated data sets in data.cache_dir (the built-in set, Fashion-MNIST as PNGs, the mosaics):
written once, whole or not at all, by whichever process gets there first.

A set is generated in a temporary folder `.<name>.tmp-<host>-<pid>-<random>` beside its final
place and renamed into place; the generating process holds an flock on that folder until then. A
generation that was killed leaves the folder behind; the next generation in the same cache folder
removes it once nothing holds its lock and its process is gone (same host: pid not running; another
host sharing the cache: unlocked and untouched for a minute). Temp folders of older versions (no
host/pid in the name, no lock) are removed when untouched for a day.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import tempfile
import time
from typing import Callable, List

from .errors import DataError

MARKER = "labels.json"  # written last by every generator: its presence marks a complete set
LEGACY_TEMP_AGE_S = 24 * 3600
OTHER_HOST_TEMP_AGE_S = 60  # covers the instant between a temp folder's creation and its lock
_TEMP = re.compile(r"^\..+\.tmp-(?:(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-)?[A-Za-z0-9_]+$")


def is_complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MARKER))


def _host() -> str:
    # '-' separates the name's fields: keep the host name free of it (and of anything else odd)
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs, as another user
        return True
    return True


def _lock(path: str):
    """(fd, state) for the folder `path`: state "free" (this fd now holds its flock), "held" (another
    process holds it) or "unknown" (no flock here, e.g. some network file systems; fd None)."""
    import fcntl
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None, "unknown"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd, "free"
    except OSError as e:
        os.close(fd)
        return None, "held" if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK) else "unknown"


def _age(path: str) -> float:
    try:
        return time.time() - os.path.getmtime(path)
    except OSError:
        return 0.0


def remove_stale_temps(parent: str) -> List[str]:
    """Delete the temp folders in `parent` left by generations that were killed (see the module
    docstring for which ones are known to be dead); -> the paths removed."""
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    host = _host()
    for name in names:
        m = _TEMP.match(name)
        path = os.path.join(parent, name)
        if not m or not os.path.isdir(path) or os.path.islink(path):
            continue
        fd, lock = (None, "unknown") if m.group("pid") is None else _lock(path)
        try:
            if m.group("pid") is None:
                stale = _age(path) > LEGACY_TEMP_AGE_S
            elif lock == "held":
                stale = False
            elif m.group("host") == host:
                stale = not _alive(int(m.group("pid")))
            else:
                stale = lock == "free" and _age(path) > OTHER_HOST_TEMP_AGE_S
            if stale:
                shutil.rmtree(path, ignore_errors=True)
                if not os.path.exists(path):
                    removed.append(path)
        finally:
            if fd is not None:
                os.close(fd)
    return removed


def build_once(final: str, build: Callable[[str], None], what: str, cache_dir: str) -> str:
    """The folder `final`, made on first use by `build(tmp)` in a temporary folder beside it and
    renamed into place (atomic, so a reader never sees half a set); when processes race, the
    first rename wins and the others use its copy. A folder without its marker is refused: it was
    not written by this code, and deleting a user's folder is not ours to do."""
    if is_complete(final):
        return final
    if os.path.exists(final):
        raise DataError(f"{final} exists but is not a complete {what} (no {MARKER}); delete it")
    parent = os.path.dirname(final)
    try:
        os.makedirs(parent, exist_ok=True)
        remove_stale_temps(parent)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-{_host()}-{os.getpid()}-", dir=parent)
    except OSError as e:
        raise DataError(f"cannot create the {what} under data.cache_dir={cache_dir!r}: {e}") from None
    fd, _ = _lock(tmp)  # held while this process builds: others leave the folder alone
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.rename(tmp, final)
        except OSError:  # another process got there first: use its copy
            if not is_complete(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if fd is not None:
            os.close(fd)
    return final
