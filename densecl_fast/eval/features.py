"""Frozen-trunk features: build the trunk, preprocess, extract once, cache on disk.

Preprocessing (all modes): resize the short side to `image_size` (bilinear, antialiased), center
crop `image_size`, ImageNet mean/std; grayscale and palette images become RGB first.

Feature names:
  pool5                  global average of C5 (k-NN, linear probe)
  svm_c2 .. svm_c5       C2..C5 average-pooled to a fixed grid and flattened, the grids of
                         OpenSelfSup's MultiPooling(pool_type="adaptive") (POOL_SIZES resnet50:
                         C2 6x6, C3 4x4, C4 3x3, C5 2x2 -> 9216/8192/9216/8192 dims for ResNet-50)
  map_c4, map_c5         the C4 / C5 maps themselves (dense probe), stored as float16

Cache: one .npy per (trunk identity, data fingerprint, split, image size, feature name) under
`cache_dir`, written atomically. The trunk identity of a file is its real path, size and mtime
(of a checkpoint folder: its files' total size and newest mtime; plus the encoder); of `random`
the arch, seed and torch version (the init depends on torch's RNG).
`EXTRACTED` counts extraction passes in this process (tests check a second run reuses the cache).
"""
from __future__ import annotations

import hashlib
import os
import sys
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from torch.utils.data import DataLoader, Dataset

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..model import ResNetTrunk
from ..weights import ARCHS, WeightsError, load_backbone_state

CACHE_VERSION = 1
SVM_POOL_GRID = {"c2": 6, "c3": 4, "c4": 3, "c5": 2}   # OpenSelfSup MultiPooling POOL_SIZES (resnet50)
FEATURE_NAMES = ("pool5", "svm_c2", "svm_c3", "svm_c4", "svm_c5", "map_c4", "map_c5")
EXTRACTED = {"passes": 0, "images": 0}


def eval_transform(image_size: int):
    return T.Compose([T.Resize(image_size, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
                      T.CenterCrop(image_size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def build_trunk(checkpoint: str, arch: Optional[str], seed: int, encoder: str = "query") -> Tuple[ResNetTrunk, str, str]:
    """-> (trunk in eval mode, arch, identity string). `checkpoint="random"`: the seeded random init."""
    if checkpoint == "random":
        if not arch:
            raise WeightsError("--checkpoint random needs --arch (resnet18/34/50/101)")
        if arch not in ARCHS:
            raise WeightsError(f"--arch {arch}: use one of {', '.join(ARCHS)}")
        torch.manual_seed(seed)
        trunk = ResNetTrunk(arch)
        ident = f"random:{arch}:{seed}:torch{torch.__version__}"
    else:
        path = os.path.abspath(os.path.expanduser(checkpoint))
        if not os.path.exists(path):  # a file, or an fsdp/deepspeed checkpoint folder (weights reads both)
            raise WeightsError(f"{checkpoint}: no such file or checkpoint folder")
        arch_found, state = load_backbone_state(path, encoder=encoder, arch=arch)
        trunk = ResNetTrunk(arch_found)
        missing, unexpected = trunk.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise WeightsError(f"{checkpoint}: trunk keys do not match (missing {missing[:3]}, unexpected {unexpected[:3]})")
        arch = arch_found
        ident = f"file:{os.path.realpath(path)}:{_stamp(path)}:{encoder}"
    return trunk.eval(), arch, ident


def _stamp(path: str) -> str:
    """Size and mtime of a file; of a checkpoint folder, of every file in it (a folder's own mtime
    does not change when a file in it is rewritten)."""
    real = os.path.realpath(path)
    files = [os.path.join(real, n) for n in sorted(os.listdir(real))] if os.path.isdir(real) else [real]
    sts = [os.stat(f) for f in files if os.path.isfile(f)]
    return f"{sum(st.st_size for st in sts)}:{max((st.st_mtime_ns for st in sts), default=0)}"


def stages(trunk: ResNetTrunk, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    x = trunk.maxpool(trunk.relu(trunk.bn1(trunk.conv1(x))))
    c2 = trunk.layer1(x)
    c3 = trunk.layer2(c2)
    c4 = trunk.layer3(c3)
    return {"c2": c2, "c3": c3, "c4": c4, "c5": trunk.layer4(c4)}


def features_from_stages(st: Dict[str, torch.Tensor], names: Iterable[str]) -> Dict[str, torch.Tensor]:
    out = {}
    for n in names:
        if n == "pool5":
            out[n] = st["c5"].float().mean(dim=(2, 3))
        elif n.startswith("svm_"):
            out[n] = F.adaptive_avg_pool2d(st[n[4:]].float(), SVM_POOL_GRID[n[4:]]).flatten(1)
        elif n.startswith("map_"):
            out[n] = st[n[4:]].float().half()
        else:
            raise ValueError(f"unknown feature {n!r}")
    return out


class _Images(Dataset):
    def __init__(self, split, image_size):
        self.split, self.tf = split, eval_transform(image_size)

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        return self.tf(self.split.load(i))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available")
    return torch.device(device)


@torch.no_grad()
def extract(trunk: ResNetTrunk, split, names: List[str], image_size: int, device: torch.device,
            batch_size: int = 64, workers: int = 0, progress: bool = True) -> Dict[str, np.ndarray]:
    """One pass over `split`: every requested feature, as numpy arrays in item order. On CUDA the
    forward runs in bf16 autocast with channels-last; on the CPU in fp32."""
    from tqdm import tqdm
    trunk = trunk.to(device).eval()
    cuda = device.type == "cuda"
    if cuda:
        trunk = trunk.to(memory_format=torch.channels_last)
    loader = DataLoader(_Images(split, image_size), batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=cuda)
    parts: Dict[str, list] = {n: [] for n in names}
    bar = tqdm(total=len(split), desc=f"features {split.name}", unit="img", disable=not progress, file=sys.stderr)
    for x in loader:
        x = x.to(device, non_blocking=True)
        if cuda:
            x = x.to(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            feats = features_from_stages(stages(trunk, x), names)
        for n, v in feats.items():
            parts[n].append(v.cpu().numpy())
        bar.update(len(x))
    bar.close()
    EXTRACTED["passes"] += 1
    EXTRACTED["images"] += len(split)
    return {n: np.concatenate(v) for n, v in parts.items()}


def cache_path(cache_dir: str, trunk_id: str, split, image_size: int, name: str) -> str:
    key = f"v{CACHE_VERSION}|{trunk_id}|{split.fingerprint()}|{split.name}|{len(split)}|{image_size}|{name}"
    digest = hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), f"{name}-{split.name}-{digest}.npy")


def _save_atomic(arr: np.ndarray, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


def get_features(trunk, trunk_id: str, split, names: List[str], *, image_size: int, device: torch.device,
                 cache_dir: Optional[str], batch_size: int = 64, workers: int = 0,
                 progress: bool = True) -> Tuple[Dict[str, np.ndarray], str]:
    """Features of `split` from the cache where present, else one extraction pass for the rest.
    -> (features, "cached" | "extracted")."""
    out, todo = {}, []
    for n in names:
        p = cache_path(cache_dir, trunk_id, split, image_size, n) if cache_dir else None
        if p and os.path.isfile(p):
            try:
                out[n] = np.load(p, allow_pickle=False)
                continue
            except (OSError, ValueError):
                pass  # a damaged cache file: extract again
        todo.append(n)
    if not todo:
        return out, "cached"
    new = extract(trunk, split, todo, image_size, device, batch_size, workers, progress)
    for n, v in new.items():
        if cache_dir:
            try:
                _save_atomic(v, cache_path(cache_dir, trunk_id, split, image_size, n))
            except OSError as e:
                print(f"warning: cannot write the feature cache under {cache_dir}: {e}", file=sys.stderr)
        out[n] = v
    return out, "extracted"
