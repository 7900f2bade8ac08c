"""The model cache: base models by catalog id in a local folder, fetched once and reported to the coordinator
so placement prefers workers that already hold a model.

Real models come from the Hugging Face Hub (`huggingface_hub.snapshot_download`); the tiny test model has
no repository and is built locally by the trainer package. A model is usable only once its folder carries
the `.complete` marker, so an interrupted download is never mistaken for a model.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from shared.catalog import CATALOG, get_base_model

MARKER = ".complete"
BUILD_TIMEOUT_S = 600


class ModelCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, model_id: str) -> Path:
        return self.root / get_base_model(model_id).id

    def cached(self) -> list[str]:
        return [m.id for m in CATALOG if (self.root / m.id / MARKER).is_file()]

    def ensure(self, model_id: str) -> Path:
        """The model's folder, fetched or built when missing."""
        spec = get_base_model(model_id)
        target = self.root / spec.id
        if (target / MARKER).is_file():
            return target
        partial = target.with_name(f".{target.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        if spec.hf_repo is None:
            # Built by the trainer package (torch), in a subprocess: the agent itself never imports torch.
            subprocess.run([sys.executable, "-m", "worker.trainer.tiny", "--out", str(partial)], check=True,
                           capture_output=True, timeout=BUILD_TIMEOUT_S)
        else:
            from huggingface_hub import snapshot_download  # noqa: PLC0415 - only when a real model is needed

            snapshot_download(repo_id=spec.hf_repo, local_dir=partial,
                              allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"])
        (partial / MARKER).write_text(spec.id)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        return target
