"""The agent's one link to the coordinator, against a scripted coordinator (httpx's MockTransport: answers the
test chooses, in order): transport errors, 5xx, 429 and 503 are retried a bounded number of times with
backoff (honouring Retry-After), then `CoordinatorUnreachable`; `409 lease_lost` is `LeaseLost`; other 4xx are
`Rejected` at once; every lease call carries its fencing token; a download is checked against its sha256 and
retried from the start; an upload is re-sent whole on a retry."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from shared.protocol import (
    FENCING_TOKEN_HEADER, PROTOCOL_HEADER, PROTOCOL_VERSION, SHA256_HEADER, UPLOAD_KEY_HEADER,
)
from worker.channel import Channel, CoordinatorUnreachable, LeaseLost, Rejected
from worker.settings import WorkerSettings

Answer = httpx.Response | Exception


def error(status: int, code: str, message: str = "no", headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json={"error": {"message": message, "code": code}}, headers=headers)


def reply(status: str = "running") -> httpx.Response:
    return httpx.Response(200, json={"lease_id": "lease-1", "fencing_token": 3, "status": status,
                                     "job_status": "running", "message": ""})


class Coordinator:
    """Answers each request with the next scripted answer (the last one repeats); records what it was sent."""

    def __init__(self, *answers: Answer | Callable[[httpx.Request], Answer]) -> None:
        self.answers, self.requests, self.bodies = list(answers), [], []  # type: ignore[var-annotated]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.bodies.append(request.read())
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if callable(answer) and not isinstance(answer, httpx.Response):
            answer = answer(request)
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest.fixture
def settings(tmp_path: Path) -> WorkerSettings:
    return WorkerSettings(config_dir=tmp_path / "config", data_dir=tmp_path / "worker", max_attempts=4,
                          backoff_base_s=1, backoff_max_s=8)


def channel(settings: WorkerSettings, coordinator: Coordinator, sleeps: list[float]) -> Channel:
    return Channel("http://coordinator.test", "tgw_abc_secret", settings, transport=httpx.MockTransport(coordinator),
                   sleep=sleeps.append)


def test_a_lease_call_carries_the_token_the_protocol_and_the_fencing_token(settings: WorkerSettings) -> None:
    coordinator = Coordinator(reply())
    assert channel(settings, coordinator, []).events("lease-1", 3, [{"type": "log", "message": "x"}]).fencing_token == 3
    [request] = coordinator.requests
    assert request.url.path == "/v1/workers/leases/lease-1/events"
    assert request.headers["Authorization"] == "Bearer tgw_abc_secret"
    assert request.headers[PROTOCOL_HEADER] == str(PROTOCOL_VERSION) and request.headers[FENCING_TOKEN_HEADER] == "3"


def test_overload_and_outages_are_retried_with_backoff_then_given_up(settings: WorkerSettings) -> None:
    sleeps: list[float] = []
    coordinator = Coordinator(httpx.ConnectError("refused"), error(503, "overloaded", headers={"Retry-After": "2"}),
                              error(502, "bad_gateway"), reply("completed"))
    assert channel(settings, coordinator, sleeps).finish("lease-1", 3, "complete", {}).status == "completed"
    assert len(coordinator.requests) == 4 and len(sleeps) == 3
    assert sleeps[1] == 2.0  # Retry-After, honoured
    assert 0 <= sleeps[0] <= 1 and 0 <= sleeps[2] <= 4  # full jitter under a doubling ceiling
    down = Coordinator(error(500, "server_error"))
    with pytest.raises(CoordinatorUnreachable, match="500"):
        channel(settings, down, sleeps).finish("lease-1", 3, "complete", {})
    assert len(down.requests) == settings.max_attempts  # bounded


def test_a_lost_lease_and_a_refused_request_are_not_retried(settings: WorkerSettings) -> None:
    lost = Coordinator(error(409, "lease_lost", "the lease moved on"))
    with pytest.raises(LeaseLost, match="moved on"):
        channel(settings, lost, []).events("lease-1", 3, [])
    refused = Coordinator(error(400, "implausible_step", "step 10^9"))
    with pytest.raises(Rejected) as caught:
        channel(settings, refused, []).events("lease-1", 3, [])
    assert (caught.value.status, caught.value.code) == (400, "implausible_step")
    assert len(lost.requests) == len(refused.requests) == 1
    proxy = Coordinator(httpx.Response(404, text="<html>not here</html>"))  # not our envelope
    with pytest.raises(Rejected) as page:
        channel(settings, proxy, []).events("lease-1", 3, [])
    assert page.value.code is None and "not here" in str(page.value)


def test_a_heartbeat_and_a_claim_are_tried_once(settings: WorkerSettings) -> None:
    for call in (lambda c: c.heartbeat({"activity": "idle"}), lambda c: c.claim({"wait_s": 0})):
        coordinator = Coordinator(error(503, "overloaded"))
        with pytest.raises(CoordinatorUnreachable):
            call(channel(settings, coordinator, []))
        assert len(coordinator.requests) == 1  # the next one comes soon anyway


def test_a_download_is_checked_against_its_sha256_and_retried_from_the_start(settings: WorkerSettings, tmp_path: Path) -> None:
    good = b'{"messages": []}\n' * 100
    digest = hashlib.sha256(good).hexdigest()
    coordinator = Coordinator(httpx.Response(200, content=b"truncated"), error(503, "overloaded"), httpx.Response(200, content=good))
    target = channel(settings, coordinator, []).download("/files/training", "lease-1", 3, tmp_path / "train.jsonl", digest)
    assert target.read_bytes() == good and len(coordinator.requests) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["train.jsonl"]  # no partial file left
    lost = Coordinator(error(409, "lease_lost"))
    with pytest.raises(LeaseLost):
        channel(settings, lost, []).download("/files/training", "lease-1", 3, tmp_path / "again.jsonl", digest)
    wrong = Coordinator(httpx.Response(200, content=b"never the right bytes"))
    with pytest.raises(CoordinatorUnreachable, match="sha256"):
        channel(settings, wrong, []).download("/files/training", "lease-1", 3, tmp_path / "bad.jsonl", digest)
    assert not (tmp_path / "bad.jsonl").exists()


def test_an_upload_carries_its_sha256_and_is_re_sent_whole_on_a_retry(settings: WorkerSettings, tmp_path: Path) -> None:
    archive = tmp_path / "checkpoint.tar.gz"
    archive.write_bytes(b"x" * 300_000)
    coordinator = Coordinator(httpx.Response(200, json={}),  # no URL of the store's: the bytes go to the coordinator
                              error(503, "overloaded"), httpx.Response(200, json={"kind": "checkpoint"}))
    channel(settings, coordinator, []).upload("lease-1", 3, archive, kind="checkpoint", step=7)
    ticket, first, second = coordinator.requests
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert ticket.url.path == "/v1/workers/leases/lease-1/uploads"
    assert json.loads(coordinator.bodies[0]) == {"kind": "checkpoint", "bytes": 300_000, "sha256": digest, "step": 7,
                                                 "format": None}
    assert second.url.path == "/v1/workers/leases/lease-1/checkpoints" and second.url.params["step"] == "7"
    assert second.headers[SHA256_HEADER] == digest
    assert coordinator.bodies[1:] == [archive.read_bytes()] * 2


def test_a_direct_upload_goes_to_the_store_without_credentials_then_is_adopted(settings: WorkerSettings,
                                                                               tmp_path: Path) -> None:
    archive = tmp_path / "adapter.tar.gz"
    archive.write_bytes(b"a" * 70_000)
    ticket = {"url": "http://store.test/bucket/incoming/lease-1/adapter-up-1?X-Amz-Signature=s",
              "headers": {"Content-Length": "70000", "x-amz-checksum-sha256": "c2lnbmVk"},
              "key": "incoming/lease-1/adapter-up-1", "expires_at": 2_000_000_000}
    coordinator = Coordinator(httpx.Response(200, json=ticket), httpx.Response(200, json={"kind": "adapter"}))
    store = Coordinator(httpx.Response(500), httpx.Response(200))  # the store fails once: the PUT is sent again
    link = Channel("http://coordinator.test", "tgw_abc_secret", settings, transport=httpx.MockTransport(coordinator),
                   store_transport=httpx.MockTransport(store), sleep=[].append)
    link.upload("lease-1", 3, archive, kind="adapter")
    first, put = store.requests
    assert put.method == "PUT" and str(put.url) == ticket["url"] and store.bodies == [archive.read_bytes()] * 2
    assert "authorization" not in put.headers and FENCING_TOKEN_HEADER not in put.headers
    assert put.headers["x-amz-checksum-sha256"] == "c2lnbmVk" and put.headers["content-length"] == "70000"
    _, adopt = coordinator.requests
    assert adopt.url.path == "/v1/workers/leases/lease-1/adapter" and coordinator.bodies[1] == b""
    assert adopt.headers[UPLOAD_KEY_HEADER] == ticket["key"]
    assert adopt.headers[SHA256_HEADER] == hashlib.sha256(archive.read_bytes()).hexdigest()


def test_a_redirected_download_is_fetched_from_the_store_without_credentials(settings: WorkerSettings,
                                                                             tmp_path: Path) -> None:
    data = b'{"messages": []}\n' * 100
    coordinator = Coordinator(httpx.Response(307, headers={"Location": "http://store.test/b/files/file-1?sig=x"}))
    store = Coordinator(httpx.Response(200, stream=httpx.ByteStream(data)))  # as a network answer: unread
    link = Channel("http://coordinator.test", "tgw_abc_secret", settings, transport=httpx.MockTransport(coordinator),
                   store_transport=httpx.MockTransport(store), sleep=[].append)
    target = link.download("/files/training", "lease-1", 3, tmp_path / "train.jsonl", hashlib.sha256(data).hexdigest())
    assert target.read_bytes() == data
    [fetch] = store.requests
    assert str(fetch.url) == "http://store.test/b/files/file-1?sig=x" and "authorization" not in fetch.headers
    # A blob whose object claims an encoding (a hostile uploader's header) is saved as it came, never "decoded".
    claims_gzip = Coordinator(httpx.Response(200, stream=httpx.ByteStream(data), headers={"Content-Encoding": "gzip"}))
    coordinator = Coordinator(httpx.Response(307, headers={"Location": "http://store.test/b/files/file-1?sig=x"}))
    link = Channel("http://coordinator.test", "tgw_abc_secret", settings, transport=httpx.MockTransport(coordinator),
                   store_transport=httpx.MockTransport(claims_gzip), sleep=[].append)
    again = link.download("/files/training", "lease-1", 3, tmp_path / "again.jsonl", hashlib.sha256(data).hexdigest())
    assert again.read_bytes() == data


def test_registration_presents_the_provider_key(settings: WorkerSettings) -> None:
    from shared.protocol import WorkerRegister  # noqa: PLC0415
    from tests.fakes import registration  # noqa: PLC0415

    coordinator = Coordinator(httpx.Response(200, json={"worker_id": "wrk-1", "worker_token": "tgw_x_y",
                                                        "heartbeat_interval_s": 10, "claim_timeout_s": 25}))
    registered = channel(settings, coordinator, []).register("tg_provider_key", WorkerRegister.model_validate(
        registration("pc-1")))
    assert registered.worker_id == "wrk-1"
    [request] = coordinator.requests
    assert request.headers["Authorization"] == "Bearer tg_provider_key"
    assert json.loads(coordinator.bodies[0])["machine_id"] == "pc-1"
