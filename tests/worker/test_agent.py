"""The agent's decisions, with a fake channel (the coordinator, in memory) and a scripted runtime (a trainer that
writes its files and exits with the code the test asks for): what it reports for each way a trainer ends,
that progress goes before the outcome, that an outage is waited out and nothing is sent twice, that a stop
keeps an undelivered outcome for the next start, and that a cancel or a lost lease stops the trainer at once.
The real trainer and coordinator are in tests/e2e."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from shared.jobspec import JobSpec
from shared.protocol import Assignment, Command, HeartbeatReply, LeaseReply, ResumeFrom
from tests.fakes import adapter_archive, checkpoint_archive, checkpoint_members, sha256
from tests.worker.fake_nvml import FakeNvml
from worker.agent import Agent
from worker.channel import CoordinatorUnreachable, LeaseLost
from worker.model_cache import MARKER, ModelCache
from worker.nvml import GpuProbe
from worker.policy import PolicyGate, WorkerPolicy
from worker.reporter import Reporter
from worker.runtimes.base import JobMount, Running, Runtime
from worker.settings import WorkerSettings
from worker.trainer.errors import EXIT_BAD_CHECKPOINT, EXIT_DONE, EXIT_PREEMPTED, EXIT_USER_ERROR, EXIT_WORKER_ERROR

LEASE = "lease-1"
TRAINING = b'{"messages": []}\n'


def assignment(*, resume: bytes | None = None) -> Assignment:
    spec = JobSpec(job_id="ftjob-1", base_model="tunegrid/tiny-llama", model_dir="models/tunegrid/tiny-llama", seed=0)
    return Assignment(
        lease_id=LEASE, fencing_token=1, job_id="ftjob-1", spec=spec, base_model_repo=None, gpu_uuid=None,
        training_file_url="/files/training", training_file_sha256=sha256(TRAINING),
        resume_from=ResumeFrom(checkpoint_id="ftckpt-1", step=2, sha256=sha256(resume), bytes=len(resume),
                               url="/files/resume") if resume is not None else None,
        ask_price_per_gpu_hour="0.30", lease_ttl_s=30, lease_grace_s=120, heartbeat_interval_s=10)


@dataclass
class FakeChannel:
    """The coordinator as the agent sees it: one assignment to hand out, then stop the agent; every call
    recorded in order. `down` makes every call unreachable (an outage); `lost` makes lease calls 409 and heartbeats
    answer `lease_lost` (the lease may have nothing left to report when it is lost)."""

    to_hand: Assignment | None
    files: dict[str, bytes] = field(default_factory=dict)
    calls: list[tuple[str, Any]] = field(default_factory=list)
    down: bool = False
    lost: bool = False
    commands: list[Command] = field(default_factory=list)
    agent: Agent | None = None
    uploaded: dict[str, bytes] = field(default_factory=dict)  # an export lease's formats, as sent

    def _reach(self, lease_call: bool = True) -> None:
        if self.down:
            raise CoordinatorUnreachable("down")
        if self.lost and lease_call:
            raise LeaseLost("the lease is no longer yours")

    def claim(self, body: dict[str, Any]) -> Assignment | None:
        self._reach(lease_call=False)
        handed, self.to_hand = self.to_hand, None
        if handed is None and self.agent is not None:
            self.agent.stop()
        return handed

    def heartbeat(self, body: dict[str, Any]) -> HeartbeatReply:
        self._reach(lease_call=False)
        commands, self.commands = self.commands, []
        if self.lost:  # as the coordinator answers a heartbeat naming a lease that is no longer live
            commands.append(Command(type="lease_lost", lease_id=LEASE, reason="not live"))
        return HeartbeatReply(commands=commands, heartbeat_interval_s=10)

    def events(self, lease_id: str, token: int, events: list[dict[str, Any]]) -> LeaseReply:
        self._reach()
        self.calls.append(("events", [e.get("step") for e in events if e["type"] == "progress"]))
        return self._reply()

    def download(self, url: str, lease_id: str, token: int, target: Path, sha256_: str) -> Path:
        self._reach()
        target.write_bytes(self.files[url])
        return target

    def upload(self, lease_id: str, token: int, path: Path, *, kind: str, step: int | None = None,
               fmt: str | None = None, opener: Any = None) -> dict[str, Any]:
        self._reach()
        if kind in ("export", "batch"):
            if opener is not None:
                with opener() as f:
                    data = f.read()
            else:
                data = path.read_bytes()
            self.uploaded[fmt or f"part-{len(self.uploaded) + 1}"] = data
            self.calls.append((kind, fmt))
            return {}
        self.calls.append((kind, step if kind == "checkpoint" else sha256(path.read_bytes())))
        return {}

    def finish(self, lease_id: str, token: int, outcome: str, body: dict[str, Any]) -> LeaseReply:
        self._reach()
        self.calls.append((outcome, body))
        return self._reply("completed" if outcome == "complete" else "failed")

    def _reply(self, status: str = "running") -> LeaseReply:
        return LeaseReply(lease_id=LEASE, fencing_token=1, status=status, job_status="running", message="")

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.calls]

    def steps(self) -> list[int]:
        return [step for kind, steps in self.calls if kind == "events" for step in steps]


class ScriptedTrainer(Running):
    """Writes what a trainer writes (progress lines, checkpoints, the adapter) when started, then runs until
    `hold` is cleared and exits with `code`."""

    def __init__(self, work: Path, *, code: int, steps: int, checkpoint_at: tuple[int, ...], hold: threading.Event) -> None:
        self.code, self.hold, self.killed, self.stopped = code, hold, False, False
        out = work / "out"
        (out / "checkpoints").mkdir(parents=True)
        lines = [{"type": "started", "total_steps": steps}]
        for step in range(1, steps + 1):
            lines.append({"type": "step", "step": step, "loss": 2.0 - step / 10, "total_steps": steps})
            if step in checkpoint_at:
                folder = out / "checkpoints" / f"step-{step}"
                folder.mkdir()
                for name, data in checkpoint_members(step=step).items():
                    (folder / name).write_bytes(data)
                lines.append({"type": "checkpoint", "step": step})
        if code == EXIT_DONE:
            (out / "adapter.tar.gz").write_bytes(adapter_archive())
            (out / "result.json").write_text(json.dumps({"steps": steps, "trained_tokens": 100 * steps}))
        elif code != EXIT_PREEMPTED:
            lines.append({"type": "error", "message": f"the trainer failed ({code})"})
        (out / "progress.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    def poll(self) -> int | None:
        if self.killed:
            return -9
        return None if self.hold.is_set() else self.code

    def stop(self, grace_s: float) -> int:
        self.stopped = True
        self.hold.clear()
        return self.code

    def kill(self) -> None:
        self.killed = True

    def pids(self) -> set[int]:
        return set()


@dataclass
class ScriptedRuntime(Runtime):
    code: int = EXIT_DONE
    steps: int = 4
    checkpoint_at: tuple[int, ...] = (2,)
    hold: threading.Event = field(default_factory=threading.Event)  # set: the trainer keeps running
    started: list[ScriptedTrainer] = field(default_factory=list)
    name: str = "scripted"

    def start(self, mount: JobMount) -> Running:
        trainer = ScriptedTrainer(mount.job_dir, code=self.code, steps=self.steps, checkpoint_at=self.checkpoint_at,
                                  hold=self.hold)
        self.started.append(trainer)
        return trainer

    def model_dir_inside(self, mount: JobMount) -> str:
        return str(mount.model_dir)


@pytest.fixture
def settings(tmp_path: Path) -> WorkerSettings:
    settings = WorkerSettings(config_dir=tmp_path / "config", data_dir=tmp_path / "worker", runtime="process",
                              claim_wait_s=0, progress_poll_s=0.01, events_flush_s=0.01, backoff_max_s=0.01)
    cached = settings.model_cache / "tunegrid" / "tiny-llama"  # a model folder the scripted trainer never reads
    cached.mkdir(parents=True)
    (cached / MARKER).write_text("tunegrid/tiny-llama")
    return settings


def make_agent(settings: WorkerSettings, channel: FakeChannel, runtime: Runtime, *, nvml: FakeNvml | None = None) -> Agent:
    agent = Agent(settings=settings, channel=channel, probe=GpuProbe(nvml or FakeNvml()),  # type: ignore[arg-type]
                  gate=PolicyGate(WorkerPolicy()), runtime=runtime, cache=ModelCache(settings.model_cache),
                  heartbeat_interval_s=0.05)
    agent.reporter = Reporter(channel, agent._stop, pause_s=0.02)  # type: ignore[arg-type]
    channel.agent = agent
    return agent


def run(agent: Agent, timeout_s: float = 20) -> None:
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), "the agent did not finish"


def started(agent: Agent, runtime: ScriptedRuntime) -> threading.Thread:
    """The agent running in a thread, once its trainer has started."""
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not runtime.started:
        assert time.monotonic() < deadline, "the trainer never started"
        time.sleep(0.01)
    return thread


def channel_for(a: Assignment, **files: bytes) -> FakeChannel:
    return FakeChannel(to_hand=a, files={"/files/training": TRAINING, **{f"/files/{k}": v for k, v in files.items()}})


def test_a_finished_trainer_is_reported_progress_first_then_the_adapter_then_complete(settings: WorkerSettings) -> None:
    channel = channel_for(assignment())
    agent = make_agent(settings, channel, ScriptedRuntime(steps=4, checkpoint_at=(2,)))
    run(agent)
    kinds = channel.kinds()
    assert kinds[-2:] == ["adapter", "complete"] and "checkpoint" in kinds
    assert channel.steps() == [1, 2, 3, 4]  # each step once, in order
    assert kinds.index("checkpoint") > kinds.index("events")  # the coordinator heard of step 2 before its checkpoint
    body = channel.calls[-1][1]
    assert body["adapter_sha256"] == channel.calls[-2][1] and body["result"]["steps"] == 4
    assert body["result"]["final_train_loss"] == pytest.approx(1.6)
    assert agent.status.jobs_done == 1
    assert not settings.state_path.exists() and not any(settings.jobs_dir.iterdir())  # nothing left behind


@pytest.mark.parametrize(("code", "kind"), [
    (EXIT_USER_ERROR, "user_error"), (EXIT_WORKER_ERROR, "worker_error"), (EXIT_BAD_CHECKPOINT, "bad_checkpoint"),
    (-11, "worker_error"),  # a crash
])
def test_each_failing_exit_code_is_reported_as_its_kind(settings: WorkerSettings, code: int, kind: str) -> None:
    channel = channel_for(assignment())
    run(make_agent(settings, channel, ScriptedRuntime(code=code)))
    outcome, body = channel.calls[-1]
    assert outcome == "fail" and body["kind"] == kind
    assert "adapter" not in channel.kinds()
    if code > 0:
        assert body["message"] == f"error: the trainer failed ({code})" or str(code) in body["message"]


def test_a_trainer_that_stopped_itself_is_reported_preempted(settings: WorkerSettings) -> None:
    channel = channel_for(assignment())
    run(make_agent(settings, channel, ScriptedRuntime(code=EXIT_PREEMPTED)))
    outcome, body = channel.calls[-1]
    assert outcome == "preempted" and "reason" in body


def test_the_owners_game_stops_the_trainer_and_its_last_checkpoint_goes_up_before_preempted(settings: WorkerSettings) -> None:
    nvml = FakeNvml()
    runtime = ScriptedRuntime(code=EXIT_PREEMPTED, checkpoint_at=(2, 4))
    runtime.hold.set()
    channel = channel_for(assignment())
    agent = make_agent(settings, channel, runtime, nvml=nvml)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while "checkpoint" not in channel.kinds():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    nvml.processes = [99999]  # the owner starts a game
    while "preempted" not in channel.kinds():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    agent.stop()  # the owner's game goes on: the agent would wait, paused
    thread.join(20)
    assert runtime.started[0].stopped and not runtime.started[0].killed
    assert channel.kinds()[-1] == "preempted"
    assert [step for kind, step in channel.calls if kind == "checkpoint"] == [2, 4]


@pytest.mark.parametrize("command", ["cancel", "pause", "lease_lost"])
def test_a_cancel_pause_or_lost_lease_kills_the_trainer_and_reports_nothing(settings: WorkerSettings, command: str) -> None:
    runtime = ScriptedRuntime()
    runtime.hold.set()
    channel = channel_for(assignment())
    channel.commands = [Command(type=command, lease_id=LEASE, reason="the customer cancelled the job")]
    run(make_agent(settings, channel, runtime))
    assert runtime.started[0].killed
    assert not {"complete", "fail", "preempted", "adapter"} & set(channel.kinds())
    assert not settings.state_path.exists() and not any(settings.jobs_dir.iterdir())


def test_a_lease_lost_while_reporting_kills_the_trainer(settings: WorkerSettings) -> None:
    runtime = ScriptedRuntime()
    runtime.hold.set()
    channel = channel_for(assignment())
    agent = make_agent(settings, channel, runtime)
    thread = started(agent, runtime)
    channel.lost = True
    thread.join(20)
    channel.lost = False
    assert runtime.started[0].killed and channel.kinds().count("complete") == 0


def test_an_outage_is_waited_out_and_each_event_arrives_once(settings: WorkerSettings) -> None:
    runtime = ScriptedRuntime(steps=6, checkpoint_at=(3,))
    runtime.hold.set()
    channel = channel_for(assignment())
    agent = make_agent(settings, channel, runtime)
    thread = started(agent, runtime)
    channel.down = True  # the coordinator goes away while the trainer runs and finishes
    runtime.hold.clear()
    time.sleep(0.3)
    assert thread.is_alive() and "complete" not in channel.kinds()  # waiting, not giving up
    channel.down = False
    thread.join(20)
    assert channel.steps() == [1, 2, 3, 4, 5, 6]
    assert channel.kinds()[-2:] == ["adapter", "complete"] and channel.kinds().count("checkpoint") == 1


def test_stopped_while_the_coordinator_is_down_the_outcome_waits_for_the_next_start(settings: WorkerSettings) -> None:
    """SIGTERM (`agent.stop()`) while the trainer has finished and the coordinator is unreachable: the job folder
    and state.json stay, and the next agent delivers the progress, the adapter and the completion."""
    runtime = ScriptedRuntime(steps=3, checkpoint_at=())
    runtime.hold.set()
    channel = channel_for(assignment())
    agent = make_agent(settings, channel, runtime)
    thread = started(agent, runtime)
    channel.down = True
    runtime.hold.clear()  # the trainer finishes while nobody can hear
    time.sleep(0.2)
    agent.stop()
    thread.join(20)
    assert not thread.is_alive()
    assert json.loads(settings.state_path.read_text())["assignment"]["lease_id"] == LEASE
    assert (settings.jobs_dir / LEASE / "work" / "out" / "adapter.tar.gz").is_file()
    assert "complete" not in channel.kinds()

    channel.down = False
    run(make_agent(settings, channel, ScriptedRuntime()))  # the next start: nothing is claimed before it is done
    assert channel.kinds()[-2:] == ["adapter", "complete"]
    assert sorted(channel.steps()) == [1, 2, 3] and len(channel.steps()) == 3
    assert not settings.state_path.exists() and not (settings.jobs_dir / LEASE).exists()


def test_a_resume_checkpoint_that_fails_its_checks_is_never_run(settings: WorkerSettings) -> None:
    bad = checkpoint_archive(step=2, replace={"state.json": b"{\"format\": \"pickle\"}"})
    channel = channel_for(assignment(resume=bad), resume=bad)
    runtime = ScriptedRuntime()
    run(make_agent(settings, channel, runtime))
    assert not runtime.started  # the trainer never saw it
    outcome, body = channel.calls[-1]
    assert outcome == "fail" and body["kind"] == "bad_checkpoint" and "ftckpt-1" in body["message"]


def test_a_good_resume_checkpoint_is_unpacked_for_the_trainer(settings: WorkerSettings) -> None:
    good = checkpoint_archive(step=2)
    channel = channel_for(assignment(resume=good), resume=good)
    seen: list[set[str]] = []

    class Peek(ScriptedRuntime):
        def start(self, mount: JobMount) -> Running:
            seen.append({p.name for p in (mount.job_dir / "resume").iterdir()})
            return super().start(mount)

    run(make_agent(settings, channel, Peek()))
    assert seen == [set(checkpoint_members())] and channel.kinds()[-1] == "complete"


# --- a verification lease -------------------------------------------------------------------------

def verification_assignment(adapter: bytes, held: bytes) -> Assignment:
    a = assignment()
    return a.model_copy(update={
        "kind": "verify", "spec": a.spec.model_copy(update={"kind": "verify"}),
        "adapter_url": "/files/adapter", "adapter_sha256": sha256(adapter),
        "held_out_url": "/files/held_out", "held_out_sha256": sha256(held)})


class Exited(Running):
    """A program that has already exited done."""

    def poll(self) -> int | None:
        return EXIT_DONE

    def stop(self, grace_s: float) -> int:
        return EXIT_DONE

    def kill(self) -> None:
        pass

    def pids(self) -> set[int]:
        return set()


@dataclass
class VerifyingRuntime(Runtime):
    """The verification program's part: notes what the job folder held when it started, writes `figures` as its
    verification.json and exits done."""

    figures: str
    seen: dict[str, Any] = field(default_factory=dict)
    name: str = "verifying"

    def start(self, mount: JobMount) -> Running:
        work = mount.job_dir
        self.seen = {"files": sorted(str(p.relative_to(work)) for p in work.rglob("*")),
                     "spec_kind": json.loads((work / "spec.json").read_text())["kind"],
                     "held_out": (work / "held_out.jsonl").read_bytes()}
        (work / "out").mkdir()
        (work / "out" / "progress.jsonl").write_text(json.dumps({"type": "started", "total_steps": 0}) + "\n")
        (work / "out" / "verification.json").write_text(self.figures)
        return Exited()

    def model_dir_inside(self, mount: JobMount) -> str:
        return str(mount.model_dir)


def test_a_verification_lease_gets_the_held_out_sample_and_only_the_adapters_weights(settings: WorkerSettings,
                                                                                     tmp_path: Path) -> None:
    from tests.fakes import tar_gz  # noqa: PLC0415
    import tarfile  # noqa: PLC0415

    link = tarfile.TarInfo("adapter/adapter_config.json")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    archive = tar_gz([link, ("adapter/adapter_model.safetensors", b"weights"), ("adapter/run_me.py", b"import os")])
    held = b'{"messages": [{"role": "user", "content": "held"}]}\n'
    figures = {"heldout_base_loss": 3.0, "heldout_adapter_loss": 2.0, "heldout_tokens": 40, "valid_base_loss": 3.1,
               "valid_adapter_loss": 2.1, "valid_tokens": 30}
    channel = channel_for(verification_assignment(archive, held), adapter=archive, held_out=held)
    runtime = VerifyingRuntime(figures=json.dumps(figures))
    agent = make_agent(settings, channel, runtime)
    run(agent)
    assert runtime.seen["spec_kind"] == "verify" and runtime.seen["held_out"] == held
    assert [f for f in runtime.seen["files"] if f.startswith("adapter")] == ["adapter", "adapter/adapter_model.safetensors"]
    assert channel.kinds()[-1] == "complete" and "adapter" not in channel.kinds()  # nothing is uploaded
    body = channel.calls[-1][1]
    assert body["verification"] == figures and "adapter_sha256" not in body


def test_figures_a_verifier_cannot_stand_behind_are_sent_as_none(settings: WorkerSettings) -> None:
    from tests.fakes import tar_gz  # noqa: PLC0415

    archive = tar_gz([("adapter/adapter_model.safetensors", b"weights")])
    held = b"{}\n"
    hostile = '{"heldout_base_loss": NaN, "heldout_adapter_loss": "1.0", "valid_adapter_loss": -2, "valid_tokens": 1e99}'
    channel = channel_for(verification_assignment(archive, held), adapter=archive, held_out=held)
    run(make_agent(settings, channel, VerifyingRuntime(figures=hostile)))
    sent = channel.calls[-1][1]["verification"]
    assert all(sent[name] is None for name in ("heldout_base_loss", "heldout_adapter_loss", "valid_adapter_loss"))
    assert sent["valid_tokens"] == 0


# --- an export lease --------------------------------------------------------------------------------

def export_assignment(adapter: bytes, formats: list[str]) -> Assignment:
    a = assignment()
    return a.model_copy(update={
        "kind": "export", "spec": a.spec.model_copy(update={"kind": "export", "export": formats}),
        "training_file_url": None, "training_file_sha256": None,
        "initial_adapter_url": "/files/initial", "initial_adapter_sha256": sha256(adapter),
        "initial_adapter_member": "adapter/adapter_model.safetensors"})


@dataclass
class ExportingRuntime(Runtime):
    """The export program's part: writes a merged folder (with a file an honest one never holds) and a GGUF file,
    its figures, and exits done; `plant`: where a link to the owner's secret goes instead (`merged`: as its
    tokenizer.json, `gguf`: as the GGUF file)."""

    secret: Path
    plant: str | None = None
    seen: dict[str, Any] = field(default_factory=dict)
    name: str = "exporting"

    def start(self, mount: JobMount) -> Running:
        work = mount.job_dir
        self.seen = {"files": sorted(str(p.relative_to(work)) for p in work.rglob("*"))}
        merged = work / "out" / "exports" / "merged"
        merged.mkdir(parents=True)
        (merged / "model.safetensors").write_bytes(b"weights")
        (merged / "config.json").write_text("{}")
        (merged / "run_me.py").write_text("import os")
        if self.plant == "merged":
            (merged / "tokenizer.json").symlink_to(self.secret)
        gguf = work / "out" / "exports" / "model-q8_0.gguf"
        if self.plant == "gguf":
            gguf.symlink_to(self.secret)
        else:
            gguf.write_bytes(b"GGUF-bytes")
        (work / "out" / "progress.jsonl").write_text(json.dumps({"type": "started", "kind": "export"}) + "\n")
        (work / "out" / "export.json").write_text(json.dumps({"formats": {
            "merged": {"seconds": 1.5, "bytes": 7}, "gguf:q8_0": {"seconds": float("nan"), "bytes": 10},
            "gguf:f16": {"seconds": 1, "bytes": 1}}}))
        return Exited()

    def model_dir_inside(self, mount: JobMount) -> str:
        return str(mount.model_dir)


def test_an_export_lease_sends_only_its_formats_from_names_it_derives(settings: WorkerSettings, tmp_path: Path) -> None:
    import io  # noqa: PLC0415
    import tarfile  # noqa: PLC0415

    from tests.fakes import tar_gz  # noqa: PLC0415

    secret = tmp_path / "owner-secret.txt"
    secret.write_text("the owner's private file")
    archive = tar_gz([("adapter/adapter_model.safetensors", b"weights")])
    channel = channel_for(export_assignment(archive, ["merged", "gguf:q8_0"]), initial=archive)
    runtime = ExportingRuntime(secret=secret)
    run(make_agent(settings, channel, runtime))
    assert "train.jsonl" not in runtime.seen["files"] and "initial/adapter_model.safetensors" in runtime.seen["files"]
    assert [k for k in channel.kinds() if k != "events"] == ["export", "export", "complete"]
    with tarfile.open(fileobj=io.BytesIO(channel.uploaded["merged"])) as tar:
        members = {m.name: m for m in tar}
    assert sorted(members) == ["config.json", "model.safetensors"] and all(m.isreg() for m in members.values())
    assert channel.uploaded["gguf:q8_0"] == b"GGUF-bytes"
    body = channel.calls[-1][1]
    assert body["export"] == {"merged": {"seconds": 1.5, "bytes": 7}}  # a NaN and a format not asked are dropped


@pytest.mark.parametrize("plant", ["merged", "gguf"])
def test_a_link_where_an_export_file_goes_fails_the_lease_and_sends_nothing_of_the_host(
        settings: WorkerSettings, tmp_path: Path, plant: str) -> None:
    from tests.fakes import tar_gz  # noqa: PLC0415

    secret = tmp_path / "owner-secret.txt"
    secret.write_text("the owner's private file")
    archive = tar_gz([("adapter/adapter_model.safetensors", b"weights")])
    formats = ["merged"] if plant == "merged" else ["gguf:q8_0"]
    channel = channel_for(export_assignment(archive, formats), initial=archive)
    run(make_agent(settings, channel, ExportingRuntime(secret=secret, plant=plant)))
    assert "export" not in channel.kinds() and channel.kinds()[-1] == "fail"
    assert channel.calls[-1][1]["kind"] == "worker_error"
    assert all(secret.read_bytes() not in data for data in channel.uploaded.values())


# --- a batch lease ----------------------------------------------------------------------------------

def batch_assignment(done: bytes) -> Assignment:
    a = assignment()
    return a.model_copy(update={"kind": "batch", "spec": a.spec.model_copy(update={"kind": "batch"}),
                                "batch_done_url": "/files/batch_done", "batch_done_sha256": sha256(done)})


@dataclass
class AnsweringRuntime(Runtime):
    """The batch program's part: notes its inputs, writes two parts (the second a link to the owner's secret, as a
    hostile job would plant) and a part number it never wrote, announces all three, and exits done."""

    secret: Path
    seen: dict[str, Any] = field(default_factory=dict)
    name: str = "answering"

    def start(self, mount: JobMount) -> Running:
        work = mount.job_dir
        self.seen = {"requests": (work / "train.jsonl").read_bytes(), "done": (work / "batch_done.jsonl").read_bytes()}
        parts = work / "out" / "batch"
        parts.mkdir(parents=True)
        (parts / "part-1.jsonl").write_text('{"custom_id": "a"}\n')
        (parts / "part-2.jsonl").symlink_to(self.secret)
        lines = [{"type": "started", "kind": "batch", "total_steps": 3}, {"type": "batch_part", "part": 1},
                 {"type": "batch_part", "part": 2}, {"type": "batch_part", "part": 9},
                 {"type": "batch_part", "part": "../../etc/passwd"}]
        (work / "out" / "progress.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        (work / "out" / "batch.json").write_text('{"answered": 1, "parts": 1}')
        return Exited()

    def model_dir_inside(self, mount: JobMount) -> str:
        return str(mount.model_dir)


def test_a_batch_lease_sends_its_parts_by_the_names_it_derives_and_no_link(settings: WorkerSettings,
                                                                          tmp_path: Path) -> None:
    secret = tmp_path / "owner-secret.txt"
    secret.write_text("the owner's private file")
    done = b'{"custom_id": "z"}\n'
    channel = channel_for(batch_assignment(done), batch_done=done)
    runtime = AnsweringRuntime(secret=secret)
    run(make_agent(settings, channel, runtime))
    assert runtime.seen == {"requests": TRAINING, "done": done}
    assert [k for k in channel.kinds() if k != "events"] == ["batch", "complete"]
    assert list(channel.uploaded.values()) == [b'{"custom_id": "a"}\n']
    assert channel.calls[-1][1] == {"usage": channel.calls[-1][1]["usage"]}
