"""How the trainer ends, as exit codes the agent acts on (see worker/trainer/__main__.py): defined here once,
for the trainer that exits with them and the agent that reads them (`failure_kind`). Nothing here imports
torch."""

from __future__ import annotations

EXIT_DONE = 0
EXIT_USER_ERROR = 3  # the customer's input: bad data, unknown model, nothing to train on
EXIT_WORKER_ERROR = 4  # this machine: out of memory, driver, disk
EXIT_PREEMPTED = 5  # stopped by SIGTERM after writing a checkpoint
EXIT_BAD_CHECKPOINT = 6  # the checkpoint in resume/ fails its checks: the uploader's fault, not this machine's


def failure_kind(code: int | None) -> str:
    """The `LeaseFail.kind` a trainer's failing exit code reports; anything unknown (a crash, a kill) is the
    worker's error."""
    return {EXIT_USER_ERROR: "user_error", EXIT_BAD_CHECKPOINT: "bad_checkpoint"}.get(code, "worker_error")  # type: ignore[arg-type]


def is_out_of_memory(exc: BaseException) -> bool:
    """PyTorch's `OutOfMemoryError` (CUDA's), Python's `MemoryError`, or the CPU allocator's RuntimeError, named
    without importing torch."""
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and ("out of memory" in str(exc).lower() or "can't allocate memory" in str(exc)))


class TrainerError(Exception):
    kind = "worker_error"
    exit_code = EXIT_WORKER_ERROR


class UserError(TrainerError):
    kind = "user_error"
    exit_code = EXIT_USER_ERROR


class WorkerError(TrainerError):
    pass


class BadCheckpoint(TrainerError):
    """The checkpoint to resume from is not what the job implies; nothing of it was used."""

    kind = "bad_checkpoint"
    exit_code = EXIT_BAD_CHECKPOINT
