"""Grouped batch norm as one op (kernels/group_bn.py) against one BatchNorm per group.

The Triton kernels run through the interpreter on CPU tensors (TRITON_INTERPRET=1, conftest.py),
the CPU path (kernels/reference.group_batch_norm_aten: ATen's batch norm per group into one output) directly. Ground truth is
kernels/reference.group_batch_norm_ref (one native_batch_norm per group, as GroupBatchNorm2d ran
before) and its autograd, plus the float64 formulas. Errors are relative to the largest entry.
"""
import copy
import importlib

import pytest
import torch
import torch.nn as nn
import torchvision

from densecl_fast import kernels
from densecl_fast.bn import GroupBatchNorm2d, bn_relu, convert_to_group_bn, set_bn_groups
from densecl_fast.kernels import dispatch, reference

TRITON = kernels.HAS_TRITON and importlib.import_module("densecl_fast.kernels._common").can_run_on(
    torch.device("cuda" if torch.cuda.is_available() else "cpu"))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not TRITON, reason="Triton kernels cannot run here (no CUDA, no interpreter)")
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


@pytest.fixture(autouse=True)
def _isolated_backend(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(dispatch, "_configured", dispatch._configured)
    monkeypatch.setattr(dispatch, "_backend", dispatch._backend)
    yield


def rel_err(actual, expected):
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def make_inputs(N=6, C=5, H=7, W=3, dtype=torch.float32, fmt=torch.contiguous_format, seed=0, mean=1.0, std=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, C, H, W, generator=g, dtype=torch.float64) * std + mean).to(dtype)
    wdt = torch.float64 if dtype == torch.float64 else torch.float32   # fp32 weights under autocast
    w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(wdt)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(wdt)
    dy = torch.randn(N, C, H, W, generator=g, dtype=torch.float64).to(dtype)
    return (x.to(DEVICE).contiguous(memory_format=fmt), w.to(DEVICE), b.to(DEVICE),
            dy.to(DEVICE).contiguous(memory_format=fmt))


def run(fn, x, w, b, dy, groups, relu):
    """Outputs of fn(x, w, b, groups, eps, relu) and the gradients of <y, dy> to x, w, b."""
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    out = fn(x, w, b, groups, 1e-5, relu)
    (out[0].double() * dy.double()).sum().backward()
    return [o.detach() for o in out], [x.grad, w.grad, b.grad]


def op(x, w, b, groups, eps, relu):
    return kernels.group_batch_norm(x, w, b, groups, eps, relu)


# Tolerances relative to the scale of each result. fp32: a few ulps of fp32 sums over ~40 values;
# bf16: outputs and dx rounded to bf16 (2^-8 relative), the statistics and dweight / dbias in fp32.
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (8e-3, 1e-5)}   # (y and dx, statistics and dw / db)


def check_against_per_group_bn(backend, fmt, dtype, groups, relu, shape=(6, 5, 7, 3)):
    kernels.set_backend(backend)
    x, w, b, dy = make_inputs(*shape, dtype=dtype, fmt=fmt, seed=groups + 10 * relu)
    out, grads = run(op, x, w, b, dy, groups, relu)
    ref_out, ref_grads = run(reference.group_batch_norm_ref, x, w, b, dy, groups, relu)
    tol_y, tol_stat = TOL[dtype]
    y, mean, invstd, run_mean, run_var = out
    assert y.dtype == dtype and y.shape == x.shape and y.stride() == x.stride()   # the input's layout
    assert rel_err(y, ref_out[0]) < tol_y
    for a, e in zip((mean, invstd, run_mean, run_var), ref_out[1:]):
        assert a.dtype == torch.float32 and a.shape == e.shape
        assert rel_err(a, e) < tol_stat
    assert grads[0].dtype == dtype and grads[0].stride() == x.stride()
    assert rel_err(grads[0], ref_grads[0]) < tol_y
    for a, e in zip(grads[1:], ref_grads[1:]):
        assert a.dtype == torch.float32 and rel_err(a, e) < 10 * tol_stat
    if relu:
        assert (y >= 0).all() and (y == 0).any()


@needs_triton
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn_relu"])
@pytest.mark.parametrize("groups", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", list(FORMATS), ids=str)
def test_triton_matches_per_group_batch_norm(fmt, dtype, groups, relu):
    """Odd C (5) and H·W (21): tails in both tile dimensions of either layout; several programs
    per group (the interpreter's tiles are small), so the partial statistics are merged."""
    check_against_per_group_bn("triton", FORMATS[fmt], dtype, groups, relu)


@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn_relu"])
@pytest.mark.parametrize("groups", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", list(FORMATS), ids=str)
def test_cpu_path_matches_per_group_batch_norm(fmt, dtype, groups, relu):
    if DEVICE != "cpu":
        pytest.skip("ATen per group into one output is the CPU path")
    check_against_per_group_bn("reference", FORMATS[fmt], dtype, groups, relu)


@needs_triton
@pytest.mark.parametrize("shape", [(4, 70, 3, 3), (2, 3, 20, 9), (10, 1, 1, 1), (10, 33, 1, 1)], ids=str)
def test_triton_tiles_and_tails(shape):
    """Many channel blocks (70 channels), many position tiles (180 positions), C = 1 and
    H·W = 1 (a map that is both contiguous and channels-last)."""
    for fmt in FORMATS.values():
        check_against_per_group_bn("triton", fmt, torch.float32, 2, True, shape=shape)


@pytest.mark.parametrize("impl", ["triton", "aten"])
@pytest.mark.parametrize("fmt", list(FORMATS), ids=str)
def test_float64_formulas(impl, fmt):
    """fp64 through the kernels (fp64 accumulation) and the CPU path: the formulas
    themselves, to rounding, against per-group native batch norm in fp64."""
    if impl == "triton" and not TRITON:
        pytest.skip("Triton kernels cannot run here")
    if impl == "aten" and DEVICE != "cpu":
        pytest.skip("ATen per group into one output is the CPU path")
    kernels.set_backend("triton" if impl == "triton" else "reference")
    x, w, b, dy = make_inputs(6, 5, 7, 3, dtype=torch.float64, fmt=FORMATS[fmt])
    for relu in (False, True):
        out, grads = run(op, x, w, b, dy, 3, relu)
        ref_out, ref_grads = run(reference.group_batch_norm_ref, x, w, b, dy, 3, relu)
        for a, e in zip(out + grads, ref_out + ref_grads):
            assert a.dtype == torch.float64 and rel_err(a, e) < 1e-12


@needs_triton
def test_bf16_statistics_survive_a_large_mean():
    """Mean 200, std 1 in bf16 (values ~1 ulp = 1 apart): E[x²] - E[x]² in fp32 would lose the
    variance; the tile-centred merge keeps it at fp32 accuracy against float64 on the same
    bf16 values."""
    kernels.set_backend("triton")
    x, w, b, _ = make_inputs(8, 6, 9, 5, dtype=torch.bfloat16, fmt=torch.channels_last, mean=200.0, std=4.0)
    _, mean, invstd, _, run_var = kernels.group_batch_norm(x, w, b, 2, 0.0, False)
    x64 = x.double().view(2, 4, 6, 9, 5)
    var64 = x64.var(dim=(1, 3, 4), unbiased=False)
    assert rel_err(mean, x64.mean(dim=(1, 3, 4))) < 1e-6
    assert rel_err(invstd, var64.rsqrt()) < 1e-5
    m = 4 * 45
    assert rel_err(run_var, (var64 * m / (m - 1)).mean(0)) < 1e-5


@needs_triton
def test_relu_mask_is_taken_from_the_output():
    """Values exactly at the ReLU's kink get no gradient, as F.relu's backward gives them."""
    kernels.set_backend("triton")
    x = torch.tensor([[-1.0, 1.0], [1.0, -1.0]], device=DEVICE).view(2, 1, 2, 1).repeat(1, 3, 1, 2)
    w, b = torch.ones(3, device=DEVICE), torch.zeros(3, device=DEVICE)
    x[:, 2] = 5.0   # a constant channel: normalised to exactly 0
    dy = torch.ones_like(x)
    out, grads = run(op, x, w, b, dy, 1, True)
    ref_out, ref_grads = run(reference.group_batch_norm_ref, x, w, b, dy, 1, True)
    assert (out[0][:, 2] == 0).all()
    torch.testing.assert_close(out[0], ref_out[0])
    for a, e in zip(grads, ref_grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ the module


def per_group_modules(gbn, groups):
    refs = [nn.BatchNorm2d(gbn.num_features, gbn.eps, gbn.momentum).to(DEVICE) for _ in range(groups)]
    for r in refs:
        r.load_state_dict(gbn.state_dict())
    return refs


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_running_stats_and_eval(backend, momentum):
    """Running mean / var are the average over groups of what one BatchNorm2d per group would
    hold (for the default momentum and the cumulative average), num_batches_tracked counts
    steps; eval mode is a plain BatchNorm2d with the same state_dict."""
    if backend == "triton" and not TRITON:
        pytest.skip("Triton kernels cannot run here")
    kernels.set_backend(backend)
    gbn = GroupBatchNorm2d(5, momentum=momentum).to(DEVICE)
    gbn.groups = 3
    refs = per_group_modules(gbn, 3)
    for step in range(2):
        x = make_inputs(6, 5, 4, 3, seed=step, fmt=torch.channels_last)[0]
        y = gbn(x, relu=step == 1)
        exp = torch.cat([r(xg) for r, xg in zip(refs, x.chunk(3))])
        torch.testing.assert_close(y, exp.relu() if step == 1 else exp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gbn.running_mean, torch.stack([r.running_mean for r in refs]).mean(0))
    torch.testing.assert_close(gbn.running_var, torch.stack([r.running_var for r in refs]).mean(0))
    assert gbn.num_batches_tracked.item() == 2 == refs[0].num_batches_tracked.item()
    gbn.eval()
    plain = nn.BatchNorm2d(5).to(DEVICE).eval()
    plain.load_state_dict(gbn.state_dict())
    torch.testing.assert_close(gbn(x), plain(x))
    torch.testing.assert_close(gbn(x, relu=True), plain(x).relu())


class _PerGroupBN(nn.BatchNorm2d):
    """The pre-fusion GroupBatchNorm2d: one native batch norm per group (the test's ground truth)."""
    groups = 1

    def forward(self, x):
        return reference.group_batch_norm_ref(x, self.weight, self.bias, self.groups, self.eps)[0]


@pytest.mark.parametrize("block", ["Bottleneck", "BasicBlock"])
def test_fused_blocks_equal_torchvision_blocks(block):
    """The trunk's blocks (BN+ReLU as one op) compute torchvision's block with per-group BN,
    forward and backward, and keep its state_dict keys."""
    from densecl_fast.model import _FUSED_BLOCKS
    tv = getattr(torchvision.models.resnet, block)
    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(8, 4 * tv.expansion, 1, stride=2, bias=False), nn.BatchNorm2d(4 * tv.expansion))
    ref = tv(8, 4, stride=2, downsample=down).to(DEVICE)
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    fused = convert_to_group_bn(copy.deepcopy(ref))
    fused.__class__ = _FUSED_BLOCKS[tv]
    set_bn_groups(fused, 2)
    for name, m in list(ref.named_modules()):
        if isinstance(m, nn.BatchNorm2d):
            new = _PerGroupBN(m.num_features).to(DEVICE)
            new.load_state_dict(m.state_dict())
            new.groups = 2
            parent = ref.get_submodule(name.rpartition(".")[0]) if "." in name else ref
            setattr(parent, name.rpartition(".")[2], new)
    assert list(fused.state_dict()) == list(tv(8, 4, stride=2, downsample=copy.deepcopy(down)).state_dict())
    x = torch.randn(4, 8, 6, 5, device=DEVICE).contiguous(memory_format=torch.channels_last)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    outs = [fused(xs[0]), ref(xs[1])]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for o in outs:
        (o * torch.arange(o.numel(), device=DEVICE).view_as(o).sin()).sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-4, atol=1e-5)
    for (n, p), q in zip(fused.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_bn_relu_on_plain_norm_layers():
    """Where the model's BN layers are not grouped (SyncBatchNorm, a plain BatchNorm2d copy),
    bn_relu is BN then ReLU."""
    bn = nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(bn_relu(bn, x), torch.relu(nn.functional.batch_norm(
        x, None, None, bn.weight, bn.bias, True)))


# ------------------------------------------------------------------------ op registration, compile, profile


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_opcheck(backend):
    if backend == "triton" and not TRITON:
        pytest.skip("Triton kernels cannot run here")
    kernels.set_backend(backend)
    for fmt in FORMATS.values():
        x, w, b, dy = make_inputs(4, 3, 3, 5, fmt=fmt)
        for relu in (False, True):
            torch.library.opcheck(torch.ops.densecl.group_batch_norm.default,
                                  (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), 2, 1e-5, relu))


def test_compiled_block_has_no_graph_break():
    """torch.compile(fullgraph=True) of a residual block, as regional compilation compiles it: the
    grouped BN stays one op (forward and backward) and the numbers equal eager."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from densecl_fast.model import ResNetTrunk
    torch._dynamo.reset()
    trunk = convert_to_group_bn(ResNetTrunk("resnet18")).to(DEVICE)
    set_bn_groups(trunk, 2)
    block = trunk.layer2[0]
    graphs = {"fw": [], "bw": []}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind].extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
            return make_boxed_func(gm.forward)
        return compiler

    compiled = torch.compile(block, fullgraph=True, backend=aot_autograd(fw_compiler=keep("fw"),
                                                                         bw_compiler=keep("bw")))
    x = torch.randn(4, 64, 8, 8, device=DEVICE).contiguous(memory_format=torch.channels_last)
    eager = copy.deepcopy(block)
    outs = [m(t) for m, t in ((compiled, x.clone().requires_grad_()), (eager, x.clone().requires_grad_()))]
    torch.testing.assert_close(outs[0], outs[1])
    for o in outs:
        o.sum().backward()
    for p, q in zip(block.parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(block.bn1.running_var, eager.bn1.running_var)
    n_bn = sum(isinstance(m, GroupBatchNorm2d) for m in block.modules())
    assert graphs["fw"].count("densecl.group_batch_norm.default") == n_bn == 3
    assert graphs["bw"].count("densecl.group_batch_norm_backward.default") == n_bn
    assert not [t for t in graphs["fw"] + graphs["bw"] if "batch_norm" in t and "densecl" not in t]
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_training_step_profile_has_one_bn_op_per_layer_and_no_cat(backend):
    """One training step of a tiny DenseCL (resnet18, 32 px, groups of 2, as the smoke preset):
    inside every GroupBatchNorm2d call exactly one densecl::group_batch_norm and no aten::cat; one
    backward op per query-encoder BN layer. With the Triton kernels (the GPU's path, here in the
    interpreter) nothing else normalises inside the op: no native_batch_norm, batch_norm or chunk.
    On the CPU path the op loops ATen's batch norm over the groups into one output."""
    if backend == "triton" and not TRITON:
        pytest.skip("Triton kernels cannot run here")
    kernels.set_backend(backend)
    from torch.profiler import ProfilerActivity, profile, record_function

    from densecl_fast.config import load_config
    from densecl_fast.model import DenseCL
    cfg = load_config("smoke", ["model.hid_dim=32", "model.out_dim=16", "model.queue_len=32",
                                "model.bn_group_size=2", "data.image_size=32"])
    model = DenseCL(cfg.model).to(DEVICE)
    bns = [m for m in model.modules() if isinstance(m, GroupBatchNorm2d)]
    ranges = {}

    def enter(module, args):
        ranges[module] = record_function("GroupBatchNorm2d")
        ranges[module].__enter__()

    def leave(module, args, out):
        ranges.pop(module).__exit__(None, None, None)
    for m in bns:
        m.register_forward_pre_hook(enter)
        m.register_forward_hook(leave)
    x = torch.randn(2, 4, 3, 32, 32, device=DEVICE)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x[0], x[1])["loss"].backward()
    events = prof.events()
    bn_ranges = [e for e in events if e.name == "GroupBatchNorm2d"]
    assert len(bn_ranges) == len(bns)          # every BN layer of both encoders ran once

    def descendants(e):
        for c in e.cpu_children:
            yield c
            yield from descendants(c)
    for r in bn_ranges:
        names = [d.name for d in descendants(r)]
        assert names.count("densecl::group_batch_norm") == 1, names
        assert "aten::cat" not in names, names
        if backend == "triton":
            assert not {"aten::native_batch_norm", "aten::batch_norm", "aten::_batch_norm_impl_index",
                        "aten::chunk"} & set(names), names
    names = [e.name for e in events]
    assert names.count("densecl::group_batch_norm") == len(bns)
    assert names.count("densecl::group_batch_norm_backward") == len(bns) // 2   # query encoder only
    if backend == "triton":
        assert not [n for n in names if "native_batch_norm" in n]
