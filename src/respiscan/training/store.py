"""Finished stages on disk: a stage found here is loaded instead of trained (resume, and reuse across runs)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from respiscan.runtime import save_tensors
from respiscan.training import distributed
from respiscan.utils import atomic_write

log = logging.getLogger(__name__)


class StageStore:
    """Finished stages as safetensors files; a stage found here is loaded instead of trained.

    A stage's file name carries a hash of everything it depends on (data, seed, settings of it and of the
    stages before it), so a changed configuration never picks up a stale stage, and runs that differ only in
    later stages (e.g. shared plain vs adversarial) reuse the earlier ones.
    """

    def __init__(self, folder: Path, clear: bool):
        self.folder = folder
        if distributed.is_main():
            if folder.exists() and clear:
                shutil.rmtree(folder)
            folder.mkdir(parents=True, exist_ok=True)
        distributed.barrier()

    @staticmethod
    def key(name: str, *depends_on: object) -> str:
        digest = hashlib.sha1(json.dumps(depends_on, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return f"{name}-{digest}"

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def epoch_checkpoint(self, key: str) -> Path:
        """Where an unfinished stage keeps its last finished epoch."""
        return self.folder / f"{key}.epoch.safetensors"

    def load_module(self, key: str, module: nn.Module, *logs: Path) -> bool:
        """Load a finished stage and put its training logs where this run's logs go."""
        if not self._path(key).is_file():
            return False
        module.load_state_dict(load_file(str(self._path(key))))
        for log_path in logs:
            kept = self.folder / f"{key}.{log_path.name}"
            if kept.is_file() and distributed.is_main():
                log_path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_write(log_path, "wb") as f:
                    f.write(kept.read_bytes())
        log.info("reusing finished stage %s", key)
        return True

    def save_module(self, key: str, module: nn.Module, *logs: Path) -> None:
        """Save a finished stage with copies of its logs (a run that reuses the stage reports them too)."""
        for log_path in logs:
            if log_path.is_file() and distributed.is_main():
                with atomic_write(self.folder / f"{key}.{log_path.name}", "wb") as f:
                    f.write(log_path.read_bytes())
        self.save_tensors(key, module.state_dict())

    def load_tensors(self, key: str) -> dict[str, torch.Tensor] | None:
        return load_file(str(self._path(key))) if self._path(key).is_file() else None

    def save_tensors(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        if not distributed.is_main():
            return
        save_tensors(self._path(key), tensors)
