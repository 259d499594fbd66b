"""Facts about the machine and the checkout that a results.json records next to its figures."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import socket
import subprocess

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _version(*dists):
    for d in dists:
        try:
            return importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


def _run(*cmd):
    """stdout of a command, '' where it is missing or fails (no git, no nvidia-smi: the record lacks it)."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return names[0] if names else platform.machine()


def environment(device: torch.device) -> dict:
    commit = _run("git", "-C", REPO, "rev-parse", "HEAD")
    env = {
        "host": socket.gethostname(), "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "torchvision": _version("torchvision"), "triton": _version("triton"),
        "dali": _version("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110"),
        "cuda_runtime": torch.version.cuda, "cpu": cpu_model(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else f"CPU: {cpu_model()} ({torch.get_num_threads()} threads)"),
        "flags": {"cudnn.benchmark": torch.backends.cudnn.benchmark,
                  "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                  "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                  "float32_matmul_precision": torch.get_float32_matmul_precision(),
                  "DENSECL_KERNELS": os.environ.get("DENSECL_KERNELS")},
        "commit": commit or None,
        "dirty": bool(_run("git", "-C", REPO, "status", "--porcelain", "--untracked-files=no")) if commit else None,
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update({"cudnn": torch.backends.cudnn.version(), "gpu_memory_gib": p.total_memory / 2**30,
                    "sm_count": p.multi_processor_count, "capability": f"{p.major}.{p.minor}",
                    "driver": (_run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
                               .splitlines() or [None])[0]})
    return env


def process_peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
