"""Export a pretrained trunk for downstream libraries.

    python -m densecl_fast.export runs/densecl/checkpoints/ckpt_000100000.pt --format detectron2 --out r50.pkl

CKPT is normally our training checkpoint, but any file `weights.read_weights` reads works (an
OpenSelfSup / mmselfsup checkpoint, another export), so this also converts between layouts.
Writes FILE and FILE.json (arch, step, source, encoder, config) and prints what it wrote (and
which existing files it replaced). It never writes over CKPT itself (or into a checkpoint folder).
A bad argument, input or output is one line on stderr, `error: ...`, and exit status 2.
"""
from __future__ import annotations

import os
import sys

from .checkpoint import checkpoint_kind
from .usage import Parser, UsageError
from .weights import ARCHS, FORMATS, WeightsError, export_backbone, read_weights


def _same(a: str, b: str) -> bool:
    """Whether paths a and b are one file: the same resolved path (symbolic links) or inode (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def check_out(ckpt: str, out: str) -> list[str]:
    """Refuse an --out that would overwrite the input; -> the existing files the export will replace."""
    if not out:
        raise UsageError("--out is empty: name the file to write (e.g. --out r50.pth)")
    src = os.path.realpath(ckpt)
    replaced = []
    for path in (out, out + ".json"):
        inside = os.path.isdir(src) and os.path.realpath(path).startswith(src.rstrip(os.sep) + os.sep)
        # an input folder (fsdp .dcp, deepspeed .ds, any other): nothing inside it either
        if os.path.lexists(ckpt) and (_same(path, ckpt) or inside):
            raise UsageError(f"--out {out}: would write over the checkpoint being exported ({ckpt}); "
                             f"choose another file")
        if os.path.isdir(path):
            raise UsageError(f"--out {out}: {path} is a folder; name a file")
        folder = os.path.dirname(os.path.realpath(path))
        while folder != os.path.dirname(folder):  # a file of ours in a checkpoint folder could be taken for a shard
            if checkpoint_kind(folder) in ("dcp", "ds") and os.path.isdir(folder):
                raise UsageError(f"--out {out}: lies inside the checkpoint folder {folder}; write the export elsewhere")
            folder = os.path.dirname(folder)
        if os.path.lexists(path):
            replaced.append(path)
    return replaced


def main(argv=None) -> int:
    try:
        return _main(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(argv) -> int:
    p = Parser(prog="python -m densecl_fast.export", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="training checkpoint (checkpoints/ckpt_*.pt) or any supported weights file")
    p.add_argument("--format", required=True, choices=FORMATS, help="layout to write")
    p.add_argument("--out", required=True, help="file to write (detectron2: .pkl); FILE.json is written next to it")
    p.add_argument("--encoder", default="query", choices=("query", "key"),
                   help="query encoder (default) or the momentum (key) encoder")
    p.add_argument("--arch", choices=ARCHS, help="fail unless the checkpoint holds this arch")
    args = p.parse_args(argv)
    replaced = check_out(args.ckpt, args.out)  # before reading: a mistyped --out costs nothing
    try:
        w = read_weights(args.ckpt, args.arch)
        state = w.backbone if args.encoder == "query" else w.backbone_k
        if state is None:
            raise WeightsError(f"{args.ckpt}: {w.layout} file has no key (momentum) encoder; use --encoder query")
        meta = {"source": os.path.abspath(args.ckpt), "source_layout": w.layout, "encoder": args.encoder,
                "step": w.step, "config": w.config}
        out, side = export_backbone(state, w.arch, args.format, args.out, meta)
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    n = sum(not k.endswith("num_batches_tracked") for k in state) if args.format == "detectron2" else len(state)
    step = w.step if w.step is not None else "unknown"
    print(f"wrote {out} ({args.format}, {w.arch}, {args.encoder} encoder, {n} tensors, step {step}) and {side}"
          + (f"; replaced the existing {' and '.join(replaced)}" if replaced else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
