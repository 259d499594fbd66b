#!/usr/bin/env python
"""Short-budget reproduction of the 200-epoch DenseCL recipe (see densecl_fast/reproduce/ and docs/reproduce.md).

    python launch/reproduce.py --data /data/imagenet/train --val /data/imagenet/val --budget 8h --baseline
    python launch/reproduce.py --data synthetic --config smoke --budget 3m --baseline --out runs/repro_cpu
    python launch/reproduce.py --out runs/repro_cpu --resume
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from densecl_fast.reproduce import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
