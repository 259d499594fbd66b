"""Micro-benchmarks of the DenseCL training step (pytest-benchmark).

    pytest perf/bench_step.py --benchmark-only        # CUDA cases are skipped without a GPU

Each CUDA case synchronizes inside the timed call, so a round is the device time of the work plus
launch. `extra_info` carries images/s (or TFLOP/s) derived from the mean round. The whole-suite
numbers (variants, stages, MFU, projection) come from perf/profile.py; these are the quick,
repeatable pieces: the step at the two reference settings, the dense queue cross-entropy, the
momentum update and the card's matmul ceiling.
"""
import copy

import pytest
import torch

from densecl_fast import kernels
from densecl_fast.config import load_config
from densecl_fast.model import DenseCL
from densecl_fast.engines.single import SingleEngine
from densecl_fast.trainer import train_step

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _reference_kernels():
    if hasattr(kernels, "set_backend"):
        kernels.set_backend("reference")


def _step_case(preset, overrides, device, batch, precision, channels_last, bn_group_size=None):
    cfg = load_config(preset, overrides)
    cfg = copy.deepcopy(cfg)
    cfg.optim.batch_size = batch
    if bn_group_size is not None:
        cfg.model.bn_group_size = bn_group_size
    torch.manual_seed(0)
    model = DenseCL(cfg.model).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    engine = SingleEngine(device, precision)  # the trainer's one-process engine: optimizer, autocast, step
    engine.setup(model, cfg.optim, cfg.optim.lr * batch / 256)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    size = cfg.data.image_size
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)

    def step():
        train_step(model, engine, x, y, 0.03, cfg.model.loss_lambda)
        _sync()
    return step


def _per_second(benchmark, amount, key):
    mean = benchmark.stats.stats.mean
    benchmark.extra_info[key] = amount / mean if mean else None


# ---- CPU -----------------------------------------------------------------------------------------

def test_train_step_tiny_cpu(benchmark):
    _reference_kernels()
    step = _step_case("smoke", ["model.hid_dim=32", "model.out_dim=16", "model.queue_len=32", "data.image_size=32"],
                      torch.device("cpu"), batch=4, precision="fp32", channels_last=False, bn_group_size=2)
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=2)
    _per_second(benchmark, 4, "images_per_s")


def test_momentum_update_resnet18_cpu(benchmark):
    cfg = load_config("smoke", [])
    model = DenseCL(cfg.model)
    benchmark.pedantic(model.momentum_update, rounds=10, iterations=1, warmup_rounds=1)


def test_queue_infonce_reference_cpu(benchmark):
    q = torch.nn.functional.normalize(torch.randn(512, 128), dim=1).requires_grad_()
    queue = torch.nn.functional.normalize(torch.randn(128, 4096), dim=0)
    l_pos = (q * torch.randn(512, 128)).sum(1)

    def fwd_bwd():
        loss = kernels.queue_infonce_ref(q, l_pos.detach(), queue, 0.2)
        loss.backward()
    benchmark.pedantic(fwd_bwd, rounds=5, iterations=1, warmup_rounds=1)


# ---- CUDA ----------------------------------------------------------------------------------------

@needs_cuda
def test_train_step_r50_bf16_channels_last_b256(benchmark):
    _reference_kernels()
    step = _step_case("densecl_r50_200e_in1k", [], torch.device("cuda"), batch=256, precision="bf16",
                      channels_last=True)
    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=3)
    _per_second(benchmark, 256, "images_per_s")


@needs_cuda
def test_train_step_r50_mmselfsup_style_fp32_b32(benchmark):
    _reference_kernels()
    step = _step_case("densecl_r50_200e_in1k", [], torch.device("cuda"), batch=32, precision="fp32",
                      channels_last=False, bn_group_size=0)
    benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=3)
    _per_second(benchmark, 32, "images_per_s")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_dense_queue_cross_entropy_fwd_bwd_reference(benchmark, dtype):
    """The dense loss alone at the recipe's size, eager reference: 256 x 7 x 7 = 12,544 queries x
    65,536 negatives x 128 (reference figure: 23.5 ms bf16 / 27.3 ms fp32). The fused kernel at the
    same size is in perf/bench_kernels.py."""
    _reference_kernels()
    torch.cuda.reset_peak_memory_stats()
    m, k, d = 12544, 65536, 128
    dev = torch.device("cuda")
    q = torch.nn.functional.normalize(torch.randn(m, d, device=dev), dim=1).to(dtype).requires_grad_()
    queue = torch.nn.functional.normalize(torch.randn(d, k, device=dev), dim=0)
    l_pos = (q.detach().float() * torch.randn(m, d, device=dev)).sum(1).to(dtype)

    def fwd_bwd():
        loss = kernels.queue_infonce_ref(q, l_pos, queue, 0.2)
        loss.backward()
        q.grad = None
        _sync()
    base = torch.cuda.memory_allocated()
    benchmark.pedantic(fwd_bwd, rounds=20, iterations=1, warmup_rounds=3)
    benchmark.extra_info["extra_memory_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30


@needs_cuda
def test_matmul_bf16_ceiling(benchmark):
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty_like(a)

    def mm():
        for _ in range(10):
            torch.matmul(a, b, out=c)
        _sync()
    benchmark.pedantic(mm, rounds=10, iterations=1, warmup_rounds=2)
    _per_second(benchmark, 10 * 2 * n ** 3 / 1e12, "tflops")
