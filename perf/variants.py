"""The variants `python -m perf` runs (no torch import: --list-variants stays fast)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class Variant:
    name: str
    title: str
    precision: str = "bf16"          # fp32 | bf16 (autocast)
    channels_last: bool = True
    compile: bool = False            # torch.compile the two encoders, as train.compile=true does
    compile_mode: Optional[str] = None   # None: --compile-mode (train.compile_mode)
    fused: bool = False              # fused Triton loss kernels (kernels.set_backend("triton"))
    data: str = "synthetic"          # synthetic (tensors already on the device) | torch | dali
    batch: Optional[int] = None      # None: the config's optim.batch_size
    bn_group_size: Optional[int] = None  # None: the config's model.bn_group_size
    cuda_only: bool = False
    inherit: bool = False            # model settings of the fastest model-only variant at the config batch
                                     # and the config's bn_group_size (the recipe's BN, never a baseline's)


def default_variants(baseline_batch: int = 32) -> list:
    V = Variant
    return [
        V("mmselfsup_fp32_b32", f"mmselfsup-style step: eager fp32, NCHW, batch {baseline_batch} per GPU (the seed's "
          "8x32 recipe, per card), BN over the whole per-GPU batch",
          precision="fp32", channels_last=False, batch=baseline_batch, bn_group_size=0),
        V("eager_fp32", "eager fp32, NCHW, config batch", precision="fp32", channels_last=False),
        V("eager_bf16_cl", "eager, bf16 autocast + channels-last"),
        V("eager_plain_bn", "what a user writes instead: eager, bf16 + channels-last, ordinary BatchNorm over the "
          "whole batch (bn_group_size 0), reference kernels", bn_group_size=0),
        V("eager_bf16_cl_fused", "eager, bf16 + channels-last + fused Triton loss kernels", fused=True, cuda_only=True),
        V("compiled_plain_bn", "what a user writes instead, compiled: torch.compile, bf16 + channels-last, ordinary "
          "BatchNorm over the whole batch (bn_group_size 0), reference kernels", compile=True, bn_group_size=0),
        V("compiled", "torch.compile'd encoders, bf16 + channels-last, reference kernels (the compiled eager step)",
          compile=True),
        V("compiled_fused", "torch.compile'd encoders, bf16 + channels-last + fused Triton loss kernels",
          compile=True, fused=True, cuda_only=True),
        V("compiled_fused_cudagraphs", "compiled_fused with mode=reduce-overhead (CUDA graphs on the compiled "
          "regions)", compile=True, compile_mode="reduce-overhead", fused=True, cuda_only=True),
        V("e2e_torchvision", "end to end: fastest model-only setting of this run, fed by the torchvision loader "
          "over JPEG files", data="torch", inherit=True),
        V("e2e_dali", "end to end: fastest model-only setting of this run, fed by the DALI loader over JPEG files "
          "(GPU decoding on CUDA; DALI's CPU graph on the CPU)", data="dali", inherit=True),
    ]

