"""Generated data sets in data.cache_dir (the built-in set, Fashion-MNIST as PNGs, the scenes):
written once, whole or not at all, by whichever process gets there first."""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable

from .errors import DataError

MARKER = "labels.json"  # written last by every generator: its presence marks a complete set


def is_complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MARKER))


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
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=parent)
    except OSError as e:
        raise DataError(f"cannot create the {what} under data.cache_dir={cache_dir!r}: {e}") from e
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
    return final
