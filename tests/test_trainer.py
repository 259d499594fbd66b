"""The trainer end to end on the CPU: a run, exact resume, signals, NaN stop, bad checkpoints."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from densecl_fast import kernels, stages
from densecl_fast.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from densecl_fast.config import load_config
from densecl_fast.data import DataError
from densecl_fast.engines.single import SingleEngine
from densecl_fast.model import DenseCL
from helpers import tiny
from densecl_fast.engines import train_step
from densecl_fast.trainer import NonFiniteLossError, lr_at, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_lr_schedule_cosine_with_warmup():
    assert lr_at(0, 100, 0.1, 0, 0.0) == pytest.approx(0.1)
    assert lr_at(50, 100, 0.1, 0, 0.0) == pytest.approx(0.05)
    assert lr_at(100, 100, 0.1, 0, 0.0) == pytest.approx(0.0)
    assert lr_at(0, 100, 0.1, 10, 0.0) == pytest.approx(0.01)
    assert lr_at(9, 100, 0.1, 10, 0.0) == pytest.approx(0.1)
    assert lr_at(55, 100, 0.1, 10, 0.01) == pytest.approx(0.01 + 0.09 * 0.5)


def test_every_stage_of_a_step_reaches_an_installed_timer():
    """perf/ times steps through `stages.timed`: every named stage of the model and of the engine
    must go through the hook, in order, and nothing once the timer is removed."""
    seen = []

    class Recorder:
        def stage(self, name):
            seen.append(name)
            return contextlib.nullcontext()

    cfg = load_config("smoke", ["model.hid_dim=32", "model.out_dim=16", "model.queue_len=8", "optim.batch_size=4",
                                "model.bn_group_size=2"])
    model = DenseCL(cfg.model)
    engine = SingleEngine(torch.device("cpu"), "fp32")
    engine.setup(model, cfg.optim, 0.01)
    x = torch.randn(4, 3, 32, 32)
    with stages.timed(Recorder()):
        train_step(model, engine, x, x.flip(0), 0.01, 0.5)
    assert tuple(seen) == stages.NAMES
    train_step(model, engine, x, x.flip(0), 0.01, 0.5)
    assert len(seen) == len(stages.NAMES)


def test_run_writes_metrics_config_and_checkpoints(tmp_path, data_cache):
    out = str(tmp_path / "run")
    cfg = load_config("smoke", tiny(out, data_cache, "model.dense_warmup_iters=2"))
    summary = train(cfg)
    assert summary["status"] == "finished" and summary["step"] == 8 == summary["total_steps"]
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == list(range(1, 9))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    assert [r["lambda"] for r in recs] == [0.0, 0.0] + [0.5] * 6  # dense warm-up
    assert recs[0]["loss"] == pytest.approx(recs[0]["loss_single"])  # λ = 0: global loss only
    lrs = [r["lr"] for r in recs]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] == pytest.approx(cfg.optim.lr * 8 / 256)  # per 256 images
    assert os.path.exists(os.path.join(out, "config.yaml"))
    ckpts = list_checkpoints(out)
    assert [os.path.basename(p) for p in ckpts] == ["ckpt_000000004.pt", "ckpt_000000008.pt"]
    ck = load_checkpoint(ckpts[-1])  # weights_only=True inside
    assert ck["step"] == 8 and ck["epoch"] == 2 and ck["step_in_epoch"] == 0
    for key in ("encoder_q.backbone.conv1.weight", "encoder_k.backbone.layer4.1.bn2.running_var", "queue", "queue2", "queue_ptr"):
        assert key in ck["model"]
    assert int(ck["model"]["queue_ptr"]) == (8 * 8) % 64
    assert ck["optimizer"]["state"], "optimizer momentum buffers must be saved"


def test_resume_reproduces_the_uninterrupted_run(tmp_path, data_cache):
    straight = str(tmp_path / "straight")
    train(load_config("smoke", tiny(straight, data_cache)))
    split = str(tmp_path / "split")
    first = train(load_config("smoke", tiny(split, data_cache, "optim.max_steps=3")))
    assert first["status"] == "max_steps" and first["step"] == 3
    ck = load_checkpoint(list_checkpoints(split)[-1])
    assert (ck["epoch"], ck["step_in_epoch"]) == (0, 3)  # stopped mid-epoch
    second = train(load_config("smoke", tiny(split, data_cache, "train.resume=auto")))
    assert second["status"] == "finished" and second["step"] == 8

    a, b = read_metrics(straight), read_metrics(split)
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        for k in ("loss", "loss_single", "loss_dense", "lr"):
            assert ra[k] == rb[k], f"step {ra['step']} {k}: {ra[k]} != {rb[k]}"
    sa = load_checkpoint(list_checkpoints(straight)[-1])["model"]
    sb = load_checkpoint(list_checkpoints(split)[-1])["model"]
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_cache, monkeypatch):
    out = str(tmp_path / "nan")
    real = kernels.queue_infonce
    calls = {"n": 0}

    def poisoned(q, l_pos, queue, t):  # two calls per step: global and dense
        calls["n"] += 1
        loss = real(q, l_pos, queue, t)
        return loss * float("nan") if calls["n"] > 4 else loss

    monkeypatch.setattr(kernels, "queue_infonce", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 3 .*ckpt_000000002\.pt"):
        train(load_config("smoke", tiny(out, data_cache, "train.ckpt_every_steps=2")))
    assert [os.path.basename(p) for p in list_checkpoints(out)] == ["ckpt_000000002.pt"]


def test_incompatible_or_corrupt_checkpoint_is_a_clear_error(tmp_path, data_cache):
    out = str(tmp_path / "run")
    train(load_config("smoke", tiny(out, data_cache, "optim.max_steps=1")))
    with pytest.raises(CheckpointError, match="model.arch: checkpoint resnet18 vs now resnet34"):
        train(load_config("smoke", tiny(out, data_cache, "train.resume=auto", "model.arch=resnet34")))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        train(load_config("smoke", tiny(out, data_cache, f"train.resume={bad}")))
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        train(load_config("smoke", tiny(out, data_cache, f"train.resume={tmp_path}/missing.pt")))


def test_missing_data_is_reported_before_the_model_is_built(tmp_path, data_cache):
    with pytest.raises(DataError, match="does-not-exist"):
        train(load_config("smoke", tiny(str(tmp_path / "r"), data_cache, f"data.source={tmp_path}/does-not-exist")))
    with pytest.raises(DataError, match="data.source is empty"):
        train(load_config("densecl_r50_200e_in1k", [f"train.out_dir={tmp_path}/r2"]))


def run_cli(args, **kw):
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "pretrain.py"), *args],
                          capture_output=True, text=True, timeout=300, **kw)


def test_cli_reports_bad_config_values():
    r = run_cli(["model.temperature=-1"])
    assert r.returncode == 2 and "model.temperature=-1.0 must be > 0" in r.stderr
    r = run_cli(["model.no_such_key=1"])
    assert r.returncode == 2 and "no_such_key" in r.stderr
    r = run_cli(["--config", "nope"])
    assert r.returncode == 2 and "unknown config 'nope'" in r.stderr
    r = run_cli(["--print-config", "--local_rank=0", "optim.epochs=7"])  # the deepspeed launcher adds --local_rank
    assert r.returncode == 0 and "epochs: 7" in r.stdout


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path, data_cache):
    out = str(tmp_path / "sig")
    args = tiny(out, data_cache, "optim.epochs=50")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch", "pretrain.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, text
    assert "stopped by SIGTERM" in text
    ck = load_checkpoint(list_checkpoints(out)[-1])
    assert ck["reason"] == "signal" and 1 <= ck["step"] < 400
    r = run_cli(tiny(out, data_cache, "optim.epochs=50", "train.resume=auto", f"optim.max_steps={ck['step'] + 1}"))
    assert r.returncode == 0 and f"resumed from" in r.stdout, r.stdout + r.stderr


@pytest.mark.distributed
def test_two_process_gloo_run_gathers_keys_from_both_ranks(tmp_path, data_cache):
    out = str(tmp_path / "ddp")
    # model.bn=group (per-rank grouped BN and shuffle); the default, shuffle, is covered by test_engines.py
    args = tiny(out, data_cache, "optim.max_steps=3", "model.bn=group")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", "29517", os.path.join(ROOT, "launch", "pretrain.py"), *args],
                       capture_output=True, text=True, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    ck = load_checkpoint(list_checkpoints(out)[-1])
    assert ck["step"] == 3 and len(ck["shuffle_rng"]) == 2
    assert int(ck["model"]["queue_ptr"]) == 3 * 8 % 64  # the global batch (2 ranks x 4) went into the queue
    assert len(read_metrics(out)) == 3
    assert r.stdout.splitlines()[0] == "engine ddp (2 ranks, cpu)"  # auto under torchrun with 2 ranks
    assert "bn group" in r.stdout


@pytest.mark.dali
def test_trainer_runs_on_the_dali_backend_on_cpu(tmp_path, data_cache):
    pytest.importorskip("nvidia.dali")
    out = str(tmp_path / "dali")
    summary = train(load_config("smoke", tiny(out, data_cache, "data.backend=dali", "optim.max_steps=2")))
    assert summary["status"] == "max_steps" and summary["step"] == 2
    recs = read_metrics(out)
    assert len(recs) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    with open(os.path.join(out, "config.yaml")) as f:
        assert "backend: dali" in f.read()


def test_default_command_finishes_the_smoke_run(tmp_path):
    """`python launch/pretrain.py` with no arguments: the README's first run (the goal: < 3 min on 2 cores).
    It must not warn against its own preset (the smoke queue was once 4 epochs long) and, once the
    queue holds real keys (after K / B steps), its loss must fall."""
    env = {**os.environ, "HOME": str(tmp_path)}  # the built-in data set goes to ~/.cache
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "pretrain.py")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "finished: 16/16 steps" in r.stdout
    assert "warning" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    out = tmp_path / "runs" / "smoke"
    losses = [rec["loss"] for rec in read_metrics(str(out))]
    assert len(losses) == 16
    assert os.path.exists(out / "checkpoints" / "ckpt_000000016.pt")
    cfg = load_config("smoke", [])
    filled = cfg.model.queue_len // cfg.optim.batch_size
    assert losses[-1] < losses[filled] - 0.2, losses


@pytest.mark.slow
def test_compiled_encoders_train_on_cpu(tmp_path, data_cache):
    out = str(tmp_path / "compiled")
    summary = train(load_config("smoke", tiny(out, data_cache, "train.compile=true", "optim.max_steps=2")))
    assert summary["step"] == 2
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in read_metrics(out))


def test_stale_key_share_matches_a_simulation_of_shuffled_epochs():
    """The share of images that meet their own previous-epoch key in the queue (a false negative),
    against a direct simulation of shuffled epochs; the presets stay under the warning's 10%."""
    import random
    from densecl_fast.trainer import stale_key_share
    rng = random.Random(0)
    for K, B, S in ((4096, 64, 62), (1024, 64, 62), (2048, 64, 62), (4096, 64, 156), (8192, 64, 62)):
        q, hits, n = K // B, 0, 0
        for _ in range(200):
            a, b = list(range(S)), list(range(S))
            rng.shuffle(a), rng.shuffle(b)
            pos_prev = {img: i for i, img in enumerate(a)}
            for i, img in enumerate(b):
                hits += S + i - pos_prev[img] < q  # still among the last q batches of keys
                n += 1
        assert stale_key_share(K, B, S) == pytest.approx(hits / n, abs=0.03), (K, B, S)
    assert stale_key_share(1024, 64, 62) < 0.1 and stale_key_share(4096, 64, 156) < 0.1   # the presets
    assert stale_key_share(65536, 256, 5004) < 0.01                                          # the recipe

