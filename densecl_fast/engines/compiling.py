"""torch.compile of the encoders by region, and the compile artifacts that let the next run start warm.

Problem: `torch.compile` of a whole ResNet-50 encoder (query with its backward, key without)
traced and lowered two ~180-op graphs; on an H200 it had not finished after 250 s.
Fix (PyTorch's regional-compilation recipe; torchtitan does the same per transformer block before
FSDP): every residual block of both encoders and each neck is compiled in place
(`module.compile()`), before any engine wraps the model. Blocks of one stage after its first are
identical, and Dynamo reuses one compiled graph for all of them (parameters are graph inputs, not
constants), so ResNet-50 compiles 8 block graphs + the neck per encoder instead of one huge graph,
and the stem (conv1, bn1, relu, maxpool) stays eager. Shapes are fixed in training: `dynamic=False`
keeps each region's graph static instead of letting Dynamo go dynamic on the second shape it sees.
`train.compile_scope=encoders` keeps the old whole-encoder compile (for comparison).

Warm start: `CompileCache` saves `torch.compiler.save_cache_artifacts()` (inductor and AOTAutograd
cache entries) after the first step into the run's checkpoint folder and under data.cache_dir,
keyed by what changes the generated code (torch/triton version, device and card, arch, shapes,
dtype, memory format, BN groups, scope, mode, kernels); a resumed run or the next run with the same
key loads them before its first step, so inductor finds its graphs in its cache. The artifacts are
code (inductor unpickles them; an autotune entry names the file it is written to), so each is
signed with this user's key when written and loaded only when the signature matches
(densecl_fast/signing.py): an artifact someone else put in either folder is ignored.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import signing
STAGES = ("layer1", "layer2", "layer3", "layer4")


@dataclass(frozen=True)
class CompileSettings:
    scope: str = "blocks"      # config.COMPILE_SCOPES
    mode: str = "default"      # config.COMPILE_MODES
    backend: str = "inductor"  # tests trace with "eager"/"aot_eager" (Dynamo's guards and graph breaks, no codegen)

    @classmethod
    def from_config(cls, t_cfg) -> "CompileSettings | None":
        return cls(t_cfg.compile_scope, t_cfg.compile_mode) if t_cfg.compile else None

    @classmethod
    def of(cls, compile) -> "CompileSettings | None":
        """An engine's `compile` argument: settings, True (the default settings), or False/None (eager)."""
        if isinstance(compile, cls) or compile is None:
            return compile
        return cls() if compile else None

    def options(self) -> dict:
        # fullgraph: a graph break inside a region is an error, not a silent split into eager pieces.
        kw = {"dynamic": False, "fullgraph": True, "backend": self.backend}
        return {**kw, "mode": self.mode} if self.mode != "default" else kw


def regions(encoder: nn.Module) -> list:
    """The repeated regions of an encoder: each residual block of the trunk's four stages (whatever
    block class the stage holds), then the neck."""
    trunk = encoder.backbone
    return [block for name in STAGES for block in getattr(trunk, name).children()] + [encoder.neck]


def compile_encoders(model: nn.Module, settings: CompileSettings) -> int:
    """Compile both encoders of a DenseCL model in place by `settings`; returns the number of compiled
    modules. Must run before any wrapping (DDP's replicate, FSDP's fully_shard)."""
    encoders = (model.encoder_q, model.encoder_k)
    targets = [enc for enc in encoders] if settings.scope == "encoders" else [r for enc in encoders for r in regions(enc)]
    # Every region's graph is a cache entry of the same code (Module._call_impl): one per block shape
    # x grad mode (query / key) x train/eval. Dynamo's default limit (8) would send the rest to eager.
    limit = 4 * len(targets)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                           4 * limit)
    for m in targets:
        m.compile(**settings.options())
    return len(targets)


# ---- compile artifacts: warm starts ------------------------------------------------------------------

def cache_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def key_fields(cfg, device: torch.device, precision: str, batch_per_rank: int, settings: CompileSettings,
               kernels: str) -> dict:
    """What changes the compiled code: versions, card, shapes, dtypes, layout, BN groups, compile settings."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    m = cfg.model
    return {"torch": torch.__version__, "triton": triton_version, "device": device.type, "card": card,
            "capability": cap, "arch": m.arch, "hid_dim": m.hid_dim, "out_dim": m.out_dim,
            "batch": batch_per_rank, "bn_group_size": m.bn_group_size, "image_size": cfg.data.image_size,
            "precision": precision, "channels_last": cfg.train.channels_last, "scope": settings.scope,
            "mode": settings.mode, "kernels": kernels}


class CompileCache:
    """The compile artifacts of one key, in the run's checkpoint folder and under data.cache_dir.

    load() before the first step (the run folder first: a resumed run; then the shared cache: the
    next run with the same key); save() after the first step, once, by rank 0. Only artifacts
    signed with this user's key are loaded (`signing`); an unsigned or mis-signed one is one
    warning and a cold compile. Both only warn on I/O problems: a cache is never a reason to stop
    training."""

    def __init__(self, key: str, folders: list, is_main: bool = True, warn=None):
        self.key, self.is_main = key, is_main
        self.paths = [os.path.join(f, f"compile-{key}.bin") for f in folders]
        self.warn = warn or (lambda msg: None)
        self.loaded_from = None
        self.saved = False
        self._signing_key = None
        self._key_problem = None

    @classmethod
    def for_run(cls, cfg, device, precision, batch_per_rank, settings, kernels, ckpt_dir, is_main=True, warn=None):
        folders = [ckpt_dir, os.path.join(os.path.expanduser(cfg.data.cache_dir), "compile")]
        return cls(cache_key(key_fields(cfg, device, precision, batch_per_rank, settings, kernels)), folders,
                   is_main, warn)

    def _user_key(self):
        """This user's signing key, or None (warned once: then nothing is loaded or saved)."""
        if self._signing_key is None and self._key_problem is None:
            try:
                self._signing_key = signing.user_key()
            except signing.KeyUnusable as e:
                self._key_problem = str(e)
                self.warn(f"compile cache off: {e}; compiling cold")
        return self._signing_key

    def load(self):
        """Load the first artifact file that is signed by this user and readable; returns torch's
        CacheInfo (None: nothing loaded)."""
        for path in self.paths:
            if not os.path.isfile(path):
                continue
            key = self._user_key()
            if key is None:
                return None
            try:
                data = signing.read_verified(path, key)   # these bytes, read once, are what torch gets
                info = torch.compiler.load_cache_artifacts(data)
                if info is None or info.empty():
                    raise ValueError("no artifacts in it")
            except signing.Untrusted as e:
                self.warn(f"compile cache {path} not loaded ({e}); compiling cold")
                continue
            except Exception as e:  # noqa: BLE001 -- a stale or damaged cache only costs a cold compile
                self.warn(f"compile cache {path} not loaded ({type(e).__name__}: {str(e)[:200]}); compiling cold")
                continue
            self.loaded_from = path
            return info
        return None

    def save(self) -> list:
        """Write what this process compiled so far, signed, to every folder (atomically); returns the
        paths."""
        if self.saved or not self.is_main:
            return []
        self.saved = True
        got = torch.compiler.save_cache_artifacts()
        if got is None:
            return []
        key = self._user_key()
        if key is None:
            return []
        data, _info = got
        from ..checkpoint import atomic_save
        written = []
        for path in self.paths:
            try:
                signing.write_signed(path, data, key, lambda b, p: atomic_save(b, p, dump=lambda b, f: f.write(b)))
                written.append(path)
            except OSError as e:
                self.warn(f"compile cache not written to {path}: {e}")
        return written
