"""Reliability of the command-line surfaces (issue 20): an export never writes over its own input,
a refused reproduction can be corrected in the same --out, the reproduction's throughput probe keeps
to its share of the budget and a probe that dies is one line, odd state.json contents are one line,
and the launcher, eval and trainer report bad input before any work (only rank 0 prints it).
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision

from densecl_fast import export
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
