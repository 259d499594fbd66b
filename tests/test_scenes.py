"""Fashion-MNIST scenes (data/scenes.py) and the class-balanced dense probe that must tell trunks apart."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from densecl_fast.config import load_config
from densecl_fast.data import DataError
from densecl_fast.data import fashion_mnist as fm
from densecl_fast.data import scenes
from densecl_fast.data.sources import list_samples
from densecl_fast.eval import dense, features
from densecl_fast.eval.__main__ import main as eval_main
from densecl_fast.eval.datasets import load_eval_data
from densecl_fast.model import ResNetTrunk
# fake_root is a fixture; test_monitor and test_reproduce import the idx writers from here.
from tests.helpers import (check_refused_when_removed, check_spelling_errors, fake_garments,  # noqa: F401
                           fake_root, write_idx)

REAL = "/usr/share/datasets/fashion-mnist"


def test_parse_source_spellings():
    assert scenes.parse_source("fashion-mnist:/a") is None and scenes.parse_source("/a/b") is None
    s = scenes.parse_source("fashion-mnist-scenes:/a/b")
    assert (s.root, s.split, s.counts, s.size) == ("/a/b", "train", (4000, 1000), 96)
    s = scenes.parse_source("fashion-mnist-scenes:/a/b#test, train=30,size=64 ,test=7")
    assert (s.split, s.counts, s.size) == ("test", (30, 7), 64)
    check_spelling_errors(scenes.parse_source, "fashion-mnist-scenes:",
                          (("#val", "unknown token 'val'"), ("#size=16", "size='16' must be"), ("#train=x", "train='x'"),
                           ("#test=0", "test='0'")))


def test_scenes_are_deterministic_consistent_and_a_prefix(fake_root, tmp_path):
    spec = scenes.parse_source(f"fashion-mnist-scenes:{fake_root}#train=12,test=5,size=48")
    a = scenes.ensure_scenes(spec, "train", str(tmp_path / "c1"))
    b = scenes.ensure_scenes(spec, "train", str(tmp_path / "c2"))
    ma, mb = scenes.read_labels(a), scenes.read_labels(b)
    assert ma["pixels_sha256"] == mb["pixels_sha256"] and ma["sha256"] == mb["sha256"]
    assert ma["num_images"] == 12 and ma["size"] == 48 and ma["classes"] == list(fm.CLASSES)
    photos, labels = fm.load_fashion_mnist(fake_root, "train")
    for e in ma["images"]:
        img = np.asarray(Image.open(os.path.join(a, e["image"])))
        cls = np.asarray(Image.open(os.path.join(a, e["mask"])))
        inst = np.asarray(Image.open(os.path.join(a, e["instances"])))
        assert img.shape == (48, 48, 3) and cls.shape == inst.shape == (48, 48)
        assert 2 <= len(e["objects"]) <= 5 and (cls > 0).any()
        assert e["label"] == np.bincount(cls.ravel(), minlength=11)[1:].argmax() == scenes.scene_label(cls)
        assert e["image"].startswith(f"images/{fm.CLASSES[e['label']]}/")
        assert ((cls == 0) == (inst == 0)).all()      # the two masks cover the same garments
        for k, o in enumerate(e["objects"], 1):        # instance k: one class, the one of its photo
            assert o["visible"] == int((inst == k).sum()) and o["class"] == labels[o["source_index"]]
            if o["visible"]:
                assert set(np.unique(cls[inst == k])) == {o["class"] + 1}
    small = scenes.ensure_scenes(scenes.parse_source(f"fashion-mnist-scenes:{fake_root}#train=5,size=48"), "train",
                                 str(tmp_path / "c1"))
    assert small != a
    for e_small, e_big in zip(scenes.read_labels(small)["images"], ma["images"][:5]):   # a prefix
        assert e_small == e_big
        for key in ("image", "mask"):
            assert (np.asarray(Image.open(os.path.join(small, e_small[key])))
                    == np.asarray(Image.open(os.path.join(a, e_big[key])))).all()
    test = scenes.read_labels(scenes.ensure_scenes(spec, "test", str(tmp_path / "c1")))
    assert test["num_images"] == 5 and all(o["source_index"] < 20 for e in test["images"] for o in e["objects"])


def test_garment_mask_fills_holes():
    photos, _ = fake_garments(1, 0)
    m = scenes.garment_mask(photos[0])
    assert m[13, 13] and m[13, 4] and not m[0, 0]     # the dark centre is inside the garment


def test_checksum_is_verified_on_reuse(fake_root, tmp_path):
    spec = scenes.parse_source(f"fashion-mnist-scenes:{fake_root}#train=4,size=40")
    folder = scenes.ensure_scenes(spec, "train", str(tmp_path))
    assert scenes.ensure_scenes(spec, "train", str(tmp_path)) == folder
    meta = scenes.read_labels(folder)
    path = os.path.join(folder, meta["images"][2]["mask"])
    original = open(path, "rb").read()
    Image.fromarray(np.zeros((40, 40), np.uint8), "L").save(path)
    with pytest.raises(DataError, match="fail their checksum.*delete the folder"):
        scenes.ensure_scenes(spec, "train", str(tmp_path))
    assert os.path.isfile(path) and open(path, "rb").read() != original   # refused, not silently replaced
    check_refused_when_removed(lambda: scenes.ensure_scenes(spec, "train", str(tmp_path)), folder, path, "scene")


def _edit_labels(folder, edit):
    path = os.path.join(folder, "labels.json")
    meta = json.load(open(path))
    edit(meta)
    json.dump(meta, open(path, "w"))


def test_labels_are_inside_the_checksum_and_damage_is_one_line_exit_2(fake_root, tmp_path, capsys):
    """labels.json's labels were outside the checksum (an edited label was accepted, a
    truncated file or a label of 99 was a traceback, -1 read as the last class)."""
    src = f"fashion-mnist-scenes:{fake_root}#train=4,test=3,size=40"
    spec = scenes.parse_source(src)
    folder = scenes.ensure_scenes(spec, "train", str(tmp_path))
    pristine = open(os.path.join(folder, "labels.json")).read()

    def restore():
        open(os.path.join(folder, "labels.json"), "w").write(pristine)
        assert scenes.ensure_scenes(spec, "train", str(tmp_path)) == folder

    def set_label(value, recompute=False):
        def edit(meta):
            meta["images"][1]["label"] = value
            if recompute:  # a consistent checksum does not make a label that indexes no class valid
                meta["sha256"] = scenes._set_sha256(folder, meta)
        return edit

    first = json.loads(pristine)["images"][1]["label"]
    for edit in (set_label((first + 1) % 10), set_label(-1), set_label(99), set_label(99, True),
                 set_label(-1, True), set_label("3", True), lambda m: m["images"][0]["objects"][0].update({"class": 7}),
                 lambda m: m.update(num_images=3, images=m["images"][:3])):
        _edit_labels(folder, edit)
        with pytest.raises(DataError, match=f"scenes at {folder} fail their checksum"):
            scenes.ensure_scenes(spec, "train", str(tmp_path))
        restore()
    for damaged in (pristine[: len(pristine) // 2], "", "\xff\xfe", "[1, 2]"):
        open(os.path.join(folder, "labels.json"), "w", encoding="latin-1").write(damaged)
        with pytest.raises(DataError, match="fail their checksum"):
            scenes.ensure_scenes(spec, "train", str(tmp_path))
        restore()
    _edit_labels(folder, lambda m: m.pop("format"))  # what the code before this fix wrote
    with pytest.raises(DataError, match="written by an older densecl_fast"):
        scenes.ensure_scenes(spec, "train", str(tmp_path))
    restore()

    # through a command: one line on stderr, exit status 2
    open(os.path.join(folder, "labels.json"), "w").write(pristine[:-40])
    capsys.readouterr()
    rc = eval_main(["knn", "--data", src, "--checkpoint", "random", "--arch", "resnet18", "--image-size", "32",
                    "--data-cache-dir", str(tmp_path), "--out", str(tmp_path / "ev"), "--workers", "0",
                    "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "fail their checksum" in err, err


def test_a_killed_generation_leaves_no_temp_folder_behind(tmp_path):
    """A generation killed midway left its temp folder forever. The next generation in
    the same cache removes the temp folders of dead processes, never those of a running one."""
    import subprocess
    import sys
    from densecl_fast.data import cache
    final = str(tmp_path / "set-a")
    killed = ("import os, sys; from densecl_fast.data.cache import build_once\n"
              "def build(tmp):\n"
              "    open(os.path.join(tmp, 'half'), 'w').close()\n"
              "    os._exit(9)\n"
              "build_once(sys.argv[1], build, 'test set', sys.argv[2])\n")
    r = subprocess.run([sys.executable, "-c", killed, final, str(tmp_path)], cwd=os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    assert r.returncode == 9
    left = [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    assert len(left) == 1 and os.path.isfile(os.path.join(tmp_path, left[0], "half"))
    assert left[0].startswith(f".set-a.tmp-{cache._host()}-")
    # Kept: a generation running here (pid alive), one whose lock is held (e.g. from another pid
    # namespace under the same host name: its pid means nothing here), a fresh one of another host, an
    # old locked one of another host, a fresh one of the code before the pid was in the name, and a
    # user's folder that only looks alike. Removed: the killed one, an old unlocked one of another
    # host, a day-old one of the code before.
    host = cache._host()
    dead_pid = left[0].split("-")[-2]
    running = tmp_path / f".set-b.tmp-{host}-{os.getpid()}-abc123"
    locked = tmp_path / f".set-h.tmp-{host}-{dead_pid}-abc123"
    other, other_locked = tmp_path / f".set-c.tmp-{host}x-{dead_pid}-abc123", tmp_path / f".set-i.tmp-{host}x-1-abc"
    other_old = tmp_path / f".set-j.tmp-{host}x-{dead_pid}-abc123"
    old_legacy, new_legacy, mine = tmp_path / ".set-d.tmp-k2j4_x9q", tmp_path / ".set-e.tmp-p0o9i8u7", tmp_path / "set-f.tmp-1"
    for d in (running, locked, other, other_locked, other_old, old_legacy, new_legacy, mine):
        d.mkdir()
    for d, age in ((old_legacy, cache.LEGACY_TEMP_AGE_S), (other_old, cache.OTHER_HOST_TEMP_AGE_S),
                   (other_locked, cache.OTHER_HOST_TEMP_AGE_S)):
        t = os.path.getmtime(d) - age - 60
        os.utime(d, (t, t))
    holders = [cache._lock(str(d)) for d in (locked, other_locked)]
    assert [state for _, state in holders] == ["free", "free"]

    def build(tmp):
        open(os.path.join(tmp, cache.MARKER), "w").close()
    try:
        assert cache.build_once(str(tmp_path / "set-g"), build, "test set", str(tmp_path)) == str(tmp_path / "set-g")
    finally:
        for fd, _ in holders:
            os.close(fd)
    kept = (running, locked, other, other_locked, new_legacy, mine)
    assert sorted(os.listdir(tmp_path)) == sorted([p.name for p in kept] + ["set-g"])
    assert not os.path.exists(final)  # the killed set is generated again on its next use, from scratch
    assert cache.build_once(final, build, "test set", str(tmp_path)) == final and cache.is_complete(final)


def test_source_and_eval_splits(fake_root, tmp_path):
    src = f"fashion-mnist-scenes:{fake_root}#train=10,test=6,size=40"
    cfg = load_config("smoke", [f"data.source={src}", f"data.cache_dir={tmp_path}"])
    samples = list_samples(cfg.data)
    assert len(samples) == 10 and all(s.label in fm.CLASSES and s.path.endswith(".png") for s in samples)
    cfg = load_config("smoke", [f"data.source={src},test", f"data.cache_dir={tmp_path}", "data.max_images=4"])
    assert len(list_samples(cfg.data)) == 4 and "-test-6-40-" in list_samples(cfg.data)[0].path
    tr, te = load_eval_data(src, task="seg", data_cache_dir=str(tmp_path), max_val=3)
    assert (len(tr), len(te)) == (10, 3) and tr.classes == ["background", *fm.CLASSES] and tr.masks and te.masks
    tr, te = load_eval_data(src, task="cls", data_cache_dir=str(tmp_path))
    meta = scenes.read_labels(scenes.ensure_scenes(scenes.parse_source(src), "test", str(tmp_path)))
    assert te.classes == list(fm.CLASSES) and te.labels.tolist() == [e["label"] for e in meta["images"]]
    with pytest.raises(DataError, match="drop the split token"):
        load_eval_data(src + ",test", task="seg", data_cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="fashion-mnist-scenes"):
        load_eval_data(f"fashion-mnist:{fake_root}", task="seg")


def test_probe_scores_and_balance():
    conf = np.array([[8, 2, 0], [1, 3, 0], [0, 0, 0]])   # class 2 absent: not averaged
    m, iou = dense.miou(conf)
    assert iou[0] == pytest.approx(8 / 11) and iou[1] == pytest.approx(3 / 6) and np.isnan(iou[2])
    assert dense.foreground_miou(iou) == pytest.approx(50.0) and dense.foreground_miou(iou, None) == pytest.approx(m)
    masks = torch.tensor([[[0] * 6 + [1, 1, 255]]])     # 6 background, 2 of class 1, none of class 2
    w = dense.balanced_weights(masks, 3)
    # shares 0.75 and 0.25; the median of an even count is the lower middle value (torch.median)
    assert w[2] == 0 and w[1] == pytest.approx(1.0) and w[0] == pytest.approx(np.sqrt(1 / 3))


def test_balanced_probe_does_not_collapse_to_background():
    """2x2 garments in 16x16 masks (1.6% of the pixels) and a 4x4 map that says where they are:
    plain cross-entropy settles on all-background (foreground mIoU 0); the balanced probe finds them."""
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(40, 16, 16, dtype=torch.long)
    for i in range(40):
        y, x = torch.randint(0, 15, (2,), generator=g)
        masks[i, y:y + 2, x:x + 2] = 1 + i % 2
    fg = F.avg_pool2d((masks > 0).float()[:, None], 4)
    cls = F.avg_pool2d((masks == 2).float()[:, None], 4) - F.avg_pool2d((masks == 1).float()[:, None], 4)
    maps = torch.cat([fg, cls, torch.randn(40, 6, 4, 4, generator=g)], 1).numpy()
    res = {cw: dense.train_dense(maps[:30], masks[:30].numpy(), maps[30:], masks[30:].numpy(), 3, epochs=20,
                                 class_weights=cw, progress=False) for cw in dense.CLASS_WEIGHTS}
    assert res["none"]["fg_mIoU"] == 0.0 and res["none"]["class_weight_values"] is None
    assert res["balanced"]["fg_mIoU"] > 15 and res["balanced"]["class_weight_values"][0] < 1
    assert len(res["balanced"]["iou"]) == 3 and res["balanced"]["background_class"] == 0


class _Zeros(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


class ConstantTrunk(ResNetTrunk):
    """Input-independent: its stem sees zeros, so every image gives the same maps."""

    def __init__(self):
        super().__init__("resnet18")
        self.conv1 = nn.Sequential(_Zeros(), self.conv1)


def _supervised_trunk(images, masks, steps, seed=0):
    """resnet18 trained with the labels: a per-pixel linear head on C4, the balanced loss, Adam (SGD
    barely moves a fresh ResNet in a few dozen steps). BN statistics are then re-estimated on
    training images: after a short run the running averages lag far behind the weights."""
    torch.manual_seed(seed)
    trunk, head = ResNetTrunk("resnet18"), nn.Conv2d(256, 11, 1)
    y = torch.as_tensor(masks).long()
    w = dense.balanced_weights(y, 11)
    opt = torch.optim.Adam([*trunk.parameters(), *head.parameters()], lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    trunk.train()
    for _ in range(steps):
        b = torch.randint(0, len(images), (32,), generator=g)
        logits = F.interpolate(head(features.stages(trunk, images[b])["c4"]), size=y.shape[-2:], mode="bilinear")
        loss = F.cross_entropy(logits, y[b], weight=w)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for m in trunk.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None           # a plain average over the batches below
    with torch.no_grad():
        for s in range(0, 256, 64):
            features.stages(trunk, images[s:s + 64])
    return trunk.eval()


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(REAL), reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
def test_dense_probe_tells_a_trained_trunk_from_random_and_constant(tmp_path):
    """The probe's sanity check: on real scenes, a trunk trained with the labels for a few dozen steps
    beats the random trunk by a wide margin on foreground mIoU, and an input-independent trunk
    scores at chance (a constant prediction's foreground mIoU, at most the largest class share / 10).
    The supervised run sees 1,200 training scenes; the probe is trained on the first 240 and scored
    on 80 test scenes (garments it has never seen)."""
    size, cpu = 64, torch.device("cpu")
    data = f"fashion-mnist-scenes:{REAL}#train=1200,test=80,size={size}"
    full, te = load_eval_data(data, task="seg", data_cache_dir=str(tmp_path))
    tr, _ = load_eval_data(data, task="seg", data_cache_dir=str(tmp_path), max_train=240)
    m_full, mte = dense.load_masks(full, size), dense.load_masks(te, size)
    mtr = m_full[:240]
    tf = features.eval_transform(size)
    images = torch.stack([tf(full.load(i)) for i in range(len(full))])
    supervised = _supervised_trunk(images, m_full, steps=40)
    torch.manual_seed(0)
    trunks = {"supervised": supervised, "random": ResNetTrunk("resnet18").eval(), "constant": ConstantTrunk().eval()}
    res = {}
    for name, trunk in trunks.items():
        f_tr = features.extract(trunk, tr, ["map_c4"], size, cpu, progress=False)["map_c4"]
        f_te = features.extract(trunk, te, ["map_c4"], size, cpu, progress=False)["map_c4"]
        if name == "constant":
            assert np.ptp(f_te.astype(np.float32), axis=0).max() == 0    # really input-independent
        res[name] = dense.train_dense(f_tr, mtr, f_te, mte, 11, epochs=10, progress=False)
        print(name, round(res[name]["fg_mIoU"], 2), round(res[name]["mIoU"], 2), flush=True)
    share = np.bincount(mte.ravel(), minlength=11)[1:] / mte.size
    chance = 100.0 * share.max() / 10
    print({k: (round(v["fg_mIoU"], 2), round(v["mIoU"], 2)) for k, v in res.items()}, f"chance {chance:.2f}")
    assert res["constant"]["fg_mIoU"] <= chance + 1e-6
    assert res["random"]["fg_mIoU"] > res["constant"]["fg_mIoU"]
    # measured 2026-12-05 (2 shared cores): supervised 6.79, random 1.89, constant 0.00 (chance ~0.2)
    assert res["supervised"]["fg_mIoU"] > 3 * res["random"]["fg_mIoU"] and \
        res["supervised"]["fg_mIoU"] > res["random"]["fg_mIoU"] + 3


def test_dense_cli_on_scenes(fake_root, tmp_path):
    out = tmp_path / "out"
    argv = ["dense", "--checkpoint", "random", "--arch", "resnet18", "--data",
            f"fashion-mnist-scenes:{fake_root}#train=12,test=4,size=40", "--data-cache-dir", str(tmp_path / "data"),
            "--cache-dir", str(tmp_path / "features"), "--image-size", "40", "--workers", "0", "--no-progress",
            "--epochs", "2", "--out", str(out)]
    assert eval_main(argv) == 0
    res = json.load(open(out / "dense.json"))
    assert res["num_train"] == 12 and res["num_eval"] == 4 and res["class_weights"] == "balanced"
    assert set(res["iou_per_class"]) == {"background", *fm.CLASSES} and np.isfinite(res["fg_mIoU"])
    assert "foreground mIoU" in open(out / "dense.md").read()
    assert eval_main(argv[:-2] + ["--class-weights", "none", "--out", str(tmp_path / "out2")]) == 0
    assert json.load(open(tmp_path / "out2" / "dense.json"))["class_weight_values"] is None
