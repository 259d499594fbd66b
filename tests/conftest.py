import atexit
import os
import shutil
import sys
import tempfile

import pytest
import torch

# Subprocesses (torchrun above all, which makes a /tmp/torchelastic_* folder per launch and never
# removes it) get a temp folder of their own that goes with the session. This process keeps the
# system one (cached by the first gettempdir), so pytest's tmp_path folders stay where they were.
tempfile.gettempdir()
_SUBPROCESS_TMP = tempfile.mkdtemp(prefix="densecl-tests-")
os.environ["TMPDIR"] = _SUBPROCESS_TMP
atexit.register(shutil.rmtree, _SUBPROCESS_TMP, True)
# The compile-artifact signing key (densecl_fast/signing.py) of the tests and their subprocesses: one
# per session, never the user's own key in ~/.config.
os.environ["DENSECL_SIGNING_KEY"] = os.path.join(_SUBPROCESS_TMP, "signing-key")

# Triton kernels run on CPU tensors through the interpreter when there is no GPU. The flag is
# read when a kernel is decorated, so it must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # On a GPU, take each kernel's first listed config instead of autotuning every test shape
    # (kernels/_common.tiles_to_try); every listed config is compile-checked by
    # tests/test_kernels_aot.py.
    os.environ.setdefault("DENSECL_AUTOTUNE", "0")

def _interpreter_numpy_problem():
    """Triton 3.6's interpreter crashes on numpy >= 2.4 in the kernels' range() loops (3.8 is fine):
    say so once instead of failing every kernel test with a numpy traceback."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        import numpy
        import triton
    except ImportError:
        return None
    tv = tuple(int(x) for x in triton.__version__.split(".")[:2])
    nv = tuple(int(x) for x in numpy.__version__.split(".")[:2])
    if tv < (3, 7) and nv >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter does not work with numpy {numpy.__version__}: "
                "pip install 'numpy<2.4' (or Triton >= 3.7) to run the kernel tests on the CPU")
    return None


_problem = _interpreter_numpy_problem()
if _problem:
    pytest.exit(_problem, returncode=2)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    """Where a test module's built-in data set is generated (once per module)."""
    return str(tmp_path_factory.mktemp("data_cache"))


# What an in-process one-rank run (FSDP, DCP, DeepSpeed: distributed.ensure_process_group) leaves in
# os.environ for the rest of the session. Children that later tests start inherit it: MASTER_PORT
# names the port this process's group still listens on (a child's own group then fails with
# EADDRINUSE), and RANK makes a child believe it runs under torchrun.
_LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_SESSION_LAUNCH_ENV = {k: os.environ.get(k) for k in _LAUNCH_ENV}


def _restore_launch_env():
    for k, v in _SESSION_LAUNCH_ENV.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def _launch_env_as_the_session_began():
    """Before each test (module-scoped fixtures may have run a one-rank group since) and after it."""
    _restore_launch_env()
    yield
    _restore_launch_env()
