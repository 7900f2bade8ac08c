"""A resumable checkpoint: what it holds, and the checks every reader runs before trusting a byte of it.

A checkpoint is a folder of exactly these files (in an archive, under `resume/`), data and never code:
- `adapter_model.safetensors`: the LoRA weights, with PEFT's names and shapes for the job (`shared.lora`);
- `optimizer.safetensors`: AdamW's state per LoRA weight: `exp_avg/<name>`, `exp_avg_sq/<name>` (the weight's
  shape and dtype) and `step/<name>` (a float32 scalar);
- `rng.safetensors`: torch's generator states as bytes: `torch` (the CPU's) and, on a GPU, `cuda`;
- `state.json`: the step, the tokens trained, the learning rates, the scheduler's counters, Python's RNG
  state and the data order, against a strict schema (`CheckpointState`);
- with early stopping, `best_adapter.safetensors` too: the LoRA weights of the step with the best validation
  loss so far, when that step is an earlier one (`state.json` names it and its loss).

The coordinator checks every upload with `check_archive` (streaming, nothing extracted); the agent runs the same
check while it unpacks into `resume/` (`extract_to`), and the trainer validates `state.json` and the tensors'
names and shapes again when it loads them. Every bound comes from the job: member names, sizes, tensor names,
shapes and dtypes, the inflated size of the archive, the step and the learning rate.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import stat
import struct
import tarfile
import zlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import IO, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.catalog import get_base_model
from shared.jobspec import JobSpec
from shared.lora import lora_shapes

FORMAT = "tunegrid.checkpoint/1"
ROOT = "resume"  # the archive's one folder, and the job folder's subfolder the agent unpacks it into
ADAPTER, OPTIMIZER, RNG, STATE = "adapter_model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"
MEMBERS = (ADAPTER, OPTIMIZER, RNG, STATE)
BEST = "best_adapter.safetensors"  # optional: early stopping's best weights, when they are not the current ones
ALLOWED = (*MEMBERS, BEST)
MOMENTS = ("exp_avg", "exp_avg_sq")
WEIGHT_DTYPES = {"F32": 4, "BF16": 2, "F16": 2}
DTYPE_BYTES = {**WEIGHT_DTYPES, "U8": 1}
TORCH_RNG_BYTES = 5056  # torch's CPU Mersenne Twister state
CUDA_RNG_BYTES = 16  # a CUDA Philox generator: seed and offset
MAX_STATE_BYTES = 64 * 1024
HEADER_BYTES_PER_TENSOR = 512
MAX_ENTRIES = len(ALLOWED) + 1  # the folder and its files
MAX_METADATA = 8
# Auto batch sizes never exceed this many rows a micro-batch; it bounds the tokens a step can claim.
MAX_AUTO_BATCH = 256


class CheckpointRejected(Exception):
    """The checkpoint fails a check; the message says which."""


# --- state.json -----------------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


Word = Annotated[int, Field(ge=0, lt=2**32)]


class PythonRng(_Strict):
    """`random.getstate()`: version 3, 624 words of the Mersenne Twister and its position, the cached gauss."""

    version: Literal[3]
    state: Annotated[list[Word], Field(min_length=625, max_length=625)]
    gauss: float | None


class OptimizerState(_Strict):
    lr: float = Field(ge=0)
    initial_lr: float = Field(gt=0)


class SchedulerState(_Strict):
    last_epoch: int = Field(ge=0)
    step_count: int = Field(ge=1)
    base_lrs: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=1, max_length=1)]
    last_lr: Annotated[list[Annotated[float, Field(ge=0)]], Field(min_length=1, max_length=1)]


class DataOrder(_Strict):
    """Each epoch's order is a permutation seeded by `seed + epoch` over `rows` packed rows."""

    seed: int = Field(ge=0, le=2**31 - 1)
    rows: int = Field(ge=1, le=2**31 - 1)


class EarlyStoppingState(_Strict):
    """The best evaluation so far; its weights are `best_adapter.safetensors` unless it is this very step."""

    best_step: int = Field(ge=1, le=10**9)
    best_valid_loss: float = Field(ge=0, le=1e6)
    evals_since_best: int = Field(ge=0, le=10**6)


class CheckpointState(_Strict):
    format: Literal["tunegrid.checkpoint/1"]
    step: int = Field(ge=1, le=10**9)
    trained_tokens: int = Field(ge=0, le=10**15)
    optimizer: OptimizerState
    scheduler: SchedulerState
    python_rng: PythonRng
    data_order: DataOrder
    early_stopping: EarlyStoppingState | None = None

    @property
    def holds_best(self) -> bool:
        """Whether the checkpoint must carry `best_adapter.safetensors`."""
        return self.early_stopping is not None and self.early_stopping.best_step < self.step


# --- what a job allows --------------------------------------------------------------------------

@dataclass(frozen=True)
class CheckpointRules:
    """What a checkpoint of this job may hold; `max_step` is the highest step the reader will accept."""

    base_model: str
    r: int
    target_modules: str | tuple[str, ...]
    learning_rate: float
    seed: int
    max_step: int
    max_tokens_per_step: int
    gpu: bool = True  # whether a `cuda` generator state may be present
    early_stopping: bool = False  # whether the job stops early (and its checkpoints may carry the best weights)
    adapter_shapes: dict[str, tuple[int, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        shapes = lora_shapes(get_base_model(self.base_model), r=self.r, target_modules=self.target_modules)
        object.__setattr__(self, "adapter_shapes", shapes)

    @classmethod
    def for_spec(cls, spec: JobSpec, *, max_step: int, gpu: bool = True) -> CheckpointRules:
        hp = spec.hyperparameters
        rows = hp.batch_size if hp.batch_size != "auto" else MAX_AUTO_BATCH
        targets = spec.lora.target_modules
        return cls(base_model=spec.base_model, r=spec.lora.r,
                   target_modules=targets if isinstance(targets, str) else tuple(targets),
                   learning_rate=hp.learning_rate, seed=spec.seed, max_step=max_step, gpu=gpu,
                   max_tokens_per_step=rows * hp.gradient_accumulation_steps * spec.max_seq_len,
                   early_stopping=spec.early_stopping_patience is not None)

    @cached_property
    def parameters(self) -> int:
        return sum(math.prod(s) for s in self.adapter_shapes.values())

    def header_limit(self, tensors: int) -> int:
        return 1024 + HEADER_BYTES_PER_TENSOR * tensors

    def member_limits(self) -> dict[str, int]:
        """The most bytes each member may hold: its header plus the largest data its tensors allow."""
        n = len(self.adapter_shapes)
        widest = max(WEIGHT_DTYPES.values())
        return {
            ADAPTER: 8 + self.header_limit(n) + widest * self.parameters,
            BEST: 8 + self.header_limit(n) + widest * self.parameters,
            OPTIMIZER: 8 + self.header_limit(3 * n) + 2 * widest * self.parameters + 4 * n,
            RNG: 8 + self.header_limit(2) + TORCH_RNG_BYTES + CUDA_RNG_BYTES,
            STATE: MAX_STATE_BYTES,
        }

    def inflate_limit(self) -> int:
        """The most bytes the archive may inflate to: its members, their tar headers and padding."""
        return sum(self.member_limits().values()) + 64 * 1024

    def upload_limit(self) -> int:
        """The most bytes a compressed upload may take (gzip never grows data by more than a little)."""
        return self.inflate_limit() + self.inflate_limit() // 1000 + 64 * 1024


@dataclass(frozen=True, slots=True)
class CheckpointFacts:
    step: int
    trained_tokens: int
    bytes: int  # inflated
    state: CheckpointState


# --- reading ----------------------------------------------------------------------------------------

class _Bounded:
    """A read-only stream that refuses to yield more than `limit` bytes in all (a gzip bomb stops here)."""

    def __init__(self, inner: IO[bytes], limit: int) -> None:
        self.inner, self.limit, self.count = inner, limit, 0

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self.limit - self.count + 1
        chunk = self.inner.read(min(size, self.limit - self.count + 1))
        self.count += len(chunk)
        if self.count > self.limit:
            raise CheckpointRejected(f"the archive inflates to more than {self.limit} bytes")
        return chunk


EXTENDED_TYPES = frozenset(b"xgXLK")  # pax (and Solaris' X, which tarfile reads as pax), GNU long names


class _TarHeaderGuard:
    """The inflated tar stream on its way to `tarfile`, watched header by header: an extended header (pax, GNU
    long name, Solaris' X) is refused before tarfile reads it (whole, into memory; and a pax `size` record would
    make tarfile step through the archive otherwise than this guard does)."""

    def __init__(self, inner: _Bounded) -> None:
        self.inner, self.position, self.next_header, self.pending, self.done = inner, 0, 0, b"", False

    @property
    def count(self) -> int:
        return self.inner.count

    def read(self, size: int = -1) -> bytes:
        chunk = self.inner.read(size)
        if not self.done:
            self._watch(chunk)
        self.position += len(chunk)
        return chunk

    def _watch(self, chunk: bytes) -> None:
        start = self.position - len(self.pending)
        data = self.pending + chunk
        while not self.done and self.next_header + 512 <= start + len(data):
            offset = self.next_header - start
            if offset < 0:  # the header lies before what is kept: cannot happen with sequential reads
                raise CheckpointRejected("the archive could not be read in order")
            block = data[offset:offset + 512]
            if block == bytes(512):
                self.done = True  # the end-of-archive marker; tarfile reads no further headers
                break
            size = _tar_size(block[124:136])
            if block[156] in EXTENDED_TYPES:  # the agent writes none; each reader reads them its own way
                raise CheckpointRejected(f"the archive has an extended header of {size} bytes (pax, GNU or "
                                         "Solaris): checkpoints are plain tar")
            self.next_header += 512 + -(-size // 512) * 512
        offset = self.next_header - start  # a header that has begun but not ended is kept for the next read
        self.pending = data[offset:] if not self.done and 0 <= offset < len(data) else b""


def _tar_size(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # base-256: only for sizes past 8 GiB
        return int.from_bytes(field[1:], "big")
    digits = field.rstrip(b"\0 ").lstrip(b" ")
    try:
        return int(digits or b"0", 8)
    except ValueError:
        raise CheckpointRejected("the archive has a malformed tar header") from None


def _read_exact(source: IO[bytes], n: int, what: str) -> bytes:
    parts, left = [], n
    while left:
        chunk = source.read(min(left, 1 << 20))
        if not chunk:
            raise CheckpointRejected(f"{what} is truncated")
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class _Tensor:
    dtype: str
    shape: tuple[int, ...]


def _safetensors(source: IO[bytes], *, size: int, name: str, max_header: int, sink: IO[bytes] | None) -> dict[str, _Tensor]:
    """Read one safetensors member (header checked, data counted and copied to `sink`): its tensors."""
    head = _read_exact(source, 8, name)
    (length,) = struct.unpack("<Q", head)
    if length > max_header or length + 8 > size:
        raise CheckpointRejected(f"{name} has an invalid header length")
    raw = _read_exact(source, length, name)
    try:  # UTF-8 only, as safetensors itself reads it (json.loads of bytes would also take UTF-16 and -32)
        text = raw.decode("utf-8")
        if not text.lstrip().startswith("{"):
            raise ValueError("not an object")
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError):  # JSONDecodeError, huge integers, deep nesting
        raise CheckpointRejected(f"{name} has an unreadable header") from None
    if not isinstance(header, dict):
        raise CheckpointRejected(f"{name} has a malformed header")
    tensors: dict[str, _Tensor] = {}
    spans: list[tuple[int, int, str, str]] = []
    for key, entry in header.items():
        if key == "__metadata__":
            if (not isinstance(entry, dict) or len(entry) > MAX_METADATA
                    or not all(isinstance(k, str) and isinstance(v, str) and len(k) + len(v) < 256 for k, v in entry.items())):
                raise CheckpointRejected(f"{name} has malformed metadata")
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointRejected(f"{name}: tensor {key[:80]!r} is malformed")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPE_BYTES:
            raise CheckpointRejected(f"{name}: tensor {key[:80]!r} has an unsupported dtype")
        if not isinstance(shape, list) or not all(type(d) is int and d > 0 for d in shape):
            raise CheckpointRejected(f"{name}: tensor {key[:80]!r} has an invalid shape")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int and o >= 0 for o in offsets):
            raise CheckpointRejected(f"{name}: tensor {key[:80]!r} has invalid data offsets")
        if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise CheckpointRejected(f"{name}: tensor {key[:80]!r} does not span the bytes its shape needs")
        tensors[key] = _Tensor(dtype, tuple(shape))
        spans.append((offsets[0], offsets[1], dtype, key))
    position = 0
    for begin, end, _, _ in sorted(spans):
        if begin != position:
            raise CheckpointRejected(f"{name} has gaps or overlaps between tensors")
        position = end
    if position != size - 8 - length:
        raise CheckpointRejected(f"{name} holds {size - 8 - length} bytes of tensors, its header says {position}")
    if sink is not None:
        sink.write(head + raw)
    check_tensor_data(source, spans, name=name, sink=sink)
    return tensors


# Which bytes of an IEEE float say "exponent all ones" (infinity or NaN), per byte value: the high byte of a
# float32 or bfloat16 (7 exponent bits after the sign), the next byte's top bit, and float16's 5 exponent bits.
_EXPONENT_HIGH = bytes(1 if b & 0x7F == 0x7F else 0 for b in range(256))
_EXPONENT_LOW = bytes(1 if b & 0x80 else 0 for b in range(256))
_F16_EXPONENT = bytes(1 if b & 0x7C == 0x7C else 0 for b in range(256))
_PIECE = 1 << 20  # bytes checked at a time: a multiple of every float size


def finite(piece: bytes, dtype: str) -> bool:
    """Whether every little-endian float of `dtype` in `piece` is finite, at C speed (no Python loop)."""
    if dtype == "F32":
        high, low = piece[3::4], piece[2::4]
    elif dtype == "BF16":
        high, low = piece[1::2], piece[0::2]
    elif dtype == "F16":
        return piece[1::2].translate(_F16_EXPONENT).find(1) == -1
    else:
        return True
    both = int.from_bytes(high.translate(_EXPONENT_HIGH), "little") & int.from_bytes(low.translate(_EXPONENT_LOW),
                                                                                     "little")
    return both == 0


def check_tensor_data(source: IO[bytes], spans: list[tuple[int, int, str, str]], *, name: str,
                      sink: IO[bytes] | None = None) -> None:
    """Read a safetensors member's data (tensors tiling it in offset order), copying it to `sink`: every float
    must be finite. A NaN or infinity a worker planted would otherwise train, or be blamed on whoever loads it."""
    for begin, end, dtype, key in sorted(spans):
        left = end - begin
        while left:
            piece = _read_exact(source, min(left, _PIECE), name)
            if not finite(piece, dtype):
                raise CheckpointRejected(f"{name}: tensor {key[:80]!r} holds values that are not finite")
            if sink is not None:
                sink.write(piece)
            left -= len(piece)


def _expect(name: str, got: dict[str, _Tensor], want: dict[str, tuple[tuple[int, ...], frozenset[str]]]) -> None:
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        shown = (f"lacks {missing[0]!r}" if missing else f"holds an unexpected tensor {extra[0][:80]!r}")
        raise CheckpointRejected(f"{name} {shown} ({len(missing)} missing, {len(extra)} unexpected)")
    for key, (shape, dtypes) in want.items():
        tensor = got[key]
        if tensor.shape != shape or tensor.dtype not in dtypes:
            raise CheckpointRejected(f"{name}: {key!r} is {tensor.dtype}{list(tensor.shape)}, the job needs "
                                     f"{'/'.join(sorted(dtypes))}{list(shape)}")


def check_tensors(tensors: dict[str, dict[str, _Tensor]], rules: CheckpointRules) -> None:
    """Names, shapes and dtypes of the three safetensors members against the job."""
    floats = frozenset(WEIGHT_DTYPES)
    _expect(ADAPTER, tensors[ADAPTER], {k: (s, floats) for k, s in rules.adapter_shapes.items()})
    if BEST in tensors:
        _expect(BEST, tensors[BEST], {k: (s, floats) for k, s in rules.adapter_shapes.items()})
    adapter = tensors[ADAPTER]
    optimizer: dict[str, tuple[tuple[int, ...], frozenset[str]]] = {}
    for key, shape in rules.adapter_shapes.items():
        for moment in MOMENTS:
            optimizer[f"{moment}/{key}"] = (shape, frozenset({adapter[key].dtype}))
        optimizer[f"step/{key}"] = ((), frozenset({"F32"}))
    _expect(OPTIMIZER, tensors[OPTIMIZER], optimizer)
    rng = {"torch": ((TORCH_RNG_BYTES,), frozenset({"U8"}))}
    if rules.gpu and "cuda" in tensors[RNG]:
        rng["cuda"] = ((CUDA_RNG_BYTES,), frozenset({"U8"}))
    _expect(RNG, tensors[RNG], rng)


def parse_state(raw: bytes) -> CheckpointState:
    try:
        return CheckpointState.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "the document"
        raise CheckpointRejected(f"state.json: {where}: {first.get('msg', 'invalid')}") from None


def check_state(state: CheckpointState, rules: CheckpointRules, *, step: int | None) -> None:
    """The counters agree with each other and with the job: its step, learning rate, seed and size."""
    if step is not None and state.step != step:
        raise CheckpointRejected(f"state.json says step {state.step}, the upload says step {step}")
    if state.step > rules.max_step:
        raise CheckpointRejected(f"step {state.step} is past the {rules.max_step} steps this job has reached")
    if state.scheduler.last_epoch != state.step or state.scheduler.step_count != state.step + 1:
        raise CheckpointRejected("the scheduler's counters do not match the step")
    lr = rules.learning_rate
    if state.optimizer.initial_lr != lr or state.scheduler.base_lrs != [lr]:
        raise CheckpointRejected(f"the learning rate is not the job's ({lr})")
    if state.optimizer.lr != state.scheduler.last_lr[0] or state.optimizer.lr > lr:
        raise CheckpointRejected("the optimizer's learning rate disagrees with the schedule")
    if state.data_order.seed != rules.seed:
        raise CheckpointRejected("the data order is not seeded by the job's seed")
    if state.python_rng.state[-1] > 624:
        raise CheckpointRejected("Python's RNG state has an invalid position")
    if state.trained_tokens > state.step * rules.max_tokens_per_step:
        raise CheckpointRejected(f"{state.trained_tokens} tokens in {state.step} steps is more than the job allows")
    if state.early_stopping is not None and not rules.early_stopping:
        raise CheckpointRejected("the state records early stopping, which this job does not use")
    if state.early_stopping is not None and state.early_stopping.best_step > state.step:
        raise CheckpointRejected("early stopping's best step is past the checkpoint's step")


def check_best(state: CheckpointState, present: bool) -> None:
    """`best_adapter.safetensors` is there exactly when the state says the best step is an earlier one."""
    if state.holds_best and not present:
        raise CheckpointRejected(f"the best step is {state.early_stopping.best_step} but {BEST} is missing")  # type: ignore[union-attr]
    if present and not state.holds_best:
        raise CheckpointRejected(f"{BEST} is present but the state names no earlier best step")


def _member_name(member: tarfile.TarInfo) -> str | None:
    """The checkpoint file an archive entry holds; None for the folder itself; refused for anything else."""
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts or "\\" in member.name or "\0" in member.name:
        raise CheckpointRejected(f"unsafe path in the archive: {member.name[:80]!r}")
    if path.parts == (ROOT,):
        if not member.isdir():
            raise CheckpointRejected(f"{ROOT!r} is not a folder")
        return None
    if len(path.parts) != 2 or path.parts[0] != ROOT or path.parts[1] not in ALLOWED:
        raise CheckpointRejected(f"unexpected entry in the archive: {member.name[:80]!r} (a checkpoint holds "
                                 f"{ROOT}/{{{','.join(ALLOWED)}}} only)")
    sparse = member.sparse is not None or any(k.startswith("GNU.sparse") for k in member.pax_headers)
    if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or sparse:
        raise CheckpointRejected(f"{member.name!r} is not a regular file (links, devices and sparse files are refused)")
    return path.parts[1]


def _create(folder_fd: int, name: str) -> IO[bytes]:
    """A new file in the folder opened as `folder_fd`: never through a link, never over an existing file."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    return os.fdopen(os.open(name, flags, 0o600, dir_fd=folder_fd), "wb")


def check_archive(source: IO[bytes], rules: CheckpointRules, *, step: int | None,
                  extract_to: Path | None = None) -> CheckpointFacts:
    """Check a checkpoint archive (.tar.gz) as it streams past; with `extract_to` (a folder that must not exist
    yet) also write its files there, as regular files only. Raises `CheckpointRejected` (and removes what it
    wrote) when anything is not what the job implies."""
    folder_fd = None
    if extract_to is not None:
        os.mkdir(extract_to, 0o700)  # FileExistsError if anything (a link included) is already there
        folder_fd = os.open(extract_to, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))
    try:
        return _check(source, rules, step=step, folder_fd=folder_fd)
    except BaseException:
        if extract_to is not None:
            for name in ALLOWED:
                try:
                    os.unlink(name, dir_fd=folder_fd)
                except FileNotFoundError:
                    pass
            os.rmdir(extract_to)
        raise
    finally:
        if folder_fd is not None:
            os.close(folder_fd)


def _check(source: IO[bytes], rules: CheckpointRules, *, step: int | None, folder_fd: int | None) -> CheckpointFacts:
    limits = rules.member_limits()
    stream = _TarHeaderGuard(_Bounded(gzip.GzipFile(fileobj=source, mode="rb"), rules.inflate_limit()))  # type: ignore[arg-type]
    tensors: dict[str, dict[str, _Tensor]] = {}
    state: CheckpointState | None = None
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
            for count, member in enumerate(tar, start=1):
                name = _member_name(member)
                if count > MAX_ENTRIES:
                    raise CheckpointRejected(f"the archive has more than {MAX_ENTRIES} entries")
                if name is None:
                    continue
                if name in tensors or (name == STATE and state is not None):
                    raise CheckpointRejected(f"{name} appears twice in the archive")
                if member.size > limits[name]:
                    raise CheckpointRejected(f"{name} is {member.size} bytes; this job's is at most {limits[name]}")
                data = tar.extractfile(member)
                assert data is not None
                sink = _create(folder_fd, name) if folder_fd is not None else None
                try:
                    if name == STATE:
                        raw = _read_exact(data, member.size, name)
                        state = parse_state(raw)
                        if sink is not None:
                            sink.write(raw)
                    else:
                        n = {ADAPTER: len(rules.adapter_shapes), BEST: len(rules.adapter_shapes),
                             OPTIMIZER: 3 * len(rules.adapter_shapes), RNG: 2}[name]
                        tensors[name] = _safetensors(data, size=member.size, name=name, max_header=rules.header_limit(n),
                                                     sink=sink)
                finally:
                    if sink is not None:
                        sink.close()
    except CheckpointRejected:
        raise
    except (tarfile.TarError, EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError, RecursionError) as exc:
        raise CheckpointRejected(f"not a readable .tar.gz archive ({exc.__class__.__name__})") from None
    missing = [n for n in MEMBERS if n not in tensors and not (n == STATE and state is not None)]
    if missing:
        raise CheckpointRejected(f"the archive lacks {ROOT}/{', '.join(missing)}")
    assert state is not None
    check_tensors(tensors, rules)
    check_state(state, rules, step=step)
    check_best(state, BEST in tensors)
    return CheckpointFacts(step=state.step, trained_tokens=state.trained_tokens, bytes=stream.count, state=state)


def tensor_headers(folder: Path, rules: CheckpointRules, *, best: bool = False) -> dict[str, dict[str, Any]]:
    """The safetensors members of an unpacked checkpoint, each read through the same checks as an upload
    (regular files only, never through a link), and their tensors checked against the job."""
    tensors: dict[str, dict[str, _Tensor]] = {}
    n = len(rules.adapter_shapes)
    for name, count in ((ADAPTER, n), (OPTIMIZER, 3 * n), (RNG, 2), *(((BEST, n),) if best else ())):
        with open_member(folder, name, limit=rules.member_limits()[name]) as (f, size):
            tensors[name] = _safetensors(f, size=size, name=name, max_header=rules.header_limit(count), sink=None)
    check_tensors(tensors, rules)
    return tensors  # type: ignore[return-value]


class open_member:  # noqa: N801 - used as a context manager, like open()
    """A checkpoint file opened for reading: a regular file directly in `folder` (no link anywhere), at most
    `limit` bytes; yields (file, size)."""

    def __init__(self, folder: Path, name: str, *, limit: int) -> None:
        self.folder, self.name, self.limit = folder, name, limit
        self.file: IO[bytes] | None = None

    def __enter__(self) -> tuple[IO[bytes], int]:
        nofollow = getattr(os, "O_NOFOLLOW", 0)
        try:
            folder_fd = os.open(self.folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | nofollow)
        except OSError:
            raise CheckpointRejected(f"{self.folder.name}/ is not a folder (or is a link)") from None
        try:
            fd = os.open(self.name, os.O_RDONLY | nofollow | getattr(os, "O_BINARY", 0), dir_fd=folder_fd)
        except OSError:
            raise CheckpointRejected(f"{self.name} is missing or is a link") from None
        finally:
            os.close(folder_fd)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise CheckpointRejected(f"{self.name} is not a regular file")
        if info.st_size > self.limit:
            os.close(fd)
            raise CheckpointRejected(f"{self.name} is {info.st_size} bytes; this job's is at most {self.limit}")
        self.file = os.fdopen(fd, "rb")
        return self.file, info.st_size

    def __exit__(self, *_: object) -> None:
        if self.file is not None:
            self.file.close()


def read_state(folder: Path) -> CheckpointState:
    with open_member(folder, STATE, limit=MAX_STATE_BYTES) as (f, size):
        return parse_state(_read_exact(f, size, STATE))


def check_folder(folder: Path, rules: CheckpointRules) -> CheckpointState:
    """An unpacked checkpoint (the trainer's `resume/`): exactly the allowed files, each checked; its state."""
    try:
        entries = set(os.listdir(folder))
    except OSError:
        raise CheckpointRejected(f"{folder.name}/ cannot be read") from None
    if entries - {BEST} != set(MEMBERS):
        odd = sorted(entries - set(ALLOWED)) or sorted(set(MEMBERS) - entries)
        raise CheckpointRejected(f"{folder.name}/ must hold exactly {', '.join(MEMBERS)} (not {odd[0][:80]!r})")
    state = read_state(folder)
    check_state(state, rules, step=None)
    check_best(state, BEST in entries)
    tensor_headers(folder, rules, best=BEST in entries)
    return state


def check_file(path: Path, rules: CheckpointRules, *, step: int | None, extract_to: Path | None = None) -> CheckpointFacts:
    with path.open("rb") as f:
        return check_archive(f, rules, step=step, extract_to=extract_to)


def state_json(state: dict[str, Any]) -> bytes:
    """`state.json`'s bytes, validated before they are written (the trainer's own output meets the schema too)."""
    raw = json.dumps(state, allow_nan=False).encode()
    parse_state(raw)
    return raw


# --- for other archives of safetensors (an export's merged model: coordinator/services/export_checks.py) ----------

def guarded_tar(source: IO[bytes], *, limit: int) -> IO[bytes]:
    """An uncompressed tar stream for `tarfile.open(mode="r|")`, bounded to `limit` bytes in all and refusing
    oversized extended headers (`CheckpointRejected`)."""
    return _TarHeaderGuard(_Bounded(source, limit))  # type: ignore[return-value]


def read_safetensors(source: IO[bytes], *, size: int, name: str, max_header: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """A safetensors member's tensors ({name: (dtype, shape)}), its header and data checked as a checkpoint's are
    (tiling offsets, finite floats); `CheckpointRejected` otherwise."""
    return {key: (t.dtype, t.shape) for key, t in _safetensors(source, size=size, name=name, max_header=max_header,
                                                               sink=None).items()}
