"""Weights out and in: read pretrained ResNet/DenseCL weights of several layouts, safely, and
write the trunk in the layouts downstream libraries load.

Reading (`read_weights`, `load_backbone_state`, `load_into_model`) accepts
  - our training checkpoints (`checkpoints/ckpt_*.pt`, read with checkpoint.load_checkpoint);
  - our exports: torchvision / timm (plain state dict), mmdet (`backbone.` prefix), detectron2 (.pkl);
  - the original DenseCL code (OpenSelfSup) and mmselfsup 0.x: {"state_dict": {encoder_q.0.* (trunk),
    encoder_q.1.* (neck), encoder_k.0/1.*, backbone.* (a second name of encoder_q.0), queue, queue_ptr,
    queue2, queue2_ptr}, "meta": ...};
  - mmselfsup 1.x / mmpretrain: {"state_dict": {backbone.*, neck.*, encoder_k.module.0/1.* (mmengine's
    ExponentialMovingAverage), encoder_k.steps, queue, queue_ptr, queue2, queue2_ptr}, ...};
  - backbone-only files: torchvision/timm state dicts (a classifier's `fc` is dropped), OpenSelfSup's
    extract_backbone_weights output, mmdet-style `backbone.` dicts, MoCo-style `module.encoder_q.*`.
mmcv/mmdet/mmpretrain and timm ResNets use torchvision's parameter names (conv1, bn1, layerN.i.convK,
layerN.i.bnK, layerN.0.downsample.0/1), so only prefixes differ; detectron2 renames (see `tv_to_d2`).

Safety: nothing in a file is executed. Torch files are read with `torch.load(weights_only=True)`;
pickles (detectron2 .pkl) with an Unpickler that only rebuilds numpy arrays, dtypes and plain
containers (safe_pickle; fsdp folders' DCP metadata likewise, see checkpoint.read_dcp_metadata). Every problem is a one-line `WeightsError` naming the file and what is wrong.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

import numpy as np
import torch
import torchvision

from . import safe_pickle
from .checkpoint import (CheckpointError, atomic_save, checkpoint_kind, first_line, load_checkpoint,
                         read_checkpoint_meta)
from .config import ARCHS
from .engines import folder_model_state


class WeightsError(ValueError):
    """A weights file that cannot be used: missing, unreadable, unsafe, or not what it claims."""


FORMATS = ("torchvision", "detectron2", "mmdet", "timm")
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # pickled magic of old torch.save


# --------------------------------------------------------------------------------------------
# ResNet key sets and arch inference
# --------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def trunk_shapes(arch: str) -> dict:
    """{torchvision name: shape} of the trunk of `arch` (no fc); built on the meta device (free)."""
    if arch not in ARCHS:
        raise WeightsError(f"unknown arch {arch!r}: use one of {', '.join(ARCHS)}")
    with torch.device("meta"):
        net = getattr(torchvision.models, arch)(weights=None)
    return {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.startswith("fc.")}


def infer_arch(state: dict) -> Optional[str]:
    """The arch whose trunk has exactly these keys and shapes (num_batches_tracked optional), or None."""
    keys = {k for k in state if not k.endswith("num_batches_tracked")}
    for arch in ARCHS:
        shapes = trunk_shapes(arch)
        want = {k for k in shapes if not k.endswith("num_batches_tracked")}
        if keys == want and all(tuple(state[k].shape) == shapes[k] for k in want):
            return arch
    return None


def _names(keys, n: int = 4) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def check_trunk(state: dict, path: str, arch: Optional[str] = None) -> tuple[str, dict]:
    """Validate a trunk state dict in torchvision names; fill in missing BN counters (detectron2 has
    none). Returns (arch, state). `arch` given = the arch the caller needs; another one is an error."""
    found = infer_arch(state)
    if found is None:
        # Explain against the closest arch: the one sharing most keys.
        best = max(ARCHS, key=lambda a: len(set(trunk_shapes(a)) & set(state)))
        shapes = trunk_shapes(best)
        extra = [k for k in state if k not in shapes]
        missing = [k for k in shapes if k not in state and not k.endswith("num_batches_tracked")]
        bad = [k for k in shapes if k in state and tuple(state[k].shape) != shapes[k]]
        if extra and not set(state) & set(shapes):
            raise WeightsError(f"{path}: not a ResNet backbone: unexpected keys {_names(extra)} "
                               f"(expected torchvision ResNet names conv1, bn1, layer1..4)")
        what = "; ".join(s for s in (
            extra and f"unexpected keys {_names(extra)}",
            missing and f"missing keys {_names(missing)}",
            bad and f"shape of {bad[0]} is {tuple(state[bad[0]].shape)}, {best} has {shapes[bad[0]]}") if s)
        raise WeightsError(f"{path}: not a torchvision-layout resnet18/34/50/101 trunk (closest {best}): {what}")
    if arch is not None and arch != found:
        raise WeightsError(f"{path}: holds a {found} backbone, not the {arch} asked for")
    out = dict(state)
    for k in trunk_shapes(found):
        if k.endswith("num_batches_tracked") and k not in out:
            out[k] = torch.tensor(0, dtype=torch.long)
    return found, out


# --------------------------------------------------------------------------------------------
# detectron2 names (after detectron2's tools/convert-torchvision-to-d2.py and MoCo's converter)
# --------------------------------------------------------------------------------------------

def tv_to_d2(name: str) -> str:
    """torchvision trunk name -> detectron2 ResNet name: stem.conv1(.norm), resN.i.convK(.norm),
    resN.i.shortcut(.norm); layer1..4 -> res2..5, bnK -> convK.norm, downsample.0/1 -> shortcut(.norm)."""
    m = re.fullmatch(r"(conv1|bn1)\.(\w+)", name)
    if m:
        return f"stem.conv1.{'norm.' if m.group(1) == 'bn1' else ''}{m.group(2)}"
    m = re.fullmatch(r"layer([1-4])\.(\d+)\.(conv[1-3]|bn[1-3]|downsample\.[01])\.(\w+)", name)
    if not m:
        raise WeightsError(f"no detectron2 name for {name!r}")
    stage, block, mod, leaf = int(m.group(1)) + 1, m.group(2), m.group(3), m.group(4)
    mod = {"downsample.0": "shortcut", "downsample.1": "shortcut.norm"}.get(mod, mod)
    mod = re.sub(r"bn([1-3])", r"conv\1.norm", mod)
    return f"res{stage}.{block}.{mod}.{leaf}"


def d2_to_tv(name: str) -> str:
    """The inverse of `tv_to_d2`."""
    m = re.fullmatch(r"stem\.conv1\.(norm\.)?(\w+)", name)
    if m:
        return f"{'bn1' if m.group(1) else 'conv1'}.{m.group(2)}"
    m = re.fullmatch(r"res([2-5])\.(\d+)\.(conv[1-3]|shortcut)\.(norm\.)?(\w+)", name)
    if not m:
        raise WeightsError(f"{name!r} is not a detectron2 ResNet trunk name")
    stage, block, mod, norm, leaf = int(m.group(1)) - 1, m.group(2), m.group(3), m.group(4), m.group(5)
    if mod == "shortcut":
        mod = "downsample.1" if norm else "downsample.0"
    elif norm:
        mod = "bn" + mod[-1]
    return f"layer{stage}.{block}.{mod}.{leaf}"


# --------------------------------------------------------------------------------------------
# Safe file reading
# --------------------------------------------------------------------------------------------

# What a detectron2 pickle may name: numpy arrays, numpy scalars/dtypes, OrderedDict and plain
# containers; every other global (os.system, eval, a class of some library ...) is refused.
_D2_GLOBALS = frozenset({
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # how Python-2 era pickles (detectron2's model zoo) store bytes
})


def _first_line(e: Exception) -> str:
    return first_line(e)[:200] or type(e).__name__


def read_file(path: str):
    """The object stored in `path`, read without executing anything from it."""
    if not os.path.exists(path):
        raise WeightsError(f"{path}: no such file")
    if os.path.isdir(path):
        raise WeightsError(f"{path}: is a folder, not a weights file")
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise WeightsError(f"{path}: empty file")
    if head.startswith(_ZIP_MAGIC) or head.startswith(_LEGACY_TORCH_MAGIC):
        try:  # mmap: tensors are paged in when used, so a look at a big checkpoint costs little
            return torch.load(path, map_location="cpu", weights_only=True, mmap=head.startswith(_ZIP_MAGIC))
        except pickle.UnpicklingError as e:
            m = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            what = f"an object of type {m.group(1)}" if m else "pickled objects other than tensors and containers"
            raise WeightsError(f"{path}: refusing to load: the file holds {what}, and only tensors and plain "
                               f"containers are read (loading never executes code from a file)") from None
        except Exception as e:
            raise WeightsError(f"{path}: cannot read as a torch file (truncated or corrupt?): {_first_line(e)}") from None
    if head[:1] == b"\x80":  # a pickle stream: detectron2's .pkl
        try:
            with open(path, "rb") as f:
                return safe_pickle.load(f, _D2_GLOBALS, "numpy arrays", encoding="latin1")
        except pickle.UnpicklingError as e:
            raise WeightsError(f"{path}: {_first_line(e)}") from None
        except Exception as e:
            raise WeightsError(f"{path}: cannot read as a pickle (truncated or corrupt?): {_first_line(e)}") from None
    if head.lstrip()[:1] in (b"{", b"[") or all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        raise WeightsError(f"{path}: is a text/JSON file, not a weights file (torch .pt/.pth or detectron2 .pkl)")
    raise WeightsError(f"{path}: unknown file type (neither a torch file nor a pickle)")


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------

@dataclass
class Weights:
    """What a file holds, in our names: trunks in torchvision names, necks as DenseCLNeck names."""
    path: str
    layout: str                       # densecl_fast | openselfsup/mmselfsup-0.x | mmselfsup-1.x | torchvision ...
    arch: str
    backbone: dict                    # query trunk
    neck: Optional[dict] = None       # query neck (mlp.0/2, mlp2.0/2)
    backbone_k: Optional[dict] = None
    neck_k: Optional[dict] = None
    queues: Optional[dict] = None     # queue, queue2, queue_ptr
    step: Optional[int] = None
    config: Optional[dict] = None
    dropped: list = field(default_factory=list)   # keys read and deliberately not used (fc, counters)


def _sub(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _is_tensor_dict(d) -> bool:
    return isinstance(d, dict) and bool(d) and all(isinstance(v, (torch.Tensor, np.ndarray)) for v in d.values())


# (layout, query trunk, query neck, key trunk, key neck, aliases (second names of tensors listed
# already: skipped), unused (read, deliberately not loaded: reported)); a name ending in "." is a prefix.
_FULL_LAYOUTS = (
    ("densecl_fast", "encoder_q.backbone.", "encoder_q.neck.", "encoder_k.backbone.", "encoder_k.neck.", (), ()),
    # OpenSelfSup/mmselfsup 0.x also register the query trunk a second time as `backbone.`.
    ("openselfsup/mmselfsup-0.x", "encoder_q.0.", "encoder_q.1.", "encoder_k.0.", "encoder_k.1.",
     ("backbone.",), ("queue2_ptr",)),
    ("mmselfsup-1.x", "backbone.", "neck.", "encoder_k.module.0.", "encoder_k.module.1.",
     (), ("encoder_k.steps", "queue2_ptr", "data_preprocessor.")),
)
_QUEUES = ("queue", "queue2", "queue_ptr")


def _ignored(key: str, ignore) -> bool:
    return any(key == i or (i.endswith(".") and key.startswith(i)) for i in ignore)


def _parse_state(sd: dict, path: str, layout_hint: str, arch: Optional[str]) -> Weights:
    """Split a flat state dict into trunk/neck/queues, by whichever known layout it has."""
    for layout, qb, qn, kb, kn, aliases, unused in _FULL_LAYOUTS:
        if not (any(k.startswith(kb) for k in sd) and any(k.startswith(qb) for k in sd)):
            continue
        left = [k for k in sd if not k.startswith((qb, qn, kb, kn)) and k not in _QUEUES
                and not _ignored(k, aliases + unused)]
        if left:
            raise WeightsError(f"{path}: {layout} checkpoint with unexpected keys {_names(left)}")
        a, backbone = check_trunk(_sub(sd, qb), path, arch)
        _, backbone_k = check_trunk(_sub(sd, kb), path, a)
        queues = {k: sd[k] for k in _QUEUES + ("queue2_ptr",) if k in sd} or None
        return Weights(path, layout, a, backbone, _sub(sd, qn) or None, backbone_k, _sub(sd, kn) or None, queues,
                       dropped=[k for k in sd if _ignored(k, unused)])
    # Backbone only: plain names, or one wrapper prefix around all of them.
    for prefix in ("", "module.", "backbone.", "module.encoder_q.", "encoder_q.", "model."):
        sub = _sub(sd, prefix)
        if "conv1.weight" in sub and len(sub) == len(sd):
            head = [k for k in sub if k.startswith("fc.")]  # a classifier's head (or MoCo's MLP): not trunk
            a, trunk = check_trunk({k: v for k, v in sub.items() if k not in head}, path, arch)
            layout = layout_hint or {"": "torchvision", "backbone.": "mmdet"}.get(prefix, prefix + "*")
            return Weights(path, layout, a, trunk, dropped=[prefix + k for k in head])
    a, trunk = check_trunk(sd, path, arch)  # raises, naming what is wrong
    return Weights(path, layout_hint or "torchvision", a, trunk)


def _to_tensors(d: dict) -> dict:
    """numpy arrays (detectron2 files) -> tensors; read-only arrays (pickle protocol 5) are copied."""
    def conv(v):
        if not isinstance(v, np.ndarray):
            return v
        v = np.ascontiguousarray(v)
        return torch.from_numpy(v if v.flags.writeable else v.copy())
    return {k: conv(v) for k, v in d.items()}


def _from_d2(sd: dict, path: str) -> Optional[dict]:
    """A detectron2 trunk (our .pkl, or a detectron2 training checkpoint) in torchvision names; None
    when `sd` has no detectron2 names."""
    sd = _sub(sd, "backbone.bottom_up.") or sd
    if not any(k.startswith("stem.") for k in sd):
        return None
    try:
        return {d2_to_tv(k): v for k, v in sd.items()}
    except WeightsError as e:
        raise WeightsError(f"{path}: detectron2 file with a key outside the ResNet trunk: {e}") from None


def read_weights(path: str, arch: Optional[str] = None) -> Weights:
    """Read any supported file into a `Weights`. `arch` given: a file of another arch is an error."""
    if os.path.isdir(path) and checkpoint_kind(path) in ("dcp", "ds"):  # fsdp / deepspeed checkpoint folder
        try:
            meta, state = read_checkpoint_meta(path), folder_model_state(path)
        except CheckpointError as e:  # ours: one line already, naming the folder and the file
            raise WeightsError(str(e)) from None
        w = _parse_state(state, path, "densecl_fast", arch)
        w.step, w.config = meta.get("step"), meta.get("config") or {}
        return w
    obj = read_file(path)
    if isinstance(obj, dict) and "format_version" in obj and "model" in obj:  # our training checkpoint
        try:
            saved = load_checkpoint(path)
        except CheckpointError as e:
            raise WeightsError(_first_line(e)) from None
        cfg = saved.get("config") or {}
        w = _parse_state(saved["model"], path, "densecl_fast", arch)
        want = (cfg.get("model") or {}).get("arch")
        if want and want != w.arch:
            raise WeightsError(f"{path}: its config says {want} but the weights are a {w.arch}")
        w.step, w.config = saved.get("step"), cfg
        return w
    meta = {}
    if isinstance(obj, dict) and _is_tensor_dict(obj.get("model")):  # detectron2 .pkl/.pth, timm/DeiT style
        sd, meta = obj["model"], obj.get("densecl_fast")
    elif isinstance(obj, dict) and _is_tensor_dict(obj.get("state_dict")):  # mm*, OpenSelfSup, our mmdet export
        sd, meta = obj["state_dict"], obj.get("meta")
        meta = meta.get("densecl_fast") if isinstance(meta, dict) else None
    elif _is_tensor_dict(obj):
        sd = obj
    else:
        what = (f"a dict with keys {_names(map(str, obj.keys()))}" if isinstance(obj, dict) and obj
                else "an empty dict" if isinstance(obj, dict) else f"a {type(obj).__name__}")
        raise WeightsError(f"{path}: no state dict found (the file holds {what})")
    meta = meta if isinstance(meta, dict) else {}  # only our own metadata is trusted for arch/step/config
    if meta.get("arch") and arch and meta["arch"] != arch:
        raise WeightsError(f"{path}: holds a {meta['arch']} backbone, not the {arch} asked for")
    sd = _to_tensors(sd)
    d2 = _from_d2(sd, path)
    hint = "detectron2" if d2 is not None else str(meta.get("format") or "")
    w = _parse_state(d2 if d2 is not None else sd, path, hint, arch or meta.get("arch"))
    w.step, w.config = meta.get("step"), meta.get("config")
    return w


def load_backbone_state(path: str, encoder: str = "query", arch: Optional[str] = None) -> tuple[str, dict]:
    """(arch, trunk state dict in torchvision names, no fc) from any supported file.

    encoder="key" takes the momentum encoder (files without one are an error). The state dict
    loads into `torchvision.models.<arch>()` (strict apart from fc) and into `model.backbone`.
    """
    if encoder not in ("query", "key"):
        raise WeightsError(f"encoder={encoder!r}: use query or key")
    w = read_weights(path, arch)
    if encoder == "key":
        if w.backbone_k is None:
            raise WeightsError(f"{path}: {w.layout} file has no key (momentum) encoder; use encoder=query")
        return w.arch, w.backbone_k
    return w.arch, w.backbone


# --------------------------------------------------------------------------------------------
# Loading into a DenseCL model
# --------------------------------------------------------------------------------------------

@dataclass
class LoadReport:
    """What `load_into_model` did: `loaded` parts came from the file, `fresh` kept the model's init."""
    path: str
    layout: str
    arch: str
    step: Optional[int]
    loaded: list
    fresh: list
    notes: list

    def __str__(self):
        s = f"{self.path} ({self.layout}, {self.arch}): loaded {', '.join(self.loaded)}"
        s += f"; fresh {', '.join(self.fresh)}" if self.fresh else ""
        return s + (f" ({'; '.join(self.notes)})" if self.notes else "")


def _check_part(module: torch.nn.Module, state: dict, path: str, what: str) -> None:
    mine = module.state_dict()
    bad = [k for k in mine if k in state and tuple(state[k].shape) != tuple(mine[k].shape)]
    if set(state) != set(mine) or bad:
        k = bad[0] if bad else None
        detail = (f"{k} is {tuple(state[k].shape)} in the file, {tuple(mine[k].shape)} in the model (set model.hid_dim/"
                  f"out_dim to match)" if k else f"keys differ: {_names(set(state) ^ set(mine))}")
        raise WeightsError(f"{path}: {what} does not fit the model: {detail}")


@torch.no_grad()
def load_into_model(model, path: str) -> LoadReport:
    """Load a DenseCL (or a backbone) from `path` into `model` (a densecl_fast DenseCL), in place.

    - trunk: always (its arch must be the model's). A backbone-only file initialises both
      encoders' trunks with it, as training starts with the key encoder a copy of the query one.
    - neck: when the file has one (our / OpenSelfSup / mmselfsup checkpoints); its widths must
      match model.hid_dim/out_dim. Otherwise the query neck keeps its fresh init.
    - key encoder: from the file when present, else a copy of the query encoder.
    - queues and pointer: when present with the model's shape; else the fresh random queues stay
      (the report says why). OpenSelfSup/mmselfsup keep a second pointer, queue2_ptr, always equal
      to queue_ptr in their training; ours is the single queue_ptr.
    Everything is checked before anything is copied: on an error the model is unchanged.
    Optimizer, schedule and step are never touched: this starts (or evaluates) a run, it does not resume one.
    """
    w = read_weights(path, model.cfg.arch)
    parts = [(model.encoder_q.backbone, w.backbone, "query backbone")]
    if w.neck is not None:
        parts.append((model.encoder_q.neck, w.neck, "query neck"))
    has_k = w.backbone_k is not None and w.neck_k is not None
    if has_k:
        parts += [(model.encoder_k.backbone, w.backbone_k, "key backbone"), (model.encoder_k.neck, w.neck_k, "key neck")]
    for module, state, what in parts:
        _check_part(module, state, path, what)
    for module, state, _ in parts:
        module.load_state_dict(state, strict=True)
    loaded, fresh, notes = [what for _, _, what in parts], [], []
    if w.neck is None:
        fresh.append("query neck")
    if not has_k:  # as at the start of training: the key encoder is a copy of the query encoder
        model.encoder_k.load_state_dict(model.encoder_q.state_dict())
        loaded.append("key backbone (copy of the query backbone)")
        (loaded if w.neck is not None else fresh).append("key neck (copy of the query neck)")
    q = w.queues or {}
    if all(k in q for k in _QUEUES) and q["queue"].shape == model.queue.shape and q["queue2"].shape == model.queue2.shape:
        for k in _QUEUES:
            getattr(model, k).copy_(q[k])
        loaded.append("queues")
        if "queue2_ptr" in q and int(q["queue2_ptr"]) != int(q["queue_ptr"]):
            notes.append(f"queue2_ptr {int(q['queue2_ptr'])} differs from queue_ptr {int(q['queue_ptr'])}; "
                         f"queue_ptr used for both")
    else:
        fresh.append("queues")
        if "queue" in q:
            notes.append(f"the file's queues are {tuple(q['queue'].shape)}, the model's {tuple(model.queue.shape)}")
    if w.dropped:
        notes.append(f"not used: {_names(w.dropped)}")
    return LoadReport(path, w.layout, w.arch, w.step, loaded, fresh, notes)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def export_backbone(state: dict, arch: str, fmt: str, out: str, meta: dict) -> list[str]:
    """Write a trunk (torchvision names) as `fmt`, plus a sidecar `out + '.json'` with `meta`.

    torchvision / timm: the plain state dict (`model.load_state_dict(torch.load(out), strict=False)`
    misses only fc; timm: `num_classes=0` then strict). mmdet/mmseg/mmpretrain: {"state_dict":
    {"backbone." + name}, "meta"} for init_cfg=dict(type='Pretrained', checkpoint=out, prefix='backbone.')
    or load_from. detectron2: {"model": {d2 name: numpy}, "__author__", "matching_heuristics",
    "densecl_fast": meta} pickle; counters dropped. Returns the paths written.
    """
    if fmt not in FORMATS:
        raise WeightsError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    if fmt == "detectron2" and not out.endswith(".pkl"):
        raise WeightsError(f"--out {out}: detectron2 files must end in .pkl (its checkpointer picks the reader by extension)")
    arch, state = check_trunk(state, out, arch)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    n = len(state) if fmt != "detectron2" else sum(not k.endswith("num_batches_tracked") for k in state)
    meta = {**meta, "format": fmt, "arch": arch, "num_tensors": n, "created_by": "densecl_fast"}
    if fmt in ("torchvision", "timm"):
        atomic_save(state, out)
    elif fmt == "mmdet":
        atomic_save({"state_dict": {"backbone." + k: v for k, v in state.items()}, "meta": {"densecl_fast": meta}}, out)
    else:
        model = {tv_to_d2(k): v.numpy() for k, v in state.items() if not k.endswith("num_batches_tracked")}
        atomic_save({"model": model, "__author__": "densecl_fast", "matching_heuristics": True,
                     "densecl_fast": meta}, out, dump=lambda o, f: pickle.dump(o, f, protocol=4))
    side = out + ".json"  # atomically too: a crash must not leave an export beside a truncated sidecar
    atomic_save(meta, side, dump=lambda o, f: f.write((json.dumps(o, indent=2, default=str) + "\n").encode()))
    return [out, side]
