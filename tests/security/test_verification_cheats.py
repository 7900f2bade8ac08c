"""Independent verification with real processes: a real coordinator (`tunegrid-coordinator serve`), real agents
whose trainer and verifier run as subprocesses (4-bit QLoRA of the tiny model on the CPU), and a cheating
provider speaking the protocol. The cheater returns an adapter trained on other data (by the real trainer) and
claims the validation loss of a full run; two verifiers of other providers measure it and disagree; the cheater is not
paid nor the customer billed, and the job trains again on an honest worker, whose adapter a verifier of another
provider confirms (a provider that saw the held-out sample as a verifier never trains the job): the customer sees
`verified` with the figures, verifiers are paid from the platform's
verification book, and the ledger audit stays clean.

With `verification: "redundant"` the job trains twice: a cheater that trains one epoch of ten (a tenth of the
steps) and reports the figures its adapter really has passes one verification (its
adapter does improve on the base), but its held-out loss is far worse than an honest second training's, so it is
neither billed nor paid, while the honest training is."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.e2e.conftest import LiveServer
from tests.e2e.test_agent import registered_agent, submit, wait_for, worker_settings
from tests.fakes import FakeAgent, sha256, tar_gz
from tests.security.conftest import audit_is_clean, database, direct_key
from tests.trainer.conftest import progress_lines, write_job
from tests.trainer.test_verify import spelling
from worker.trainer.__main__ import run as run_trainer

pytestmark = pytest.mark.live


def foreign_adapter(tmp_path: Path, tiny_model: Path) -> tuple[bytes, float]:
    """An adapter the real trainer made from data that is not the customer's: its archive, and the validation loss
    the cheater claims for it (a full run's, better than the one it has). A cheater that instead measured its
    adapter on the customer's validation rows and reported that truthfully is not caught by one verification
    (SECURITY.md: what verification can and cannot catch)."""
    job = write_job(tmp_path / "foreign", tiny_model, train=spelling(40),
                    hyperparameters={"n_epochs": 2, "batch_size": 2, "learning_rate": 3e-3})
    assert run_trainer(job) == 0
    folder = job / "out" / "adapter"
    archive = tar_gz([(f"adapter/{p.name}", p.read_bytes()) for p in sorted(folder.iterdir())])
    return archive, json.loads((job / "out" / "result.json").read_text())["valid_loss"] - 1.0


def _usage(server: LiveServer) -> dict[str, tuple[int, int, str]]:
    engine = create_engine(database(server))
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT lease_id, charge_micros, provider_micros, rule FROM usage_records")).all()
    engine.dispose()
    return {r[0]: (int(r[1]), int(r[2]), str(r[3])) for r in rows}


def test_an_adapter_trained_on_other_data_is_refuted_unpaid_and_the_job_is_verified_elsewhere(
    coordinator: LiveServer, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    archive, claimed = foreign_adapter(tmp_path, tiny_model)
    customer = direct_key(coordinator, "customer", "verified-customer")
    agents = [registered_agent(coordinator, worker_settings(tmp_path / name, tiny_model), monkeypatch,
                               provider_key=direct_key(coordinator, "provider", name))
              for name in ("vera", "hugo", "tom")]  # two refute the cheater; they saw the held-out sample, so the third trains
    with httpx.Client(base_url=coordinator.url, timeout=30) as http, \
            httpx.Client(base_url=coordinator.url, headers={"Authorization": f"Bearer {customer}"}, timeout=30) as client:
        cheater = FakeAgent.register(http, direct_key(coordinator, "provider", "cheater"), machine_id="cheater-pc",
                                   price="0.05")  # within the market's cap, like the others
        job = submit(client, examples=40, verification="always",
                     hyperparameters={"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 15})
        job = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()  # past validating_files: its sample kept back
        assert job["verification"]["held_out_examples"] == 2
        a = cheater.claim(wait_s=5)
        assert a is not None and a["job_id"] == job["id"] and a["held_out_url"] is None  # a trainer never gets it
        held = http.get(f"/v1/workers/leases/{a['lease_id']}/files/held_out", headers=cheater.headers(a["lease_id"]))
        assert held.status_code == 404
        assert cheater.events(a["lease_id"], {"type": "progress", "step": 20, "total_steps": 20, "train_loss": 4.9,
                                              "tokens_per_s": 200.0}).status_code == 200
        assert cheater.upload(a["lease_id"], "adapter", archive).status_code == 200
        done = http.post(f"/v1/workers/leases/{a['lease_id']}/complete", headers=cheater.headers(a["lease_id"]), json={
            "adapter_sha256": sha256(archive), "usage": {"wall_seconds": 60.0, "gpu_seconds": 60.0},
            "result": {"steps": 20, "trained_tokens": 4000, "final_train_loss": 4.9, "final_eval_loss": claimed}})
        assert done.status_code == 200 and done.json()["job_status"] == "queued", done.text  # waits for a verifier

        threads = [threading.Thread(target=agent.run, daemon=True) for agent in agents]
        for thread in threads:
            thread.start()
        try:
            final = wait_for(client, job["id"], {"succeeded", "failed"}, timeout_s=400)
        finally:
            for agent in agents:
                agent.stop()
            for thread in threads:
                thread.join(timeout=30)

        assert final["status"] == "succeeded" and final["verified"], final
        v = final["verification"]
        assert v["status"] == "passed" and v["heldout_adapter_loss"] < v["heldout_base_loss"]
        usage = _usage(coordinator)
        assert usage[a["lease_id"]][:2] == (0, 0)  # the cheater: neither billed nor paid
        cheater_seen = http.get(f"/v1/workers/{cheater.worker_id}", headers={
            "Authorization": f"Bearer {direct_key(coordinator, 'admin', 'auditor')}"}).json()
        assert cheater_seen["failed_checks"] == 1 and cheater_seen["completed_leases"] == 0
        events = [e["message"] for e in client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=500").json()["data"]]
        assert any("refuted the adapter of worker" in m for m in events), events
        assert any("was verified by worker" in m for m in events), events
        charged = sum(charge for charge, _, _ in usage.values())
        assert charged > 0 and float(final["cost"]) == pytest.approx(charged / 1e6)  # the honest training only
        content = client.get(f"/v1/files/{final['result_files'][0]}/content")
        assert content.status_code == 200 and content.content[:2] == b"\x1f\x8b"
    audit_is_clean(coordinator)


def _cheap_adapter(http: httpx.Client, cheater: FakeAgent, a: dict, tmp_path: Path,  # type: ignore[type-arg]
                   tiny_model: Path) -> tuple[bytes, float, float]:
    """The real trainer on the lease's own spec and data, for one of the job's ten epochs: its archive, and the
    train and validation losses it really has (what the cheater reports)."""
    rows = [json.loads(line) for line in http.get(f"/v1/workers/leases/{a['lease_id']}/files/training",
                                                  headers=cheater.headers(a["lease_id"])).text.splitlines()]
    spec = {k: v for k, v in a["spec"].items() if k not in ("job_id", "kind", "base_model", "model_dir")}
    job = write_job(tmp_path / "cheap", tiny_model, train=rows,
                    **{**spec, "hyperparameters": {**spec["hyperparameters"], "n_epochs": 1}})
    assert run_trainer(job) == 0
    folder = job / "out" / "adapter"
    archive = tar_gz([(f"adapter/{p.name}", p.read_bytes()) for p in sorted(folder.iterdir())])
    train_loss = [e["loss"] for e in progress_lines(job) if e["type"] == "step"][-1]
    return archive, train_loss, json.loads((job / "out" / "result.json").read_text())["valid_loss"]


def _story(client: httpx.Client, job_id: str) -> str:
    """The job's events, oldest first: what a failed wait prints."""
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=500").json()["data"]
    return "\n".join(e["message"] for e in reversed(events))


def test_a_tenth_of_the_steps_passes_one_verification_but_loses_the_redundant_comparison_unpaid(
    coordinator: LiveServer, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    customer = direct_key(coordinator, "customer", "redundant-customer")
    agents = [registered_agent(coordinator, worker_settings(tmp_path / name, tiny_model), monkeypatch,
                               provider_key=direct_key(coordinator, "provider", name))
              for name in ("ana", "ben", "cyd")]  # one verifies the cheater, one trains, one (or the first) verifies it
    with httpx.Client(base_url=coordinator.url, timeout=30) as http, \
            httpx.Client(base_url=coordinator.url, headers={"Authorization": f"Bearer {customer}"}, timeout=30) as client:
        quote = client.post("/v1/fine_tuning/quotes", json={"model": "tunegrid/tiny-llama", "training_tokens": 5000,
                                                            "verification": "redundant"}).json()
        assert quote["trainings"] == 2
        cheater = FakeAgent.register(http, direct_key(coordinator, "provider", "lazy"), machine_id="lazy-pc",
                                   price="0.05")
        job = submit(client, examples=40, verification="redundant",
                     hyperparameters={"n_epochs": 10, "batch_size": 1, "learning_rate_multiplier": 15})
        assert job["verification"]["mode"] == "redundant", job
        a = cheater.claim(wait_s=5)
        assert a is not None and a["job_id"] == job["id"]
        assert cheater.events(a["lease_id"], {"type": "started", "total_steps": 38}).status_code == 200
        archive, loss, valid_loss = _cheap_adapter(http, cheater, a, tmp_path, tiny_model)
        assert cheater.events(a["lease_id"], {"type": "progress", "step": 38, "total_steps": 38, "train_loss": loss,
                                              "tokens_per_s": 200.0}).status_code == 200
        assert cheater.upload(a["lease_id"], "adapter", archive).status_code == 200
        done = http.post(f"/v1/workers/leases/{a['lease_id']}/complete", headers=cheater.headers(a["lease_id"]), json={
            "adapter_sha256": sha256(archive), "usage": {"wall_seconds": 60.0, "gpu_seconds": 60.0},
            "result": {"steps": 38, "trained_tokens": 4000, "final_train_loss": loss, "final_eval_loss": valid_loss}})
        assert done.status_code == 200 and done.json()["job_status"] == "queued", done.text

        threads = [threading.Thread(target=agent.run, daemon=True) for agent in agents]
        for thread in threads:
            thread.start()
        try:
            deadline = time.monotonic() + 240
            while True:
                seen = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
                outcomes = {r["worker_id"]: r["outcome"] for r in seen["verification"]["replicas"]}
                if "refuted" in outcomes.values() or seen["status"] in ("succeeded", "failed", "cancelled"):
                    break
                assert time.monotonic() < deadline, _story(client, job["id"])
                time.sleep(0.5)
            cancelled = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
            assert cancelled.status_code == 200, cancelled.text
        finally:
            for agent in agents:
                agent.stop()
            for thread in threads:
                thread.join(timeout=30)

        assert outcomes.get(cheater.worker_id) == "refuted", seen
        honest = [w for w, outcome in outcomes.items() if outcome == "confirmed"]
        assert len(honest) == 1, outcomes
        events = [e["message"] for e in client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=500").json()["data"]]
        assert any(f"The training of worker {cheater.worker_id} is not paid nor billed" in m for m in events), events
        usage = _usage(coordinator)
        assert usage[a["lease_id"]][:2] == (0, 0)  # the cheater: neither billed nor paid
        engine = create_engine(database(coordinator))
        with engine.connect() as conn:
            trained = conn.execute(text("SELECT id FROM leases WHERE worker_id = :w AND kind = 'train'"),
                                   {"w": honest[0]}).scalars().all()
        engine.dispose()
        assert len(trained) == 1 and usage[trained[0]][2] == "until_end" and usage[trained[0]][0] > 0  # paid at the cancel
        cheater_seen = http.get(f"/v1/workers/{cheater.worker_id}", headers={
            "Authorization": f"Bearer {direct_key(coordinator, 'admin', 'auditor')}"}).json()
        assert cheater_seen["failed_checks"] == 1
    audit_is_clean(coordinator)
