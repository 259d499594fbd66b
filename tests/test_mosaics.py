"""Fashion-MNIST mosaics (data/mosaics.py), the per-cell probe (eval/cells.py), its calibration
(eval/supervised.py, eval/calibrate.py) and the reproduction on the mosaics, in the small."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from densecl_fast.config import load_config
from densecl_fast.data import DataError
from densecl_fast.data import fashion_mnist as fm
from densecl_fast.data import mosaics
from densecl_fast.data.sources import list_samples
from densecl_fast.eval import calibrate, cells, supervised
from densecl_fast.eval.__main__ import main as eval_main
from densecl_fast.eval.datasets import load_eval_data
from densecl_fast.trainer import stale_key_share
from densecl_fast.weights import load_backbone_state
# fake_root is a fixture.
from tests.helpers import (check_refused_when_removed, check_spelling_errors, fake_garments,  # noqa: F401
                           fake_root, write_idx)


def test_parse_source_spellings():
    assert mosaics.parse_source("fashion-mnist:/a") is None and mosaics.parse_source("/a") is None
    s = mosaics.parse_source("fashion-mnist-mosaics:/a/b")
    assert (s.root, s.split, s.counts, s.size) == ("/a/b", "train", (10000, 2000), 64)
    s = mosaics.parse_source("fashion-mnist-mosaics:/a/b#test, train=30,size=96 ,test=7")
    assert (s.split, s.counts, s.size) == ("test", (30, 7), 96)
    check_spelling_errors(mosaics.parse_source, "fashion-mnist-mosaics:",
                          (("#val", "unknown token 'val'"), ("#size=16", "size='16' must be an even"),
                           ("#size=65", "size='65' must be an even"), ("#train=x", "train='x'"), ("#test=0", "test='0'")))


def test_cell_labels_take_the_quadrant_covering_most_of_the_cell():
    q = [[3, 1, 2, mosaics.EMPTY]]
    assert mosaics.cell_labels(q, 2).tolist() == [[[3, 1], [2, 10]]]
    assert mosaics.cell_labels(q, 4).tolist() == [[[3, 3, 1, 1], [3, 3, 1, 1], [2, 2, 10, 10], [2, 2, 10, 10]]]
    # odd grids: an edge cell straddles two quadrants, the centre all four (a tie: the lowest index)
    assert mosaics.cell_labels(q, 3).tolist() == [[[3, 1, 1], [2, 1, 1], [2, 2, 10]]]
    assert mosaics.cell_labels(q, 1).tolist() == [[[1]]]
    assert mosaics.cell_labels(np.array(q * 5), 2).shape == (5, 2, 2)


def test_mosaic_label_is_the_majority_class_then_the_larger_area():
    g = lambda c, side: {"class": c, "side": side}
    assert mosaics.mosaic_label([g(4, 26), g(7, 32), g(4, 26)]) == 4          # two quadrants beat one
    assert mosaics.mosaic_label([g(4, 26), g(7, 32)]) == 7                     # a tie: the larger garment
    assert mosaics.mosaic_label([g(4, 30), g(7, 30)]) == 4                     # then the lower class
    assert mosaics.mosaic_label([g(9, 27)]) == 9


def test_mosaics_are_what_their_labels_say_deterministic_and_a_prefix(fake_root, tmp_path):
    spec = mosaics.parse_source(f"fashion-mnist-mosaics:{fake_root}#train=30,test=5,size=64")
    a, ma = mosaics.ensure_mosaics(spec, "train", str(tmp_path / "c1"))
    b, mb = mosaics.ensure_mosaics(spec, "train", str(tmp_path / "c2"))
    assert ma["pixels_sha256"] == mb["pixels_sha256"] and ma["sha256"] == mb["sha256"] and a != b
    assert ma["num_images"] == 30 and ma["cell_classes"] == [*fm.CLASSES, "empty"] and ma["params"]["size"] == 64
    photos, labels = fm.load_fashion_mnist(fake_root, "train")
    n_empty = 0
    for e in ma["images"]:
        img = np.asarray(Image.open(os.path.join(a, e["image"])), np.int64)
        assert img.shape == (64, 64) and e["garments"]
        assert e["label"] == mosaics.mosaic_label(e["garments"]) and e["image"].startswith(f"images/{fm.CLASSES[e['label']]}/")
        drawn = {g["quadrant"]: g for g in e["garments"]}
        for q in range(4):
            qy, qx = divmod(q, 2)
            quad = img[32 * qy:32 * qy + 32, 32 * qx:32 * qx + 32]
            if q not in drawn:
                assert e["quadrants"][q] == mosaics.EMPTY and quad.max() <= mosaics.NOISE
                n_empty += 1
                continue
            gm = drawn[q]
            assert e["quadrants"][q] == gm["class"] == labels[gm["source_index"]] and 26 <= gm["side"] <= 32
            x, y, s = gm["x"] - 32 * qx, gm["y"] - 32 * qy, gm["side"]
            assert 0 <= x <= 32 - s and 0 <= y <= 32 - s       # the garment stays inside its quadrant
            want = np.asarray(Image.fromarray(photos[gm["source_index"]], "L").resize((s, s), Image.BILINEAR), np.int64)
            assert np.abs(quad[y:y + s, x:x + s] - want).max() <= mosaics.NOISE + 1
    assert 0 < n_empty < 4 * 30 * 0.5
    small, ms = mosaics.ensure_mosaics(mosaics.parse_source(f"fashion-mnist-mosaics:{fake_root}#train=4"), "train",
                                       str(tmp_path / "c1"))
    assert small != a and ms["images"] == ma["images"][:4]                     # a prefix
    for e in ms["images"]:
        assert (np.asarray(Image.open(os.path.join(small, e["image"]))) == np.asarray(Image.open(os.path.join(a, e["image"])))).all()
    _, mt = mosaics.ensure_mosaics(spec, "test", str(tmp_path / "c1"))
    assert mt["num_images"] == 5 and all(g["source_index"] < 20 for e in mt["images"] for g in e["garments"])


def _rewrite_labels(folder, change):
    path = os.path.join(folder, "labels.json")
    meta = json.load(open(path))
    change(meta)
    with open(path, "w") as f:
        json.dump(meta, f)


def test_checksum_covers_images_labels_and_parameters(fake_root, tmp_path):
    spec = mosaics.parse_source(f"fashion-mnist-mosaics:{fake_root}#train=6,size=32")
    folder, meta = mosaics.ensure_mosaics(spec, "train", str(tmp_path))
    assert mosaics.ensure_mosaics(spec, "train", str(tmp_path))[0] == folder
    original = open(os.path.join(folder, "labels.json")).read()

    def refused():
        with pytest.raises(DataError, match=r"fail their checksum \(an image, a label.*delete the folder"):
            mosaics.ensure_mosaics(spec, "train", str(tmp_path))
        with open(os.path.join(folder, "labels.json"), "w") as f:   # put it back for the next case
            f.write(original)
        assert mosaics.ensure_mosaics(spec, "train", str(tmp_path))[0] == folder

    _rewrite_labels(folder, lambda m: m["images"][3]["quadrants"].__setitem__(0, (m["images"][3]["quadrants"][0] + 1) % 11))
    refused()
    _rewrite_labels(folder, lambda m: m["images"][1].__setitem__("label", (m["images"][1]["label"] + 1) % 10))
    refused()
    _rewrite_labels(folder, lambda m: m["params"].__setitem__("p_empty", 0.5))
    refused()
    with open(os.path.join(folder, "labels.json"), "w") as f:
        f.write(original[:100])                                              # truncated
    refused()
    path = os.path.join(folder, meta["images"][2]["image"])
    Image.fromarray(np.zeros((32, 32), np.uint8), "L").save(path)
    with pytest.raises(DataError, match="fail their checksum"):
        mosaics.ensure_mosaics(spec, "train", str(tmp_path))
    check_refused_when_removed(lambda: mosaics.ensure_mosaics(spec, "train", str(tmp_path)), folder, path, "mosaic")


def test_source_and_eval_splits(fake_root, tmp_path):
    src = f"fashion-mnist-mosaics:{fake_root}#train=10,test=6,size=32"
    cfg = load_config("smoke", [f"data.source={src}", f"data.cache_dir={tmp_path}"])
    samples = list_samples(cfg.data)
    assert len(samples) == 10 and all(s.label in fm.CLASSES and s.path.endswith(".png") for s in samples)
    cfg = load_config("smoke", [f"data.source={src},test", f"data.cache_dir={tmp_path}", "data.max_images=4"])
    assert len(list_samples(cfg.data)) == 4 and "-test-6-32-" in list_samples(cfg.data)[0].path
    tr, te = load_eval_data(src, task="cells", data_cache_dir=str(tmp_path), max_val=3)
    _, meta = mosaics.ensure_mosaics(mosaics.parse_source(src), "train", str(tmp_path))
    assert (len(tr), len(te)) == (10, 3) and tr.cells.shape == (10, 4) and te.cells.shape == (3, 4)
    assert tr.cells.tolist() == [e["quadrants"] for e in meta["images"]]
    assert tr.labels.tolist() == [e["label"] for e in meta["images"]] and tr.classes == list(fm.CLASSES)
    assert tr.load(0).mode == "RGB" and tr.load(0).size == (32, 32)
    tr2, _ = load_eval_data(src, task="cls", data_cache_dir=str(tmp_path))
    assert tr2.labels.tolist() == tr.labels.tolist() and tr2.fingerprint() == tr.fingerprint()
    with pytest.raises(DataError, match="no masks: their dense probe is the cells mode"):
        load_eval_data(src, task="seg", data_cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="drop the split token"):
        load_eval_data(src + ",test", task="cells", data_cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="the cells probe needs .*fashion-mnist-mosaics"):
        load_eval_data(f"fashion-mnist:{fake_root}", task="cells")
    with pytest.raises(DataError, match="Fashion-MNIST has no masks.*cells mode: fashion-mnist-mosaics"):
        load_eval_data(f"fashion-mnist:{fake_root}", task="seg")


def test_the_retired_scenes_are_refused_by_name_pointing_to_the_mosaics(fake_root, tmp_path, capsys):
    """The Fashion-MNIST scenes were removed (docs/real-data-checks.md: they could not rank trunks). Their
    spelling (as --data, data.source, train.knn_data) and their preset are refused in one line that says so
    and names the mosaics, exit status 2: not a "does not exist" about a folder called
    "fashion-mnist-scenes:...", nor an "unknown config"."""
    from densecl_fast.data.sources import parse_builtin
    from densecl_fast.pretrain import main as pretrain_main
    from densecl_fast.reproduce import main as reproduce_main
    from tests.helpers import tiny
    old = f"fashion-mnist-scenes:{fake_root}#train=8"
    with pytest.raises(DataError, match="scenes were removed.*use fashion-mnist-mosaics:ROOT"):
        parse_builtin(old)
    data = tmp_path / "data"
    calls = [
        (pretrain_main, ["--config", "fashion_mnist_scenes"], "--config fashion_mnist_mosaic"),
        (pretrain_main, tiny(tmp_path / "r1", data, f"data.source={old}"), "fashion-mnist-mosaics:ROOT"),
        (pretrain_main, tiny(tmp_path / "r2", data, f"train.knn_data={old}"), "fashion-mnist-mosaics:ROOT"),
        (eval_main, ["knn", "--checkpoint", "random", "--arch", "resnet18", "--data", old, "--data-cache-dir",
                     str(data), "--out", str(tmp_path / "ev"), "--no-progress"], "fashion-mnist-mosaics:ROOT"),
        (reproduce_main, ["--data", old, "--budget", "1ep", "--out", str(tmp_path / "rp1")], "fashion-mnist-mosaics:ROOT"),
        (reproduce_main, ["--data", "synthetic", "--config", "fashion_mnist_scenes", "--budget", "1ep", "--out",
                          str(tmp_path / "rp2")], "--config fashion_mnist_mosaic"),
    ]
    for main, argv, hint in calls:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "scenes were removed" in err and hint in err, (argv, err)
        assert "does not exist" not in err and "no such" not in err and "unknown config" not in err, err


def test_probe_scores():
    pred, target = np.array([0, 0, 1, 10, 10, 10]), np.array([0, 1, 1, 10, 10, 0])
    r = cells.scores(pred, target, 11)
    assert r["acc"] == pytest.approx(100 * 4 / 6) and r["chance"] == pytest.approx(100 / 3)
    assert r["class_acc"][0] == pytest.approx(50.0) and r["class_acc"][1] == pytest.approx(50.0)
    assert r["class_acc"][10] == pytest.approx(100.0) and r["class_acc"][5] is None
    assert r["mean_class_acc"] == pytest.approx(200 / 3)


def test_probe_reads_cells_from_the_maps_and_is_at_chance_on_constant_maps():
    """Maps whose position (i, j) holds its cell's label (one-hot, plus noise) are read almost perfectly;
    a position whose vector belongs to another cell would not be. Constant maps score the commonest share."""
    rs = np.random.RandomState(0)
    q = rs.randint(0, 11, (300, 4))
    for grid in (2, 4):
        lab = mosaics.cell_labels(q, grid)
        maps = np.eye(11, dtype=np.float32)[lab].transpose(0, 3, 1, 2) + rs.normal(0, 0.15, (300, 11, grid, grid))
        r = cells.train_cells(maps[:200], q[:200], maps[200:], q[200:], epochs=5, min_steps=150)
        assert r["acc"] > 95 and r["mean_class_acc"] > 95 and r["grid"] == grid and r["eval_cells"] == 100 * grid * grid
        shuffled = maps[:, :, ::-1, :].copy()                  # rows swapped: vectors at the wrong cells
        assert cells.train_cells(shuffled[:200], q[:200], shuffled[200:], q[200:], epochs=5, min_steps=150)["acc"] < 40
        const = np.ones((300, 8, grid, grid), np.float32)
        r = cells.train_cells(const[:200], q[:200], const[200:], q[200:], epochs=2, min_steps=0)
        assert r["acc"] <= r["chance"] + 1e-9
    with pytest.raises(ValueError, match="N x C x g x g"):
        cells.cells_of(np.zeros((2, 3, 2, 1)), q[:2])


def test_preset_is_a_cpu_setting_without_stale_keys():
    cfg = load_config("fashion_mnist_mosaic")
    assert cfg.model.arch == "resnet18" and cfg.data.image_size == 64 and cfg.data.min_scale >= 0.5
    assert cfg.data.blur_prob == 0 and cfg.data.grayscale_prob == 0
    assert mosaics.parse_source(cfg.data.source) and mosaics.parse_source(cfg.train.knn_data)
    spe = mosaics.DEFAULT_COUNT["train"] // cfg.optim.batch_size
    assert cfg.model.queue_len < mosaics.DEFAULT_COUNT["train"] / 2 and stale_key_share(
        cfg.model.queue_len, cfg.optim.batch_size, spe) < 0.05


def test_cells_cli_blind_and_a_label_trained_checkpoint(fake_root, tmp_path):
    src = f"fashion-mnist-mosaics:{fake_root}#train=24,test=8"
    common = ["--data", src, "--data-cache-dir", str(tmp_path / "data"), "--cache-dir", str(tmp_path / "f"),
              "--workers", "0", "--no-progress", "--epochs", "2"]
    assert eval_main(["cells", "--checkpoint", "random", "--arch", "resnet18", "--out", str(tmp_path / "r"), *common]) == 0
    res = json.load(open(tmp_path / "r" / "cells.json"))
    assert res["image_size"] == 64 and res["c5"]["grid"] == 2 and res["c4"]["grid"] == 4   # the mosaics' side
    assert res["c5"]["eval_cells"] == 8 * 4 and res["c4"]["eval_cells"] == 8 * 16
    assert res["cell_c5_acc"] == res["c5"]["acc"] and "cell_c4_mean_class_acc" in res
    assert "c5 (2x2) cell accuracy" in open(tmp_path / "r" / "cells.md").read()
    assert eval_main(["cells", "--checkpoint", "random", "--arch", "resnet18", "--out", str(tmp_path / "b"),
                      "--input-blind", *common]) == 0
    res = json.load(open(tmp_path / "b" / "cells.json"))
    assert res["input_blind"] and all(res[l]["acc"] <= res[l]["chance"] + 1e-9 for l in ("c5", "c4"))
    ckpt = str(tmp_path / "sup.pth")
    assert supervised.main(["--data", src, "--data-cache-dir", str(tmp_path / "data"), "--out", ckpt, "--steps", "3",
                            "--batch-size", "8", "--no-progress"]) == 0
    arch, state = load_backbone_state(ckpt)
    assert arch == "resnet18" and all(torch.isfinite(v.float()).all() for v in state.values())
    assert eval_main(["cells", "--checkpoint", ckpt, "--out", str(tmp_path / "s"), *common]) == 0
    assert supervised.main(["--data", f"fashion-mnist:{fake_root}", "--out", ckpt]) == 2
    assert eval_main(["dense", "--checkpoint", "random", "--arch", "resnet18", "--out", str(tmp_path / "d"), *common]) == 2


def test_calibration_table_in_the_small(fake_root, tmp_path, capsys):
    out = tmp_path / "cal"
    argv = ["--data", f"fashion-mnist-mosaics:{fake_root}#train=24,test=8", "--out", str(out), "--steps", "3",
            "--batch-size", "8", "--probe-epochs", "2", "--data-cache-dir", str(tmp_path / "data"), "--no-progress"]
    assert calibrate.main(argv) == 0
    text = capsys.readouterr().out
    res = json.load(open(out / "calibration.json"))
    rows = {r["trunk"]: r for r in res["rows"]}
    assert list(rows) == ["random_s0", "random_s1", "input_blind", "label_trained"]
    assert rows["random_s0"]["cell_c5_acc"] == json.load(open(out / "random_s0" / "cells.json"))["cell_c5_acc"]
    assert rows["label_trained"]["knn_top1"] == json.load(open(out / "label_trained" / "knn.json"))["top1"]["20"]
    assert rows["input_blind"]["cell_c5_acc"] <= res["chance_c5"] + 1e-9
    assert res["label_trained_lead_c5"] == pytest.approx(
        rows["label_trained"]["cell_c5_acc"] - max(rows["random_s0"]["cell_c5_acc"], rows["random_s1"]["cell_c5_acc"]))
    assert res["calibrated"] == (res["label_trained_lead_c5"] >= 20) and os.path.isfile(out / "label_trained.pth")
    md = open(out / "calibration.md").read()
    assert "| input-blind" in md and "C5 (2x2) cell acc" in md and "global kNN" in md and res["verdict"] in md
    assert "| random init, seed 1 |" in text
    assert calibrate.main(["--data", f"fashion-mnist:{fake_root}", "--out", str(out)]) == 2
    assert "needs fashion-mnist-mosaics" in capsys.readouterr().err


def test_the_seeded_mosaics_experiment_in_the_small(fake_root, tmp_path, capsys):
    """launch/reproduce.py --data fashion-mnist-mosaics:ROOT --config fashion_mnist_mosaic --seeds N, shrunk (without
    --baseline: a MoCo-v2 run is a DenseCL run with λ = 0, tested on the built-in set in test_reproduce.py): every stage, the cells probe of
    every trunk, and its means, std and paired differences in the report."""
    from densecl_fast.reproduce import main
    out = str(tmp_path / "repro")
    src = f"fashion-mnist-mosaics:{fake_root}#train=32,test=8"
    argv = ["--data", src, "--config", "fashion_mnist_mosaic", "--budget", "1ep", "--seeds", "2",
            "--out", out, "--probe-steps", "1", "model.hid_dim=32", "model.out_dim=16", "model.queue_len=32",
            "model.bn_group_size=4", "data.num_workers=0", f"data.cache_dir={tmp_path / 'data'}", "optim.batch_size=8",
            "train.tensorboard=false", "train.progress=false", f"train.knn_data={src}", "train.knn_every_epochs=1",
            "train.knn_max_bank=32", "train.knn_max_val=8"]
    assert main(argv) == 0, capsys.readouterr()
    rep = json.load(open(os.path.join(out, "report.json")))
    for t in ("densecl_s0", "densecl_s1", "random_s0", "random_s1"):
        c = json.load(open(os.path.join(out, "eval", t, "cells.json")))
        assert c["seed"] == int(t[-1]) and c["c5"]["grid"] == 2
        assert rep["eval"][t]["cell_c5_acc"] == c["cell_c5_acc"] and rep["eval"][t]["cell_c4_acc"] == c["cell_c4_acc"]
    for metric in ("cell_c5_acc", "cell_c4_acc"):
        vals = [rep["eval"][f"densecl_s{s}"][metric] for s in (0, 1)]
        assert rep["by_method"][metric]["densecl"]["mean"] == pytest.approx(sum(vals) / 2)
        per = [rep["eval"][f"densecl_s{s}"][metric] - rep["eval"][f"random_s{s}"][metric] for s in (0, 1)]
        assert rep["paired_differences"]["densecl_minus_random"][metric]["mean"] == pytest.approx(sum(per) / 2)
    assert "knn_top1" in json.loads(open(os.path.join(out, "densecl_s0", "metrics.jsonl")).readlines()[-1])
    md = open(os.path.join(out, "report.md")).read()
    assert "cells probe accuracy (C5 cells, our protocol)" in md and "DenseCL − random" in md
    assert "the mosaics' dense evaluation is the cells probe" in md

