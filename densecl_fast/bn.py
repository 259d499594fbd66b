"""Batch normalisation over groups of images: the single-process stand-in for shuffle-BN.

The recipe trains on 8 GPUs x 32 images, each GPU normalising its own 32, and shuffles the key
batch across GPUs so that a query and its key never share BN statistics (otherwise the model
can find its positive through the statistics instead of the content). The original code needs
DDP for that and crashes or silently does nothing on one GPU.

Here every BatchNorm2d of both encoders becomes a `GroupBatchNorm2d`: in training it normalises
groups of `bn_group_size` consecutive images (32 by default, as one GPU of the recipe). The model
shuffles the key batch before its forward, so key groups mix images differently from query
groups, exactly as the cross-GPU shuffle does. In eval mode, or with `groups = 0`
(model.bn_group_size=0), it is a plain BatchNorm2d; the state_dict is always BatchNorm2d's, so
exported weights load into torchvision unchanged.
On several ranks the same layers normalise each rank's own slice of the cross-rank shuffled key
batch (`model.bn=shuffle`, the recipe) or of the per-rank shuffle (`group`); only `model.bn=sync`
replaces them by SyncBatchNorm (statistics of the global batch).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels


class GroupBatchNorm2d(nn.BatchNorm2d):
    groups: int = 1

    def forward(self, x, relu: bool = False):
        """BatchNorm2d over groups of images in training, + ReLU when `relu` (fused into the same
        op; the blocks of model.ResNetTrunk ask for it where torchvision applies a ReLU next)."""
        # One group still takes the op: a rank holding one group of the recipe's shuffle-BN then
        # computes what the same group does inside one process's larger batch.
        if not self.training or self.groups <= 0:
            y = super().forward(x)
            return F.relu(y, inplace=True) if relu else y
        # One op per layer, forward and backward (kernels/group_bn.py: Triton kernels on CUDA, one
        # PyTorch formulation on the CPU). It replaced one native_batch_norm per group and a
        # torch.cat of the groups: 8 launches and a copy of the activation per layer.
        weight, bias = self.weight, self.bias
        if not self.affine:
            weight = torch.ones(x.shape[1], device=x.device, dtype=torch.float32)
            bias = torch.zeros_like(weight)
        y, _, _, run_mean, run_var = kernels.group_batch_norm(x, weight, bias, self.groups, self.eps, relu)
        if self.track_running_stats:
            # Running stats as one BatchNorm2d per group would update them, averaged over the
            # groups: the mean of the group means, the mean of the unbiased group variances.
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                mom = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                torch._foreach_lerp_([self.running_mean, self.running_var],
                                     [run_mean.to(self.running_mean.dtype), run_var.to(self.running_var.dtype)], mom)
        return y


def bn_relu(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """relu(bn(x)): one fused op for a GroupBatchNorm2d, BN then an in-place ReLU for any other
    norm layer (a plain BatchNorm2d, the SyncBatchNorm of model.bn=sync)."""
    if isinstance(bn, GroupBatchNorm2d):
        return bn(x, relu=True)
    return F.relu(bn(x), inplace=True)


def convert_to_group_bn(module: nn.Module) -> nn.Module:
    """Swap every BatchNorm2d (in place) for a GroupBatchNorm2d holding the same tensors."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = GroupBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_to_group_bn(child)
    return module


def set_bn_groups(module: nn.Module, groups: int) -> None:
    for m in module.modules():
        if isinstance(m, GroupBatchNorm2d):
            m.groups = groups
