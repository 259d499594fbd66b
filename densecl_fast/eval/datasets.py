"""Labelled train/eval splits for evaluation, from the same sources pretraining reads.

`load_splits(data, val, ...) -> (train, val)`; each a `Split`: a way to get image i as a PIL RGB
image, integer labels and class names. Sources:
  * `fashion-mnist:ROOT`  the official train split is the bank/training set, the test split the
                          evaluation set (images straight from the idx files);
  * `synthetic`           the built-in set, split deterministically: every 5th image is held out;
  * an image folder with class sub-folders, or a `.txt` list with labels; `--val` names the
                          evaluation set, else every 5th image is held out.
`max_train`/`max_val` take the first N of each split (in the source's order).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np
from PIL import Image

from ..config import DataConfig
from ..data import DataError, fashion_mnist
from ..data.sources import list_samples, load_rgb

HOLDOUT_EVERY = 5  # deterministic split of a single source: images 4, 9, 14, ... are held out


@dataclass
class Split:
    name: str                             # identifies the images, for the feature cache
    get: Callable[[int], Image.Image]     # image i as PIL RGB
    labels: np.ndarray                    # int64 [N]
    classes: List[str]

    def __len__(self) -> int:
        return len(self.labels)


def _from_arrays(name: str, images: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> Split:
    return Split(name, lambda i: Image.fromarray(images[i], "L").convert("RGB"), labels, list(classes))


def _from_samples(name: str, samples, classes: Optional[List[str]] = None) -> Split:
    missing = [s.path for s in samples if s.label is None]
    if missing:
        raise DataError(f"{name}: {len(missing)} images have no label (use class sub-folders or a "
                        f"'path label' list), e.g. {missing[0]}")
    classes = classes or sorted({s.label for s in samples})
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({s.label for s in samples} - set(index))
    if unknown:
        raise DataError(f"{name}: classes {unknown[:5]} are not in the training split's classes")
    paths = [s.path for s in samples]
    return Split(name, lambda i: load_rgb(paths[i]), np.array([index[s.label] for s in samples], np.int64), classes)


def _take(split: Split, n: int) -> Split:
    if not n or n >= len(split):
        return split
    return Split(f"{split.name}[:{n}]", split.get, split.labels[:n], split.classes)


def load_splits(data: str, val: str = "", *, max_train: int = 0, max_val: int = 0,
                cache_dir: str = "~/.cache/densecl_fast", synthetic_images: int = 512,
                synthetic_resolution: int = 160):
    fm = fashion_mnist.parse_source(data)
    if fm is not None:
        root = fm[0]
        tr = _from_arrays(f"fashion-mnist:{root}#train", *fashion_mnist.load_fashion_mnist(root, "train"),
                          fashion_mnist.CLASSES)
        te = _from_arrays(f"fashion-mnist:{root}#test", *fashion_mnist.load_fashion_mnist(root, "test"),
                          fashion_mnist.CLASSES)
        return _take(tr, max_train), _take(te, max_val)

    def listed(source):
        return list_samples(DataConfig(source=source, cache_dir=cache_dir, synthetic_images=synthetic_images,
                                       synthetic_resolution=synthetic_resolution))

    samples = listed(data)
    name = data if data != "synthetic" else f"synthetic-{synthetic_images}-{synthetic_resolution}"
    if val:
        tr = _from_samples(name, samples)
        te = _from_samples(val, listed(val), tr.classes)
    else:
        keep = [s for i, s in enumerate(samples) if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]
        held = [s for i, s in enumerate(samples) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
        if not held:
            raise DataError(f"{data}: too few images to hold out every {HOLDOUT_EVERY}th for evaluation")
        tr = _from_samples(name + "#train", keep)
        te = _from_samples(name + "#heldout", held, tr.classes)
    return _take(tr, max_train), _take(te, max_val)
