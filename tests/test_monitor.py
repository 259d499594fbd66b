"""The online kNN monitor (densecl_fast/monitor.py): when it runs, what it writes, and that it
changes nothing about the run it watches."""
import json
import os
import subprocess
import sys

import pytest
import torch

from densecl_fast import checkpoint
from densecl_fast.config import ConfigError, load_config
from densecl_fast.data import DataError
from densecl_fast.distributed import DistInfo
from densecl_fast.model import DenseCL
from densecl_fast.monitor import KnnMonitor
from densecl_fast.trainer import train
from helpers import PRETRAIN, ROOT, tiny

KNN = ["train.knn_data=synthetic", "train.knn_image_size=32", "train.knn_max_val=7"]


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def one_process():
    return DistInfo(rank=0, world_size=1, local_rank=0)


def test_config_keys_are_checked():
    with pytest.raises(ConfigError, match="knn_every_epochs and knn_every_steps are both 0"):
        load_config("smoke", ["train.knn_data=synthetic", "train.knn_every_epochs=0"])
    with pytest.raises(ConfigError, match="knn_max_bank, knn_max_val and knn_k must be >= 1"):
        load_config("smoke", ["train.knn_k=0"])
    with pytest.raises(ConfigError, match="knn_image_size=16"):
        load_config("smoke", ["train.knn_image_size=16"])
    cfg = load_config("smoke")
    assert cfg.train.knn_data == "" and KnnMonitor.build(cfg, torch.device("cpu"), one_process()) is None


def test_due_by_epochs_and_steps(tmp_path, data_cache):
    cfg = load_config("smoke", tiny(str(tmp_path), data_cache, *KNN, "train.knn_every_epochs=2",
                                    "train.knn_every_steps=3"))
    mon = KnnMonitor.build(cfg, torch.device("cpu"), one_process())
    assert [s for s in range(1, 17) if mon.due(s, 4)] == [3, 6, 8, 9, 12, 15, 16]
    mon.every_steps = 0
    assert [s for s in range(1, 17) if mon.due(s, 4)] == [8, 16]


def test_run_scores_the_query_trunk_and_leaves_the_model_alone(tmp_path, data_cache):
    cfg = load_config("smoke", tiny(str(tmp_path), data_cache, *KNN))
    mon = KnnMonitor.build(cfg, torch.device("cpu"), one_process())
    assert len(mon.bank) == 25 and len(mon.val) == 7 and mon.image_size == 32   # 32 images: every 5th is val
    torch.manual_seed(0)
    model = DenseCL(cfg.model).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    res = mon.run(model)
    assert set(res) == {"knn_top1", "knn_seconds"} and 0.0 <= res["knn_top1"] <= 100.0
    assert res["knn_top1"] * 7 / 100 == pytest.approx(round(res["knn_top1"] * 7 / 100))  # a count of 7 images
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())    # BN statistics included
    assert torch.equal(torch.get_rng_state(), rng) and mon.postfix() == {"knn": f"{res['knn_top1']:.1f}"}
    # the copy it scores is the query trunk: another trunk gives other features (same accuracy possible)
    with torch.no_grad():
        for p in model.encoder_q.backbone.parameters():
            p.mul_(-1.0)
    mon.run(model)
    assert torch.equal(next(mon.trunk.parameters()), next(model.encoder_q.backbone.parameters()))


def test_a_run_with_the_monitor_equals_one_without(tmp_path, data_cache):
    """Same losses, weights and RNG states with the monitor on; its accuracy at the due steps only."""
    off, on = str(tmp_path / "off"), str(tmp_path / "on")
    train(load_config("smoke", tiny(off, data_cache)))
    train(load_config("smoke", tiny(on, data_cache, *KNN, "train.knn_every_steps=3")))
    a, b = read_metrics(off), read_metrics(on)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
    for x, y in zip(a, b):
        assert (x["loss"], x["loss_single"], x["loss_dense"]) == (y["loss"], y["loss_single"], y["loss_dense"])
    assert [r["step"] for r in b if "knn_top1" in r] == [3, 4, 6, 8]   # every 3 steps and every epoch (4 steps)
    assert all(0 <= r["knn_top1"] <= 100 and r["knn_seconds"] > 0 for r in b if "knn_top1" in r)
    ca, cb = (checkpoint.load_checkpoint(checkpoint.list_checkpoints(d)[-1]) for d in (off, on))
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    ra, rb = ca["rngs"][0], cb["rngs"][0]
    assert torch.equal(ra["torch"], rb["torch"])          # the monitor's draws were undone
    assert torch.equal(ra["numpy_keys"], rb["numpy_keys"]) and ra["python"] == rb["python"]


def test_monitor_off_by_steps_logs_only_where_due(tmp_path, data_cache):
    out = str(tmp_path / "run")
    train(load_config("smoke", tiny(out, data_cache, *KNN, "train.log_every=5", "train.knn_every_epochs=2",
                                    "train.ckpt_every_epochs=2")))
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == [5, 8] and "knn_top1" in recs[1] and "knn_top1" not in recs[0]


def test_bad_knn_data_stops_before_the_model(tmp_path, data_cache):
    with pytest.raises(DataError, match=r"train.knn_data='/no/such/folder': --data /no/such/folder: no such"):
        train(load_config("smoke", tiny(str(tmp_path / "x"), data_cache, "train.knn_data=/no/such/folder")))
    assert not os.listdir(os.path.join(tmp_path, "x", "checkpoints"))   # no model was built, nothing saved


def test_a_knn_val_that_cannot_be_honoured_is_an_error_naming_it(tmp_path, data_cache):
    """train.knn_val was silently ignored with the sets that bring their own evaluation
    split (the monitor used that split), and a missing folder was reported as '--val'."""
    from tests.helpers import fake_garments, write_idx
    root = str(tmp_path / "fmnist")
    write_idx(root, "train", *fake_garments(30, 0))
    write_idx(root, "test", *fake_garments(10, 1))
    folder = tmp_path / "labelled"
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
    for data in ("synthetic", f"fashion-mnist:{root}", f"fashion-mnist-mosaics:{root}#train=8,test=4,size=32"):
        for val in ("/no/such/folder", str(folder)):  # missing or not: either way it would be ignored
            cfg = load_config("smoke", tiny(str(tmp_path / "x"), data_cache, f"train.knn_data={data}",
                                            f"train.knn_val={val}", "train.knn_max_bank=8", "train.knn_max_val=4"))
            with pytest.raises(DataError, match=rf"train.knn_val='{val}' cannot be used with train.knn_data="):
                KnnMonitor.build(cfg, torch.device("cpu"), one_process())
    cfg = load_config("smoke", tiny(str(tmp_path / "x"), data_cache, f"train.knn_data={folder}",
                                    "train.knn_val=/no/such/folder"))
    with pytest.raises(DataError, match=r"^train.knn_val='/no/such/folder': no such folder"):
        KnnMonitor.build(cfg, torch.device("cpu"), one_process())
    lst = tmp_path / "list.txt"
    lst.write_text("")
    cfg = load_config("smoke", tiny(str(tmp_path / "x"), data_cache, f"train.knn_data={lst}",
                                    f"train.knn_val={folder}"))
    with pytest.raises(DataError, match=rf"^train.knn_val='{folder}': no such file"):
        KnnMonitor.build(cfg, torch.device("cpu"), one_process())
    # through the trainer: before any model is built
    with pytest.raises(DataError, match="train.knn_val='/no/such/folder' cannot be used"):
        train(load_config("smoke", tiny(str(tmp_path / "y"), data_cache, *KNN, "train.knn_val=/no/such/folder")))
    assert not os.listdir(os.path.join(tmp_path, "y", "checkpoints"))


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_rank0_measures_the_others_wait(tmp_path, data_cache):
    out = str(tmp_path / "ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        PRETRAIN, *tiny(out, data_cache, "optim.epochs=1", *KNN, "train.knn_every_steps=2")],
                       capture_output=True, text=True, timeout=400, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs = read_metrics(out)
    assert [x["step"] for x in recs if "knn_top1" in x] == [2, 4]


def test_reproduction_report_plots_the_curve_when_present(tmp_path):
    from densecl_fast.reproduce.plots import plot_all
    os.makedirs(tmp_path / "densecl")
    recs = [{"step": s, "epoch": s / 4, "loss": 7.0, "loss_single": 7.0, "loss_dense": 7.0, "img_per_s": 10.0}
            for s in range(1, 9)]
    plan = {"epochs": 2, "images_per_s": 10.0}
    with open(tmp_path / "densecl" / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    assert not any(p.endswith("knn.png") for p in plot_all(str(tmp_path), ["densecl"], {}, [], plan))
    recs[3]["knn_top1"], recs[7]["knn_top1"] = 40.0, 55.0
    with open(tmp_path / "densecl" / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    assert os.path.getsize(tmp_path / "knn.png") > 0 if any(
        p.endswith("knn.png") for p in plot_all(str(tmp_path), ["densecl"], {}, [], plan)) else False
