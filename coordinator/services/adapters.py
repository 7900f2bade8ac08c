"""Checks on an adapter a worker returns, before its job may succeed.

The archive is read without extracting anything: only regular files under `adapter/`, no links,
no absolute or parent paths, bounded count and sizes (a decompression bomb stops at the limit). Then
the PEFT config must match the job's LoRA spec and base model, the safetensors header must hold the
LoRA tensors that spec implies (so an empty or foreign adapter fails), and the final loss must agree
with the progress the worker reported while training.
"""

from __future__ import annotations

import json
import math
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from shared.catalog import BaseModelSpec
from shared.checkpoint import CheckpointRejected, check_tensor_data
from shared.memory import lora_parameters

MAX_MEMBERS = 16
MAX_CONFIG_BYTES = 64 * 1024
MAX_HEADER_BYTES = 16 * 1024 * 1024
REQUIRED = ("adapter_config.json", "adapter_model.safetensors")
ALL_LINEAR = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}
# The worker's final loss may differ from its last progress report (averaging, a last partial step),
# but not by more than this factor.
LOSS_TOLERANCE = 0.5


@dataclass(frozen=True, slots=True)
class AdapterFacts:
    parameters: int
    config: dict[str, Any]


class AdapterRejected(Exception):
    """The adapter fails a check; the message says which."""


def _read_members(archive: Path, *, max_bytes: int) -> dict[str, bytes]:
    """The config and the safetensors header (not the weights) from the archive, checked member by member."""
    found: dict[str, bytes] = {}
    total = 0
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for count, member in enumerate(tar, start=1):
                if count > MAX_MEMBERS:
                    raise AdapterRejected(f"the archive has more than {MAX_MEMBERS} entries")
                path = PurePosixPath(member.name)
                if path.is_absolute() or ".." in path.parts:
                    raise AdapterRejected(f"unsafe path in the archive: {member.name!r}")
                if member.isdir():
                    continue
                if not member.isfile():
                    raise AdapterRejected(f"{member.name!r} is not a regular file (links and devices are refused)")
                total += member.size
                if total > max_bytes:
                    raise AdapterRejected(f"the archive unpacks to more than {max_bytes} bytes")
                if path.parts[0] != "adapter" or len(path.parts) != 2:
                    continue
                name = path.parts[1]
                source = tar.extractfile(member)
                assert source is not None
                if name == "adapter_config.json":
                    if member.size > MAX_CONFIG_BYTES:
                        raise AdapterRejected("adapter_config.json is implausibly large")
                    found[name] = source.read()
                elif name == "adapter_model.safetensors":
                    found[name] = _safetensors_header(source, size=member.size)
                    _check_values(source, found[name])
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise AdapterRejected(f"not a readable .tar.gz archive ({exc.__class__.__name__})") from None
    missing = [n for n in REQUIRED if n not in found]
    if missing:
        raise AdapterRejected(f"the archive lacks adapter/{', adapter/'.join(missing)}")
    return found


def _check_values(source: Any, header_blob: bytes) -> None:
    """Every weight finite, read after the header is checked in full (`_tensor_parameters`)."""
    _tensor_parameters(header_blob)
    try:
        header = json.loads(header_blob[:-8])
        spans = [(t["data_offsets"][0], t["data_offsets"][1], t["dtype"], k) for k, t in header.items()
                 if k != "__metadata__" and isinstance(t, dict) and t.get("dtype") in DTYPE_BYTES]
    except (ValueError, KeyError, TypeError, IndexError, RecursionError):
        return
    try:
        check_tensor_data(source, spans, name="adapter_model.safetensors")
    except CheckpointRejected as exc:
        raise AdapterRejected(str(exc)) from None


def _safetensors_header(source: Any, *, size: int) -> bytes:
    head = source.read(8)
    if len(head) != 8:
        raise AdapterRejected("adapter_model.safetensors is truncated")
    (length,) = struct.unpack("<Q", head)
    if length > MAX_HEADER_BYTES or length + 8 > size:
        raise AdapterRejected("adapter_model.safetensors has an invalid header length")
    header = source.read(length)
    # The weights' bytes follow the header; their size must match what the header declares.
    return header + struct.pack("<Q", size - 8 - length)


def _tensor_parameters(header_blob: bytes) -> int:
    """LoRA parameters the safetensors header declares, after checking it describes exactly the bytes that follow:
    known dtypes, shapes of positive ints, and offsets that tile the data without gaps or overlaps."""
    header_bytes, data_size = header_blob[:-8], struct.unpack("<Q", header_blob[-8:])[0]
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdapterRejected("adapter_model.safetensors has an unreadable header") from None
    if not isinstance(header, dict):
        raise AdapterRejected("adapter_model.safetensors has a malformed header")
    parameters, spans = 0, []
    for name, tensor in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(tensor, dict) or tensor.get("dtype") not in DTYPE_BYTES:
            raise AdapterRejected(f"tensor {name!r} has an unsupported dtype")
        if "lora_" not in name:
            raise AdapterRejected(f"tensor {name!r} is not a LoRA weight")
        shape, offsets = tensor.get("shape"), tensor.get("data_offsets")
        if (not isinstance(shape, list) or not shape
                or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
            raise AdapterRejected(f"tensor {name!r} has an invalid shape")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
            raise AdapterRejected(f"tensor {name!r} has invalid data offsets")
        count = math.prod(shape)
        if offsets[1] - offsets[0] != count * DTYPE_BYTES[tensor["dtype"]]:
            raise AdapterRejected(f"tensor {name!r} does not span the bytes its shape needs")
        parameters += count
        spans.append((offsets[0], offsets[1]))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise AdapterRejected("adapter_model.safetensors has gaps or overlaps between tensors")
        position = end
    if position != data_size:
        raise AdapterRejected(f"adapter_model.safetensors holds {data_size} bytes of weights, its header says {position}")
    return parameters


def adapter_limit(base: BaseModelSpec, lora: dict[str, Any]) -> int:
    """The most bytes an adapter of this job unpacks to: its LoRA weights at the widest dtype, their header, the
    config and the archive's own overhead. An upload or archive past it is refused."""
    targets = sorted(_expected_targets(lora))
    tensors = 2 * base.layers * len(targets)
    weights = max(DTYPE_BYTES.values()) * lora_parameters(base, r=lora["r"], target_modules=targets)
    return weights + 8 + 1024 + 512 * tensors + MAX_CONFIG_BYTES + 64 * 1024 * MAX_MEMBERS


def _expected_targets(lora: dict[str, Any]) -> frozenset[str]:
    targets = lora.get("target_modules", "all-linear")
    return ALL_LINEAR if targets == "all-linear" else frozenset(targets)


def verify_adapter(
    archive: Path, *, base: BaseModelSpec, lora: dict[str, Any], final_loss: float | None,
    reported_losses: list[float], max_bytes: int,
) -> AdapterFacts:
    members = _read_members(archive, max_bytes=max_bytes)
    try:
        config = json.loads(members["adapter_config.json"])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdapterRejected("adapter_config.json is not valid JSON") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise AdapterRejected("adapter_config.json is not a LoRA config")
    if type(config.get("r")) is not int or config.get("r") != lora["r"] or config.get("lora_alpha") != lora["alpha"]:
        raise AdapterRejected(f"LoRA r/alpha {config.get('r')}/{config.get('lora_alpha')} do not match the job's "
                              f"{lora['r']}/{lora['alpha']}")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise AdapterRejected("adapter_config.json has malformed target_modules")
    # PEFT may write module names ("q_proj") or full paths ("model.layers.0.self_attn.q_proj"): compare the names.
    got = frozenset(t.rsplit(".", 1)[-1] for t in targets)
    if got != _expected_targets(lora) and not (got == {"all-linear"} and lora.get("target_modules") == "all-linear"):
        raise AdapterRejected(f"target modules {sorted(got)} do not match the job's")
    parameters = _tensor_parameters(members["adapter_model.safetensors"])
    target_list = sorted(_expected_targets(lora))
    expected = lora_parameters(base, r=lora["r"], target_modules=target_list)
    if parameters != expected:
        raise AdapterRejected(f"the adapter has {parameters} LoRA parameters; {base.id} with r={lora['r']} has {expected}")
    if not reported_losses:
        raise AdapterRejected("no training progress was reported for this lease")
    if final_loss is not None:
        last = reported_losses[-1]
        if not math.isfinite(final_loss) or abs(final_loss - last) > LOSS_TOLERANCE * max(last, 1e-6):
            raise AdapterRejected(f"the final loss {final_loss:.4f} disagrees with the last reported loss {last:.4f}")
    return AdapterFacts(parameters=parameters, config=config)
