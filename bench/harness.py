"""What the API benchmarks share: a coordinator process to measure, keys, a lean HTTP client and percentiles."""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from sqlalchemy import create_engine, make_url, text

BIN = Path(sys.executable).parent
POSTGRES_URL = os.environ.get("TUNEGRID_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/tunegrid_bench")
REDIS_URL = os.environ.get("TUNEGRID_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reset_postgres(url: str) -> None:
    parsed = make_url(url)
    server = create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with server.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{parsed.database}"'))
    server.dispose()


def analyze(url: str) -> None:
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text("ANALYZE"))
    engine.dispose()


def flush_redis(url: str) -> None:
    import redis  # noqa: PLC0415

    redis.Redis.from_url(url).flushdb()


def start_coordinator(backend: str, workdir: Path, workers: int, extra_env: dict[str, str] | None = None,
                      log_path: Path | None = None) -> tuple[subprocess.Popen[bytes], str, dict[str, str]]:
    """`tunegrid-coordinator serve --workers N` on a fresh database (its output to `log_path`, if given); returns
    once /healthz answers."""
    port = free_port()
    env = {**os.environ, "TUNEGRID_DATA_DIR": str(workdir), "TUNEGRID_PORT": str(port),
           "TUNEGRID_LOG_LEVEL": "warning", "TUNEGRID_RATE_LIMIT_PER_MINUTE": "0",  # load from one key
           **(extra_env or {})}
    env.pop("TUNEGRID_DATABASE_URL", None)
    if backend == "postgresql":
        reset_postgres(POSTGRES_URL)
        env["TUNEGRID_DATABASE_URL"] = POSTGRES_URL
        subprocess.run([str(BIN / "tunegrid-coordinator"), "migrate"], env=env, check=True, capture_output=True)
    output = log_path.open("wb") if log_path else subprocess.DEVNULL
    process = subprocess.Popen([str(BIN / "tunegrid-coordinator"), "serve", "--workers", str(workers)], env=env,
                               stdout=output, stderr=subprocess.STDOUT if log_path else subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return process, url, env
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("coordinator did not start")


def new_key(env: dict[str, str], role: str = "customer", credit: str = "100000") -> str:
    """A new account's key; a customer gets `credit` granted, so its jobs can hold their cost."""
    out = subprocess.run([str(BIN / "tunegrid-coordinator"), "keys", "create", "--role", role, "--name", "bench"],
                         env=env, check=True, capture_output=True, text=True).stdout
    if role == "customer":
        account = out.split("account ", 1)[1].split()[0]
        subprocess.run([str(BIN / "tunegrid-coordinator"), "credits", "grant", "--account", account, "--amount", credit],
                       env=env, check=True, capture_output=True, text=True)
    return out.strip().splitlines()[-1]


class RawClient:
    """A tiny HTTP/1.1 keep-alive client: the load generator shares these 2 cores with the server and the
    database, and httpx's per-request overhead alone would eat most of a core at 200 requests/s."""

    def __init__(self, url: str, headers: dict[str, str], connections: int) -> None:
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)
        self.headers = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.size = connections
        self.pool: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def __aenter__(self) -> RawClient:
        for _ in range(self.size):
            self.pool.put_nowait(await asyncio.open_connection(self.host, self.port))
        return self

    async def __aexit__(self, *_: object) -> None:
        while not self.pool.empty():
            self.pool.get_nowait()[1].close()

    async def request(self, method: str, path: str, body: bytes = b"") -> int:
        return (await self.exchange(method, path, body))[0]

    async def exchange(self, method: str, path: str, body: bytes = b"", headers: str = "") -> tuple[int, bytes]:
        """(status, body); `headers` are extra raw header lines ("Name: value\\r\\n") for this request only."""
        reader, writer = await self.pool.get()
        try:
            head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n{self.headers}{headers}"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
            for _ in range(2):
                writer.write(head.encode() + body)
                status_line = await reader.readline()
                if status_line:
                    break
                # The server closed an idle keep-alive connection: reconnect once, as any client would.
                writer.close()
                reader, writer = await asyncio.open_connection(self.host, self.port)
            else:
                return 599, b""
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            return int(status_line.split()[1]), await reader.readexactly(length)
        finally:
            self.pool.put_nowait((reader, writer))


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 10) - 1] if len(values) > 1 else values[0]
