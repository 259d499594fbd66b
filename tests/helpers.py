"""Shared by the tests: the override list of a tiny, deterministic CPU run, launch/ scripts loaded
as modules (their main() called in-process), the DALI tests' probe images and draws, and a fake
Fashion-MNIST (idx files of disc-shaped garments) for the generated sets' tests."""
import gzip
import importlib.util
import math
import os
import struct

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(ROOT, "launch", "pretrain.py")


def load_script(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny(out_dir, data_cache, *extra):
    return [
        "model.arch=resnet18", "model.hid_dim=32", "model.out_dim=16", "model.queue_len=64", "model.bn_group_size=4",
        "data.source=synthetic", "data.image_size=64", "data.synthetic_images=32", "data.synthetic_resolution=80",
        "data.num_workers=0", f"data.cache_dir={data_cache}",
        "optim.epochs=2", "optim.batch_size=8", f"train.out_dir={out_dir}", "train.log_every=1",
        "train.tensorboard=false", "train.progress=false", "train.deterministic=true", "train.ckpt_every_epochs=1",
        *extra,
    ]


def textured(seed, h, w, lo=50, hi=200):
    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    base = np.stack([lo + (hi - lo) * xx / w, lo + (hi - lo) * yy / h,
                     (lo + hi) / 2 + (hi - lo) / 3 * np.sin(xx / 4.0 + yy / 7.0)], -1)
    return np.clip(base + rs.uniform(-15, 15, (h, w, 3)), lo, hi).astype(np.uint8)


def save(path, img, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(path, **kw)
    return str(path)


def draws(n, seed=0, epoch=0, view=0, **probs):
    """The DALI graph's draws of view `view` for keys 0..n-1."""
    from densecl_fast.data.dali.params import draw_view_params
    return draw_view_params(seed, epoch, np.arange(n), view, **probs)


def binomial_ok(hits, n, p, z=4.5):
    return abs(hits / n - p) <= z * math.sqrt(p * (1 - p) / n) + 1e-9


def write_idx(root, split, images, labels):
    from densecl_fast.data import fashion_mnist as fm
    os.makedirs(root, exist_ok=True)
    img_stem, lab_stem = fm._FILES[split]
    with gzip.open(os.path.join(root, img_stem + ".gz"), "wb") as f:
        f.write(struct.pack(">IIII", 0x0803, *images.shape) + images.tobytes())
    with gzip.open(os.path.join(root, lab_stem + ".gz"), "wb") as f:
        f.write(struct.pack(">II", 0x0801, len(labels)) + labels.astype(np.uint8).tobytes())


def fake_garments(n, seed):
    """Bright discs with a dark hole in the middle (the hole is part of the garment's mask)."""
    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:28, 0:28]
    r2 = (yy - 13.5) ** 2 + (xx - 13.5) ** 2
    imgs = np.where(r2 < 12 ** 2, rs.randint(120, 256, (n, 1, 1)), 0)
    imgs = np.where(r2 < 3 ** 2, 0, imgs).astype(np.uint8)
    return imgs, rs.randint(0, 10, n).astype(np.int64)


@pytest.fixture()
def fake_root(tmp_path):
    """A Fashion-MNIST folder of 50 training and 20 test fake garments."""
    root = str(tmp_path / "fmnist")
    write_idx(root, "train", *fake_garments(50, 0))
    write_idx(root, "test", *fake_garments(20, 1))
    return root


def check_spelling_errors(parse_source, prefix, cases):
    """Each (suffix, message) spelling is refused with a DataError matching it; an empty root too."""
    from densecl_fast.data import DataError
    for bad, msg in cases:
        with pytest.raises(DataError, match=msg):
            parse_source(prefix + "/a" + bad)
    with pytest.raises(DataError, match="give the folder"):
        parse_source(prefix)


def check_refused_when_removed(ensure, folder, path, noun):
    """A generated set missing the file `path` fails its checksum; without labels.json it is no complete
    set: `ensure()` (the set's ensure_* call) refuses both."""
    from densecl_fast.data import DataError
    os.remove(path)
    with pytest.raises(DataError, match="fail their checksum"):
        ensure()
    os.remove(os.path.join(folder, "labels.json"))
    with pytest.raises(DataError, match=f"not a complete {noun} set"):
        ensure()
