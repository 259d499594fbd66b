"""densecl_fast: fast, faithful DenseCL pretraining."""
import importlib.util as _util
import os as _os
import sys as _sys


def _kernels_from_source_tree():
    """The Triton kernels sit in the top-level kernels/ folder (the product's layout); setup.py
    installs that folder as densecl_fast.kernels, so our import never competes with the PyPI
    package called `kernels`. A source checkout that is imported without being installed (or that
    shadows a normal install, from the repository root) has no densecl_fast/kernels: load the
    sibling folder under the same name, so every way of running sees one `densecl_fast.kernels`."""
    if _util.find_spec(__name__ + ".kernels") is not None:
        return
    folder = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
    spec = _util.spec_from_file_location(__name__ + ".kernels", _os.path.join(folder, "__init__.py"),
                                         submodule_search_locations=[folder])
    if spec is None:
        raise ImportError(f"densecl_fast.kernels is not installed and {folder} is missing: pip install -e .")
    module = _util.module_from_spec(spec)
    _sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_kernels_from_source_tree()

from .config import Config, ConfigError, load_config  # noqa: E402
from .model import DenseCL, DenseCLNeck  # noqa: E402

__all__ = ["Config", "ConfigError", "DenseCL", "DenseCLNeck", "load_config"]
__version__ = "0.1.0"
