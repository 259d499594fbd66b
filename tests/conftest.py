import os
import sys

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter when there is no GPU. The flag is
# read when a kernel is decorated, so it must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # On a GPU, take each kernel's first listed config instead of autotuning every test shape
    # (kernels/_common.first_config_only); every listed config is compile-checked by
    # tests/test_kernels_aot.py.
    os.environ.setdefault("DENSECL_AUTOTUNE", "0")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    """Where a test module's built-in data set is generated (once per module)."""
    return str(tmp_path_factory.mktemp("data_cache"))
