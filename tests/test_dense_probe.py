"""The dense probe (eval/dense.py): its scores, its class balance, that it tells trunks apart, and its CLI."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from densecl_fast.data.synthetic import CLASSES
from densecl_fast.eval import dense, features
from densecl_fast.eval.__main__ import main as eval_main
from densecl_fast.eval.datasets import load_eval_data
from densecl_fast.model import ResNetTrunk


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


def _supervised_trunk(images, masks, num_classes, steps, seed=0):
    """resnet18 trained with the labels: a per-pixel linear head on C4, the balanced loss, Adam (SGD
    barely moves a fresh ResNet in a few dozen steps). BN statistics are then re-estimated on
    training images: after a short run the running averages lag far behind the weights."""
    torch.manual_seed(seed)
    trunk, head = ResNetTrunk("resnet18"), nn.Conv2d(256, num_classes, 1)
    y = torch.as_tensor(masks).long()
    w = dense.balanced_weights(y, num_classes)
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
def test_dense_probe_tells_a_trained_trunk_from_random_and_constant(tmp_path):
    """The probe's sanity check: on the built-in set, a trunk trained with the masks for 150 steps
    beats the random trunk by a wide margin on foreground mIoU, and an input-independent trunk scores at
    chance (a constant prediction's foreground mIoU, at most the largest class share / the classes). The
    supervised run sees 1,200 training images; the probe is trained on the first 240 and scored on 80
    held-out images. (It ran on the Fashion-MNIST scenes until they were retired, docs/real-data-checks.md.)"""
    size, cpu = 64, torch.device("cpu")
    kw = dict(task="seg", data_cache_dir=str(tmp_path), synthetic_images=1500, synthetic_resolution=size)
    full, te = load_eval_data("synthetic", max_val=80, **kw)
    tr, _ = load_eval_data("synthetic", max_train=240, **kw)
    n_cls = len(full.classes)
    m_full, mte = dense.load_masks(full, size), dense.load_masks(te, size)
    mtr = m_full[:240]
    tf = features.eval_transform(size)
    images = torch.stack([tf(full.load(i)) for i in range(len(full))])
    supervised = _supervised_trunk(images, m_full, n_cls, steps=150)
    torch.manual_seed(0)
    trunks = {"supervised": supervised, "random": ResNetTrunk("resnet18").eval(), "constant": ConstantTrunk().eval()}
    res = {}
    for name, trunk in trunks.items():
        f_tr = features.extract(trunk, tr, ["map_c4"], size, cpu, progress=False)["map_c4"]
        f_te = features.extract(trunk, te, ["map_c4"], size, cpu, progress=False)["map_c4"]
        if name == "constant":
            assert np.ptp(f_te.astype(np.float32), axis=0).max() == 0    # really input-independent
        res[name] = dense.train_dense(f_tr, mtr, f_te, mte, n_cls, epochs=10, progress=False)
        print(name, round(res[name]["fg_mIoU"], 2), round(res[name]["mIoU"], 2), flush=True)
    share = np.bincount(mte.ravel(), minlength=n_cls)[1:] / mte.size
    chance = 100.0 * share.max() / (n_cls - 1)
    print({k: (round(v["fg_mIoU"], 2), round(v["mIoU"], 2)) for k, v in res.items()}, f"chance {chance:.2f}")
    assert res["constant"]["fg_mIoU"] <= chance + 1e-6
    assert res["random"]["fg_mIoU"] > res["constant"]["fg_mIoU"]
    # Measured 2026-12-08 (2 shared cores): 150 steps give supervised 5.83, random 2.87, constant 0.00 (chance 0.52);
    # 40 steps gave 3.79. The built-in set's shapes are small, so every figure is low; the bar is the measured
    # margin with room (2.0x and +3.0 measured).
    assert res["supervised"]["fg_mIoU"] > 1.5 * res["random"]["fg_mIoU"] and \
        res["supervised"]["fg_mIoU"] > res["random"]["fg_mIoU"] + 2


def test_dense_cli_on_the_built_in_set(tmp_path):
    out = tmp_path / "out"
    argv = ["dense", "--checkpoint", "random", "--arch", "resnet18", "--data", "synthetic", "--synthetic-images", "20",
            "--synthetic-resolution", "40", "--data-cache-dir", str(tmp_path / "data"),
            "--cache-dir", str(tmp_path / "features"), "--image-size", "40", "--workers", "0", "--no-progress",
            "--epochs", "2", "--out", str(out)]
    assert eval_main(argv) == 0
    res = json.load(open(out / "dense.json"))
    assert res["num_train"] == 16 and res["num_eval"] == 4 and res["class_weights"] == "balanced"
    assert set(res["iou_per_class"]) == {"background", *CLASSES} and np.isfinite(res["fg_mIoU"])
    assert "foreground mIoU" in open(out / "dense.md").read()
    assert eval_main(argv[:-2] + ["--class-weights", "none", "--out", str(tmp_path / "out2")]) == 0
    assert json.load(open(tmp_path / "out2" / "dense.json"))["class_weight_values"] is None
