"""Batch normalisation over groups of images: the single-process stand-in for shuffle-BN.

The recipe trains on 8 GPUs x 32 images, each GPU normalising its own 32, and shuffles the key
batch across GPUs so that a query and its key never share BN statistics (otherwise the model
can find its positive through the statistics instead of the content). The original code needs
DDP for that and crashes or silently does nothing on one GPU.

Here every BatchNorm2d of both encoders becomes a `GroupBatchNorm2d`: in training it normalises
groups of `bn_group_size` consecutive images (32 by default, as one GPU of the recipe). The model
shuffles the key batch before its forward, so key groups mix images differently from query
groups, exactly as the cross-GPU shuffle does. In eval mode, or with one group, it is a plain
BatchNorm2d with the same state_dict, so exported weights load into torchvision unchanged.
On several ranks the same layers normalise each rank's own slice of the cross-rank shuffled key
batch (`model.bn=shuffle`, the recipe) or of the per-rank shuffle (`group`); only `model.bn=sync`
replaces them by SyncBatchNorm (statistics of the global batch).
"""
import torch
import torch.nn as nn


class GroupBatchNorm2d(nn.BatchNorm2d):
    groups: int = 1

    def forward(self, x):
        if not self.training or self.groups <= 1:
            return super().forward(x)
        # One fused batch-norm kernel per group (consecutive images: a contiguous slice of the
        # batch in either memory format), without running stats; the running stats are then
        # updated once from the groups' saved statistics. Written as mean/var over a 5-D view
        # in fp32 elementwise ops instead, the eager bf16 step ran at half the speed on an H200
        # (814 against 1,639 images/s, 53.5 against 27.1 GiB; perf/RESULTS.md, 2026-12-04).
        outs, means, invstds = [], [], []
        for xg in x.chunk(self.groups):
            y, mean, invstd = torch.native_batch_norm(xg, self.weight, self.bias, None, None, True, 0.0, self.eps)
            outs.append(y)
            means.append(mean)
            invstds.append(invstd)
        if self.track_running_stats:
            with torch.no_grad():
                mean, invstd = torch.stack(means), torch.stack(invstds)
                var = invstd.float().pow(-2) - self.eps  # biased variance of each group
                m = x.numel() // (self.groups * x.shape[1])
                self.num_batches_tracked.add_(1)
                mom = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.float().mean(0).to(self.running_mean.dtype), mom)
                unbiased = var.mean(0) * (m / max(m - 1, 1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), mom)
        return torch.cat(outs)


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
