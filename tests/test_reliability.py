"""Reliability: signals to the process group and under torchrun, one run per directory,
one clear line (exit 2) for every bad input, checkpoints with checksums, odd file names.

One tiny trained run (`trained`, 8 steps, checkpoints at 4 and 8) is shared by the checkpoint
tests; tests that change files work on copies of it.
"""
import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from densecl_fast import kernels
from densecl_fast import checkpoint
from densecl_fast.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from densecl_fast.config import DataConfig, ConfigError, load_config
from densecl_fast.data import DataError
from densecl_fast.data.sources import list_images, read_file_list
from densecl_fast.data.torch_loader import TorchTwoViewLoader
from densecl_fast.run_dir import RunLock
from helpers import PRETRAIN, ROOT, load_script, tiny
from densecl_fast.trainer import NonFiniteLossError, lr_at, train

SCAN = os.path.join(ROOT, "launch", "scan_data.py")


pretrain_cli = load_script("pretrain_cli", PRETRAIN)
scan_cli = load_script("scan_cli", SCAN)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache):
    """One finished tiny run; do not modify it (copy it with `copy_run`)."""
    out = str(tmp_path_factory.mktemp("trained") / "run")
    summary = train(load_config("smoke", tiny(out, data_cache)))
    assert summary["status"] == "finished" and summary["step"] == 8
    return out


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def cli(argv, capsys):
    """launch/pretrain.py's main in this process -> (exit status, stderr)."""
    rc = pretrain_cli.main(argv)
    err = capsys.readouterr().err
    return rc, err


def one_error_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), err
    assert "Traceback" not in err, err
    return lines[-1]


def wait_for_metrics(proc, out, timeout=240):
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read())
        time.sleep(0.2)


# ---- 1. SIGTERM to the process group; under torchrun ---------------------------------------------

def test_sigterm_to_the_process_group_with_workers_checkpoints_and_exits_0(tmp_path, data_cache):
    out = str(tmp_path / "group")
    args = tiny(out, data_cache, "optim.epochs=50", "data.num_workers=2")
    proc = subprocess.Popen([sys.executable, PRETRAIN, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # like setsid: its own process group
    try:
        wait_for_metrics(proc, out)
        time.sleep(1.0)  # mid-run, workers busy
        os.killpg(proc.pid, signal.SIGTERM)  # what SLURM / Kubernetes send: the whole group
        text, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, text
    assert "stopped by SIGTERM" in text and "killed by signal" not in text, text
    saved = load_checkpoint(list_checkpoints(out)[-1])
    assert saved["reason"] == "signal"


@pytest.mark.distributed
def test_sigterm_to_torchrun_every_rank_checkpoints(tmp_path, data_cache):
    out = str(tmp_path / "torchrun")
    args = tiny(out, data_cache, "optim.epochs=50", "data.num_workers=1", "train.deterministic=false")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             PRETRAIN, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        wait_for_metrics(proc, out, timeout=300)
        proc.send_signal(signal.SIGTERM)  # the agent forwards it to every rank's process group
        text, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # torchrun itself re-raises the signal (exit 1, its own traceback); the ranks must stop cleanly.
    assert "killed by signal" not in text and "ChildFailedError" not in text, text
    assert text.count("stopped by SIGTERM") >= 1 and "error:" not in text, text
    saved = load_checkpoint(list_checkpoints(out)[-1])
    assert saved["reason"] == "signal" and len(saved["shuffle_rng"]) == 2 and saved["world_size"] == 2


# ---- 2. one run per directory ----------------------------------------------------------------------

def test_fresh_run_into_a_used_out_dir_is_refused(tmp_path, data_cache, trained, capsys):
    out = copy_run(trained, tmp_path / "used")
    before = sorted(os.listdir(os.path.join(out, "checkpoints")))
    # data.source that does not exist: the refusal must come first, before any data is listed
    rc, err = cli(tiny(out, data_cache, "optim.epochs=1", "train.keep_last=1", "data.source=/nope"), capsys)
    line = one_error_line(err)
    assert rc == 2 and "already holds the checkpoints of another run" in line and "--resume auto" in line
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == before
    # resuming an older checkpoint of the same directory would mix histories
    with pytest.raises(ConfigError, match="newer checkpoints of this run"):
        train(load_config("smoke", tiny(out, data_cache, f"train.resume={list_checkpoints(out)[0]}")))
    # a checkpoint of another directory into a used one: refused too
    other = copy_run(trained, tmp_path / "other")
    with pytest.raises(ConfigError, match="checkpoints of another run"):
        train(load_config("smoke", tiny(out, data_cache, f"train.resume={list_checkpoints(other)[-1]}")))
    # --resume auto with a shorter schedule: a clear error, not "finished: 8/4 steps"
    with pytest.raises(CheckpointError, match="past the end of this run"):
        train(load_config("smoke", tiny(out, data_cache, "optim.epochs=1", "train.resume=auto")))


def test_two_runs_in_one_directory_at_once_are_refused(tmp_path, data_cache):
    out = tmp_path / "busy"
    out.mkdir()
    lock = RunLock(str(out)).acquire()  # another run holds the directory
    try:
        with pytest.raises(ConfigError, match=r"is in use by another run \(pid \d+"):
            train(load_config("smoke", tiny(str(out), data_cache, "data.source=/nope")))
    finally:
        lock.release()
    with pytest.raises(DataError):  # free again: gets as far as the data
        train(load_config("smoke", tiny(str(out), data_cache, "data.source=/nope")))


# ---- 3. bad configs: one line, exit 2, at load time ------------------------------------------------

def test_bad_configs_are_one_line_and_exit_2(tmp_path, data_cache, capsys, monkeypatch):
    out = str(tmp_path / "r")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model:\n  arch: [resnet18\n")
    cases = [
        (["optim.batch_size=12", "model.queue_len=1536"], "model.bn_group_size=8"),
        (["train.precision=fp16"], "train.precision=fp16"),
        (["--config", str(bad_yaml)], "not valid YAML"),
        (["train.log_every=0"], "train.log_every=0"),
        (["train.ckpt_every_epochs=0"], "train.ckpt_every_epochs=0"),
        (["train.device=cuda"], "train.device=cuda"),
        (["train.kernels=triton"], "train.kernels=triton"),
        (["model.no_such_key=1"], "model.no_such_key"),
    ]
    if torch.cuda.is_available():
        cases = [c for c in cases if "cuda" not in c[1] and "fp16" not in c[1] and "triton" not in c[1]]
    # conftest sets TRITON_INTERPRET=1 (Triton on CPU through the interpreter); a user's machine does not
    monkeypatch.setattr(kernels.dispatch, "_can_run_on", lambda device: device.type == "cuda")
    for argv, key in cases:
        rc, err = cli([*argv, f"train.out_dir={out}"], capsys)
        assert rc == 2, (argv, err)
        assert key in one_error_line(err), (argv, err)
    assert not os.path.exists(out), "nothing may be created for a bad config"


def test_cli_exit_status_and_overrides_after_resume(tmp_path, data_cache, trained):
    r = subprocess.run([sys.executable, PRETRAIN, "train.log_every=0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: train.log_every=0"), r.stderr
    # `--resume auto key=value` (overrides after the option) is accepted
    r = subprocess.run([sys.executable, PRETRAIN, "--resume", "auto", "--print-config", "optim.epochs=7"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "epochs: 7" in r.stdout and "resume: auto" in r.stdout, r.stderr


# ---- 4. unusable out_dir: checked first ---------------------------------------------------------

def test_unusable_out_dir_is_one_line_before_data(tmp_path, data_cache, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [(str(a_file), "is an existing file"), (str(a_file / "sub"), "is a file, not a directory"),
             ("", "train.out_dir")]
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        cases.append((str(ro / "run"), "permission denied"))
    for out, why in cases:
        rc, err = cli(tiny(out, data_cache, "data.source=/nope"), capsys)  # the data error would come later
        line = one_error_line(err)
        assert rc == 2 and why in line and "train.out_dir" in line, (out, err)


# ---- 5. file names and lists that are not UTF-8 -------------------------------------------------

def _img(path, seed):
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(arr).save(path, format="PNG" if path.endswith(".png") else "JPEG")


@pytest.fixture
def latin1_folder(tmp_path):
    folder = tmp_path / "imgs"
    cls = os.path.join(os.fsencode(str(folder)), b"caf\xe9")  # a Latin-1 class folder name
    os.makedirs(cls)
    for i in range(8):
        name = b"na\xefve_%d.jpg" % i if i % 2 else b"plain_%d.jpg" % i
        _img(os.fsdecode(os.path.join(cls, name)), i)
    return str(folder)


def test_latin1_file_names_train_and_scan(latin1_folder, tmp_path, capsys):
    cfg = DataConfig(source=latin1_folder, image_size=32, num_workers=1)
    loader = TorchTwoViewLoader(cfg, batch_size=4)
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == 2 and loader.skipped == 0
    # scan_data writes the names as their own bytes; the list trains
    out = tmp_path / "clean.txt"
    assert scan_cli.main([latin1_folder, "--out", str(out), "--workers", "1"]) == 0
    capsys.readouterr()
    assert b"na\xefve_1.jpg" in out.read_bytes()
    assert sorted(list_images(DataConfig(source=str(out)))) == sorted(list_images(DataConfig(source=latin1_folder)))


@pytest.mark.dali
def test_latin1_file_names_on_the_dali_backend(latin1_folder, tmp_path):
    pytest.importorskip("nvidia.dali")
    from densecl_fast.data.dali.loader import DaliTwoViewLoader
    cfg = DataConfig(source=latin1_folder, backend="dali", image_size=32, num_workers=1,
                     cache_dir=str(tmp_path / "cache"))
    loader = DaliTwoViewLoader(cfg, batch_size=4)
    loader.set_epoch(0)
    assert len(list(loader)) == 2 and loader.skipped == 0


def test_file_lists_in_other_encodings_and_with_a_bom(tmp_path):
    img = tmp_path / "a.png"
    _img(str(img), 0)
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbfa.png 3\n")
    samples, missing = read_file_list(str(bom))
    assert missing == [] and [(os.path.basename(s.path), s.label) for s in samples] == [("a.png", "3")]
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"a.png\n# comment\nd\xe9j\xe0.png 1\n")
    with pytest.raises(DataError, match=r"latin\.txt, line 3: not UTF-8 \(byte 0xe9 at column 2\)"):
        read_file_list(str(latin))


# ---- 6. odd checkpoints -------------------------------------------------------------------------

def _rewrite(src, dst, edit, rechecksum=True):
    saved = torch.load(src, map_location="cpu", weights_only=True)
    edit(saved)
    if rechecksum:
        saved["checksum"] = checkpoint.checksum(saved)
    torch.save(saved, dst)
    return str(dst)


def test_structurally_odd_checkpoints_are_one_line(tmp_path, data_cache, trained, capsys):
    src = list_checkpoints(trained)[-1]
    out = str(tmp_path / "fresh")
    variants = {
        "unknown config key": (lambda saved: saved["config"]["train"].update(no_such_key=1), "no_such_key"),
        "no optimizer": (lambda saved: saved.pop("optimizer"), "no 'optimizer' entry"),
        "no config": (lambda saved: saved.pop("config"), "no 'config' entry"),
        # before 1.0 there is nothing to migrate: an older format or a renamed key is refused
        "format 1": (lambda saved: saved.update(format_version=1), "has checkpoint format 1, this version reads format 2"),
        "renamed key": (lambda saved: saved["config"]["model"].update(sync_bn=True), "holds a config this version cannot "
                        "use: model.sync_bn was replaced by model.bn"),
    }
    for i, (name, (edit, want)) in enumerate(variants.items()):
        path = _rewrite(src, tmp_path / f"v{i}.pt", edit)
        rc, err = cli(tiny(out, data_cache, f"train.resume={path}", "data.source=/nope"), capsys)
        line = one_error_line(err)
        assert rc == 2 and want in line, (name, err)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"the file is empty \(0 bytes\)"):
        load_checkpoint(str(empty))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, evil)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(evil))
    assert "refusing checkpoint" in str(e.value) and "weights_only" not in str(e.value)
    assert "\n" not in str(e.value)


def test_checksum_catches_a_damaged_tensor(tmp_path, trained):
    src = list_checkpoints(trained)[-1]
    assert isinstance(load_checkpoint(src)["checksum"], str)
    bad = tmp_path / "damaged.pt"
    shutil.copy(src, bad)
    size = os.path.getsize(bad)
    with open(bad, "r+b") as f:  # 64 KiB in the middle: inside the largest tensor's bytes
        f.seek(size // 2)
        f.write(os.urandom(64 << 10))
    torch.load(str(bad), map_location="cpu", weights_only=True)  # PyTorch alone loads it silently
    with pytest.raises(CheckpointError, match="is corrupt: its content does not match the checksum"):
        load_checkpoint(str(bad))


def test_stale_temp_files_are_removed_at_start(tmp_path, data_cache, trained):
    out = copy_run(trained, tmp_path / "run")
    stale = os.path.join(out, "checkpoints", ".ckpt_000000009.pt.tmp99999")
    with open(stale, "wb") as f:
        f.write(b"\0" * 1024)
    with pytest.raises(DataError):  # stops at the data, after the run directory was prepared
        train(load_config("smoke", tiny(out, data_cache, "train.resume=auto", "data.source=/nope")))
    assert not os.path.exists(stale)


# ---- 7. resume with a different data set / number of processes ---------------------------------

def test_resume_after_the_data_set_changed_size_is_an_error(tmp_path, data_cache, trained):
    out = copy_run(trained, tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"written with 4 steps per epoch .* give 6"):
        train(load_config("smoke", tiny(out, data_cache, "train.resume=auto", "optim.epochs=4",
                                        "data.synthetic_images=48")))


def test_resume_on_another_number_of_processes_warns(tmp_path, data_cache, trained, capfd):
    out = copy_run(trained, tmp_path / "run")
    last = list_checkpoints(out)[-1]

    def as_two_ranks(saved):
        saved["shuffle_rng"] = [saved["shuffle_rng"][0], saved["shuffle_rng"][0].clone()]
        saved["world_size"] = 2
    _rewrite(last, last, as_two_ranks)
    summary = train(load_config("smoke", tiny(out, data_cache, "train.resume=auto", "optim.epochs=3",
                                              "optim.max_steps=9")))
    assert summary["step"] == 9
    assert "written by 2 process(es), resuming on 1" in capfd.readouterr().err


# ---- 8. smaller ones ------------------------------------------------------------------------------

def test_missing_list_entry_with_spaces_is_reported_whole(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("my holiday photo.jpg\nmissing.jpg 3\n")
    with pytest.raises(DataError) as e:
        list_images(DataConfig(source=str(lst)))
    assert str(tmp_path / "my holiday photo.jpg") in str(e.value)
    assert str(tmp_path / "missing.jpg") in str(e.value) and "missing.jpg 3" not in str(e.value)


def test_non_finite_message_names_the_lr_of_the_bad_step(tmp_path, data_cache, monkeypatch):
    real = kernels.queue_infonce
    calls = {"n": 0}

    def poisoned(q, l_pos, queue, t):  # two calls per step: step 3 is the first bad one
        calls["n"] += 1
        loss = real(q, l_pos, queue, t)
        return loss * float("nan") if calls["n"] > 4 else loss

    monkeypatch.setattr(kernels, "queue_infonce", poisoned)
    cfg = load_config("smoke", tiny(str(tmp_path / "nan"), data_cache, "train.log_every=4"))
    base = cfg.optim.lr * 8 / 256  # per 256 images, batch 8
    want = lr_at(2, 8, base, 0, 0.0)
    assert want != lr_at(3, 8, base, 0, 0.0)
    with pytest.raises(NonFiniteLossError, match=rf"step 3 \(lr {want:g}\)"):  # detected at step 4
        train(cfg)


def test_scan_data_out_into_a_missing_folder(tmp_path, latin1_folder, capsys):
    rc = scan_cli.main([latin1_folder, "--out", str(tmp_path / "no" / "such" / "clean.txt")])
    err = capsys.readouterr().err
    assert rc == 2 and "does not exist" in err and "Traceback" not in err


def test_all_unreadable_folder_is_one_line_on_the_torch_backend(tmp_path, data_cache, capsys):
    folder = tmp_path / "junk"
    folder.mkdir()
    for i in range(40):
        (folder / f"{i}.jpg").write_bytes(b"not an image")
    rc, err = cli(tiny(str(tmp_path / "r"), data_cache, f"data.source={folder}", "data.num_workers=1"), capsys)
    line = one_error_line(err)
    assert rc == 2 and "could not be read" in line and "worker" not in err.lower(), err


def test_full_disk_during_a_checkpoint_write_is_one_line(tmp_path, data_cache, monkeypatch, capsys):
    out = str(tmp_path / "full")
    real = torch.save
    calls = {"n": 0}

    def full_disk(obj, f, *a, **kw):
        calls["n"] += 1
        if calls["n"] >= 2:
            f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
    rc, err = cli(tiny(out, data_cache, "train.ckpt_every_steps=1"), capsys)
    line = one_error_line(err)
    assert rc == 1 and "No space left on device" in line and "ckpt_000000001.pt" in line.split("last good")[1], err
    names = os.listdir(os.path.join(out, "checkpoints"))
    assert names == ["ckpt_000000001.pt"], names  # the earlier checkpoint intact, no temp file left
    load_checkpoint(os.path.join(out, "checkpoints", "ckpt_000000001.pt"))
