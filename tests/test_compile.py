"""train.compile: regional compile of the encoders, its guards, and the warm-start cache.

Dynamo's behaviour (graphs, graph breaks, recompiles) is checked with the "eager" backend (tracing
and guards without code generation: seconds); the artifact round trip needs inductor and runs on
a tiny module in two fresh processes, each with its own empty inductor cache folder.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from densecl_fast.config import ConfigError, load_config
from densecl_fast.engines.compiling import CompileCache, CompileSettings, cache_key, compile_encoders, regions
from densecl_fast.engines.single import SingleEngine
from densecl_fast.model import DenseCL
from densecl_fast.engines import train_step
from densecl_fast.trainer import cudnn_benchmark_for
from helpers import ROOT

TINY = ["model.arch=resnet18", "model.hid_dim=32", "model.out_dim=16", "model.queue_len=32",
        "model.bn_group_size=2", "optim.batch_size=4", "data.image_size=32"]


def tiny_model(settings):
    cfg = load_config("smoke", TINY)
    torch.manual_seed(0)
    model = DenseCL(cfg.model)
    engine = SingleEngine(torch.device("cpu"), "fp32")
    engine.setup(model, cfg.optim, 0.1, compile=settings)
    return model.train(), engine


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_regions_are_every_residual_block_and_the_neck():
    model, _ = tiny_model(None)
    got = regions(model.encoder_q)
    trunk = model.encoder_q.backbone
    blocks = [b for layer in (trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4) for b in layer]
    assert got == blocks + [model.encoder_q.neck] and len(blocks) == 8   # resnet18: 2 blocks per stage
    assert trunk.conv1 not in got


def test_regional_compile_no_graph_breaks_no_recompiles_across_steps_eval_and_resume(fresh_dynamo):
    model, engine = tiny_model(CompileSettings(backend="eager"))
    # Every region of both encoders is compiled in place; the encoders themselves are not.
    assert all(r._compiled_call_impl is not None for enc in (model.encoder_q, model.encoder_k) for r in regions(enc))
    assert model.encoder_q._compiled_call_impl is None
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(4)]

    def train_steps(n):
        model.train()
        for i in range(n):
            out = train_step(model, engine, x[i % 2], x[2 + i % 2], 0.1, 0.5)
            assert torch.isfinite(out["loss"])

    def evaluate():
        model.eval()
        with torch.no_grad():
            model(x[0], x[1])

    train_steps(2)     # compiles the training graphs (query with grad, key without; BN in 2 groups)
    evaluate()         # and the eval graphs (BN = plain BatchNorm2d with running stats)
    graphs = counters["stats"]["unique_graphs"]
    # resnet18: 7 block graphs + the neck per encoder (parameters with / without requires_grad) and
    # per mode (train / eval): at most 32.
    assert 16 < graphs <= 32, graphs
    assert not counters["graph_break"], dict(counters["graph_break"])
    saved = ({k: v.clone() for k, v in model.state_dict().items()}, engine.optimizer.state_dict())
    with torch._dynamo.config.patch(error_on_recompile=True):
        train_steps(3)
        evaluate()
        train_steps(1)
        model.load_state_dict(saved[0])  # resume (what engine.load does): tensors loaded in place
        engine.optimizer.load_state_dict(saved[1])
        train_steps(2)
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["graph_break"]


def test_identical_blocks_share_one_graph(fresh_dynamo):
    """The point of regional compile: resnet18's two layer1 blocks (same shapes) trace once."""
    model, engine = tiny_model(CompileSettings(backend="eager"))
    x = torch.randn(4, 3, 32, 32)
    train_step(model, engine, x, x.flip(0), 0.1, 0.5)
    # per encoder: layer1 (1 graph for 2 blocks), layer2-4 (2 each: the strided first block and the
    # second), the neck: 8 graphs; two encoders (grad / no grad): 16, not 2 x 9 regions = 18.
    assert counters["stats"]["unique_graphs"] == 16


def test_compile_config_keys_are_validated():
    cfg = load_config("smoke", ["train.compile=true", "train.compile_mode=reduce-overhead",
                                "train.compile_scope=encoders"])
    assert CompileSettings.from_config(cfg.train) == CompileSettings("encoders", "reduce-overhead")
    assert CompileSettings.from_config(load_config("smoke").train) is None
    assert CompileSettings.from_config(load_config("smoke", ["train.compile=true"]).train) == CompileSettings()
    with pytest.raises(ConfigError, match="train.compile_mode='fast'"):
        load_config("smoke", ["train.compile_mode=fast"])
    with pytest.raises(ConfigError, match="train.compile_scope='layers'"):
        load_config("smoke", ["train.compile_scope=layers"])
    assert CompileSettings("blocks", "reduce-overhead").options()["mode"] == "reduce-overhead"
    assert "mode" not in CompileSettings().options() and CompileSettings().options()["dynamic"] is False


def test_cache_key_changes_with_what_changes_the_code():
    from densecl_fast.engines.compiling import key_fields
    cfg = load_config("smoke", TINY)
    cpu = torch.device("cpu")

    def key(cfg=cfg, precision="fp32", batch=4, settings=CompileSettings(), kernels="reference"):
        return cache_key(key_fields(cfg, cpu, precision, batch, settings, kernels))

    base = key()
    assert base == key()
    assert len({base, key(precision="bf16"), key(batch=8), key(settings=CompileSettings("encoders")),
                key(settings=CompileSettings(mode="max-autotune")), key(kernels="triton"),
                key(cfg=load_config("smoke", TINY + ["data.image_size=64"])),
                key(cfg=load_config("smoke", TINY + ["model.arch=resnet34"]))}) == 8


def test_cudnn_benchmark_decision():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    t = load_config("smoke").train
    assert t.cudnn_benchmark is True
    assert cudnn_benchmark_for(t, cuda) is True          # default on CUDA
    assert cudnn_benchmark_for(t, cpu) is False
    t = load_config("smoke", ["train.deterministic=true"]).train
    assert cudnn_benchmark_for(t, cuda) is False         # deterministic wins
    t = load_config("smoke", ["train.cudnn_benchmark=false"]).train
    assert cudnn_benchmark_for(t, cuda) is False


CHILD = r"""
import json, os, sys, torch, torchvision
from torch._dynamo.utils import counters
from densecl_fast.engines.compiling import CompileCache, CompileSettings
torch.manual_seed(0)
net = torch.nn.Sequential(torchvision.models.resnet.BasicBlock(8, 8), torch.nn.Conv2d(8, 4, 1))
net.compile(**CompileSettings().options())
cache = CompileCache("test", [sys.argv[2]])
info = cache.load() if sys.argv[1] == "load" else None
x = torch.randn(2, 8, 8, 8, requires_grad=True)
net(x).square().sum().backward()
written = cache.save() if sys.argv[1] == "save" else []
print(json.dumps({"loaded_from": cache.loaded_from, "written": written,
                  "loaded": None if info is None else {k: len(v) for k, v in info.artifacts.items()},
                  "counters": {k: dict(counters[k]) for k in ("inductor", "aot_autograd")}}))
"""


def _child(mode, folder, tmp_path, tag):
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor_{tag}"), "PYTHONPATH": ROOT,
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", CHILD, mode, str(folder)], capture_output=True, text=True,
                       timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow   # two inductor compiles in fresh processes: ~40 s on two idle cores, minutes on busy ones
def test_compile_artifacts_round_trip_to_a_fresh_process(tmp_path):
    folder = tmp_path / "artifacts"
    cold = _child("save", folder, tmp_path, "a")
    assert cold["written"] == [str(folder / "compile-test.bin")] and os.path.getsize(cold["written"][0]) > 0
    assert cold["counters"]["inductor"].get("fxgraph_cache_miss", 0) >= 2      # forward and backward
    assert cold["counters"]["inductor"].get("fxgraph_cache_hit", 0) == 0
    # A new process with an empty inductor cache of its own (as the first had: no hits there) loads the
    # artifacts and finds every graph in the cache.
    warm = _child("load", folder, tmp_path, "c")
    assert warm["loaded_from"] == str(folder / "compile-test.bin") and warm["loaded"]
    assert warm["counters"]["inductor"].get("fxgraph_cache_miss", 0) == 0
    assert (warm["counters"]["inductor"].get("fxgraph_cache_hit", 0)
            + warm["counters"]["aot_autograd"].get("autograd_cache_hit", 0)) >= 2


def test_a_damaged_cache_file_warns_and_compiles_cold(tmp_path):
    (tmp_path / "compile-k.bin").write_bytes(b"not a cache")
    warnings = []
    cache = CompileCache("k", [str(tmp_path)], warn=warnings.append)
    assert cache.load() is None and cache.loaded_from is None
    assert len(warnings) == 1 and "not loaded" in warnings[0]


@pytest.mark.slow   # two inductor compiles of resnet18 in subprocesses: minutes on two cores
def test_trainer_saves_the_artifacts_and_the_resumed_run_starts_warm(tmp_path, data_cache):
    from helpers import PRETRAIN, tiny
    out = tmp_path / "run"

    def pretrain(tag, *extra):
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor_{tag}"), "OMP_NUM_THREADS": "2"}
        r = subprocess.run([sys.executable, PRETRAIN, *tiny(str(out), data_cache, "train.compile=true", *extra)],
                           capture_output=True, text=True, timeout=1200, env=env, cwd=ROOT)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        return r.stdout

    first = pretrain("a", "optim.max_steps=1")
    assert "compile cache: loaded" not in first and "compile blocks (default)" in first
    saved = sorted(os.listdir(out / "checkpoints"))
    bins = [n for n in saved if n.startswith("compile-") and n.endswith(".bin")]
    assert len(bins) == 1 and os.path.exists(os.path.join(data_cache, "compile", bins[0]))
    again = pretrain("b", "optim.max_steps=2", "train.resume=auto")
    assert f"compile cache: loaded {out / 'checkpoints' / bins[0]}" in again
