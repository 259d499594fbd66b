"""Evaluation on frozen features: kNN voting, the quick linear probe, the CLI end to end, the cache."""
import json
import os
import subprocess
import sys

import pytest
import torch

from densecl_fast.config import load_config
from densecl_fast.eval import __main__ as cli
from densecl_fast.eval import features
from densecl_fast.eval.knn import knn_accuracy, knn_predict
from densecl_fast.eval.linear import quick_linear
from densecl_fast.trainer import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = "/usr/share/datasets/fashion-mnist"


def test_knn_votes_are_temperature_weighted_similarities():
    # Bank: two of class 0 at moderate similarity to the query, one of class 1 at high similarity.
    q = torch.tensor([[1.0, 0.0]])
    bank = torch.tensor([[0.8, 0.6], [0.8, -0.6], [0.99, 0.141]])
    labels = torch.tensor([0, 0, 1])
    # T = 0.07: exp(0.99/0.07) = 1.4e6 > 2 * exp(0.8/0.07) = 1.8e5 -> class 1
    assert knn_predict(bank, labels, q, k=3, num_classes=2, temperature=0.07).item() == 1
    # T large: votes ~ counts -> class 0
    assert knn_predict(bank, labels, q, k=3, num_classes=2, temperature=100.0).item() == 0
    # k = 1: the nearest alone
    assert knn_predict(bank, labels, q, k=1, num_classes=2).item() == 1
    # -q: class 0 is the least dissimilar at k = 1 and wins the vote at k = 3; labelled 1 -> wrong
    acc = knn_accuracy(bank, labels, torch.cat([q, -q]), torch.tensor([1, 1]), [1, 3], 2)
    assert acc == {1: 50.0, 3: 50.0}


def test_quick_linear_separates_separable_data_and_not_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=g)
    y = (x[:, 3] > 0).long()
    r = quick_linear(x[:300], y[:300], x[300:], y[300:], 2)
    assert r["top1"] > 95
    noise = torch.randint(0, 2, (400,), generator=g)
    assert quick_linear(x[:300], noise[:300], x[300:], noise[300:], 2)["top1"] < 70


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    summary = train(load_config("smoke", [
        "model.hid_dim=64", "model.out_dim=32", "model.queue_len=128", "model.bn_group_size=8",
        "data.source=synthetic", "data.synthetic_images=128", "data.synthetic_resolution=64", "data.image_size=64",
        "data.num_workers=0", f"data.cache_dir={d / 'data'}", "optim.epochs=2", "optim.batch_size=32",
        "optim.lr=0.12", f"train.out_dir={d / 'run'}", "train.tensorboard=false", "train.progress=false"]))
    return summary["checkpoint"], d


def run_eval(d, *args):
    return cli.main([*map(str, args), "--data", "synthetic", "--image-size", "64", "--out", str(d / "out"),
                     "--cache-dir", str(d / "feat"), "--data-cache-dir", str(d / "data"), "--no-progress",
                     "--synthetic-images", "128", "--synthetic-resolution", "64"])


def test_knn_and_linear_end_to_end_trained_vs_random_and_cached(trained):
    ckpt, d = trained
    results = {}
    for name, weights in (("trained", ["--checkpoint", ckpt]), ("random", ["--checkpoint", "random", "--arch", "resnet18"])):
        for mode in ("knn", "linear"):
            before = features.extractions
            assert run_eval(d, mode, *weights, "--k", "5,20") == 0
            # features are extracted once per weights and split: the second mode reuses them
            assert features.extractions - before == (2 if mode == "knn" else 0)
            with open(d / "out" / f"{mode}.json") as f:
                results[name, mode] = json.load(f)
            assert (d / "out" / f"{mode}.md").read_text().startswith(f"# {mode}")
    for (name, mode), r in results.items():
        for v in r["metrics"].values():
            assert 0.0 <= v <= 100.0
        assert r["n_val"] == 128 // 5 and r["n_train"] == 128 - 128 // 5 and r["classes"] == 6
    assert results["trained", "knn"]["metrics"] != results["random", "knn"]["metrics"]
    assert results["trained", "linear"]["metrics"]["top1"] != results["random", "linear"]["metrics"]["top1"]


def test_rewritten_checkpoint_invalidates_the_cache(trained, tmp_path):
    ckpt, d = trained
    copy = tmp_path / "copy.pt"
    copy.write_bytes(open(ckpt, "rb").read())
    before = features.extractions
    assert run_eval(d, "knn", "--checkpoint", copy) == 0
    os.utime(copy, ns=(1, 1))
    assert run_eval(d, "knn", "--checkpoint", copy) == 0
    assert features.extractions - before == 4


@pytest.mark.parametrize("args, message", [
    (["knn", "--checkpoint", "random", "--data", "/no/such/folder"], "does not exist"),
    (["knn", "--checkpoint", "random", "--data", "synthetic"], "needs --arch"),
    (["knn", "--checkpoint", "BAD", "--data", "synthetic"], "BAD"),
])
def test_bad_inputs_are_one_line_exit_2(tmp_path, args, message):
    if "BAD" in args:
        bad = tmp_path / "bad.pt"
        bad.write_bytes(b"\x00" * 10)
        args = [str(bad) if a == "BAD" else a for a in args]
        message = str(bad)
    r = subprocess.run([sys.executable, "-m", "densecl_fast.eval", *args, "--out", str(tmp_path / "o"),
                        "--data-cache-dir", str(tmp_path / "data"), "--no-progress",
                        "--cache-dir", str(tmp_path / "feat")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and message in r.stderr
    assert r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1


def test_unknown_mode_is_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "densecl_fast.eval", "nope", "--checkpoint", "random", "--data", "x"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "invalid choice" in r.stderr


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_splits_are_the_official_ones(tmp_path):
    from densecl_fast.eval.datasets import load_splits
    tr, te = load_splits(f"fashion-mnist:{FMNIST}", max_val=2000)
    assert len(tr) == 60000 and len(te) == 2000 and tr.classes[0] == "t-shirt"
    assert te.get(0).size == (28, 28) and te.get(0).mode == "RGB" and te.labels[0] == 9  # an ankle boot
