"""Fashion-MNIST as a data source: idx parsing, the cached image folder, errors, a trainer run."""
import gzip
import os
import struct

import numpy as np
import pytest
from PIL import Image

from densecl_fast.config import ConfigError, DataConfig, load_config
from densecl_fast.data import DataError
from densecl_fast.data import fashion_mnist as fm
from densecl_fast.data.sources import list_samples
from densecl_fast.trainer import train

REAL = "/usr/share/datasets/fashion-mnist"


def write_idx(root, split, images, labels, gz=True, corrupt=None):
    os.makedirs(root, exist_ok=True)
    img_stem, lab_stem = fm._FILES[split]
    blobs = {img_stem: struct.pack(">IIII", 0x0803, *images.shape) + images.tobytes(),
             lab_stem: struct.pack(">II", 0x0801, len(labels)) + labels.astype(np.uint8).tobytes()}
    if corrupt == "truncated":
        blobs[img_stem] = blobs[img_stem][:-7]
    if corrupt == "magic":
        blobs[lab_stem] = struct.pack(">I", 0x0803) + blobs[lab_stem][4:]
    for stem, data in blobs.items():
        path = os.path.join(root, stem + (".gz" if gz else ""))
        with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
            f.write(data)


def fake_split(n, seed):
    rs = np.random.RandomState(seed)
    return rs.randint(0, 256, (n, 28, 28)).astype(np.uint8), rs.randint(0, 10, n).astype(np.int64)


@pytest.fixture()
def fake_root(tmp_path):
    root = str(tmp_path / "fmnist")
    for split, n, seed in (("train", 40, 0), ("test", 12, 1)):
        write_idx(root, split, *fake_split(n, seed))
    return root


def test_parse_source_spellings():
    assert fm.parse_source("/data/x") is None and fm.parse_source("synthetic") is None
    assert fm.parse_source("fashion-mnist:/a/b") == ("/a/b", "train")
    assert fm.parse_source("fashion-mnist:/a/b#test") == ("/a/b", "test")
    with pytest.raises(DataError, match="split 'val'"):
        fm.parse_source("fashion-mnist:/a/b#val")
    with pytest.raises(DataError, match="give the folder"):
        fm.parse_source("fashion-mnist:")


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_are_read_exactly(tmp_path, gz):
    images, labels = fake_split(7, 3)
    write_idx(str(tmp_path), "test", images, labels, gz=gz)
    x, y = fm.load_fashion_mnist(str(tmp_path), "test")
    assert x.dtype == np.uint8 and x.shape == (7, 28, 28) and (x == images).all()
    assert y.dtype == np.int64 and (y == labels).all()


@pytest.mark.parametrize("corrupt, message", [("truncated", "truncated"), ("magic", "not an idx file")])
def test_bad_idx_files_are_named(tmp_path, corrupt, message):
    write_idx(str(tmp_path), "train", *fake_split(5, 0), corrupt=corrupt)
    with pytest.raises(DataError, match=message):
        fm.load_fashion_mnist(str(tmp_path), "train")


def test_missing_folder_or_files_are_named(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        fm.load_fashion_mnist(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*not found"):
        fm.load_fashion_mnist(str(tmp_path))


def test_source_lists_the_split_in_idx_order_with_labels(fake_root, tmp_path):
    images, labels = fake_split(40, 0)
    cfg = DataConfig(source=f"fashion-mnist:{fake_root}", cache_dir=str(tmp_path / "cache"))
    samples = list_samples(cfg)
    assert len(samples) == 40
    assert [s.label for s in samples] == [fm.CLASSES[k] for k in labels]
    for i in (0, 17, 39):  # the PNG holds exactly image i of the idx file
        assert (np.asarray(Image.open(samples[i].path)) == images[i]).all()
    first = list_samples(DataConfig(source=f"fashion-mnist:{fake_root}", cache_dir=str(tmp_path / "cache"),
                                    max_images=10))
    assert first == samples[:10]  # "the first N images" in the idx order
    test = list_samples(DataConfig(source=f"fashion-mnist:{fake_root}#test", cache_dir=str(tmp_path / "cache")))
    assert len(test) == 12


def test_folder_is_written_once_and_rewritten_when_the_files_change(fake_root, tmp_path):
    cache = str(tmp_path / "cache")
    a = fm.ensure_image_folder(fake_root, "train", cache)
    stamp = os.path.getmtime(os.path.join(a, "labels.json"))
    assert fm.ensure_image_folder(fake_root, "train", cache) == a
    assert os.path.getmtime(os.path.join(a, "labels.json")) == stamp
    write_idx(fake_root, "train", *fake_split(30, 5))
    os.utime(os.path.join(fake_root, "train-images-idx3-ubyte.gz"), (1, 1))
    b = fm.ensure_image_folder(fake_root, "train", cache)
    assert b != a and len(fm.read_labels(b)["images"]) == 30
    assert not [d for d in os.listdir(cache) if d.startswith(".")]  # no temp folder left behind


def test_max_images_is_validated():
    with pytest.raises(ConfigError, match="data.max_images"):
        load_config("smoke", ["data.max_images=-1"])


def test_trainer_pretrains_on_fashion_mnist(fake_root, tmp_path):
    summary = train(load_config("smoke", [
        f"data.source=fashion-mnist:{fake_root}", f"data.cache_dir={tmp_path / 'cache'}", "data.max_images=32",
        "data.image_size=64", "data.num_workers=0", "model.hid_dim=32", "model.out_dim=16", "model.queue_len=64",
        "model.bn_group_size=4", "optim.epochs=1", "optim.batch_size=8", f"train.out_dir={tmp_path / 'run'}",
        "train.tensorboard=false", "train.progress=false"]))
    assert summary["status"] == "finished" and summary["step"] == 4  # 32 of the 40 images, batch 8


@pytest.mark.skipif(not os.path.isdir(REAL), reason="apt-get install dataset-fashion-mnist")
def test_the_installed_data_set_reads():
    x, y = fm.load_fashion_mnist(REAL, "test")
    assert x.shape == (10000, 28, 28) and np.bincount(y).tolist() == [1000] * 10
