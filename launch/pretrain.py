#!/usr/bin/env python
"""Pretrain DenseCL from a checkout (installed: `densecl-pretrain`, `python -m densecl_fast.pretrain`).

    python launch/pretrain.py                                   # smoke run on the built-in data set
    python launch/pretrain.py --config densecl_r50_200e_in1k data.source=/data/imagenet/train
    python launch/pretrain.py --resume auto train.out_dir=runs/smoke
    torchrun --nproc_per_node 8 launch/pretrain.py --config densecl_r50_200e_in1k data.source=...
    torchrun --nproc_per_node 8 launch/pretrain.py ... train.engine=fsdp     # FSDP2
    deepspeed --num_gpus 8 launch/pretrain.py --config ...      # the DeepSpeed engine (ZeRO-1; deepspeed.zero_stage=0|1|2)

The command is densecl_fast/pretrain.py (`main`); this file only puts the checkout on sys.path, so
that it runs without an install.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from densecl_fast.pretrain import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
