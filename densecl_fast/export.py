"""Export a pretrained trunk for downstream libraries.

    python -m densecl_fast.export runs/densecl/checkpoints/ckpt_000100000.pt --format detectron2 --out r50.pkl

CKPT is normally our training checkpoint, but any file `weights.read_weights` reads works (an
OpenSelfSup / mmselfsup checkpoint, another export), so this also converts between layouts.
Writes FILE and FILE.json (arch, step, source, encoder, config) and prints what it wrote.
A bad input or output is one line on stderr, `error: ...`, and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys

from .weights import ARCHS, FORMATS, WeightsError, export_backbone, read_weights


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m densecl_fast.export", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="training checkpoint (checkpoints/ckpt_*.pt) or any supported weights file")
    p.add_argument("--format", required=True, choices=FORMATS, help="layout to write")
    p.add_argument("--out", required=True, help="file to write (detectron2: .pkl); FILE.json is written next to it")
    p.add_argument("--encoder", default="query", choices=("query", "key"),
                   help="query encoder (default) or the momentum (key) encoder")
    p.add_argument("--arch", choices=ARCHS, help="fail unless the checkpoint holds this arch")
    args = p.parse_args(argv)
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
    print(f"wrote {out} ({args.format}, {w.arch}, {args.encoder} encoder, {n} tensors, step {step}) and {side}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
