"""FSDP checkpoint folders (torch.distributed.checkpoint, `ckpt_<step>.dcp/`) read by every command:
a missing, empty, truncated or out-of-folder shard is one line naming the
folder and the file; a `.metadata` or a stored value that would run code when unpickled is refused
before anything runs; a genuine checkpoint still resumes, exports, evaluates and initialises a run.

The checkpoints come from a one-process FSDP run (a one-rank gloo group): the same format as on N
ranks, where each rank writes its own `__<rank>_0.distcp` next to one `.metadata`.
"""
import os
import pickle
import shutil

import pytest
import torch

from densecl_fast.checkpoint import CheckpointError, list_checkpoints
from densecl_fast.config import load_config
from densecl_fast.eval import features
from densecl_fast.eval.__main__ import main as eval_main
from densecl_fast.export import main as export_main
from densecl_fast.trainer import train
from densecl_fast.weights import WeightsError
from helpers import PRETRAIN, load_script, tiny

pretrain_cli = load_script("pretrain_cli_dcp_safety", PRETRAIN)
FSDP = ["train.engine=fsdp", "optim.epochs=1"]
SHARD = "__0_0.distcp"
CKPT = "ckpt_000000001.dcp"


class Payload:
    """Unpickling this writes `marker`: the proof that a pickle ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


@pytest.fixture(scope="module")
def genuine(tmp_path_factory, data_cache):
    """A real FSDP checkpoint after one step: (run directory, checkpoint folder)."""
    out = str(tmp_path_factory.mktemp("fsdp") / "run")
    train(load_config("smoke", tiny(out, data_cache, *FSDP, "optim.max_steps=1")))
    (path,) = list_checkpoints(out)
    assert path.endswith(CKPT) and os.path.isfile(os.path.join(path, SHARD))
    return out, path


def _folder(tmp_path, src, metadata=None, shard="link", name=CKPT):
    """A checkpoint folder at tmp_path/run/checkpoints/name: `src`'s meta.pt, its .metadata (or the
    pickle of `metadata`), and its shard linked ("link"), absent (None) or with these bytes."""
    d = tmp_path / "run" / "checkpoints" / name
    d.mkdir(parents=True)
    shutil.copy(os.path.join(src, "meta.pt"), d / "meta.pt")
    if metadata is None:
        shutil.copy(os.path.join(src, ".metadata"), d / ".metadata")
    else:
        (d / ".metadata").write_bytes(pickle.dumps(metadata))
    if shard == "link":
        os.symlink(os.path.join(src, SHARD), d / SHARD)
    elif shard is not None:
        (d / SHARD).write_bytes(shard)
    return str(d)


def _metadata(src):
    with open(os.path.join(src, ".metadata"), "rb") as f:
        return pickle.load(f)  # our own genuine checkpoint, to be altered


def _export(path, tmp_path, capsys):
    rc = export_main([path, "--format", "torchvision", "--out", str(tmp_path / "trunk.pth")])
    return rc, capsys.readouterr().err.strip().splitlines()


# ---- a genuine checkpoint: every reader still works ---------------------------------------------------

def test_genuine_folder_reads_as_dcp_itself_reads_it_in_export_eval_and_init_from(genuine, tmp_path, capsys,
                                                                                   data_cache):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from densecl_fast.engines import folder_model_state
    _, path = genuine
    dcp_to_torch_save(path, str(tmp_path / "ref.pt"))  # DCP's own (unchecked) reader: the reference
    ref = torch.load(tmp_path / "ref.pt", weights_only=True)["model"]
    got = folder_model_state(path)
    assert set(got) == set(ref) and len(got) > 200
    for k, v in ref.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    rc, err = _export(path, tmp_path, capsys)
    assert rc == 0 and not err
    trunk = torch.load(tmp_path / "trunk.pth", weights_only=True)
    assert torch.equal(trunk["layer4.1.conv2.weight"], ref["encoder_q.backbone.layer4.1.conv2.weight"])
    # eval takes the folder (it used to say "no such file")
    net, arch, ident = features.build_trunk(path, None, 0)
    assert arch == "resnet18" and torch.equal(net.state_dict()["conv1.weight"], ref["encoder_q.backbone.conv1.weight"])
    rc = eval_main(["knn", "--checkpoint", path, "--data", "synthetic", "--synthetic-images", "24",
                    "--synthetic-resolution", "40", "--image-size", "32", "--data-cache-dir", data_cache,
                    "--no-cache", "--no-progress", "--k", "3", "--out", str(tmp_path / "eval")])
    assert rc == 0, capsys.readouterr().err
    assert os.path.isfile(tmp_path / "eval" / "knn.json")
    # train.init_from: a new run from the folder's weights
    out = str(tmp_path / "init")
    s = train(load_config("smoke", tiny(out, data_cache, "optim.max_steps=1", f"train.init_from={path}")))
    assert s["status"] == "max_steps"


def test_genuine_folder_resumes_as_the_uninterrupted_run(genuine, tmp_path, data_cache):
    """The checked reader and planner load the model and the optimizer (its lr, momentum ... are
    DCP byte values) exactly: one step after the resume equals two steps straight."""
    run, _ = genuine
    resumed, straight = str(tmp_path / "resumed"), str(tmp_path / "straight")
    shutil.copytree(run, resumed)
    s = train(load_config("smoke", tiny(resumed, data_cache, *FSDP, "optim.max_steps=2", "train.resume=auto")))
    assert s["status"] == "max_steps" and s["step"] == 2
    train(load_config("smoke", tiny(straight, data_cache, *FSDP, "optim.max_steps=2")))
    from densecl_fast.engines import folder_model_state
    a, b = folder_model_state(list_checkpoints(straight)[-1]), folder_model_state(list_checkpoints(resumed)[-1])
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- damaged folders: one line naming the folder and the file --------------------------------------------

def _damaged(kind, src, tmp_path):
    if kind == "missing shard":
        return _folder(tmp_path, src, shard=None), f"its shard {SHARD} is missing"
    if kind == "empty shard":
        return _folder(tmp_path, src, shard=b""), f"its shard {SHARD} is empty"
    if kind == "truncated shard":
        return _folder(tmp_path, src, shard=b"x" * 1000), f"its shard {SHARD} is truncated (1000 of at least"
    if kind == "shard outside the folder":
        md = _metadata(src)
        for info in md.storage_data.values():
            info.relative_path = "../" + SHARD
        os.makedirs(tmp_path / "run", exist_ok=True)
        os.symlink(os.path.join(src, SHARD), tmp_path / "run" / SHARD)
        return _folder(tmp_path, src, metadata=md, shard=None), f"its .metadata names the shard '../{SHARD}'"
    raise AssertionError(kind)


DAMAGE = ["missing shard", "empty shard", "truncated shard", "shard outside the folder"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_folder_is_one_line_in_export_eval_and_init_from(kind, genuine, tmp_path, capsys, data_cache):
    path, why = _damaged(kind, genuine[1], tmp_path)
    rc, err = _export(path, tmp_path, capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and path in err[0] and why in err[0], err
    assert not os.path.exists(tmp_path / "trunk.pth")
    with pytest.raises(WeightsError, match="^checkpoint .*" + why.replace("(", r"\(")):
        features.build_trunk(path, None, 0)
    with pytest.raises(CheckpointError, match=r"^train\.init_from: .*" + why.replace("(", r"\(")):
        train(load_config("smoke", tiny(str(tmp_path / "init"), data_cache, f"train.init_from={path}")))


@pytest.mark.parametrize("kind", ["missing shard", "truncated shard"])
def test_damaged_folder_resume_is_one_line_exit_2(kind, genuine, tmp_path, capsys, data_cache):
    path, why = _damaged(kind, genuine[1], tmp_path)
    rc = pretrain_cli.main([*tiny(str(tmp_path / "run"), data_cache, *FSDP, "optim.max_steps=2"), "--resume", "auto"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and "Traceback" not in err, err
    assert lines[-1].startswith(f"error: checkpoint {path} ") and why in lines[-1], err


# ---- code-running pickles: refused, nothing runs ---------------------------------------------------------

def _evil_metadata_folder(src, tmp_path):
    """A checkpoint folder whose .metadata, unpickled, writes the marker."""
    marker = tmp_path / "MARKER"
    return _folder(tmp_path, src, metadata=Payload(marker)), marker


def test_code_running_metadata_is_refused_by_export_eval_init_from_and_resume(genuine, tmp_path, capsys, data_cache):
    path, marker = _evil_metadata_folder(genuine[1], tmp_path)
    refusal = f"refusing checkpoint {path}: its .metadata holds objects that could run code"
    rc, err = _export(path, tmp_path, capsys)
    assert rc == 2 and len(err) == 1 and refusal in err[0] and "builtins.exec" in err[0], err
    rc = eval_main(["knn", "--checkpoint", path, "--data", "synthetic", "--synthetic-images", "24",
                    "--synthetic-resolution", "40", "--image-size", "32", "--data-cache-dir", data_cache,
                    "--no-cache", "--no-progress", "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and refusal in err[0], err
    rc = pretrain_cli.main(tiny(str(tmp_path / "init"), data_cache, "optim.max_steps=1", f"train.init_from={path}"))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and refusal in err.strip().splitlines()[-1], err
    rc = pretrain_cli.main([*tiny(str(tmp_path / "run"), data_cache, *FSDP, "optim.max_steps=2"), "--resume", "auto"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and refusal in err.strip().splitlines()[-1], err
    assert not marker.exists(), "the payload ran"


def test_code_running_value_in_a_shard_is_refused_on_resume(genuine, tmp_path, capsys, data_cache):
    """DCP unpickles non-tensor values (the optimizer's lr ...) with torch.load(weights_only=False)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import MetadataIndex
    marker = tmp_path / "MARKER"
    md = _metadata(genuine[1])
    path = _folder(tmp_path, genuine[1], metadata=md)
    torch.save(Payload(marker), os.path.join(path, "evil.distcp"))
    md.storage_data[MetadataIndex("optimizer.param_groups.0.lr")] = _StorageInfo(
        "evil.distcp", 0, os.path.getsize(os.path.join(path, "evil.distcp")))
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(md, f)
    rc = pretrain_cli.main([*tiny(str(tmp_path / "run"), data_cache, *FSDP, "optim.max_steps=2"), "--resume", "auto"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and "Traceback" not in err, err
    assert lines[-1].startswith(f"error: refusing checkpoint {path}: its value optimizer.param_groups.0.lr holds "
                                "objects that could run code"), err
    assert not marker.exists(), "the payload ran"
