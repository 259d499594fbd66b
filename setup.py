from setuptools import find_packages, setup

setup(
    name="densecl_fast",
    version="0.1.0",
    description="Fast, faithful DenseCL (Dense Contrastive Learning) pretraining",
    # The Triton kernels live in the top-level kernels/ folder (the product's layout) but install
    # as densecl_fast.kernels: a top-level `kernels` would clash with the PyPI package of that name.
    packages=find_packages(include=["densecl_fast", "densecl_fast.*"]) + ["densecl_fast.kernels"],
    package_dir={"densecl_fast.kernels": "kernels"},
    package_data={"densecl_fast": ["configs/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "omegaconf>=2.3",
        "tqdm",
        "numpy",
        "pillow",
        "tensorboard",
        "matplotlib",
        "scikit-learn",   # evaluation: the VOC07 SVM protocol
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130"],
        "deepspeed": ["deepspeed"],
        # `kernels` is the unrelated PyPI package whose name our kernels/ folder shares: the suite runs
        # beside it to show it changes nothing (tests/test_packaging.py).
        "dev": ["pytest", "pytest-benchmark", "pytest-timeout", "kernels"],
    },
)
