"""One process: the base engine as it is (no wrapper, one-file checkpoints)."""
from .base import Engine


class SingleEngine(Engine):
    name = "single"

    def describe(self) -> str:
        return f"single (one process, {self.device})"
