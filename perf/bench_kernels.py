"""Fused Triton loss kernels vs the eager reference vs the torch.compile'd reference.

    python -m perf.bench_kernels            # one table, all measured in this run (needs CUDA)
    python -m perf.bench_kernels --sweep-splits 1,2,3,4,6,8   # + the one-pass kernel per split count
    pytest perf/bench_cases.py -k kernel    # the same cases under pytest-benchmark; skipped without CUDA

Implementations: `fused` (the one-pass queue InfoNCE, kernels/queue_infonce_triton.py, and the
dense matching kernel), `recompute` (the earlier two-pass queue InfoNCE whose backward recomputes
the logits, kernels/queue_infonce_recompute_triton.py, kept for this comparison), `eager` (the
references of kernels/reference.py) and `compiled` (the same under torch.compile).

Cases (the shapes of DenseCL R50, batch 256, 224 px, queue 65,536, bf16):
    queue InfoNCE, dense:  M = 256 * 7 * 7 = 12,544 rows, K = 65,536, D = 128
    queue InfoNCE, global: M = 256
    dense matching:        N = 256, C = 2048, S^2 = 49 (C5 features bf16 channels_last, grids
                           fp32, as the model passes them under AMP)
Each is timed forward + backward (median of triton.testing.do_bench, L2 flushed between runs)
with its peak extra memory (allocator peak minus what the inputs already hold), plus the error of
the fused result against the eager one as a sanity check of the GPU path.
"""
import argparse
import sys

import torch

from densecl_fast import kernels

T = 0.2
INFONCE_CASES = {"dense": (12544, 65536, 128), "global": (256, 65536, 128)}
MATCH_CASE = (256, 2048, 49, 128)  # N, C, S^2, D
IMPLS = ("fused", "recompute", "eager", "compiled")
MATCH_IMPLS = ("fused", "eager", "compiled")

_compiled = {}


def _fn(op, impl):
    if impl == "fused":
        from densecl_fast.kernels import dense_match_triton, queue_infonce_triton
        return {"infonce": queue_infonce_triton.queue_infonce_triton,
                "match": dense_match_triton.dense_positive_logits_triton}[op]
    if impl == "recompute":
        from densecl_fast.kernels import queue_infonce_recompute_triton
        return queue_infonce_recompute_triton.queue_infonce_recompute_triton
    ref = {"infonce": kernels.queue_infonce_ref, "match": kernels.dense_positive_logits_ref}[op]
    if impl == "eager":
        return ref
    if op not in _compiled:
        _compiled[op] = torch.compile(ref, dynamic=False)
    return _compiled[op]


def infonce_inputs(case, dtype=torch.bfloat16, seed=0):
    M, K, D = INFONCE_CASES[case]
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(M, D, device="cuda", generator=g), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(D, K, device="cuda", generator=g), dim=0)
    l_pos = torch.rand(M, device="cuda", generator=g) * 2 - 1
    return q.to(dtype).requires_grad_(), l_pos.to(dtype).requires_grad_(), queue.to(dtype)


def match_inputs(seed=0):
    N, C, S2, D = MATCH_CASE
    g = torch.Generator(device="cuda").manual_seed(seed)
    side = int(round(S2 ** 0.5))

    def c5():
        # As the model hands them over: a channels_last C5 map flattened to N x C x S^2.
        x = torch.randn(N, C, side, side, device="cuda", generator=g).relu().bfloat16()
        return x.contiguous(memory_format=torch.channels_last).flatten(2)
    q_b, k_b = c5(), c5()
    q_grid = torch.nn.functional.normalize(torch.randn(N, D, S2, device="cuda", generator=g), dim=1)
    k_grid = torch.nn.functional.normalize(torch.randn(N, D, S2, device="cuda", generator=g), dim=1)
    return q_b, k_b, q_grid.requires_grad_(), k_grid


def infonce_step(impl, inputs):
    fn = _fn("infonce", impl)
    q, l_pos, queue = inputs

    def step():
        fn(q, l_pos, queue, T).backward()
    return step, [q, l_pos]


def match_step(impl, inputs):
    fn = _fn("match", impl)
    q_b, k_b, q_grid, k_grid = inputs

    def step():
        l_pos, _ = fn(q_b, k_b, q_grid, k_grid)
        l_pos.sum().backward()
    return step, [q_grid]


def measure(rows, name, impl, step, grads):
    """Append (name, impl, median ms, peak extra MiB), or (name, impl, error text, None)."""
    try:
        step()  # compile / autotune outside the timings
        rows.append((name, impl, median_ms(step, grads), peak_extra_mib(step, grads)))
    except Exception as e:  # noqa: BLE001 (reported in the table; the other rows still run)
        rows.append((name, impl, f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300], None))
        torch.cuda.empty_cache()


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


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def infonce_check(inputs, impl="fused"):
    """A fused implementation vs eager on the same inputs: loss, grad_q, grad_l_pos (relative to max)."""
    q, l_pos, queue = inputs
    out = []
    for impl in (impl, "eager"):
        qq, ll = q.detach().clone().requires_grad_(), l_pos.detach().clone().requires_grad_()
        loss = _fn("infonce", impl)(qq, ll, queue, T)
        loss.backward()
        out.append((loss, qq.grad, ll.grad))
    (a, ga, la), (b, gb, lb) = out
    return f"loss {rel_err(a, b):.1e} dq {rel_err(ga, gb):.1e} dl_pos {rel_err(la, lb):.1e}"


def match_check(inputs):
    q_b, k_b, q_grid, k_grid = inputs
    lf, idx_f = _fn("match", "fused")(q_b, k_b, q_grid, k_grid)
    le, idx_e = _fn("match", "eager")(q_b, k_b, q_grid, k_grid)
    same = (idx_f == idx_e).float().mean().item()
    return f"index agree {same * 100:.3f}% l_pos {rel_err(lf, le):.1e}"


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
    from densecl_fast.kernels import queue_infonce_triton as qi
    rows = []
    for case in INFONCE_CASES:
        M, K, D = INFONCE_CASES[case]
        n_split = qi.split_layout(M, K, D, dtype, torch.device("cuda"))[0]
        name = f"queue InfoNCE {case} M={M} K={K} D={D}"
        inputs = infonce_inputs(case, dtype)
        for impl in impls:
            measure(rows, name, impl, *infonce_step(impl, inputs))
        for impl, note in (("fused", f"; {n_split} splits"), ("recompute", " (recompute)")):
            try:
                rows.append((name, "check", infonce_check(inputs, impl) + note, None))
            except Exception as e:  # noqa: BLE001 (reported, the other cases still run)
                rows.append((name, "check", f"{impl} failed: {type(e).__name__}: {e}"[:300], None))
        if case == "dense" and args.sweep_splits:
            for n in [int(x) for x in args.sweep_splits.split(",") if x.strip()]:
                with qi.fixed_splits(n):
                    measure(rows, name, f"fused/{n}sp", *infonce_step("fused", inputs))
        del inputs
        torch.cuda.empty_cache()
    N, C, S2, D = MATCH_CASE
    name = f"dense matching N={N} C={C} S2={S2} D={D}"
    inputs = match_inputs()
    for impl in [i for i in impls if i in MATCH_IMPLS]:
        measure(rows, name, impl, *match_step(impl, inputs))
    rows.append((name, "check", match_check(inputs), None))

    print(f"{'case':<48} {'impl':<10} {'fwd+bwd ms':>11} {'peak extra MiB':>15}  vs eager")
    base = {name: ms for name, impl, ms, _ in rows if impl == "eager" and isinstance(ms, float)}
    for name, impl, ms, mib in rows:
        if impl == "check" or not isinstance(ms, float):
            print(f"{name:<48} {'error' if impl == 'check' else impl:<10} {'':>11} {'':>15}  {ms}")
            continue
        vs = f"{base[name] / ms:.2f}x" if name in base else "–"
        print(f"{name:<48} {impl:<10} {ms:>11.3f} {mib:>15.1f}  {vs}")
    for name in base:
        times = {impl: ms for n, impl, ms, _ in rows if n == name and impl in IMPLS and isinstance(ms, float)}
        if "fused" not in times:
            continue
        print(f"speed-up of fused over eager, {name}: {times['eager'] / times['fused']:.1f}x"
              + (f", over compiled: {times['compiled'] / times['fused']:.1f}x" if "compiled" in times else "")
              + (f", over recompute: {times['recompute'] / times['fused']:.2f}x" if "recompute" in times else ""))
    from densecl_fast.kernels import dense_match_triton, queue_infonce_recompute_triton, queue_infonce_triton
    for mod in (queue_infonce_triton, queue_infonce_recompute_triton, dense_match_triton):
        for kern in mod.AUTOTUNED_KERNELS:
            fn = kern
            while hasattr(fn, "fn"):   # the autotuner and heuristics wrap the jitted function
                fn = fn.fn
            print(f"autotuned {mod.__name__.split('.')[-1]}.{fn.__name__}: {getattr(kern, 'best_config', None)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
