"""Checkpoints: atomic writes, keep-last-N, safe loading.

    files.py    names, checksums, atomic writes, keep-last-N, writing a file checkpoint
    reading.py  reading any checkpoint safely (structure, checksum), its kind and config
    dcp.py      torch.distributed.checkpoint folders (fsdp), read through an allow-list
    rng.py      the RNG states a checkpoint carries

Formats (one per engine family, named by the suffix): `ckpt_<step>.pt`, one file (single, ddp);
`ckpt_<step>.dcp/`, a torch.distributed.checkpoint folder (fsdp); `ckpt_<step>.ds/`, a DeepSpeed
checkpoint folder (deepspeed; its file names are engines/deepspeed.py's). A folder holds `meta.pt`:
the same step/RNG/config entries as a file checkpoint, checksummed, so the trainer reads any
checkpoint's position before building a model. The run directory they live in (its lock, the
resume point) is run_dir.py's.
"""
from .dcp import dcp_error, dcp_exception, dcp_loader, read_dcp_metadata
from .files import (CheckpointError, CheckpointWriteError, atomic_save, checkpoint_dir, checkpoint_kind,
                    checkpoint_step, checksum, commit_dir, final_dir_for, first_line, io_error_text,
                    list_checkpoints, prune, remove_path, remove_stale_temps, save_checkpoint, temp_dir_for,
                    write_meta)
from .reading import KINDS, check_kind, load_checkpoint, read_checkpoint_meta, saved_config
from .rng import rng_state, set_rng_state

__all__ = ["CheckpointError", "CheckpointWriteError", "KINDS", "atomic_save", "check_kind", "checkpoint_dir",
           "checkpoint_kind", "checkpoint_step", "checksum", "commit_dir", "dcp_error", "dcp_exception",
           "dcp_loader", "final_dir_for", "first_line", "io_error_text", "list_checkpoints", "load_checkpoint",
           "prune", "read_checkpoint_meta", "read_dcp_metadata", "remove_path", "remove_stale_temps",
           "rng_state", "save_checkpoint", "saved_config", "set_rng_state", "temp_dir_for", "write_meta"]
