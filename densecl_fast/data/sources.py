"""Where the images come from: `data.source` -> a validated list of image files.

`data.source` is one of
  * "synthetic"          the built-in data set (generated on first use, see `synthetic.py`);
  * fashion-mnist:ROOT[#test]            Fashion-MNIST's photos (`fashion_mnist.py`);
  * fashion-mnist-mosaics:ROOT[#tokens]  2x2 mosaics of Fashion-MNIST garments, a label per quadrant (`mosaics.py`);
  * an image folder      searched recursively; a first-level sub-folder names the class of the
                         images under it (optional); extensions jpg/jpeg/png/webp/bmp/tif/tiff in
                         any case; hidden folders are skipped; sorted, so the order is the same on
                         every machine;
  * a .txt file list     one image per line, optionally followed by whitespace and a label; blank
                         lines and lines starting with '#' are ignored; relative paths are resolved
                         against `data.root`, or the list's own folder when `data.root` is empty.

Problems are `DataError`s raised before any model is built: a missing folder or list, an empty
data set, list entries that do not exist. Files that exist but do not decode are found by
`scan_images` (and `launch/scan_data.py`, which writes a clean list); the loaders also survive them.

`list_images(data_cfg) -> list[str]` (absolute paths) is the stable entry point other loaders use.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from . import fashion_mnist, mosaics
from .errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
_SHOW = 5  # offending entries quoted in an error message
# Spellings of sets that were removed -> why, and what to use instead. Refused by name: otherwise they
# would read as a path and fail as "does not exist" about a folder called "fashion-mnist-scenes:...".
REMOVED = {
    "fashion-mnist-scenes:": "the Fashion-MNIST scenes were removed (they could not rank trunks: "
                             "docs/real-data-checks.md); use fashion-mnist-mosaics:ROOT (preset fashion_mnist_mosaic)",
}


class BuiltIn(NamedTuple):
    """A source string that names a generated or installed set rather than a path."""
    kind: str                 # synthetic | fashion-mnist | mosaics
    spec: object              # fashion-mnist: (root, split); mosaics: its spec; synthetic: None


def parse_builtin(source: str) -> Optional[BuiltIn]:
    """The built-in set that `source` spells (its tokens checked: a malformed one is a DataError), or
    None for anything else (a folder, a list, shards). The one reader of these spellings for
    pretraining, evaluation and the kNN monitor. A removed set's spelling is a DataError (see REMOVED)."""
    source = str(source).strip()
    if source == "synthetic":
        return BuiltIn("synthetic", None)
    check_not_removed(source)
    for kind, parse in (("fashion-mnist", fashion_mnist.parse_source), ("mosaics", mosaics.parse_source)):
        spec = parse(source)
        if spec is not None:
            return BuiltIn(kind, spec)
    return None


def check_not_removed(source: str) -> None:
    """A DataError naming `source` when it spells a removed set."""
    source = str(source).strip()
    for prefix, why in REMOVED.items():
        if source.startswith(prefix):
            raise DataError(f"{source!r}: {why}")


class Sample(NamedTuple):
    path: str                 # absolute
    label: Optional[str]      # class folder name or the file list's label; None when unknown


@dataclass
class Listing:
    samples: List[Sample]
    missing: List[str]        # file-list entries that do not exist (as resolved)
    description: str          # what was listed, for messages


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_folder(folder: str) -> List[Sample]:
    folder = os.path.abspath(os.path.expanduser(folder))
    samples, seen = [], set()
    # followlinks: class folders are often symlinks into a shared copy; `seen` breaks link cycles.
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, folder)
        label = None if rel == "." else rel.split(os.sep)[0]
        samples.extend(Sample(os.path.join(dirpath, f), label) for f in filenames
                       if is_image_file(f) and not f.startswith("."))
    samples.sort()
    return samples


def read_file_list(list_path: str, root: str = "") -> Tuple[List[Sample], List[str]]:
    """Parse a file list -> (existing samples in list order, missing resolved paths)."""
    list_path = os.path.abspath(os.path.expanduser(list_path))
    base = os.path.abspath(os.path.expanduser(root)) if root else os.path.dirname(list_path)
    samples, missing = [], []
    with open(list_path, "rb") as f:
        raw_lines = f.read().split(b"\n")
    if raw_lines and raw_lines[0].startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
        raw_lines[0] = raw_lines[0][3:]
    for number, raw in enumerate(raw_lines, 1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            # Non-UTF-8 bytes: fine when they are a file name as stored on disk (launch/scan_data.py
            # writes such names as they are); otherwise the list is in another encoding.
            line = os.fsdecode(raw).strip()
            if not _entry_exists(line, base):
                raise DataError(f"file list {list_path}, line {number}: not UTF-8 (byte 0x{raw[e.start]:02x} at "
                                f"column {e.start + 1}) and no such file; save the list as UTF-8") from None
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        # "path label" first (one stat per line in the common case), else the whole line is
        # the path (a file name with spaces).
        if len(parts) == 2:
            labelled = os.path.normpath(os.path.join(base, os.path.expanduser(parts[0])))
            if os.path.isfile(labelled):
                samples.append(Sample(labelled, parts[1]))
                continue
        whole = os.path.normpath(os.path.join(base, os.path.expanduser(line)))
        if os.path.isfile(whole):
            samples.append(Sample(whole, None))
        else:
            # Report what was meant: a last word that looks like a file name ("my photo.jpg") is
            # part of the path, not a label.
            is_label = len(parts) == 2 and "/" not in parts[1] and not is_image_file(parts[1])
            missing.append(labelled if is_label else whole)
    return samples, missing


def _entry_exists(line: str, base: str) -> bool:
    parts = line.rsplit(None, 1)
    candidates = [line] + ([parts[0]] if len(parts) == 2 else [])
    return any(os.path.isfile(os.path.normpath(os.path.join(base, os.path.expanduser(c)))) for c in candidates if c)


def resolve_source(data_cfg) -> Listing:
    """List `data_cfg.source` without judging the result (see `list_samples` for the checks)."""
    source = str(data_cfg.source).strip()
    if not source:
        raise DataError("data.source is empty: point it at an image folder, a .txt file list, or 'synthetic' "
                        "(e.g. data.source=/data/imagenet/train)")
    builtin = parse_builtin(source)
    kind, spec = builtin if builtin is not None else (None, None)
    if kind == "fashion-mnist":
        folder = fashion_mnist.ensure_image_folder(*spec, data_cfg.cache_dir)
        meta = fashion_mnist.read_labels(folder)
        # idx order (not the folder's sorted order), so "the first N images" means what it says
        samples = [Sample(os.path.join(folder, rel), fashion_mnist.CLASSES[lab])
                   for rel, lab in zip(meta["images"], meta["labels"])]
        return Listing(samples, [], f"Fashion-MNIST {spec[1]} split ({spec[0]})")
    if kind == "mosaics":
        folder, meta = mosaics.ensure_mosaics(spec, spec.split, data_cfg.cache_dir)
        samples = [Sample(os.path.join(folder, e["image"]), mosaics.CLASSES[e["label"]]) for e in meta["images"]]
        return Listing(samples, [], f"Fashion-MNIST mosaics, {spec.split} split ({folder})")
    if kind == "synthetic":
        from .synthetic import ensure_synthetic
        folder = ensure_synthetic(data_cfg.cache_dir, data_cfg.synthetic_images, data_cfg.synthetic_resolution)
        return Listing(list_folder(os.path.join(folder, "images")), [], f"the built-in data set at {folder}")
    path = os.path.abspath(os.path.expanduser(source))
    if os.path.isdir(path):
        return Listing(list_folder(path), [], f"image folder {path}")
    if os.path.isfile(path):
        if not path.lower().endswith(".txt"):
            raise DataError(f"data.source={source!r} is a file but not a .txt file list "
                            "(use an image folder, a .txt list, or 'synthetic')")
        samples, missing = read_file_list(path, getattr(data_cfg, "root", ""))
        return Listing(samples, missing, f"file list {path}")
    if any(c in source for c in "*?["):
        raise DataError(f"data.source={source!r} looks like a shard pattern; only data.backend=dali reads "
                        "shards, the torch backend needs an image folder, a .txt file list or 'synthetic'")
    raise DataError(f"data.source={source!r} does not exist (looked for {path}); "
                    "give an image folder, a .txt file list, or 'synthetic'")


def list_samples(data_cfg) -> List[Sample]:
    listing = resolve_source(data_cfg)
    limit = int(getattr(data_cfg, "max_images", 0) or 0)
    if limit:  # the first N of the source's own order (a file list's order; a folder's sorted order)
        listing.samples = listing.samples[:limit]
    if listing.missing:
        n = len(listing.missing)
        shown = "\n  ".join(listing.missing[:_SHOW]) + ("\n  ..." if n > _SHOW else "")
        raise DataError(f"{n} of {n + len(listing.samples)} entries of {listing.description} do not exist, "
                        f"e.g.\n  {shown}\n(check data.root; launch/scan_data.py writes a list of the good ones)")
    if not listing.samples:
        raise DataError(f"no images in {listing.description} (looked for {', '.join(IMAGE_EXTENSIONS)}, "
                        "in any case, recursively)")
    return listing.samples


def list_images(data_cfg) -> List[str]:
    """Absolute paths of the images of `data_cfg.source`, in a deterministic order."""
    return [s.path for s in list_samples(data_cfg)]


class PathTable:
    """Paths packed in one bytes buffer: a Python list of a million str would be copied page by
    page into every forked worker as reference counts are touched; numpy buffers are not."""

    def __init__(self, paths: Sequence[str]):
        # os.fsencode: file names that are not UTF-8 (a Latin-1 name, say) come from os.walk as
        # surrogate escapes and go back to the very same bytes.
        encoded = [os.fsencode(p) for p in paths]
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)
        self._ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> str:
        return os.fsdecode(self.raw(i))

    def raw(self, i: int) -> bytes:
        """The file name's own bytes."""
        start = int(self._ends[i - 1]) if i > 0 else 0
        return self._blob[start:int(self._ends[i])].tobytes()


# --- decoding --------------------------------------------------------------------------------

def _to_uint8(img: Image.Image) -> Image.Image:
    """High-bit-depth grayscale (I;16*, I, F) -> L, scaled, where PIL's convert would clip to 255."""
    a = np.asarray(img, dtype=np.float64)
    top = float(a.max()) if a.size else 0.0
    if img.mode.startswith("I;16") or top > 255.0:
        a = a * (255.0 / 65535.0)
    elif img.mode == "F" and top <= 1.0:
        a = a * 255.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited on white (fully transparent pixels often
    hold arbitrary colours, which dropping the alpha would expose)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_uint8(img)
    return img.convert("RGB")


def load_rgb(path: str, min_side: Optional[int] = None) -> Image.Image:
    """Decode `path` fully into an RGB image; raises on truncated or corrupt files.

    `min_side`: JPEGs much larger than needed are decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT
    scaling, several times faster) but never below `min_side` pixels on the short side.
    """
    with Image.open(path) as img:
        if min_side:
            img.draft("RGB", (min_side, min_side))
        img.load()
        if img.width < 1 or img.height < 1:
            raise OSError(f"empty image {img.size}")
        return to_rgb(img)


def draft_side(image_size: int, min_scale: float) -> int:
    """Short side a source image needs so that no view is upsampled: the smallest crop covers
    min_scale of the area at aspect 3/4, i.e. sqrt(min_scale * 3/4) of the short side."""
    return math.ceil(image_size / math.sqrt(min_scale * 3.0 / 4.0))


def _check(path: str) -> Optional[str]:
    try:
        load_rgb(path)
        return None
    except Exception as e:  # PIL raises many types for bad files; any of them means "drop it"
        return f"{type(e).__name__}: {e}"


def scan_images(paths: Sequence[str], workers: int = 8,
                progress: Optional[Callable[[int], None]] = None) -> Tuple[List[str], List[Tuple[str, str]]]:
    """Fully decode every file -> (good paths, [(bad path, reason)]), both in input order.

    Threads suffice: PIL releases the GIL while decoding. `progress(n)` is called as files finish.
    """
    reasons: List[Optional[str]] = []
    chunk = 4096  # bounded submission: one future per file for a million files would not be
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(paths), chunk):
            for r in pool.map(_check, paths[start:start + chunk]):
                reasons.append(r)
                if progress is not None:
                    progress(1)
    good = [p for p, r in zip(paths, reasons) if r is None]
    bad = [(p, r) for p, r in zip(paths, reasons) if r is not None]
    return good, bad
