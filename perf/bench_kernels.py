"""Fused Triton loss kernels vs the eager and the torch.compile'd reference (CUDA), forward +
backward at the shapes of DenseCL R50 (batch 256, 224 px, queue 65,536, bf16); also the kernel
harness of perf/bench_cases.py (inputs, steps, median ms, peak MiB beyond the inputs).

    python -m perf.bench_kernels            # one table, all measured in this run
    python -m perf.bench_kernels --sweep-splits 1,2,3,4,6,8   # + the one-pass kernel per split count
    pytest perf/bench_cases.py -k kernel    # the same cases under pytest-benchmark

Grouped BN (+ ReLU, one layer at R50 sizes, groups of 32 of 256 images, bf16 channels-last):
`fused` is the densecl::group_batch_norm op (Triton), `per_group` one native batch norm per group +
torch.cat + ReLU (the implementation it replaced), `plain` BatchNorm2d over the whole batch + ReLU
(what a user without shuffle-BN runs; the goal is fused within 5% of it).

`fused`: the one-pass queue InfoNCE and the dense matching kernel; `eager`: kernels/reference.py;
`compiled`: the same under torch.compile. (The two-pass queue InfoNCE that recomputed the logits in
its backward was deleted after losing by 1.58x on an H200: perf/RESULTS.md keeps its figures.)
Times are medians of triton.testing.do_bench (L2 flushed);
"check" rows give the error of a kernel against eager on the same inputs.
"""
import argparse
import sys

import torch
import torch.nn.functional as F

from densecl_fast import kernels

T = 0.2
INFONCE_CASES = {"dense": (12544, 65536, 128), "global": (256, 65536, 128)}   # M (256 or 256*7*7), K, D
MATCH_CASE = (256, 2048, 49, 128)  # N, C, S^2, D: C5 bf16 channels_last, grids fp32, as under AMP
IMPLS = ("fused", "eager", "compiled")
MATCH_IMPLS = ("fused", "eager", "compiled")
BN_CASES = {"stem 64x112x112": (256, 64, 112, 112), "layer1 256x56x56": (256, 256, 56, 56),
            "layer4 2048x7x7": (256, 2048, 7, 7)}   # N, C, H, W
BN_GROUPS = 8
BN_IMPLS = ("fused", "per_group", "plain")
_compiled = {}


def _fn(op, impl):
    if impl == "fused":
        from densecl_fast.kernels import dense_match_triton, queue_infonce_triton
        return {"infonce": queue_infonce_triton.queue_infonce_triton,
                "match": dense_match_triton.dense_positive_logits_triton}[op]
    ref = {"infonce": kernels.queue_infonce_ref, "match": kernels.dense_positive_logits_ref}[op]
    if impl == "eager":
        return ref
    if op not in _compiled:
        _compiled[op] = torch.compile(ref, dynamic=False)
    return _compiled[op]


def infonce_inputs(case, dtype=torch.bfloat16, device="cuda", seed=0):
    """(q, l_pos, queue) of a case name or an (M, K, D) shape; q and l_pos take gradients."""
    M, K, D = INFONCE_CASES.get(case, case)
    g = torch.Generator(device=device).manual_seed(seed)
    q = F.normalize(torch.randn(M, D, device=device, generator=g), dim=1)
    queue = F.normalize(torch.randn(D, K, device=device, generator=g), dim=0)
    l_pos = torch.rand(M, device=device, generator=g) * 2 - 1
    return q.to(dtype).requires_grad_(), l_pos.to(dtype).requires_grad_(), queue.to(dtype)


def match_inputs(seed=0):
    N, C, S2, D = MATCH_CASE
    g = torch.Generator(device="cuda").manual_seed(seed)
    side = int(round(S2 ** 0.5))

    def c5():   # as the model hands them over: a channels_last C5 map flattened to N x C x S^2
        x = torch.randn(N, C, side, side, device="cuda", generator=g).relu().bfloat16()
        return x.contiguous(memory_format=torch.channels_last).flatten(2)

    def grid():
        return F.normalize(torch.randn(N, D, S2, device="cuda", generator=g), dim=1)
    return c5(), c5(), grid().requires_grad_(), grid()


def bn_inputs(case, dtype=torch.bfloat16, device="cuda", seed=0):
    """(x channels-last, weight, bias, output gradient) of a BN_CASES name or an (N, C, H, W) shape."""
    N, C, H, W = BN_CASES.get(case, case)
    g = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(N, C, H, W, device=device, generator=g) * 2 + 0.5).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    w = (torch.rand(C, device=device, generator=g) + 0.5).requires_grad_()
    b = torch.randn(C, device=device, generator=g).requires_grad_()
    gy = torch.randn(N, C, H, W, device=device, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    return x, w, b, gy


def bn_forward(impl, x, w, b):
    from densecl_fast.kernels import reference
    if impl == "fused":
        return kernels.group_batch_norm(x, w, b, BN_GROUPS, 1e-5, True)[0]
    if impl == "per_group":
        return F.relu(reference.group_batch_norm_ref(x, w, b, BN_GROUPS, 1e-5)[0])
    return F.relu(F.batch_norm(x, None, None, w, b, True))


def bn_step(impl, inputs):
    x, w, b, gy = inputs
    return lambda: bn_forward(impl, x, w, b).backward(gy), [x, w, b]


def bn_check(inputs):
    """fused vs per_group on the same inputs: y, dx, dweight (relative to max)."""
    x, w, b, gy = inputs
    out = []
    for impl in ("fused", "per_group"):
        xx, ww, bb = (t.detach().clone().requires_grad_() for t in (x, w, b))
        y = bn_forward(impl, xx, ww, bb)
        y.backward(gy)
        out.append((y, xx.grad, ww.grad))
    (y1, dx1, dw1), (y2, dx2, dw2) = out
    return f"y {rel_err(y1, y2):.1e} dx {rel_err(dx1, dx2):.1e} dweight {rel_err(dw1, dw2):.1e}"


def infonce_step(impl, inputs):
    """(fwd+bwd callable, tensors whose .grad it fills)."""
    fn, (q, l_pos, queue) = _fn("infonce", impl), inputs
    return lambda: fn(q, l_pos, queue, T).backward(), [q, l_pos]


def match_step(impl, inputs):
    fn = _fn("match", impl)
    return lambda: fn(*inputs)[0].sum().backward(), [inputs[2]]


def median_ms(step, grads):
    import triton.testing
    return triton.testing.do_bench(step, warmup=25, rep=200, grad_to_none=grads, return_mode="median")


def peak_extra_mib(step, grads):
    for t in grads:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def timed(step, grads):
    step()  # compile / autotune outside the timings
    return median_ms(step, grads), peak_extra_mib(step, grads)


HEADER = f"{'case':<48} {'impl':<10} {'fwd+bwd ms':>11} {'peak extra MiB':>15}"


def row_text(name, impl, ms, mib, ratio=""):
    if isinstance(ms, float):
        return f"{name:<48} {impl:<10} {ms:>11.3f} {mib:>15.1f}  {ratio}".rstrip()
    return f"{name:<48} {'error' if impl == 'check' else impl:<10} {'':>11} {'':>15}  {ms}"


def attempt(rows, name, impl, fn):
    """Append (name, impl, *fn()), or (name, impl, error text, None): the other rows still run.
    The row is printed at once: a run cut by its time limit keeps what it measured."""
    try:
        rows.append((name, impl, *fn()))
    except Exception as e:  # noqa: BLE001 -- reported in the table
        rows.append((name, impl, f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:300], None))
        torch.cuda.empty_cache()
    print(row_text(*rows[-1]), flush=True)


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def infonce_check(inputs, impl="fused"):
    """An implementation vs eager on the same inputs: loss, grad_q, grad_l_pos (relative to max)."""
    q, l_pos, queue = inputs
    out = []
    for i in (impl, "eager"):
        qq, ll = q.detach().clone().requires_grad_(), l_pos.detach().clone().requires_grad_()
        loss = _fn("infonce", i)(qq, ll, queue, T)
        loss.backward()
        out.append((loss, qq.grad, ll.grad))
    (a, ga, la), (b, gb, lb) = out
    return f"loss {rel_err(a, b):.1e} dq {rel_err(ga, gb):.1e} dl_pos {rel_err(la, lb):.1e}"


def match_check(inputs):
    (lf, i_f), (le, i_e) = (_fn("match", i)(*inputs) for i in ("fused", "eager"))
    return f"index agree {(i_f == i_e).float().mean().item() * 100:.3f}% l_pos {rel_err(lf, le):.1e}"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m perf.bench_kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd reference")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="queue InfoNCE input dtype")
    parser.add_argument("--sweep-splits", default="", help="comma-separated split counts to time the one-pass "
                        "kernel with (dense case), next to the count the heuristic picks")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: CUDA is not available on this machine: nothing measured, no GPU numbers. "
              "Run it on a GPU machine (correctness on CPU: pytest tests/test_kernels.py).")
        return 0
    kernels.set_backend("triton")
    impls = [i for i in IMPLS if not (args.no_compile and i == "compiled")]
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"triton {__import__('triton').__version__}  queue InfoNCE in {args.dtype}")
    from densecl_fast.kernels import dense_match_triton
    from densecl_fast.kernels import queue_infonce_triton as qi
    rows = []
    print("rows as they are measured (the table with the ratios follows at the end):\n" + HEADER, flush=True)
    for case, (M, K, D) in INFONCE_CASES.items():
        n_split = qi.split_layout(M, K, D, dtype, torch.device("cuda"))[0]
        name = f"queue InfoNCE {case} M={M} K={K} D={D}"
        inputs = infonce_inputs(case, dtype)
        for impl in impls:
            attempt(rows, name, impl, lambda: timed(*infonce_step(impl, inputs)))
        attempt(rows, name, "check", lambda: (infonce_check(inputs) + f"; {n_split} splits", None))
        for n in ([int(x) for x in args.sweep_splits.split(",") if x.strip()] if case == "dense" else []):
            with qi.fixed_splits(n):
                attempt(rows, name, f"fused/{n}sp", lambda: timed(*infonce_step("fused", inputs)))
        del inputs
        torch.cuda.empty_cache()
    N, C, S2, D = MATCH_CASE
    name = f"dense matching N={N} C={C} S2={S2} D={D}"
    inputs = match_inputs()
    for impl in [i for i in impls if i in MATCH_IMPLS]:
        attempt(rows, name, impl, lambda: timed(*match_step(impl, inputs)))
    attempt(rows, name, "check", lambda: (match_check(inputs), None))
    del inputs
    for case in BN_CASES:
        name = f"group BN+ReLU {case} G={BN_GROUPS}"
        inputs = bn_inputs(case)
        for impl in BN_IMPLS:
            attempt(rows, name, impl, lambda: timed(*bn_step(impl, inputs)))
        attempt(rows, name, "check", lambda: (bn_check(inputs), None))
        del inputs
        torch.cuda.empty_cache()

    print(f"\n{HEADER}  vs eager / per_group")
    # Baseline per case: eager for the loss pieces; the per-group native BN it replaced for BN.
    base = {name: ms for name, impl, ms, _ in rows if impl in ("eager", "per_group") and isinstance(ms, float)}
    for name, impl, ms, mib in rows:
        print(row_text(name, impl, ms, mib, (f"{base[name] / ms:.2f}x" if name in base else "–")
                       if isinstance(ms, float) else ""))
    for name in base:
        t = {impl: ms for n, impl, ms, _ in rows if n == name and impl != "check" and isinstance(ms, float)}
        if "fused" in t and "per_group" in t:
            print(f"grouped BN, {name}: fused {t['per_group'] / t['fused']:.2f}x per_group"
                  + (f", {t['plain'] / t['fused']:.2f}x plain BatchNorm2d" if "plain" in t else ""))
        elif "fused" in t:
            print(f"speed-up of fused over eager, {name}: {t['eager'] / t['fused']:.1f}x"
                  + (f", over compiled: {t['compiled'] / t['fused']:.1f}x" if "compiled" in t else ""))
    for mod in (qi, dense_match_triton):
        for kern in mod.AUTOTUNED_KERNELS:
            fn = kern
            while hasattr(fn, "fn"):   # the autotuner and heuristics wrap the jitted function
                fn = fn.fn
            print(f"autotuned {mod.__name__.split('.')[-1]}.{fn.__name__}: {getattr(kern, 'best_config', None)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
