"""DenseCL: the algorithm in one module (after moco/builder.py).

Query encoder = ResNet trunk (C5 map) + DenseCL neck; key encoder = its momentum copy.
Loss = (1 - λ) · global InfoNCE + λ · dense InfoNCE, both against a queue of negatives.
"""
from __future__ import annotations

import copy
import functools
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from . import kernels

from .bn import bn_relu, convert_to_group_bn, set_bn_groups
from .config import ModelConfig
from .stages import stage


class Bottleneck(torchvision.models.resnet.Bottleneck):
    """torchvision's Bottleneck with each BN that a ReLU follows called as one BN+ReLU op
    (bn.bn_relu: fused in grouped BN's kernels). Same submodules, so the same state_dict keys."""

    def forward(self, x):
        out = bn_relu(self.bn1, self.conv1(x))
        out = bn_relu(self.bn2, self.conv2(out))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        out += identity
        return self.relu(out)


class BasicBlock(torchvision.models.resnet.BasicBlock):
    """torchvision's BasicBlock with bn1 + ReLU as one op (see Bottleneck)."""

    def forward(self, x):
        out = bn_relu(self.bn1, self.conv1(x))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        out += identity
        return self.relu(out)


_FUSED_BLOCKS = {torchvision.models.resnet.Bottleneck: Bottleneck, torchvision.models.resnet.BasicBlock: BasicBlock}


class ResNetTrunk(nn.Module):
    """torchvision ResNet without avgpool/fc: image -> C5 map. Keeps torchvision's parameter
    names (conv1, bn1, layer1..4), so its state_dict loads into torchvision.models.<arch>.
    The residual blocks become the subclasses above (same modules, a forward that fuses BN+ReLU)."""

    def __init__(self, arch: str):
        super().__init__()
        net = getattr(torchvision.models, arch)(weights=None)  # Kaiming conv init, BN weight 1
        self.out_channels = net.fc.in_features
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                block.__class__ = _FUSED_BLOCKS[type(block)]  # forward only: modules and names unchanged

    def forward(self, x):
        x = self.maxpool(bn_relu(self.bn1, self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class DenseCLNeck(nn.Module):
    """C5 map -> (global N x D, dense N x D x S², pooled dense N x D); no BN, as in the paper."""

    def __init__(self, in_dim: int, hid_dim: int = 2048, out_dim: int = 128):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hid_dim), nn.ReLU(inplace=True), nn.Linear(hid_dim, out_dim))
        self.mlp2 = nn.Sequential(nn.Conv2d(in_dim, hid_dim, 1), nn.ReLU(inplace=True), nn.Conv2d(hid_dim, out_dim, 1))
        for m in self.modules():  # the reference necks use Kaiming init with zero bias
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, c5):
        x = self.mlp(c5.mean(dim=(2, 3)))
        grid = self.mlp2(c5)                   # N x D x S x S
        pooled = grid.mean(dim=(2, 3))         # pooled before normalisation, as the reference
        return x, grid.flatten(2), pooled


class Encoder(nn.Module):
    """Trunk + neck. Returns (C5 flattened N x C x S², global, dense grid, pooled)."""

    def __init__(self, backbone: nn.Module, neck: nn.Module):
        super().__init__()
        self.backbone, self.neck = backbone, neck

    def forward(self, x):
        c5 = self.backbone(x)
        g, grid, pooled = self.neck(c5)
        return c5.flatten(2), g, grid, pooled


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def concat_all_gather_many(*xs: torch.Tensor) -> tuple:
    """concat_all_gather of tensors that share their batch dimension, in one collective instead
    of one each: flattened side by side in their widest dtype (exact there and back), then split."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return xs
    dtype = functools.reduce(torch.promote_types, (x.dtype for x in xs))
    widths = [math.prod(x.shape[1:]) for x in xs]
    flat = concat_all_gather(torch.cat([x.reshape(x.shape[0], -1).to(dtype) for x in xs], dim=1))
    return tuple(p.reshape(-1, *x.shape[1:]).to(x.dtype) for p, x in zip(flat.split(widths, dim=1), xs))


class DenseCL(nn.Module):
    def __init__(self, cfg: ModelConfig):
        """cfg: the `model` section of a Config (`DenseCL(cfg.model)`)."""
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"DenseCL takes a ModelConfig (cfg.model), got {type(cfg).__name__}")
        self.cfg = cfg
        trunk = ResNetTrunk(cfg.arch)
        self.encoder_q = convert_to_group_bn(Encoder(trunk, DenseCLNeck(trunk.out_channels, cfg.hid_dim, cfg.out_dim)))
        self.encoder_k = copy.deepcopy(self.encoder_q)  # BN over groups of images: see bn.py for why
        self.encoder_k.requires_grad_(False)
        self.bn_group_size = cfg.bn_group_size
        self.momentum = cfg.momentum
        self.temperature = cfg.temperature
        self.loss_lambda = cfg.loss_lambda

        self.register_buffer("queue", F.normalize(torch.randn(cfg.out_dim, cfg.queue_len), dim=0))
        self.register_buffer("queue2", F.normalize(torch.randn(cfg.out_dim, cfg.queue_len), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        # "shuffle" | "sync" | "group": how BN sees the key batch on several ranks (see _key_forward).
        self.bn_mode = cfg.bn
        self._pairs = None
        self._shuffle_gen = None  # own RNG for the key shuffle: resumable, untouched by data loaders
        self.shuffle_seed = 0

    # Interface names other code relies on.
    backbone = property(lambda self: self.encoder_q.backbone)
    neck = property(lambda self: self.encoder_q.neck)
    backbone_k = property(lambda self: self.encoder_k.backbone)
    neck_k = property(lambda self: self.encoder_k.neck)

    def shuffle_generator(self, device) -> torch.Generator:
        if self._shuffle_gen is None or self._shuffle_gen.device != torch.device(device):
            self._shuffle_gen = torch.Generator(device=device)
            self._shuffle_gen.manual_seed(self.shuffle_seed)
        return self._shuffle_gen

    @torch.no_grad()
    def momentum_update(self):
        """k <- m·k + (1-m)·q over all parameters in one fused foreach op (buffers: BN stats stay the key's own)."""
        if self._pairs is None:
            qs = list(self.encoder_q.parameters())
            ks = list(self.encoder_k.parameters())
            self._pairs = (ks, qs)
        ks, qs = self._pairs
        torch._foreach_lerp_(ks, qs, 1.0 - self.momentum)

    def _apply(self, fn, *args, **kwargs):  # .to()/.cuda() replace parameters: drop cached lists
        self._pairs = None
        return super()._apply(fn, *args, **kwargs)

    def parameters_replaced(self) -> None:
        """Engines that swap parameter objects in place (FSDP2 shards them) call this, so the momentum
        update pairs the new (sharded) query and key parameters."""
        self._pairs = None

    @torch.no_grad()
    def _enqueue(self, k: torch.Tensor, k2: torch.Tensor):
        k, k2 = concat_all_gather_many(k, k2)
        n, K = k.shape[0], self.queue.shape[1]
        if K % n != 0:
            raise ValueError(f"queue length {K} must be a multiple of the global batch {n}")
        # Indices computed on the device: reading the pointer on the host would stall every step.
        idx = (self.queue_ptr + torch.arange(n, device=k.device)) % K
        self.queue.index_copy_(1, idx, k.T.to(self.queue.dtype))
        self.queue2.index_copy_(1, idx, k2.T.to(self.queue2.dtype))
        self.queue_ptr.copy_((self.queue_ptr + n) % K)

    def _bn_groups(self, n: int) -> int:
        """BN groups of a batch of n: 0 = plain BatchNorm2d over the batch (model.bn_group_size=0),
        otherwise the grouped-BN op's group count (1 when the batch is one group: the same op and
        arithmetic as the groups of a larger batch, so a rank of the recipe's shuffle-BN computes
        exactly what one process's grouped BN does)."""
        g = self.bn_group_size
        if g <= 0:
            return 0
        if not self.training or g >= n:
            return 1
        if n % g != 0:
            raise ValueError(f"batch {n} per process is not a multiple of model.bn_group_size={g}")
        return n // g

    @torch.no_grad()
    def _key_forward(self, im_k, groups: int):
        """The key encoder on a shuffled batch, outputs returned in the original order.

        The key batch is shuffled before (grouped) BN, so no key shares its BN statistics with the
        query of the same image: the loss cannot be lowered through batch statistics.
        One process: one permutation of the whole batch, grouped BN (bn.py).
        Several ranks with bn_mode "shuffle" (the recipe's shuffle-BN): the key images of all ranks
        are gathered, rank 0 draws one permutation of the global batch from its key-shuffle
        generator and broadcasts it, each rank forwards its slice of the permuted batch with its own
        (grouped) BN, the outputs are gathered and every rank takes back its own images. This is the
        one-process computation on the global batch with groups of the per-rank batch, slice by slice.
        """
        set_bn_groups(self.encoder_k, groups)
        n = im_k.shape[0]
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world > 1 and self.bn_mode == "shuffle" and self.training:
            rank = dist.get_rank()
            all_k = concat_all_gather(im_k)
            total = all_k.shape[0]
            if rank == 0:
                perm = torch.randperm(total, device=im_k.device, generator=self.shuffle_generator(im_k.device))
            else:
                perm = torch.empty(total, dtype=torch.long, device=im_k.device)
            dist.broadcast(perm, src=0)
            outs = self.encoder_k(all_k[perm.view(world, n)[rank]])
            mine = torch.argsort(perm).view(world, n)[rank]  # where this rank's images sit in the permuted batch
            return tuple(o[mine] for o in concat_all_gather_many(*outs))
        # One process, or per-rank grouped BN ("group"), or SyncBatchNorm ("sync").
        perm = (torch.randperm(n, device=im_k.device, generator=self.shuffle_generator(im_k.device))
                if groups > 1 else None)
        outs = self.encoder_k(im_k[perm] if perm is not None else im_k)
        if perm is None:
            return outs
        inv = torch.argsort(perm)
        return tuple(o[inv] for o in outs)

    def forward(self, im_q, im_k, loss_lambda: float | None = None):
        lam = self.loss_lambda if loss_lambda is None else loss_lambda
        n = im_q.shape[0]
        groups = self._bn_groups(n)

        with stage("query_forward"):
            set_bn_groups(self.encoder_q, groups)
            q_b, q, q_grid, _ = self.encoder_q(im_q)
            q = F.normalize(q, dim=1)
            q_grid = F.normalize(q_grid, dim=1)

        with torch.no_grad():
            with stage("momentum_update"):
                self.momentum_update()
            with stage("key_forward"):
                k_b, k, k_grid, k2 = self._key_forward(im_k, groups)
                k = F.normalize(k, dim=1)
                k_grid = F.normalize(k_grid, dim=1)
                k2 = F.normalize(k2, dim=1)

        # Clones: the queues are overwritten in place by the enqueue below, before backward.
        queue, queue2 = self.queue.clone(), self.queue2.clone()
        with stage("loss_global"):
            l_pos = (q * k.to(q.dtype)).sum(1)
            loss_single = kernels.queue_infonce(q, l_pos, queue, self.temperature)
        with stage("matching"):
            l_pos_dense, _ = kernels.dense_positive_logits(q_b, k_b, q_grid, k_grid.to(q_grid.dtype))
        with stage("loss_dense"):
            d = q_grid.shape[1]
            loss_dense = kernels.queue_infonce(q_grid.transpose(1, 2).reshape(-1, d), l_pos_dense.reshape(-1),
                                               queue2, self.temperature)
        loss = (1.0 - lam) * loss_single + lam * loss_dense

        if self.training:
            with stage("enqueue"):
                self._enqueue(k, k2)
        return {"loss": loss, "loss_single": loss_single, "loss_dense": loss_dense}
