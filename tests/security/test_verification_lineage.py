"""Cheating providers against a real coordinator process (`tunegrid-coordinator serve`), speaking the worker
protocol over HTTP (FakeAgent); both failed before their fixes.

1. A spy verifies a customer's job and keeps the held-out sample it downloads; the customer reruns on the same
   file, which keeps back the very same examples (`held_out.py`): the spy is never handed the rerun's training
   (`held_out_viewers`).
2. A cheater trains junk, uploads a checkpoint and is preempted (free the first time) in a job whose customer
   asked for verification; an honest worker resumes from it and is refuted by two verifiers: the refuted
   adapter's lineage is unpaid and quarantined, and the next trainer never gets the cheater's checkpoint.
"""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.coordinator.services.test_verification import AGREE, DISAGREE
from tests.e2e.conftest import LiveServer
from tests.e2e.test_agent import submit
from tests.fakes import FakeAgent, adapter_archive, sha256
from tests.security.conftest import audit_is_clean, database, direct_key

pytestmark = pytest.mark.live



def _complete_training(agent: FakeAgent, lease_id: str) -> httpx.Response:
    adapter = adapter_archive()
    assert agent.progress(lease_id).status_code == 200
    assert agent.upload(lease_id, "adapter", adapter).status_code == 200
    return agent.client.post(f"/v1/workers/leases/{lease_id}/complete", headers=agent.headers(lease_id), json={
        "adapter_sha256": sha256(adapter), "usage": {"wall_seconds": 10.0, "gpu_seconds": 9.5},
        "result": {"steps": 10, "trained_tokens": 1000, "final_train_loss": 2.0, "final_eval_loss": 1.0}})


def _verify(agent: FakeAgent, lease_id: str, figures: dict) -> httpx.Response:  # type: ignore[type-arg]
    assert agent.events(lease_id, {"type": "started", "total_steps": 0}).status_code == 200
    return agent.client.post(f"/v1/workers/leases/{lease_id}/complete", headers=agent.headers(lease_id), json={
        "verification": figures, "usage": {"wall_seconds": 3.0, "gpu_seconds": 3.0}})


def _held_out(server: LiveServer, job_id: str) -> str:
    engine = create_engine(database(server))
    with engine.connect() as conn:
        row = conn.execute(text("SELECT held_out FROM jobs WHERE id = :id"), {"id": job_id}).scalar_one()
    engine.dispose()
    import json

    return (json.loads(row) if isinstance(row, str) else row)["sha256"]


def test_a_spy_verifier_that_kept_the_held_out_sample_never_trains_the_customer_s_rerun_on_the_same_file(
    coordinator: LiveServer,
) -> None:
    customer = direct_key(coordinator, "customer", "rerun-customer")
    with httpx.Client(base_url=coordinator.url, timeout=30) as http, \
            httpx.Client(base_url=coordinator.url, headers={"Authorization": f"Bearer {customer}"}, timeout=30) as client:
        trainer = FakeAgent.register(http, direct_key(coordinator, "provider", "honest-trainer"), machine_id="t-pc",
                                     price="0.05")
        spy = FakeAgent.register(http, direct_key(coordinator, "provider", "spy"), machine_id="spy-pc", price="0.05")
        first = submit(client, examples=40, verification="always")
        assert first["status"] == "validating_files", first  # and queued before the answer came
        a = trainer.claim()
        assert a is not None and a["job_id"] == first["id"]
        done = _complete_training(trainer, a["lease_id"])
        assert done.status_code == 200, done.text
        check = spy.claim(kinds=["train", "verify"])
        assert check is not None and check["kind"] == "verify" and check["job_id"] == first["id"]
        sample = http.get(f"/v1/workers/leases/{check['lease_id']}/files/held_out", headers=spy.headers(check["lease_id"]))
        assert sample.status_code == 200 and sample.content  # the spy keeps a copy
        assert _verify(spy, check["lease_id"], AGREE).status_code == 200
        assert client.get(f"/v1/fine_tuning/jobs/{first['id']}").json()["status"] == "succeeded"

        rerun = client.post("/v1/fine_tuning/jobs", json={"model": "tunegrid/tiny-llama",
                                                          "training_file": first["training_file"],
                                                          "verification": "redundant"}).json()
        assert rerun["status"] == "validating_files", rerun
        assert _held_out(coordinator, rerun["id"]) == _held_out(coordinator, first["id"])  # the same examples
        got = spy.claim(kinds=["train", "verify"])
        assert client.post(f"/v1/fine_tuning/jobs/{rerun['id']}/cancel").status_code == 200  # leave no queued job
        audit_is_clean(coordinator)
        assert got is None, (f"the provider that downloaded job {first['id']}'s held-out sample was handed the "
                             f"{got['kind']} lease of job {rerun['id']}, which keeps back the very same examples")


def test_a_preempter_s_junk_checkpoint_is_refuted_with_the_adapter_built_on_it_and_never_handed_on(
    coordinator: LiveServer,
) -> None:
    customer = direct_key(coordinator, "customer", "verified-customer-2")
    with httpx.Client(base_url=coordinator.url, timeout=30) as http, \
            httpx.Client(base_url=coordinator.url, headers={"Authorization": f"Bearer {customer}"}, timeout=30) as client:
        cheat = FakeAgent.register(http, direct_key(coordinator, "provider", "preempter"), machine_id="c-pc",
                                   price="0.05")
        job = submit(client, examples=40, verification="always")
        a = cheat.claim()
        assert a is not None and a["job_id"] == job["id"]
        saved = cheat.save_checkpoint(a["lease_id"], 2)  # junk weights (zeros), well formed
        assert saved.status_code == 200, saved.text
        assert cheat.preempted(a["lease_id"]).status_code == 200
        [junk] = [c["id"] for c in client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]]

        honest = FakeAgent.register(http, direct_key(coordinator, "provider", "finisher"), machine_id="h-pc",
                                    price="0.05")
        b = honest.claim()
        assert b is not None and b["resume_from"]["checkpoint_id"] == junk
        assert _complete_training(honest, b["lease_id"]).status_code == 200
        for name in ("judge-1", "judge-2"):
            judge = FakeAgent.register(http, direct_key(coordinator, "provider", name), machine_id=f"{name}-pc",
                                       price="0.05")
            c = judge.claim(kinds=["train", "verify"])
            assert c is not None and c["kind"] == "verify"
            assert _verify(judge, c["lease_id"], DISAGREE).status_code == 200
        state = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
        assert state["status"] == "queued" and state["verification"]["status"] == "failed", state
        admin = {"Authorization": f"Bearer {direct_key(coordinator, 'admin', 'auditor-16')}"}
        for worker_id in (honest.worker_id, cheat.worker_id):  # across providers the verdict blames nobody
            assert http.get(f"/v1/workers/{worker_id}", headers=admin).json()["failed_checks"] == 0

        nxt = FakeAgent.register(http, direct_key(coordinator, "provider", "next-trainer"), machine_id="n-pc",
                                 price="0.05")
        d = nxt.claim()
        assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 200
        audit_is_clean(coordinator)
        assert d is not None and d["kind"] == "train"
        assert d["resume_from"] is None, ("after the refutation the next trainer is handed again the checkpoint the "
                                          f"refuted adapter was built on ({junk}, the unblamed preempter's)")
