"""Weights out (export to torchvision / detectron2 / mmdet / timm) and in (our, OpenSelfSup,
mmselfsup and backbone-only files), and the refusal of bad or unsafe files."""
import copy
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

from densecl_fast.checkpoint import load_checkpoint, rng_state, save_checkpoint
from densecl_fast.config import config_to_dict, load_config
from densecl_fast.model import DenseCL
from densecl_fast.weights import (WeightsError, d2_to_tv, export_backbone, infer_arch, load_backbone_state,
                                  load_into_model, read_weights, trunk_shapes, tv_to_d2)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["model.hid_dim=32", "model.out_dim=16", "model.queue_len=64"]


def tiny_model(seed, arch="resnet18", extra=()):
    torch.manual_seed(seed)
    return DenseCL(load_config("smoke", TINY + [f"model.arch={arch}", *extra]).model)


@torch.no_grad()
def randomise(model: DenseCL, seed: int) -> DenseCL:
    """Make every tensor distinctive: BN statistics and affine, a key encoder unlike the query
    encoder, filled queues and a moved pointer, so a load that skips a part cannot pass."""
    g = torch.Generator().manual_seed(seed)
    for enc in (model.encoder_q, model.encoder_k):
        for m in enc.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.num_batches_tracked.fill_(7)
    for p in model.encoder_k.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.01)
    model.queue.copy_(torch.randn(model.queue.shape, generator=g))
    model.queue2.copy_(torch.randn(model.queue2.shape, generator=g))
    model.queue_ptr.fill_(32)
    return model


def assert_same(a: dict, b: dict):
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), k


def save_training_ckpt(model, out_dir, arch="resnet18"):
    """A checkpoint written by checkpoint.save_checkpoint (its current format), without the trainer."""
    cfg = load_config("smoke", TINY + [f"model.arch={arch}"])
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1, momentum=0.9)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": {}, "step": 5, "epoch": 0,
             "rngs": [rng_state()], "shuffle_rng": torch.Generator().get_state(), "config": config_to_dict(cfg)}
    return save_checkpoint(state, str(out_dir), 5, keep_last=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    model = randomise(tiny_model(0), 1).eval()
    return model, save_training_ckpt(model, d / "run"), d


def cli(*args):
    return subprocess.run([sys.executable, "-m", "densecl_fast.export", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------- export ----------------------

@pytest.mark.parametrize("fmt", ["torchvision", "timm"])
def test_plain_export_loads_into_torchvision_and_gives_the_same_c5(trained, fmt):
    model, ckpt, d = trained
    saved = load_checkpoint(ckpt)  # the file is a valid training checkpoint
    assert saved["step"] == 5
    arch, state = load_backbone_state(ckpt)
    out = str(d / f"{fmt}.pth")
    export_backbone(state, arch, fmt, out, {"step": 5})
    sd = torch.load(out, map_location="cpu", weights_only=True)  # what a torchvision/timm user does
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    tv = torchvision.models.resnet18()
    res = tv.load_state_dict(sd, strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"] and res.unexpected_keys == []
    tv.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        c5_tv = tv.layer4(tv.layer3(tv.layer2(tv.layer1(y))))
        c5_ours = model.backbone(x)
    assert c5_tv.shape == (2, 512, 2, 2)
    torch.testing.assert_close(c5_tv, c5_ours)
    side = json.loads(Path(out + ".json").read_text())
    assert side["arch"] == "resnet18" and side["format"] == fmt and side["step"] == 5


def test_key_encoder_is_the_momentum_encoder(trained):
    model, ckpt, _ = trained
    _, q = load_backbone_state(ckpt)
    _, k = load_backbone_state(ckpt, encoder="key")
    assert_same(q, model.encoder_q.backbone.state_dict())
    assert_same(k, model.encoder_k.backbone.state_dict())
    assert not torch.equal(q["conv1.weight"], k["conv1.weight"])


def reference_d2_name(k):
    """detectron2's tools/convert-torchvision-to-d2.py (and MoCo's converter), step by step."""
    if "layer" not in k:
        k = "stem." + k
    for t in [1, 2, 3, 4]:
        k = k.replace(f"layer{t}", f"res{t + 1}")
    for t in [1, 2, 3]:
        k = k.replace(f"bn{t}", f"conv{t}.norm")
    return k.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_detectron2_names_cover_every_key_both_ways(arch):
    keys = [k for k in trunk_shapes(arch) if not k.endswith("num_batches_tracked")]
    d2 = [tv_to_d2(k) for k in keys]
    assert d2 == [reference_d2_name(k) for k in keys]          # the published converter's names
    assert len(set(d2)) == len(keys)                           # no two tensors collide
    assert [d2_to_tv(n) for n in d2] == keys                   # and back, every key
    assert "stem.conv1.norm.running_var" in d2 and "res3.0.shortcut.norm.weight" in d2
    assert ("res5.2.conv3.norm.bias" in d2) == (arch == "resnet50")  # BasicBlock: conv1/conv2 only
    assert ("res2.0.shortcut.weight" in d2) == (arch == "resnet50")  # resnet18 layer1 keeps its width


def test_detectron2_export_via_cli(trained):
    model, ckpt, d = trained
    out = d / "r18.pkl"
    r = cli(ckpt, "--format", "detectron2", "--out", out, "--encoder", "key")
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout and "resnet18" in r.stdout and "step 5" in r.stdout and "key encoder" in r.stdout
    with open(out, "rb") as f:
        obj = pickle.load(f, encoding="latin1")  # what detectron2's checkpointer does with a .pkl
    assert obj["__author__"] == "densecl_fast" and obj["matching_heuristics"] is True
    assert obj["densecl_fast"]["arch"] == "resnet18" and obj["densecl_fast"]["encoder"] == "key"
    want = {tv_to_d2(k): v for k, v in model.encoder_k.backbone.state_dict().items()
            if not k.endswith("num_batches_tracked")}
    assert all(isinstance(v, np.ndarray) for v in obj["model"].values())
    assert_same(obj["model"], want)
    side = json.loads(Path(str(out) + ".json").read_text())
    assert side["source"] == os.path.abspath(ckpt) and side["step"] == 5 and side["encoder"] == "key"
    assert side["config"]["model"]["arch"] == "resnet18" and side["num_tensors"] == len(want)
    arch, back = load_backbone_state(str(out))  # and it reads back, counters filled in
    assert arch == "resnet18"
    assert_same({k: v for k, v in back.items() if not k.endswith("num_batches_tracked")},
                {k: v for k, v in model.encoder_k.backbone.state_dict().items() if not k.endswith("num_batches_tracked")})


def test_mmdet_export_has_backbone_prefix_and_loads_stripped(trained):
    model, ckpt, d = trained
    out = str(d / "mmdet.pth")
    arch, state = load_backbone_state(ckpt)
    export_backbone(state, arch, "mmdet", out, {"step": 5})
    obj = torch.load(out, map_location="cpu", weights_only=True)
    assert set(obj) == {"state_dict", "meta"} and obj["meta"]["densecl_fast"]["arch"] == "resnet18"
    assert all(k.startswith("backbone.") for k in obj["state_dict"])
    sd = {k[len("backbone."):]: v for k, v in obj["state_dict"].items()}
    res = torchvision.models.resnet18().load_state_dict(sd, strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"] and res.unexpected_keys == []
    assert_same(sd, model.backbone.state_dict())
    assert read_weights(out).layout == "mmdet"


# ---------------------------------------------------------------- import ----------------------

def openselfsup_layout(m: DenseCL) -> dict:
    """The state dict of OpenSelfSup's (and mmselfsup 0.x's) DenseCL: nn.Sequential encoders, the
    query trunk registered a second time as `backbone`, one pointer per queue."""
    net = nn.Module()
    net.encoder_q = nn.Sequential(copy.deepcopy(m.encoder_q.backbone), copy.deepcopy(m.encoder_q.neck))
    net.encoder_k = nn.Sequential(copy.deepcopy(m.encoder_k.backbone), copy.deepcopy(m.encoder_k.neck))
    net.backbone = net.encoder_q[0]
    net.head = nn.Module()  # ContrastiveHead: no parameters
    for name in ("queue", "queue_ptr", "queue2"):
        net.register_buffer(name, getattr(m, name).clone())
    net.register_buffer("queue2_ptr", m.queue_ptr.clone())
    return {"meta": {"epoch": 200, "iter": 1000, "mmcv_version": "1.3.0", "config": "model = dict(type='DenseCL')"},
            "state_dict": net.state_dict()}


def mmselfsup1_layout(m: DenseCL) -> dict:
    """mmselfsup 1.x / mmpretrain: backbone, neck, encoder_k = mmengine ExponentialMovingAverage
    (module = Sequential(backbone, neck), buffer `steps`), non-persistent preprocessor buffers."""
    net = nn.Module()
    net.data_preprocessor = nn.Module()
    net.data_preprocessor.register_buffer("mean", torch.zeros(3, 1, 1), persistent=False)
    net.backbone, net.neck, net.head = copy.deepcopy(m.encoder_q.backbone), copy.deepcopy(m.encoder_q.neck), nn.Module()
    net.encoder_k = nn.Module()
    net.encoder_k.module = nn.Sequential(copy.deepcopy(m.encoder_k.backbone), copy.deepcopy(m.encoder_k.neck))
    net.encoder_k.register_buffer("steps", torch.tensor(1000))
    for name in ("queue", "queue_ptr", "queue2"):
        net.register_buffer(name, getattr(m, name).clone())
    net.register_buffer("queue2_ptr", m.queue_ptr.clone())
    return {"meta": {"epoch": 200, "mmengine_version": "0.7.0", "cfg": "model = dict(type='DenseCL')"},
            "state_dict": net.state_dict()}


@pytest.mark.parametrize("layout", ["densecl_fast", "openselfsup", "mmselfsup1"])
def test_full_checkpoint_round_trip(trained, tmp_path, layout):
    model, ckpt, _ = trained
    path = ckpt
    if layout != "densecl_fast":
        path = str(tmp_path / f"{layout}.pth")
        torch.save((openselfsup_layout if layout == "openselfsup" else mmselfsup1_layout)(model), path)
        assert any(k.startswith("encoder_k.module." if layout == "mmselfsup1" else "encoder_q.0.")
                   for k in torch.load(path, weights_only=True)["state_dict"])
    fresh = tiny_model(123)
    report = load_into_model(fresh, path)
    assert_same(fresh.state_dict(), model.state_dict())  # trunks, necks, both encoders, queues, pointer
    assert report.fresh == [] and "queues" in report.loaded and report.arch == "resnet18"
    assert report.step == (5 if layout == "densecl_fast" else None)
    arch, k = load_backbone_state(path, encoder="key")
    assert arch == "resnet18"
    assert_same(k, model.encoder_k.backbone.state_dict())


def test_backbone_only_file_initialises_both_trunks(tmp_path):
    torch.manual_seed(3)
    tv = torchvision.models.resnet18()  # a classifier checkpoint: trunk + fc
    for m in tv.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
    path = str(tmp_path / "resnet18_cls.pth")
    torch.save(tv.state_dict(), path)
    arch, state = load_backbone_state(path)
    assert arch == "resnet18" and not any(k.startswith("fc.") for k in state)
    model = tiny_model(4)
    neck_before = copy.deepcopy(model.encoder_q.neck.state_dict())
    queue_before = model.queue.clone()
    report = load_into_model(model, path)
    trunk = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    assert_same(model.encoder_q.backbone.state_dict(), trunk)
    assert_same(model.encoder_k.backbone.state_dict(), trunk)
    assert_same(model.encoder_q.neck.state_dict(), neck_before)
    assert_same(model.encoder_k.neck.state_dict(), neck_before)
    assert torch.equal(model.queue, queue_before)
    assert "query neck" in report.fresh and "queues" in report.fresh and "fc.weight" in str(report)


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101"])
def test_arch_is_inferred_from_keys_and_shapes(arch):
    with torch.device("meta"):
        sd = getattr(torchvision.models, arch)().state_dict()
    assert infer_arch({k: v for k, v in sd.items() if not k.startswith("fc.")}) == arch


# ---------------------------------------------------------------- refusals --------------------

class Evil:
    """Unpickling this runs a shell command: a loader that executes file contents would create the marker."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def make_bad(kind: str, d, trained_ckpt) -> tuple[str, str]:
    """(path, a word the error must contain) for one kind of bad file."""
    p = d / f"bad_{kind}"
    if kind == "missing":
        return str(p), "no such file"
    if kind == "empty":
        p.write_bytes(b"")
        return str(p), "empty file"
    if kind == "truncated":
        data = Path(trained_ckpt).read_bytes()
        p.write_bytes(data[: len(data) // 2])
        return str(p), "truncated or corrupt"
    if kind == "json":
        p.write_text(json.dumps({"arch": "resnet18", "weights": [1, 2, 3]}))
        return str(p), "text/JSON"
    if kind == "pickle_code":
        with open(p, "wb") as f:
            pickle.dump({"model": Evil(d / "pwned")}, f)
        return str(p), "refusing pickled global posix.system"
    if kind == "torch_code":
        torch.save({"state_dict": Evil(d / "pwned")}, str(p))
        return str(p), "refusing to load"
    if kind == "vit":
        torch.save({"cls_token": torch.zeros(1, 1, 8), "patch_embed.proj.weight": torch.zeros(8, 3, 16, 16),
                    "blocks.0.attn.qkv.weight": torch.zeros(24, 8), "head.weight": torch.zeros(10, 8)}, str(p))
        return str(p), "not a ResNet backbone: unexpected keys blocks.0.attn.qkv.weight, cls_token"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "json", "pickle_code", "torch_code", "vit"])
def test_bad_files_are_refused_with_one_line(trained, tmp_path, kind):
    path, word = make_bad(kind, tmp_path, trained[1])
    for load in (load_backbone_state, lambda p: load_into_model(tiny_model(0), p)):
        with pytest.raises(WeightsError) as e:
            load(path)
        msg = str(e.value)
        assert path in msg and word in msg and "\n" not in msg, msg
        assert "weights_only=False" not in msg
    assert not (tmp_path / "pwned").exists()


def test_other_arch_or_neck_width_is_refused(trained, tmp_path):
    model, ckpt, _ = trained
    with pytest.raises(WeightsError, match="holds a resnet18 backbone, not the resnet50 asked for"):
        load_backbone_state(ckpt, arch="resnet50")
    with pytest.raises(WeightsError, match="resnet18 backbone, not the resnet34"):
        load_into_model(tiny_model(0, "resnet34"), ckpt)
    wide = tiny_model(0, extra=["model.hid_dim=64"])
    before = copy.deepcopy(wide.state_dict())
    with pytest.raises(WeightsError, match=r"query neck does not fit the model: mlp\.0\.weight is \(32, 512\) in the "
                                           r"file, \(64, 512\) in the model"):
        load_into_model(wide, ckpt)
    assert_same(wide.state_dict(), before)  # checked before copying: nothing half-loaded
    plain = str(tmp_path / "plain.pth")
    torch.save(model.backbone.state_dict(), plain)
    with pytest.raises(WeightsError, match="has no key"):
        load_backbone_state(plain, encoder="key")


@pytest.mark.parametrize("case", ["truncated", "pickle_code", "arch"])
def test_cli_errors_exit_2_with_one_line(trained, tmp_path, case):
    _, ckpt, _ = trained
    out = tmp_path / "out.pth"
    if case == "arch":
        path, word = ckpt, "not the resnet50 asked for"
        r = cli(path, "--format", "torchvision", "--out", out, "--arch", "resnet50")
    else:
        path, word = make_bad(case, tmp_path, ckpt)
        r = cli(path, "--format", "torchvision", "--out", out)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and path in lines[0] and word in lines[0], r.stderr
    assert not out.exists() and not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------- train.init_from -------------

def test_init_from_starts_a_fresh_run_from_exported_weights(trained, tmp_path):
    model, ckpt, _ = trained
    out = tmp_path / "tv.pth"
    assert cli(ckpt, "--format", "torchvision", "--out", out).returncode == 0
    from densecl_fast.trainer import train
    run = tmp_path / "run"
    summary = train(load_config("smoke", TINY + [
        f"train.init_from={out}", "data.source=synthetic", f"data.cache_dir={tmp_path / 'cache'}",
        "data.synthetic_images=16", "data.synthetic_resolution=64", "data.image_size=64", "data.num_workers=0",
        "model.bn_group_size=4", "optim.epochs=1", "optim.batch_size=8", "optim.max_steps=1",
        f"train.out_dir={run}", "train.tensorboard=false", "train.progress=false"]))
    assert summary["step"] == 1  # a new run: step 0 -> 1, not the source checkpoint's step 5
    # After one step at lr 0.0003 with momentum 0.999 the key trunk is still ~the imported one.
    saved = load_checkpoint(summary["checkpoint"])
    k_trunk = {k[len("encoder_k.backbone."):]: v for k, v in saved["model"].items() if k.startswith("encoder_k.backbone.")}
    src = model.encoder_q.backbone.state_dict()
    name = "layer3.0.bn1.weight"  # randomise() made it unlike any fresh init
    assert torch.allclose(k_trunk[name], src[name], atol=1e-4)
    assert not torch.allclose(k_trunk[name], tiny_model(0).encoder_q.backbone.state_dict()[name], atol=1e-2)


def test_init_from_a_bad_file_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    r = subprocess.run([sys.executable, "launch/pretrain.py", *TINY, f"train.init_from={bad}",
                        f"data.cache_dir={tmp_path / 'cache'}", "data.synthetic_images=16", "data.synthetic_resolution=64",
                        "data.image_size=64", "data.num_workers=0", "model.bn_group_size=4", "optim.batch_size=8",
                        f"train.out_dir={tmp_path / 'run'}", "train.progress=false"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert err[-1].startswith("error: train.init_from:") and str(bad) in err[-1] and "Traceback" not in r.stderr


def test_a_failed_sidecar_write_leaves_the_previous_sidecar_whole(tmp_path, monkeypatch):
    """The .json beside an export is written atomically like the weights: a failure while writing it
    (here: serialising) keeps the earlier file and leaves no temp file."""
    import densecl_fast.weights as weights
    state = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    out = str(tmp_path / "trunk.pth")
    export_backbone(state, "resnet18", "torchvision", out, {"run": "first"})
    before = open(out + ".json").read()
    assert json.loads(before)["run"] == "first"

    def broken(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(weights.json, "dumps", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_backbone(state, "resnet18", "torchvision", out, {"run": "second"})
    assert open(out + ".json").read() == before
    assert sorted(os.listdir(tmp_path)) == ["trunk.pth", "trunk.pth.json"]
