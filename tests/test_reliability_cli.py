"""Reliability of the command-line surfaces: an export never writes over its own input,
a refused reproduction can be corrected in the same --out, the reproduction's throughput probe keeps
to its share of the budget and a probe that dies is one line, odd state.json contents are one line,
and the launcher, eval and trainer report bad input before any work (once per machine under torchrun).
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision

from densecl_fast import export
from densecl_fast.reproduce import cli as repro_cli, main, probe as probe_mod
from densecl_fast.reproduce.errors import Stopped, UsageError
from densecl_fast.reproduce.plan import plan_for_budget, parse_budget
from helpers import PRETRAIN, load_script

# ---- export: never over its own input ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tv_file(tmp_path_factory):
    """A torchvision resnet18 trunk file (a backbone export reads it like any other weights file)."""
    path = str(tmp_path_factory.mktemp("tv") / "r18.pth")
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def run_export(argv, capsys):
    rc = export.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_one_error(err, *words):
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, err


def test_export_refuses_to_write_over_its_own_input(tv_file, tmp_path, capsys):
    src = tmp_path / "ckpt.pth"
    src.write_bytes(open(tv_file, "rb").read())
    before = src.read_bytes()
    os.link(src, tmp_path / "hard.pth")
    os.symlink(src, tmp_path / "soft.pth")
    os.makedirs(tmp_path / "sub")
    for out in (src, tmp_path / "hard.pth", tmp_path / "soft.pth", tmp_path / "sub" / ".." / "ckpt.pth"):
        rc, _, err = run_export([src, "--format", "torchvision", "--out", out], capsys)
        assert rc == 2, err
        assert_one_error(err, "would write over the checkpoint being exported")
    # FILE.json is written too: it must not be the input either
    json_src = tmp_path / "w.pth.json"
    json_src.write_bytes(before)
    rc, _, err = run_export([json_src, "--format", "torchvision", "--out", tmp_path / "w.pth"], capsys)
    assert rc == 2 and "would write over" in err, err
    assert src.read_bytes() == before and json_src.read_bytes() == before


def test_export_writes_nothing_into_a_checkpoint_folder(tmp_path, capsys):
    # the check comes before anything is read, so any folder stands for an fsdp .dcp / deepspeed .ds one
    folder = tmp_path / "ckpt_000000008.dcp"
    folder.mkdir()
    (folder / "__0_0.distcp").write_bytes(b"shard")
    for out in (folder / "__0_0.distcp", folder / "r18.pth", folder):
        rc, _, err = run_export([folder, "--format", "torchvision", "--out", out], capsys)
        assert rc == 2, err
        assert_one_error(err, "would write over the checkpoint being exported")
    assert sorted(os.listdir(folder)) == ["__0_0.distcp"] and (folder / "__0_0.distcp").read_bytes() == b"shard"
    # a file inside a checkpoint folder as the input: nothing is written beside it either
    inner = folder / "r18.pth"
    inner.write_bytes(b"weights")
    rc, _, err = run_export([inner, "--format", "torchvision", "--out", folder / "r18_tv.pth"], capsys)
    assert rc == 2, err
    assert_one_error(err, "inside the checkpoint folder")
    assert sorted(os.listdir(folder)) == ["__0_0.distcp", "r18.pth"]


def test_export_says_which_files_it_replaced(tv_file, tmp_path, capsys):
    out = tmp_path / "r18_tv.pth"
    rc, text, err = run_export([tv_file, "--format", "torchvision", "--out", out], capsys)
    assert rc == 0 and "replaced" not in text, err
    rc, text, err = run_export([tv_file, "--format", "torchvision", "--out", out], capsys)
    assert rc == 0, err
    assert f"replaced the existing {out} and {out}.json" in text


@pytest.mark.parametrize("argv, words", [
    (["--format", "torchvision", "--out", ""], ["--out is empty"]),
    (["--out", "x.pth"], ["--format"]),                       # argparse: a required option missing
    (["--format", "onnx", "--out", "x.pth"], ["--format", "onnx"]),
    (["--format", "torchvision", "--out", "x.pth", "--bogus"], ["--bogus"]),
])
def test_export_argument_errors_are_one_line(tv_file, tmp_path, capsys, argv, words):
    rc, _, err = run_export([tv_file, *argv], capsys)
    assert rc == 2
    assert_one_error(err, *words)


# ---- the launcher, eval and the trainer: bad input first, one line, rank 0 ----------------------------

pretrain_cli = load_script("pretrain_cli_rel", PRETRAIN)


@pytest.mark.parametrize("env, prints", [({"RANK": "1", "LOCAL_RANK": "1"}, False),
                                         ({"RANK": "0", "LOCAL_RANK": "0"}, True),
                                         ({"RANK": "8", "LOCAL_RANK": "0"}, True),  # first process of machine 2
                                         ({}, True)])
def test_only_the_first_rank_of_a_machine_prints_the_error(monkeypatch, capsys, env, prints):
    for k in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert pretrain_cli.main(["--config", "no_such_preset"]) == 2
    err = capsys.readouterr().err
    if prints:
        assert_one_error(err, "no_such_preset")
    else:
        assert err == ""


def test_under_torchrun_one_error_line_for_two_ranks(tmp_path):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", PRETRAIN,
                        "--config", "no_such_preset"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode != 0
    assert sum(line.startswith("error: ") for line in r.stderr.splitlines()) == 1, r.stderr


def test_a_bad_init_from_is_reported_before_the_data_set(tmp_path, capsys):
    bad = tmp_path / "notes.txt"
    bad.write_text("not weights\n")
    rc = pretrain_cli.main(["model.arch=resnet18", f"train.out_dir={tmp_path / 'run'}", f"train.init_from={bad}",
                            f"data.source={tmp_path / 'no_such_folder'}", "train.tensorboard=false"])
    err = capsys.readouterr().err
    assert rc == 2
    assert_one_error(err, "train.init_from", "notes.txt")


def test_eval_checks_out_before_reading_data(tmp_path, capsys):
    from densecl_fast.eval.__main__ import main as eval_main
    taken = tmp_path / "results.txt"
    taken.write_text("someone's notes\n")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "knn.json").mkdir()
    for out, words in ((taken, ["--out", "is a file"]), (tmp_path / "dir", ["knn.json is a folder"]),
                       (taken / "sub", ["--out", "is a file"]), ("", ["--out is empty"])):
        # a data set that does not exist: the --out problem must be the one reported
        rc = eval_main(["knn", "--checkpoint", "random", "--arch", "resnet18", "--data", str(tmp_path / "none"),
                        "--out", str(out), "--no-cache"])
        err = capsys.readouterr().err
        assert rc == 2
        assert_one_error(err, *words)
    assert taken.read_text() == "someone's notes\n"


# ---- reproduce: a refused command can be corrected in place ------------------------------------------

def repro_tiny(data_cache):
    """A reproduction's settings for a CPU run of seconds (as tests/test_reproduce.py's)."""
    return ["--config", "smoke", "--probe-steps", "2", "model.hid_dim=32", "model.out_dim=16", "model.queue_len=64",
            "model.bn_group_size=4", "data.image_size=64", "data.synthetic_images=40", "data.synthetic_resolution=80",
            "data.num_workers=0", f"data.cache_dir={data_cache}", "optim.batch_size=8", "train.tensorboard=false",
            "train.progress=false", "train.log_every=1"]


@pytest.fixture
def planned(monkeypatch):
    """The probe the stage runner calls (repro_cli.probe) replaced by a recorder that stops the reproduction
    (Stopped: exit 0) before any training: the arguments a command got past its checks with."""
    seen = []

    def fake_probe(args, t_start):
        seen.append(dict(vars(args)))
        raise Stopped("stopped by the test")

    monkeypatch.setattr(repro_cli, "probe", fake_probe)
    return seen


def one_line(capsys):
    err = capsys.readouterr().err
    assert_one_error(err)
    return err


def test_a_refused_budget_or_data_set_leaves_nothing_that_blocks_the_corrected_command(tmp_path, data_cache,
                                                                                          capsys, planned):
    out = str(tmp_path / "repro")
    t = repro_tiny(data_cache)
    assert main(["--data", "synthetic", "--budget", "1s", "--out", out, *t]) == 2
    assert "--budget 1s" in one_line(capsys)
    assert main(["--data", str(tmp_path / "no_such_folder"), "--budget", "2ep", "--out", out, *t]) == 2
    assert "no_such_folder" in one_line(capsys)
    assert main(["--data", "synthetic", "--budget", "2ep", "--out", out, *t, "model.arch=vgg16"]) == 2
    assert "model.arch" in one_line(capsys)
    assert not os.path.exists(os.path.join(out, "state.json"))
    # the corrected command, into the same --out
    assert main(["--data", "synthetic", "--budget", "2ep", "--out", out, *t]) == 0
    assert planned[-1]["budget"] == "2ep"
    assert json.load(open(os.path.join(out, "state.json")))["args"]["budget"] == "2ep"


def test_unbounded_seeds_are_refused_before_anything_is_recorded(tmp_path, data_cache, capsys, planned):
    """--seeds 1000000000000 built its seed list after state.json was written (a
    MemoryError); a train.seed past what the generators take was a traceback in the run."""
    from densecl_fast.config import MAX_SEED
    out = str(tmp_path / "repro")
    t = repro_tiny(data_cache)
    for argv, words in ((["--seeds", "101"], "--seeds 101: give 1..100"),
                        (["--seeds", "1000000000000"], "--seeds 1000000000000: give 1..100"),
                        (["--seeds", "0"], "--seeds 0"),
                        ([f"train.seed={2 ** 63}"], f"train.seed={2 ** 63} must be in 0..{MAX_SEED}"),
                        (["train.seed=-1"], "train.seed=-1"),
                        (["--seeds", "3", f"train.seed={MAX_SEED - 1}"], "the last seed would pass")):
        assert main(["--data", "synthetic", "--budget", "2ep", "--out", out, *t, *argv]) == 2
        assert words in one_line(capsys)
        assert not os.path.exists(os.path.join(out, "state.json")) and not planned
    assert main(["--data", "synthetic", "--budget", "2ep", "--out", out, *t, "--seeds", "2",
                 f"train.seed={MAX_SEED - 1}"]) == 0  # the largest seeds there are
    assert planned[-1]["seeds"] == 2
    # the trainer's own command: one line, exit 2, before any work
    rc = pretrain_cli.main(["--config", "smoke", f"train.seed={2 ** 64}", f"train.out_dir={tmp_path / 'run'}"])
    assert rc == 2 and "train.seed" in one_line(capsys)
    assert not os.path.exists(tmp_path / "run")


def test_a_plan_refused_after_the_probe_can_be_replaced_or_resumed_with_other_arguments(tmp_path, data_cache,
                                                                                           capsys, monkeypatch):
    out = str(tmp_path / "repro")
    t = repro_tiny(data_cache)

    def refusing_probe(args, t_start):  # what a budget that fits no epoch, or a killed probe, ends in
        raise UsageError("--budget 1m: no full epoch fits")

    monkeypatch.setattr(repro_cli, "probe", refusing_probe)
    assert main(["--data", "synthetic", "--budget", "1m", "--out", out, *t]) == 2
    one_line(capsys)
    state = json.load(open(os.path.join(out, "state.json")))
    assert state["args"]["budget"] == "1m" and state["stages"] == {}

    seen = []

    def stopping_probe(args, t_start):
        seen.append(args.budget)
        raise Stopped("stopped by the test")

    monkeypatch.setattr(repro_cli, "probe", stopping_probe)
    # --resume with a corrected budget: accepted, since no stage had finished
    assert main(["--resume", "--budget", "3ep", "--out", out]) == 0
    assert "replace the recorded ones" in capsys.readouterr().out and seen == ["3ep"]
    assert json.load(open(os.path.join(out, "state.json")))["args"]["budget"] == "3ep"
    # or a new command into the same --out
    assert main(["--data", "synthetic", "--budget", "2ep", "--out", out, *t]) == 0
    assert seen == ["3ep", "2ep"]
    # once a stage has finished, the record binds: the old refusals stand
    state = json.load(open(os.path.join(out, "state.json")))
    p = plan_for_budget(parse_budget("2ep"), step_s=0.1, steps_per_epoch=5, num_images=40, global_batch=8,
                          startup_s=1.0, runs=1, spent_s=1.0, nproc=1, device="cpu")
    state.update(plan={**p, "probe": {"timed_steps": 2}, "config": {"preset": "smoke"}},
                 stages={"plan": {"finished": 1}})
    json.dump(state, open(os.path.join(out, "state.json"), "w"))
    assert main(["--data", "synthetic", "--budget", "2ep", "--out", out, *t]) == 2
    assert "add --resume" in one_line(capsys)
    assert main(["--resume", "--budget", "3ep", "--out", out]) == 2
    assert "differs from the recorded '2ep'" in one_line(capsys)


# ---- reproduce: odd state.json contents and budgets ---------------------------------------------------

@pytest.mark.parametrize("content, words", [
    ([], "holds a list"),
    ({"args": "synthetic", "plan": None, "stages": {}}, "'args' is a string"),
    ({"args": {}, "plan": None, "stages": {"plan": {"finished": 1.0}}},
     "the plan stage is marked done but 'plan' is null"),
    ({"args": {}, "plan": None, "stages": ["plan"]}, "'stages' is a list"),
    ({"args": {"nproc": "2"}, "plan": None, "stages": {}}, "args.nproc is a string"),
    ({"args": {}, "plan": {"epochs": 2}, "stages": {"plan": {}}}, "plan.steps is missing"),
    ({"args": {}, "plan": None, "stages": {"pretrain:densecl": 3}}, "stage 'pretrain:densecl' is int"),
])
@pytest.mark.parametrize("resume", [True, False])
def test_odd_state_files_are_one_line_naming_the_file(tmp_path, capsys, content, words, resume):
    out = tmp_path / "repro"
    out.mkdir()
    (out / "state.json").write_text(json.dumps(content))
    argv = ["--resume"] if resume else ["--data", "synthetic", "--budget", "2ep", "--config", "smoke"]
    assert main([*argv, "--out", str(out)]) == 2
    err = one_line(capsys)
    assert str(out / "state.json") in err and words in err


def test_a_budget_too_large_for_a_float_is_one_line(tmp_path, capsys):
    with pytest.raises(UsageError, match="too large"):
        parse_budget("9" * 400 + "h")
    assert main(["--data", "synthetic", "--budget", "9" * 400 + "h", "--config", "smoke",
                    "--out", str(tmp_path / "o")]) == 2
    err = one_line(capsys)
    assert err.startswith("error: --budget 999") and len(err) < 400


# ---- reproduce: the throughput probe keeps to its share and a dying probe is one line -----------------

FAKE_PROBE = """import json, os, signal, sys, time
d = [a.split('=', 1)[1] for a in sys.argv if a.startswith('train.out_dir=')][-1]
os.makedirs(d, exist_ok=True)
open(os.path.join(d, 'child.pid'), 'w').write(str(os.getpid()))
with open(os.path.join(d, 'metrics.jsonl'), 'a') as f:  # STEPS steps of 1 s at batch 8, 5 steps per epoch
    for step in range(1, STEPS + 1):
        f.write(json.dumps({'step': step, 'epoch': step / 5, 'img_per_s': 8.0}) + chr(10))
if ACTION == 'kill':
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(600)
"""


def fake_probe(tmp_path, monkeypatch, action, steps, torchrun=False):
    """probe_command replaced by a child that logs `steps` steps, then kills itself (SIGKILL, as the
    out-of-memory killer does) or hangs; under a real torchrun with `torchrun`."""
    script = tmp_path / "fake_probe.py"
    script.write_text(FAKE_PROBE.replace("STEPS", str(steps)).replace("ACTION", repr(action)))
    if torchrun:
        cmd = lambda args, ov, nproc: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                                       str(script), *ov]
    else:
        cmd = lambda args, ov, nproc: [sys.executable, str(script), *ov]
    monkeypatch.setattr(probe_mod, "probe_command", cmd)


@pytest.mark.parametrize("torchrun", [False, True])
def test_a_probe_killed_by_the_oom_killer_is_one_line(tmp_path, data_cache, capsys, monkeypatch, torchrun):
    fake_probe(tmp_path, monkeypatch, "kill", 2, torchrun)
    out = tmp_path / "repro"
    rc = main(["--data", "synthetic", "--budget", "2ep", "--out", str(out), *repro_tiny(data_cache)])
    err = one_line(capsys)
    assert rc == 2
    assert "killed by signal 9 (SIGKILL)" in err and "out-of-memory" in err and "optim.batch_size" in err, err
    assert "2 of 5 steps done" in err and str(out / "probe.log") in err
    # refused before a plan: the corrected command may use the same --out
    assert json.load(open(out / "state.json"))["stages"] == {}


@pytest.mark.parametrize("steps", [0, 2])
def test_a_probe_past_its_share_of_the_budget_is_stopped_and_refused(tmp_path, data_cache, capsys, monkeypatch,
                                                                      steps):
    fake_probe(tmp_path, monkeypatch, "hang", steps)
    monkeypatch.setattr(probe_mod, "PROBE_SHARE", 0.05)  # of 1 min: 3 s
    out = tmp_path / "repro"
    rc = main(["--data", "synthetic", "--budget", "1m", "--out", str(out), *repro_tiny(data_cache)])
    err = one_line(capsys)
    assert rc == 2 and "--budget 1m: the throughput probe" in err and "5% share of the budget (3 s)" in err, err
    if steps:  # 2 of 5 steps of ~1 s: the probe needs >= 6 s, i.e. a budget of >= 6 / 5% = 2 min
        assert "2 of 5 steps done" in err and "give at least ~" in err
        need = err.split("give at least ~")[1].split(",")[0]
        value, unit = need.split()
        assert unit == "min" and 2.0 <= float(value) < 10, err
    else:
        assert "had not finished one step" in err and "must be well over ~" in err
    pid = int(open(out / "probe" / "child.pid").read())
    with pytest.raises(ProcessLookupError):  # the hanging probe was killed, not left behind
        os.kill(pid, 0)


def test_a_signal_to_the_reproduction_during_the_probe_stops_it_for_resume(tmp_path, data_cache, capsys,
                                                                            monkeypatch):
    import signal
    import threading
    fake_probe(tmp_path, monkeypatch, "hang", 0)  # a child that dies of the SIGTERM passed on (the trainer's
    out = tmp_path / "repro"                        # handler is not installed yet at start-up)
    timer = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        rc = main(["--data", "synthetic", "--budget", "2ep", "--out", str(out), *repro_tiny(data_cache)])
    finally:
        timer.cancel()
    assert rc == 0
    assert "probe was stopped by SIGTERM" in capsys.readouterr().out
    assert json.load(open(out / "state.json"))["stages"] == {}
