"""Batch benchmark: requests/s and tokens/s of the batch program on this CPU, side by side in one run on the same
requests: ours (requests that sample alike generated together, 8 at a time, left-padded), against the same
program answering one request at a time (each request seeded, so each is its own group: what a naive loop over
`generate` does). Each runs as the subprocess the agent starts (`python -m worker.trainer --job DIR`); the rate is
taken from its own progress lines (from `started` to `finished`), so Python start and the model load are shown
apart. Prints figures; never passes or fails.

    python bench/batch.py [--requests 200] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shared.jobspec import JobSpec

ROOT = Path(__file__).resolve().parent.parent


def requests(n: int, max_tokens: int, *, seeded: bool) -> bytes:
    lines = []
    for i in range(n):
        body = {"model": "tunegrid/tiny-llama", "max_tokens": max_tokens, "temperature": 0.7,
                "messages": [{"role": "system", "content": "You answer with a number."},
                             {"role": "user", "content": f"What is {i} plus {i % 17}?"}]}
        if seeded:
            body["seed"] = i
        lines.append(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}))
    return ("\n".join(lines) + "\n").encode()


def run(model_dir: Path, job: Path, data: bytes) -> dict[str, float]:
    job.mkdir(parents=True)
    (job / "train.jsonl").write_bytes(data)
    spec = JobSpec(job_id="bench", kind="batch", base_model="tunegrid/tiny-llama", model_dir=str(model_dir),
                   max_seq_len=512)
    (job / "spec.json").write_text(spec.model_dump_json())
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "worker.trainer", "--job", str(job)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    lines = [json.loads(x) for x in (job / "out" / "progress.jsonl").read_text().splitlines()]
    begin = next(x["time"] for x in lines if x["type"] == "started")
    end = next(x["time"] for x in lines if x["type"] == "finished")
    answers = [json.loads(x) for p in sorted((job / "out" / "batch").glob("part-*.jsonl")) for x in p.read_text().splitlines()]
    completion = sum(a.get("completion_tokens", 0) for a in answers)
    prompt = sum(a.get("prompt_tokens", 0) for a in answers)
    generating = max(end - begin, 1e-9)
    return {"wall": wall, "generating": generating, "requests": len(answers), "completion": completion,
            "prompt": prompt}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    from worker.trainer.tiny import build

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        model_dir = build(root / "tiny")
        rows = {"ours (grouped, 8 a batch)": run(model_dir, root / "ours", requests(args.requests, args.max_tokens,
                                                                                    seeded=False)),
                "one at a time": run(model_dir, root / "alone", requests(args.requests, args.max_tokens, seeded=True))}
    print(f"{args.requests} requests, max_tokens {args.max_tokens}, the tiny model on {os.cpu_count()} CPU cores")
    print(f"{'':28} {'wall s':>8} {'generating s':>13} {'requests/s':>11} {'completion tok/s':>17} {'all tok/s':>10}")
    for name, r in rows.items():
        print(f"{name:28} {r['wall']:8.2f} {r['generating']:13.2f} {r['requests'] / r['generating']:11.1f} "
              f"{r['completion'] / r['generating']:17.1f} {(r['completion'] + r['prompt']) / r['generating']:10.1f}")
    ours, alone = rows.values()
    print(f"speed-up in requests/s: {(ours['requests'] / ours['generating']) / (alone['requests'] / alone['generating']):.2f}x")


if __name__ == "__main__":
    main()
