"""`python -m perf` on the CPU: the CLI end to end, fail-soft variants, the budget in the runner, the FLOP count."""
import json
import math
import os
import subprocess
import sys

import torch

from densecl_fast.data import dali_available
from perf import budget, runner
from perf.cli import main
from perf.measure import STAGES, count_step_flops
from perf.results import goal_verdict, projection, recipe_hours

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_DALI = dali_available()

# resnet18 at 32 px, batch 4, queue 32: a step is ~0.1 s on two cores.
TINY = ["--device", "cpu", "--config", "smoke", "model.arch=resnet18", "model.hid_dim=32", "model.out_dim=16",
        "model.queue_len=32", "data.image_size=32", "optim.batch_size=4", "model.bn_group_size=2",
        "--baseline-batch", "4", "--warmup", "1", "--steps", "1", "--repeats", "2", "--workers", "0",
        "--data-resolution", "64x48", "--quiet"]


def run_cli(tmp_path, *extra):
    out = tmp_path / "out"
    rc = main(TINY + ["--out", str(out), "--data-cache", str(tmp_path / "cache")] + list(extra))
    with open(out / "results.json") as f:
        return rc, json.load(f), out


def by_name(results):
    return {v["name"]: v for v in results["variants"]}


def test_help_is_fast_and_documents_the_options():
    r = subprocess.run([sys.executable, "-m", "perf", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    for opt in ("--out", "--budget-seconds", "--peak-tflops", "--trace", "--variants", "--gpus"):
        assert opt in r.stdout


def test_cli_end_to_end_on_cpu(tmp_path):
    rc, res, out = run_cli(tmp_path, "--variants",
                           "mmselfsup_fp32_b32,eager_bf16_cl,compiled_fused,e2e_torchvision,e2e_dali",
                           "--trace", "--trace-steps", "1")
    assert rc == 0
    for name in ("results.json", "results.md", "throughput.png", "stages.png"):
        assert (out / name).stat().st_size > 0, name
    for png in ("throughput.png", "stages.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert res["environment"]["device_name"].startswith("CPU")
    assert res["environment"]["torch"] == torch.__version__
    assert res["peak"]["source"] == "measured" and res["peak"]["tflops"] > 0
    assert res["flops"]["per_image"] > 0 and "FlopCounterMode" in res["flops"]["method"]

    v = by_name(res)
    assert [x["name"] for x in res["variants"]] == ["mmselfsup_fp32_b32", "eager_bf16_cl", "compiled_fused",
                                                      "e2e_torchvision", "e2e_dali"]
    assert v["compiled_fused"]["status"] == "skipped" and "CUDA" in v["compiled_fused"]["reason"]
    ran = ["mmselfsup_fp32_b32", "eager_bf16_cl", "e2e_torchvision"] + (["e2e_dali"] if HAS_DALI else [])
    if not HAS_DALI:
        assert v["e2e_dali"]["status"] == "skipped"
    for name in ran:
        r = v[name]
        assert r["status"] == "ok", r
        ips = r["images_per_s"]
        assert ips["repeats"] == 2 and len(r["repeats_images_per_s"]) == 2
        assert 0 < ips["min"] <= ips["median"] <= ips["max"]
        assert set(STAGES) <= set(r["stages_ms"]) and "other" in r["stages_ms"]
        # the stages and "other" tile the step
        assert math.isclose(sum(r["stages_ms"].values()), r["stage_step_ms"], rel_tol=1e-6)
        assert r["tflops"] > 0 and r["mfu"] > 0
        assert os.path.getsize(r["trace"]) > 0 and r["trace"].endswith(".json.gz")
    assert v["mmselfsup_fp32_b32"]["settings"]["precision"] == "fp32"
    assert v["eager_bf16_cl"]["settings"]["channels_last"] is True
    for name, present in (("e2e_torchvision", True), ("e2e_dali", HAS_DALI)):
        e2e = v[name]
        if not present:
            assert e2e["status"] == "skipped"
            continue
        # the end-to-end variants take the model settings of the fastest model-only variant with the
        # recipe's BN (mmselfsup_fp32_b32 runs plain BN, bn_group_size 0: a baseline, never inherited)
        recipe_bn = [v[n] for n in ("mmselfsup_fp32_b32", "eager_bf16_cl")
                     if v[n]["status"] == "ok" and v[n]["settings"]["bn_group_size"] == e2e["settings"]["bn_group_size"]]
        assert [r["name"] for r in recipe_bn] == ["eager_bf16_cl"]
        fastest = max(recipe_bn, key=lambda r: r["images_per_s"]["median"])
        assert e2e["settings"]["settings_from"] == fastest["name"]
        assert e2e["settings"]["precision"] == fastest["settings"]["precision"]
        assert e2e["data_wait_host_ms"] is not None and e2e["stages_ms"]["data_wait"] >= 0

    pr = res["projection"]
    head = pr["headline"]
    assert head["variant"] == ("e2e_dali" if HAS_DALI else "e2e_torchvision")
    ips = head["images_per_s_per_gpu"]
    assert math.isclose(head["hours"]["1"], 1_281_167 * 200 / ips / 3600)
    assert math.isclose(head["hours"]["8"], head["hours"]["1"] / (8 * 0.9))
    assert "assumption" in pr and "seed_recipe_8x32" in pr
    assert res["goal"]["verdict"].startswith("not judged")

    md = (out / "results.md").read_text()
    for text in ("| variant |", "Where the milliseconds go", "Projection", "Goal", "skipped: needs CUDA"):
        assert text in md


def test_failing_variant_is_recorded_and_the_suite_goes_on(tmp_path, monkeypatch):
    real = runner.Suite.get_model

    def get_model(self, s):
        if s["precision"] == "fp32" and s["bn_group_size"] != 0:   # eager_fp32 only
            raise RuntimeError("boom: injected failure")
        return real(self, s)

    monkeypatch.setattr(runner.Suite, "get_model", get_model)
    rc, res, out = run_cli(tmp_path, "--variants", "mmselfsup_fp32_b32,eager_fp32,eager_bf16_cl",
                           "--peak-tflops", "1", "--no-plots")
    assert rc == 0
    v = by_name(res)
    assert v["mmselfsup_fp32_b32"]["status"] == "ok"
    assert v["eager_fp32"]["status"] == "failed"
    assert "boom: injected failure" in v["eager_fp32"]["error"] and "Traceback" in v["eager_fp32"]["traceback"]
    assert v["eager_bf16_cl"]["status"] == "ok"
    assert res["peak"]["source"].startswith("given")
    assert "failed: RuntimeError: boom" in (out / "results.md").read_text()


def test_a_failed_ceiling_measurement_leaves_mfu_out_and_the_variants_run(tmp_path, monkeypatch):
    def fail(*a, **k):
        raise RuntimeError("no matmul today")

    monkeypatch.setattr(runner, "measure_matmul_tflops", fail)
    rc, res, out = run_cli(tmp_path, "--variants", "eager_bf16_cl", "--no-plots")
    assert rc == 0
    assert res["peak"]["tflops"] is None and "no matmul today" in res["peak"]["method"]
    v = by_name(res)["eager_bf16_cl"]
    assert v["status"] == "ok" and v["mfu"] is None and v["tflops"] > 0


def test_failed_compile_is_not_retried(tmp_path, monkeypatch):
    def broken_compile(*a, **k):
        raise RuntimeError("inductor exploded")

    monkeypatch.setattr(torch, "compile", broken_compile)
    rc, res, _ = run_cli(tmp_path, "--variants", "compiled,e2e_torchvision", "--peak-tflops", "1", "--no-plots")
    assert rc == 1   # nothing measured
    v = by_name(res)
    assert v["compiled"]["status"] == "failed" and "inductor exploded" in v["compiled"]["error"]
    # no model-only variant succeeded: e2e takes the default full stack (compiled), which is not retried
    e2e = v["e2e_torchvision"]
    assert e2e["settings"]["compile"] is True
    assert e2e["status"] == "skipped" and e2e["reason"].startswith("not retried: compiling this model failed")


def test_budget_skips_what_does_not_fit(tmp_path):
    # A compile expected to take far longer than the budget: that variant is skipped, the others run.
    rc, res, _ = run_cli(tmp_path, "--variants", "eager_bf16_cl,compiled", "--budget-seconds", "120",
                         "--compile-estimate-s", "10000", "--peak-tflops", "1", "--no-plots")
    assert rc == 0
    v = by_name(res)
    assert v["eager_bf16_cl"]["status"] == "ok"
    assert v["compiled"]["status"] == "skipped" and v["compiled"]["reason"].startswith("budget")


def test_budget_exhausted_skips_everything_and_still_writes(tmp_path):
    rc, res, out = run_cli(tmp_path, "--variants", "eager_fp32,eager_bf16_cl", "--budget-seconds", "0.001",
                           "--peak-tflops", "1")
    assert rc == 1   # nothing measured
    assert all(x["status"] == "skipped" and "budget" in x["reason"] for x in res["variants"])
    assert (out / "results.md").exists() and (out / "throughput.png").exists()


def test_flop_count_resnet50_224_matches_known_values():
    from densecl_fast.config import load_config
    cfg = load_config("densecl_r50_200e_in1k", [])
    f = count_step_flops(cfg.model, 8, 224)
    st = f["per_stage_per_image"]
    # torchvision: ResNet-50 forward at 224 = 4.09 G multiply-adds = 8.18 GFLOP; + the DenseCL neck
    # (1x1 convs 2048->2048->128 on 7x7 and the global MLP, ~0.45 GFLOP).
    assert 8.18e9 < st["query_forward"] < 8.18e9 * 1.1
    assert math.isclose(st["key_forward"], st["query_forward"], rel_tol=1e-6)
    assert 1.8 < st["backward"] / st["query_forward"] < 2.3      # ~2x forward (no input grad for conv1)
    loss_fwd = st["loss_global"] + st["loss_dense"]
    assert math.isclose(loss_fwd, f["analytic_check"]["queue_logits_forward_per_image"], rel_tol=0.02)
    assert 30e9 < f["per_image"] < 42e9                          # ~4.4x the trunk forward in all


def test_goal_and_projection_arithmetic():
    def rec(name, ips, data="synthetic"):
        return {"name": name, "status": "ok", "data": data, "settings": {"data": data},
                "images_per_s": {"median": ips, "min": ips, "max": ips}}

    h100 = "NVIDIA H100 80GB HBM3"
    runs = [rec("mmselfsup_fp32_b32", 889), rec("compiled", 2868), rec("e2e_dali", 4200, "dali")]
    g = goal_verdict(runs, h100, 256, 224)
    assert g["verdict"] == "PASS" and math.isclose(g["ratio_vs_compiled"], 4200 / 2868)
    runs[2] = rec("e2e_dali", 3900, "dali")
    assert goal_verdict(runs, h100, 256, 224)["verdict"] == "FAIL"
    assert goal_verdict(runs, "NVIDIA A100-SXM4-80GB", 256, 224)["verdict"].startswith("not judged")
    assert goal_verdict(runs[:2], h100, 256, 224)["verdict"].startswith("not judged")
    p = projection(runs, gpus=[1, 8], efficiency=0.9)
    assert p["headline"]["variant"] == "e2e_dali"
    assert math.isclose(p["headline"]["hours"]["1"], recipe_hours(3900))
    assert math.isclose(recipe_hours(1000), 1_281_167 * 200 / 1000 / 3600)
    assert math.isclose(recipe_hours(1000, gpus=8, efficiency=0.5), recipe_hours(1000) / 4)


def test_same_run_baselines_are_variants_with_plain_bn_and_never_inherited(tmp_path):
    from perf.variants import default_variants
    v = {x.name: x for x in default_variants()}
    for name in ("eager_plain_bn", "compiled_plain_bn"):
        assert v[name].bn_group_size == 0 and not v[name].fused and v[name].precision == "bf16"
    assert v["compiled_plain_bn"].compile and not v["eager_plain_bn"].compile
    assert v["compiled_fused_cudagraphs"].compile_mode == "reduce-overhead" and v["compiled_fused_cudagraphs"].cuda_only
    # The e2e variant takes the fastest model-only setting with the recipe's BN groups: a faster
    # plain-BN baseline is never what the end-to-end variant trains.
    from perf.cli import parse_args
    suite = runner.Suite(parse_args(TINY + ["--out", str(tmp_path / "o")]), [], 0.0)
    ok = lambda name, bn, ips: {"name": name, "status": "ok", "images_per_s": {"median": ips},   # noqa: E731
                                "settings": {"data": "synthetic", "batch": 4, "bn_group_size": bn, "precision": "bf16",
                                             "channels_last": True, "compile": False, "fused": False,
                                             "compile_mode": "default"}}
    suite.records = [ok("eager_plain_bn", 0, 100.0), ok("eager_bf16_cl", 2, 50.0)]
    s = suite.settings_for(v["e2e_torchvision"])
    assert s["settings_from"] == "eager_bf16_cl" and s["bn_group_size"] == 2


def test_baseline_ratios():
    from perf.results import baseline_ratios, markdown
    rec = lambda name, ips: {"name": name, "status": "ok", "images_per_s": {"median": ips}}   # noqa: E731
    r = baseline_ratios([rec("eager_plain_bn", 2000), rec("eager_bf16_cl_fused", 1940), rec("compiled_plain_bn", 3000),
                         rec("compiled_fused", 2900), rec("eager_bf16_cl", 1800)])
    assert math.isclose(r["grouping_cost"]["ratio"], 0.97) and r["grouping_cost"]["met"] is True
    assert math.isclose(r["compiled"]["ratio"], 2900 / 3000) and r["compiled"]["met"] is False
    assert math.isclose(r["grouped_bn_alone_eager"]["ratio"], 0.9) and r["grouped_bn_alone_eager"]["met"] is None
    assert r["grouped_bn_alone_compiled"]["ratio"] is None      # no `compiled` in this run
    md = markdown({"meta": {"date": "d", "command": "c", "config": "x", "arch": "a", "batch": 1, "image_size": 1,
                            "queue_len": 1, "bn_group_size": 1, "timing": "t", "warmup": 1, "steps": 1, "repeats": 1},
                   "environment": {}, "variants": [], "ratios": r})
    assert "Same-run baselines" in md and "| grouping_cost | eager_bf16_cl_fused / eager_plain_bn | 0.970x | ≥ 0.95x | yes |" in md


DEVICE_SCRIPTS = ("perf/device_check.sh", "perf/device_check_dali.sh")


def test_device_check_scripts_parse_and_list_runnable_steps(tmp_path):
    """CI's guard for the prepared GPU checks: valid bash, and every step they list names a module
    that exists and variants that `python -m perf` knows (the full rehearsal is `--device cpu`);
    a dry run writes nothing."""
    import importlib.util
    import re
    from perf.variants import default_variants
    known = {v.name for v in default_variants()}
    for script in DEVICE_SCRIPTS:
        r = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        for device in ("cuda", "cpu"):
            out = tmp_path / device
            r = subprocess.run(["bash", script, "--dry-run", "--device", device], cwd=ROOT, capture_output=True,
                               text=True, timeout=30, env={**os.environ, "OUT": str(out)})
            assert r.returncode == 0, r.stdout + r.stderr
            assert not out.exists(), f"{script} --dry-run wrote {out}"
            steps = [line for line in r.stdout.splitlines() if line.startswith("== ")]
            assert len(steps) >= 3 and "0 step(s) failed" in r.stdout, r.stdout
            for mod in re.findall(r" -m ([\w.]+)", r.stdout):
                assert importlib.util.find_spec(mod) is not None, (script, mod)
            for listed in re.findall(r"--variants (\S+)", r.stdout):
                assert set(listed.split(",")) <= known, (script, listed)
        bad = subprocess.run(["bash", script, "--device", "tpu"], cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert bad.returncode == 2 and "use cuda or cpu" in bad.stderr
        bad = subprocess.run(["bash", script, "--dry-run", "--only", "nonesuch"], cwd=ROOT, capture_output=True,
                             text=True, timeout=30)
        assert bad.returncode == 2 and "--only nonesuch: no such step" in bad.stderr
    text = open(os.path.join(ROOT, "perf/device_check.sh")).read()
    for name in ("mmselfsup_fp32_b32", "eager_plain_bn", "eager_bf16_cl_fused", "compiled_plain_bn", "compiled_fused",
                 "tests/test_kernels.py", "tests/test_group_bn.py"):
        assert name in text
    r = subprocess.run(["bash", "perf/device_check.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    tests_step = next(line for line in r.stdout.splitlines() if line.startswith("== kernel_tests"))
    assert " -n 8 " in tests_step and "tests/test_kernels.py tests/test_group_bn.py" in tests_step   # xdist, both files


# The lent machine's budget. One session: 900 s of device time, the machine's start
# included (docs/profiling.md, "The device session": up to ~180 s); one call at most 600 s.
SESSION_S, START_S, CALL_S, DALI_PART_CALLS_S = 900, 180, 600, 4 * 15


def test_device_check_limits_fit_one_session_with_room_for_a_step_rerun():
    import re
    calls = {}
    for script in DEVICE_SCRIPTS:
        r = subprocess.run(["bash", script, "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=30)
        limits = [int(x) for x in re.findall(r"^== \S+ \(timeout (\d+) s", r.stdout, re.M)]
        grace = int(re.search(r"kill (\d+) s later", r.stdout).group(1))
        summed = int(re.search(r"step limits sum to (\d+) s", r.stdout).group(1))
        assert summed == sum(limits)
        timeout_s = int(re.search(r"timeout_s (\d+)", open(os.path.join(ROOT, script)).read()).group(1))
        # the call's limit holds every step at its limit and one kill grace, and is one device call
        assert sum(limits) + grace <= timeout_s <= CALL_S, (script, sum(limits), timeout_s)
        calls[script] = (timeout_s, max(limits))
    used = START_S + sum(t for t, _ in calls.values()) + DALI_PART_CALLS_S
    assert used + 90 <= SESSION_S, used          # room to rerun a step of up to 90 s (--only kernel_tests, ...)


def test_a_step_that_ignores_sigterm_is_killed_and_logs_go_to_one_file(tmp_path):
    script = (f". perf/device_common.sh; parse_args --device cuda; OUT={tmp_path}/out; PY=python3; prepare; "
              "step hang 1 bash -c 'trap \"\" TERM; echo started; sleep 60'; step ok 5 echo fine; finish")
    r = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=30,
                       env={**os.environ, "KILL_GRACE": "1"})
    assert r.returncode == 0, r.stderr
    assert "== hang: exit 137" in r.stdout and "(time limit)" in r.stdout, r.stdout
    assert "1 step(s) failed" in r.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["check.log", "log.txt"]
    log = (tmp_path / "out" / "log.txt").read_text()
    assert "===== hang" in log and "started" in log and "===== ok" in log and "fine" in log

class FakeClock:
    """Stands in for the `time` module of the runner and its budget: seconds pass only when a fake step says so."""

    def __init__(self):
        self.t = 1000.0

    def monotonic(self):
        return self.t

    perf_counter = monotonic


def fake_suite(monkeypatch, tmp_path, first_step_s, step_s=1.0, *extra, eager_first_s=None):
    """The runner with a fake clock, fake models (nothing is built or compiled) and a fake train_step:
    the first step of each new compiled model takes `first_step_s`, of an eager one `eager_first_s`
    (default `step_s`), every other step `step_s`."""
    from perf.cli import parse_args
    clock = FakeClock()
    monkeypatch.setattr(runner, "time", clock)
    monkeypatch.setattr(budget, "time", clock)
    monkeypatch.setattr(runner, "build_model", lambda cfg, device, precision, channels_last, compiled, seed:
                        (torch.nn.Module(), {"compiled": compiled is not None}))

    def train_step(model, engine, im_q, im_k, lr, lam):
        first = not engine.get("stepped")
        engine["stepped"] = True
        clock.t += ((first_step_s if engine["compiled"] else eager_first_s or step_s) if first else step_s)
        return {"loss": torch.tensor(1.0)}

    monkeypatch.setattr(runner, "train_step", train_step)
    args = parse_args(TINY + ["--out", str(tmp_path / "out"), "--no-plots", "--peak-tflops", "1", "--warmup", "3",
                              "--steps", "8", "--repeats", "3", *extra])
    return clock, args


def run_compile_suite(monkeypatch, tmp_path, first_step_s):
    """Four variants (two compiled) under a 240 s budget and a 60 s compile guess, the first compiled step
    taking `first_step_s`, every other 1 s -> (results by variant, seconds the suite took)."""
    clock, args = fake_suite(monkeypatch, tmp_path, first_step_s, 1.0, "--budget-seconds", "240",
                             "--compile-estimate-s", "60",
                             "--variants", "eager_plain_bn,compiled_plain_bn,compiled,eager_bf16_cl")
    t0 = clock.t
    assert runner.run(args, [], t0) == 0
    with open(tmp_path / "out" / "results.json") as f:
        return by_name(json.load(f)), clock.t - t0


def test_a_compile_longer_than_the_cap_still_gets_steady_steps_and_an_honest_compile_time(tmp_path, monkeypatch):
    """A compile longer than the variant's cap used to leave no time for a steady step;
    the first step then stood for the steady one, compile_s read 0.0 and the variant was skipped."""
    v, took = run_compile_suite(monkeypatch, tmp_path, 100.0)
    c = v["compiled_plain_bn"]
    assert c["status"] == "ok", c
    assert c["warmup_steps"] >= 3                            # the first step and at least two steady ones
    assert c["compile_s"] == 100.0 - 1.0 and c["first_step_s"] == 100.0
    assert c["step_ms"] == 1000.0 and c["images_per_s"]["median"] == 4.0   # 1 s per step of 4 images
    # the measured compile (not the 60 s guess, nor the 1 s floor of a zero) budgets the next compile
    assert v["compiled"]["status"] == "skipped" and "needs ~101 s" in v["compiled"]["reason"], v["compiled"]
    assert v["eager_plain_bn"]["status"] == "ok" and v["eager_bf16_cl"]["status"] == "ok"
    assert took <= 240
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| compiled_plain_bn | default | 99.0 | – | 100.0 | 3 |" in md, md


def test_a_compile_within_the_estimate_keeps_the_suite_inside_its_budget(tmp_path, monkeypatch):
    v, took = run_compile_suite(monkeypatch, tmp_path, 30.0)
    assert all(x["status"] == "ok" for x in v.values()), v
    assert v["compiled_plain_bn"]["compile_s"] == v["compiled"]["compile_s"] == 29.0
    assert took <= 240


def test_a_compile_past_the_whole_budget_is_recorded_and_nothing_more_is_timed(tmp_path, monkeypatch):
    """A compile that outlasts the suite's budget (264 s in a CPU rehearsal with 240 s): its time and
    two steady steps are recorded, no timed repeats are started past the budget."""
    clock, args = fake_suite(monkeypatch, tmp_path, 300.0, 1.0, "--budget-seconds", "240", "--compile-estimate-s",
                             "30", "--variants", "compiled_plain_bn")
    t0 = clock.t
    assert runner.run(args, [], t0) == 1   # nothing measured
    with open(tmp_path / "out" / "results.json") as f:
        c = by_name(json.load(f))["compiled_plain_bn"]
    assert c["status"] == "skipped" and c["compile_s"] == 299.0 and c["warmup_steps"] == 3, c
    assert "299.0 s of it compile/JIT, recorded" in c["reason"]
    assert clock.t - t0 == 300.0 + 2 * 1.0


def test_a_slow_first_eager_step_is_not_taken_for_a_steady_one(tmp_path, monkeypatch):
    """cuDNN autotuning (or oneDNN's on the CPU: 54 s in a CPU rehearsal) makes an eager variant's
    first step long: the step is still timed on steady steps, not skipped as 'a step takes 54 s'."""
    clock, args = fake_suite(monkeypatch, tmp_path, 30.0, 1.0, "--budget-seconds", "240", "--compile-estimate-s",
                             "60", "--variants", "eager_plain_bn,compiled_plain_bn",
                             eager_first_s=70.0)
    t0 = clock.t
    assert runner.run(args, [], t0) == 0
    with open(tmp_path / "out" / "results.json") as f:
        v = by_name(json.load(f))
    e = v["eager_plain_bn"]
    assert e["status"] == "ok" and e["first_step_s"] == 70.0 and e["step_ms"] == 1000.0, e
    assert e["warmup_steps"] >= 2 and "compile_s" not in e
    assert v["compiled_plain_bn"]["status"] == "ok" and v["compiled_plain_bn"]["compile_s"] == 29.0, \
        [(x["name"], x.get("reason"), x.get("seconds")) for x in v.values()]
    assert clock.t - t0 <= 240


def test_the_caps_set_aside_the_triton_jit_of_a_fused_variant(tmp_path):
    """A fused variant's first step JIT-compiles the Triton kernels (15.8 s on an H200 before the
    grouped-BN kernels): its cap holds that apart from its steady share, once per kernel setting."""
    from perf.cli import parse_args
    suite = runner.Suite(parse_args(TINY + ["--out", str(tmp_path / "o"), "--budget-seconds", "300",
                                            "--variants", "eager_plain_bn,eager_bf16_cl_fused"]), [], runner.time.monotonic())
    suite.cuda = True
    fused = suite.settings_for(suite.variants[1])
    assert suite.one_off_s(fused) == budget.JIT_ESTIMATE_S
    assert suite.time_cap(1, fused) > budget.JIT_ESTIMATE_S
    suite.jitted.add(suite.jit_key(fused))
    assert suite.one_off_s(fused) == 0.0


def test_bench_kernels_prints_each_row_as_it_is_measured(capsys):
    """A device call cut by its time limit lost the whole kernel table, printed only at the end."""
    from perf import bench_kernels
    rows = []
    bench_kernels.attempt(rows, "queue InfoNCE dense", "fused", lambda: (0.881, 31.0))
    assert capsys.readouterr().out.split() == ["queue", "InfoNCE", "dense", "fused", "0.881", "31.0"]

    def boom():
        raise RuntimeError("out of registers\nsecond line")

    bench_kernels.attempt(rows, "queue InfoNCE dense", "eager", boom)
    assert "failed: RuntimeError: out of registers" in capsys.readouterr().out
    assert len(rows) == 2
