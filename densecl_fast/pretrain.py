"""Pretrain DenseCL.

    densecl-pretrain                                            # smoke run on the built-in data set
    densecl-pretrain --config densecl_r50_200e_in1k data.source=/data/imagenet/train
    densecl-pretrain --resume auto train.out_dir=runs/smoke
    torchrun --nproc_per_node 8 -m densecl_fast.pretrain --config densecl_r50_200e_in1k data.source=...
    torchrun --nproc_per_node 8 -m densecl_fast.pretrain ... train.engine=fsdp     # FSDP2
    deepspeed --num_gpus 8 --module densecl_fast.pretrain --config ...  # the DeepSpeed engine (ZeRO-1; deepspeed.zero_stage=0|1|2)

The same command as `python -m densecl_fast.pretrain` or, in a checkout, `python launch/pretrain.py`.
Everything after the options is a `key=value` override of the config (see docs/config.md).
"""
import argparse
import os
import sys
import traceback

from .checkpoint import CheckpointError, CheckpointWriteError
from .config import ConfigError, list_presets, load_config, to_yaml
from .data import DataError
from .trainer import NonFiniteLossError, train


def _error(e: Exception) -> None:
    """The `error:` line, printed by the first process of each machine only: under torchrun every rank
    meets the same bad input, and one line per console is the promise. (A problem only another rank of
    the machine has still ends the launch: torchrun's summary names that rank's exit status.)"""
    local = os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) or "0"
    if local.strip() in ("0", ""):
        print(f"error: {e}", file=sys.stderr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="smoke", help=f"preset ({', '.join(list_presets())}) or a YAML file")
    p.add_argument("--resume", default=None, help="'auto' (latest checkpoint in train.out_dir) or a checkpoint path")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. optim.epochs=10")
    # intermixed: overrides may come before or after the options (`--resume auto optim.epochs=4`)
    args = p.parse_intermixed_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))

    try:
        overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
        cfg = load_config(args.config, overrides)
        if args.print_config:
            print(to_yaml(cfg))
            return 0
        summary = train(cfg)
    except CheckpointWriteError as e:  # disk full or I/O error: the run failed, the inputs were fine
        _error(e)
        return 1
    except (ConfigError, DataError, CheckpointError) as e:
        _error(e)
        return 2
    except NonFiniteLossError as e:
        _error(e)
        return 1
    except Exception:
        # Any other failure of the run (the step, the data, the monitor, a save): its traceback, from
        # every rank (it may be one rank's own), and exit 1. train() shut the workers down on its way out.
        traceback.print_exc()
        return 1
    if int(os.environ.get("RANK", "0") or 0) == 0:  # one summary per run, not per process
        print(f"{summary['status']}: {summary['step']}/{summary['total_steps']} steps, run directory "
              f"{summary['out_dir']}, last checkpoint {summary['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
