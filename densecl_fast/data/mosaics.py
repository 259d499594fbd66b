"""Fashion-MNIST mosaics: a dense task a CPU can rank trunks on, with a label per grid cell.

Each mosaic is a `size` x `size` grey image (64 px by default) cut into four quadrants. Each
quadrant is empty with probability P_EMPTY, else it holds one untinted Fashion-MNIST garment
resized to SIDE_MIN..1 of the quadrant's side (26-32 px at 64 px) at a random offset inside the
quadrant (the jitter: up to 6 px at 64 px), on black with mild uniform pixel noise (+-NOISE grey
levels, clipped). A mosaic whose four draws all came out empty gets a garment in one quadrant, so
every mosaic holds at least one. Training mosaics use garments of the training split only, test
mosaics garments of the test split only. The spelling is

    fashion-mnist-mosaics:/usr/share/datasets/fashion-mnist                (10,000 training mosaics)
    fashion-mnist-mosaics:/usr/share/datasets/fashion-mnist#test           (2,000 test mosaics)
    fashion-mnist-mosaics:ROOT#train=2000,test=500,size=96                 (other counts / side)

(`#` then comma-separated tokens, data/generated.py: a bare `train`/`test` picks the split `data.source`
reads; `train=N`, `test=N` the number of mosaics of each split; `size=S` the side, an even number
in 32..512.)

Labels. A quadrant's label is its garment's class (0..9, fashion_mnist.CLASSES) or EMPTY (10). A
cell of a g x g grid over the image (C5 of resnet18 at 64 px is 2 x 2: one cell per quadrant; C4 is
4 x 4: four cells per quadrant) is labelled with the quadrant label covering most of its area
(`cell_labels`; on a tie, at odd g, the lowest index: a garment before empty). The mosaic's own
label (the kNN label, the image's class folder) is the class held by most quadrants, ties broken by
the larger total garment area (the sum of the sides squared), then the lower class index: what a
global, pooled vector of four garments could best be asked to name.

Mosaic `i` of a split depends only on (split, i, size) and the idx files: a smaller set is a prefix of
a larger one (numpy's legacy `RandomState`, Pillow's bilinear resize). Layout of
`<cache_dir>/fashion-mnist-mosaics-v1-<split>-<n>-<size>-<digest>/` (digest: the idx files' sizes
and mtimes, as `fashion_mnist.digest`):

    images/<class>/<i:06d>.png   grey (L) mosaic; <class> = its label
    labels.json                  {"version", "split", "num_images", "size", "source", "params", "classes",
                                  "cell_classes", "sha256", "pixels_sha256", "images": [{"image", "label",
                                  "quadrants": [top-left, top-right, bottom-left, bottom-right],
                                  "garments": [{"quadrant", "class", "source_index", "side", "x", "y"}, ...]}]}

`sha256` covers everything that defines the set: the generation parameters (`params`, which name the
version, split, count and size), every entry of `images` (labels, quadrants, garments) and the bytes
of every image file, in index order. It is checked each time the set is reused; a set that fails it
is refused (one-line DataError: delete the folder to generate it again), never silently replaced.
`pixels_sha256` is over the generated arrays (compare across machines). The set is written by
`cache.build_once`: into a temporary folder renamed into place, so racing ranks never see half a set.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image

from . import fashion_mnist
from .cache import build_once
from .errors import DataError
from .generated import GeneratedSpec, parse_spec, read_labels, set_dir

PREFIX = "fashion-mnist-mosaics:"
VERSION = 1
SEED = 0x405A1C
DEFAULT_COUNT = {"train": 10000, "test": 2000}
DEFAULT_SIZE = 64
P_EMPTY = 0.2
SIDE_MIN = 26 / 32               # of the quadrant's side
NOISE = 8.0                      # uniform pixel noise, +- grey levels
CLASSES = fashion_mnist.CLASSES
EMPTY = len(CLASSES)             # the quadrant / cell label of an empty quadrant
CELL_CLASSES = CLASSES + ("empty",)


class MosaicsSpec(GeneratedSpec):
    """A parsed `mosaics` source (see parse_source)."""


def parse_source(source: str) -> Optional[MosaicsSpec]:
    """'fashion-mnist-mosaics:ROOT[#tokens]' -> MosaicsSpec; anything else -> None."""
    return parse_spec(source, PREFIX, MosaicsSpec, DEFAULT_COUNT, DEFAULT_SIZE, "mosaics", even_size=True)


def params(spec: MosaicsSpec, split: str) -> dict:
    """Everything that defines a split's set besides the idx files (part of its checksum)."""
    return {"version": VERSION, "seed": SEED, "split": split, "num_images": spec.count(split), "size": spec.size,
            "p_empty": P_EMPTY, "side_min": SIDE_MIN, "noise": NOISE, "resize": "PIL bilinear"}


# --- drawing and labels ----------------------------------------------------------------------

def render_mosaic(index: int, split: str, size: int, photos: np.ndarray, labels: np.ndarray):
    """Mosaic `index` of `split` -> (grey uint8 [size, size], quadrant labels [4], garments)."""
    rs = np.random.RandomState([SEED, VERSION, fashion_mnist.SPLITS.index(split), int(index)])
    cell = size // 2
    empty = rs.uniform(size=4) < P_EMPTY
    if empty.all():
        empty[rs.randint(4)] = False
    img = np.zeros((size, size), np.float64)
    quadrants, garments = [EMPTY] * 4, []
    lo = int(round(SIDE_MIN * cell))
    for q in range(4):
        if empty[q]:
            continue
        src = int(rs.randint(len(photos)))
        side = int(rs.randint(lo, cell + 1))
        x, y = (int(v) for v in rs.randint(0, cell - side + 1, 2))
        x0, y0 = (q % 2) * cell + x, (q // 2) * cell + y
        photo = Image.fromarray(photos[src], "L").resize((side, side), Image.BILINEAR)
        img[y0:y0 + side, x0:x0 + side] = np.asarray(photo, np.float64)
        quadrants[q] = int(labels[src])
        garments.append({"quadrant": q, "class": int(labels[src]), "source_index": src, "side": side, "x": x0, "y": y0})
    img += rs.uniform(-NOISE, NOISE, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), quadrants, garments


def mosaic_label(garments: List[dict]) -> int:
    """The class held by most quadrants; ties: the larger total area (sides squared), then the lower class."""
    count, area = np.zeros(len(CLASSES)), np.zeros(len(CLASSES))
    for g in garments:
        count[g["class"]] += 1
        area[g["class"]] += g["side"] ** 2
    return int(np.lexsort((-np.arange(len(CLASSES)), area, count))[-1])


def cell_labels(quadrants, grid: int) -> np.ndarray:
    """Quadrant labels [N, 4] (or [N, 2, 2]) -> int64 [N, grid, grid]: each cell of a grid x grid split of
    the image gets the quadrant label covering most of its area (a tie: the lowest index)."""
    q = np.asarray(quadrants, np.int64).reshape(-1, 2, 2)
    if grid < 1:
        raise ValueError(f"grid {grid}: at least 1")
    # On a 2g x 2g lattice a quadrant is g x g points and a cell 2 x 2: count each label's points per cell.
    lattice = np.repeat(np.repeat(q, grid, axis=1), grid, axis=2)
    onehot = np.eye(len(CELL_CLASSES), dtype=np.int64)[lattice]
    counts = onehot.reshape(len(q), grid, 2, grid, 2, -1).sum(axis=(2, 4))
    return counts.argmax(-1)


# --- the data set on disk --------------------------------------------------------------------

def mosaics_dir(cache_dir: str, spec: MosaicsSpec, split: str) -> str:
    return set_dir(cache_dir, PREFIX[:-1], VERSION, spec, split)


def _sha256(folder: str, par: dict, entries: list) -> str:
    h = hashlib.sha256(json.dumps(par, sort_keys=True).encode())
    for e in entries:
        h.update(json.dumps(e, sort_keys=True).encode())
        with open(os.path.join(folder, e["image"]), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def generate(folder: str, spec: MosaicsSpec, split: str) -> None:
    """Write the mosaics of `split` into `folder` (not atomically; see `ensure_mosaics`)."""
    photos, labels = fashion_mnist.load_fashion_mnist(spec.root, split)
    for name in CLASSES:
        os.makedirs(os.path.join(folder, "images", name), exist_ok=True)
    pixels, entries = hashlib.sha256(), []
    for i in range(spec.count(split)):
        img, quadrants, garments = render_mosaic(i, split, spec.size, photos, labels)
        label = mosaic_label(garments)
        e = {"image": f"images/{CLASSES[label]}/{i:06d}.png", "label": label, "quadrants": quadrants,
             "garments": garments}
        Image.fromarray(img, "L").save(os.path.join(folder, e["image"]), "PNG", compress_level=1)
        pixels.update(img.tobytes())
        entries.append(e)
    par = params(spec, split)
    meta = {"version": VERSION, "split": split, "num_images": len(entries), "size": spec.size, "source": spec.root,
            "params": par, "classes": list(CLASSES), "cell_classes": list(CELL_CLASSES),
            "sha256": _sha256(folder, par, entries), "pixels_sha256": pixels.hexdigest(), "images": entries}
    with open(os.path.join(folder, "labels.json"), "w") as f:  # last: its presence marks a complete set
        json.dump(meta, f)


def _verified(folder: str, spec: MosaicsSpec, split: str) -> dict:
    try:
        meta = read_labels(folder)
        ok = meta["params"] == params(spec, split) and _sha256(folder, meta["params"], meta["images"]) == meta["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise DataError(f"the Fashion-MNIST mosaics at {folder} fail their checksum (an image, a label or "
                        "labels.json was changed, removed or damaged); delete the folder to generate them again")
    return meta


def ensure_mosaics(spec: MosaicsSpec, split: str, cache_dir: str) -> Tuple[str, dict]:
    """-> (folder, its verified labels.json) of the mosaics of `split`, generated on first use and
    checked on reuse; safe when processes race."""
    final = mosaics_dir(cache_dir, spec, split)
    build_once(final, lambda tmp: generate(tmp, spec, split), "mosaic set", cache_dir)
    return final, _verified(final, spec, split)
