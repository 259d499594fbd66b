"""Fashion-MNIST scenes: a dense task in the small, made of real photos, with per-pixel masks.

Each scene is a `size` x `size` RGB canvas (96 px by default) holding 2-5 Fashion-MNIST garments
at random scales (one large, the others 12-45% of the side, some tiny), positions and overlaps,
tinted with a random colour, on a textured background (smooth colour noise, a finer texture and
pixel noise). Colour says nothing about the class. Training scenes use garments of the training
split only, test scenes garments of the test split only. The spelling is

    fashion-mnist-scenes:/usr/share/datasets/fashion-mnist                 (4,000 training scenes)
    fashion-mnist-scenes:/usr/share/datasets/fashion-mnist#test            (1,000 test scenes)
    fashion-mnist-scenes:ROOT#train=8000,test=2000,size=128                (other counts / side)

(`#` then comma-separated tokens: a bare `train`/`test` picks the split `data.source` reads;
`train=N`, `test=N` the number of scenes of each split; `size=S` the side, 32-512.) A garment's
mask is its 28-px photo above GARMENT_THRESHOLD with the holes filled, resized with it; garments
drawn later cover earlier ones.

Scene `i` of a split depends only on (split, i, size) and the idx files: a smaller set is a
prefix of a larger one. Random numbers come from numpy's legacy `RandomState` (frozen streams);
garments are resized by Pillow (bilinear) and the background is interpolated by a small matrix
product, so pixels are identical wherever the same Pillow and BLAS builds run (`pixels_sha256`
says whether they are). Layout of `<cache_dir>/fashion-mnist-scenes-v1-<split>-<n>-<size>-<digest>/` (digest: the
idx files' sizes and mtimes, as `fashion_mnist.digest`):

    images/<class>/<i:06d>.png   RGB scene; <class> = its label (the class covering most pixels)
    masks/<i:06d>.png            uint8 L: 0 = background, k = fashion_mnist.CLASSES[k-1]
    instances/<i:06d>.png        uint8 L: 0 = background, k = the k-th garment drawn (visible part)
    labels.json                  {"version", "format", "split", "num_images", "size", "source",
                                  "classes", "sha256", "pixels_sha256", "images": [{"image", "mask", "instances",
                                  "label", "objects": [{"class", "source_index", "visible",
                                  "bbox" (visible part, end exclusive) or null}, ...drawing order]}]}

`sha256` covers everything that defines the set: every field of labels.json but itself (labels,
objects, sizes, ...; as canonical JSON) and the bytes of every image, mask and instance file in
index order. It is checked each time the set is reused, and a set that fails it (or whose
labels.json is unreadable or malformed) is refused with one line naming the folder (delete the
folder to regenerate it), never silently replaced. `pixels_sha256` is over the generated arrays
(compare across machines). `format` is the on-disk layout's version (2: the checksum covers
labels.json; a set written before is refused the same way). The set is written into a temporary
folder renamed into place, so racing ranks never see a partial set (see data/cache.py for the temp
folders of killed generations).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import List, Optional

import numpy as np
from PIL import Image

from . import fashion_mnist
from .cache import build_once
from .errors import DataError
from .generated import GeneratedSpec, parse_spec, read_labels, set_dir

PREFIX = "fashion-mnist-scenes:"
VERSION = 1                      # the drawing (seeds every scene's random stream): a new one draws other scenes
FORMAT = 2                       # labels.json's layout and what `sha256` covers
SEED = 0x5CE7E5
DEFAULT_COUNT = {"train": 4000, "test": 1000}
DEFAULT_SIZE = 96
GARMENT_THRESHOLD = 12           # of 255: Fashion-MNIST backgrounds are 0 with faint noise
CLASSES = fashion_mnist.CLASSES  # mask value k = CLASSES[k - 1]; 0 = background


class ScenesSpec(GeneratedSpec):
    """A parsed `scenes` source (see parse_source)."""


def parse_source(source: str) -> Optional[ScenesSpec]:
    """'fashion-mnist-scenes:ROOT[#tokens]' -> ScenesSpec; anything else -> None."""
    return parse_spec(source, PREFIX, ScenesSpec, DEFAULT_COUNT, DEFAULT_SIZE, "scenes")


# --- drawing ---------------------------------------------------------------------------------

def _smooth_noise(rs, size: int, cells: int, channels: int, low: float, high: float) -> np.ndarray:
    """A coarse random grid bilinearly upsampled to size x size (separably: two small products)."""
    grid = rs.uniform(low, high, (cells + 1, cells + 1, channels))
    t = (np.arange(size, dtype=np.float64) + 0.5) / size * cells
    i0 = np.minimum(t.astype(np.int64), cells - 1)
    w = np.zeros((size, cells + 1))
    w[np.arange(size), i0] = 1.0 - (t - i0)
    w[np.arange(size), i0 + 1] = t - i0
    return np.einsum("yi,ijc,xj->yxc", w, grid, w, optimize=True)


def _background(rs, size: int) -> np.ndarray:
    base = _smooth_noise(rs, size, int(rs.randint(2, 7)), 3, 0.0, 255.0)
    texture = _smooth_noise(rs, size, int(rs.randint(size // 8, size // 3 + 1)), 1, -1.0, 1.0)
    return base + texture * rs.uniform(10.0, 45.0)


def garment_mask(photo: np.ndarray) -> np.ndarray:
    """bool 28x28: the garment's pixels (above the threshold, holes filled)."""
    from scipy.ndimage import binary_fill_holes
    return binary_fill_holes(photo > GARMENT_THRESHOLD)


def _draw_sides(rs, size: int, n: int) -> List[int]:
    large = rs.uniform(0.4, 0.7) * size
    small = [size * float(np.exp(rs.uniform(np.log(0.12), np.log(0.45)))) for _ in range(n - 1)]
    return [max(4, int(round(s))) for s in [large] + small]


def render_scene(index: int, split: str, size: int, photos: np.ndarray, labels: np.ndarray):
    """Scene `index` of `split` -> (rgb uint8 HxWx3, class mask uint8, instance mask uint8, objects)."""
    rs = np.random.RandomState([SEED, VERSION, fashion_mnist.SPLITS.index(split), int(index)])
    img = _background(rs, size)
    cls_mask = np.zeros((size, size), np.uint8)
    inst = np.zeros((size, size), np.uint8)
    n = int(rs.randint(2, 6))
    sides = _draw_sides(rs, size, n)
    order = rs.permutation(n)                  # the large garment is not always at the bottom
    drawn = []
    for k, g in enumerate(order):
        side = sides[g]
        src = int(rs.randint(len(photos)))
        cls = int(labels[src])
        cx, cy = rs.uniform(0.05, 0.95, 2) * size          # centre in frame: always partly inside
        tint = rs.uniform(60.0, 255.0, 3)
        shade = rs.uniform(0.15, 0.45)                      # dark parts of a garment stay visible
        photo = Image.fromarray(photos[src], "L").resize((side, side), Image.BILINEAR)
        m = Image.fromarray(garment_mask(photos[src]).astype(np.uint8) * 255, "L").resize((side, side), Image.BILINEAR)
        g_img = np.asarray(photo, np.float64) / 255.0
        inside = np.asarray(m) >= 128
        x0, y0 = int(cx - side / 2), int(cy - side / 2)
        sx0, sy0 = max(0, -x0), max(0, -y0)
        dx0, dy0 = max(0, x0), max(0, y0)
        dx1, dy1 = min(size, x0 + side), min(size, y0 + side)
        if dx0 >= dx1 or dy0 >= dy1:
            drawn.append((cls, src))
            continue
        sl = (slice(dy0, dy1), slice(dx0, dx1))
        ins = inside[sy0:sy0 + dy1 - dy0, sx0:sx0 + dx1 - dx0]
        pix = tint * (shade + (1.0 - shade) * g_img[sy0:sy0 + dy1 - dy0, sx0:sx0 + dx1 - dx0, None])
        img[sl][ins] = pix[ins]
        cls_mask[sl][ins] = cls + 1
        inst[sl][ins] = k + 1
        drawn.append((cls, src))
    img = img + rs.uniform(-10.0, 10.0, img.shape)         # sensor-like pixel noise
    rgb = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    objects = []
    for k, (cls, src) in enumerate(drawn):
        ys, xs = np.nonzero(inst == k + 1)
        bbox = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1] if len(xs) else None
        objects.append({"class": cls, "source_index": src, "visible": int(len(xs)), "bbox": bbox})
    return rgb, cls_mask, inst, objects


def scene_label(cls_mask: np.ndarray) -> int:
    """The garment class covering most pixels (the lowest class on a tie)."""
    area = np.bincount(cls_mask.ravel(), minlength=len(CLASSES) + 1)[1:]
    return int(area.argmax())


# --- the data set on disk --------------------------------------------------------------------

def scenes_dir(cache_dir: str, spec: ScenesSpec, split: str) -> str:
    return set_dir(cache_dir, PREFIX[:-1], VERSION, spec, split)


def _set_sha256(folder: str, meta: dict) -> str:
    """SHA-256 over labels.json's fields but `sha256` (canonical JSON), then every entry's files."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True,
                        separators=(",", ":")).encode())
    for e in meta["images"]:
        for key in ("image", "mask", "instances"):
            with open(os.path.join(folder, e[key]), "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def generate(folder: str, spec: ScenesSpec, split: str) -> None:
    """Write the scenes of `split` into `folder` (not atomically; see `ensure_scenes`)."""
    photos, labels = fashion_mnist.load_fashion_mnist(spec.root, split)
    for sub in ("masks", "instances"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    for name in CLASSES:
        os.makedirs(os.path.join(folder, "images", name), exist_ok=True)
    pixels, entries = hashlib.sha256(), []
    for i in range(spec.count(split)):
        rgb, mask, inst, objects = render_scene(i, split, spec.size, photos, labels)
        label = scene_label(mask)
        e = {"image": f"images/{CLASSES[label]}/{i:06d}.png", "mask": f"masks/{i:06d}.png",
             "instances": f"instances/{i:06d}.png", "label": label, "objects": objects}
        # Level 0 for the noisy scenes (zlib gains little on them and costs most of the time), 1 for masks.
        Image.fromarray(rgb, "RGB").save(os.path.join(folder, e["image"]), "PNG", compress_level=0)
        Image.fromarray(mask, "L").save(os.path.join(folder, e["mask"]), "PNG", compress_level=1)
        Image.fromarray(inst, "L").save(os.path.join(folder, e["instances"]), "PNG", compress_level=1)
        for a in (rgb, mask, inst):
            pixels.update(a.tobytes())
        entries.append(e)
    meta = {"version": VERSION, "format": FORMAT, "split": split, "num_images": len(entries), "size": spec.size,
            "source": spec.root, "classes": list(CLASSES), "pixels_sha256": pixels.hexdigest(), "images": entries}
    meta["sha256"] = _set_sha256(folder, meta)
    with open(os.path.join(folder, "labels.json"), "w") as f:  # last: its presence marks a complete set
        json.dump(meta, f)


def _well_formed(meta) -> bool:
    """The fields readers use, of the types and ranges they assume (a label indexes CLASSES)."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("sha256"), str):
        return False
    images = meta.get("images")
    if not isinstance(images, list) or meta.get("num_images") != len(images):
        return False
    for e in images:
        if not (isinstance(e, dict) and all(isinstance(e.get(k), str) for k in ("image", "mask", "instances"))
                and type(e.get("label")) is int and 0 <= e["label"] < len(CLASSES)):
            return False
    return True


def _verified(folder: str) -> str:
    try:
        meta = read_labels(folder)
        ok = _well_formed(meta) and _set_sha256(folder, meta) == meta["sha256"]
    except (OSError, ValueError, KeyError, TypeError):  # ValueError: JSON (and UnicodeDecodeError)
        meta, ok = None, False
    if not ok and isinstance(meta, dict) and "format" not in meta and "sha256" in meta:
        raise DataError(f"the Fashion-MNIST scenes at {folder} were written by an older densecl_fast (their "
                        "checksum does not cover labels.json); delete the folder to generate them again")
    if not ok:
        raise DataError(f"the Fashion-MNIST scenes at {folder} fail their checksum (labels.json or an image "
                        "was changed, removed or damaged); delete the folder to generate them again")
    return folder


def ensure_scenes(spec: ScenesSpec, split: str, cache_dir: str) -> str:
    """Folder of the scenes of `split`, generating them on first use and verifying them on reuse;
    safe when processes race."""
    final = scenes_dir(cache_dir, spec, split)
    return _verified(build_once(final, lambda tmp: generate(tmp, spec, split), "scene set", cache_dir))
