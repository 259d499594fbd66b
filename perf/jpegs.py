"""The one source of generated JPEGs in perf/: the end-to-end variants and bench_data.py.

ImageNet-like files (500x375 by default, smooth colour fields with shapes and grain, quality 90).
`distinct` images are encoded, the rest of the `count` files are hard links to them (copies where
links fail): decoding costs the same, the page cache holds them all, and thousands of files take a
second to make. Real data: --data-dir.
"""
from __future__ import annotations

import io
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageDraw


def render_jpeg(index: int, width: int, height: int, quality: int = 90) -> bytes:
    rs = np.random.RandomState(index)
    img = Image.fromarray(rs.randint(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = int(rs.randint(0, width)), int(rs.randint(0, height))
        x1, y1 = x0 + int(rs.randint(10, max(11, width // 2))), y0 + int(rs.randint(10, max(11, height // 2)))
        colour = tuple(int(c) for c in rs.randint(0, 256, 3))
        (draw.ellipse if rs.rand() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    grain = rs.randint(-20, 21, (height, width, 3), dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + grain, 0, 255).astype(np.uint8)).save(
        buf, "JPEG", quality=quality)
    return buf.getvalue()


def ensure_jpeg_folder(cache_dir: str, count: int, width: int = 500, height: int = 375,
                       distinct: int = 128, quality: int = 90, workers: int = 8) -> dict:
    """Create (or reuse) the folder; returns {"path", "count", "distinct", "seconds", "generated", ...}."""
    t0 = time.perf_counter()
    root = os.path.abspath(os.path.expanduser(cache_dir))
    path = os.path.join(root, f"jpegs_{width}x{height}_q{quality}_n{count}")
    distinct = min(distinct, count)
    info = {"path": path, "count": count, "width": width, "height": height, "quality": quality, "distinct": distinct}
    if os.path.isdir(path):
        return {**info, "seconds": time.perf_counter() - t0, "generated": False}
    tmp = f"{path}.tmp-{os.getpid()}"   # renamed into place when complete: no half-made folder is reused
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)

    def write(i):
        with open(os.path.join(tmp, f"img_{i:07d}.jpg"), "wb") as f:
            f.write(render_jpeg(i, width, height, quality))

    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(write, range(distinct)))
    for i in range(distinct, count):
        src, dst = (os.path.join(tmp, f"img_{j:07d}.jpg") for j in (i % distinct, i))
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    try:
        os.rename(tmp, path)
    except OSError:  # another process made it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return {**info, "seconds": time.perf_counter() - t0, "generated": True}
