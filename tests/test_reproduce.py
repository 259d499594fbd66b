"""launch/reproduce.py: budget parsing, plan arithmetic, one-line errors, an end-to-end tiny run
with its report, and resuming (a stopped pretraining continues; finished stages are skipped)."""
import json
import os
import subprocess
import sys

import pytest

from densecl_fast.reproduce import main, probe as probe_mod
from densecl_fast.reproduce.errors import UsageError
from densecl_fast.recipe import ASSUMED_SCALING, IMAGENET_TRAIN_IMAGES, RECIPE_EPOCHS
from densecl_fast.reproduce.plan import plan_for_budget, parse_budget, plan_lines
from densecl_fast.reproduce.runs import EXPORT_FORMATS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(data_cache):
    """A reproduction's overrides for a CPU run of seconds (the data source and out dir come from the CLI)."""
    return ["--config", "smoke", "--probe-steps", "2", "model.hid_dim=32", "model.out_dim=16", "model.queue_len=64",
            "model.bn_group_size=4", "data.image_size=64", "data.synthetic_images=40", "data.synthetic_resolution=80",
            "data.num_workers=0", f"data.cache_dir={data_cache}", "optim.batch_size=8", "train.tensorboard=false",
            "train.progress=false", "train.log_every=1"]


# ---- budget and plan ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [("8h", 28800), ("90m", 5400), ("1h30m", 5400), ("45s", 45),
                                           ("2d", 172800), ("0.5h", 1800), (" 3M ", 180)])
def test_time_budgets_parse(text, seconds):
    b = parse_budget(text)
    assert b["kind"] == "time" and b["seconds"] == pytest.approx(seconds)


@pytest.mark.parametrize("text, epochs", [("20ep", 20), ("1ep", 1), ("200 epochs", 200)])
def test_epoch_budgets_parse(text, epochs):
    assert parse_budget(text) == {"kind": "epochs", "epochs": epochs, "text": text}


@pytest.mark.parametrize("text", ["", "8", "h", "8x", "8h extra", "0ep", "201ep", "0m", "-3h", "ep20"])
def test_bad_budgets_are_refused(text):
    with pytest.raises(UsageError, match="--budget"):
        parse_budget(text)


def plan(budget, **kw):
    base = dict(step_s=0.5, steps_per_epoch=100, num_images=3200, global_batch=32, startup_s=10.0, runs=2,
                spent_s=30.0, nproc=1, device="cuda", now=1000.0)
    base.update(kw)
    return plan_for_budget(parse_budget(budget), **base)


def test_time_budget_fits_whole_epochs_for_every_run():
    p = plan("1h")
    # (3600 - 30 spent - 2 x 10 start-up) / (2 runs x 50 s per epoch) = 35.5 -> 35 whole epochs
    assert p["epoch_s"] == 50.0 and p["epochs"] == 35 and p["epochs_that_fit"] == 35
    assert p["steps"] == 3500 and p["run_s"] == 10 + 35 * 50
    assert p["expected_finish"] == 1000.0 + 2 * (10 + 35 * 50)
    assert p["pretrain_s"] <= 3600 - 30  # the plan keeps inside the budget
    one = plan("1h", runs=1)
    assert one["epochs"] == int((3600 - 30 - 10) // 50) == 71


def test_plan_projects_the_full_recipe():
    p = plan("20ep")
    assert p["epochs"] == 20 and p["epochs_that_fit"] is None
    assert p["images_per_s"] == 64.0
    assert p["full_recipe_s_here"] == 200 * 50.0
    assert p["full_recipe_s_in1k_here"] == pytest.approx(200 * IMAGENET_TRAIN_IMAGES / 64.0)
    assert p["full_recipe_s_8_devices"] == pytest.approx(200 * 3200 / (64.0 * 8 * ASSUMED_SCALING))
    assert "assumed" in p["scaling_note"]
    # With 2 processes measured against one: efficiency = 2-process img/s / (2 x one-process img/s)
    m = plan("20ep", nproc=2, single_ips=40.0)
    assert m["scaling_efficiency"] == pytest.approx(64.0 / 80.0) and "measured" in m["scaling_note"]
    assert m["full_recipe_s_8_devices"] == pytest.approx(200 * 3200 / (40.0 * 8 * 0.8))
    lines = plan_lines(p)
    assert lines[0].startswith("plan: budget 20ep -> 20 epoch(s)") and "8 such devices" in lines[-1]


def test_a_long_budget_stops_at_the_recipe_and_a_short_one_is_an_error():
    assert plan("1000h")["epochs"] == RECIPE_EPOCHS
    with pytest.raises(UsageError, match="no full epoch fits"):
        plan("2m")  # 120 - 30 - 20 = 70 s < 2 runs x 50 s


# ---- bad input: one line, exit 2 ------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    ([], "--data is required"),
    (["--data", "synthetic"], "--budget is required"),
    (["--data", "synthetic", "--budget", "8x"], "--budget"),
    (["--data", "synthetic", "--budget", "2ep", "optim.epochs=5"], "set by the reproduction"),
    (["--data", "synthetic", "--budget", "2ep", "--voc", "/nonexistent/VOCdevkit"], "--voc"),
    (["--data", "synthetic", "--budget", "2ep", "--nproc", "0"], "--nproc"),
    (["--data", "synthetic", "--budget", "2ep", "--config", "nope"], "unknown config"),
    (["--data", "synthetic", "--budget", "2ep", "model.arch=vgg16"], "model.arch"),
    (["--data", "/nonexistent/imagenet/train", "--budget", "2ep", "--config", "smoke"], "nonexistent"),
    (["--resume"], "holds no reproduction"),
    (["--data", "synthetic", "--budget", "2ep", "--bogus"], "unrecognized"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    rc = main([*argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_the_launcher_exits_2_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "reproduce.py"), "--data", "synthetic",
                        "--budget", "soon", "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: --budget"), r.stderr


def test_an_existing_reproduction_needs_resume_and_the_same_arguments(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    p = plan("2ep")
    p.update(probe={"timed_steps": 10}, config={"preset": "smoke"})
    (out / "state.json").write_text(json.dumps({"version": 1, "args": {"data": "synthetic", "budget": "2ep"},
                                                "plan": p, "stages": {"plan": {"finished": 1.0}}}))
    assert main(["--data", "synthetic", "--budget", "2ep", "--out", str(out)]) == 2
    assert "add --resume" in capsys.readouterr().err
    assert main(["--resume", "--budget", "3ep", "--out", str(out)]) == 2
    assert "--budget 3ep differs from the recorded '2ep'" in capsys.readouterr().err


# ---- end to end --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_tiny_reproduction_end_to_end_stops_resumes_and_reports(tmp_path, data_cache, capsys):
    out = str(tmp_path / "repro")
    argv = ["--data", "synthetic", "--budget", "2ep", "--baseline", "--out", out, *tiny(data_cache)]
    # 1. a pretraining stopped after 3 of its 10 steps (40 images, batch 8: 5 steps per epoch)
    assert main([*argv, "optim.max_steps=3"]) == 0
    text = capsys.readouterr().out
    assert "plan: budget 2ep -> 2 epoch(s)" in text and "10 steps of 5 per epoch" in text
    assert "pretrain:densecl stopped" in text and "--resume" in text
    state = json.load(open(os.path.join(out, "state.json")))
    assert "plan" in state["stages"] and "pretrain:densecl" not in state["stages"]
    assert not os.path.exists(os.path.join(out, "report.md"))

    # 2. --resume continues that run from its checkpoint (a later override lifts the stop) and finishes
    assert main(["--resume", "--out", out, "optim.max_steps=0"]) == 0
    text = capsys.readouterr().out
    assert "skip plan (done)" in text and "resuming its latest checkpoint" in text
    assert "resumed from" in text and "at step 3" in text
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "densecl", "metrics.jsonl"))]
    assert steps == list(range(1, 11))  # steps 1-3, then 4-10 after the resume: nothing repeated or lost
    mocov2 = [json.loads(line) for line in open(os.path.join(out, "mocov2", "metrics.jsonl"))]
    assert len(mocov2) == 10 and all(r["lambda"] == 0.0 for r in mocov2)

    rep = json.load(open(os.path.join(out, "report.json")))
    assert rep["plan"]["epochs"] == 2 and rep["runs"]["densecl"]["steps"] == 10
    for trunk in ("densecl", "mocov2", "random"):
        assert 0 <= rep["eval"][trunk]["knn_k20"] <= 100 and 0 <= rep["eval"][trunk]["dense_miou"] <= 100
    d = rep["densecl_minus_mocov2"]["dense_miou"]
    assert d == pytest.approx(rep["eval"]["densecl"]["dense_miou"] - rep["eval"]["mocov2"]["dense_miou"])
    assert rep["published_200ep"]["voc07_svm_c5"] == 82.5 and "svm" in rep["not_evaluated"]
    md = open(os.path.join(out, "report.md")).read()
    assert "DenseCL − MoCo-v2" in md and "(200 ep)" in md and "train_net.py" in md and "mim_dist_train_c4.sh" in md
    for png in ("loss.png", "throughput.png", "eval.png"):
        with open(os.path.join(out, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    for run in ("densecl", "mocov2"):
        for fmt, ext in EXPORT_FORMATS:
            assert os.path.getsize(os.path.join(out, "export", f"{run}_{fmt}.{ext}")) > 0

    # 3. --resume after a lost report: every finished stage is skipped, only the report is redone
    state = json.load(open(os.path.join(out, "state.json")))
    del state["stages"]["report"], state["stages"]["eval:mocov2:dense"]
    json.dump(state, open(os.path.join(out, "state.json"), "w"))
    os.remove(os.path.join(out, "report.md"))
    ckpt = os.path.join(out, "densecl", "checkpoints", "ckpt_000000010.pt")
    stamp = os.path.getmtime(ckpt)
    assert main(["--resume", "--out", out]) == 0
    text = capsys.readouterr().out
    for stage in ("plan", "pretrain:densecl", "pretrain:mocov2", "export:densecl", "eval:densecl:knn"):
        assert f"skip {stage} (done)" in text
    assert "eval:mocov2:dense ..." in text and "eval:densecl:dense ..." not in text
    assert os.path.getmtime(ckpt) == stamp and os.path.exists(os.path.join(out, "report.md"))
    assert len(open(os.path.join(out, "densecl", "metrics.jsonl")).readlines()) == 10


def test_a_budget_below_the_floor_is_refused_before_anything_is_recorded(tmp_path, data_cache, capsys):
    out = str(tmp_path / "repro")
    rc = main(["--data", "synthetic", "--budget", "1s", "--out", out, *tiny(data_cache)])
    err = capsys.readouterr().err
    assert rc == 2 and "give at least 60 s" in err and err.count("\n") == 1, err
    assert not os.path.exists(os.path.join(out, "state.json"))


def test_a_signal_during_the_probe_stops_the_reproduction_without_a_plan(tmp_path, data_cache, capsys, monkeypatch):
    out = str(tmp_path / "repro")
    # what the trainer leaves after SIGTERM at step 2 (a checkpoint of that step, exit status 0)
    child = tmp_path / "stopped_trainer.py"
    child.write_text("import os, sys\n"
                     "d = [a.split('=', 1)[1] for a in sys.argv if a.startswith('train.out_dir=')][-1]\n"
                     "os.makedirs(os.path.join(d, 'checkpoints'))\n"
                     "open(os.path.join(d, 'checkpoints', 'ckpt_000000002.pt'), 'w').close()\n")
    monkeypatch.setattr(probe_mod, "probe_command", lambda args, ov, nproc: [sys.executable, str(child), *ov])
    assert main(["--data", "synthetic", "--budget", "2ep", "--out", out, *tiny(data_cache)]) == 0
    text = capsys.readouterr().out
    assert "probe was stopped at step 2 of 5" in text and f"--out {out} --resume" in text
    assert "plan" not in json.load(open(os.path.join(out, "state.json")))["stages"]


def test_a_locked_run_directory_under_resume_is_one_line_exit_2(tmp_path, data_cache, capsys):
    """The run lock's refusal (a ConfigError raised inside train()) was a traceback."""
    import fcntl
    out = tmp_path / "repro"
    (out / "densecl").mkdir(parents=True)
    argv, p = tiny(data_cache), plan("2ep")
    p.update(probe={"timed_steps": 2}, config={"preset": "smoke"})
    (out / "state.json").write_text(json.dumps({
        "version": 1, "args": {"data": "synthetic", "budget": "2ep", "config": "smoke", "probe_steps": 2,
                               "overrides": argv[4:]},
        "plan": p, "stages": {"plan": {"finished": 1.0}}}))
    fd = os.open(out / "densecl" / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run holds train.out_dir
        os.write(fd, b"4242 on elsewhere\n")
        rc = main(["--resume", "--out", str(out)])
    finally:
        os.close(fd)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "is in use by another run" in err and str(out / "densecl") in err, err


@pytest.mark.slow
def test_a_reproduction_with_a_sharded_checkpoint_engine(tmp_path, data_cache, capsys):
    """The probe and the pretraining stage found the step of the last checkpoint with a
    regex for ckpt_<step>.pt, so train.engine=fsdp (ckpt_<step>.dcp/ folders) raised."""
    out = str(tmp_path / "repro")
    rc = main(["--data", "synthetic", "--budget", "1ep", "--no-random", "--out", out, *tiny(data_cache),
               "train.engine=fsdp"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    assert "plan: budget 1ep -> 1 epoch(s)" in captured.out
    state = json.load(open(os.path.join(out, "state.json")))
    ckpt = state["stages"]["pretrain:densecl"]["checkpoint"]
    assert ckpt.endswith("ckpt_000000005.dcp") and os.path.isdir(ckpt)
    assert state["stages"]["pretrain:densecl"]["steps"] == 5
    for fmt, ext in EXPORT_FORMATS:
        assert os.path.getsize(os.path.join(out, "export", f"densecl_{fmt}.{ext}")) > 0
    rep = json.load(open(os.path.join(out, "report.json")))
    assert rep["runs"]["densecl"]["steps"] == 5 and 0 <= rep["eval"]["densecl"]["knn_k20"] <= 100


# ---- the seeded experiment (DenseCL / MoCo-v2 / random, several seeds), shrunk -------------------------


def test_the_seeded_experiment_in_the_small(tmp_path, data_cache, capsys):
    """The one command of the DenseCL / MoCo-v2 / random comparison (docs/real-data-checks.md), shrunk to
    48 built-in images of 32 px, 2 seeds and one epoch: every run, evaluation (the dense probe on the built-in
    set's masks) and table of the report exists and the report's means, std and paired differences are those of
    the per-seed eval files. (It ran on the Fashion-MNIST scenes until they were retired.)"""
    out = str(tmp_path / "repro")
    argv = ["--data", "synthetic", "--config", "smoke", "--budget", "1ep", "--baseline", "--seeds", "2",
            "--out", out, "--probe-steps", "1", "--eval-max-val", "16", "model.hid_dim=32", "model.out_dim=16",
            "model.queue_len=64", "model.bn_group_size=4", "data.image_size=32", "data.num_workers=0",
            "data.synthetic_images=48", "data.synthetic_resolution=32",
            f"data.cache_dir={data_cache}", "optim.batch_size=8", "train.tensorboard=false", "train.progress=false",
            "train.knn_data=synthetic", "train.knn_every_epochs=0", "train.knn_every_steps=3", "train.knn_max_bank=48",
            "train.knn_max_val=16"]
    assert main(argv) == 0, capsys.readouterr()
    text = capsys.readouterr().out
    assert "seeds 0, 1" in text and "for each of 2 seeds (4 runs)" in text
    runs = ("densecl_s0", "mocov2_s0", "densecl_s1", "mocov2_s1")
    recs = {r: [json.loads(line) for line in open(os.path.join(out, r, "metrics.jsonl"))] for r in runs}
    assert all(len(v) == 6 for v in recs.values())                       # 48 images / batch 8, one epoch each
    assert all(x["lambda"] == 0.0 for r in ("mocov2_s0", "mocov2_s1") for x in recs[r])
    assert all(x["lambda"] == 0.5 for r in ("densecl_s0", "densecl_s1") for x in recs[r])
    assert recs["densecl_s0"][0]["loss"] != recs["densecl_s1"][0]["loss"]  # the seeds differ
    assert [x["step"] for x in recs["densecl_s0"] if "knn_top1" in x] == [3, 6]  # the online kNN curve

    rep = json.load(open(os.path.join(out, "report.json")))
    assert rep["seeds"] == [0, 1]
    trunks = [*runs, "random_s0", "random_s1"]
    for t in trunks:
        dense_json = json.load(open(os.path.join(out, "eval", t, "dense.json")))
        assert dense_json["seed"] == int(t[-1])
        assert rep["eval"][t]["dense_fg_miou"] == dense_json["fg_mIoU"] and 0 <= dense_json["fg_mIoU"] <= 100
        assert rep["eval"][t]["knn_k20"] == json.load(open(os.path.join(out, "eval", t, "knn.json")))["top1"]["20"]
    for metric in ("dense_fg_miou", "knn_k20"):
        for m in ("densecl", "mocov2", "random"):
            g = rep["by_method"][metric][m]
            vals = [rep["eval"][f"{m}_s{s}"][metric] for s in (0, 1)]
            assert g["mean"] == pytest.approx(sum(vals) / 2)
            assert g["std"] == pytest.approx(abs(vals[0] - vals[1]) / 2 ** 0.5)
        d = rep["paired_differences"]["densecl_minus_mocov2"][metric]
        per = [rep["eval"][f"densecl_s{s}"][metric] - rep["eval"][f"mocov2_s{s}"][metric] for s in (0, 1)]
        assert d["mean"] == pytest.approx(sum(per) / 2) and d["ahead"] == sum(p > 0 for p in per)
    md = open(os.path.join(out, "report.md")).read()
    assert "dense probe foreground mIoU" in md and "DenseCL: mean ± std" in md and "DenseCL − MoCo-v2" in md
    assert "| 1 | MoCo-v2 (λ = 0) |" in md and "/2 ahead)" in md and "The paper's claim" in md
    for png in ("loss.png", "knn.png", "throughput.png", "eval.png"):
        with open(os.path.join(out, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_seeds_name_the_runs_and_the_random_trunks_and_seed_every_probe():
    from types import SimpleNamespace
    from densecl_fast.config import load_config
    from densecl_fast.reproduce.runs import eval_jobs, pretrain_runs, seeds_of
    cfg = load_config("smoke", ["train.seed=5"])
    one = SimpleNamespace(seeds=1, baseline=True, no_random=False, data="synthetic", val="", voc="",
                          eval_image_size=0, eval_workers=0, eval_max_train=-1, eval_max_val=0)
    assert pretrain_runs(one, seeds_of(one, cfg)) == [("densecl", "densecl", 5), ("mocov2", "mocov2", 5)]
    three = SimpleNamespace(**{**vars(one), "seeds": 3})
    seeds = seeds_of(three, cfg)
    runs = pretrain_runs(three, seeds)
    assert seeds == [5, 6, 7] and [r[0] for r in runs] == ["densecl_s5", "mocov2_s5", "densecl_s6", "mocov2_s6",
                                                           "densecl_s7", "mocov2_s7"]
    jobs = eval_jobs(three, cfg, runs, seeds)
    assert {(t, m) for t, m, _ in jobs} == {(t, m) for t in [r[0] for r in runs] + ["random_s5", "random_s6", "random_s7"]
                                           for m in ("knn", "dense")}   # the built-in set has masks: dense runs
    for t, _, a in jobs:
        assert a[a.index("--seed") + 1] == t[-1] and a.count("--seed") == 1


def test_the_pretraining_child_imports_this_densecl_fast_whatever_its_working_folder(tmp_path):
    """`python -m` puts the working folder first on sys.path: a reproduction started inside another
    checkout must still train with the densecl_fast that started it."""
    from densecl_fast.reproduce.runs import child_env, pretrain_command
    (tmp_path / "densecl_fast").mkdir()
    (tmp_path / "densecl_fast" / "__init__.py").write_text("raise SystemExit('the wrong densecl_fast')\n")
    cmd = pretrain_command("smoke", ["--help"])
    r = subprocess.run(cmd, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "wrong" not in r.stderr + r.stdout, r.stderr
