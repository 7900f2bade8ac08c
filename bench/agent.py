"""The agent's own footprint: resident memory and CPU of the `tunegrid-worker run` process over a minute idle
(long-polling and heartbeating) and while a job runs (the trainer, its child, excluded). Linux (/proc).
Prints figures; never passes or fails.

    python bench/agent.py [--idle 60] [--heartbeat-interval 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import BIN, new_key, start_coordinator  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime of the agent alone, not its children


def rss_mb(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 1024**2


def watch(pid: int, seconds: float) -> tuple[float, float, float]:
    """(peak RSS MB, final RSS MB, CPU % of one core) over `seconds`."""
    start_cpu, start = cpu_seconds(pid), time.monotonic()
    peak = 0.0
    while time.monotonic() - start < seconds:
        peak = max(peak, rss_mb(pid))
        time.sleep(0.5)
    return peak, rss_mb(pid), 100 * (cpu_seconds(pid) - start_cpu) / (time.monotonic() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle", type=float, default=60.0)
    parser.add_argument("--heartbeat-interval", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        process, url, env = start_coordinator("sqlite", work / "coordinator", 1)
        agent_env = {**os.environ, "TUNEGRID_WORKER_CONFIG_DIR": str(work / "config"),
                     "TUNEGRID_WORKER_DATA_DIR": str(work / "worker")}
        try:
            subprocess.run([str(BIN / "tunegrid-worker"), "register", "--coordinator", url, "--provider-key",
                            new_key(env, "provider"), "--price", "0.05"], env=agent_env, check=True, capture_output=True)
            # The tiny model is built into the cache first, so the job measures training, not the build.
            cache = work / "worker" / "models" / "tunegrid" / "tiny-llama"
            subprocess.run([sys.executable, "-m", "worker.trainer.tiny", "--out", str(cache)], check=True, capture_output=True)
            (cache / ".complete").write_text("tunegrid/tiny-llama")
            agent = subprocess.Popen([str(BIN / "tunegrid-worker"), "run", "--runtime", "process",
                                      "--heartbeat-interval", str(args.heartbeat_interval)], env=agent_env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(3)  # imports done, first claim sent
            peak, final, cpu = watch(agent.pid, args.idle)
            print(f"idle {args.idle:.0f} s: RSS peak {peak:.1f} MB, end {final:.1f} MB; CPU {cpu:.2f}% of one core")
            key = new_key(env, "customer")
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
                lines = [json.dumps({"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                                                  {"role": "assistant", "content": str(2 * i)}]}) for i in range(60)]
                file_id = client.post("/v1/files", data={"purpose": "fine-tune"},
                                      files={"file": ("t.jsonl", "\n".join(lines).encode())}).json()["id"]
                job = client.post("/v1/fine_tuning/jobs", json={"model": "tunegrid/tiny-llama", "training_file": file_id,
                                                                 "hyperparameters": {"n_epochs": 20, "batch_size": 1}}).json()
                began = time.monotonic()
                start_cpu = cpu_seconds(agent.pid)
                peak = 0.0
                while client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] not in ("succeeded", "failed"):
                    peak = max(peak, rss_mb(agent.pid))
                    time.sleep(0.5)
                elapsed = time.monotonic() - began
                status = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"]
            cpu = 100 * (cpu_seconds(agent.pid) - start_cpu) / elapsed
            print(f"job ({status}, {elapsed:.1f} s): agent RSS peak {peak:.1f} MB; agent CPU {cpu:.2f}% of one core "
                  f"(the trainer excluded)")
            agent.terminate()
            agent.wait(timeout=30)
        finally:
            process.terminate()
            process.wait(timeout=15)
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
