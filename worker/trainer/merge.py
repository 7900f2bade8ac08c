"""The base with a job's LoRA merged into it, in 16-bit safetensors with its tokenizer and chat template: a model
`AutoModelForCausalLM.from_pretrained` loads as it is.

Streams the base's safetensors a tensor at a time (never the whole model in memory, so an 8B model merges on a
16 GB gaming PC): each projection LoRA wraps becomes W + (alpha / r) * B @ A, computed in float32 and rounded once
to the output type. Every tensor's name and shape must be the catalog's (`shared.weights`); the adapter's tensors
are data, checked by name, shape and finite values before any is used.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from shared.catalog import BaseModelSpec
from shared.jobspec import JobSpec
from shared.lora import lora_shapes
from shared.weights import weight_shapes
from worker.trainer.errors import WorkerError

SHARD_BYTES = 1024**3  # what one output file holds at most: held in memory until written (shared.memory)
# What a customer needs beside the weights; copied only when they are regular files of the base's folder.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "tokenizer.model")
INDEX = "model.safetensors.index.json"


class BadExportInput(WorkerError):
    """The base in the model cache or the adapter under export is not what the job's model implies."""


def base_files(model_dir: Path) -> list[Path]:
    """The base's safetensors files: one, or the shards its index lists (names of this folder only)."""
    index = model_dir / INDEX
    if index.is_file() and not index.is_symlink():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError):
            raise BadExportInput(f"{INDEX} of the base is unreadable") from None
        files = [model_dir / n for n in names if isinstance(n, str) and "/" not in n and n.endswith(".safetensors")]
        if len(files) != len(names):
            raise BadExportInput(f"{INDEX} of the base names files outside its folder")
        return files
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise BadExportInput(f"no safetensors weights in {model_dir}")
    return [single]


def load_lora(path: Path, base: BaseModelSpec, spec: JobSpec) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The adapter's (A, B) per wrapped weight name, in float32, checked against the job's LoRA shapes."""
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BadExportInput(f"the adapter to export is unreadable: {exc}") from None
    want = lora_shapes(base, r=spec.lora.r, target_modules=spec.lora.target_modules)
    if set(weights) != set(want):
        raise BadExportInput("the adapter's tensors are not this job's LoRA weights")
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, shape in want.items():
        tensor = weights[name]
        if tuple(tensor.shape) != shape or not bool(torch.isfinite(tensor).all()):
            raise BadExportInput(f"{name} has the wrong shape or values that are not finite")
        if name.endswith(".lora_A.weight"):
            target = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight") + ".weight"
            b = weights[name.replace(".lora_A.", ".lora_B.")]
            pairs[target] = (tensor.float(), b.float())
    return pairs


def layout(model_dir: Path) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of the base, in the order `merged_tensors` yields them (no data read)."""
    names = []
    for file in base_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            names.extend((name, tuple(f.get_slice(name).get_shape())) for name in f.keys())  # noqa: SIM118
    return names


def merged_tensors(model_dir: Path, base: BaseModelSpec, lora: dict[str, tuple[torch.Tensor, torch.Tensor]],
                   scale: float, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    """(name, tensor) of the merged model in the base's order, one at a time."""
    want = weight_shapes(base)
    seen: set[str] = set()
    for file in base_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no iterator
                if name not in want or name in seen:
                    raise BadExportInput(f"the base holds a tensor {name[:80]!r} that {base.id} does not have")
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != want[name]:
                    raise BadExportInput(f"the base's {name} has shape {tuple(tensor.shape)}, not {want[name]}")
                seen.add(name)
                if name in lora:
                    a, b = lora[name]
                    tensor = tensor.float() + scale * (b @ a)
                yield name, tensor.to(dtype) if tensor.is_floating_point() else tensor
    missing = set(want) - seen
    if missing:
        raise BadExportInput(f"the base lacks {len(missing)} of {base.id}'s tensors (e.g. {sorted(missing)[0]})")


def _copy_config(model_dir: Path, out: Path, dtype: torch.dtype) -> None:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        raise BadExportInput("the base's config.json is unreadable") from None
    name = str(dtype).removeprefix("torch.")
    config.pop("quantization_config", None)
    config["torch_dtype"] = config["dtype"] = name
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for file in TOKENIZER_FILES:
        source = model_dir / file
        if source.is_file() and not source.is_symlink():
            shutil.copyfile(source, out / file, follow_symlinks=False)


def merge(*, model_dir: Path, adapter: Path, base: BaseModelSpec, spec: JobSpec, out: Path,
          dtype: torch.dtype = torch.bfloat16, lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> Path:
    """Write the merged model to `out` (a new folder) and return it; `lora`: the adapter already loaded."""
    lora = lora if lora is not None else load_lora(adapter, base, spec)
    out.mkdir(parents=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in merged_tensors(model_dir, base, lora, spec.lora.alpha / spec.lora.r, dtype):
        tensor_bytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + tensor_bytes > SHARD_BYTES:
            _write_shard(out, len(shards), shards[-1])
            shards[-1] = {}
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += tensor_bytes
    _finish(out, shards)
    _copy_config(model_dir, out, dtype)
    return out


def _write_shard(out: Path, number: int, tensors: dict[str, torch.Tensor]) -> None:
    """A full shard goes to disk at once (its final name is set when the count is known), freeing its memory."""
    save_file(tensors, str(out / f"part-{number:05d}.safetensors"), metadata={"format": "pt"})
    (out / f"part-{number:05d}.names").write_text(json.dumps(sorted(tensors)))


def _finish(out: Path, shards: list[dict[str, torch.Tensor]]) -> None:
    total = len(shards)
    if total == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    _write_shard(out, total, shards[-1])
    weight_map: dict[str, str] = {}
    for number in range(1, total + 1):
        final = f"model-{number:05d}-of-{total:05d}.safetensors"
        (out / f"part-{number:05d}.safetensors").rename(out / final)
        names_file = out / f"part-{number:05d}.names"
        weight_map.update({name: final for name in json.loads(names_file.read_text())})
        names_file.unlink()
    (out / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
