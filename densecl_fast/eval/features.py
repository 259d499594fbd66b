"""Frozen-trunk features: extracted once per (weights, split, image size, encoder), cached on disk.

The trunk runs in eval mode (BN with its running statistics, as downstream use sees it); on a GPU
in bf16 autocast and channels-last. Images: short side resized to `image_size`, centre crop,
ImageNet mean/std (the pretraining normalisation). Feature = global average pool of C5.
A cache entry is keyed by the weights file's absolute path, size and modification time (or the arch
and seed of a random trunk), the encoder, the split's name and length and the image size, so a
rewritten checkpoint or another split never reuses stale features.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..checkpoint import atomic_save
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..model import ResNetTrunk
from ..weights import load_backbone_state

extractions = 0  # trunk passes over a split in this process (tests check the cache with it)


def build_trunk(checkpoint: str, arch: Optional[str], encoder: str = "query",
                seed: int = 0) -> Tuple[ResNetTrunk, str, str]:
    """`checkpoint` = a weights file (any layout `weights.read_weights` takes) or 'random'.
    -> (trunk in eval mode, arch, an id of the weights for the feature cache)."""
    if checkpoint == "random":
        if not arch:
            raise ValueError("--checkpoint random needs --arch (resnet18/34/50/101)")
        torch.manual_seed(seed)
        return ResNetTrunk(arch).eval(), arch, f"random:{arch}:seed{seed}"
    arch, state = load_backbone_state(checkpoint, encoder=encoder, arch=arch)
    trunk = ResNetTrunk(arch)
    trunk.load_state_dict(state)
    st = os.stat(checkpoint)
    return trunk.eval(), arch, f"{os.path.abspath(checkpoint)}:{st.st_size}:{int(st.st_mtime_ns)}:{encoder}"


class _Images(Dataset):
    def __init__(self, split, image_size: int):
        self.split, self.size = split, image_size

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        img = TF.resize(self.split.get(i), self.size, antialias=True)
        img = TF.center_crop(img, [self.size, self.size])
        return TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)


@torch.no_grad()
def extract(trunk, split, image_size: int, device: torch.device, batch_size: int = 256,
            workers: int = 0, progress: bool = True) -> torch.Tensor:
    """-> float32 [N, C] pooled C5 features of every image of `split`, in order."""
    global extractions
    extractions += 1
    trunk = trunk.to(device).eval()
    cuda = device.type == "cuda"
    if cuda:
        trunk = trunk.to(memory_format=torch.channels_last)
    loader = DataLoader(_Images(split, image_size), batch_size=batch_size, num_workers=workers, pin_memory=cuda)
    out = []
    for x in tqdm(loader, desc=f"features {split.name}", unit="batch", disable=not progress, dynamic_ncols=True):
        x = x.to(device, non_blocking=True, memory_format=torch.channels_last if cuda else torch.contiguous_format)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            c5 = trunk(x)
        out.append(c5.float().mean(dim=(2, 3)).cpu())
    return torch.cat(out) if out else torch.zeros(0, trunk.out_channels)


def cached_features(trunk, weights_id: str, split, image_size: int, device: torch.device, cache_dir: str,
                    **kw) -> torch.Tensor:
    key = json.dumps({"weights": weights_id, "split": split.name, "n": len(split), "size": image_size, "v": 1})
    path = os.path.join(os.path.expanduser(cache_dir), hashlib.sha256(key.encode()).hexdigest()[:20] + ".pt")
    if os.path.isfile(path):
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            if entry.get("key") == key:
                return entry["features"]
        except Exception:  # a damaged cache entry is recomputed, never trusted
            pass
    feats = extract(trunk, split, image_size, device, **kw)
    atomic_save({"key": key, "features": feats}, path)
    return feats


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=1)
