"""Files that only this user's own runs wrote: an HMAC-SHA256 signature beside each one.

Problem: some files we read back are code in disguise. `torch.compiler.load_cache_artifacts`
checks only a CRC; inductor later unpickles its entries, and an `autotune` entry whose key is an
absolute path is written to that path while loading. A compile artifact dropped into a shared
cache folder, or into a run folder someone hands over to resume, runs code as the user or
overwrites any of the user's files, although the checkpoints beside it load with weights_only.
Fix: such a file is signed when we write it: HMAC-SHA256 of its exact bytes under a secret of
this user (32 random bytes, created once, atomically, with mode 0600 at `key_path()`), stored
beside it as `<file>.sig` and written after it. Reading takes the file's bytes once, checks the
signature over them (`hmac.compare_digest`) and hands on exactly those bytes, so a file replaced
between the check and its use is never what gets used.
Guarantee: `read_verified` returns only bytes that a process holding this user's key signed;
anything else (no signature, a wrong one, one made under another user's key, bytes changed
after signing) raises `Untrusted` before any of it is interpreted. A key file that someone else
owns or that group/others may read or write raises `KeyUnusable`: it is neither used nor repaired.

The key lives at $DENSECL_SIGNING_KEY when set (a path: tests, or nodes that share no home but a
folder), else at $XDG_CONFIG_HOME/densecl_fast/signing-key (~/.config/densecl_fast/signing-key).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import tempfile

KEY_ENV = "DENSECL_SIGNING_KEY"
KEY_BYTES = 32
SIG_SUFFIX = ".sig"
# Binds a signature to this use: an HMAC that the same key makes for another purpose never passes.
_DOMAIN = b"densecl_fast signed file v1\0"
_SCHEME = "hmac-sha256:"


class KeyUnusable(Exception):
    """The user's signing key cannot be trusted or read (the message names the file and why)."""


class Untrusted(Exception):
    """A file is not signed by this user's key (the message says how)."""


def key_path() -> str:
    if os.environ.get(KEY_ENV):
        return os.path.abspath(os.path.expanduser(os.environ[KEY_ENV]))
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(config, "densecl_fast", "signing-key")


def _create_key(path: str) -> None:
    """A new random key at `path`, unless another process made one first (then theirs stays:
    concurrent ranks of one run must end up with one key)."""
    folder = os.path.dirname(path)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".signing-key.")  # mode 0600 from the start
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(KEY_BYTES) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)   # publishes the complete file, and never replaces an existing one
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)


def user_key(path: str | None = None) -> bytes:
    """This user's signing key, created on first use. Raises KeyUnusable."""
    path = path or key_path()
    try:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            _create_key(path)
            fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise KeyUnusable(f"signing key {path}: {e.strerror or e}") from e
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())   # of the file opened, whatever a link pointed to
        if not stat.S_ISREG(st.st_mode):
            raise KeyUnusable(f"signing key {path} is not a regular file")
        if st.st_uid != os.getuid():
            raise KeyUnusable(f"signing key {path} is owned by uid {st.st_uid}, not by this user (uid {os.getuid()})")
        if st.st_mode & 0o077:
            raise KeyUnusable(f"signing key {path} has mode {stat.S_IMODE(st.st_mode):o}: others may read or write it "
                              "(delete it to get a new one, or chmod 600 it if nobody else has read it)")
        text = f.read(4 * KEY_BYTES)
    try:
        key = bytes.fromhex(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise KeyUnusable(f"signing key {path} does not hold {KEY_BYTES} bytes in hex")
    return key


def signature(key: bytes, data: bytes) -> str:
    h = hmac.new(key, _DOMAIN, hashlib.sha256)
    h.update(data)
    return _SCHEME + h.hexdigest()


def write_signed(path: str, data: bytes, key: bytes, write) -> None:
    """`write(data, path)` (an atomic writer), then its signature to `path`.sig the same way.
    The signature covers `data` itself, not what the file holds later; a reader that catches the
    file and the old signature in between sees a mismatch, never a false match."""
    write(data, path)
    write((signature(key, data) + "\n").encode("ascii"), path + SIG_SUFFIX)


def read_verified(path: str, key: bytes) -> bytes:
    """The bytes of `path` when its signature matches them under `key`; raises Untrusted
    (OSError when the file cannot be read)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        with open(path + SIG_SUFFIX, "rb") as f:
            claimed = f.read(256).strip()
    except FileNotFoundError:
        raise Untrusted(f"not signed: no {os.path.basename(path)}{SIG_SUFFIX}") from None
    if not hmac.compare_digest(claimed, signature(key, data).encode("ascii")):
        raise Untrusted(f"its signature {os.path.basename(path)}{SIG_SUFFIX} does not match this user's key "
                        "(written by someone else, or changed since)")
    return data
