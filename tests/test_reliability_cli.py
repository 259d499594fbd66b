"""Reliability of the command-line surfaces (issue 20): an export never writes over its own input,
a refused reproduction can be corrected in the same --out, the reproduction's throughput probe keeps
to its share of the budget and a probe that dies is one line, odd state.json contents are one line,
and the launcher, eval and trainer report bad input before any work (only rank 0 prints it).
"""
import json
import os

import pytest
import torch
import torchvision

from densecl_fast import export

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
