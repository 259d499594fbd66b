"""Engines: single, ddp, fsdp, deepspeed behind one interface; cross-rank shuffle-BN.

The 2-process tests run on the CPU with gloo. Tolerances: the 2-rank runs reduce gradients across
ranks (a different fp32 summation order than one process's autograd), nothing else differs; after
3 steps at lr 0.5 the largest difference seen is 6e-6 (weights, queues) and 5e-7 (losses). Both
sides use grouped BN (groups of 2 images): comparing against plain BatchNorm2d kernels instead
adds rounding that this tiny, ill-conditioned model (2x2 C5 maps) amplifies to ~1e-2.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from densecl_fast import checkpoint
from densecl_fast.checkpoint import CheckpointError, list_checkpoints
from densecl_fast.config import ConfigError, load_config
from densecl_fast.engines import folder_model_state, resolve_engine
from densecl_fast.trainer import train
from densecl_fast.weights import load_backbone_state
from helpers import PRETRAIN, ROOT, load_script, tiny

HARNESS = os.path.join(ROOT, "tests", "dist_equivalence.py")
HAS_DS = importlib.util.find_spec("deepspeed") is not None
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
DIST_ENGINES = ["ddp", "fsdp", pytest.param("deepspeed", marks=pytest.mark.skipif(not HAS_DS, reason="no deepspeed"))]


def torchrun(args, nproc=2, timeout=400):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), *args], capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


pretrain_cli = load_script("pretrain_cli_engines", PRETRAIN)


# ---- the engine choice ---------------------------------------------------------------------------

def test_auto_picks_deepspeed_under_its_launcher_ddp_under_torchrun(monkeypatch):
    for k in ("CROSS_RANK", "LOCAL_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    assert resolve_engine("auto", 1) == "single"
    assert resolve_engine("auto", 2) == "ddp"
    assert resolve_engine("fsdp", 2) == "fsdp"
    monkeypatch.setenv("CROSS_RANK", "0")
    monkeypatch.setenv("LOCAL_SIZE", "2")
    assert resolve_engine("auto", 2) == "deepspeed"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")  # torchrun's variable wins
    assert resolve_engine("auto", 2) == "ddp"


def test_old_sync_bn_key_is_rejected_in_configs_and_in_checkpoints():
    with pytest.raises(ConfigError, match="model.sync_bn was replaced by model.bn"):
        load_config("smoke", ["model.sync_bn=true"])
    from densecl_fast.checkpoint import CheckpointError, saved_config
    from densecl_fast.config import config_from_dict, config_to_dict
    d = config_to_dict(load_config("smoke"))
    d["model"]["sync_bn"] = True  # a checkpoint's saved config with the old key: an error naming the new one
    with pytest.raises(ConfigError, match="^model.sync_bn was replaced by model.bn"):
        config_from_dict(d)
    with pytest.raises(CheckpointError, match="^checkpoint old.pt holds a config this version cannot use: "
                                              "model.sync_bn was replaced by model.bn"):
        saved_config({"config": d}, "old.pt")


# ---- bad input: one line, exit 2 -------------------------------------------------------------------

def test_bad_engine_input_is_one_line_exit_2(tmp_path, data_cache, capsys, monkeypatch):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"zero_optimization": {"stage": 1},')
    batch_json = tmp_path / "batch.json"
    batch_json.write_text('{"train_batch_size": 64}')
    optim_json = tmp_path / "optim.json"
    optim_json.write_text('{"optimizer": {"type": "Adam"}}')
    stage_json = tmp_path / "stage.json"
    stage_json.write_text('{"zero_optimization": {"stage": 3}}')
    bf16_json = tmp_path / "bf16.json"
    bf16_json.write_text('{"bf16": {"enabled": true}}')
    out = str(tmp_path / "r")
    cases = [
        (["train.engine=megatron"], "train.engine='megatron'"),
        (["train.engine=deepspeed", "deepspeed.zero_stage=3"], "deepspeed.zero_stage=3"),
        (["train.engine=deepspeed", f"deepspeed.config={bad_json}"], "not valid JSON"),
        (["train.engine=deepspeed", f"deepspeed.config={batch_json}"], "train_batch_size=64 contradicts optim.batch_size=8"),
        (["train.engine=deepspeed", f"deepspeed.config={optim_json}"], "'optimizer' section"),
        (["train.engine=deepspeed", f"deepspeed.config={stage_json}"], "zero_optimization.stage=3"),
        (["train.engine=deepspeed", f"deepspeed.config={bf16_json}"], "bf16.enabled"),
        (["train.engine=deepspeed", f"deepspeed.config={tmp_path}/missing.json"], "cannot read it"),
        (["train.engine=deepspeed", "train.compile=true"], "train.compile=true is not supported with train.engine=deepspeed"),
        (["train.engine=fsdp", "train.compile=true"], "train.compile=true is not supported with train.engine=fsdp"),
        (["model.bn=sync"], "model.bn=sync"),
        (["model.bn=global"], "model.bn='global'"),
    ]
    if not HAS_DS:
        cases = [c for c in cases if "train.engine=deepspeed" not in c[0]]
    for argv, key in cases:
        rc = pretrain_cli.main([*tiny(out, data_cache), *argv])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc == 2 and lines and lines[-1].startswith("error: ") and key in lines[-1], (argv, err)
        assert "Traceback" not in err
    # DeepSpeed not installed: the engine is refused before anything is created.
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    rc = pretrain_cli.main([*tiny(out, data_cache), "train.engine=deepspeed"])
    err = capsys.readouterr().err
    assert rc == 2 and "train.engine=deepspeed but DeepSpeed is not installed" in err.strip().splitlines()[-1]
    assert not os.path.exists(out), "nothing may be created for a bad config"


# ---- shuffle-BN across ranks == one process with grouped BN -----------------------------------------

@pytest.fixture(scope="module")
def one_process_reference(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eq") / "single.pt")
    r = subprocess.run([sys.executable, HARNESS, "single", out], capture_output=True, text=True, timeout=300,
                       env=ENV, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    return torch.load(out, weights_only=True)


@pytest.mark.distributed
@pytest.mark.parametrize("engine", DIST_ENGINES)
def test_two_rank_shuffle_bn_equals_one_process_grouped_bn(engine, one_process_reference, tmp_path):
    """2 ranks x 4 images, model.bn=shuffle, vs 1 process x 8 images, grouped BN with groups of the
    per-rank batch: the same permutation (rank 0's stream), so the same losses, weights and queues."""
    out = str(tmp_path / f"{engine}.pt")
    r = torchrun([HARNESS, engine, out])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got, ref = torch.load(out, weights_only=True), one_process_reference
    torch.testing.assert_close(got["losses"], ref["losses"], rtol=0, atol=1e-5)
    assert set(got["state"]) == set(ref["state"])
    for k, v in ref["state"].items():
        if "running_" in k or "num_batches_tracked" in k:
            continue  # BN running statistics are per rank (rank 0's), as in the original
        torch.testing.assert_close(got["state"][k].float(), v.float(), rtol=0, atol=1e-4, msg=k)
    assert int(got["state"]["queue_ptr"]) == int(ref["state"]["queue_ptr"]) == 3 * 8 % 64
    # The run moved away from its start: a no-op engine could not pass.
    assert (ref["losses"][0] != ref["losses"][-1]).all()


@pytest.mark.distributed
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_rank_run_with_compiled_blocks_equals_one_process(engine, one_process_reference, tmp_path):
    """Regions compiled in place before replicate (ddp: what train.compile runs) or fully_shard (fsdp:
    the engine's mechanics; train.compile still refuses fsdp until inductor is verified there), with
    AOTAutograd and the eager backend (the joint graphs and the engines' hooks, without inductor's
    code generation): the run still equals the eager one-process run."""
    out = str(tmp_path / f"{engine}_compiled.pt")
    r = torchrun([HARNESS, engine, out, "compile=aot_eager"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got, ref = torch.load(out, weights_only=True), one_process_reference
    torch.testing.assert_close(got["losses"], ref["losses"], rtol=0, atol=1e-5)
    for k, v in ref["state"].items():
        if "running_" in k or "num_batches_tracked" in k:
            continue
        torch.testing.assert_close(got["state"][k].float(), v.float(), rtol=0, atol=1e-4, msg=k)


# ---- save on 2 ranks -> resume == uninterrupted, per engine -----------------------------------------

def _state_of(path):
    """The whole model state of a checkpoint of any format (folders: as export reads them)."""
    if checkpoint.checkpoint_kind(path) == "pt":
        return checkpoint.load_checkpoint(path)["model"]
    return folder_model_state(path)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("engine", DIST_ENGINES)
def test_resume_on_two_ranks_equals_the_uninterrupted_run(engine, tmp_path, data_cache):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    common = ["optim.epochs=1", "train.ckpt_every_epochs=1", f"train.engine={engine}"]
    r = torchrun([PRETRAIN, *tiny(straight, data_cache, *common)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = torchrun([PRETRAIN, *tiny(split, data_cache, *common, "optim.max_steps=2")])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.splitlines()[0].startswith(f"engine {engine}"), r.stdout  # the first line names the engine
    r = torchrun([PRETRAIN, *tiny(split, data_cache, *common), "--resume", "auto"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from" in r.stdout and r.stdout.count("finished: 4/4 steps") == 1  # rank 0 only
    a, b = read_metrics(straight), read_metrics(split)
    assert [x["step"] for x in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["loss"] == y["loss"] and x["lr"] == y["lr"], (x, y)
    sa, sb = _state_of(list_checkpoints(straight)[-1]), _state_of(list_checkpoints(split)[-1])
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    kind = {"ddp": "pt", "fsdp": "dcp", "deepspeed": "ds"}[engine]
    assert checkpoint.checkpoint_kind(list_checkpoints(split)[-1]) == kind
    arch, trunk = load_backbone_state(list_checkpoints(split)[-1])  # export reads every engine's checkpoints
    assert arch == "resnet18" and torch.equal(trunk["conv1.weight"], sa["encoder_q.backbone.conv1.weight"])
    if engine == "fsdp":  # DCP reshards: the 2-rank checkpoint continues on one process
        more = str(tmp_path / "one")
        shutil.copytree(split, more)
        summary = train(load_config("smoke", tiny(more, data_cache, "optim.epochs=2", "train.engine=fsdp",
                                                  "train.resume=auto")))
        assert summary["status"] == "finished" and summary["step"] == 8
    if engine == "deepspeed":  # per-rank ZeRO shards: another rank count is refused before data or model
        with pytest.raises(CheckpointError, match=r"written by 2 DeepSpeed rank\(s\), this run has 1"):
            train(load_config("smoke", tiny(split, data_cache, *common, "train.resume=auto")))


def test_checkpoint_of_another_engine_is_a_clear_error(tmp_path, data_cache):
    out = str(tmp_path / "run")
    train(load_config("smoke", tiny(out, data_cache, "optim.max_steps=1")))
    assert list_checkpoints(out)[-1].endswith(".pt")
    with pytest.raises(CheckpointError, match=r"'pt' format.*train.engine=fsdp.*resume with train.engine=single or ddp"):
        train(load_config("smoke", tiny(out, data_cache, "train.engine=fsdp", "train.resume=auto")))


# ---- the launchers end to end ------------------------------------------------------------------------

@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.skipif(not HAS_DS or shutil.which("deepspeed") is None, reason="no deepspeed launcher")
def test_deepspeed_launcher_runs_the_smoke_preset_on_cpu(tmp_path, data_cache):
    out = str(tmp_path / "ds")
    # The launcher finds no GPU on this machine: --num_gpus 2 starts 2 CPU ranks (its CPU accelerator).
    r = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", "29561", PRETRAIN, "--config", "smoke",
                        *tiny(out, data_cache, "optim.epochs=1")],
                       capture_output=True, text=True, timeout=400, env=ENV, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "engine deepspeed (ZeRO-1, 2 ranks" in r.stdout  # auto: the deepspeed launcher -> DeepSpeed
    assert r.stdout.count("finished: 4/4 steps") == 1
    assert list_checkpoints(out)[-1].endswith("ckpt_000000004.ds")


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_fsdp_bf16_runs_the_smoke_preset_on_cpu(tmp_path, data_cache):
    """bf16 on the CPU: BatchNorm in its own fp32 FSDP unit (a bf16 BN unit fails here)."""
    out = str(tmp_path / "fsdp")
    r = torchrun([PRETRAIN, "--config", "smoke", *tiny(out, data_cache, "optim.epochs=1", "train.engine=fsdp",
                                                     "train.precision=bf16")])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "engine fsdp (FSDP2 fully_shard, 2 ranks, cpu, bf16)" in r.stdout
    assert r.stdout.count("finished: 4/4 steps") == 1
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in read_metrics(out))
