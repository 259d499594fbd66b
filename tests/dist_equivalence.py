"""Run 3 DenseCL steps under one engine on fixed global batches; rank 0 saves losses and full state.

    python tests/dist_equivalence.py single OUT.pt                       # one process, grouped BN
    torchrun --nproc_per_node 2 tests/dist_equivalence.py ddp OUT.pt     # 2 ranks, model.bn=shuffle
    torchrun --nproc_per_node 2 tests/dist_equivalence.py ddp OUT.pt compile=aot_eager   # regions compiled

Used by tests/test_engines.py: a 2-rank shuffle-BN run must equal the 1-process grouped-BN run with
groups of the per-rank batch and the same permutation (rank 0's key-shuffle stream = the single
process's). Inputs are the same global batches, rank r taking rows [r*n, (r+1)*n).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from densecl_fast.config import load_config  # noqa: E402
from densecl_fast.distributed import init_distributed  # noqa: E402
from densecl_fast.engines import build_engine  # noqa: E402
from densecl_fast.engines.compiling import CompileSettings  # noqa: E402
from densecl_fast.model import DenseCL  # noqa: E402
from densecl_fast.engines import train_step  # noqa: E402

GLOBAL_BATCH, PER_RANK_GROUP, STEPS, LR = 8, 2, 3, 0.5


def full_state(model, engine) -> dict:
    if engine.name == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def main(engine_name: str, out_path: str, *overrides: str) -> None:
    """overrides: key=value config overrides; `compile=BACKEND` compiles the regions with that backend."""
    torch.set_num_threads(1)
    backend = [o.split("=", 1)[1] for o in overrides if o.startswith("compile=")]
    overrides = tuple(o for o in overrides if not o.startswith("compile="))
    cfg = load_config("smoke", [
        "model.arch=resnet18", "model.hid_dim=32", "model.out_dim=16", "model.queue_len=64",
        f"model.bn_group_size={PER_RANK_GROUP}", "model.momentum=0.9", f"optim.batch_size={GLOBAL_BATCH}",
        "train.device=cpu", "train.precision=fp32", f"train.engine={engine_name}", *overrides])
    info, device = init_distributed("cpu")
    engine = build_engine(cfg, info, device, "fp32")
    torch.manual_seed(0)
    model = DenseCL(cfg.model)
    model.shuffle_seed = 7  # rank 0's stream draws the cross-rank permutation
    engine.setup(model, cfg.optim, LR, compile=CompileSettings(backend=backend[0]) if backend else None)
    model.train()
    n = GLOBAL_BATCH // info.world_size
    rows = slice(info.rank * n, (info.rank + 1) * n)
    data = torch.Generator().manual_seed(123)
    losses = []
    for _ in range(STEPS):
        im_q = torch.randn(GLOBAL_BATCH, 3, 64, 64, generator=data)
        im_k = torch.randn(GLOBAL_BATCH, 3, 64, 64, generator=data)
        out = train_step(model, engine, im_q[rows], im_k[rows], LR, 0.5)
        loss = torch.stack([out["loss"], out["loss_single"], out["loss_dense"]]).detach()
        if dist.is_initialized() and dist.get_world_size() > 1:  # the global batch's mean loss
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        losses.append(loss)
    state = full_state(model, engine)
    if info.rank == 0:
        torch.save({"losses": torch.stack(losses), "state": state}, out_path)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
