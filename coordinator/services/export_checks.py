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

from coordinator.services import gguf_probe
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


TAR_BLOCK = 512
TAR_TAIL = 20 * TAR_BLOCK  # what a tar writer pads the end of an archive with: zeros up to a 10 KiB record


def _plain_ustar(path: Path) -> None:
    """Every header a plain POSIX ustar regular file: no pax, GNU or Solaris extension (each reader would read
    those its own way: the coordinator one archive, the customer's `tar -xf` another), no link, a valid checksum,
    and after the end of the archive nothing but its zero padding. The agent writes exactly this."""
    size = path.stat().st_size
    with path.open("rb") as f:
        while True:
            block = f.read(TAR_BLOCK)
            if len(block) < TAR_BLOCK:
                raise ExportRejected("the archive ends inside a header (no end-of-archive marker)")
            if block == bytes(TAR_BLOCK):
                rest = f.read(TAR_TAIL + 1)
                if len(rest) > TAR_TAIL or rest.strip(b"\0"):
                    raise ExportRejected("the archive holds bytes after its end")
                return
            if block[257:265] != b"ustar\x0000" or block[156:157] not in (b"0", b"\0") or block[345:500].strip(b"\0"):
                raise ExportRejected("the archive is not plain ustar of regular files (an extended header, a link, "
                                     "a long name or a GNU archive)")
            try:
                stored = int(block[148:156].rstrip(b"\0 ").strip() or b"-1", 8)
                length = int(block[124:136].rstrip(b"\0 ").strip() or b"-1", 8)
            except ValueError:
                raise ExportRejected("the archive has a malformed tar header") from None
            if stored != sum(block[:148]) + 8 * 32 + sum(block[156:]) or length < 0:
                raise ExportRejected("the archive has a tar header with a bad checksum or size")
            skip = -(-length // TAR_BLOCK) * TAR_BLOCK
            if f.tell() + skip > size:
                raise ExportRejected("a member of the archive runs past its end")
            f.seek(skip, 1)


def check_merged(path: Path, base: BaseModelSpec) -> dict[str, Any]:
    """The merged model's archive, checked member by member as it streams; its facts ({files, tensors})."""
    _plain_ustar(path)
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


def _check_layout(path: Path, tensors: list[dict[str, Any]], data_offset: int, alignment: int) -> None:
    """The tensors tile the data section in order, each where the last ended (aligned), as llama.cpp loads them;
    after the last one nothing but its zero padding."""
    size = path.stat().st_size
    position = data_offset
    for t in sorted(tensors, key=lambda t: t["offset"]):
        if t["offset"] != position:
            raise ExportRejected(f"{t['name']} is not where the tensor before it ends: the tensors overlap or leave "
                                 "bytes unaccounted for")
        end = t["offset"] + t["bytes"]
        position = end + (-end % alignment)
    last = max(t["offset"] + t["bytes"] for t in tensors)
    if not last <= size <= position:
        raise ExportRejected("the file holds bytes after its last tensor" if size > position
                             else "the last tensor's data runs past the end of the file")
    with path.open("rb") as f:
        f.seek(last)
        if f.read(size - last).strip(b"\0"):
            raise ExportRejected("the file holds bytes after its last tensor")


def _finite(path: Path, t: dict[str, Any]) -> bool:
    with path.open("rb") as f:
        f.seek(t["offset"])
        left = t["bytes"]
        while left:
            piece = f.read(min(left, 1 << 20))
            if not piece or not finite(piece, t["type"]):
                return False
            left -= len(piece)
    return True


def check_gguf(path: Path, base: BaseModelSpec, fmt: str) -> dict[str, Any]:
    """A GGUF upload of format `fmt`, parsed in a bounded child (`gguf_probe`); its facts ({tensors, types})."""
    size = path.stat().st_size
    if size > upload_limit(base, fmt):
        raise ExportRejected(f"the file is {size} bytes, more than a {GGUF_TYPES[fmt]} export of {base.id} takes")
    try:
        probed = gguf_probe.probe(path)
    except gguf_probe.ProbeFailed as exc:
        raise ExportRejected(str(exc)) from None
    fields = probed["fields"]
    if fields.get("general.architecture") != GGUF_ARCH.get(base.architecture):
        raise ExportRejected(f"its architecture is {fields.get('general.architecture')!r}, not {base.architecture!r}")
    if fields.get("tokenizer.ggml.model") != "gpt2" or probed["tokens"] != base.vocab_size:
        raise ExportRejected(f"its vocabulary is not {base.id}'s ({base.vocab_size} byte-level BPE tokens)")
    alignment = fields.get("general.alignment", 32)
    if type(alignment) is not int or alignment not in (8, 16, 32, 64, 128, 256):
        raise ExportRejected("its alignment is not one llama.cpp uses")
    want = _gguf_names(base)
    head_dim = base.hidden_size // base.attention_heads
    optional = {"rope_freqs.weight": (head_dim // 2,)} if base.architecture == "llama" else {}
    found = probed["tensors"]
    names = {t["name"] for t in found}
    if len(names) != len(found) or not set(want) <= names or not names <= set(want) | set(optional):
        raise ExportRejected("its tensors are not the model's")
    _check_layout(path, found, probed["data_offset"], alignment)
    types = set()
    for t in found:
        shape = tuple(t["shape"])
        if shape != {**want, **optional}[t["name"]]:
            raise ExportRejected(f"{t['name']} has shape {list(shape)}")
        allowed = frozenset({"F32"}) if len(shape) == 1 else GGUF_ALLOWED[fmt]
        if t["type"] not in allowed:
            raise ExportRejected(f"{t['name']} is {t['type']}, which a {GGUF_TYPES[fmt]} file does not hold")
        if t["type"] in ("F16", "F32") and not _finite(path, t):
            raise ExportRejected(f"{t['name']} holds values that are not finite")
        types.add(t["type"])
    if GGUF_MAIN[fmt] not in types:
        raise ExportRejected(f"no tensor is {GGUF_MAIN[fmt]}: this is not a {GGUF_TYPES[fmt]} file")
    return {"tensors": len(found), "types": sorted(types)}
