"""Soak: 200 simulated workers and 1,000 small jobs through the real API for 10 minutes, on PostgreSQL and Redis
with two uvicorn processes and, as in production, a Celery worker with beat for the periodic tasks (reaping,
placement sweeps, budgets; `--periodic api` runs them in the API processes instead), once per blob
store in the same run: the local disk, then the S3 object store (SeaweedFS at $TUNEGRID_TEST_S3_ENDPOINT, default
http://127.0.0.1:8333, as `.ci/run` starts it), and the two side by side at the end.

The workers are protocol-level fakes (`FakeTraining` below: they train nothing). Each one registers,
heartbeats every 10 s, long-polls for work, reports a few steps of progress over a few seconds, uploads a
PEFT-shaped adapter of zeros as the agent does (a ticket; with S3 a PUT to its presigned URL, then the
adoption; on the disk the bytes to the API), and completes; now and then one fails (a worker error, requeued) or is
preempted. Customers upload a dataset and submit jobs at an even pace. At the end it prints jobs/hour, API
latency (p50, p99) of every call, the coordinator processes' memory growth, and whether anything was lost:
every job must have succeeded or failed with a reason, and the ledger must sum to zero. The heartbeat's latency
is also read from the coordinator's own access lines, and timed by one more worker in a process of its own (a
heartbeat every half second), so the load generator's share of it shows; so does its own event loop's lag.
Never passes or fails.

    python bench/soak.py [--minutes 10] [--workers 200] [--jobs 1000] [--storage disk,s3] [--periodic celery]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import BIN, REDIS_URL, flush_redis, new_key, percentile, start_coordinator  # noqa: E402
from shared.protocol import (  # noqa: E402
    FENCING_TOKEN_HEADER, PROTOCOL_HEADER, PROTOCOL_VERSION, SHA256_HEADER, UPLOAD_KEY_HEADER,
)
from tests.conftest import chat_lines, jsonl  # noqa: E402
from tests.fakes import adapter_archive, registration, sha256  # noqa: E402

MODEL = "tunegrid/tiny-llama"
ADAPTER = adapter_archive(MODEL)
ADAPTER_SHA = sha256(ADAPTER)
TERMINAL = {"succeeded", "failed", "cancelled"}
S3_ENDPOINT = os.environ.get("TUNEGRID_TEST_S3_ENDPOINT", "http://127.0.0.1:8333")
S3_KEYS = ("tunegrid-test", "tunegrid-test-secret")  # the identity .ci/run gives SeaweedFS


def kind_of(method: str, path: str) -> str:
    parts = path.split("?")[0].strip("/").split("/")
    if parts[:3] == ["v1", "workers", "leases"]:
        return f"{method} lease {parts[-1] if len(parts) > 4 else ''}".strip()
    return f"{method} /{'/'.join(p if not p.startswith(('ftjob-', 'file-')) else '{id}' for p in parts)}"


class Recorder:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.by_kind: dict[str, list[float]] = {}
        self.errors: dict[str, int] = {}

    async def call(self, http: httpx.AsyncClient, method: str, path: str, *, kind: str | None = None,  # type: ignore[no-untyped-def]
                   **kwargs) -> httpx.Response:
        started = time.perf_counter()
        response = await http.request(method, path, **kwargs)
        if not path.endswith("/claim"):  # long-polls wait on purpose
            self.latencies.append(time.perf_counter() - started)
            self.by_kind.setdefault(kind or kind_of(method, path), []).append(self.latencies[-1])
        if response.status_code >= 500 or response.status_code == 429:
            key = f"{method} {path.split('/')[2] if path.count('/') > 1 else path} {response.status_code}"
            self.errors[key] = self.errors.get(key, 0) + 1
        return response


class FakeTraining:
    """A simulated worker: the real protocol, no training."""

    def __init__(self, http: httpx.AsyncClient, rec: Recorder, provider_key: str, index: int) -> None:
        self.http, self.rec, self.index = http, rec, index
        self.provider_key = provider_key
        self.token = ""
        self.rng = random.Random(index)

    def headers(self, lease: dict | None = None) -> dict[str, str]:  # type: ignore[type-arg]
        headers = {"Authorization": f"Bearer {self.token}", PROTOCOL_HEADER: str(PROTOCOL_VERSION)}
        if lease:
            headers[FENCING_TOKEN_HEADER] = str(lease["fencing_token"])
        return headers

    async def register(self) -> None:
        body = registration(f"soak-{self.index}", price=self.rng.choice(["0.20", "0.30", "0.45"]))
        response = await self.rec.call(self.http, "POST", "/v1/workers/register", json=body, headers={
            "Authorization": f"Bearer {self.provider_key}", PROTOCOL_HEADER: str(PROTOCOL_VERSION)})
        response.raise_for_status()
        self.token = response.json()["worker_token"]

    async def heartbeats(self, stop: asyncio.Event) -> None:
        await asyncio.sleep(self.rng.uniform(0, 10))
        first = True  # a process checks a token it has not seen in the database: counted apart
        while not stop.is_set():
            marked = {"x-request-id": f"soak-first-heartbeat-{self.index}"} if first else {}  # told apart in its log
            await self.rec.call(self.http, "POST", "/v1/workers/heartbeat", headers={**self.headers(), **marked},
                                json={"activity": "idle"}, kind="POST heartbeat, first" if first else None)
            first = False
            try:
                await asyncio.wait_for(stop.wait(), timeout=10)
            except TimeoutError:
                pass

    async def work(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            response = await self.rec.call(self.http, "POST", "/v1/workers/claim", headers=self.headers(),
                                           json={"wait_s": 5})
            if response.status_code != 200:
                await asyncio.sleep(1)
                continue
            lease = response.json().get("assignment")
            if lease is None:
                continue
            await self.run_lease(lease)

    async def run_lease(self, lease: dict) -> None:  # type: ignore[type-arg]
        base = f"/v1/workers/leases/{lease['lease_id']}"
        headers = self.headers(lease)
        for step in range(1, 4):
            await asyncio.sleep(self.rng.uniform(0.5, 1.5))
            await self.rec.call(self.http, "POST", f"{base}/events", headers=headers, json={"events": [
                {"type": "progress", "step": step, "total_steps": 3, "train_loss": 2.5 - 0.3 * step,
                 "tokens_per_s": 1000.0, "trained_tokens": 100 * step}]})
        roll = self.rng.random()
        usage = {"wall_seconds": 5.0, "gpu_seconds": 4.5}
        if roll < 0.03:
            await self.rec.call(self.http, "POST", f"{base}/fail", headers=headers,
                                json={"kind": "worker_error", "message": "simulated CUDA error", "usage": usage})
            return
        if roll < 0.06:
            await self.rec.call(self.http, "POST", f"{base}/preempted", headers=headers,
                                json={"reason": "simulated game", "usage": usage})
            return
        ticket = (await self.rec.call(self.http, "POST", f"{base}/uploads", headers=headers, json={
            "kind": "adapter", "bytes": len(ADAPTER), "sha256": ADAPTER_SHA})).json()
        if ticket.get("url"):  # the object store: the bytes go there, the coordinator adopts them
            started = time.perf_counter()
            stored = await self.http.put(ticket["url"], content=ADAPTER, headers=ticket["headers"])
            self.rec.by_kind.setdefault("PUT object store (presigned)", []).append(time.perf_counter() - started)
            if stored.status_code != 200:
                self.rec.errors[f"store PUT {stored.status_code}"] = self.rec.errors.get(f"store PUT {stored.status_code}", 0) + 1
            await self.rec.call(self.http, "PUT", f"{base}/adapter",
                                headers={**headers, SHA256_HEADER: ADAPTER_SHA, UPLOAD_KEY_HEADER: ticket["key"]})
        else:
            await self.rec.call(self.http, "PUT", f"{base}/adapter", content=ADAPTER,
                                headers={**headers, SHA256_HEADER: ADAPTER_SHA})
        await self.rec.call(self.http, "POST", f"{base}/complete", headers=headers, json={
            "adapter_sha256": ADAPTER_SHA, "usage": usage,
            "result": {"steps": 3, "trained_tokens": 300, "final_train_loss": 1.6}})


async def customers(http: httpx.AsyncClient, rec: Recorder, keys: list[str], jobs: int, seconds: float) -> list[str]:
    files = []
    for key in keys:
        response = await rec.call(http, "POST", "/v1/files", headers={"Authorization": f"Bearer {key}"},
                                  data={"purpose": "fine-tune"},
                                  files={"file": ("train.jsonl", jsonl(chat_lines(12)), "application/jsonl")})
        response.raise_for_status()
        files.append(response.json()["id"])
    created, interval = [], seconds / jobs
    started = time.monotonic()
    for i in range(jobs):
        key, file_id = keys[i % len(keys)], files[i % len(keys)]
        response = await rec.call(http, "POST", "/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {key}"},
                                  json={"model": MODEL, "training_file": file_id, "max_cost": "1"})
        if response.status_code == 200:
            created.append((key, response.json()["id"]))
        else:
            rec.errors[f"create {response.status_code}"] = rec.errors.get(f"create {response.status_code}", 0) + 1
        await asyncio.sleep(max(started + (i + 1) * interval - time.monotonic(), 0))
    return created  # type: ignore[return-value]


def probe(url: str, token: str, seconds: float, out: Path) -> None:
    """A lone worker machine in a process of its own: a heartbeat every half second, timed by a client that does
    nothing else, so the load generator's own event loop (200 simulated machines) is not in the figure."""
    headers = {"Authorization": f"Bearer {token}", PROTOCOL_HEADER: str(PROTOCOL_VERSION)}
    timings: list[float] = []
    with httpx.Client(base_url=url, timeout=30) as client:
        client.post("/v1/workers/heartbeat", headers=headers, json={"activity": "idle"})  # its first: apart
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.perf_counter()
            client.post("/v1/workers/heartbeat", headers=headers, json={"activity": "idle"}).raise_for_status()
            timings.append(time.perf_counter() - started)
            time.sleep(max(0.5 - (time.perf_counter() - started), 0))
    out.write_text(json.dumps(timings))


async def loop_lag(stop: asyncio.Event, lags: list[float]) -> None:
    """How late the load generator's own event loop wakes a 100 ms sleep: its share of what its clients time."""
    while not stop.is_set():
        started = time.perf_counter()
        await asyncio.sleep(0.1)
        lags.append(time.perf_counter() - started - 0.1)


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (the uvicorn workers)."""
    total = 0
    pids = [pid] + [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def server_latencies(log: Path, route: str) -> list[float]:
    """A route's durations as the coordinator timed them (its access lines, from the ASGI call to the last byte
    sent), each worker's first heartbeat left out (the bench marks it with its request id)."""
    found = []
    for raw in log.read_text(errors="replace").splitlines():
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if line.get("route") == route and not str(line.get("request_id", "")).startswith("soak-first-"):
            found.append(line["duration_ms"] / 1000)
    return sorted(found)


async def soak(url: str, env: dict[str, str], pid: int, args: argparse.Namespace, log: Path) -> dict[str, float]:
    rec = Recorder()
    limits = httpx.Limits(max_connections=50, max_keepalive_connections=50)  # the customers'
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        providers = [new_key(env, "provider") for _ in range(10)]
        keys = [new_key(env, "customer") for _ in range(10)]
        # Each simulated worker has a connection pool of its own, as a machine of its own does. One pool shared by
        # the fleet (as this bench had) queued heartbeats behind 200 open long-polls and spent the load
        # generator's CPU in httpcore's pool bookkeeping (quadratic in its connections): the "heartbeat p99 of
        # 0.9 s" was the client's own queue, and with today's httpcore every call's p50 read 2.7 s.
        own = httpx.Limits(max_connections=4, max_keepalive_connections=4)
        machines = [httpx.AsyncClient(base_url=url, timeout=60, limits=own) for _ in range(args.workers)]
        fleet = [FakeTraining(machines[i], rec, providers[i % len(providers)], i) for i in range(args.workers)]
        await asyncio.gather(*(w.register() for w in fleet))
        registration = sorted(rec.latencies)
        print(f"  200 registrations at once: p50 {statistics.median(registration) * 1000:.0f} ms, "
              f"max {registration[-1] * 1000:.0f} ms (not counted below)", flush=True)
        rec.latencies.clear()
        rec.by_kind.clear()
        lone = FakeTraining(http, Recorder(), providers[0], args.workers)
        await lone.register()
        probe_out = log.with_name("probe.json")
        prober = subprocess.Popen([sys.executable, __file__, "--probe", url, lone.token, str(args.minutes * 60),
                                   str(probe_out)])
        stop = asyncio.Event()
        lags: list[float] = []
        tasks = [asyncio.create_task(w.heartbeats(stop)) for w in fleet] + [asyncio.create_task(w.work(stop)) for w in fleet]
        tasks.append(asyncio.create_task(loop_lag(stop, lags)))
        memory = [(0.0, rss_mb(pid))]
        started = time.monotonic()
        submit_s = args.minutes * 60 * 0.8
        submitter = asyncio.create_task(customers(http, rec, keys, args.jobs, submit_s))
        while time.monotonic() - started < args.minutes * 60:
            await asyncio.sleep(30)
            memory.append((time.monotonic() - started, rss_mb(pid)))
            print(f"  {memory[-1][0]:5.0f} s: coordinator RSS {memory[-1][1]:.0f} MB, {len(rec.latencies)} calls", flush=True)
        created = await submitter
        # Let the last jobs finish (bounded), then stop the fleet.
        deadline = time.monotonic() + 120
        statuses: dict[str, str] = {}
        while time.monotonic() < deadline:
            statuses = {}
            for key, job_id in created:
                job = (await http.get(f"/v1/fine_tuning/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"})).json()
                statuses[job_id] = job["status"] if job["status"] != "failed" else f"failed: {job['error']['code']}"
            if all(s.split(":")[0] in TERMINAL for s in statuses.values()):
                break
            await asyncio.sleep(5)
        elapsed = time.monotonic() - started
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(machine.aclose() for machine in machines))
        prober.wait(timeout=60)
    counts: dict[str, int] = {}
    for status in statuses.values():
        counts[status] = counts.get(status, 0) + 1
    done = sum(n for s, n in counts.items() if s.split(":")[0] in TERMINAL)
    audit = subprocess.run([str(BIN / "tunegrid-coordinator"), "ledger", "audit"], env=env, capture_output=True,
                           text=True).stdout.strip()
    print(f"jobs: {len(created)} created, {done} ended ({counts}) in {elapsed:.0f} s = {done / elapsed * 3600:.0f} jobs/hour")
    latencies = sorted(rec.latencies)
    print(f"API calls (long-poll claims aside): {len(latencies)}, p50 {statistics.median(latencies) * 1000:.1f} ms, "
          f"p99 {percentile(latencies, 99) * 1000:.1f} ms, max {latencies[-1] * 1000:.0f} ms; "
          f"5xx/429: {rec.errors or 'none'}")
    for kind, values in sorted(rec.by_kind.items(), key=lambda kv: -len(kv[1])):
        values.sort()
        print(f"  {kind:34s} {len(values):6d} calls, p50 {statistics.median(values) * 1000:6.1f} ms, "
              f"p99 {percentile(values, 99) * 1000 if len(values) > 1 else values[0] * 1000:7.1f} ms")
    first, last = memory[1][1] if len(memory) > 1 else memory[0][1], memory[-1][1]
    print(f"coordinator memory (all processes): {memory[0][1]:.0f} MB at start, {first:.0f} MB after 30 s, "
          f"{last:.0f} MB at the end ({last - first:+.0f} MB after warm-up)")
    print(f"lost: {len(created) - done} jobs not ended; ledger: {audit}")
    served = server_latencies(log, "/v1/workers/heartbeat") or [0.0]
    server_p99 = percentile(served, 99)
    print(f"heartbeats (first ones aside) as the coordinator timed them: {len(served)}, p50 "
          f"{statistics.median(served) * 1000:.1f} ms, p99 {server_p99 * 1000:.1f} ms, max {served[-1] * 1000:.0f} ms")
    lone_beats = sorted(json.loads(probe_out.read_text())) if probe_out.exists() else [0.0]
    print(f"heartbeats of a lone worker in a process of its own (every 0.5 s): {len(lone_beats)}, p50 "
          f"{statistics.median(lone_beats) * 1000:.1f} ms, p99 {percentile(lone_beats, 99) * 1000:.1f} ms, "
          f"max {lone_beats[-1] * 1000:.0f} ms")
    lags.sort()
    print(f"the load generator's own event loop, late to wake a 100 ms sleep: p50 {statistics.median(lags) * 1000:.1f} "
          f"ms, p99 {percentile(lags, 99) * 1000:.1f} ms (in every figure its clients time)")
    beats = sorted(rec.by_kind.get("POST /v1/workers/heartbeat", [0.0]))
    uploads = sorted(rec.by_kind.get("PUT lease adapter", [0.0]))
    return {"jobs/hour": done / elapsed * 3600, "p50 ms": statistics.median(latencies) * 1000,
            "p99 ms": percentile(latencies, 99) * 1000, "heartbeat p99 ms": percentile(beats, 99) * 1000,
            "heartbeat p99 ms (server)": server_p99 * 1000,
            "heartbeat p99 ms (lone worker)": percentile(lone_beats, 99) * 1000,
            "load generator loop lag p99 ms": percentile(lags, 99) * 1000, "adapter PUT p99 ms": percentile(uploads, 99) * 1000,
            "RSS at end MB": last, "RSS growth MB": last - first, "lost": len(created) - done}


def storage_env(storage: str, run: str) -> dict[str, str]:
    if storage == "disk":
        return {}
    from coordinator.s3store import S3Store  # noqa: PLC0415

    S3Store.from_url("s3://tunegrid-soak", endpoint_url=S3_ENDPOINT, access_key_id=S3_KEYS[0],
                     secret_access_key=S3_KEYS[1]).create_bucket()
    return {"TUNEGRID_STORAGE_URL": f"s3://tunegrid-soak/{run}", "TUNEGRID_S3_ENDPOINT_URL": S3_ENDPOINT,
            "TUNEGRID_S3_ACCESS_KEY_ID": S3_KEYS[0], "TUNEGRID_S3_SECRET_ACCESS_KEY": S3_KEYS[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--workers", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--storage", default="disk,s3", help="blob stores to soak in turn: disk, s3 or both")
    parser.add_argument("--logs", type=Path, help="keep each run's coordinator log (JSON lines) in this folder")
    parser.add_argument("--periodic", choices=("celery", "api"), default="celery",
                        help="where the periodic tasks run: a Celery worker with beat (production) or the API processes")
    parser.add_argument("--probe", nargs=4, metavar=("URL", "TOKEN", "SECONDS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        url, token, seconds, out = args.probe
        probe(url, token, float(seconds), Path(out))
        return
    results: dict[str, dict[str, float]] = {}
    for storage in args.storage.split(","):
        flush_redis(REDIS_URL)
        with tempfile.TemporaryDirectory() as workdir:
            log = Path(workdir) / "coordinator.log"
            in_api = args.periodic == "api"
            process, url, env = start_coordinator("postgresql", Path(workdir), workers=2, log_path=log, extra_env={
                "TUNEGRID_REDIS_URL": REDIS_URL, "TUNEGRID_PERIODIC_TASKS": "true" if in_api else "false",
                "TUNEGRID_SWEEP_INTERVAL_S": "2",
                "TUNEGRID_LOG_LEVEL": "info", "TUNEGRID_LOG_FORMAT": "json",  # its access lines time each call
                **storage_env(storage, f"run-{int(time.time())}")})
            # As in production (compose): reaping, placement sweeps and budgets in a Celery worker with beat, not
            # in the API processes, whose event loops then share their GIL with nothing but requests' services.
            celery = None if in_api else subprocess.Popen(
                [str(BIN / "celery"), "-A", "coordinator.tasks", "worker", "--beat", "--pool", "solo", "--loglevel",
                 "warning", "--schedule", str(Path(workdir) / "beat-schedule")], env=env,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            print(f"soak ({storage}): {args.workers} simulated workers (protocol-level fakes, no training), {args.jobs} "
                  f"jobs, {args.minutes:g} min, PostgreSQL + Redis, 2 uvicorn processes, periodic tasks in "
                  f"{'the API processes' if in_api else 'a Celery worker with beat'}", flush=True)
            try:
                results[storage] = asyncio.run(soak(url, env, process.pid, args, log))
            finally:
                for running in (process, celery):
                    if running is not None:
                        running.terminate()
                        running.wait(timeout=20)
                if args.logs:
                    args.logs.mkdir(parents=True, exist_ok=True)
                    shutil.copy(log, args.logs / f"coordinator-{storage}.log")
    if len(results) > 1:
        names = list(results)
        print("\nside by side: " + " | ".join(names))
        for figure in results[names[0]]:
            print(f"  {figure:32s} " + " | ".join(f"{results[n][figure]:10.1f}" for n in names))


if __name__ == "__main__":
    main()
