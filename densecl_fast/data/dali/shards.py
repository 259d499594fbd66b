"""webdataset tar shards as a data source: expanding `data.source` into tars and indexing them.

DALI's webdataset reader needs an index per tar; it is made here once (into `data.cache_dir`) and
lists only samples that hold an image, so the index's count is exactly what the reader yields and
the epoch's step count is known before reading.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
import tarfile
from typing import List, Tuple

from ..errors import DataError

WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")


def looks_like_shards(source: str) -> bool:
    """A shard pattern/list/.tar rather than "synthetic", an image folder or a .txt list."""
    s = str(source).strip()
    path = os.path.expanduser(s)
    if s == "synthetic" or os.path.isdir(path) or (os.path.isfile(path) and not s.lower().endswith(".tar")):
        return False
    return any(c in s for c in "*?[{,") or s.lower().endswith(".tar")


def _expand_braces(pattern: str) -> List[str]:
    """webdataset's brace ranges: "a-{000..012}.tar" (zero padded as written), "{a,b}" lists."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, tail, body = pattern[:m.start()], pattern[m.end():], m.group(1)
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = r.group(1), r.group(2)
        width = len(lo) if lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [e for item in items for e in _expand_braces(head + item + tail)]


def expand_shards(source: str) -> List[str]:
    """`data.source` -> absolute .tar paths (sorted within each glob, in the order given otherwise)."""
    out: List[str] = []
    for part in str(source).split(","):
        part = part.strip()
        if not part:
            continue
        for p in _expand_braces(os.path.expanduser(part)):
            matches = sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
            out.extend(os.path.abspath(m) for m in matches)
    missing = [p for p in out if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{len(missing)} webdataset shard(s) of data.source={source!r} do not exist, e.g. {missing[0]}")
    if not out:
        raise DataError(f"data.source={source!r} matches no webdataset shards (.tar files)")
    return out


def write_wds_index(tar_path: str, index_path: str) -> int:
    """A DALI webdataset index (format v1.2, as `wds2idx` writes) listing, per sample, only its first
    image component: samples without an image are left out, so the index's count is exactly what
    the reader yields. Returns that count."""
    samples: List[Tuple[str, int, int, str]] = []
    last_base, has_image = None, False
    with tarfile.open(tar_path, "r:") as tf:
        for m in tf:
            if not m.isfile():
                continue
            name = m.name
            slash = name.rfind("/") + 1
            dot = name.find(".", slash)
            if dot <= slash:          # no extension, or a hidden file
                continue
            base, ext = name[:dot], name[dot + 1:]
            if base != last_base:     # the components of a sample are consecutive
                last_base, has_image = base, False
            if not has_image and ext.lower() in WDS_IMAGE_EXTS:
                samples.append((ext, m.offset_data, m.size, name))
                has_image = True
    if not samples:
        raise DataError(f"webdataset shard {tar_path} holds no images ({', '.join(WDS_IMAGE_EXTS)})")
    tmp = f"{index_path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"v1.2 {len(samples)}\n")
        for ext, off, size, name in samples:
            f.write(f"{ext} {off} {size} {name}\n")
    os.replace(tmp, index_path)
    return len(samples)


def wds_index(tar_path: str, cache_dir: str) -> Tuple[str, int]:
    """Cached index of one shard (keyed by path, size and mtime) -> (index path, image samples)."""
    st = os.stat(tar_path)
    key = hashlib.sha1(f"{os.path.realpath(tar_path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20]
    folder = os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), "wds-index")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{os.path.basename(tar_path)}.{key}.idx")
    if os.path.isfile(path):
        with open(path) as f:
            head = f.readline().split()
        if len(head) == 2 and head[0] == "v1.2":
            return path, int(head[1])
    return path, write_wds_index(tar_path, path)
