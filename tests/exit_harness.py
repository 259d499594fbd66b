"""launch/pretrain.py with one fault injected, for tests/test_exit.py (run as a script):

    python tests/exit_harness.py FAULT PIDS_FILE [pretrain.py arguments...]

FAULT: step (train_step raises at step 2; step-rank1: on rank 1 only, under torchrun), loader (a DataLoader worker raises on its second
batch), save (the first checkpoint write raises), monitor (the kNN monitor raises at step 2),
none, or slow-watchdog (workers notice a dead trainer only after 120 s instead of 5: they outlive
a SIGKILLed trainer, as they may for up to 5 s in a real run). The pids of the trainer's worker
processes are written to PIDS_FILE (one line, space-separated; PIDS_FILE.<rank> under torchrun)
once the first batch arrived.
"""
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import multiprocessing  # noqa: E402

from densecl_fast import trainer  # noqa: E402
from densecl_fast.data import torch_loader  # noqa: E402

fault, pids_file = sys.argv[1], sys.argv[2]
if "RANK" in os.environ:  # under torchrun: one file per rank
    pids_file += "." + os.environ["RANK"]
sys.argv = [os.path.join(ROOT, "launch", "pretrain.py"), *sys.argv[3:]]


Injected = RuntimeError  # a built-in: a worker's exception crosses to the trainer pickled by name


def write_worker_pids():
    with open(pids_file + ".tmp", "w") as f:
        f.write(" ".join(str(p.pid) for p in multiprocessing.active_children()))
    os.replace(pids_file + ".tmp", pids_file)


real_step = trainer.train_step
calls = {"step": 0, "item": 0}


def train_step(*args, **kw):
    calls["step"] += 1
    if calls["step"] == 1:
        write_worker_pids()
    failing = fault == "step" or (fault == "step-rank1" and os.environ.get("RANK") == "1")
    if failing and calls["step"] == 2:
        raise Injected("injected failure in the training step")
    return real_step(*args, **kw)


trainer.train_step = train_step

if fault == "loader":
    real_getitem = torch_loader.TwoViewDataset.__getitem__

    def getitem(self, key):
        calls["item"] += 1  # per worker process (forked with the patch)
        if calls["item"] > 8:  # the worker's first batch (8 images) comes through
            raise Injected("injected failure in a data worker")
        return real_getitem(self, key)

    torch_loader.TwoViewDataset.__getitem__ = getitem
elif fault == "save":
    def save_checkpoint(run, reason):
        raise Injected("injected failure in a checkpoint write")

    trainer.save_checkpoint = save_checkpoint
elif fault == "monitor":
    class FailingMonitor:
        def due(self, step, steps_per_epoch):
            return step == 2

        def run(self, model):
            raise Injected("injected failure in the kNN monitor")

        def postfix(self):
            return {}

    trainer.KnnMonitor.build = classmethod(lambda cls, *a, **kw: FailingMonitor())
elif fault == "slow-watchdog":
    import torch.utils.data._utils.worker as worker_mod
    worker_mod.MP_STATUS_CHECK_INTERVAL = 120.0
elif fault not in ("step", "step-rank1", "none"):
    sys.exit(f"unknown fault {fault}")

runpy.run_path(sys.argv[0], run_name="__main__")
