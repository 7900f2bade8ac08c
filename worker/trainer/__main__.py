"""`python -m worker.trainer --job JOB_DIR`: train one job, talking to the agent only through files and the exit code.

Reads `JOB_DIR/spec.json` (shared.jobspec.JobSpec), `train.jsonl`, optionally
`validation.jsonl` and `resume/` (a checkpoint), and the base model from
`spec.model_dir`. Writes `JOB_DIR/out/`: `progress.jsonl`, `checkpoints/step-N/`,
`adapter/`, `adapter.tar.gz` and `result.json`.

A spec of kind `verify` runs the verification program instead (worker/trainer/verify.py): it reads
`held_out.jsonl` and `adapter/` too, and writes `out/verification.json`. A spec of kind `export` runs the export
program (worker/trainer/export.py): it reads `initial/` and writes `out/exports/` and `out/export.json`. A spec of
kind `batch` runs the batch program (worker/trainer/generate.py): it reads `train.jsonl` (the requests) and
`batch_done.jsonl`, and writes `out/batch/part-N.jsonl` and `out/batch.json`.

Exit codes:
    0  done: the adapter and result.json are written
    3  user error: bad data, unknown model, nothing to train on
    4  worker error: out of memory, driver, disk, anything unexpected
    5  preempted: SIGTERM arrived; a checkpoint was written first
    6  bad checkpoint: `resume/` fails its checks (shared.checkpoint); nothing of it was loaded
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from shared.errors import InvalidFile
from shared.jobspec import JobSpec
from worker.trainer.errors import (
    EXIT_DONE, EXIT_PREEMPTED, EXIT_USER_ERROR, EXIT_WORKER_ERROR, TrainerError, UserError, is_out_of_memory,
)
from worker.trainer.progress import Progress


def _load_spec(job_dir: Path) -> JobSpec:
    try:
        return JobSpec.model_validate_json((job_dir / "spec.json").read_bytes())
    except FileNotFoundError:
        raise UserError("spec.json is missing from the job directory") from None
    except ValidationError as exc:
        raise UserError(f"spec.json is invalid: {exc.errors()[0]['msg']} at {exc.errors()[0]['loc']}") from None


def run(job_dir: Path) -> int:
    progress = Progress(job_dir / "out" / "progress.jsonl")
    try:
        spec = _load_spec(job_dir)
        if spec.kind == "verify":
            from worker.trainer import verify  # noqa: PLC0415 - torch loads only past the spec check

            figures = verify.run(spec, job_dir, progress)
            (job_dir / "out" / "verification.json").write_text(json.dumps(figures, indent=2))
            progress.emit("finished", kind="verify")
            return EXIT_DONE
        if spec.kind == "batch":
            from worker.trainer import generate  # noqa: PLC0415

            answered = generate.run(spec, job_dir, progress)
            if answered.get("preempted"):
                progress.emit("preempted")
                return EXIT_PREEMPTED
            (job_dir / "out" / "batch.json").write_text(json.dumps(answered, indent=2))
            progress.emit("finished", kind="batch", **answered)
            return EXIT_DONE
        if spec.kind == "export":
            from worker.trainer import export  # noqa: PLC0415

            figures = export.run(spec, job_dir, progress)
            (job_dir / "out" / "export.json").write_text(json.dumps(figures, indent=2))
            progress.emit("finished", kind="export")
            return EXIT_DONE
        from worker.trainer.train import Trainer, install_stop_handler  # torch loads only past the spec check

        trainer = Trainer(spec, job_dir, progress)
        install_stop_handler(trainer)
        result = trainer.run()
        if "preempted_at_step" in result:
            progress.emit("preempted", step=result["preempted_at_step"])
            return EXIT_PREEMPTED
        (job_dir / "out" / "result.json").write_text(json.dumps(result, indent=2))
        progress.emit("finished", **result)
        return EXIT_DONE
    except InvalidFile as exc:
        progress.emit("error", kind="user_error", message=exc.message)
        return EXIT_USER_ERROR
    except TrainerError as exc:
        progress.emit("error", kind=exc.kind, message=str(exc))
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - the agent needs a final line, never a bare traceback
        message = f"{exc.__class__.__name__}: {exc}"
        if is_out_of_memory(exc):
            # Out of memory outside a training step (loading, the reference pass, an evaluation, the optimizer).
            # PyTorch's own words can list the other processes on the provider's GPU: they stay on this machine.
            message = "out of memory (outside a training step); lower batch_size or ask for more memory (min_vram_gb)"
        progress.emit("error", kind="worker_error", message=message)
        return EXIT_WORKER_ERROR
    finally:
        progress.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.trainer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", type=Path, required=True, help="the job directory")
    return run(parser.parse_args(argv).job)


if __name__ == "__main__":
    sys.exit(main())
