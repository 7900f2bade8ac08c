"""The demo: a coordinator (SQLite, embedded mode), one provider's worker (the process runtime, on the CPU)
and one customer, as real processes on this machine, through the same commands and APIs as anyone.

1. start `tunegrid-coordinator serve`; create an admin, a customer (with demo credit) and a provider;
2. build the tiny Llama locally into the worker's model cache (nothing is downloaded);
3. `tunegrid-worker register`, then `tunegrid-worker run` (process runtime);
4. the customer uploads a small chat dataset, creates a job (asking for a Q8_0 GGUF export) and watches it;
5. the GGUF file and its Ollama Modelfile are downloaded, and a batch of 8 questions runs against the fine-tune;
6. print the job's cost, the provider's earnings, the ledger audit, the adapter's path, and a proof that the
   adapter loads and lowers the loss on the customer's data.

`python -m demo [--keep] [--dir DIR]`; `--keep` leaves the coordinator and worker up and prints the dashboard
URL and an admin key.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console

from client.api import Client
from client.cli import watch

BIN = Path(sys.executable).parent
MODEL = "tunegrid/tiny-llama"
DEMO_CREDIT = "10"
WORKER_PRICE = "0.20"
START_TIMEOUT_S = 60
console = Console()


@dataclass
class DemoResult:
    job: dict  # type: ignore[type-arg]
    earnings: dict  # type: ignore[type-arg]
    adapter: Path
    audit: str
    loss_before: float
    loss_after: float
    lora_parameters: int
    url: str
    admin_key: str
    used: dict  # type: ignore[type-arg]  # the export and the batch: {"export": ..., "batch": ...}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dataset(path: Path, n: int = 160, seed: int = 0) -> Path:
    """Arithmetic in OpenAI's chat format: small enough to learn on a CPU in seconds."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 30), rng.randint(0, 30)
            f.write(json.dumps({"messages": [
                {"role": "system", "content": "Reply with only the number."},
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": str(a + b)}]}) + "\n")
    return path


class Demo:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEGRID_")}
        self.env.update({"TUNEGRID_DATA_DIR": str(workdir / "coordinator"), "TUNEGRID_PORT": str(self.port),
                         "TUNEGRID_LOG_LEVEL": "warning", "TUNEGRID_SWEEP_INTERVAL_S": "1",
                         # One provider: no second one could verify a sampled job (README: verification).
                         "TUNEGRID_VERIFY_SHARE_BPS": "0",
                         "TUNEGRID_WORKER_CONFIG_DIR": str(workdir / "worker" / "config"),
                         "TUNEGRID_WORKER_DATA_DIR": str(workdir / "worker" / "data"),
                         "TUNEGRID_WORKER_RUNTIME": "process", "PYTHONUNBUFFERED": "1"})
        self.processes: list[subprocess.Popen[bytes]] = []

    def cli(self, program: str, *args: str) -> str:
        done = subprocess.run([str(BIN / program), *args], env=self.env, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{program} {' '.join(args[:2])} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def key(self, role: str, name: str) -> tuple[str, str]:
        out = self.cli("tunegrid-coordinator", "keys", "create", "--role", role, "--name", name)
        return out.split("account ", 1)[1].split()[0], out.strip().splitlines()[-1]

    def start(self, name: str, *command: str) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("wb")
        process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)

    def wait_healthy(self, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the coordinator exited:\n{(self.workdir / 'coordinator.log').read_text()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the coordinator did not start in time")

    def place_tiny_model(self) -> None:
        from worker.model_cache import MARKER  # noqa: PLC0415
        from worker.trainer.tiny import build  # noqa: PLC0415

        cache = self.workdir / "worker" / "data" / "models" / MODEL
        if not (cache / MARKER).exists():
            shutil.rmtree(cache, ignore_errors=True)
            build(cache)
            (cache / MARKER).write_text(MODEL)


def _quiet_libraries() -> None:
    """The ML libraries' progress bars and notices would drown the demo's own lines."""
    import logging  # noqa: PLC0415
    import warnings  # noqa: PLC0415

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging  # noqa: PLC0415

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _until(what: str, check, timeout_s: float = 180.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found is not None:
            return found
        time.sleep(0.5)
    raise RuntimeError(f"timed out waiting for {what}")


def use_it(api: Client, job: dict, workdir: Path, say) -> dict:  # type: ignore[no-untyped-def, type-arg]
    """The customer's model put to use: its GGUF export (asked for at creation) and a batch of questions answered
    by it on the fleet."""
    say("[bold]5.[/] the fine-tune as GGUF for llama.cpp and Ollama, and a batch of questions answered on the fleet")
    exports = _until("the export", lambda: api.get(f"/v1/fine_tuning/jobs/{job['id']}/exports")["data"] or None)
    export = _until("the export to finish", lambda: (e := api.get(
        f"/v1/fine_tuning/jobs/{job['id']}/exports/{exports[0]['id']}"))["status"] in ("succeeded", "failed") and e
        or None)
    if export["status"] != "succeeded":
        raise RuntimeError(f"the export did not succeed: {export}")
    for f in export["files"]:
        api.download(f["file_id"], workdir / f["filename"])
        say(f"   {f['format']}: {workdir / f['filename']} ({f['bytes']} bytes)")
    lines = [json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": job["fine_tuned_model"], "messages": [{"role": "user", "content": f"What is {i} plus {i}?"}],
        "max_tokens": 8, "temperature": 0}}) for i in range(8)]
    requests = workdir / "batch.jsonl"
    requests.write_text("\n".join(lines) + "\n")
    batch = api.post("/v1/batches", {"input_file_id": api.upload(requests, purpose="batch")["id"],
                                     "endpoint": "/v1/chat/completions", "completion_window": "24h"})
    batch = _until("the batch", lambda: (b := api.get(f"/v1/batches/{batch['id']}"))["status"] in (
        "completed", "failed", "expired", "cancelled") and b or None)
    if batch["status"] != "completed":
        raise RuntimeError(f"the batch did not complete: {batch}")
    output = workdir / "batch-output.jsonl"
    api.download(batch["output_file_id"], output)
    first = json.loads(output.read_text().splitlines()[0])
    say(f"   batch {batch['id']}: {batch['request_counts']['completed']} of {batch['request_counts']['total']} "
        f"answered for ${batch['cost']}; q0 -> {first['response']['body']['choices'][0]['message']['content']!r} "
        "(a tiny model: it is fast, not wise)")
    return {"export": export, "batch": batch}


def run(workdir: Path, *, keep: bool = False, quiet: bool = False) -> DemoResult:
    """The whole demo; the coordinator and worker are stopped at the end unless `keep`."""
    workdir.mkdir(parents=True, exist_ok=True)
    demo = Demo(workdir)
    say = (lambda *a: None) if quiet else console.print
    try:
        say(f"[bold]1.[/] coordinator on {demo.url} (SQLite in {workdir / 'coordinator'}, embedded mode)")
        demo.wait_healthy(demo.start("coordinator", str(BIN / "tunegrid-coordinator"), "serve"))
        _, admin_key = demo.key("admin", "demo-admin")
        customer_id, customer_key = demo.key("customer", "demo-customer")
        _, provider_key = demo.key("provider", "demo-provider")
        demo.cli("tunegrid-coordinator", "credits", "grant", "--account", customer_id, "--amount", DEMO_CREDIT,
                 "--key", f"demo-{customer_id}", "--memo", "demo credit")
        say(f"   customer {customer_id} has ${DEMO_CREDIT} of demo credit")

        say("[bold]2.[/] building the tiny Llama and its tokenizer locally (the worker's model cache)")
        _quiet_libraries()
        demo.place_tiny_model()
        say(f"[bold]3.[/] a provider's worker joins at ${WORKER_PRICE}/GPU-hour (CPU, process runtime)")
        demo.cli("tunegrid-worker", "register", "--coordinator", demo.url, "--provider-key", provider_key,
                 "--price", WORKER_PRICE, "--machine-id", "demo-pc", "--name", "demo-pc")
        demo.start("worker", str(BIN / "tunegrid-worker"), "run", "--runtime", "process")

        say("[bold]4.[/] the customer uploads a dataset and submits a job")
        data_file = dataset(workdir / "train.jsonl")
        with Client(demo.url, customer_key) as api:
            file = api.upload(data_file)
            say(f"   {file['id']}: {file['examples']} examples, about {file['estimated_tokens']} tokens")
            job = api.post("/v1/fine_tuning/jobs", {
                "model": MODEL, "training_file": file["id"], "suffix": "demo",
                "method": {"type": "supervised", "supervised": {"hyperparameters": {
                    "n_epochs": 6, "batch_size": 4, "learning_rate_multiplier": 15}}},
                "lora": {"r": 8, "alpha": 16}, "export": ["gguf:q8_0"]})
            say(f"   {job['id']} {job['status']}; ${job['cost_held']} held")
            if watch(api, job["id"], quiet=quiet) != 0:
                raise RuntimeError(f"the job did not succeed: {api.job(job['id'])}")
            job = api.job(job["id"])
            adapter = workdir / f"{job['id']}-adapter.tar.gz"
            api.download(job["result_files"][0], adapter)
            used = use_it(api, job, workdir, say)
        with Client(demo.url, provider_key) as provider:
            earnings = provider.get("/v1/providers/me/earnings")
        audit = demo.cli("tunegrid-coordinator", "ledger", "audit").strip()

        say("[bold]6.[/] checking the adapter")
        _quiet_libraries()
        from demo.proof import adapter_lowers_loss  # noqa: PLC0415 - torch only now

        before, after, parameters = adapter_lowers_loss(
            workdir / "worker" / "data" / "models" / MODEL, adapter, data_file, workdir)
        result = DemoResult(job=job, earnings=earnings, adapter=adapter, audit=audit, loss_before=before,
                            loss_after=after, lora_parameters=parameters, url=demo.url, admin_key=admin_key,
                            used=used)
        say(f"   job {job['id']} {job['status']}: cost ${job['cost']} ({job['trained_tokens']} tokens trained)")
        say(f"   provider earned ${earnings['lifetime_earned']} (payable ${earnings['payable']}; payouts stay "
            f"pending without a Stripe key)")
        say(f"   ledger: {audit}")
        say(f"   adapter: {adapter}")
        say(f"   [green]the adapter loads ({parameters} LoRA parameters) and lowers the loss on the customer's "
            f"data from {before:.3f} to {after:.3f}[/]")
        if keep:
            say(f"\nStill running. Dashboard: {demo.url}/login with the admin key\n{admin_key}\n"
                f"Customer key (for `TUNEGRID_API_KEY=... tunegrid jobs list --api-url {demo.url}`):\n{customer_key}\n"
                "Press Ctrl-C to stop.")
            try:
                signal.pause()
            except KeyboardInterrupt:
                pass
        return result
    finally:
        demo.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path(".demo"), help="where the demo keeps its state (wiped first)")
    parser.add_argument("--keep", action="store_true", help="leave the marketplace running at the end")
    args = parser.parse_args(argv)
    shutil.rmtree(args.dir, ignore_errors=True)
    try:
        result = run(args.dir.resolve(), keep=args.keep)
    except RuntimeError as exc:
        console.print(f"[red]demo failed:[/] {exc}")
        return 1
    return 0 if result.loss_after < result.loss_before else 1
