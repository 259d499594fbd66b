#!/usr/bin/env python
"""Validate a data set up front: decode every image, write a clean file list, report the rest.

    python launch/scan_data.py /data/imagenet/train --out train_clean.txt
    python launch/scan_data.py files.txt --root /data --out clean.txt --workers 16

SOURCE is what `data.source` accepts (image folder, .txt file list, "synthetic"). The clean list
has one absolute path per line, followed by the label when there is one (class folder or the
input list's label); train on it with data.source=clean.txt. Entries of an input list that do
not exist are dropped and reported too. Exit status: 0 when the list was written, 1 when no
image was readable, 2 for a bad SOURCE.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tqdm import tqdm  # noqa: E402

from densecl_fast.config import DataConfig  # noqa: E402
from densecl_fast.data import DataError  # noqa: E402
from densecl_fast.data.sources import resolve_source, scan_images  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("source", help="image folder, .txt file list, or 'synthetic'")
    p.add_argument("--out", required=True, help="clean file list to write")
    p.add_argument("--root", default="", help="base folder for relative paths in a file list (data.root)")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="decoding threads")
    p.add_argument("--show", type=int, default=20, help="dropped files to print (all go to --out.dropped.txt)")
    return p.parse_args(argv)


def write_atomically(path: str, lines) -> None:
    # surrogateescape: a file name that is not UTF-8 is written as its own bytes, which is what
    # a file list read back by data.source needs (see sources.read_file_list).
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.writelines(line + "\n" for line in lines)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def shown(path: str) -> str:
    """A path for the terminal: bytes that are not UTF-8 as \\x.. escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def main(argv=None) -> int:
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    if os.path.isdir(out):
        print(f"error: --out {args.out} is a directory; give the file list to write", file=sys.stderr)
        return 2
    if not os.path.isdir(os.path.dirname(out)):
        print(f"error: --out {args.out}: the folder {os.path.dirname(out)} does not exist", file=sys.stderr)
        return 2
    try:
        listing = resolve_source(DataConfig(source=args.source, root=args.root))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    labels = {s.path: s.label for s in listing.samples}
    paths = [s.path for s in listing.samples]
    print(f"scanning {len(paths)} images of {listing.description}", file=sys.stderr)
    with tqdm(total=len(paths), unit="img", file=sys.stderr, dynamic_ncols=True) as bar:
        good, bad = scan_images(paths, workers=args.workers, progress=bar.update)
    dropped = [(p, "missing file") for p in listing.missing] + bad

    # A label is the last word of a line: whitespace inside one (a folder "my class") becomes "_".
    try:
        write_atomically(out, [p if labels[p] is None else f"{p} {'_'.join(labels[p].split())}" for p in good])
        if dropped:
            write_atomically(out + ".dropped.txt", [f"{p}\t{why}" for p, why in dropped])
        elif os.path.exists(out + ".dropped.txt"):
            os.remove(out + ".dropped.txt")  # from an earlier scan; it would now be wrong
    except OSError as e:
        print(f"error: cannot write {e.filename or out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"kept {len(good)} images -> {out}; dropped {len(dropped)} "
          f"({len(listing.missing)} missing, {len(bad)} unreadable)", file=sys.stderr)
    for p, why in dropped[: args.show]:
        print(f"  dropped {shown(p)}: {why}", file=sys.stderr)
    if len(dropped) > args.show:
        print(f"  ... all {len(dropped)} in {out}.dropped.txt", file=sys.stderr)
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
