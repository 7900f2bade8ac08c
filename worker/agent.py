"""The agent's main loop: heartbeat on its own cadence, claim work while the owner's policy allows it, and
run each job to an outcome the coordinator acknowledged.

A job: fetch the model (cache) and the lease's inputs, write `spec.json`, start the trainer in the runtime,
relay its progress as events (buffered while the coordinator is unreachable), upload each checkpoint, and
finish: the adapter and `complete`, or `fail`, or `preempted` when the owner's policy tripped (SIGTERM: the
trainer checkpoints; the checkpoint goes up first). A cancel, a pause or a lost lease stops it at once.
The active lease is kept in `state.json`, so a restarted agent finishes reporting what its last run left.

The job's folder is hostile territory (`worker.jobdir`): the trainer writes only its `work/` side; the agent
derives every path there itself, follows no link, and keeps its own files beside it. A checkpoint to resume
from is checked (shared.checkpoint) as it is unpacked into `work/resume/`; one that fails is reported as the
uploader's fault (`bad_checkpoint`), never run.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from shared.checkpoint import CheckpointRejected, CheckpointRules, check_file
from shared.money import usd_to_micros
from shared.protocol import Assignment
from shared.weights import export_name, merged_member
from worker.channel import Channel, ChannelError, CoordinatorUnreachable, LeaseLost, Rejected
from shared.digests import sha256_file
from worker.files import read_json, write_json_atomic
from worker.jobdir import (
    WORK, UnsafeJobFile, copy_out, open_regular, pack_checkpoint, pack_folder, read_regular, unpack_adapter_weights,
)
from worker.model_cache import ModelCache
from worker.nvml import GpuProbe, Machine
from worker.policy import PolicyGate, Verdict
from worker.progress import ProgressTail, lease_event
from worker.reporter import Reporter, Undelivered
from worker.runtimes.base import JobMount, Running, Runtime
from worker.settings import WorkerSettings
from worker.trainer.errors import EXIT_DONE, EXIT_PREEMPTED, failure_kind

log = logging.getLogger(__name__)
MAX_RESULT_BYTES = 64 * 1024
BATCH_PART_BYTES = 64 * 1024 * 1024  # what the coordinator takes of a batch part
IDLE_RECHECK_S = 5.0
KINDS = ("train", "verify", "export", "batch")  # the lease kinds this agent runs: programs of the trainer's image
DONE_FILE = {"verify": "verification.json", "export": "export.json", "batch": "batch.json"}  # what a finished run leaves ("result.json")


@contextmanager
def _opened(root: Path, parts: tuple[str, ...], limit: int) -> Iterator[IO[bytes]]:
    with open_regular(root, *parts, limit=limit) as (f, _):
        yield f


class BadResume(Exception):
    """The checkpoint the lease was handed failed its checks here: nothing of it was unpacked or run."""


@dataclass
class Status:
    """What the live status line shows."""

    state: str = "starting"
    reason: str = ""
    job_id: str | None = None
    lease_id: str | None = None
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    temperature_c: float | None = None
    utilization_pct: float | None = None
    earned_micros: int = 0
    jobs_done: int = 0
    preempt_seconds: list[float] = field(default_factory=list)  # policy trip -> GPU free, measured


@dataclass
class ActiveJob:
    assignment: Assignment
    job_dir: Path
    running: Running | None = None
    started: float = 0.0
    energy_start_mj: int | None = None
    handle: dict[str, Any] = field(default_factory=dict)  # finds the trainer again after an agent restart
    started_epoch: float = 0.0
    progress_offset: int = 0  # progress.jsonl up to here has reached the coordinator, but for:
    pending_checkpoints: list[int] = field(default_factory=list)  # steps read there whose upload is still due

    @property
    def work(self) -> Path:
        """The trainer's side of the job folder (its /job): everything in it is untrusted."""
        return self.job_dir / WORK


class Agent:
    def __init__(self, *, settings: WorkerSettings, channel: Channel, probe: GpuProbe, gate: PolicyGate,
                 runtime: Runtime, cache: ModelCache, heartbeat_interval_s: float = 10.0) -> None:
        self.settings, self.channel, self.probe, self.gate = settings, channel, probe, gate
        self.runtime, self.cache = runtime, cache
        self.heartbeat_interval_s = heartbeat_interval_s
        self.status = Status()
        self._stop = threading.Event()
        self.reporter = Reporter(channel, self._stop)
        self._job: ActiveJob | None = None
        self._commands: queue.Queue[tuple[str, str]] = queue.Queue()
        self._machine: Machine = probe.machine()
        self._verdict = Verdict(True)
        self._lock = threading.Lock()

    # --- outside view -----------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """Until `stop()`: the heartbeat thread beside the claim-and-run loop."""
        beat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        beat.start()
        try:
            self._finish_leftover()
            while not self._stop.is_set():
                self._read_machine()
                if not self._verdict.allowed:
                    self._set(state="paused", reason=self._verdict.reason)
                    self._stop.wait(IDLE_RECHECK_S)
                    continue
                self._set(state="idle", reason="")
                try:
                    assignment = self.channel.claim(self._claim_body())
                except CoordinatorUnreachable as exc:
                    self._set(state="offline", reason=str(exc))
                    self._stop.wait(IDLE_RECHECK_S)
                    continue
                except Rejected as exc:
                    if exc.status == 401:
                        raise
                    log.error("claim refused: %s", exc)
                    self._stop.wait(IDLE_RECHECK_S)
                    continue
                if assignment is not None:
                    self._run_job(assignment)
        finally:
            self._stop.set()
            beat.join(timeout=self.heartbeat_interval_s + 5)

    # --- readings and heartbeats ------------------------------------------------------------------

    def _set(self, **fields: Any) -> None:
        with self._lock:
            for name, value in fields.items():
                setattr(self.status, name, value)

    def _ours(self) -> set[int]:
        job = self._job
        return job.running.pids() if job and job.running else set()

    def _read_machine(self) -> None:
        machine = self.probe.machine()
        verdict = self.gate.check(machine, now=datetime.now(), ours=self._ours())
        gpus = self.gate.shared(machine.gpus)
        with self._lock:
            self._machine, self._verdict = machine, verdict
            if gpus:
                self.status.temperature_c, self.status.utilization_pct = gpus[0].temperature_c, gpus[0].utilization_pct

    def _telemetry(self) -> list[dict[str, Any]]:
        return [{k: v for k, v in {
            "uuid": g.uuid, "utilization_pct": g.utilization_pct, "memory_free_bytes": g.memory_free_bytes,
            "temperature_c": g.temperature_c, "power_w": g.power_w,
            "foreign_processes": len(set(g.process_pids) - self._ours()),
        }.items() if v is not None} for g in self.gate.shared(self._machine.gpus) if g.available]

    def _claim_body(self) -> dict[str, Any]:
        return {"wait_s": self.settings.claim_wait_s, "gpus": self._telemetry(), "cached_models": self.cache.cached(),
                "kinds": list(KINDS)}

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_interval_s):
            try:
                self._read_machine()
                job = self._job
                activity = "working" if job else ("idle" if self._verdict.allowed else "paused_by_owner")
                body: dict[str, Any] = {"activity": activity, "gpus": self._telemetry()}
                if not self._verdict.allowed:
                    body["pause_reason"] = self._verdict.reason
                if job is not None:
                    body["lease_id"] = job.assignment.lease_id
                    if self.status.step is not None:
                        body["step"] = self.status.step
                reply = self.channel.heartbeat(body)
                for command in reply.commands:
                    self._commands.put((command.type, command.lease_id))
            except ChannelError as exc:
                log.info("heartbeat not delivered: %s", exc)
            except Exception:  # noqa: BLE001 - the heartbeat thread must outlive any single failure
                log.exception("heartbeat failed")

    # --- a job --------------------------------------------------------------------------------------

    def _persist(self, job: ActiveJob | None, **extra: Any) -> None:
        if job is None:
            self.settings.state_path.unlink(missing_ok=True)
            return
        write_json_atomic(self.settings.state_path, {
            "assignment": job.assignment.model_dump(mode="json"), "job_dir": str(job.job_dir), "handle": job.handle,
            "started_epoch": job.started_epoch, "progress_offset": job.progress_offset,
            "pending_checkpoints": job.pending_checkpoints, **extra})

    def _prepare(self, job: ActiveJob) -> JobMount:
        """The job folder, fresh and the agent's own (0700), with the trainer's inputs in `work/`: written before
        the trainer starts, so nothing of the job's can be in the way."""
        a = job.assignment
        self.settings.jobs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        shutil.rmtree(job.job_dir, ignore_errors=True)
        job.job_dir.mkdir(mode=0o700)
        job.work.mkdir(mode=0o700)
        model_dir = self.cache.ensure(a.spec.base_model)
        if a.training_file_url and a.training_file_sha256:  # an export lease trains nothing
            self.channel.download(a.training_file_url, a.lease_id, a.fencing_token, job.work / "train.jsonl",
                                  a.training_file_sha256)
        if a.validation_file_url and a.validation_file_sha256:
            self.channel.download(a.validation_file_url, a.lease_id, a.fencing_token, job.work / "validation.jsonl",
                                  a.validation_file_sha256)
        if a.kind == "verify":
            self._prepare_verification(job)
        if a.kind == "batch" and a.batch_done_url and a.batch_done_sha256:
            self.channel.download(a.batch_done_url, a.lease_id, a.fencing_token, job.work / "batch_done.jsonl",
                                  a.batch_done_sha256)
        if a.initial_adapter_url and a.initial_adapter_sha256 and a.initial_adapter_member:
            archive = self.channel.download(a.initial_adapter_url, a.lease_id, a.fencing_token,
                                            job.job_dir / "initial.tar.gz", a.initial_adapter_sha256)
            (job.work / "initial").mkdir(mode=0o700)
            try:
                unpack_adapter_weights(archive, job.work / "initial" / "adapter_model.safetensors",
                                       limit=self.settings.max_adapter_bytes, member=a.initial_adapter_member)
            finally:
                archive.unlink(missing_ok=True)
        if a.resume_from is not None:
            archive = self.channel.download(a.resume_from.url, a.lease_id, a.fencing_token,
                                            job.job_dir / "resume.tar.gz", a.resume_from.sha256)
            rules = CheckpointRules.for_spec(a.spec, max_step=a.resume_from.step)
            try:
                check_file(archive, rules, step=a.resume_from.step, extract_to=job.work / "resume")
            except CheckpointRejected as exc:
                raise BadResume(f"checkpoint {a.resume_from.checkpoint_id}: {exc}") from None
            finally:
                archive.unlink()
        mount = JobMount(job_dir=job.work, model_dir=model_dir, gpu_index=self._gpu_of(job))
        spec = a.spec.model_copy(update={"model_dir": self.runtime.model_dir_inside(mount)})
        (job.work / "spec.json").write_text(spec.model_dump_json(indent=2))
        return mount

    def _prepare_verification(self, job: ActiveJob) -> None:
        """A verification lease's inputs beside the training data: the held-out sample, and the weights of the
        adapter under test (another worker's: only its safetensors member is unpacked, into the trainer's `adapter/`)."""
        a = job.assignment
        if a.held_out_url and a.held_out_sha256:
            self.channel.download(a.held_out_url, a.lease_id, a.fencing_token, job.work / "held_out.jsonl",
                                  a.held_out_sha256)
        if not (a.adapter_url and a.adapter_sha256):
            raise RuntimeError("the verification lease names no adapter to verify")
        archive = self.channel.download(a.adapter_url, a.lease_id, a.fencing_token, job.job_dir / "under-test.tar.gz",
                                        a.adapter_sha256)
        (job.work / "adapter").mkdir(mode=0o700)
        try:
            unpack_adapter_weights(archive, job.work / "adapter" / "adapter_model.safetensors",
                                   limit=self.settings.max_adapter_bytes)
        finally:
            archive.unlink(missing_ok=True)

    def _gpu_of(self, job: ActiveJob) -> int | None:
        gpus = self.gate.shared(self._machine.gpus)
        return next((g.index for g in gpus if g.uuid == job.assignment.gpu_uuid), gpus[0].index if gpus else None)

    def _cap_power(self, gpu_index: int | None, watts: int | None) -> None:
        """The owner's power cap while our job runs (and the default back after), when one is set."""
        if gpu_index is None or self.gate.policy.power_cap_w is None:
            return
        refused = self.probe.cap_power(gpu_index, watts)
        if refused:
            log.warning(refused)

    def _energy_mj(self) -> int | None:
        readings = [g.energy_mj for g in self.gate.shared(self._machine.gpus) if g.energy_mj is not None]
        return sum(readings) if readings else None

    def _usage(self, job: ActiveJob) -> dict[str, Any]:
        wall = max(time.monotonic() - job.started, 0.0) if job.started else 0.0
        self._read_machine()
        end = self._energy_mj()
        energy = (end - job.energy_start_mj) / 1000 if end is not None and job.energy_start_mj is not None else None
        return {"wall_seconds": round(wall, 3), "gpu_seconds": round(wall, 3), "energy_joules": energy}

    def _run_job(self, a: Assignment) -> None:
        job = ActiveJob(assignment=a, job_dir=self.settings.jobs_dir / a.lease_id)
        kept = False  # True when stopping left an outcome to deliver on the next start
        self._job = job
        self._persist(job)
        self._set(state="working", job_id=a.job_id, lease_id=a.lease_id, step=None, total_steps=None, loss=None)
        try:
            try:
                mount = self._prepare(job)
                job.energy_start_mj = self._energy_mj()
                self._cap_power(mount.gpu_index, self.gate.policy.power_cap_w)
                job.started = time.monotonic()
                job.running = self.runtime.start(mount)
                job.handle, job.started_epoch = job.running.handle(), time.time()
                self._persist(job)
                self._supervise_and_report(job)
            except BadResume as exc:
                log.warning("lease %s: the checkpoint to resume from was refused: %s", a.lease_id, exc)
                self._report(job, "fail", {"kind": "bad_checkpoint", "message": str(exc)[:2000]})
            except (LeaseLost, Undelivered):
                raise
            except Exception as exc:  # noqa: BLE001 - a worker-side failure is reported, never silent
                log.exception("job %s failed on this worker", a.job_id)
                if job.running:
                    job.running.kill()
                self._report(job, "fail", {"kind": "worker_error", "message": f"{exc.__class__.__name__}: {exc}"[:2000]})
        except LeaseLost as exc:  # while fetching its inputs
            log.warning("lease %s lost: %s", a.lease_id, exc)
        except Undelivered:
            kept = True
        finally:
            self._job = None
            if job.running is not None:
                self._cap_power(self._gpu_of(job), None)  # the owner's card, as it was
            if kept:
                log.warning("stopping with lease %s not yet reported: it is delivered on the next start", a.lease_id)
            else:
                self._persist(None)
                shutil.rmtree(job.job_dir, ignore_errors=True)  # inputs die with the lease
            self._set(state="idle", job_id=None, lease_id=None)

    def _supervise_and_report(self, job: ActiveJob) -> None:
        """Watch the running trainer to its end and report the outcome (a fresh run, or one found again after a
        restart). A lost lease stops the trainer at once; `Undelivered` when the agent stops first."""
        assert job.running is not None
        try:
            outcome = self._supervise(job)
            if outcome is not None:
                self._report(job, *outcome)
        except LeaseLost as exc:
            log.warning("lease %s lost: %s", job.assignment.lease_id, exc)
            job.running.kill()

    def _supervise(self, job: ActiveJob) -> tuple[str, dict[str, Any]] | None:
        """Relay progress until the trainer exits or must stop; what to report, or None when nothing is to be."""
        a, running = job.assignment, job.running
        assert running is not None
        tail = ProgressTail(job.work, job.progress_offset)
        pending: list[dict[str, Any]] = []
        checkpoints = list(job.pending_checkpoints)  # steps; the agent knows where each one's folder is
        last_flush, last_error, losses = 0.0, "", []
        preempting: float | None = None
        while True:
            code = running.poll()
            for seq, line in tail.read():
                if line.get("type") == "batch_part" and a.kind == "batch":
                    part = line.get("part")
                    if type(part) is int and 0 < part < 2**31 and part not in checkpoints:
                        checkpoints.append(part)  # a batch's parts go up as a training's checkpoints do
                    continue
                event = lease_event(line, seq)  # None for a line the protocol would refuse: nothing of it is used
                if event is None:
                    continue
                if line.get("type") == "step":
                    self._set(step=event.get("step"), loss=event.get("train_loss"))
                    losses.append(event.get("train_loss"))
                elif line.get("type") == "started":
                    self._set(total_steps=event.get("total_steps"))
                elif line.get("type") == "checkpoint" and type(line.get("step")) is int and a.kind == "train":
                    checkpoints.append(line["step"])
                elif line.get("type") == "error":
                    last_error = str(line.get("message", ""))
                pending.append(event)
            # Progress goes before a checkpoint: the coordinator takes no checkpoint past the steps it has heard of.
            flush_due = code is not None or checkpoints or time.monotonic() - last_flush >= self.settings.events_flush_s
            if pending and flush_due:
                last_flush = time.monotonic()
                try:
                    for start in range(0, len(pending), 500):
                        self.channel.events(a.lease_id, a.fencing_token, pending[start:start + 500])
                    pending.clear()
                    # Everything read so far is delivered but these uploads: a restart resumes from here.
                    job.progress_offset, job.pending_checkpoints = tail.offset, list(checkpoints)
                    self._persist(job)
                except CoordinatorUnreachable:
                    pass  # kept; delivered when the coordinator is back
            while checkpoints and not pending:
                try:
                    self._upload_checkpoint(job, checkpoints[0])
                    checkpoints.pop(0)
                except CoordinatorUnreachable:
                    break
                job.pending_checkpoints = list(checkpoints)
                self._persist(job)
            if code is not None:
                break
            for kind, lease_id in self._drain_commands():
                if lease_id == a.lease_id and kind in ("cancel", "pause", "lease_lost"):
                    log.info("%s for lease %s: stopping the trainer now", kind, lease_id)
                    running.kill()
                    return None
            if preempting is None and not self._verdict.allowed:
                preempting = time.monotonic()
                log.info("the owner's policy tripped (%s): stopping the trainer", self._verdict.reason)
                running.stop(self.settings.stop_grace_s)  # returns once the trainer exited (or was killed)
                self.status.preempt_seconds.append(time.monotonic() - preempting)
                continue  # one more round: its last progress lines and checkpoint go up first
            time.sleep(self.settings.progress_poll_s)
        usage = self._usage(job)
        self._deliver_remaining(job, pending, checkpoints)
        if preempting is not None or code == EXIT_PREEMPTED:
            reason = self._verdict.reason or "the trainer was asked to stop"
            step = self.status.step
            return "preempted", {"reason": reason, "usage": usage, **({"checkpoint_step": step} if step else {})}
        if code == EXIT_DONE:
            return self._finished(job, usage, losses)
        return "fail", {"kind": failure_kind(code), "message": last_error or f"the trainer exited with code {code}",
                        "usage": usage}

    def _drain_commands(self) -> list[tuple[str, str]]:
        drained = []
        while True:
            try:
                drained.append(self._commands.get_nowait())
            except queue.Empty:
                return drained

    def _upload_checkpoint(self, job: ActiveJob, step: int) -> None:
        """Pack the trainer's checkpoint of `step` (its allowed files, read safely) and send it, after checking it
        as the coordinator will: one that fails is not sent (it would count against this worker). A batch lease's
        `step` is the number of a part of its answers."""
        a = job.assignment
        if a.kind == "batch":
            self._upload_batch_part(job, step)
            return
        rules = CheckpointRules.for_spec(a.spec, max_step=max(self.status.step or 0, step))
        archive = job.job_dir / f"checkpoint-{step}.tar.gz"
        try:
            pack_checkpoint(job.work, step, archive, limits=rules.member_limits())
            check_file(archive, rules, step=step)
        except (UnsafeJobFile, CheckpointRejected, FileNotFoundError) as exc:
            log.warning("lease %s: the trainer's checkpoint at step %d is not sent: %s", a.lease_id, step, exc)
            archive.unlink(missing_ok=True)
            return
        try:
            self.channel.upload(a.lease_id, a.fencing_token, archive, kind="checkpoint", step=step)
        except Rejected as exc:
            log.warning("lease %s: checkpoint at step %d refused: %s", a.lease_id, step, exc)
        finally:
            archive.unlink(missing_ok=True)

    def _upload_batch_part(self, job: ActiveJob, part: int) -> None:
        """Part `part` of a batch's answers, from the name the agent derives from its number, opened as a regular
        file without following links; one the coordinator refuses is dropped (its requests stay unanswered, and go
        to the next lease of the batch)."""
        a = job.assignment
        parts = ("out", "batch", f"part-{part}.jsonl")
        try:
            with open_regular(job.work, *parts, limit=BATCH_PART_BYTES):
                pass
        except (UnsafeJobFile, FileNotFoundError) as exc:
            log.warning("lease %s: batch part %d is not sent: %s", a.lease_id, part, exc)
            return
        try:
            self.channel.upload(a.lease_id, a.fencing_token, job.work / parts[-1], kind="batch",
                                opener=lambda: _opened(job.work, parts, BATCH_PART_BYTES))
        except Rejected as exc:
            log.warning("lease %s: batch part %d refused: %s", a.lease_id, part, exc)

    def _deliver_remaining(self, job: ActiveJob, pending: list[dict[str, Any]], checkpoints: list[int]) -> None:
        """After the trainer ended: what could not be sent yet goes now, progress first, waiting out an outage."""
        self.reporter.events(job.assignment, pending)
        while checkpoints:
            self.reporter.until_acknowledged(lambda: self._upload_checkpoint(job, checkpoints[0]))
            checkpoints.pop(0)

    def _deliver_unsent(self, job: ActiveJob) -> list[Any]:
        """The progress a stopped run read but had not delivered (from the last acknowledged offset): sent now,
        before its outcome. The losses it held."""
        lines = ProgressTail(job.work, job.progress_offset).read()
        self.reporter.events(job.assignment, [e for e in (lease_event(line, seq) for seq, line in lines) if e is not None])
        return [line.get("loss") for _, line in lines if line.get("type") == "step"]

    def _finished(self, job: ActiveJob, usage: dict[str, Any], losses: list[Any]) -> tuple[str, dict[str, Any]]:
        """How a run that exited done is reported, by its lease's kind."""
        kind = job.assignment.kind
        if kind == "verify":
            return self._verification(job, usage)
        if kind == "export":
            return self._export(job, usage)
        if kind == "batch":
            return "complete", {"usage": usage}
        return self._completion(job, usage, losses)

    def _export(self, job: ActiveJob, usage: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Each format the export asked for, uploaded from the names the agent derives itself (`export_name`):
        the merged model packed from its allow-listed files, a GGUF file streamed from the trainer's folder as a
        regular file opened without following links. The trainer's own figures go along, for display."""
        a = job.assignment
        limit = self.settings.max_export_bytes
        try:
            raw = read_regular(job.work, "out", "export.json", limit=MAX_RESULT_BYTES)
            figures = json.loads(raw) if raw else {}
            figures = figures.get("formats") if isinstance(figures, dict) else {}
        except (UnsafeJobFile, json.JSONDecodeError, UnicodeDecodeError):
            figures = {}
        figures = figures if isinstance(figures, dict) else {}  # the job's folder says what it likes: display only
        self._persist(job, delivering="complete")
        for fmt in a.spec.export:
            name = export_name(fmt)
            try:
                if fmt == "merged":
                    archive = job.job_dir / "export-merged.tar"
                    if not archive.is_file():
                        pack_folder(job.work, ("out", "exports", name), archive, allowed=merged_member, limit=limit)
                    send = functools.partial(self.channel.upload, a.lease_id, a.fencing_token, archive, kind="export",
                                             fmt=fmt)
                else:
                    parts = ("out", "exports", name)
                    with open_regular(job.work, *parts, limit=limit):
                        pass  # there, a regular file within bounds: opened again for each read below

                    def opener(parts: tuple[str, ...] = parts):  # type: ignore[no-untyped-def]
                        return _opened(job.work, parts, limit)

                    send = functools.partial(self.channel.upload, a.lease_id, a.fencing_token, job.work / name,
                                             kind="export", fmt=fmt, opener=opener)
            except (UnsafeJobFile, FileNotFoundError, OSError) as exc:
                return "fail", {"kind": "worker_error", "usage": usage,
                                "message": f"the export finished without a usable {fmt}: {exc}"[:2000]}
            self.reporter.until_acknowledged(send)
        (job.job_dir / "export-merged.tar").unlink(missing_ok=True)
        shown = {fmt: {"seconds": float(f["seconds"]), "bytes": int(f["bytes"])} for fmt, f in figures.items()
                 if fmt in a.spec.export and isinstance(f, dict) and type(f.get("seconds")) in (int, float)
                 and math.isfinite(f["seconds"]) and 0 <= f["seconds"] <= 864_000 and type(f.get("bytes")) is int
                 and 0 <= f["bytes"] <= 2**50}
        return "complete", {"usage": usage, "export": shown}

    def _verification(self, job: ActiveJob, usage: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """A verification's figures, read from the trainer's folder (a regular file, no link followed); only
        finite, non-negative numbers are passed on (anything else goes as no figure, for the coordinator to weigh)."""
        try:
            raw = read_regular(job.work, "out", "verification.json", limit=MAX_RESULT_BYTES)
            figures = json.loads(raw) if raw else {}
        except (UnsafeJobFile, FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            figures = {}
        figures = figures if isinstance(figures, dict) else {}

        def number(name: str) -> float | None:
            value = figures.get(name)
            return float(value) if type(value) in (int, float) and math.isfinite(value) and 0 <= value <= 1e6 else None

        def count(name: str) -> int:
            value = figures.get(name)
            return value if type(value) is int and 0 <= value <= 2**62 else 0

        return "complete", {"usage": usage, "verification": {
            **{name: number(name) for name in ("heldout_base_loss", "heldout_adapter_loss", "valid_base_loss",
                                               "valid_adapter_loss")},
            "heldout_tokens": count("heldout_tokens"), "valid_tokens": count("valid_tokens")}}

    def _completion(self, job: ActiveJob, usage: dict[str, Any], losses: list[Any]) -> tuple[str, dict[str, Any]]:
        """The adapter, copied out of the trainer's folder (a regular file, no link followed) and uploaded; even
        while the agent stops, until the coordinator is unreachable (then `Undelivered`: the next start sends it)."""
        a = job.assignment
        adapter = job.job_dir / "adapter.tar.gz"
        try:
            raw = read_regular(job.work, "out", "result.json", limit=MAX_RESULT_BYTES)
            if not adapter.is_file():
                copy_out(job.work, ("out", "adapter.tar.gz"), adapter, limit=self.settings.max_adapter_bytes)
        except (UnsafeJobFile, FileNotFoundError) as exc:
            return "fail", {"kind": "worker_error", "usage": usage,
                            "message": f"the trainer finished without a usable adapter and result: {exc}"[:2000]}
        try:
            result = json.loads(raw) if raw else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            result = {}
        result = result if isinstance(result, dict) else {}
        self._persist(job, delivering="complete")
        self.reporter.until_acknowledged(lambda: self.channel.upload(a.lease_id, a.fencing_token, adapter, kind="adapter"))
        final = next((x for x in reversed(losses) if x is not None), None)

        def count(name: str) -> int:
            value = result.get(name)
            return value if type(value) is int and value >= 0 else 0

        valid, best = result.get("valid_loss"), result.get("best_step")
        stopped = result.get("stopped_early")
        return "complete", {
            "adapter_sha256": sha256_file(adapter), "usage": usage,
            "result": {"steps": count("steps"), "trained_tokens": count("trained_tokens"), "final_train_loss": final,
                       "final_eval_loss": valid if isinstance(valid, float) else None,
                       "best_step": best if type(best) is int and best >= 1 else None,
                       "stopped_early": stopped if isinstance(stopped, bool) else None},
        }

    def _report(self, job: ActiveJob, outcome: str, body: dict[str, Any]) -> None:
        """Report how the lease ended, until the coordinator acknowledges or refuses it; `Undelivered` when the
        agent is stopping first (the job folder and state.json keep it for the next start)."""
        a = job.assignment
        body.setdefault("usage", self._usage(job))
        self._persist(job, delivering=outcome)
        try:
            reply = self.reporter.finish(a, outcome, body)
        except (LeaseLost, Rejected) as exc:
            log.warning("lease %s: %s not accepted: %s", a.lease_id, outcome, exc)
            return
        log.info("lease %s %s: %s (job %s)", a.lease_id, outcome, reply.status, reply.job_status)
        if outcome == "complete" and reply.status == "completed":
            hours = body["usage"]["wall_seconds"] / 3600
            with self._lock:
                self.status.earned_micros += int(usd_to_micros(a.ask_price_per_gpu_hour) * hours)
                self.status.jobs_done += 1

    def _finish_leftover(self) -> None:
        """A previous run stopped mid-job. If its trainer still runs (a container, or a subprocess in its own
        session), supervise it again from where its progress was last delivered; otherwise deliver a finished
        adapter, or report the lease as a worker error. Then clean up."""
        state = read_json(self.settings.state_path)
        if not state:
            return
        try:
            assignment = Assignment.model_validate(state["assignment"])
        except Exception:  # noqa: BLE001 - an unreadable state file is dropped
            self._persist(None)
            return
        job = ActiveJob(assignment=assignment, job_dir=self.settings.jobs_dir / assignment.lease_id,
                        handle=state.get("handle") or {}, started_epoch=float(state.get("started_epoch") or 0.0),
                        progress_offset=int(state.get("progress_offset") or 0),
                        pending_checkpoints=[s for s in state.get("pending_checkpoints") or [] if type(s) is int])
        running = self.runtime.reattach(job.handle, job.work) if job.handle else None
        kept = False
        try:
            if running is not None:
                log.info("reattached to the trainer of lease %s", assignment.lease_id)
                job.running = running
                job.started = time.monotonic() - max(time.time() - job.started_epoch, 0.0)
                self._job = job
                self._set(state="working", job_id=assignment.job_id, lease_id=assignment.lease_id)
                try:
                    self._supervise_and_report(job)
                finally:
                    self._job = None
            else:
                done_file = DONE_FILE.get(assignment.kind, "result.json")
                finished = read_regular(job.work, "out", done_file, limit=MAX_RESULT_BYTES) is not None
                if finished or state.get("delivering") == "complete":
                    losses = self._deliver_unsent(job)
                    idle = {"wall_seconds": 0, "gpu_seconds": 0}
                    outcome, body = self._finished(job, idle, losses)
                else:
                    outcome, body = "fail", {"kind": "worker_error", "message": "the agent restarted during the job",
                                             "usage": {"wall_seconds": 0, "gpu_seconds": 0}}
                self._report(job, outcome, body)
        except Undelivered:
            kept = True
        if not kept:
            self._persist(None)
            shutil.rmtree(job.job_dir, ignore_errors=True)
        self._set(state="idle", job_id=None, lease_id=None)
