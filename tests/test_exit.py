"""A failed run ends, and its lock dies with it.

A failure anywhere in the loop (the step, a data worker, a checkpoint write, the kNN monitor) ends
the trainer with status 1 within seconds and leaves no DataLoader worker behind (the workers ignore
SIGTERM, and the interpreter's exit used to join them for ever); bad input that would fail in the
first step is exit 2 before any work. The run directory's lock is not inherited by forked children,
so a SIGKILLed run can be resumed at once. The failing runs go through tests/exit_harness.py, which
runs launch/pretrain.py with one fault injected.
"""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from densecl_fast.checkpoint import list_checkpoints
from densecl_fast.config import ConfigError
from densecl_fast.distributed import DistInfo
from densecl_fast.run_dir import RunLock, lock_run_dir
from helpers import PRETRAIN, ROOT, load_script, tiny

HARNESS = os.path.join(ROOT, "tests", "exit_harness.py")
EXIT_WITHIN_S = 30  # from the first step (the failure comes at step 2 to 4) to the exit

pretrain_cli = load_script("pretrain_cli_exit", PRETRAIN)


def alive(pid):
    """Whether `pid` is a live process (a zombie is dead: it only waits to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start(fault, out, data_cache, *extra, tmp_path):
    pids_file = str(tmp_path / f"{fault}.pids")
    args = tiny(out, data_cache, "data.num_workers=2", *extra)
    proc = subprocess.Popen([sys.executable, HARNESS, fault, pids_file, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc, pids_file


def wait_for_file(proc, path, timeout=300):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before its first step:\n{proc.stdout.read()}")
        assert time.time() < deadline, "no first step"
        time.sleep(0.1)
    with open(path) as f:
        return [int(p) for p in f.read().split()]


def kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the test's own leftovers, the fixed code leaves none
    except ProcessLookupError:
        pass


slow = pytest.mark.slow  # another engine or backend: the same way out of train(), a spot check each


@pytest.mark.parametrize("fault, extra, message", [
    ("step", [], "injected failure in the training step"),
    ("loader", [], "injected failure in a data worker"),
    ("save", [], "injected failure in a checkpoint write"),
    ("monitor", [], "injected failure in the kNN monitor"),
    pytest.param("step", ["train.engine=ddp"], "injected failure in the training step", marks=slow),
    pytest.param("step", ["train.engine=fsdp"], "injected failure in the training step", marks=slow),
    pytest.param("step", ["data.backend=dali"], "injected failure in the training step",
                 marks=[slow, pytest.mark.dali]),
], ids=["step", "loader", "save", "monitor", "ddp", "fsdp", "dali"])
def test_a_failure_in_the_loop_exits_1_and_leaves_no_worker(fault, extra, message, tmp_path, data_cache):
    if "data.backend=dali" in extra:
        pytest.importorskip("nvidia.dali")
    proc, pids_file = start(fault, str(tmp_path / "run"), data_cache, *extra, tmp_path=tmp_path)
    try:
        workers = wait_for_file(proc, pids_file)
        assert len(workers) == (0 if "data.backend=dali" in extra else 2), workers  # DALI: threads only
        t0 = time.time()
        try:
            text, _ = proc.communicate(timeout=EXIT_WITHIN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {EXIT_WITHIN_S} s after its first step (workers {workers} alive: "
                        f"{[alive(p) for p in workers]})")
    finally:
        kill_group(proc)
    assert proc.returncode == 1, text
    assert message in text and "Traceback" in text, text
    assert time.time() - t0 < EXIT_WITHIN_S
    assert not [p for p in workers if alive(p)], f"workers left running: {workers}"


@pytest.mark.distributed
@pytest.mark.slow
def test_a_failure_on_one_rank_under_torchrun_ends_the_launch(tmp_path, data_cache):
    pids_file = str(tmp_path / "pids")
    args = tiny(str(tmp_path / "run"), data_cache, "data.num_workers=1", "train.engine=ddp", "train.deterministic=false")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             HARNESS, "step-rank1", pids_file, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        workers = wait_for_file(proc, pids_file + ".0") + wait_for_file(proc, pids_file + ".1")
        try:
            text, _ = proc.communicate(timeout=EXIT_WITHIN_S + 30)  # + torchrun's own shutdown of rank 0
        except subprocess.TimeoutExpired:
            pytest.fail("torchrun still running after one rank failed")
    finally:
        kill_group(proc)
    assert proc.returncode == 1 and "injected failure in the training step" in text, text
    assert not [p for p in workers if alive(p)], f"workers left running: {workers}"


def test_a_batch_norm_group_of_one_value_is_refused_before_any_work(tmp_path, data_cache, capsys):
    # a batch of 1 under plain BN at 32 px: 1x1 at the last stage, "Expected more than 1 value per
    # channel" in the first step, which used to hang with workers
    out = str(tmp_path / "r")
    rc = pretrain_cli.main(tiny(out, data_cache, "optim.batch_size=1", "model.bn_group_size=0",
                                "data.image_size=32", "data.num_workers=1"))
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "optim.batch_size=1" in err and "data.image_size=32" in err, err
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))
    # two images per group, or more positions per image, is fine: the check lets it through to the data
    for ok in (["optim.batch_size=2", "model.bn_group_size=0", "data.image_size=32"],
               ["optim.batch_size=1", "model.bn_group_size=0", "data.image_size=40"]):
        rc = pretrain_cli.main(tiny(str(tmp_path / "ok"), data_cache, *ok, "data.source=/nope"))
        err = capsys.readouterr().err
        assert rc == 2 and "/nope" in err and "BatchNorm" not in err, err


# ---- the run lock: dies with its owner ---------------------------------------------------------------

def test_the_run_lock_is_held_for_the_block_that_takes_it(tmp_path):
    """train() enters lock_run_dir on its ExitStack: the directory is locked for the block only, and
    released when the block fails (a failed run must not leave its directory locked)."""
    out, said = str(tmp_path / "run"), []
    with lock_run_dir(out, None, DistInfo(), torch.device("cpu"), said.append):
        with pytest.raises(ConfigError, match="in use by another run"):
            RunLock(out).acquire()
    with pytest.raises(ValueError, match="the run failed"):
        with lock_run_dir(out, None, DistInfo(), torch.device("cpu"), said.append):
            raise ValueError("the run failed")
    with RunLock(out) as lock:  # free again; RunLock is a context manager too
        assert lock.fd is not None
    assert lock.fd is None and said == []
    with pytest.raises(ConfigError, match="is an existing file"):  # refused before the block: nothing held
        with lock_run_dir(os.path.join(out, ".lock"), None, DistInfo(), torch.device("cpu"), said.append):
            pass


def test_a_forked_child_does_not_keep_the_run_lock(tmp_path):
    out = str(tmp_path)
    lock = RunLock(out).acquire()
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:  # a DataLoader worker, say: lives on a while after its parent
        os.write(ready_w, b"1")  # (after the fork hooks ran)
        time.sleep(30)
        os._exit(0)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"1"
        # the owner dies without unlocking: its descriptor closes, the child's copy must not hold the lock
        os.close(lock.fd)
        lock.fd = None
        again = RunLock(out).acquire()
        again.release()
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(ready_r)
        lock.release()


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def hold_lock(out, holder_text, seconds):
    """Another process that locks `out` and writes `holder_text` as its owner."""
    code = ("import fcntl, os, sys, time\n"
            f"fd = os.open({os.path.join(out, '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            f"os.ftruncate(fd, 0); os.pwrite(fd, {holder_text!r}.encode(), 0)\n"
            "print('locked', flush=True)\n"
            f"time.sleep({seconds})\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_dead_owners_lock_is_waited_for_then_its_leftovers_named(tmp_path, monkeypatch):
    out = str(tmp_path)
    owner = f"{dead_pid()} on {socket.gethostname()}\n"
    # what a killed run's leftover holds goes when the leftover does: acquired, not refused
    monkeypatch.setattr(RunLock, "dead_owner_wait_s", 20.0)
    leftover = hold_lock(out, owner, 1.5)
    try:
        RunLock(out).acquire().release()
        assert leftover.wait(timeout=10) == 0
    finally:
        leftover.kill()
        leftover.wait()
    # a leftover that stays: named, to be ended
    monkeypatch.setattr(RunLock, "dead_owner_wait_s", 0.5)
    leftover = hold_lock(out, owner, 60)
    try:
        with pytest.raises(ConfigError, match=rf"has ended, but process\(es\) {leftover.pid} it left behind"):
            RunLock(out).acquire()
    finally:
        leftover.kill()
        leftover.wait()
    # a live owner is another run: refused at once
    live = hold_lock(out, f"{os.getpid()} on {socket.gethostname()}\n", 60)
    try:
        t0 = time.time()
        with pytest.raises(ConfigError, match=r"is in use by another run"):
            RunLock(out).acquire()
        assert time.time() - t0 < 0.4
    finally:
        live.kill()
        live.wait()


@pytest.mark.slow  # ~30 s: a run to its first checkpoint, then a resumed step
def test_sigkill_with_workers_alive_then_resume_at_once(tmp_path, data_cache, capsys):
    out = str(tmp_path / "run")
    # workers that outlive their killed trainer (their watchdog looks every 120 s, not 5)
    proc, pids_file = start("slow-watchdog", out, data_cache, "optim.epochs=50", tmp_path=tmp_path)
    workers = []
    try:
        workers = wait_for_file(proc, pids_file)
        deadline = time.time() + 120
        while not list_checkpoints(out):
            assert proc.poll() is None and time.time() < deadline, "no checkpoint"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)  # the trainer only: its workers live on
        proc.wait()
        assert [p for p in workers if alive(p)], "the workers died with the trainer: nothing tested"
        RunLock(out).acquire().release()  # what --resume does first: not "in use by another run"
        step = int(os.path.basename(list_checkpoints(out)[-1])[5:14])
        rc = pretrain_cli.main([*tiny(out, data_cache, "optim.epochs=50", f"optim.max_steps={step + 1}"),
                                "--resume", "auto"])
        cap = capsys.readouterr()
        assert rc == 0, cap.err
        assert "resumed from" in cap.out and f"max_steps: {step + 1}/" in cap.out, cap.out
    finally:
        kill_group(proc)
        for p in workers:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
