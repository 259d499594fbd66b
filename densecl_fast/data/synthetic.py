"""The built-in data set: textured scenes with a few shapes, generated deterministically.

So that the demo and the tests need no download. Image `i` depends only on (i, resolution): a
smaller set is a prefix of a larger one. Every random number comes from numpy's legacy
`RandomState` (its streams are frozen across numpy versions) and only from uniform draws, and the
pixels are computed with + - * / sqrt only (IEEE-exact everywhere, unlike sin/log), so the pixel
arrays are identical on every machine; the JPEG/PNG bytes are identical wherever the same
Pillow build encodes them.

Layout of `<cache_dir>/synthetic-v1-<n>-<res>/`:

    images/<class>/<i:06d>.jpg   RGB scene, res x res, JPEG q90 4:4:4; <class> = its label's name
    masks/<i:06d>.png            uint8 L, same size: 0 = background, k = CLASSES[k-1] (topmost object)
    labels.json                  {"version", "num_images", "resolution", "classes": [...],
                                  "images": [{"image": "images/<class>/<i>.jpg", "mask": "masks/<i>.png",
                                              "label": k-1, "objects": [{"class": k-1, "visible": pixels,
                                              "bbox": [x0, y0, x1, y1] (visible part, end exclusive) or null},
                                              ...in drawing order]}, ...in index order]}

The label is the class of the object with the most *visible* pixels (after occlusion), so it
always agrees with the mask. Backgrounds are gradients, stripes, checkers or smooth colour
noise, plus pixel noise; objects (one large, one to three small ones) have random colours, sizes,
rotations and fills and may overlap and leave the frame. Colour says nothing about the class.

The set is generated once into a temporary folder that is renamed into place, so processes racing
to create it (several ranks) never see a partial set; the loser discards its copy.
"""
from __future__ import annotations

import json
import os
from typing import List, Tuple

import numpy as np
from PIL import Image

from .cache import build_once
from .errors import DataError

VERSION = 1
SEED = 0x5EED_DC1
CLASSES = ("circle", "square", "triangle", "ring", "cross", "semicircle")
_HALF_SQRT3 = float(np.sqrt(3.0)) / 2.0


def synthetic_dir(cache_dir: str, num_images: int, resolution: int) -> str:
    return os.path.join(os.path.abspath(os.path.expanduser(cache_dir)),
                        f"synthetic-v{VERSION}-{int(num_images)}-{int(resolution)}")


# --- drawing ---------------------------------------------------------------------------------

def _unit_vector(rs: np.random.RandomState) -> Tuple[float, float]:
    # Rejection sampling in the unit disc: a uniform direction without calling sin/cos.
    while True:
        a, b = rs.uniform(-1.0, 1.0, 2)
        n2 = a * a + b * b
        if 0.01 < n2 <= 1.0:
            n = float(np.sqrt(n2))
            return float(a / n), float(b / n)


def _colour(rs) -> np.ndarray:
    return rs.randint(0, 256, 3).astype(np.float64)


def _background(rs, res: int, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    kind = rs.randint(4)
    c0, c1 = _colour(rs), _colour(rs)
    u, v = _unit_vector(rs)
    if kind == 0:    # linear gradient between two colours
        t = (xx * u + yy * v) / res
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-9)
    elif kind == 1:  # stripes
        period = max(4.0, res * rs.uniform(0.05, 0.2))   # >= 4 px: no aliasing at low res
        t = (((xx * u + yy * v) / period + rs.uniform()) % 1.0 < 0.5).astype(np.float64)
    elif kind == 2:  # checkerboard, axis aligned
        cell = max(2, int(res * rs.uniform(0.06, 0.2)))
        t = ((xx.astype(np.int64) // cell + yy.astype(np.int64) // cell) % 2).astype(np.float64)
    else:            # smooth colour noise: a coarse random grid, bilinearly upsampled
        g = rs.randint(3, 9)
        grid = rs.uniform(0.0, 255.0, (g + 1, g + 1, 3))
        gx, gy = xx / res * g, yy / res * g
        x0, y0 = np.minimum(gx.astype(np.int64), g - 1), np.minimum(gy.astype(np.int64), g - 1)
        fx, fy = (gx - x0)[..., None], (gy - y0)[..., None]
        return (grid[y0, x0] * (1 - fx) * (1 - fy) + grid[y0, x0 + 1] * fx * (1 - fy)
                + grid[y0 + 1, x0] * (1 - fx) * fy + grid[y0 + 1, x0 + 1] * fx * fy)
    t = t[..., None]
    return c0 * (1.0 - t) + c1 * t


def _shape_mask(cls: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Inside test in the object's frame: (a, b) = rotated offset / radius."""
    r2 = a * a + b * b
    name = CLASSES[cls]
    if name == "circle":
        return r2 <= 1.0
    if name == "square":
        return np.maximum(np.abs(a), np.abs(b)) <= 0.8
    if name == "triangle":   # equilateral, three half-planes at distance 0.6 from the centre
        return (-b <= 0.6) & (_HALF_SQRT3 * a + 0.5 * b <= 0.6) & (-_HALF_SQRT3 * a + 0.5 * b <= 0.6)
    if name == "ring":
        return (r2 <= 1.0) & (r2 >= 0.3)
    if name == "cross":
        aa, bb = np.abs(a), np.abs(b)
        return ((aa <= 0.3) & (bb <= 1.0)) | ((bb <= 0.3) & (aa <= 1.0))
    if name == "semicircle":
        return (r2 <= 1.0) & (b >= -0.15)
    raise ValueError(name)


def render_scene(index: int, resolution: int) -> Tuple[np.ndarray, np.ndarray, List[dict]]:
    """Scene `index` -> (rgb uint8 HxWx3, class mask uint8 HxW, objects in drawing order)."""
    res = int(resolution)
    rs = np.random.RandomState([SEED, VERSION, int(index)])
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float64) + 0.5   # pixel centres
    img = _background(rs, res, xx, yy)
    mask = np.zeros((res, res), np.uint8)
    inst = np.full((res, res), -1, np.int64)

    n_small = rs.randint(1, 4)
    sizes = [rs.uniform(0.35, 0.6)] + [rs.uniform(0.12, 0.3) for _ in range(n_small)]
    classes = [int(rs.randint(len(CLASSES))) for _ in sizes]
    order = rs.permutation(len(sizes))                        # the large one is not always on top
    for k in order:
        radius = sizes[k] * res / 2.0
        cx, cy = rs.uniform(0.1, 0.9, 2) * res                 # centre in frame: always partly visible
        cos, sin = _unit_vector(rs)
        colour, colour2 = _colour(rs), _colour(rs)
        fill = rs.randint(3)
        freq = min(rs.uniform(1.5, 4.0), radius / 3.0)         # stripes >= 3 px wide
        # Only the object's bounding square is evaluated: most of the frame is not under it.
        reach = 1.3 * radius
        x0, x1 = max(0, int(cx - reach)), min(res, int(cx + reach) + 1)
        y0, y1 = max(0, int(cy - reach)), min(res, int(cy + reach) + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        dx, dy = xx[y0:y1, x0:x1] - cx, yy[y0:y1, x0:x1] - cy
        a, b = (dx * cos + dy * sin) / radius, (-dx * sin + dy * cos) / radius
        inside = _shape_mask(classes[k], a, b)
        if fill == 0:      # flat
            pix = np.broadcast_to(colour, a.shape + (3,))
        elif fill == 1:    # stripes in the object's frame
            t = ((a * freq) % 1.0 < 0.5)[..., None]
            pix = np.where(t, colour, colour2)
        else:              # shaded along its own axis
            pix = colour * np.clip(0.75 + 0.35 * b, 0.3, 1.2)[..., None]
        region = img[y0:y1, x0:x1]
        region[inside] = pix[inside]
        mask[y0:y1, x0:x1][inside] = classes[k] + 1
        inst[y0:y1, x0:x1][inside] = k

    img = img + rs.uniform(-8.0, 8.0, img.shape)               # sensor-like pixel noise
    rgb = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    objects = []
    for k in order:
        ys, xs = np.nonzero(inst == k)
        bbox = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1] if len(xs) else None
        objects.append({"class": classes[k], "visible": int(len(xs)), "bbox": bbox})
    return rgb, mask, objects


def scene_label(objects: List[dict]) -> int:
    """Class of the object with the most visible pixels (first in drawing order on a tie)."""
    return max(objects, key=lambda o: o["visible"])["class"]


# --- the data set on disk --------------------------------------------------------------------

def generate(folder: str, num_images: int, resolution: int) -> None:
    """Write the data set into `folder` (not atomically; see `ensure_synthetic`)."""
    os.makedirs(os.path.join(folder, "masks"), exist_ok=True)
    for name in CLASSES:
        os.makedirs(os.path.join(folder, "images", name), exist_ok=True)
    entries = []
    for i in range(int(num_images)):
        rgb, mask, objects = render_scene(i, resolution)
        label = scene_label(objects)
        image_rel = f"images/{CLASSES[label]}/{i:06d}.jpg"
        mask_rel = f"masks/{i:06d}.png"
        Image.fromarray(rgb, "RGB").save(os.path.join(folder, image_rel), "JPEG", quality=90, subsampling=0)
        Image.fromarray(mask, "L").save(os.path.join(folder, mask_rel), "PNG")
        entries.append({"image": image_rel, "mask": mask_rel, "label": label, "objects": objects})
    meta = {"version": VERSION, "num_images": int(num_images), "resolution": int(resolution),
            "classes": list(CLASSES), "images": entries}
    # labels.json is written last: its presence marks a complete set.
    with open(os.path.join(folder, "labels.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)


def ensure_synthetic(cache_dir: str, num_images: int, resolution: int) -> str:
    """Folder of the built-in set, generating it on first use; safe when processes race."""
    if int(num_images) < 1 or int(resolution) < 32:
        raise DataError(f"built-in data set needs data.synthetic_images >= 1 and data.synthetic_resolution >= 32, "
                        f"got {num_images} and {resolution}")
    final = synthetic_dir(cache_dir, num_images, resolution)
    return build_once(final, lambda tmp: generate(tmp, num_images, resolution), "built-in data set", cache_dir)


def read_labels(folder: str) -> dict:
    """The labels.json of a generated set (see the module docstring for its fields)."""
    with open(os.path.join(folder, "labels.json")) as f:
        return json.load(f)
