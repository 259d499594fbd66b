"""Shared by the tests: the override list of a tiny, deterministic CPU run, launch/ scripts loaded
as modules (their main() called in-process), and the DALI tests' probe images and draws."""
import importlib.util
import math
import os

import numpy as np
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
