"""The parts of a generated Fashion-MNIST set (the mosaics, data/mosaics.py) that are not its drawing:
the `PREFIX ROOT[#tokens]` spelling, the spec it parses to, the cache folder's name and reading labels.json.

Tokens after `#` (comma-separated): a bare `train`/`test` picks the split `data.source` reads;
`train=N`, `test=N` the number of images of each split; `size=S` the side in px, 32..512 (even where
the set asks for it).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Mapping, Optional, Tuple, Type, TypeVar

from . import fashion_mnist
from .errors import DataError


@dataclass(frozen=True)
class GeneratedSpec:
    root: str
    split: str                   # the split `data.source` reads
    counts: Tuple[int, int]      # images of (train, test)
    size: int

    def count(self, split: str) -> int:
        return self.counts[0 if split == "train" else 1]


S = TypeVar("S", bound=GeneratedSpec)


def parse_spec(source: str, prefix: str, spec_type: Type[S], default_count: Mapping[str, int], default_size: int,
               noun: str, *, even_size: bool = False) -> Optional[S]:
    """'PREFIX ROOT[#tokens]' -> spec_type; anything else -> None. `noun` names the images in errors."""
    source = str(source).strip()
    if not source.startswith(prefix):
        return None
    root, _, rest = source[len(prefix):].partition("#")
    if not root:
        raise DataError(f"{source!r}: give the folder of the Fashion-MNIST idx files, e.g. "
                        f"{prefix}/usr/share/datasets/fashion-mnist")
    split, counts, size = "train", dict(default_count), default_size
    for tok in (t.strip() for t in rest.split(",") if t.strip()):
        key, eq, val = tok.partition("=")
        if not eq and key in fashion_mnist.SPLITS:
            split = key
            continue
        if eq and key in ("train", "test", "size"):
            try:
                v = int(val)
            except ValueError:
                v = None
            lo, hi = (32, 512) if key == "size" else (1, 1_000_000)
            even = even_size and key == "size"
            if v is None or not lo <= v <= hi or (even and v % 2):
                raise DataError(f"{source!r}: {key}={val!r} must be an{' even' if even else ''} "
                                f"integer in {lo}..{hi}")
            if key == "size":
                size = v
            else:
                counts[key] = v
            continue
        raise DataError(f"{source!r}: unknown token {tok!r} after '#'; use train or test (the split), "
                        f"train=N, test=N ({noun} per split), size=S (side in px)")
    return spec_type(os.path.abspath(os.path.expanduser(root)), split, (counts["train"], counts["test"]), size)


def set_dir(cache_dir: str, name: str, version: int, spec: GeneratedSpec, split: str) -> str:
    """`<cache_dir>/<name>-v<version>-<split>-<n>-<size>-<digest of the idx files>`."""
    return os.path.join(os.path.abspath(os.path.expanduser(cache_dir)),
                        f"{name}-v{version}-{split}-{spec.count(split)}-{spec.size}-"
                        f"{fashion_mnist.digest(spec.root, split)}")


def read_labels(folder: str) -> dict:
    """The labels.json of a generated set (see its module's docstring for the fields); unverified."""
    with open(os.path.join(folder, "labels.json")) as f:
        return json.load(f)
