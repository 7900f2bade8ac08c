"""Direct transfers over HTTP with the object store (a real S3 server, SeaweedFS; PostgreSQL, as in production):
`coordinator/api/downloads.py` sends customers and workers to presigned URLs for one object each, and the lease
upload calls adopt what a worker PUT to the URL its ticket named, checked as a relayed upload is. Every refusal
leaves nothing stored and is a clear 4xx."""

from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.db.tables import JobCheckpointModel, LeaseModel
from coordinator.settings import CoordinatorSettings
from coordinator.stores import open_store
from shared.protocol import SHA256_HEADER, UPLOAD_KEY_HEADER
from tests.coordinator.api.conftest import placed
from tests.fakes import FakeAgent, adapter_archive, sha256

pytestmark = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)


@pytest.fixture
def settings(settings: CoordinatorSettings, s3_config: dict[str, str]) -> CoordinatorSettings:
    return settings.model_copy(update=s3_config)


def ticket(agent: FakeAgent, lease_id: str, data: bytes, kind: str, **fields: object) -> httpx.Response:
    return agent.client.post(f"/v1/workers/leases/{lease_id}/uploads", headers=agent.headers(lease_id),
                             json={"kind": kind, "bytes": len(data), "sha256": sha256(data), **fields})


def put_direct(answer: httpx.Response, data: bytes) -> None:
    body = answer.json()
    assert answer.status_code == 200 and body["url"].startswith("http://127.0.0.1:8333/"), answer.text
    stored = httpx.put(body["url"], content=data, headers=body["headers"], timeout=10)
    assert stored.status_code == 200, stored.text


def adopt(agent: FakeAgent, lease_id: str, path: str, data: bytes, key: str, **headers: str) -> httpx.Response:
    return agent.client.put(f"/v1/workers/leases/{lease_id}/{path}",
                            headers={**agent.headers(lease_id), SHA256_HEADER: sha256(data), UPLOAD_KEY_HEADER: key,
                                     **headers})


def test_a_customer_download_is_a_redirect_to_the_file_alone(client: TestClient, customer, training_file: str,  # type: ignore[no-untyped-def]
                                                            settings: CoordinatorSettings) -> None:
    answer = client.get(f"/v1/files/{training_file}/content", headers=customer.headers, follow_redirects=False)
    assert answer.status_code == 307 and "X-Amz-Signature=" in answer.headers["location"]
    assert "authorization" not in answer.headers["location"].lower()
    fetched = httpx.get(answer.headers["location"], timeout=10)
    meta = client.get(f"/v1/files/{training_file}", headers=customer.headers).json()
    assert fetched.status_code == 200 and len(fetched.content) == meta["bytes"]
    assert fetched.headers["content-disposition"].startswith("attachment; filename=")
    other = answer.headers["location"].replace(f"files/{training_file}", "files/file-someone-elses")
    assert httpx.get(other, timeout=10).status_code == 403  # the signature names one object


def test_relayed_when_redirects_are_off(settings: CoordinatorSettings, customer, training_file: str) -> None:  # type: ignore[no-untyped-def]
    from coordinator.app import create_app  # noqa: PLC0415

    relayed = create_app(settings.model_copy(update={"storage_redirect_downloads": False}))
    with TestClient(relayed) as c:
        answer = c.get(f"/v1/files/{training_file}/content", headers=customer.headers, follow_redirects=False)
    relayed.state.engine.dispose()
    assert answer.status_code == 200 and int(answer.headers["content-length"]) == len(answer.content) > 0


def test_a_workers_input_is_a_redirect_for_the_live_lease_only(client: TestClient, agent: FakeAgent, create_job) -> None:  # type: ignore[no-untyped-def]
    _, a = placed(client, agent, create_job)
    answer = client.get(a["training_file_url"], headers=agent.headers(a["lease_id"]), follow_redirects=False)
    assert answer.status_code == 307 and answer.headers[SHA256_HEADER] == a["training_file_sha256"]
    assert sha256(httpx.get(answer.headers["location"], timeout=10).content) == a["training_file_sha256"]
    stale = client.get(a["training_file_url"], headers=agent.headers(a["lease_id"], a["fencing_token"] + 1),
                       follow_redirects=False)
    assert stale.status_code == 409  # no URL for a lease that is not the caller's any more


def test_an_adapter_goes_direct_and_is_adopted_once(client: TestClient, agent: FakeAgent, create_job,  # type: ignore[no-untyped-def]
                                                    session: Session, settings: CoordinatorSettings) -> None:
    _, a = placed(client, agent, create_job)
    lease_id, adapter = a["lease_id"], adapter_archive("tunegrid/tiny-llama")
    assert agent.progress(lease_id).status_code == 200
    answer = ticket(agent, lease_id, adapter, "adapter")
    key = answer.json()["key"]
    assert key.startswith(f"incoming/{lease_id}/adapter-")
    put_direct(answer, adapter)
    adopted = adopt(agent, lease_id, "adapter", adapter, key)
    assert adopted.status_code == 200 and adopted.json()["sha256"] == sha256(adapter), adopted.text
    again = adopt(agent, lease_id, "adapter", adapter, key)
    assert again.status_code == 400 and again.json()["error"]["code"] == "upload_missing"
    lease = session.scalars(select(LeaseModel).where(LeaseModel.id == lease_id)).one()
    assert lease.adapter_sha256 == sha256(adapter) and open_store(settings).size(lease.adapter_key) == len(adapter)
    done = agent.complete(lease_id, adapter)
    assert done.status_code == 200 and done.json()["job_status"] in ("succeeded", "validating_results"), done.text


def test_a_checkpoint_goes_direct_and_is_checked_as_a_relayed_one(client: TestClient, agent: FakeAgent, create_job,  # type: ignore[no-untyped-def]
                                                                  session: Session) -> None:
    _, a = placed(client, agent, create_job)
    lease_id = a["lease_id"]
    assert agent.progress(lease_id, step=5).status_code == 200
    bad = agent.checkpoint_for(lease_id, 5, **{"trainer_state.json": b"not json"})
    answer = ticket(agent, lease_id, bad, "checkpoint", step=5)
    put_direct(answer, bad)
    refused = adopt(agent, lease_id, "checkpoints?step=5", bad, answer.json()["key"])
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "checkpoint_rejected", refused.text
    good = agent.checkpoint_for(lease_id, 5)
    answer = ticket(agent, lease_id, good, "checkpoint", step=5)
    put_direct(answer, good)
    recorded = adopt(agent, lease_id, "checkpoints?step=5", good, answer.json()["key"])
    assert recorded.status_code == 200, recorded.text
    assert [c.step_number for c in session.scalars(select(JobCheckpointModel).where(
        JobCheckpointModel.lease_id == lease_id))] == [5]


def test_a_worker_cannot_adopt_what_is_not_its_own_upload(client: TestClient, provider, agent: FakeAgent,  # type: ignore[no-untyped-def]
                                                          create_job, customer, training_file: str) -> None:
    _, a = placed(client, agent, create_job)
    lease_id, adapter = a["lease_id"], adapter_archive("tunegrid/tiny-llama")
    for key in (f"files/{training_file}", "incoming/lease-other/adapter-up-1", f"incoming/{lease_id}/../../files/x",
                f"incoming/{lease_id}/checkpoint-up-1"):  # another's blob, another lease's, a way out, another kind
        refused = adopt(agent, lease_id, "adapter", adapter, key)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_upload_key", key
    assert client.get(f"/v1/files/{training_file}", headers=customer.headers).status_code == 200  # untouched
    # A ticket's URL takes only the declared bytes: the store refuses others, so nothing is there to adopt.
    answer = ticket(agent, lease_id, adapter, "adapter")
    body = answer.json()
    swapped = adapter[:-1] + bytes([adapter[-1] ^ 1])
    assert httpx.put(body["url"], content=swapped, headers=body["headers"], timeout=10).status_code == 400
    missing = adopt(agent, lease_id, "adapter", adapter, body["key"])
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "upload_missing"


def test_a_ticket_is_bounded_by_the_lease(client: TestClient, agent: FakeAgent, create_job) -> None:  # type: ignore[no-untyped-def]
    _, a = placed(client, agent, create_job)
    lease_id = a["lease_id"]
    huge = agent.client.post(f"/v1/workers/leases/{lease_id}/uploads", headers=agent.headers(lease_id),
                             json={"kind": "adapter", "bytes": 10**12, "sha256": "0" * 64})
    assert huge.status_code == 413
    stale = agent.client.post(f"/v1/workers/leases/{lease_id}/uploads", headers=agent.headers(lease_id, 99),
                              json={"kind": "adapter", "bytes": 10, "sha256": "0" * 64})
    assert stale.status_code == 409 and stale.json()["error"]["code"] == "lease_lost"
    export = agent.client.post(f"/v1/workers/leases/{lease_id}/uploads", headers=agent.headers(lease_id),
                               json={"kind": "export", "bytes": 10, "sha256": "0" * 64, "format": "merged"})
    assert export.status_code in (400, 409)  # a training lease uploads no export


def test_a_lease_holds_a_few_uploads_open_and_no_more(client: TestClient, agent: FakeAgent, create_job,  # type: ignore[no-untyped-def]
                                                       session: Session, settings: CoordinatorSettings) -> None:
    """A worker asking ticket after ticket is stopped (429 with Retry-After) once its open tickets declare a few
    uploads' worth: adopting one does not free its room, since its URL would take the bytes again (a second PUT
    after the adoption parks them anew), and a refused adoption neither. A lapsed ticket's room comes back, and
    what is under its key is deleted, when the lease next asks and by the blob collection."""
    from datetime import timedelta  # noqa: PLC0415

    from coordinator.db.tables import UploadTicketModel  # noqa: PLC0415
    from coordinator.services import blobs, uploads  # noqa: PLC0415

    _, a = placed(client, agent, create_job)
    lease_id = a["lease_id"]
    limit = client.post(f"/v1/workers/leases/{lease_id}/uploads", headers=agent.headers(lease_id),
                        json={"kind": "adapter", "bytes": 10**12, "sha256": "0" * 64}).json()["error"]["message"]
    per_upload = int(limit.split("limit of ")[1].split()[0])
    adapter = adapter_archive("tunegrid/tiny-llama")
    first = ticket(agent, lease_id, adapter, "adapter")
    put_direct(first, adapter)
    parked = first.json()["key"]
    fillers = []
    while True:  # tickets declaring a whole upload each (never sent): the room fills in a few
        answer = agent.client.post(f"/v1/workers/leases/{lease_id}/uploads", headers=agent.headers(lease_id),
                                   json={"kind": "adapter", "bytes": per_upload, "sha256": "0" * 64})
        if answer.status_code != 200:
            break
        fillers.append(answer.json()["key"])
    assert answer.status_code == 429 and int(answer.headers["retry-after"]) > 0, answer.text
    assert len(fillers) == uploads.OPEN_UPLOADS - 1  # the first, small one, and three whole ones
    rest = agent.client.post(f"/v1/workers/leases/{lease_id}/uploads", headers=agent.headers(lease_id),
                             json={"kind": "adapter", "bytes": per_upload - len(adapter), "sha256": "0" * 64})
    assert rest.status_code == 200  # what room was left, to the byte
    fillers.append(rest.json()["key"])
    assert adopt(agent, lease_id, "adapter", adapter, parked).status_code == 200
    assert ticket(agent, lease_id, adapter, "adapter").status_code == 429  # adopted, but its URL is still good
    put_direct(first, adapter)  # and indeed: the same bytes parked again under the adopted key
    store = open_store(settings)
    assert store.size(parked) == len(adapter)
    early = adopt(agent, lease_id, "adapter", adapter, f"incoming/{lease_id}/adapter-up-never")
    assert early.status_code == 400 and ticket(agent, lease_id, adapter, "adapter").status_code == 429
    session.get(UploadTicketModel, parked).lapses_at -= timedelta(days=1)  # type: ignore[union-attr]
    session.commit()
    again = ticket(agent, lease_id, adapter, "adapter")
    assert again.status_code == 200  # the lapsed one's room
    assert store.size(parked) is None  # and what was under its key is gone
    put_direct(again, adapter)  # the blob collection closes lapsed tickets too, however recent their objects
    session.get(UploadTicketModel, again.json()["key"]).lapses_at -= timedelta(days=1)  # type: ignore[union-attr]
    session.commit()
    collected = blobs.collect(session=session, store=store, settings=settings)
    assert again.json()["key"] in collected.keys and store.size(again.json()["key"]) is None
    assert all(session.get(UploadTicketModel, key) is not None for key in fillers)  # open ones stay
