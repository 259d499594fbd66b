"""Unpickling without running code: an Unpickler that resolves only allow-listed globals.

A pickle runs code by naming a callable (`os.system`, `builtins.exec`, any class with a harmful
constructor) and calling it; every such name goes through `find_class`. Refusing all but a
listed set of harmless ones (data classes, numpy arrays, dtypes) before anything is imported
means no payload ever runs. Users: detectron2 .pkl weights (weights.py) and the `.metadata`
of torch.distributed.checkpoint folders (checkpoint.py).
"""
from __future__ import annotations

import pickle
from typing import Callable, Collection, Union

Allowed = Union[Collection[tuple], Callable[[str, str], bool]]


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list (it could run code when loaded)."""


class AllowListUnpickler(pickle.Unpickler):
    """`allowed`: (module, name) pairs, or a predicate on them. `what` names the allowed kind of
    object in the refusal ("refusing pickled global os.system (only numpy arrays are allowed)")."""

    def __init__(self, file, allowed: Allowed, what: str, **kwargs):
        super().__init__(file, **kwargs)
        self._allowed, self._what = allowed, what

    def find_class(self, module, name):
        ok = self._allowed(module, name) if callable(self._allowed) else (module, name) in self._allowed
        if ok:
            return super().find_class(module, name)
        raise RefusedGlobal(f"refusing pickled global {module}.{name} (only {self._what} are allowed)")


def load(file, allowed: Allowed, what: str, **kwargs):
    """The object pickled in the open binary `file`, read through an AllowListUnpickler."""
    return AllowListUnpickler(file, allowed, what, **kwargs).load()
