"""Reading a checkpoint safely: a file checkpoint whole, a folder's meta.pt, its kind and config.

A checkpoint holds everything a run needs to continue as if it never stopped: both encoders,
both queues and their pointer (a resumed run must not restart with random negatives), the
optimizer and grad scaler, step/epoch/position in the epoch, RNG states and the config.
Everything is read with torch.load(weights_only=True) and checked (structure, checksum); a folder's
engine files are read by its engine (engines/), a .dcp folder's metadata through dcp.py's allow-list.
"""
from __future__ import annotations

import os
import pickle
import re
import warnings

import torch

from .dcp import read_dcp_metadata
from .files import CheckpointError, FORMAT_VERSION, META_NAME, checkpoint_kind, checksum, io_error_text, refusal_detail

REQUIRED_KEYS = ("model", "optimizer", "scaler", "step", "rngs", "shuffle_rng", "config")
META_REQUIRED_KEYS = ("step", "rngs", "shuffle_rng", "config")
KINDS = {"pt": "train.engine=single or ddp", "dcp": "train.engine=fsdp", "ds": "train.engine=deepspeed"}


def check_kind(path: str, kind: str, engine: str) -> None:
    """A checkpoint of another engine's format is a one-line error naming the engine that reads it."""
    found = checkpoint_kind(path)
    if found != kind:
        hint = f"resume with {KINDS[found]}" if found in KINDS else "not a checkpoint written by densecl_fast"
        raise CheckpointError(f"checkpoint {path} was written in the {found!r} format, which {engine} does not "
                              f"read ({KINDS.get(kind, kind)} writes {kind!r}); {hint}, or start a new run in "
                              f"another train.out_dir")


def read_checkpoint_meta(path: str) -> dict:
    """What the trainer needs before it builds a model (step, RNGs, config, ...), for any format:
    the whole file of a file checkpoint, meta.pt of a folder one. One-line CheckpointError otherwise."""
    if not os.path.isdir(path):
        return load_checkpoint(path)
    meta_path = os.path.join(path, META_NAME)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"checkpoint {path} is incomplete: it has no {META_NAME} (the write was "
                              f"interrupted, or it is not a densecl_fast checkpoint)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meta = torch.load(meta_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {meta_path}: {io_error_text(e)}") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path} is not a densecl_fast checkpoint's meta.pt")
    missing = [k for k in META_REQUIRED_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: its {META_NAME} has no "
                              f"{', '.join(repr(k) for k in missing)}")
    if checksum(meta) != meta.get("checksum"):
        raise CheckpointError(f"checkpoint {path} is corrupt: {META_NAME} does not match its checksum")
    if checkpoint_kind(path) == "dcp":  # every reader of a .dcp folder comes here first (resume, export, init_from, eval)
        read_dcp_metadata(path)
    return meta


def load_checkpoint(path: str, verify: bool = True) -> dict:
    """Read a checkpoint safely (weights_only=True), check its structure and its checksum;
    every problem is a one-line CheckpointError."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    if size == 0:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": noise for a file we refuse
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "eights only" in str(e) or "WeightsUnpickler" in str(e):
            detail = refusal_detail(str(e))
            if re.search(r"global", detail, re.I):  # a class or function to import: could run code
                raise CheckpointError(f"refusing checkpoint {path}: it holds objects that could run code when "
                                      f"loaded, not only tensors and plain data ({detail})") from None
            raise CheckpointError(f"cannot read checkpoint {path}: not a checkpoint written by torch.save, or "
                                  f"not one that can be read safely ({detail})") from None
        raise CheckpointError(f"cannot read checkpoint {path}: {io_error_text(e)}") from None
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {io_error_text(e)} "
                              f"(truncated or not a checkpoint)") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a densecl_fast checkpoint (no 'model' entry)")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {ckpt.get('format_version')}, "
                              f"this version reads format {FORMAT_VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: it has no {', '.join(repr(k) for k in missing)} "
                              f"entr{'y' if len(missing) == 1 else 'ies'}")
    if not isinstance(ckpt["step"], int) or ckpt["step"] < 0 or not isinstance(ckpt["config"], dict):
        raise CheckpointError(f"checkpoint {path} is malformed: 'step' must be a non-negative int and "
                              f"'config' a mapping")
    if verify:
        stored = ckpt.get("checksum")
        if not isinstance(stored, str):
            raise CheckpointError(f"checkpoint {path} has no checksum (format {FORMAT_VERSION} requires one)")
        if checksum(ckpt) != stored:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: its content does not match the checksum stored when it was "
                f"written (the file was damaged afterwards). Move it away; --resume auto then continues from "
                f"the previous checkpoint")
    return ckpt


def saved_config(ckpt: dict, path: str):
    """The checkpoint's config as a Config, or a one-line CheckpointError."""
    from ..config import config_from_dict, one_line
    try:
        return config_from_dict(ckpt["config"])
    except Exception as e:  # OmegaConf key/type errors, ConfigError from validate
        raise CheckpointError(f"checkpoint {path} holds a config this version cannot use: {one_line(e)}") from None
