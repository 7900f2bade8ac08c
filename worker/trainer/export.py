"""The export program (`spec.kind == "export"`): a job's adapter merged into its base, written in the formats the
lease asks for (`spec.export`), on the worker that holds the base already.

Reads `spec.json`, the base from `spec.model_dir` and `initial/adapter_model.safetensors` (the coordinator's checked
copy of the job's adapter, or of a checkpoint's). Writes under `out/exports/` the names `shared.weights.export_name`
gives: `merged/` (16-bit safetensors, tokenizer and chat template: `merge.py`) and `model-<type>.gguf`
(`gguf_export.py`; the F16 file is written once and the quantized types made from it). Each format done is a
progress line (`exported`, its seconds and bytes) and `out/export.json` sums them up.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from shared.catalog import get_base_model
from shared.jobspec import JobSpec
from shared.weights import export_name
from worker.trainer import gguf_export, merge
from worker.trainer.errors import UserError
from worker.trainer.progress import Progress

ADAPTER = Path("initial") / "adapter_model.safetensors"  # the agent unpacks the adapter to export there
F16_WORK = "work-f16.gguf"  # the F16 file quantized types start from, when F16 itself was not asked for


def _bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return path.stat().st_size


def run(spec: JobSpec, job_dir: Path, progress: Progress) -> dict[str, Any]:
    base = get_base_model(spec.base_model)
    model_dir = Path(spec.model_dir)
    if not spec.export:
        raise UserError("an export lease names no format")
    if not (model_dir / "config.json").is_file():
        raise UserError(f"no model at {model_dir} (config.json missing)")
    lora = merge.load_lora(job_dir / ADAPTER, base, spec)
    out = job_dir / "out" / "exports"
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    progress.emit("started", kind="export", total_steps=len(spec.export), device=device, formats=spec.export)
    scale = spec.lora.alpha / spec.lora.r
    figures: dict[str, dict[str, float]] = {}
    f16: Path | None = None
    for fmt in spec.export:
        started = time.monotonic()
        target = out / export_name(fmt)
        if fmt == "merged":
            merge.merge(model_dir=model_dir, adapter=job_dir / ADAPTER, base=base, spec=spec, out=target, lora=lora)
        else:
            if f16 is None:
                f16 = out / (export_name("gguf:f16") if "gguf:f16" in spec.export else F16_WORK)
                gguf_export.write_f16(model_dir=model_dir, base=base, out=f16, name=spec.export_name or spec.job_id,
                                      tensors=lambda: merge.merged_tensors(model_dir, base, lora, scale, torch.float32))
            if fmt != "gguf:f16":
                gguf_export.quantize(source=f16, out=target, fmt=fmt)
        figures[fmt] = {"seconds": round(time.monotonic() - started, 3), "bytes": _bytes(target)}
        progress.emit("exported", format=fmt, **figures[fmt])
    if f16 is not None and f16.name == F16_WORK:
        os.unlink(f16)
    return {"formats": figures}
