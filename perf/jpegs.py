"""The one source of generated JPEGs in perf/: the end-to-end variants and bench_data.py.

ImageNet-like files: 500x375 by default (about the ImageNet mean size), smooth colour fields with
shapes and grain, quality 90 (tens of kB each). `distinct` images are encoded; the rest of the
`count` files are hard links to them (copies where links fail). Decoding cost is the same as for
distinct files, the page cache holds them all, and thousands of files take a second to make.
Real data: pass --data-dir instead.
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
    small = rs.randint(0, 256, (6, 8, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = int(rs.randint(0, width)), int(rs.randint(0, height))
        x1, y1 = x0 + int(rs.randint(10, max(11, width // 2))), y0 + int(rs.randint(10, max(11, height // 2)))
        colour = tuple(int(c) for c in rs.randint(0, 256, 3))
        (draw.ellipse if rs.rand() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    grain = rs.randint(-20, 21, (height, width, 3), dtype=np.int16)
    arr = np.clip(np.asarray(img, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def ensure_jpeg_folder(cache_dir: str, count: int, width: int = 500, height: int = 375,
                       distinct: int = 128, quality: int = 90, workers: int = 8) -> dict:
    """Create (or reuse) the folder; returns {"path", "seconds", "generated", ...}."""
    t0 = time.perf_counter()
    root = os.path.abspath(os.path.expanduser(cache_dir))
    name = f"jpegs_{width}x{height}_q{quality}_n{count}"
    path = os.path.join(root, name)
    info = {"path": path, "count": count, "width": width, "height": height, "quality": quality,
            "distinct": min(distinct, count)}
    if os.path.isdir(path):
        return {**info, "seconds": time.perf_counter() - t0, "generated": False}
    os.makedirs(root, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    n_distinct = min(distinct, count)

    def write(i):
        with open(os.path.join(tmp, f"img_{i:07d}.jpg"), "wb") as f:
            f.write(render_jpeg(i, width, height, quality))

    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(write, range(n_distinct)))
    for i in range(n_distinct, count):
        src = os.path.join(tmp, f"img_{i % n_distinct:07d}.jpg")
        dst = os.path.join(tmp, f"img_{i:07d}.jpg")
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    try:
        os.rename(tmp, path)
    except OSError:  # another process made it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return {**info, "seconds": time.perf_counter() - t0, "generated": True}
