"""pytest-benchmark cases: pieces of the step, the kernels, the data (`pytest perf/ --benchmark-only`,
`-k step|kernel|data`; CUDA cases skip without a GPU). Each timed call ends in a synchronize;
`extra_info` has images/s (or TFLOP/s). Inputs and loaders: perf/bench_kernels.py, perf/bench_data.py.
"""
import os

import pytest
import torch

from densecl_fast import kernels
from densecl_fast.config import load_config, scaled_lr
from densecl_fast.data import dali_available
from densecl_fast.model import DenseCL
from densecl_fast.engines import train_step

from .bench_data import make_loader
from .bench_kernels import BN_CASES, BN_IMPLS, IMPLS, INFONCE_CASES, MATCH_IMPLS, bn_inputs, bn_step, infonce_inputs, \
    infonce_step, match_inputs, match_step, peak_extra_mib
from .jpegs import ensure_jpeg_folder
from .runner import build_model
from .sources import SyntheticSource

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")
needs_dali = pytest.mark.skipif(not dali_available(), reason="needs NVIDIA DALI")


def bench(benchmark, fn, rounds, per_call=None, key="images_per_s", warmup_rounds=2):
    """Time `fn` (synchronized) for `rounds`; extra_info[key] = per_call / mean round seconds."""
    def once():
        out = fn()
        if CUDA:
            torch.cuda.synchronize()
        return out
    out = benchmark.pedantic(once, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)
    if per_call is not None:
        benchmark.extra_info[key] = per_call / benchmark.stats.stats.mean
    return out


@pytest.fixture
def backend():
    """Select a kernels backend for one case; the previous one is restored."""
    previous = kernels.get_backend()
    yield kernels.set_backend
    kernels.set_backend(previous)


# ---- the training step ---------------------------------------------------------------------------

def step_case(preset, overrides, device, batch, precision, channels_last):
    cfg = load_config(preset, [f"optim.batch_size={batch}", *overrides])
    model, engine = build_model(cfg, device, precision, channels_last)
    x, y = SyntheticSource(batch, cfg.data.image_size, device, channels_last, seed=0).next()
    return lambda: train_step(model, engine, x, y, scaled_lr(cfg.optim, batch), cfg.model.loss_lambda)


def test_step_tiny_cpu(benchmark, backend):
    backend("reference")
    step = step_case("smoke", ["model.hid_dim=32", "model.out_dim=16", "model.queue_len=32", "data.image_size=32",
                               "model.bn_group_size=2"], torch.device("cpu"), 4, "fp32", False)
    bench(benchmark, step, rounds=5, per_call=4)


def test_step_momentum_update_resnet18_cpu(benchmark):
    bench(benchmark, DenseCL(load_config("smoke", []).model).momentum_update, rounds=10, warmup_rounds=1)


@needs_cuda
@pytest.mark.parametrize("batch,precision,channels_last,extra", [
    (256, "bf16", True, []),                                 # the recipe's step, bf16 + channels-last
    (32, "fp32", False, ["model.bn_group_size=0"]),          # the mmselfsup-style step
], ids=["r50_bf16_channels_last_b256", "r50_mmselfsup_style_fp32_b32"])
def test_step_cuda(benchmark, backend, batch, precision, channels_last, extra):
    backend("reference")
    step = step_case("densecl_r50_200e_in1k", extra, torch.device("cuda"), batch, precision, channels_last)
    bench(benchmark, step, rounds=10 if batch == 256 else 20, per_call=batch, warmup_rounds=3)


# ---- the loss kernels (shapes of DenseCL R50, batch 256; see perf/bench_kernels.py) ---------------

def kernel_case(benchmark, step, grads, rounds=20, warmup_rounds=3):
    def once():
        for t in grads:
            t.grad = None
        step()
    once()
    bench(benchmark, once, rounds=rounds, warmup_rounds=warmup_rounds)
    if grads[0].is_cuda:
        benchmark.extra_info["peak_extra_mib"] = peak_extra_mib(step, grads)


def test_kernel_queue_infonce_reference_cpu(benchmark):
    inputs = infonce_inputs((512, 4096, 128), torch.float32, "cpu")
    kernel_case(benchmark, *infonce_step("eager", inputs), rounds=5, warmup_rounds=1)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_kernel_dense_queue_cross_entropy_reference(benchmark, backend, dtype):
    """The dense loss alone at the recipe's size, eager reference: 256 x 7 x 7 = 12,544 queries x
    65,536 negatives x 128 (reference figure: 23.5 ms bf16 / 27.3 ms fp32)."""
    backend("reference")
    q, l_pos, queue = infonce_inputs("dense", dtype)
    kernel_case(benchmark, *infonce_step("eager", (q, l_pos.detach(), queue.float())))   # as recorded: fp32 queue


@needs_cuda
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(INFONCE_CASES))
def test_kernel_queue_infonce(benchmark, backend, case, impl):
    backend("triton")
    kernel_case(benchmark, *infonce_step(impl, infonce_inputs(case)))


@needs_cuda
@pytest.mark.parametrize("impl", MATCH_IMPLS)
def test_kernel_dense_matching(benchmark, backend, impl):
    backend("triton")
    kernel_case(benchmark, *match_step(impl, match_inputs()))


@needs_cuda
@pytest.mark.parametrize("impl", BN_IMPLS)
@pytest.mark.parametrize("case", list(BN_CASES))
def test_kernel_group_bn(benchmark, backend, case, impl):
    """Grouped BN + ReLU of one layer, forward + backward: the fused op against one native BN per
    group (what it replaced) and plain BatchNorm2d over the batch (perf/bench_kernels.py)."""
    backend("triton")
    kernel_case(benchmark, *bn_step(impl, bn_inputs(case)))


# ---- the two-view data pipeline ------------------------------------------------------------------

@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    return ensure_jpeg_folder(str(tmp_path_factory.mktemp("bench")), 64, 160, 120)["path"]


def data_case(benchmark, folder, data_backend, device, tmp_path, batch=16, image_size=64, dtype=torch.float32):
    """Whole epochs of the library's loader; the first (build, workers, page cache) is not timed."""
    loader = make_loader(folder, data_backend, batch, device, image_size, min(2, os.cpu_count() or 1),
                         tmp_path / "cache", dtype=dtype)
    epochs = iter(range(1_000_000))

    def epoch():
        loader.set_epoch(next(epochs))
        return sum(q.shape[0] for q, _ in loader)
    n = bench(benchmark, epoch, rounds=3, per_call=len(loader) * batch, warmup_rounds=1)
    benchmark.extra_info["images_per_epoch"] = n
    assert n == len(loader) * batch


def test_data_torch_cpu(benchmark, jpeg_folder, tmp_path):
    data_case(benchmark, jpeg_folder, "torch", "cpu", tmp_path)


@pytest.mark.dali
@needs_dali
def test_data_dali_cpu(benchmark, jpeg_folder, tmp_path):
    data_case(benchmark, jpeg_folder, "dali", "cpu", tmp_path)


@pytest.mark.dali
@needs_dali
@needs_cuda
def test_data_dali_cuda(benchmark, jpeg_folder, tmp_path):
    data_case(benchmark, jpeg_folder, "dali", "cuda", tmp_path, batch=32, image_size=224, dtype=torch.bfloat16)
