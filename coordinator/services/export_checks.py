"""What an export's uploads must be before they become a customer's files: the merged model's tar and GGUF files,
read as data (never loaded as a model) and checked against the job's base model.

- merged (`.tar`, uncompressed: safetensors do not shrink): one level of allow-listed regular files; the weights
  (one `model.safetensors`, or numbered shards with their index) hold exactly the base's tensors
  (`shared.weights.weight_shapes`) in bfloat16 with finite values; `config.json` states the base's figures; no JSON
  file names code to run (`auto_map`, which `trust_remote_code` would import).
- GGUF: llama.cpp's own reader (`gguf.GGUFReader`) parses it; the architecture, the tensors (names, shapes) and the
  vocabulary size are the base's, the tensor types the format's, the data within the file, F16/F32 values finite.

A worker's weights can still be wrong in value (an export is not re-run); what these checks make sure of is that a
file is what its name says, loads without running anything of the worker's, and cannot hide more than it shows.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

from shared.catalog import BaseModelSpec
from shared.checkpoint import CheckpointRejected, finite, guarded_tar, read_safetensors
from shared.weights import GGUF_TYPES, MERGED_SHARD, MERGED_SIDE_FILES, export_bytes, weight_shapes

TEXT_FILES = frozenset({"chat_template.jinja"})
BINARY_FILES = frozenset({"tokenizer.model"})  # SentencePiece's vocabulary (protobuf data)
JSON_FILES = MERGED_SIDE_FILES - TEXT_FILES - BINARY_FILES
SHARD = MERGED_SHARD
MAX_SIDE_FILE = 64 * 1024 * 1024  # a tokenizer.json of a 256k vocabulary is about 35 MB
MAX_MEMBERS = 256
HEADER_BYTES_PER_TENSOR = 512
CONFIG_FIGURES = {"hidden_size": "hidden_size", "num_hidden_layers": "layers", "num_attention_heads": "attention_heads",
                  "num_key_value_heads": "kv_heads", "intermediate_size": "intermediate_size",
                  "vocab_size": "vocab_size"}
# Types each GGUF format may hold: quantized matrices (llama.cpp falls back to a nearby type for a matrix whose
# rows do not divide into the format's blocks), float16 or float32 for the rest.
GGUF_ALLOWED = {
    "gguf:f16": frozenset({"F16", "F32"}),
    "gguf:q8_0": frozenset({"Q8_0", "F16", "F32"}),
    "gguf:q4_k_m": frozenset({"Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "F32"}),
}
GGUF_MAIN = {"gguf:f16": "F16", "gguf:q8_0": "Q8_0", "gguf:q4_k_m": "Q4_K"}
GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2"}


class ExportRejected(Exception):
    """An upload is not the export it claims to be; the message says why."""


def upload_limit(base: BaseModelSpec, fmt: str) -> int:
    """The most bytes an upload of this format may take: the format's size with room for metadata and the
    tokenizer (a GGUF's vocabulary, a merged model's side files)."""
    return int(export_bytes(base, fmt) * 1.05) + len(JSON_FILES | TEXT_FILES | BINARY_FILES) * MAX_SIDE_FILE


# --- merged -------------------------------------------------------------------------------------------------

def _json(raw: bytes, name: str) -> Any:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ExportRejected(f"{name} is not JSON") from None
    if not isinstance(value, dict):
        raise ExportRejected(f"{name} is not a JSON object")
    if "auto_map" in value:
        raise ExportRejected(f"{name} names code to load (auto_map)")
    return value


def _check_config(config: dict[str, Any], base: BaseModelSpec) -> None:
    for key, field in CONFIG_FIGURES.items():
        if config.get(key) != getattr(base, field):
            raise ExportRejected(f"config.json says {key}={config.get(key)!r}; {base.id} has {getattr(base, field)}")
    if config.get("model_type") != base.architecture:
        raise ExportRejected(f"config.json says model_type={config.get('model_type')!r}, not {base.architecture!r}")


def check_merged(path: Path, base: BaseModelSpec) -> dict[str, Any]:
    """The merged model's archive, checked member by member as it streams; its facts ({files, tensors})."""
    want = weight_shapes(base)
    limit = upload_limit(base, "merged")
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    where: dict[str, str] = {}
    sides: dict[str, Any] = {}
    shards: set[str] = set()
    try:
        with path.open("rb") as raw, tarfile.open(fileobj=guarded_tar(raw, limit=limit), mode="r|") as tar:  # type: ignore[call-overload]
            for count, member in enumerate(tar, start=1):
                if count > MAX_MEMBERS:
                    raise ExportRejected(f"the archive has more than {MAX_MEMBERS} members")
                name = member.name
                if not member.isreg() or "/" in name or name in sides or name in shards:
                    raise ExportRejected(f"{name[:80]!r} is not a file of the archive's one level, or appears twice")
                data = tar.extractfile(member)
                assert data is not None
                if name == "model.safetensors" or SHARD.fullmatch(name):
                    found = read_safetensors(data, size=member.size, name=name,
                                             max_header=1024 + HEADER_BYTES_PER_TENSOR * len(want))
                    for key in found:
                        if key in tensors:
                            raise ExportRejected(f"tensor {key[:80]!r} appears in two files")
                        where[key] = name
                    tensors.update(found)
                    shards.add(name)
                elif name in JSON_FILES | TEXT_FILES | BINARY_FILES:
                    if member.size > MAX_SIDE_FILE:
                        raise ExportRejected(f"{name} is {member.size} bytes (at most {MAX_SIDE_FILE})")
                    blob = data.read(member.size)
                    if name in JSON_FILES:
                        sides[name] = _json(blob, name)
                    elif name in TEXT_FILES:
                        try:
                            sides[name] = blob.decode("utf-8")
                        except UnicodeDecodeError:
                            raise ExportRejected(f"{name} is not UTF-8 text") from None
                    else:
                        sides[name] = len(blob)
                else:
                    raise ExportRejected(f"{name[:80]!r} is not a file a merged model holds")
    except CheckpointRejected as exc:
        raise ExportRejected(str(exc)) from None
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise ExportRejected(f"not a readable .tar archive ({exc.__class__.__name__})") from None
    _check_weights(tensors, want, where, shards, sides.get("model.safetensors.index.json"))
    if "config.json" not in sides:
        raise ExportRejected("the archive lacks config.json")
    _check_config(sides["config.json"], base)
    if "tokenizer.json" not in sides and "tokenizer.model" not in sides:
        raise ExportRejected("the archive lacks the tokenizer")
    return {"files": sorted([*sides, *shards]), "tensors": len(tensors)}


def _check_weights(tensors: dict[str, tuple[str, tuple[int, ...]]], want: dict[str, tuple[int, ...]],
                   where: dict[str, str], shards: set[str], index: dict[str, Any] | None) -> None:
    if set(tensors) != set(want):
        extra, missing = sorted(set(tensors) - set(want)), sorted(set(want) - set(tensors))
        raise ExportRejected(f"the weights are not the model's: {len(missing)} missing (e.g. {missing[:1]}), "
                             f"{len(extra)} unknown (e.g. {[e[:80] for e in extra[:1]]})")
    for key, (dtype, shape) in tensors.items():
        if shape != want[key] or dtype != "BF16":
            raise ExportRejected(f"{key} is {dtype} {list(shape)}; the model's is BF16 {list(want[key])}")
    if shards == {"model.safetensors"}:
        if index is not None:
            raise ExportRejected("a single-file model has no index")
        return
    numbers = sorted(SHARD.fullmatch(s).groups() for s in shards)  # type: ignore[union-attr]
    total = len(shards)
    if "model.safetensors" in shards or numbers != [(f"{i:05d}", f"{total:05d}") for i in range(1, total + 1)]:
        raise ExportRejected("the weight files are not one file or a complete numbered series")
    if index is None or not isinstance(index.get("weight_map"), dict) or index["weight_map"] != where:
        raise ExportRejected("model.safetensors.index.json does not say where each tensor is")


# --- GGUF ---------------------------------------------------------------------------------------------------

def _gguf_names(base: BaseModelSpec) -> dict[str, tuple[int, ...]]:
    """The GGUF names and shapes (GGML's order: columns first) of the model's tensors."""
    import gguf  # noqa: PLC0415 - only when a GGUF upload is checked

    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[base.architecture]
    names = gguf.get_tensor_name_map(arch, base.layers)
    out = {}
    for hf_name, shape in weight_shapes(base).items():
        target = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ValueError(f"no GGUF name for {hf_name}")
        out[target] = tuple(reversed(shape))
    return out


def check_gguf(path: Path, base: BaseModelSpec, fmt: str) -> dict[str, Any]:
    """A GGUF upload of format `fmt`; its facts ({tensors, types})."""
    import gguf  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    size = path.stat().st_size
    if size > upload_limit(base, fmt):
        raise ExportRejected(f"the file is {size} bytes, more than a {GGUF_TYPES[fmt]} export of {base.id} takes")
    try:
        reader = gguf.GGUFReader(path)
        fields = {name: reader.fields[name].contents() for name in
                  ("general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.tokens") if name in reader.fields}
        found = [(t.name, tuple(int(d) for d in t.shape), t.tensor_type.name, int(t.data_offset), int(t.n_bytes),
                  t.data) for t in reader.tensors]
    except Exception as exc:  # noqa: BLE001 - any parse failure of a stranger's file is a refusal
        raise ExportRejected(f"not a readable GGUF file ({exc.__class__.__name__})") from None
    if fields.get("general.architecture") != GGUF_ARCH.get(base.architecture):
        raise ExportRejected(f"its architecture is {fields.get('general.architecture')!r}, not {base.architecture!r}")
    if fields.get("tokenizer.ggml.model") != "gpt2" or len(fields.get("tokenizer.ggml.tokens") or ()) != base.vocab_size:
        raise ExportRejected(f"its vocabulary is not {base.id}'s ({base.vocab_size} byte-level BPE tokens)")
    want = _gguf_names(base)
    head_dim = base.hidden_size // base.attention_heads
    optional = {"rope_freqs.weight": (head_dim // 2,)} if base.architecture == "llama" else {}
    names = {name for name, *_ in found}
    if len(names) != len(found) or not set(want) <= names or not names <= set(want) | set(optional):
        raise ExportRejected("its tensors are not the model's")
    types = set()
    for name, shape, kind, offset, nbytes, data in found:
        if shape != {**want, **optional}[name]:
            raise ExportRejected(f"{name} has shape {list(shape)}")
        allowed = frozenset({"F32"}) if len(shape) == 1 else GGUF_ALLOWED[fmt]
        if kind not in allowed:
            raise ExportRejected(f"{name} is {kind}, which a {GGUF_TYPES[fmt]} file does not hold")
        if offset + nbytes > size:
            raise ExportRejected(f"{name}'s data runs past the end of the file")
        if kind in ("F16", "F32") and not finite(np.ascontiguousarray(data).tobytes(), kind):
            raise ExportRejected(f"{name} holds values that are not finite")
        types.add(kind)
    if GGUF_MAIN[fmt] not in types:
        raise ExportRejected(f"no tensor is {GGUF_MAIN[fmt]}: this is not a {GGUF_TYPES[fmt]} file")
    return {"tensors": len(found), "types": sorted(types)}
