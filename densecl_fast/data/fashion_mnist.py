"""Fashion-MNIST (Zalando, 70,000 labelled 28x28 grayscale photos of clothing) as a data source.

Real images that need no download here: Debian's `dataset-fashion-mnist` package installs the
four idx files under /usr/share/datasets/fashion-mnist/. The spelling in a config or on the
evaluation command line is

    fashion-mnist:/usr/share/datasets/fashion-mnist          (the 60,000 training images)
    fashion-mnist:/usr/share/datasets/fashion-mnist#test     (the 10,000 test images)

The idx files are read directly (gzip or not; big-endian header: magic 0x0803 for images, 0x0801
for labels). For pretraining, the loaders read image files, so a split is written once as PNGs
into `<cache_dir>/fashion-mnist-<split>-<digest>/images/<class>/<i>.png` (about 6 s for the
60,000 training images on one core; safe when several ranks start at once: the set is written
into a temporary folder that is renamed into place). The digest is of the idx files' sizes and
modification times, so a changed installation makes a new folder instead of reusing a stale one.
Sample i of the folder is image i of the idx file: `list_folder`'s sorted order is class, then
index, so the folder is *not* in idx order; `labels.json` maps file -> idx index.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
from typing import Optional, Tuple

import numpy as np
from PIL import Image

from .cache import build_once
from .errors import DataError

PREFIX = "fashion-mnist:"
SPLITS = ("train", "test")
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IMAGES_MAGIC, _LABELS_MAGIC = 0x0803, 0x0801
VERSION = 1


def parse_source(source: str) -> Optional[Tuple[str, str]]:
    """'fashion-mnist:ROOT[#split]' -> (root, split); anything else -> None."""
    source = str(source).strip()
    if not source.startswith(PREFIX):
        return None
    rest = source[len(PREFIX):]
    root, _, split = rest.partition("#")
    split = split or "train"
    if split not in SPLITS:
        raise DataError(f"{source!r}: unknown Fashion-MNIST split {split!r}; use #train or #test")
    if not root:
        raise DataError(f"{source!r}: give the folder of the idx files, e.g. "
                        f"{PREFIX}/usr/share/datasets/fashion-mnist (apt-get install dataset-fashion-mnist)")
    return os.path.abspath(os.path.expanduser(root)), split


def _find(root: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    raise DataError(f"Fashion-MNIST: {os.path.join(root, stem)}[.gz] not found "
                    f"(apt-get install dataset-fashion-mnist installs it under /usr/share/datasets/fashion-mnist)")


def _read_idx(path: str, magic: int, ndim: int) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"Fashion-MNIST: cannot read {path}: {e}") from e
    head = 4 + 4 * ndim
    if len(data) < head or struct.unpack(">I", data[:4])[0] != magic:
        raise DataError(f"Fashion-MNIST: {path} is not an idx file with magic {magic:#06x}")
    shape = struct.unpack(f">{ndim}I", data[4:head])
    if len(data) - head != int(np.prod(shape)):
        raise DataError(f"Fashion-MNIST: {path} holds {len(data) - head} bytes of data, its header "
                        f"says {shape} (truncated?)")
    return np.frombuffer(data, dtype=np.uint8, offset=head).reshape(shape)


def load_fashion_mnist(root: str, split: str = "train") -> Tuple[np.ndarray, np.ndarray]:
    """-> (images uint8 [N, 28, 28], labels int64 [N]) of one split, in the idx files' order."""
    if split not in SPLITS:
        raise DataError(f"Fashion-MNIST: unknown split {split!r}; use one of {SPLITS}")
    if not os.path.isdir(root):
        raise DataError(f"Fashion-MNIST: {root} is not a folder (apt-get install dataset-fashion-mnist "
                        f"installs the data under /usr/share/datasets/fashion-mnist)")
    img_stem, lab_stem = _FILES[split]
    images = _read_idx(_find(root, img_stem), _IMAGES_MAGIC, 3)
    labels = _read_idx(_find(root, lab_stem), _LABELS_MAGIC, 1).astype(np.int64)
    if len(images) != len(labels):
        raise DataError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels in {root}")
    if labels.size and labels.max() >= len(CLASSES):
        raise DataError(f"Fashion-MNIST {split}: label {labels.max()} out of range in {root}")
    return images, labels


def digest(root: str, split: str) -> str:
    h = hashlib.sha1(f"v{VERSION}".encode())
    for stem in _FILES[split]:
        st = os.stat(_find(root, stem))
        h.update(f"{stem}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:10]


def ensure_image_folder(root: str, split: str, cache_dir: str) -> str:
    """Write the split as PNGs under cache_dir once; -> the folder that holds images/ and labels.json."""
    images, labels = load_fashion_mnist(root, split)
    cache = os.path.abspath(os.path.expanduser(cache_dir))
    final = os.path.join(cache, f"fashion-mnist-{split}-{digest(root, split)}")

    def write(tmp: str) -> None:
        entries = []
        for c in CLASSES:
            os.makedirs(os.path.join(tmp, "images", c))
        for i, (img, lab) in enumerate(zip(images, labels)):
            rel = f"images/{CLASSES[lab]}/{i:05d}.png"
            Image.fromarray(img, "L").save(os.path.join(tmp, rel), "PNG", compress_level=1)
            entries.append(rel)
        with open(os.path.join(tmp, "labels.json"), "w") as f:  # last: its presence marks a complete set
            json.dump({"version": VERSION, "split": split, "source": root, "classes": list(CLASSES),
                       "images": entries, "labels": labels.tolist()}, f)

    return build_once(final, write, "Fashion-MNIST image folder", cache_dir)


def read_labels(folder: str) -> dict:
    """The labels.json of a folder written by `ensure_image_folder`."""
    with open(os.path.join(folder, "labels.json")) as f:
        return json.load(f)
