# The metadata lives in pyproject.toml. Only the package list is here: it is computed, and it maps
# the top-level kernels/ folder (the product's layout) to densecl_fast.kernels, since a top-level
# `kernels` would clash with the PyPI package of that name (pyproject.toml cannot list found
# packages and a renamed one together). The two data folders are listed as packages of their own:
# setuptools warns about an importable folder that is not in the list ("Package would be ignored").
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["densecl_fast", "densecl_fast.*"])
    + ["densecl_fast.configs", "densecl_fast.engines.ds_configs", "densecl_fast.kernels"],
    package_dir={"densecl_fast.kernels": "kernels"},
)
