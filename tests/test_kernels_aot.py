"""Every Triton kernel config the model may run compiles for sm_90 and sm_80 without a GPU,
with no register spill and within shared memory (perf/aot.py; the tables are perf/AOT_SM90.md),
for the strides and shapes the model really hands the kernels (recorded from a forward), under
each Triton the project runs on: the installed one (CI's, 3.8) and 3.6.0, the lent GPU machines'
(torch 2.11), whose register allocation differs (three sm_90 matching tiles spilled
under 3.6 only).

Runs `python -m perf.aot --json` in a subprocess: the compiler needs TRITON_INTERPRET unset,
which conftest.py sets for the other kernel tests on a machine without CUDA. Triton 3.6.0 lives
beside the test environment, not in it (pip install --target; only the subprocess puts it first
on PYTHONPATH): DENSECL_SIDE_TRITON names the folder (default <venv>/triton-3.6.0, where .ci/run
installs it); the fixture installs it there when it is missing and skips only when that install
fails, unless DENSECL_SIDE_TRITON_REQUIRED=1 (CI), where that is a failure.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from densecl_fast import kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDE_TRITON = "3.6.0"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not kernels.HAS_TRITON, reason="Triton is not importable")]


def side_triton_path() -> str:
    """The folder holding Triton SIDE_TRITON, installed there with pip --target when missing."""
    path = os.environ.get("DENSECL_SIDE_TRITON") or os.path.join(sys.prefix, f"triton-{SIDE_TRITON}")
    if os.path.isfile(os.path.join(path, "triton", "__init__.py")):
        return path
    tmp = f"{path}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", tmp,
                        f"triton=={SIDE_TRITON}"], capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        why = (f"Triton {SIDE_TRITON} (the lent GPU machines' version) could not be installed beside the test "
               f"environment in {path}: {(r.stderr.strip().splitlines() or ['pip failed'])[-1]}")
        if os.environ.get("DENSECL_SIDE_TRITON_REQUIRED") == "1":
            pytest.fail(why)
        pytest.skip(why)
    os.replace(tmp, path)   # whole or not at all: a cut install is not taken for a working one
    return path


def _start_table(pythonpath=None):
    """The table's process, its output in files (a pipe left unread while the other table runs could fill)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", "perf.aot", "--json"], cwd=ROOT, env=env,
                            stdout=out, stderr=err, text=True)
    return proc, out, err


@pytest.fixture(scope="module")
def tables():
    """Both tables compile at once, one process each (CI's two cores): {param: run or skip reason}."""
    runs = {"installed": _start_table()}
    try:
        try:
            runs[SIDE_TRITON] = _start_table(side_triton_path())
        except pytest.skip.Exception as e:
            runs[SIDE_TRITON] = str(e)
        yield runs
    finally:
        for run in runs.values():
            if not isinstance(run, str) and run[0].poll() is None:
                run[0].kill()
                run[0].wait()


@pytest.fixture(scope="module", params=["installed", SIDE_TRITON])
def rows(request, tables):
    run = tables[request.param]
    if isinstance(run, str):
        pytest.skip(run)
    proc, out, err = run
    proc.wait(timeout=1800)
    out.seek(0), err.seek(0)
    stdout, stderr = out.read(), err.read()
    assert stdout, stderr[-3000:]
    report = json.loads(stdout)
    import triton
    assert report["triton"] == (triton.__version__ if request.param == "installed" else SIDE_TRITON)
    from perf.aot import markdown
    print(f"Triton {report['triton']}\n" + markdown(report["rows"]))  # shown with pytest -s / on failure
    return report["rows"]


def test_every_config_compiles_without_spills_and_fits_shared_memory(rows):
    bad = [r for r in rows if not r["ok"]]
    assert not bad, "\n".join(f"{r['arch']} {r['kernel']} {r['dtype']} {r['config']}: "
                              f"{r.get('error') or (r['registers'], r['spill_stores'], r['spill_loads'], r['shared'])}"
                              for r in bad)


def test_the_table_covers_every_kernel_dtype_and_architecture(rows):
    seen = {(r["arch"], r["kernel"], r["dtype"]) for r in rows}
    for arch in ("sm_90", "sm_80"):
        for dtype in ("bf16", "fp16", "fp32"):
            assert (arch, "queue_infonce fwd", dtype) in seen
            assert (arch, "queue_infonce fwd (no grad)", dtype) in seen
        assert (arch, "queue_infonce combine", "fp32") in seen
        for layout in ("channels_last", "contiguous"):   # both train.channels_last settings
            for dtype in ("bf16", "fp16", "fp32"):
                assert (arch, f"dense matching ({layout})", dtype) in seen
            for dtype in ("bf16", "fp32"):
                for kernel in ("stats", "normalize", "bwd reduce", "bwd dx"):
                    assert (arch, f"group BN {kernel} ({layout})", dtype) in seen
        assert (arch, "group BN finalize", "fp32") in seen and (arch, "group BN bwd finalize", "fp32") in seen


def test_dense_matching_cases_use_the_strides_of_a_real_forward():
    """The layouts the table compiles the matching kernel for are recorded from a forward of the
    model on the CPU (a table on other strides than the model's hid its spills):
    channels-last C5 maps and grids flatten to (C·S², 1, C), contiguous ones to (C·S², S², 1)."""
    from perf import aot
    layouts = aot.recorded_match_layouts()
    assert layouts == {"channels_last": [(0, 2, 1)] * 4, "contiguous": [(0, 1, 2)] * 4}
    assert aot._strides_in_order((256, 2048, 49), (0, 2, 1)) == [2048 * 49, 1, 2048]


def test_a_spilling_config_is_caught():
    """The check itself: a tile known to spill (fp32 logits at 64 x 64 with 4 warps on sm_90,
    180-1,000 bytes of spill stores under tf32x3) is reported as not ok."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import torch, perf.aot as a, densecl_fast.kernels.queue_infonce_triton as qi\n"
            "f = torch.empty(1)\n"
            "c = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=128, EVEN_K=True, EVEN_D=True, UPCAST=False,"
            " DOT_PREC='tf32x3', GRAD_DOT_PREC='tf32x3', INTERPRET=False, WITH_GRAD=True)\n"
            "k = a._compile(qi._fwd_kernel, [f, f, f, f, f, 12544, 65536, 128, 16384, 128, 1, 65536, 1, 7.2],"
            " c, 4, 2, 90)\n"
            "print(a._ptxas_usage(k, 90)['spill_stores'])\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) > 0
