"""Evaluation data: (train, val) splits of labelled images from the `--data` spellings.

An `EvalSplit` is a list of items that `load(i)` turns into an RGB PIL image, with single labels
(classification), multi-label VOC targets (1 present, 0 absent, -1 ignore, the FAIR benchmark's
encoding) and/or mask files. `keys` (item names) feed the feature-cache fingerprint.

Sources: `synthetic` (built-in set; val = every VAL_EVERY-th image), an image folder with class
sub-folders (`--val` folder, else the same deterministic split), a `.txt` list with labels,
`fashion-mnist:ROOT` (train / test split), `fashion-mnist-mosaics:ROOT[#tokens]` (training mosaics / test mosaics; label = the class most quadrants
hold, `cells` = the four quadrant labels, 10 classes + empty, for the per-cell probe), a Pascal VOC
devkit (VOC2007: trainval / test of ImageSets/Main; segmentation: ImageSets/Segmentation train / val
with SegmentationClass PNGs).
"""
from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np
from PIL import Image

from ..data import DataError
from ..data import fashion_mnist, mosaics
from ..data.sources import list_folder, load_rgb, parse_builtin, read_file_list, to_rgb

VAL_EVERY = 5            # deterministic split of sets without one: image i is val when i % 5 == 0
IGNORE_INDEX = 255       # mask value ignored in the dense loss and mIoU (VOC's object borders)
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")


@dataclass
class EvalSplit:
    name: str                                   # "train", "val", "trainval", "test"
    keys: List[str]                             # one string per item (file path or "idx:<i>")
    loader: Callable[[int], Image.Image]
    classes: List[str]
    labels: Optional[np.ndarray] = None         # int64 [N], single-label classification
    targets: Optional[np.ndarray] = None        # int32 [N, C] in {1, 0, -1}
    masks: Optional[List[str]] = None           # mask files (class index per pixel, 255 ignore)
    fingerprint_extra: str = ""
    cells: Optional[np.ndarray] = None          # int64 [N, 4] quadrant labels (mosaics; mosaics.EMPTY = empty)

    def __len__(self):
        return len(self.keys)

    def load(self, i: int) -> Image.Image:
        return self.loader(i)

    def fingerprint(self) -> str:
        """Identity of the images (names, sizes, mtimes): a changed file set makes a new cache entry."""
        h = hashlib.sha1(self.fingerprint_extra.encode())
        for k in self.keys:
            h.update(k.encode("utf-8", "surrogateescape"))
            if os.path.isfile(k):
                st = os.stat(k)
                h.update(f":{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def multilabel_targets(self) -> np.ndarray:
        """VOC targets, or one-vs-rest targets of the single labels (1 = this class, 0 = another)."""
        if self.targets is not None:
            return self.targets
        if self.labels is None:
            raise DataError(f"the {self.name} split has no labels")
        t = np.zeros((len(self.labels), len(self.classes)), np.int32)
        t[np.arange(len(self.labels)), self.labels] = 1
        return t


def _files(paths: Sequence[str], labels, classes, name, masks=None, targets=None, extra="") -> EvalSplit:
    paths = list(paths)
    return EvalSplit(name, paths, lambda i: load_rgb(paths[i]), list(classes),
                     None if labels is None else np.asarray(labels, np.int64), targets, masks, extra)


def _take(split: EvalSplit, n: int) -> EvalSplit:
    """The first n items (n <= 0: all)."""
    if n <= 0 or n >= len(split):
        return split
    keys = split.keys[:n]
    return EvalSplit(split.name, keys, split.loader, split.classes,
                     None if split.labels is None else split.labels[:n],
                     None if split.targets is None else split.targets[:n],
                     None if split.masks is None else split.masks[:n], split.fingerprint_extra,
                     None if split.cells is None else split.cells[:n])


def _split_by_index(paths, labels, classes, masks=None, extra=""):
    idx = np.arange(len(paths))
    val = idx % VAL_EVERY == 0
    pick = lambda seq, m: None if seq is None else [seq[i] for i in idx[m]]
    lab = None if labels is None else np.asarray(labels)
    return (_files(pick(paths, ~val), None if lab is None else lab[~val], classes, "train", pick(masks, ~val), extra=extra),
            _files(pick(paths, val), None if lab is None else lab[val], classes, "val", pick(masks, val), extra=extra))


def _labelled(samples, what: str, classes=None):
    if not samples:
        raise DataError(f"no images in {what}")
    if any(s.label is None for s in samples):
        raise DataError(f"{what}: images without a class (put them in class sub-folders, or labels in the list)")
    classes = classes or sorted({s.label for s in samples})
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({s.label for s in samples} - set(index))
    if unknown:
        raise DataError(f"{what}: classes {unknown[:5]} not in the training classes")
    return [s.path for s in samples], [index[s.label] for s in samples], classes


def find_voc(path: str) -> Optional[str]:
    """The VOC20xx folder at or under `path` (VOCdevkit/VOC2007, VOC2012, or the year folder itself)."""
    for cand in (path, os.path.join(path, "VOC2007"), os.path.join(path, "VOC2012"),
                 os.path.join(path, "VOCdevkit", "VOC2007"), os.path.join(path, "VOCdevkit", "VOC2012")):
        if os.path.isdir(os.path.join(cand, "ImageSets")) and os.path.isdir(os.path.join(cand, "JPEGImages")):
            return cand
    return None


def _voc_ids(voc: str, sub: str, split: str) -> List[str]:
    f = os.path.join(voc, "ImageSets", sub, f"{split}.txt")
    if not os.path.isfile(f):
        raise DataError(f"Pascal VOC: {f} not found")
    with open(f) as fh:
        return [line.split()[0] for line in fh if line.strip()]


def voc_classification(voc: str, split: str) -> EvalSplit:
    """Targets from ImageSets/Main/<cls>_<split>.txt, mapped as the FAIR benchmark's
    create_voc_data_files.py: VOC 1 -> 1 (present), -1 -> 0 (absent), 0 (difficult) -> -1 (ignore)."""
    main = os.path.join(voc, "ImageSets", "Main")
    files = sorted(f for f in glob.glob(os.path.join(main, f"*_{split}.txt"))
                   if len(os.path.basename(f).split("_")) == 2)
    if not files:
        raise DataError(f"Pascal VOC: no {main}/<class>_{split}.txt files")
    classes = [os.path.basename(f).split("_")[0] for f in files]
    table = {}
    for c, f in enumerate(files):
        with open(f) as fh:
            for line in fh:
                parts = line.split()
                if len(parts) != 2:
                    continue
                v = int(parts[1])
                table.setdefault(parts[0], -np.ones(len(files), np.int32))[c] = {1: 1, -1: 0, 0: -1}[v]
    ids = sorted(table)
    paths = [os.path.join(voc, "JPEGImages", i + ".jpg") for i in ids]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"Pascal VOC: {len(missing)} images of {split} missing, e.g. {missing[0]}")
    return _files(paths, None, classes, split, targets=np.stack([table[i] for i in ids]), extra="voc-cls")


def voc_segmentation(voc: str, split: str) -> EvalSplit:
    ids = _voc_ids(voc, "Segmentation", split)
    paths = [os.path.join(voc, "JPEGImages", i + ".jpg") for i in ids]
    masks = [os.path.join(voc, "SegmentationClass", i + ".png") for i in ids]
    missing = [p for p in paths + masks if not os.path.isfile(p)]
    if missing:
        raise DataError(f"Pascal VOC segmentation: {len(missing)} files of {split} missing, e.g. {missing[0]}")
    return _files(paths, None, ("background",) + VOC_CLASSES, split, masks=masks, extra="voc-seg")


def _fashion(root: str, max_train: int, max_val: int):
    out = []
    for split, n in (("train", max_train), ("test", max_val)):
        images, labels = fashion_mnist.load_fashion_mnist(root, split)
        if n > 0:
            images, labels = images[:n], labels[:n]
        loader = (lambda arr: (lambda i: to_rgb(Image.fromarray(arr[i], "L"))))(images)
        keys = [f"fashion-mnist:{split}:{i}" for i in range(len(labels))]
        out.append(EvalSplit("train" if split == "train" else "test", keys, loader, list(fashion_mnist.CLASSES),
                             labels.astype(np.int64), fingerprint_extra=f"{root}:{fashion_mnist.digest(root, split)}"))
    return out


def _mosaics(spec, cache_dir: str):
    out = []
    for split in fashion_mnist.SPLITS:
        folder, meta = mosaics.ensure_mosaics(spec, split, cache_dir)
        s = _files([os.path.join(folder, e["image"]) for e in meta["images"]], [e["label"] for e in meta["images"]],
                   mosaics.CLASSES, split, extra=f"mosaics:{meta['sha256']}")
        s.cells = np.asarray([e["quadrants"] for e in meta["images"]], np.int64).reshape(-1, 4)
        out.append(s)
    return out


def load_eval_data(data: str, *, task: str, val: str = "", root: str = "", max_train: int = 0, max_val: int = 0,
                   synthetic_images: int = 512, synthetic_resolution: int = 160,
                   data_cache_dir: str = "~/.cache/densecl_fast"):
    """-> (train split, eval split). task: "cls" (single labels), "multilabel" (VOC targets or
    one-vs-rest), "seg" (masks), "cells" (the mosaics' quadrant labels and single labels)."""
    data = str(data).strip()
    if not data:
        raise DataError("--data is empty")
    builtin = parse_builtin(data)
    kind, spec = builtin if builtin is not None else (None, None)
    if val and builtin is not None:     # honoured or refused, never ignored
        raise DataError(f"--val {val}: --data {data} brings its own evaluation split (the built-in set's every "
                        f"{VAL_EVERY}th image, or the test split of Fashion-MNIST / the mosaics); drop --val")
    if kind == "mosaics":
        if task == "seg":
            raise DataError("the Fashion-MNIST mosaics have no masks: their dense probe is the cells mode "
                            "(a label per grid cell)")
        if spec.split != "train":
            raise DataError(f"--data {data}: drop the split token; evaluation uses the training mosaics as the "
                            "training split and the test mosaics as the evaluation split")
        train, test = _mosaics(spec, data_cache_dir)
        return _take(train, max_train), _take(test, max_val)
    if task == "cells":
        raise DataError(f"--data {data}: the cells probe needs a label per grid cell: fashion-mnist-mosaics:ROOT")
    if kind == "fashion-mnist":
        if task == "seg":
            raise DataError("Fashion-MNIST has no masks: the dense probe needs 'synthetic' or Pascal VOC (the "
                            "mosaics' dense evaluation is the cells mode: fashion-mnist-mosaics:ROOT)")
        train, test = _fashion(spec[0], max_train, max_val)
        return train, test
    if kind == "synthetic":
        from ..data.synthetic import ensure_synthetic, read_labels
        folder = ensure_synthetic(data_cache_dir, synthetic_images, synthetic_resolution)
        meta = read_labels(folder)
        paths = [os.path.join(folder, e["image"]) for e in meta["images"]]
        labels = [e["label"] for e in meta["images"]]
        if task == "seg":
            masks = [os.path.join(folder, e["mask"]) for e in meta["images"]]
            classes = ["background"] + list(meta["classes"])
            train, test = _split_by_index(paths, None, classes, masks, extra="synthetic-seg")
        else:
            train, test = _split_by_index(paths, labels, meta["classes"], extra="synthetic")
        return _take(train, max_train), _take(test, max_val)
    path = os.path.abspath(os.path.expanduser(data))
    if not os.path.exists(path):
        raise DataError(f"--data {data}: no such folder or file")
    voc = find_voc(path) if os.path.isdir(path) else None
    if voc is not None:
        if val:
            raise DataError(f"--val {val}: a Pascal VOC devkit brings its own splits (ImageSets); drop --val")
        if task == "seg":
            train, test = voc_segmentation(voc, "train"), voc_segmentation(voc, "val")
        else:
            has_test = bool(glob.glob(os.path.join(voc, "ImageSets", "Main", "*_test.txt")))
            train = voc_classification(voc, "trainval" if has_test else "train")
            test = voc_classification(voc, "test" if has_test else "val")
            if task == "cls":
                raise DataError(f"{voc} is a multi-label Pascal VOC set: use the svm or lowshot mode")
        return _take(train, max_train), _take(test, max_val)
    if task == "seg":
        raise DataError(f"--data {data}: the dense probe needs masks ('synthetic' or a Pascal VOC devkit)")
    if os.path.isdir(path):
        p, l, classes = _labelled(list_folder(path), f"image folder {path}")
        if val:
            vp = os.path.abspath(os.path.expanduser(val))
            if not os.path.isdir(vp):
                raise DataError(f"--val {val}: no such folder")
            vpaths, vl, _ = _labelled(list_folder(vp), f"image folder {vp}", classes)
            train, test = _files(p, l, classes, "train"), _files(vpaths, vl, classes, "val")
        else:
            train, test = _split_by_index(p, l, classes)
        return _take(train, max_train), _take(test, max_val)
    if path.lower().endswith(".txt"):
        samples, missing = read_file_list(path, root)
        if missing:
            raise DataError(f"{len(missing)} entries of {path} do not exist, e.g. {missing[0]}")
        p, l, classes = _labelled(samples, f"file list {path}")
        if val:
            vs, vm = read_file_list(os.path.abspath(os.path.expanduser(val)), root)
            if vm:
                raise DataError(f"{len(vm)} entries of {val} do not exist, e.g. {vm[0]}")
            vpaths, vl, _ = _labelled(vs, f"file list {val}", classes)
            train, test = _files(p, l, classes, "train"), _files(vpaths, vl, classes, "val")
        else:
            train, test = _split_by_index(p, l, classes)
        return _take(train, max_train), _take(test, max_val)
    raise DataError(f"--data {data}: not a folder, a .txt list, 'synthetic', fashion-mnist:ROOT "
                    "or fashion-mnist-mosaics:ROOT")


def load_mask(path: str) -> Image.Image:
    """Class-index mask: 'P' palette PNGs (VOC) hold the indices directly; 'L' PNGs (built-in) too."""
    with Image.open(path) as m:
        m.load()
        if m.mode not in ("P", "L"):
            m = m.convert("L")
        return m.copy()
