"""torch.distributed.checkpoint folders (fsdp): read without running code.

DCP pickles its `.metadata`, and its own loader unpickles it (and the non-tensor values of the
state, e.g. the optimizer's lr) with plain pickle: a doctored folder would run code. We read the
metadata through an allow-list of DCP's own data classes and hand DCP that object; non-tensor
values are checked with torch.load(weights_only=True) before DCP reads them. A .dcp folder is
checked whenever it is read (reading.read_checkpoint_meta): its `.metadata` through the allow-list,
and every shard file it names present and complete.
"""
from __future__ import annotations

import functools
import os
import pickle
import warnings

import torch

from .. import safe_pickle
from .files import CheckpointError, first_line, io_error_text, refusal_detail

DCP_METADATA = ".metadata"
_DCP_MD = "torch.distributed.checkpoint.metadata"
_DCP_GLOBALS = frozenset(
    {(_DCP_MD, n) for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                           "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")}
    | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
       ("torch.serialization", "_get_layout"),  # looks a layout up by name in a dict of torch.layout objects
       ("collections", "OrderedDict"),
       ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib._local", "PosixPath")})  # checkpoint_id


def _dcp_global_allowed(module: str, name: str) -> bool:
    # torch.__dict__, not getattr: torch's module __getattr__ would import submodules by name
    return (module, name) in _DCP_GLOBALS or (module == "torch" and isinstance(torch.__dict__.get(name), torch.dtype))


def _checked_read(path: str, what: str, read, refused: type, detail, unreadable):
    """read()'s value; what it raises is one CheckpointError line: `refused` (the unpickler met an
    object that could run code, described by detail(e)) a refusal of the checkpoint `path`, any other
    error unreadable(e); a CheckpointError as it is."""
    try:
        return read()
    except CheckpointError:
        raise
    except refused as e:
        raise CheckpointError(f"refusing checkpoint {path}: its {what} holds objects that could run code "
                              f"when loaded ({detail(e)})") from None
    except Exception as e:
        raise CheckpointError(unreadable(e)) from None


def read_dcp_metadata(path: str):
    """The DCP Metadata of the folder `path`, unpickled through the allow-list, after checking that
    every shard file it names is in the folder with at least the bytes it points into.
    Every problem is a one-line CheckpointError naming the folder and the file."""
    from torch.distributed.checkpoint.metadata import Metadata
    md_path = os.path.join(path, DCP_METADATA)

    def read():
        try:
            f = open(md_path, "rb")
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {path} is incomplete: it has no {DCP_METADATA} (the write was "
                                  f"interrupted, or it is not a torch.distributed.checkpoint folder)") from None
        with f:
            return safe_pickle.load(f, _dcp_global_allowed, "torch.distributed.checkpoint metadata classes")

    md = _checked_read(path, DCP_METADATA, read, safe_pickle.RefusedGlobal, str,
                       lambda e: f"cannot read {md_path}: {io_error_text(e)} (truncated, or not "
                                 f"torch.distributed.checkpoint metadata)")
    if not (isinstance(md, Metadata) and isinstance(getattr(md, "state_dict_metadata", None), dict)
            and isinstance(getattr(md, "storage_data", None), dict)):
        raise CheckpointError(f"{md_path} is not torch.distributed.checkpoint metadata")
    need: dict = {}  # shard file -> bytes the metadata reads from it
    for info in md.storage_data.values():
        rel, off, length = (getattr(info, a, None) for a in ("relative_path", "offset", "length"))
        if not (isinstance(rel, str) and rel == os.path.basename(rel) and rel not in ("", ".", "..")
                and isinstance(off, int) and isinstance(length, int) and off >= 0 and length >= 0):
            raise CheckpointError(f"checkpoint {path} is malformed: its {DCP_METADATA} names the shard {rel!r} "
                                  f"(bytes {off!r}+{length!r}), not a file in the folder")
        need[rel] = max(need.get(rel, 0), off + length)
    for rel in sorted(need):
        try:
            size = os.path.getsize(os.path.join(path, rel))
        except OSError as e:
            what = "is missing" if isinstance(e, FileNotFoundError) else f"cannot be read ({io_error_text(e)})"
            raise CheckpointError(f"checkpoint {path} is incomplete: its shard {rel} {what} (a rank's write was "
                                  f"lost, or the folder was copied in part); move the folder away: --resume "
                                  f"auto then continues from the previous checkpoint") from None
        if size < need[rel]:
            state = "is empty" if size == 0 else f"is truncated ({size} of at least {need[rel]} bytes)"
            raise CheckpointError(f"checkpoint {path} is damaged: its shard {rel} {state}; move the folder "
                                  f"away: --resume auto then continues from the previous checkpoint")
    return md


def dcp_loader(path: str, metadata) -> tuple:
    """(storage_reader, planner) for torch.distributed.checkpoint.load of the folder `path` whose
    metadata `read_dcp_metadata` returned: nothing in the folder is unpickled by plain pickle."""
    reader_cls, planner_cls = _dcp_loader_classes()
    return reader_cls(path, metadata), planner_cls(path)


@functools.lru_cache(maxsize=None)
def _dcp_loader_classes():
    import io
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class CheckedReader(FileSystemReader):
        """Serves the metadata read through the allow-list instead of unpickling `.metadata`."""

        def __init__(self, path, metadata):
            super().__init__(path)
            self._metadata = metadata

        def read_metadata(self, *args, **kwargs):
            if getattr(self._metadata, "storage_meta", None) is None:
                self._metadata.storage_meta = StorageMeta()
            self._metadata.storage_meta.load_id = self.load_id
            return self._metadata

    class CheckedPlanner(DefaultLoadPlanner):
        """DCP reads non-tensor values with torch.load(weights_only=False): check them with
        weights_only=True first (the same bytes, so a value that passes holds no code)."""

        def __init__(self, path):
            super().__init__()
            self._path = path

        def load_bytes(self, read_item, value):
            raw, fqn = value.read(), read_item.dest_index.fqn
            _checked_read(self._path, f"value {fqn}", lambda: torch.load(io.BytesIO(raw), weights_only=True),
                          pickle.UnpicklingError, lambda e: refusal_detail(str(e)),
                          lambda e: f"cannot read checkpoint {self._path}: its value {fqn}: {first_line(e, True)}")
            super().load_bytes(read_item, io.BytesIO(raw))

    return CheckedReader, CheckedPlanner


def dcp_model_state(path: str) -> dict:
    """The "model" entries of a DCP folder (the optimizer's are not read), as full CPU tensors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    md = read_dcp_metadata(path)
    state = {}
    for fqn, item in md.state_dict_metadata.items():
        if fqn.startswith("model."):
            if not (isinstance(item, TensorStorageMetadata) and isinstance(item.properties.dtype, torch.dtype)):
                raise CheckpointError(f"checkpoint {path}: model entry {fqn} is not a tensor")
            state[fqn[len("model."):]] = torch.empty(tuple(item.size), dtype=item.properties.dtype)
    if not state:
        raise CheckpointError(f"checkpoint {path} holds no model (no 'model.' entries in its {DCP_METADATA})")
    reader, planner = dcp_loader(path, md)
    wrapped = {"model": state}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process": it is
        dcp.load(wrapped, storage_reader=reader, planner=planner, no_dist=True)
    return wrapped["model"]


def dcp_exception() -> type:
    """DCP's CheckpointException: a BaseException, which `except Exception` does not catch."""
    from torch.distributed.checkpoint.api import CheckpointException
    return CheckpointException


def dcp_error(path: str, e: BaseException, what: str) -> CheckpointError:
    """One line for a failed DCP load: a CheckpointException carries each rank's exception with its
    traceback in its text; the first rank's exception is the message (ours as it is)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        e = inner[0] if isinstance(inner, tuple) and inner and isinstance(inner[0], BaseException) else e
    if isinstance(e, CheckpointError):
        return CheckpointError(first_line(e))
    return CheckpointError(f"checkpoint {path} {what}: {io_error_text(e) if isinstance(e, OSError) else first_line(e, True)}")
